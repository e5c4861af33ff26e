// SPDX-License-Identifier: Apache-2.0
/* TLS plaintext: the bytes a process hands to its TLS library to encrypt, and
 * the bytes the library hands back decrypted, as the payload probe's records
 * (struct dt_data_record, DT_DATA_TLS set) of the TCP socket under the TLS
 * connection, so that user space decodes them like any socket's bytes.
 *
 * Sources: OpenSSL (1.1 and 3) through uprobes and uretprobes on SSL_read,
 * SSL_read_ex, SSL_write and SSL_write_ex; Go's crypto/tls through uprobes on
 * (*Conn).Read and (*Conn).Write at their entry and at each of their RET
 * instructions (a uretprobe rewrites the return address on the stack, which
 * Go moves when it grows a goroutine's stack).  User space finds the
 * libraries and binaries and attaches the programs; this object only reports.
 *
 * Which socket: a TLS object (SSL *, *tls.Conn) does not say.  While a TLS
 * call is in progress on a thread (SSL_read…, SSL_do_handshake, Go's Read,
 * Write and handshake), the first transfer that thread makes on a TCP socket
 * (the sock:sock_send_length and sock:sock_recv_length tracepoints, as
 * tp_btf, which fire inside the library's own read/write) ties the TLS object
 * to that socket, kept in an LRU map: a later call that returns bytes the
 * library had buffered, with no transfer of its own, still finds it.  Go's
 * calls are tied to their goroutine (register R14 on x86, R28 on arm64), the
 * same at the syscall inside the call: another goroutine scheduled on the
 * thread meanwhile ties nothing.
 *
 * Counting: the plaintext goes through the kernel's exact accounting
 * (l7.bpf.h, as the payload probe's calls do), its state per TLS object in an
 * LRU map, ended when the socket under it closes.  The ciphertext classifies
 * as nothing there, so nothing is counted twice.
 */
#include "common.bpf.h"
#define L7_BUF_SIZE DT_PAYLOAD_MAX
#include "l7.bpf.h"

const struct dt_data_record *dt_data_record_btf __attribute__((unused));
const struct dt_tls_controls *dt_tls_controls_btf __attribute__((unused));

/* Knobs, set by user space between open and load. 0 means "any". */
const volatile __u32 targ_tgid = 0;
/* The agent's own TLS connections are never captured. */
const volatile __u32 self_tgid = 0;
/* Prefix copied per call; at most DT_PAYLOAD_MAX. */
const volatile __u32 capture_bytes = 4096;
/* When set, only sockets whose local or remote port is in capture_ports. */
const volatile bool filter_ports = false;
/* Count every HTTP, Redis, MySQL and PostgreSQL exchange of the plaintext (l7.bpf.h). */
const volatile bool account_l7 = true;

/* The probe's own counters, beside dt_stats (user space reads both). */
enum tls_stat {
	/* Plaintext of a TLS object not tied to a socket yet: not reported. */
	TLS_STAT_NO_SOCKET = 0,
	/* TLS objects tied to a socket. */
	TLS_STAT_TIED = 1,
	TLS_STAT_MAX = 2,
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TLS_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} tls_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 24);
} tls_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u16);
	__type(value, __u8);
} capture_ports SEC(".maps");

/* Per-port capture sizes that override capture_bytes, as in the payload probe:
 * recording tasks raise it for the connections they record, live. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u16);
	__type(value, __u32);
} port_capture_bytes SEC(".maps");

/* User space's live settings: overload sampling. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct dt_tls_controls);
} controls SEC(".maps");

enum { OP_READ = 1, OP_WRITE = 2 };
enum { LIB_OPENSSL = 1, LIB_GO = 2 };

/* A TLS object of a process. */
struct tls_key {
	__u64 tgid;
	__u64 object; /* SSL * or *tls.Conn */
};

