/* Loopback load generator for deetune's benchmarks, compiled by bench/common.py at bench time.
 *
 *   loadgen serve BASE_PORT NPORTS
 *       epoll server on 127.0.0.1:BASE_PORT..BASE_PORT+NPORTS-1: accept, read to EOF, close.
 *       On SIGTERM/SIGINT prints {"accepted":N} and exits.
 *   loadgen conn BASE_PORT NPORTS WORKERS SECONDS RATE PAYLOAD_BYTES
 *       WORKERS processes, each a loop of connect / write PAYLOAD_BYTES / close, round-robin over
 *       the ports.  RATE connections/s in total (open loop, fixed schedule; 0 = as fast as possible).
 *   loadgen conn-wait BASE_PORT NPORTS WORKERS SECONDS RATE PAYLOAD_BYTES
 *       same, but each connection ends the way a request does: write, shut the sending side down,
 *       read until the server has closed, close.  A worker has one connection at a time, so the
 *       clients cannot outrun the server: with plain conn at full speed they fill its accept
 *       queues (4,096 each) and the SYNs that overflow are retried only after a second.
 *   loadgen http PORT CONNS SECONDS RATE
 *       CONNS keep-alive connections (one process each) sending "GET / HTTP/1.1" and reading the
 *       whole response (Content-Length) before the next request, RATE requests/s in total.
 *   loadgen redis PORT CONNS SECONDS RATE
 *       same with the Redis command GET (RESP), reading one whole reply each time.
 *   loadgen syscalls COUNT
 *       COUNT getppid(2) calls in a loop; prints {"calls":COUNT,"ns_per_call":X}: what a syscall
 *       costs the host (a syscall tracepoint, attached, sends every syscall through a slow path).
 *
 * Clients print one JSON line: done (connections or requests completed), errors, seconds,
 * rate, the p50/p99/max latency of a connection or a request in microseconds, and how many took
 * 100 ms or more (over_100ms: a SYN dropped and retried, most often).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define HIST_US 100000 /* 1 µs buckets up to 100 ms, then one overflow bucket */

struct worker {
	uint64_t done, errors;
	uint64_t hist[HIST_US + 1];
};

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void sleep_until(uint64_t t)
{
	struct timespec ts = {.tv_sec = t / 1000000000ull, .tv_nsec = t % 1000000000ull};
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
		;
}

static struct sockaddr_in loopback(int port)
{
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	return a;
}

static void record(struct worker *w, uint64_t ns)
{
	uint64_t us = ns / 1000;
	w->hist[us > HIST_US ? HIST_US : us]++;
}

/* ---- server ---------------------------------------------------------------------------- */
static volatile sig_atomic_t stopping;
static void on_stop(int sig) { (void)sig; stopping = 1; }

static int serve(int base, int nports)
{
	int ep = epoll_create1(0);
	int *listeners = calloc(nports, sizeof(int));
	for (int i = 0; i < nports; i++) {
		int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		struct sockaddr_in a = loopback(base + i);
		if (bind(fd, (struct sockaddr *)&a, sizeof(a)) || listen(fd, 4096)) {
			perror("bind/listen");
			return 1;
		}
		listeners[i] = fd;
		struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)fd | (1ull << 32)};
		epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
	}
	struct sigaction sa = {.sa_handler = on_stop};
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	printf("listening\n");
	fflush(stdout);
	uint64_t accepted = 0;
	char buf[65536];
	struct epoll_event evs[256];
	while (!stopping) {
		int n = epoll_wait(ep, evs, 256, 200);
		for (int i = 0; i < n; i++) {
			int fd = (int)(evs[i].data.u64 & 0xffffffff);
			if (evs[i].data.u64 >> 32) {
				int c;
				while ((c = accept4(fd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
					accepted++;
					struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.u64 = (uint64_t)c};
					epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
				}
				continue;
			}
			for (;;) {
				ssize_t r = read(fd, buf, sizeof(buf));
				if (r > 0)
					continue;
				if (r < 0 && (errno == EAGAIN || errno == EINTR))
					break;
				close(fd); /* EOF or error; close removes it from the epoll set */
				break;
			}
		}
	}
	printf("{\"accepted\":%llu}\n", (unsigned long long)accepted);
	return 0;
}

