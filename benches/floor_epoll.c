/*
 * floor_epoll: the least a single-threaded event-loop echo server can do,
 * as a floor to measure forkd's event mode against. One level-triggered
 * epoll loop over the listener and every connection, non-blocking sockets:
 * accept until EAGAIN, read what is there, write it back. No logging, no
 * limits, no timers.
 *
 * Like forkd's event mode it never reads from a client whose echo is not
 * all written (it waits for EPOLLOUT instead), so a client that does not
 * read cannot make it buffer without bound; unlike forkd it keeps one
 * fixed 16 KiB buffer per connection for that, from accept to close.
 *
 * usage: floor_epoll PORT    (binds 127.0.0.1:PORT; 0 picks a free port)
 * Prints the bound address (127.0.0.1:PORT) on stdout once listening,
 * then closes stdout.
 *
 * cc -O2 -o floor_epoll floor_epoll.c
 */
#define _GNU_SOURCE /* accept4 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF_SIZE 16384
#define EVENTS 256

struct conn {
	int fd;
	size_t off, len; /* bytes buf[off..len] still to write */
	char buf[BUF_SIZE];
};

static int ep;

static void finish(struct conn *c)
{
	close(c->fd); /* also takes it out of the epoll set */
	free(c);
}

static void watch(struct conn *c, unsigned events)
{
	struct epoll_event ev = { .events = events, .data.ptr = c };
	epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

/* Write what is pending; 1 when all is written, 0 when it would block, -1 on error. */
static int flush(struct conn *c)
{
	while (c->off < c->len) {
		ssize_t w = send(c->fd, c->buf + c->off, c->len - c->off, MSG_NOSIGNAL);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return errno == EAGAIN ? 0 : -1;
		}
		c->off += (size_t)w;
	}
	c->off = c->len = 0;
	return 1;
}

/* The connection is ready: echo until it would block. */
static void serve(struct conn *c)
{
	if (c->len > 0) { /* waiting to write */
		int r = flush(c);
		if (r < 0) {
			finish(c);
			return;
		}
		if (r == 0)
			return;
		watch(c, EPOLLIN);
	}
	for (;;) {
		ssize_t n = recv(c->fd, c->buf, sizeof c->buf, 0);
		if (n == 0) {
			finish(c);
			return;
		}
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN)
				finish(c);
			return;
		}
		c->off = 0;
		c->len = (size_t)n;
		int r = flush(c);
		if (r < 0) {
			finish(c);
			return;
		}
		if (r == 0) { /* backpressure: stop reading until it is written */
			watch(c, EPOLLOUT);
			return;
		}
	}
}

int main(int argc, char **argv)
{
	struct sockaddr_in sa;
	socklen_t len = sizeof sa;
	struct epoll_event ev, events[EVENTS];
	int one = 1, lfd;

	if (argc != 2) {
		fprintf(stderr, "usage: floor_epoll PORT\n");
		return 100;
	}
	signal(SIGPIPE, SIG_IGN);

	lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
	if (lfd < 0) {
		perror("socket");
		return 111;
	}
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	memset(&sa, 0, sizeof sa);
	sa.sin_family = AF_INET;
	sa.sin_port = htons((unsigned short)atoi(argv[1]));
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(lfd, 1024) < 0) {
		perror("bind/listen");
		return 111;
	}
	ep = epoll_create1(EPOLL_CLOEXEC);
	if (ep < 0) {
		perror("epoll_create1");
		return 111;
	}
	ev.events = EPOLLIN;
	ev.data.ptr = NULL; /* NULL: the listener */
	epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
	getsockname(lfd, (struct sockaddr *)&sa, &len);
	printf("127.0.0.1:%u\n", (unsigned)ntohs(sa.sin_port));
	fclose(stdout);

	for (;;) {
		int n = epoll_wait(ep, events, EVENTS, -1);
		for (int i = 0; i < n; i++) {
			struct conn *c = events[i].data.ptr;
			if (c) {
				serve(c);
				continue;
			}
			for (;;) { /* the listener: accept until none is waiting */
				int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
				if (fd < 0)
					break; /* EAGAIN, or EMFILE and the like: retried next time */
				c = malloc(sizeof *c);
				if (!c) {
					close(fd);
					continue;
				}
				c->fd = fd;
				c->off = c->len = 0;
				ev.events = EPOLLIN;
				ev.data.ptr = c;
				if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0)
					finish(c);
			}
		}
	}
}