/* The socket under a TLS object, and the plaintext moved on it so far. */
struct tls_conn {
	__u64 sock_id;
	__u64 conn_id;
	__u64 moved[2]; /* plaintext bytes per direction (enum dt_direction): the records' seq */
	__u16 family;
	__u16 lport;
	__u16 rport;
	__u8 wanted;    /* network namespace and ports selected */
	__u8 _pad;
	__u8 laddr[16];
	__u8 raddr[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct tls_key);
	__type(value, struct tls_conn);
} tls_conns SEC(".maps");

/* The accounting's state of each TLS object's plaintext (l7.bpf.h). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, struct tls_key);
	__type(value, struct l7_sock);
} tls_l7 SEC(".maps");

/* The TLS object over each tied socket: its accounting ends when the socket closes. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct tls_key);
} tls_of_sock SEC(".maps");

static const struct l7_sock l7_sock_zero = {};

/* The TLS calls in progress on a thread.  An OpenSSL data call (SSL_read…)
 * and a handshake have a slot each: a handshake may run inside SSL_read. */
struct tls_calls {
	__u64 data_object;  /* SSL * of the SSL_read/SSL_write in progress; 0: none */
	__u64 buf;
	__u64 size_out;     /* the _ex forms' size_t * (bytes read or written); 0: the return value */
	__u64 hs_object;    /* SSL * or *tls.Conn of a handshake in progress; 0: none */
	__u64 tie_object;   /* the object the next TCP transfer of this thread ties; 0: none */
	__u64 tie_g;        /* Go: the goroutine that must be making that transfer */
	__u8 op;
};

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct tls_calls);
} tls_calls SEC(".maps");

/* Go calls in progress, by goroutine: a goroutine may resume on another thread. */
struct go_key {
	__u64 tgid;
	__u64 g;
};

struct go_call {
	__u64 conn;
	__u64 buf;
	__u8 op;
	__u8 reported; /* a Write reported at its entry */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct go_key);
	__type(value, struct go_call);
} go_calls SEC(".maps");

/* Go handshakes in progress, by goroutine (Read and Write run one inside when
 * the connection has not shaken hands yet: a map of their own). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct go_key);
	__type(value, __u64);
} go_handshakes SEC(".maps");

/* A record under construction, per CPU (see payload.bpf.c's scratch: an ARRAY
 * indexed by CPU, sized by user space; slack lets the verifier bound copies). */
struct scratch {
	struct dt_data_record rec;
	__u8 slack[DT_PAYLOAD_MAX];
	__u32 busy; /* see dt_scratch_acquire */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} tls_scratch SEC(".maps");

/* Registers: C arguments and return value, and Go's register ABI (Go 1.17+ on
 * x86, 1.18+ on arm64): a method's receiver and a slice's pointer and length
 * in the first three integer registers, the results in the first two. */
#if defined(__TARGET_ARCH_x86)
#define C_ARG0(r) ((r)->di)
#define C_ARG1(r) ((r)->si)
#define C_ARG2(r) ((r)->dx)
#define C_ARG3(r) ((r)->cx)
#define C_RET(r) ((r)->ax)
#define GO_ARG0(r) ((r)->ax)
#define GO_ARG1(r) ((r)->bx)
#define GO_ARG2(r) ((r)->cx)
#define GO_RET0(r) ((r)->ax)
#define GO_G(r) ((r)->r14)
#elif defined(__TARGET_ARCH_arm64)
#define C_ARG0(r) ((r)->regs[0])
#define C_ARG1(r) ((r)->regs[1])
#define C_ARG2(r) ((r)->regs[2])
#define C_ARG3(r) ((r)->regs[3])
#define C_RET(r) ((r)->regs[0])
#define GO_ARG0(r) ((r)->regs[0])
#define GO_ARG1(r) ((r)->regs[1])
#define GO_ARG2(r) ((r)->regs[2])
#define GO_RET0(r) ((r)->regs[0])
#define GO_G(r) ((r)->regs[28])
#else
#error "tls.bpf.c knows the registers of x86 and arm64 only"
#endif