/* ---- clients --------------------------------------------------------------------------- */
enum mode { CONN, CONN_WAIT, HTTP, REDIS };

static int connect_to(int port)
{
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0)
		return -1;
	struct sockaddr_in a = loopback(port);
	if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

static int write_all(int fd, const char *p, size_t n)
{
	while (n) {
		ssize_t w = write(fd, p, n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += w;
		n -= w;
	}
	return 0;
}

/* Read until the peer closes: 0, or -1 on an error. */
static int drain(int fd, char *buf, size_t size)
{
	for (;;) {
		ssize_t r = read(fd, buf, size);
		if (r == 0)
			return 0;
		if (r < 0 && errno != EINTR)
			return -1;
	}
}

/* Length of a complete HTTP response at the start of buf, 0 if incomplete. */
static size_t http_complete(const char *buf, size_t len)
{
	const char *end = memmem(buf, len, "\r\n\r\n", 4);
	if (!end)
		return 0;
	size_t head = end - buf + 4, body = 0;
	const char *cl = memmem(buf, head, "Content-Length:", 15);
	if (!cl)
		cl = memmem(buf, head, "content-length:", 15);
	if (cl)
		body = strtoul(cl + 15, NULL, 10);
	return len >= head + body ? head + body : 0;
}

/* Length of a complete RESP reply (simple, error, integer or bulk string), 0 if incomplete. */
static size_t resp_complete(const char *buf, size_t len)
{
	const char *eol = memmem(buf, len, "\r\n", 2);
	if (!eol)
		return 0;
	size_t line = eol - buf + 2;
	if (buf[0] != '$')
		return line;
	long n = strtol(buf + 1, NULL, 10);
	if (n < 0)
		return line;
	return len >= line + n + 2 ? line + n + 2 : 0;
}

static void client(enum mode mode, int base, int nports, int index, int workers, double seconds, double rate,
		   int payload, struct worker *w)
{
	static char buf[1 << 20];
	char *data = calloc(1, payload > 0 ? payload : 1);
	memset(data, 'x', payload);
	const char *request = mode == HTTP ? "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: loadgen\r\n\r\n"
					   : "*2\r\n$3\r\nGET\r\n$7\r\nbench:k\r\n";
	size_t request_len = strlen(request);
	uint64_t start = now_ns(), stop = start + (uint64_t)(seconds * 1e9);
	uint64_t interval = rate > 0 ? (uint64_t)(workers * 1e9 / rate) : 0;
	/* stagger the workers' schedules over one interval */
	uint64_t next = start + (interval * index) / (workers ? workers : 1);
	int fd = -1, port = base + index % nports;
	bool per_connection = mode == CONN || mode == CONN_WAIT;
	if (!per_connection && (fd = connect_to(base)) < 0) {
		w->errors++;
		return;
	}
	for (uint64_t i = 0;; i++) {
		if (interval) {
			if (next >= stop)
				break;
			sleep_until(next);
			next += interval;
		} else if (now_ns() >= stop) {
			break;
		}
		uint64_t t0 = now_ns();
		if (per_connection) {
			int c = connect_to(port);
			port = port + 1 < base + nports ? port + 1 : base;
			if (c < 0) {
				w->errors++;
				continue;
			}
			if (payload && write_all(c, data, payload) < 0)
				w->errors++;
			if (mode == CONN_WAIT && (shutdown(c, SHUT_WR) < 0 || drain(c, buf, sizeof(buf)) < 0))
				w->errors++;
			close(c);
		} else {
			if (write_all(fd, request, request_len) < 0) {
				w->errors++;
				return;
			}
			size_t have = 0, need = 0;
			while (!need) {
				ssize_t r = read(fd, buf + have, sizeof(buf) - have);
				if (r <= 0) {
					if (r < 0 && errno == EINTR)
						continue;
					w->errors++;
					return;
				}
				have += r;
				need = mode == HTTP ? http_complete(buf, have) : resp_complete(buf, have);
			}
		}
		record(w, now_ns() - t0);
		w->done++;
	}
	if (fd >= 0)
		close(fd);
}

static double percentile(const uint64_t *hist, uint64_t total, double p)
{
	uint64_t rank = (uint64_t)(p * total), seen = 0;
	for (int i = 0; i <= HIST_US; i++) {
		seen += hist[i];
		if (seen > rank)
			return i;
	}
	return HIST_US;
}

static int syscalls(long count)
{
	struct timespec a, b;
	clock_gettime(CLOCK_MONOTONIC, &a);
	for (long i = 0; i < count; i++)
		syscall(SYS_getppid);
	clock_gettime(CLOCK_MONOTONIC, &b);
	double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
	printf("{\"calls\":%ld,\"ns_per_call\":%.1f}\n", count, count ? ns / count : 0);
	return 0;
}

int main(int argc, char **argv)
{
	signal(SIGPIPE, SIG_IGN);
	if (argc == 3 && !strcmp(argv[1], "syscalls"))
		return syscalls(atol(argv[2]));
	if (argc >= 4 && !strcmp(argv[1], "serve"))
		return serve(atoi(argv[2]), atoi(argv[3]));
	enum mode mode;
	int base, nports = 1, workers, payload = 0, a = 2;
	if (argc == 8 && (!strcmp(argv[1], "conn") || !strcmp(argv[1], "conn-wait"))) {
		mode = argv[1][4] ? CONN_WAIT : CONN;
		base = atoi(argv[a++]);
		nports = atoi(argv[a++]);
	} else if (argc == 6 && (!strcmp(argv[1], "http") || !strcmp(argv[1], "redis"))) {
		mode = argv[1][0] == 'h' ? HTTP : REDIS;
		base = atoi(argv[a++]);
	} else {
		fprintf(stderr, "usage: see the comment at the top of loadgen.c\n");
		return 2;
	}
	workers = atoi(argv[a++]);
	double seconds = atof(argv[a++]), rate = atof(argv[a++]);
	if (mode == CONN || mode == CONN_WAIT)
		payload = atoi(argv[a++]);
	struct worker *ws = mmap(NULL, sizeof(struct worker) * workers, PROT_READ | PROT_WRITE,
				 MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	uint64_t started = now_ns();
	for (int i = 0; i < workers; i++) {
		if (fork() == 0) {
			client(mode, base, nports, i, workers, seconds, rate, payload, &ws[i]);
			_exit(0);
		}
	}
	while (wait(NULL) > 0)
		;
	double elapsed = (now_ns() - started) / 1e9;
	static uint64_t hist[HIST_US + 1];
	uint64_t done = 0, errors = 0;
	for (int i = 0; i < workers; i++) {
		done += ws[i].done;
		errors += ws[i].errors;
		for (int j = 0; j <= HIST_US; j++)
			hist[j] += ws[i].hist[j];
	}
	uint64_t max = 0;
	for (int j = 0; j <= HIST_US; j++)
		if (hist[j])
			max = j;
	printf("{\"done\":%llu,\"errors\":%llu,\"seconds\":%.3f,\"rate\":%.1f,\"p50_us\":%.0f,\"p99_us\":%.0f,"
	       "\"max_us\":%llu,\"over_100ms\":%llu}\n",
	       (unsigned long long)done, (unsigned long long)errors, elapsed, done / elapsed,
	       percentile(hist, done, 0.50), percentile(hist, done, 0.99), (unsigned long long)max,
	       (unsigned long long)hist[HIST_US]);
	return 0;
}
