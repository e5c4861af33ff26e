/* SPDX-License-Identifier: Apache-2.0
 *
 * The one truth for records that BPF programs write into ring buffers and
 * Python reads (deetune/records.py feeds this file, minus preprocessor
 * lines, to cffi's cdef).  Rules that keep both sides parsing it:
 *   - fixed-width types only (__u8 … __u64, __s32), no pointers, no bitfields;
 *   - sizes as enum constants, not macros;
 *   - every record starts with struct dt_header; fields ordered so that no
 *     implicit padding is needed (tests compare sizeof on both sides).
 */
#ifndef __DEETUNE_RECORDS_H__
#define __DEETUNE_RECORDS_H__

enum dt_limits {
	DT_COMM_LEN = 16,
	DT_CMDLINE_MAX = 4096,
	/* Largest payload prefix one data record can carry (a power of two);
	 * the capture_bytes knob picks the actual size, up to this. */
	DT_PAYLOAD_MAX = 65536,
	/* Scratch records per CPU (payload, tls): a run preempted holding one leaves the next. */
	DT_SCRATCH_SLOTS = 2,
};

enum dt_record_kind {
	DT_REC_EXEC = 1,
	DT_REC_FORK = 2,
	DT_REC_EXIT = 3,
	DT_REC_CONN_OPEN = 10,
	DT_REC_CONN_CLOSE = 11,
	DT_REC_CONN_FAILED = 12,
	DT_REC_DATA = 20,
};

enum dt_direction {
	DT_EGRESS = 0,   /* written/sent by this process */
	DT_INGRESS = 1,  /* read/received by this process */
};

enum dt_syscall {
	DT_SYS_READ = 1,
	DT_SYS_WRITE = 2,
	DT_SYS_READV = 3,
	DT_SYS_WRITEV = 4,
	DT_SYS_SENDTO = 5,
	DT_SYS_RECVFROM = 6,
	DT_SYS_SENDMSG = 7,
	DT_SYS_RECVMSG = 8,
	DT_SYS_SENDMMSG = 9,
	DT_SYS_RECVMMSG = 10,
	DT_SYS_SENDFILE = 11,
	/* A transfer some other call made (splice, io_uring, a 32-bit process's
	 * calls): its length only. */
	DT_SYS_OTHER = 12,
	/* Plaintext of a TLS connection, taken from the library's own calls (the
	 * tls probe): OpenSSL's SSL_read/SSL_read_ex, SSL_write/SSL_write_ex, Go's
	 * crypto/tls (*Conn).Read and (*Conn).Write. */
	DT_SYS_SSL_READ = 13,
	DT_SYS_SSL_WRITE = 14,
	DT_SYS_GO_TLS_READ = 15,
	DT_SYS_GO_TLS_WRITE = 16,
};

enum dt_role {
	DT_ROLE_UNKNOWN = 0,
	DT_ROLE_CLIENT = 1,
	DT_ROLE_SERVER = 2,
};

/* Bits of dt_conn_record.flags */
enum dt_conn_flags {
	DT_CONN_RESET_RECEIVED = 1,
	DT_CONN_RESET_SENT = 2,
	/* The kernel saw no open: the connection predates the agent (or the
	 * connection table was full); user space fills in from its snapshot. */
	DT_CONN_OPEN_UNSEEN = 4,
};

/* Indexes of the per-CPU stats array every probe object has. */
enum dt_stat {
	DT_STAT_EMITTED = 0,
	DT_STAT_LOST = 1,
	/* Records left out by overload sampling: calls on connections the payload
	 * probe does not copy, opens and closes the tcp probe does not report. */
	DT_STAT_SAMPLED_OUT = 2,
	/* Accounting keys that did not fit their map (counts missed, see dt_l7_*). */
	DT_STAT_ACCOUNTING_FULL = 3,
	/* Error exchanges whose heads were not copied: over the rate cap. */
	DT_STAT_ERROR_HEADS_CAPPED = 4,
	DT_STAT_MAX = 5,
};

/* A probe wakes its reader at every DT_RING_WAKE_RECORDS-th record of a CPU;
 * the reader keeps draining without sleeping while its ring stays over
 * 1/DT_RING_WAKE_FRACTION full. */
enum dt_ring {
	DT_RING_WAKE_FRACTION = 16,
	DT_RING_WAKE_RECORDS = 256,
};

struct dt_header {
	__u32 kind;           /* enum dt_record_kind */
	__u32 pid;            /* thread-group id (user-space "pid") */
	__u64 ts_ns;          /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
};

struct dt_process_record {
	struct dt_header hdr;
	__u32 ppid;
	__s32 exit_code;      /* DT_REC_EXIT: status as wait(2) encodes it */
	__u64 cgroup_id;
	__u32 cmdline_len;    /* bytes of cmdline copied (NUL-separated args) */
	__u32 cmdline_truncated;
	char comm[DT_COMM_LEN];
	char cmdline[DT_CMDLINE_MAX];
};