static __always_inline void count(__u32 stat)
{
	__u64 *value = bpf_map_lookup_elem(&tls_stats, &stat);
	if (value)
		*value += 1;
}

static __always_inline bool process_selected(__u32 tgid)
{
	return tgid != self_tgid && (!targ_tgid || tgid == targ_tgid);
}

static __always_inline struct tls_calls *calls_of_current(bool create)
{
	struct task_struct *task = bpf_get_current_task_btf();
	return bpf_task_storage_get(&tls_calls, task, 0, create ? BPF_LOCAL_STORAGE_GET_F_CREATE : 0);
}

/* -- tying a TLS object to its socket --------------------------------------------------- */

static __always_inline bool port_selected(__u16 port)
{
	return bpf_map_lookup_elem(&capture_ports, &port) != 0;
}

static __always_inline int on_transfer(struct sock *sk)
{
	struct tls_calls *calls = calls_of_current(false);
	if (!calls || !calls->tie_object)
		return 0;
	__u16 family = sk->__sk_common.skc_family;
	if ((family != AF_INET && family != AF_INET6) || sk->sk_type != SOCK_STREAM)
		return 0;
	if (calls->tie_g) {
		/* Go: the transfer must be the goroutine's own (the registers it entered the
		 * syscall with; Go's syscall stubs keep the goroutine register). */
		struct task_struct *task = bpf_get_current_task_btf();
		struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(task);
		if (GO_G(regs) != calls->tie_g)
			return 0;
	}
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	struct tls_key key = {.tgid = pid_tgid >> 32, .object = calls->tie_object};
	calls->tie_object = 0;
	struct tls_conn *known = bpf_map_lookup_elem(&tls_conns, &key);
	if (known && known->sock_id == (__u64)sk)
		return 0;
	struct tls_conn conn = {};
	conn.sock_id = (__u64)sk;
	conn.conn_id = bpf_get_socket_cookie(sk);
	dt_sock_endpoints(sk, &conn.family, &conn.lport, &conn.rport, conn.laddr, conn.raddr);
	conn.wanted = dt_sock_netns_wanted(sk) &&
		      (!filter_ports || port_selected(conn.lport) || port_selected(conn.rport));
	bpf_map_update_elem(&tls_conns, &key, &conn, BPF_ANY);
	__u64 sock_id = (__u64)sk;
	bpf_map_update_elem(&tls_of_sock, &sock_id, &key, BPF_ANY);
	if (account_l7)
		bpf_map_update_elem(&tls_l7, &key, &l7_sock_zero, BPF_ANY); /* a new connection's exchanges */
	count(TLS_STAT_TIED);
	return 0;
}

/* A socket closes: the exchanges of the TLS object over it end (requests never answered are
 * counted as such) and its state goes. */
SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(tls_sock_close, struct sock *sk, int oldstate, int newstate)
{
	if (newstate != TCP_CLOSE)
		return 0;
	__u64 sock_id = (__u64)sk;
	struct tls_key *key = bpf_map_lookup_elem(&tls_of_sock, &sock_id);
	if (!key)
		return 0;
	struct tls_key k = *key;
	bpf_map_delete_elem(&tls_of_sock, &sock_id);
	struct l7_sock *st = bpf_map_lookup_elem(&tls_l7, &k);
	if (st && account_l7)
		l7_close(st, bpf_ktime_get_ns());
	bpf_map_delete_elem(&tls_l7, &k);
	return 0;
}

