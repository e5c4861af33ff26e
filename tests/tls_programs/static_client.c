/* A TLS client with OpenSSL linked in: GET each path on one connection, print each status. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int read_response(SSL *ssl)
{
	char buf[65536];
	size_t have = 0, got;
	char *end;
	while (!(end = memmem(buf, have, "\r\n\r\n", 4))) {
		if (have == sizeof(buf) || !SSL_read_ex(ssl, buf + have, sizeof(buf) - have, &got))
			return -1;
		have += got;
	}
	int status = atoi(buf + 9);
	char *cl = strcasestr(buf, "\r\ncontent-length:");
	size_t body = cl && cl < end ? strtoul(cl + 17, NULL, 10) : 0;
	size_t seen = have - (size_t)(end + 4 - buf);
	while (seen < body) {
		if (!SSL_read_ex(ssl, buf, sizeof(buf), &got))
			return -1;
		seen += got;
	}
	return status;
}

int main(int argc, char **argv)
{
	char line[16];
	if (!fgets(line, sizeof(line), stdin)) /* go */
		return 2;
	SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
	SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
	inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
	if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0)
		return 3;
	SSL *ssl = SSL_new(ctx);
	SSL_set_fd(ssl, fd);
	if (SSL_connect(ssl) != 1)
		return 4;
	for (int i = 2; i < argc; i++) {
		char request[512];
		int n = snprintf(request, sizeof(request), "GET %s HTTP/1.1\r\nHost: static.test\r\n\r\n", argv[i]);
		if (SSL_write(ssl, request, n) != n)
			return 5;
		printf("%d\n", read_response(ssl));
	}
	SSL_shutdown(ssl);
	close(fd);
	return 0;
}