struct dt_conn_record {
	struct dt_header hdr;
	__u64 sock_id;        /* kernel address of struct sock: unique while open */
	__u64 conn_id;        /* socket cookie: unique per socket while the kernel runs
			       * (sock_id is reused as soon as the socket is freed) */
	__u64 open_ts_ns;     /* 0 when the open was not seen */
	__u64 bytes_sent;     /* tcp_sock.bytes_acked: payload acked by the peer */
	__u64 bytes_received; /* tcp_sock.bytes_received */
	__u64 cgroup_id;
	__u32 retransmits;
	__s32 error;          /* DT_REC_CONN_FAILED: sk_err (ECONNREFUSED, ETIMEDOUT …) */
	__u16 family;         /* AF_INET or AF_INET6 */
	__u16 lport;          /* host byte order */
	__u16 rport;
	__u8 role;            /* enum dt_role */
	__u8 flags;           /* enum dt_conn_flags */
	__u8 laddr[16];       /* IPv4 in the first 4 bytes */
	__u8 raddr[16];
	char comm[DT_COMM_LEN];
	__u8 sample_shift;    /* overload sampling when the connection opened: it stands
			       * for 1 << sample_shift connections (0: itself only) */
	__u8 _pad1;
	__u16 sample_key;     /* overload sampling's hash of the connection's ports
			       * (conn_sample_key in tcp.bpf.c) */
	__u8 _pad2[4];
};

/* Bits of dt_data_record.flags */
enum dt_data_flags {
	/* Copied because the accounting saw an error response (every one, whatever
	 * the overload sampling copies; up to a rate): the request's head (kept
	 * when it was sent) and the response's head, two records in that order,
	 * to be decoded on their own. */
	DT_DATA_ERROR_HEAD = 1,
	/* A UDP socket: the call moved one datagram; rport 0 when its peer is
	 * not known (received on an unconnected socket). */
	DT_DATA_DATAGRAM = 2,
	/* The bytes are a TLS connection's plaintext (the tls probe); the socket's
	 * own bytes (ciphertext) are not to be decoded. */
	DT_DATA_TLS = 4,
	/* With DT_DATA_ERROR_HEAD, on the response's head: the call was copied as
	 * well, for the connection's own decoding, which reports the error unless
	 * it lost the exchange (or the record was lost). */
	DT_DATA_ALSO_COPIED = 8,
	/* With DT_DATA_ERROR_HEAD, on the response's head (PostgreSQL): the requests
	 * were read after an error was answered, and the server skipped them (it
	 * ignores messages up to the next Sync): the response is the ReadyForQuery
	 * that ended them. */
	DT_DATA_AFTER_ERROR = 16,
};

/* Exact accounting in the kernel (bpf/l7.bpf.h, tcp.bpf.c): per-CPU counters keyed by
 * what an edge needs, never sampled, read by user space on its tick. */

enum dt_l7_protocol {
	DT_L7_UNKNOWN = 0,    /* not classified yet (and the connection counters' key) */
	DT_L7_HTTP = 1,
	DT_L7_REDIS = 2,
	DT_L7_MYSQL = 3,
	DT_L7_POSTGRES = 4,
	DT_L7_NONE = 255,     /* none of these: not looked at again */
};

enum dt_l7_limits {
	DT_L7_METHOD_LEN = 16,
	/* Latency bounds user space gives the kernel (const volatile); the last
	 * bucket holds what is above the last bound. */
	DT_LATENCY_BOUNDS = 512,
	/* Buckets of a latency histogram: above the bounds user space sets (it checks). */
	DT_LATENCY_BUCKETS = 368,
	/* Keys the kernel counts at once: each has a slot in the counters' arrays. */
	DT_L7_SLOTS = 8192,
	/* Bytes of an error response copied for its detail (DT_DATA_ERROR_HEAD). */
	DT_ERROR_HEAD_BYTES = 1024,
};

/* Bits of dt_l7_key.flags */
enum dt_l7_flags {
	DT_L7_ERROR = 1,          /* HTTP 5xx, a Redis error reply, a MySQL ERR, a PostgreSQL ErrorResponse */
	DT_L7_NO_RESPONSE = 2,    /* the connection ended (or a new request came) before a response */
	/* Not exchanges: counts of bytes the parser could not follow (requests =
	 * chunks); the edge's counts are then a lower bound. */
	DT_L7_UNPARSED = 4,
	/* Not exchanges: replies no request asked for (pub/sub pushes, a server
	 * speaking first); requests = replies. */
	DT_L7_UNSOLICITED = 8,
	/* Answered, but the replies could not be followed (see DT_L7_UNPARSED):
	 * counted without a status. */
	DT_L7_STATUS_UNKNOWN = 16,
};

