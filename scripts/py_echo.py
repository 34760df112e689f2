#!/usr/bin/env python3
"""An echo server (RFC 862) on Python's socketserver, to compare forkd with.

usage: py_echo.py fork|thread PORT

Binds 127.0.0.1:PORT (0 picks a free port), prints the bound address on
stdout once listening, then closes stdout; SIGTERM stops it.
"""
import os
import signal
import socketserver
import sys


class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        sock = self.request
        while True:
            data = sock.recv(16384)
            if not data:
                break
            sock.sendall(data)


class Forking(socketserver.ForkingTCPServer):
    allow_reuse_address = True
    request_queue_size = 1024
    # The default of 40 would make the server wait for a child before each
    # accept once 40 connections are open.
    max_children = 1 << 20


class Threading(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    request_queue_size = 1024
    daemon_threads = True


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("fork", "thread"):
        sys.stderr.write("usage: py_echo.py fork|thread PORT\n")
        return 64
    cls = Forking if sys.argv[1] == "fork" else Threading
    server = cls(("127.0.0.1", int(sys.argv[2])), Echo)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    host, port = server.server_address[:2]
    sys.stdout.write(f"{host}:{port}\n")
    sys.stdout.flush()
    # Readers see end-of-file; descriptor 1 stays taken, so no socket lands on it.
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