SEC("tp_btf/sock_send_length")
int BPF_PROG(tls_tie_send, struct sock *sk, int ret, int flags)
{
	return on_transfer(sk);
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(tls_tie_recv, struct sock *sk, int ret, int flags)
{
	return on_transfer(sk);
}

/* -- the records ------------------------------------------------------------------------ */

/* Overload sampling's key, the payload probe's (payload.bpf.c): both ports and the time in
 * units of 2^DT_SAMPLE_PERIOD_SHIFT jiffies, so that a local connection's two sides are sampled together, and
 * together with its ciphertext's sampling. */
static __always_inline __u16 sample_key(__u16 lport, __u16 rport)
{
	__u32 period = bpf_jiffies64() >> DT_SAMPLE_PERIOD_SHIFT;
	return (((lport ^ rport) + period * 0x9e3779b9u) * 2654435761u) >> 16;
}

static __always_inline __u32 copy_plaintext(struct scratch *s, __u64 buf, __u64 bytes, __u32 want)
{
	__u64 n = bytes < want ? bytes : want;
	n &= DT_PAYLOAD_MAX * 2 - 1;
	if (n > DT_PAYLOAD_MAX)
		n = DT_PAYLOAD_MAX;
	if (n && bpf_probe_read_user(s->rec.data, n, (const void *)buf) != 0)
		return 0;
	return n;
}

/* The exchanges of this call, counted (l7.bpf.h) whatever the sampling: its first bytes are
 * copied for it when the record copies fewer.  Returns the bytes now in the scratch. */
static __always_inline __u32 account(struct tls_key *key, struct tls_conn *conn, struct scratch *s, __u64 buf,
				     __u64 bytes, __u8 direction, __u32 copied, __u64 now)
{
	struct l7_sock *st = bpf_map_lookup_elem(&tls_l7, key);
	if (!st) {
		bpf_map_update_elem(&tls_l7, key, &l7_sock_zero, BPF_NOEXIST);
		st = bpf_map_lookup_elem(&tls_l7, key);
		if (!st)
			return copied;
	}
	if (st->protocol == DT_L7_NONE)
		return copied;
	__u32 need = l7_bytes_wanted(st, false, direction);
	if (need > copied && copied < bytes)
		copied = copy_plaintext(s, buf, bytes, need);
	const struct l7_bytes *b = (const struct l7_bytes *)s->rec.data;
	st->now = now;
	st->user = buf; /* the plaintext's buffer: PostgreSQL reads headers beyond the bytes copied */
	if (st->protocol == DT_L7_UNKNOWN) {
		if (!st->ends.set) {
			struct l7_endpoints *ends = &st->ends;
			ends->family = conn->family;
			ends->lport = conn->lport;
			ends->rport = conn->rport;
			__builtin_memcpy(ends->laddr, conn->laddr, 16);
			__builtin_memcpy(ends->raddr, conn->raddr, 16);
			ends->set = 1;
		}
		if (l7_classify_call(st, b, (__u64)copied << 32 | (__u32)bytes, direction)) {
			need = l7_bytes_wanted(st, false, direction);
			if (need > copied && copied < bytes)
				copied = copy_plaintext(s, buf, bytes, need);
		}
	}
	l7_account(st, b, (__u64)copied << 32 | (__u32)bytes, direction);
	return copied;
}

static __always_inline void emit(struct tls_key *key, __u64 buf, __u64 bytes, __u8 direction, __u8 call)
{
	struct tls_conn *conn = bpf_map_lookup_elem(&tls_conns, key);
	if (!conn) {
		count(TLS_STAT_NO_SOCKET);
		return;
	}
	__u32 limit = capture_bytes;
	bool copy = conn->wanted;
	__u32 *override = bpf_map_lookup_elem(&port_capture_bytes, &conn->lport);
	if (!override)
		override = bpf_map_lookup_elem(&port_capture_bytes, &conn->rport);
	if (override) {
		limit = *override; /* a recorded connection is copied even when not selected */
		copy = true;
	}
	if (limit > DT_PAYLOAD_MAX)
		limit = DT_PAYLOAD_MAX;
	/* Counting depends on the filters only, never on the sampling. */
	bool counted = account_l7 && conn->wanted;
	if (!copy && !counted)
		return;
	__u32 zero = 0;
	struct dt_tls_controls *ctl = bpf_map_lookup_elem(&controls, &zero);
	if (!ctl)
		return;
	__u64 seq = 0;
	__u16 skey = sample_key(conn->lport, conn->rport);
	if (copy) {
		/* Counted before the sampling: a call it leaves out is a jump in the stream. */
		seq = __sync_fetch_and_add(&conn->moved[direction & 1], bytes);
		if (skey & ctl->sample_mask) {
			dt_count(DT_STAT_SAMPLED_OUT);
			copy = false;
		}
	}
	if (!copy && !counted)
		return;
	struct scratch *s = dt_scratch_acquire(tls_scratch);
	if (!s)
		return;
	__u32 copied = copy_plaintext(s, buf, bytes, copy ? limit : 0);
	__u64 now = bpf_ktime_get_ns();
	if (counted)
		copied = account(key, conn, s, buf, bytes, direction, copied, now);
	if (!copy)
		goto out;
	__u32 captured = copied < limit ? copied : limit;
	struct dt_data_record *rec = &s->rec;
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	rec->hdr.kind = DT_REC_DATA;
	rec->hdr.pid = pid_tgid >> 32;
	rec->hdr.ts_ns = now;
	rec->sock_id = conn->sock_id;
	rec->conn_id = conn->conn_id;
	rec->cgroup_id = bpf_get_current_cgroup_id();
	rec->seq = seq;
	rec->tid = (__u32)pid_tgid;
	rec->fd = -1;
	rec->size = bytes;
	rec->captured = captured;
	rec->family = conn->family;
	rec->lport = conn->lport;
	rec->rport = conn->rport;
	rec->direction = direction;
	rec->syscall = call;
	rec->sample_key = skey;
	rec->sample_shift = ctl->sample_shift;
	rec->flags = DT_DATA_TLS;
	__builtin_memcpy(rec->laddr, conn->laddr, 16);
	__builtin_memcpy(rec->raddr, conn->raddr, 16);
	bpf_get_current_comm(rec->comm, sizeof(rec->comm));
	__u64 total = __builtin_offsetof(struct dt_data_record, data) + (captured & (DT_PAYLOAD_MAX * 2 - 1));
	if (total <= sizeof(*s))
		dt_output(&tls_events, rec, total);
out:
	s->busy = 0;
}

/* -- OpenSSL ---------------------------------------------------------------------------- */

static __always_inline int ssl_enter(struct pt_regs *ctx, __u8 op, bool ex)
{
	if (!process_selected(bpf_get_current_pid_tgid() >> 32))
		return 0;
	struct tls_calls *calls = calls_of_current(true);
	if (!calls)
		return 0;
	calls->data_object = C_ARG0(ctx);
	calls->buf = C_ARG1(ctx);
	calls->size_out = ex ? C_ARG3(ctx) : 0;
	calls->op = op;
	calls->tie_object = calls->data_object;
	calls->tie_g = 0;
	return 0;
}

static __always_inline int ssl_exit(struct pt_regs *ctx)
{
	struct tls_calls *calls = calls_of_current(false);
	if (!calls || !calls->data_object)
		return 0;
	struct tls_key key = {.tgid = bpf_get_current_pid_tgid() >> 32, .object = calls->data_object};
	__u64 buf = calls->buf;
	__u8 op = calls->op;
	__u64 size_out = calls->size_out;
	calls->data_object = 0;
	if (calls->tie_object == key.object)
		calls->tie_object = 0;
	long ret = (int)C_RET(ctx);
	__u64 bytes = 0;
	if (size_out) {
		/* SSL_read_ex/SSL_write_ex: 1 on success, the count through the pointer (and
		 * ssl_read_internal/ssl_write_internal, which they wrap: > 0). */
		if (ret <= 0 || bpf_probe_read_user(&bytes, sizeof(bytes), (const void *)size_out) != 0)
			return 0;
	} else {
		if (ret <= 0)
			return 0;
		bytes = ret;
	}
	if (bytes == 0 || bytes > 0x7fffffff)
		return 0;
	if (op == OP_READ)
		emit(&key, buf, bytes, DT_INGRESS, DT_SYS_SSL_READ);
	else
		emit(&key, buf, bytes, DT_EGRESS, DT_SYS_SSL_WRITE);
	return 0;
}

SEC("uprobe")
int ssl_read_enter(struct pt_regs *ctx) { return ssl_enter(ctx, OP_READ, false); }

SEC("uprobe")
int ssl_read_ex_enter(struct pt_regs *ctx) { return ssl_enter(ctx, OP_READ, true); }

SEC("uprobe")
int ssl_write_enter(struct pt_regs *ctx) { return ssl_enter(ctx, OP_WRITE, false); }

SEC("uprobe")
int ssl_write_ex_enter(struct pt_regs *ctx) { return ssl_enter(ctx, OP_WRITE, true); }

SEC("uretprobe")
int ssl_data_exit(struct pt_regs *ctx) { return ssl_exit(ctx); }

/* SSL_do_handshake (SSL_connect and SSL_accept call it): its transfers tie the
 * object before any data call, for the first SSL_read that finds its bytes
 * already buffered (read-ahead) and so makes no transfer of its own. */
SEC("uprobe")
int ssl_handshake_enter(struct pt_regs *ctx)
{
	if (!process_selected(bpf_get_current_pid_tgid() >> 32))
		return 0;
	struct tls_calls *calls = calls_of_current(true);
	if (!calls)
		return 0;
	calls->hs_object = C_ARG0(ctx);
	calls->tie_object = calls->hs_object;
	calls->tie_g = 0;
	return 0;
}

SEC("uretprobe")
int ssl_handshake_exit(struct pt_regs *ctx)
{
	struct tls_calls *calls = calls_of_current(false);
	if (!calls)
		return 0;
	if (calls->tie_object == calls->hs_object)
		calls->tie_object = 0;
	calls->hs_object = 0;
	return 0;
}

/* -- Go crypto/tls ---------------------------------------------------------------------- */

static __always_inline void go_tie(__u64 conn, __u64 g)
{
	struct tls_calls *calls = calls_of_current(true);
	if (calls) {
		calls->tie_object = conn;
		calls->tie_g = g;
	}
}

static __always_inline void go_untie(__u64 g)
{
	struct tls_calls *calls = calls_of_current(false);
	if (calls && calls->tie_g == g) {
		calls->tie_object = 0;
		calls->tie_g = 0;
	}
}

static __always_inline int go_enter(struct pt_regs *ctx, __u8 op)
{
	__u64 tgid = bpf_get_current_pid_tgid() >> 32;
	if (!process_selected(tgid))
		return 0;
	struct go_key key = {.tgid = tgid, .g = GO_G(ctx)};
	struct go_call call = {.conn = GO_ARG0(ctx), .buf = GO_ARG1(ctx), .op = op};
	/* The probe is at the stack check's jump (tls_targets._go_stack_check): when the stack
	 * grows the call starts again, with the same arguments, and the probe fires again before
	 * any RET.  Its Write was reported the first time. */
	struct go_call *again = bpf_map_lookup_elem(&go_calls, &key);
	if (again && again->op == op && again->conn == call.conn && again->buf == call.buf)
		return 0;
	if (op == OP_WRITE) {
		/* Reported now, before its bytes leave: Go reads and writes a connection from
		 * different goroutines (its HTTP client's read and write loops, HTTP/2's reader
		 * and writer), and the reader may take the answer in before the writer reaches
		 * a RET.  (*Conn).Write writes all of b or fails. */
		struct tls_key tkey = {.tgid = tgid, .object = call.conn};
		__u64 len = GO_ARG2(ctx);
		if (len && len <= 0x7fffffff && bpf_map_lookup_elem(&tls_conns, &tkey)) {
			emit(&tkey, call.buf, len, DT_EGRESS, DT_SYS_GO_TLS_WRITE);
			call.reported = 1;
		}
	}
	bpf_map_update_elem(&go_calls, &key, &call, BPF_ANY);
	go_tie(call.conn, key.g);
	return 0;
}

static __always_inline int go_exit(struct pt_regs *ctx)
{
	struct go_key key = {.tgid = bpf_get_current_pid_tgid() >> 32, .g = GO_G(ctx)};
	struct go_call *call = bpf_map_lookup_elem(&go_calls, &key);
	if (!call)
		return 0;
	struct go_call done = *call;
	bpf_map_delete_elem(&go_calls, &key);
	go_untie(key.g);
	long n = (long)GO_RET0(ctx);
	if (n <= 0 || n > 0x7fffffff || done.reported)
		return 0;
	struct tls_key tkey = {.tgid = key.tgid, .object = done.conn};
	if (done.op == OP_READ)
		emit(&tkey, done.buf, n, DT_INGRESS, DT_SYS_GO_TLS_READ);
	else
		emit(&tkey, done.buf, n, DT_EGRESS, DT_SYS_GO_TLS_WRITE);
	return 0;
}

SEC("uprobe")
int go_tls_read_enter(struct pt_regs *ctx) { return go_enter(ctx, OP_READ); }

SEC("uprobe")
int go_tls_write_enter(struct pt_regs *ctx) { return go_enter(ctx, OP_WRITE); }

/* At every RET of (*Conn).Read and (*Conn).Write. */
SEC("uprobe")
int go_tls_data_exit(struct pt_regs *ctx) { return go_exit(ctx); }

/* (*Conn).handshakeContext (HandshakeContext, Handshake, and a first Read or Write
 * call it): ties the connection before its first Read, which may find the peer's
 * first bytes read along with the handshake's. */
SEC("uprobe")
int go_tls_handshake_enter(struct pt_regs *ctx)
{
	__u64 tgid = bpf_get_current_pid_tgid() >> 32;
	if (!process_selected(tgid))
		return 0;
	struct go_key key = {.tgid = tgid, .g = GO_G(ctx)};
	__u64 conn = GO_ARG0(ctx);
	bpf_map_update_elem(&go_handshakes, &key, &conn, BPF_ANY);
	go_tie(conn, key.g);
	return 0;
}

/* At every RET of (*Conn).handshakeContext. */
SEC("uprobe")
int go_tls_handshake_exit(struct pt_regs *ctx)
{
	struct go_key key = {.tgid = bpf_get_current_pid_tgid() >> 32, .g = GO_G(ctx)};
	if (bpf_map_delete_elem(&go_handshakes, &key) == 0)
		go_untie(key.g);
	return 0;
}

/* -- processes -------------------------------------------------------------------------- */

/* An exec: user space looks at the new program (a Go binary, OpenSSL linked in,
 * or a libssl it maps) and attaches.  A bare header: its kind and pid. */
SEC("tracepoint/sched/sched_process_exec")
int tls_exec(void *ctx)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (!process_selected(tgid) || !dt_task_netns_wanted())
		return 0;
	struct dt_header hdr;
	dt_fill_header(&hdr, DT_REC_EXEC, tgid);
	dt_output(&tls_events, &hdr, sizeof(hdr));
	return 0;
}

/* -- the trap floor --------------------------------------------------------------------- */

/* Attached in place of the programs above by bench/bench_tls.py's floor mode (TlsProbe's floor=True),
 * at the same places: what the uprobe and uretprobe traps cost with nothing to run. */
SEC("uprobe")
int tls_floor_enter(struct pt_regs *ctx) { return 0; }

SEC("uretprobe")
int tls_floor_exit(struct pt_regs *ctx) { return 0; }
