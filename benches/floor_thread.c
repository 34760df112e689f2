/*
 * floor_thread: the least a thread-per-connection echo server can do, as a
 * floor to measure forkd's thread mode against. Accept, start a detached
 * pthread with a small stack, echo until end-of-file, close. No logging,
 * no limits.
 *
 * usage: floor_thread PORT    (binds 127.0.0.1:PORT; 0 picks a free port)
 * Prints the bound address (127.0.0.1:PORT) on stdout once listening,
 * then closes stdout.
 *
 * cc -O2 -pthread -o floor_thread floor_thread.c
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* Stack of each connection thread: the echo buffer plus room for libc. */
#define STACK_SIZE (64 * 1024)

/* ---- connection thread */
static void *serve(void *arg)
{
	int fd = (int)(intptr_t)arg;
	char buf[16384];
	for (;;) {
		ssize_t n = read(fd, buf, sizeof buf);
		if (n == 0)
			break;
		if (n < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		ssize_t off = 0;
		while (off < n) {
			ssize_t w = write(fd, buf + off, (size_t)(n - off));
			if (w < 0) {
				if (errno == EINTR)
					continue;
				goto out;
			}
			off += w;
		}
	}
out:
	close(fd);
	return NULL;
}

/* ---- accepting thread */
int main(int argc, char **argv)
{
	struct sockaddr_in sa;
	socklen_t len = sizeof sa;
	pthread_attr_t attr;
	int one = 1, lfd;

	if (argc != 2) {
		fprintf(stderr, "usage: floor_thread PORT\n");
		return 100;
	}
	signal(SIGPIPE, SIG_IGN);
	pthread_attr_init(&attr);
	pthread_attr_setstacksize(&attr, STACK_SIZE);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);

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
		pthread_t t;
		int fd = accept(lfd, NULL, NULL);
		if (fd < 0)
			continue;
		if (pthread_create(&t, &attr, serve, (void *)(intptr_t)fd) != 0)
			close(fd);
	}
}
