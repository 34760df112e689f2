/*
 * floor_fork: the least a forking echo server can do, as a floor to measure
 * forkd's fork mode against. Accept, fork, echo until end-of-file, _exit;
 * the parent reaps in a SIGCHLD handler. No logging, no limits.
 *
 * usage: floor_fork PORT    (binds 127.0.0.1:PORT; 0 picks a free port)
 * Prints the bound address (127.0.0.1:PORT) on stdout once listening,
 * then closes stdout.
 *
 * cc -O2 -o floor_fork floor_fork.c
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static void reap(int sig)
{
	int saved = errno;
	(void)sig;
	while (waitpid(-1, NULL, WNOHANG) > 0)
		;
	errno = saved;
}

/* ---- child */
static void serve(int fd)
{
	char buf[16384];
	for (;;) {
		ssize_t n = read(fd, buf, sizeof buf);
		if (n == 0)
			break;
		if (n < 0) {
			if (errno == EINTR)
				continue;
			_exit(1);
		}
		for (ssize_t off = 0; off < n;) {
			ssize_t w = write(fd, buf + off, (size_t)(n - off));
			if (w < 0) {
				if (errno == EINTR)
					continue;
				_exit(1);
			}
			off += w;
		}
	}
	_exit(0);
}

/* ---- parent */
int main(int argc, char **argv)
{
	struct sockaddr_in sa;
	socklen_t len = sizeof sa;
	struct sigaction act;
	int one = 1, lfd;

	if (argc != 2) {
		fprintf(stderr, "usage: floor_fork PORT\n");
		return 100;
	}
	memset(&act, 0, sizeof act);
	act.sa_handler = reap;
	act.sa_flags = SA_RESTART | SA_NOCLDSTOP;
	sigemptyset(&act.sa_mask);
	sigaction(SIGCHLD, &act, NULL);
	signal(SIGPIPE, SIG_IGN);

	lfd = socket(AF_INET, SOCK_STREAM, 0);
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
	getsockname(lfd, (struct sockaddr *)&sa, &len);
	printf("127.0.0.1:%u\n", (unsigned)ntohs(sa.sin_port));
	fclose(stdout);

	for (;;) {
		int fd = accept(lfd, NULL, NULL);
		if (fd < 0)
			continue; /* EINTR from SIGCHLD, or a transient error */
		pid_t pid = fork();
		if (pid == 0) {
			close(lfd);
			serve(fd);
		}
		close(fd);
	}
}
