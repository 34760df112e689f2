/*
 * floor_prefork: the least a prefork echo server can do, as a floor to
 * measure forkd's prefork mode against. The parent forks WORKERS workers and
 * waits; each worker blocks in accept(2) on the one listener (the kernel
 * wakes one waiter per connection), echoes until end-of-file, closes, and
 * accepts again. No logging, no limits, no respawning: a worker that dies
 * is gone. SIGTERM to the process group ends it all.
 *
 * usage: floor_prefork PORT WORKERS   (binds 127.0.0.1:PORT; 0 picks a free port)
 * Prints the bound address (127.0.0.1:PORT) on stdout once listening,
 * then closes stdout.
 *
 * cc -O2 -o floor_prefork floor_prefork.c
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

/* ---- worker */
static void serve(int fd)
{
	char buf[16384];
	for (;;) {
		ssize_t n = read(fd, buf, sizeof buf);
		if (n == 0)
			return;
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return;
		}
		for (ssize_t off = 0; off < n;) {
			ssize_t w = write(fd, buf + off, (size_t)(n - off));
			if (w < 0) {
				if (errno == EINTR)
					continue;
				return;
			}
			off += w;
		}
	}
}

static void work(int lfd)
{
	for (;;) {
		int fd = accept(lfd, NULL, NULL);
		if (fd < 0)
			continue; /* ECONNABORTED, EINTR: accept again */
		serve(fd);
		close(fd);
	}
}

/* ---- parent */
int main(int argc, char **argv)
{
	struct sockaddr_in sa;
	socklen_t len = sizeof sa;
	int one = 1, lfd, workers;

	if (argc != 3 || (workers = atoi(argv[2])) < 1) {
		fprintf(stderr, "usage: floor_prefork PORT WORKERS\n");
		return 100;
	}
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
	for (int i = 0; i < workers; i++) {
		pid_t pid = fork();
		if (pid == 0)
			work(lfd);
		if (pid < 0) {
			perror("fork");
			return 111;
		}
	}
	printf("127.0.0.1:%u\n", (unsigned)ntohs(sa.sin_port));
	fclose(stdout);
	/* The parent only waits; it exits when the workers are gone. */
	while (wait(NULL) > 0 || errno == EINTR)
		;
	return 0;
}