/* An edge as one side of a connection sees it: the key of the kernel's counters. */
struct dt_edge {
	__u32 pid;            /* this side's process (thread-group id) */
	__u32 peer_pid;       /* server side: the client's process when it connected from this
			       * host while the agent ran; 0 otherwise */
	__u64 cgroup_id;
	__u8 raddr[16];       /* the other side's address (IPv4 in the first 4 bytes) */
	__u16 family;
	__u16 port;           /* the server's port: local on the server side, remote on the client side */
	__u8 role;            /* enum dt_role: which side this is */
	__u8 protocol;        /* enum dt_l7_protocol */
	__u8 _pad[2];
};

struct dt_l7_key {
	struct dt_edge edge;
	char method[DT_L7_METHOD_LEN]; /* HTTP method, Redis command (upper case), MySQL command code,
				       * PostgreSQL exchange ("QUERY", "EXECUTE", "STARTUP" …) */
	__u16 status;         /* HTTP status code; the others: 0 */
	__u8 flags;           /* enum dt_l7_flags */
	__u8 _pad[5];
};

/* Per CPU, per slot (the dt_l7_key a dt_l7_slot names). */
struct dt_l7_counts {
	__u64 requests;       /* exchanges (or chunks, replies: see dt_l7_flags) */
	__u64 request_bytes;
	__u64 response_bytes;
	__u64 latency_sum_ns; /* last request byte to first response byte */
};

/* Where a dt_l7_key's counters are (the dt_l7_slots map): slot `slot` of
 * dt_l7_counts and dt_l7_latency while the slot's generation is `gen`. */
struct dt_l7_slot {
	__u32 slot;
	__u32 gen;
};

/* Per slot, shared by the CPUs (atomic adds): exchanges by latency bucket
 * (latency <= bounds[i], the last: above every bound).  Wraps at 2^32: user
 * space reads the differences far more often. */
struct dt_latency_histogram {
	__u32 buckets[DT_LATENCY_BUCKETS];
};

/* Per CPU, per dt_edge (protocol 0): the connections of an edge. */
struct dt_conn_counts {
	__u64 opened;
	__u64 closed;
	__u64 failed;
	__u64 bytes_sent;     /* client -> server payload, at close */
	__u64 bytes_received; /* server -> client payload, at close */
	__u64 retransmits;
	__u64 resets;
};

/* The client side of a connection made on this host, by its 4-tuple (as the
 * client sees it): the server side's accept and first request find their local
 * client's process here (tcp.bpf.c writes it, both objects read it). */
struct dt_local_conn {
	__u8 laddr[16];
	__u8 raddr[16];
	__u16 lport;
	__u16 rport;
	__u16 family;
	__u16 _pad;
};

/* Bytes one call moved on a TCP socket.  Only `captured` bytes of data[]
 * are sent through the ring buffer; `size` is what the call moved. */
struct dt_data_record {
	struct dt_header hdr; /* ts_ns: when the transfer was done */
	__u64 sock_id;        /* same identity as dt_conn_record.sock_id */
	__u64 conn_id;        /* same identity as dt_conn_record.conn_id */
	__u64 cgroup_id;
	__u64 seq;            /* where this call's bytes start in their direction's stream:
			       * the bytes moved that way on the socket before it, since
			       * the probe first copied from it (calls not copied in
			       * between show as a jump) */
	__u32 tid;
	__s32 fd;             /* -1 for DT_SYS_OTHER */
	__u32 size;           /* bytes moved (per message for *mmsg) */
	__u32 captured;       /* bytes of data[] present: min(size, capture_bytes) */
	__u16 family;
	__u16 lport;
	__u16 rport;
	__u8 direction;       /* enum dt_direction */
	__u8 syscall;         /* enum dt_syscall */
	__u16 sample_key;     /* overload sampling's hash of the connection and period:
			       * copied while (sample_key & sample_mask) == 0 */
	__u8 sample_shift;    /* the sampling it was copied under: it stands for
			       * 1 << sample_shift connection-periods (0: itself only) */
	__u8 flags;           /* enum dt_data_flags */
	__u8 laddr[16];
	__u8 raddr[16];
	char comm[DT_COMM_LEN];
	__u8 data[DT_PAYLOAD_MAX];
};

/* The payload probe's live settings (its `controls` map, one entry). */
struct dt_payload_controls {
	__u32 sample_mask;    /* overload sampling: copy 1 connection in mask + 1 */
	__u32 generation;     /* bumped by every change to the maps a socket's verdict
			       * depends on (ports, capture sizes, muted); 0: not set up */
	__u32 sample_shift;   /* log2(mask + 1), copied into the records */
	__u32 _pad;
};

/* The tcp probe's live settings (its `controls` map, one entry). */
struct dt_tcp_controls {
	__u32 sample_mask;    /* overload sampling: report 1 connection in mask + 1 */
	__u32 sample_shift;   /* log2(mask + 1), copied into the reported records */
};

/* The tls probe's live settings (its `controls` map, one entry). */
struct dt_tls_controls {
	__u32 sample_mask;    /* overload sampling: copy 1 connection-period in mask + 1 */
	__u32 sample_shift;   /* log2(mask + 1), copied into the records */
};

#endif /* __DEETUNE_RECORDS_H__ */
