/*
 * floor_udp: the least a UDP echo server (RFC 862) can do, as a floor to
 * measure forkd's UDP echo against. One socket, blocking: receive a
 * datagram, send it back to where it came from, again. No checks, no
 * limits, no logging, no poll.
 *
 * usage: floor_udp PORT    (binds 127.0.0.1:PORT; 0 picks a free port)
 * Prints the bound address as "udp 127.0.0.1:PORT" on stdout once bound
 * (the way forkd --print-addr prints UDP addresses), then closes stdout.
 *
 * cc -O2 -o floor_udp floor_udp.c
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	static char buf[65536];
	struct sockaddr_in sa;
	socklen_t len = sizeof sa;
	int fd;

	if (argc != 2) {
		fprintf(stderr, "usage: floor_udp PORT\n");
		return 100;
	}
	fd = socket(AF_INET, SOCK_DGRAM, 0);
	if (fd < 0) {
		perror("socket");
		return 111;
	}
	memset(&sa, 0, sizeof sa);
	sa.sin_family = AF_INET;
	sa.sin_port = htons((unsigned short)atoi(argv[1]));
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
		perror("bind");
		return 111;
	}
	getsockname(fd, (struct sockaddr *)&sa, &len);
	printf("udp 127.0.0.1:%u\n", (unsigned)ntohs(sa.sin_port));
	fclose(stdout);

	for (;;) {
		struct sockaddr_storage peer;
		socklen_t plen = sizeof peer;
		ssize_t n = recvfrom(fd, buf, sizeof buf, 0, (struct sockaddr *)&peer, &plen);
		if (n < 0)
			continue;
		sendto(fd, buf, (size_t)n, 0, (struct sockaddr *)&peer, plen);
	}
}
