// SPDX-License-Identifier: Apache-2.0
/* Socket payload capture at the socket layer: every sock_sendmsg and
 * sock_recvmsg that moved bytes on a TCP socket of a selected process becomes
 * one record with the bytes moved (a prefix of at most capture_bytes) and the
 * full count.
 *
 * Hooks: the sock:sock_send_length and sock:sock_recv_length tracepoints, as
 * tp_btf programs.  They fire in the calling task, after the transfer, with
 * the struct sock itself, for every read/write/send/recv-family call on a
 * socket.  The user buffer is found from the syscall's saved registers (the
 * syscall number says how to read them).  Why not the syscalls' own
 * tracepoints: enabling any of them sends every syscall of every process on
 * the host through the slow syscall path, and they give a file descriptor to
 * walk to the socket; together that cost a traced nginx more than the copy
 * (see docs/performance.md, section 2).
 *
 * Selection happens before anything is copied: process, cgroup, then a
 * per-socket verdict (ports, muted, recorded) kept in the socket's own
 * storage and recomputed when user space changes any of its inputs, then
 * overload sampling.
 */
#include "common.bpf.h"
#define L7_BUF_SIZE DT_PAYLOAD_MAX
#include "l7.bpf.h"

const struct dt_data_record *dt_data_record_btf __attribute__((unused));
const struct dt_payload_controls *dt_payload_controls_btf __attribute__((unused));

/* Knobs, set by user space between open and load. 0 means "any". */
const volatile __u32 targ_tgid = 0;
const volatile __u64 targ_cgroup_id = 0;
/* The agent's own sockets are never captured (its API, its exporters). */
const volatile __u32 self_tgid = 0;
/* Prefix copied per call; at most DT_PAYLOAD_MAX. */
const volatile __u32 capture_bytes = 4096;
/* When set, only sockets whose local or remote port is in capture_ports. */
const volatile bool filter_ports = false;
/* Exact accounting of HTTP, Redis, MySQL and PostgreSQL exchanges (l7.bpf.h), whatever is copied. */
const volatile bool account_l7 = true;
/* Heads of error exchanges copied per second at most, on connections the
 * overload sampling leaves out (the rest counted as capped). */
const volatile __u32 error_heads_per_second = 200;

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 24);
} data_events SEC(".maps");

/* Error heads have a ring of their own: copies for detail filling data_events
 * must not crowd out an error's only record. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} error_heads SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u16);
	__type(value, __u8);
} capture_ports SEC(".maps");

/* Per-port capture sizes that override capture_bytes (larger or smaller):
 * recording tasks raise it for the connections they record, live. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u16);
	__type(value, __u32);
} port_capture_bytes SEC(".maps");

/* Sockets user space found to carry nothing it decodes: not copied any more.
 * Entries go when the socket closes (its address may be reused). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u8);
} muted_socks SEC(".maps");

/* User space's live settings: overload sampling, and a generation it bumps
 * whenever it changes a map a socket's verdict depends on. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct dt_payload_controls);
} controls SEC(".maps");

/* A socket's verdict, in the socket's storage (freed with the socket): the
 * map lookups behind it are made once per socket and generation, not once
 * per call. */
struct verdict {
	__u32 generation; /* of the controls it was made under; 0: none yet */
	__u32 capture;    /* prefix to copy per call */
	bool copy;        /* copy its calls (selected and not muted, or recorded) */
	bool selected;    /* the ports filter takes it: its exchanges are counted */
	__u64 moved[2];   /* bytes moved per direction (enum dt_direction) while copy was set */
	struct l7_sock l7;
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct verdict);
} verdicts SEC(".maps");

/* Which message of a thread's current sendmmsg/recvmmsg call comes next:
 * the tracepoints fire once per message and do not say which. */
struct mmsg_cursor {
	__u64 array;
	__u64 vlen;
	__u64 next;
};

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct mmsg_cursor);
} mmsg_cursors SEC(".maps");

enum buffer_shape {
	SHAPE_BUF = 0,   /* one contiguous buffer */
	SHAPE_IOV = 1,   /* struct iovec[] */
	SHAPE_MSG = 2,   /* struct user_msghdr */
	SHAPE_MMSG = 3,  /* struct mmsghdr[] */
	SHAPE_NONE = 4,  /* no user buffer (sendfile, splice, io_uring …): the length only */
};

/* How many iovecs one call copies from: bounded for the verifier.  With bpf_loop
 * (Linux 5.17+; its callback is verified once) up to MAX_IOVECS_LOOP: gRPC's C
 * core writes a frame's pieces as dozens of iovecs; an unrolled bound that high
 * takes the verifier seconds. */
#define MAX_IOVECS 4
#define MAX_IOVECS_LOOP 1024

/* A syscall's number and arguments in the registers it saved on entry; the
 * numbers are each architecture's ABI. */
#if defined(__TARGET_ARCH_x86)
#define SYSCALL_NR(regs) ((regs)->orig_ax)
#define SYSCALL_ARG0(regs) ((regs)->di)
#define SYSCALL_ARG1(regs) ((regs)->si)
#define SYSCALL_ARG2(regs) ((regs)->dx)
enum {
	NR_read = 0, NR_write = 1, NR_readv = 19, NR_writev = 20, NR_sendfile = 40, NR_sendto = 44,
	NR_recvfrom = 45, NR_sendmsg = 46, NR_recvmsg = 47, NR_recvmmsg = 299, NR_sendmmsg = 307,
};
#elif defined(__TARGET_ARCH_arm64)
#define SYSCALL_NR(regs) ((regs)->syscallno)
#define SYSCALL_ARG0(regs) ((regs)->orig_x0) /* x0 becomes the return value; orig_x0 keeps the argument */
#define SYSCALL_ARG1(regs) ((regs)->regs[1])
#define SYSCALL_ARG2(regs) ((regs)->regs[2])
enum {
	NR_read = 63, NR_write = 64, NR_readv = 65, NR_writev = 66, NR_sendfile = 71, NR_sendto = 206,
	NR_recvfrom = 207, NR_sendmsg = 211, NR_recvmsg = 212, NR_recvmmsg = 243, NR_sendmmsg = 269,
};
#else
#error "payload.bpf.c knows the syscalls of x86 and arm64 only"
#endif

/* UAPI flags and task flags (stable values). */
enum { MSG_PEEK = 2, MSG_ERRQUEUE = 0x2000 };
enum { PF_IO_WORKER = 0x10, PF_KTHREAD = 0x00200000 };

struct call {
	__u64 arg;      /* buffer, iovec array, msghdr or mmsghdr array */
	__u64 vlen;     /* iovec or message count */
	__s32 fd;
	__u8 syscall;
	__u8 shape;
	/* Where the bytes are (resolve_buffer): one buffer (vlen 0) or an iovec array. */
	__u64 src;
	__u64 nvecs;
};

struct error_budget {
	__u64 second;
	__u32 used;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct error_budget);
} error_budget SEC(".maps");

/* A record under construction: per CPU, with slack after data[] so that the
 * verifier can prove every (offset, length) copy stays inside.  An ARRAY map
 * indexed by CPU because per-CPU maps cap values at 32 KiB; user space sets
 * max_entries to the number of possible CPUs. */
struct scratch {
	struct dt_data_record rec;
	__u8 slack[DT_PAYLOAD_MAX];
	/* The call being handled: here rather than on the stack, which the
	 * accounting's calls need. */
	struct call call;
	__u32 busy; /* see dt_scratch_acquire */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} data_scratch SEC(".maps");

static __always_inline bool port_selected(__u16 port)
{
	return bpf_map_lookup_elem(&capture_ports, &port) != 0;
}

static __always_inline bool process_selected(__u32 tgid)
{
	if (tgid == self_tgid || (targ_tgid && tgid != targ_tgid))
		return false;
	return !targ_cgroup_id || bpf_get_current_cgroup_id() == targ_cgroup_id;
}

/* bench/bench_kernel_stages.py builds this program stopped after each stage of a call's work
 * (-DDT_STAGE_STOP=N) to measure what each costs; 0, the default, is the whole program. */
#ifndef DT_STAGE_STOP
#define DT_STAGE_STOP 0
#endif
#define DT_STAGE_ENTRY 1     /* past the first checks */
#define DT_STAGE_VERDICT 2   /* past the socket's storage */
#define DT_STAGE_CALL 3      /* past identifying the call and its buffer */
#define DT_STAGE_BYTES 4     /* past copying the bytes the accounting needs */
#define DT_STAGE_ACCOUNT 5   /* the accounting whole, no copies for detail */
#define DT_STAGE_IS(n) (DT_STAGE_STOP == (n))

/* The map lookups behind a verdict. */
static __always_inline void decide(struct verdict *v, __u64 sk_key, __u16 lport, __u16 rport)
{
	__u32 *override = bpf_map_lookup_elem(&port_capture_bytes, &lport);
	if (!override)
		override = bpf_map_lookup_elem(&port_capture_bytes, &rport);
	if (override) {
		/* A recorded connection is copied even when muted or unselected. */
		v->capture = *override;
		v->copy = true;
		v->selected = true;
		return;
	}
	v->capture = capture_bytes;
	v->selected = !filter_ports || port_selected(lport) || port_selected(rport);
	v->copy = v->selected && !bpf_map_lookup_elem(&muted_socks, &sk_key);
}

/* Overload sampling: while user space cannot keep up, it sets a mask and only
 * connections whose sample key has none of its bits are copied (1 in mask + 1).
 * The key hashes both ports (a local connection is sampled on both sides or on
 * neither) and the time in units of 2^DT_SAMPLE_PERIOD_SHIFT jiffies (a plain
 * load, where a clock read is slow in a VM), so the sampled connections change
 * over time: a host with few busy connections is sampled evenly.
 * Recorded connections too: under overload, whole connections beat records
 * lost at random.  The key travels in the record: when the mask grows, user
 * space applies it to the records already in the ring as well. */
static __always_inline __u16 sample_key(__u16 lport, __u16 rport)
{
	__u32 period = bpf_jiffies64() >> DT_SAMPLE_PERIOD_SHIFT;
	return (((lport ^ rport) + period * 0x9e3779b9u) * 2654435761u) >> 16;
}

/* What the calling syscall is and where its buffer is.  A transfer made on
 * behalf of some other syscall (splice, io_uring, a 32-bit process's calls)
 * is reported by its length only. */
static __always_inline void identify_call(struct task_struct *task, __u8 direction, struct call *call)
{
	call->syscall = DT_SYS_OTHER;
	call->shape = SHAPE_NONE;
	call->fd = -1;
	if (task->flags & PF_IO_WORKER)
		return;
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(task);
	long nr = SYSCALL_NR(regs);
	__u8 syscall, shape, want = DT_INGRESS;
	switch (nr) {
	case NR_read: syscall = DT_SYS_READ; shape = SHAPE_BUF; break;
	case NR_readv: syscall = DT_SYS_READV; shape = SHAPE_IOV; break;
	case NR_recvfrom: syscall = DT_SYS_RECVFROM; shape = SHAPE_BUF; break;
	case NR_recvmsg: syscall = DT_SYS_RECVMSG; shape = SHAPE_MSG; break;
	case NR_recvmmsg: syscall = DT_SYS_RECVMMSG; shape = SHAPE_MMSG; break;
	case NR_write: syscall = DT_SYS_WRITE; shape = SHAPE_BUF; want = DT_EGRESS; break;
	case NR_writev: syscall = DT_SYS_WRITEV; shape = SHAPE_IOV; want = DT_EGRESS; break;
	case NR_sendto: syscall = DT_SYS_SENDTO; shape = SHAPE_BUF; want = DT_EGRESS; break;
	case NR_sendmsg: syscall = DT_SYS_SENDMSG; shape = SHAPE_MSG; want = DT_EGRESS; break;
	case NR_sendmmsg: syscall = DT_SYS_SENDMMSG; shape = SHAPE_MMSG; want = DT_EGRESS; break;
	case NR_sendfile: syscall = DT_SYS_SENDFILE; shape = SHAPE_NONE; want = DT_EGRESS; break;
	default: return;
	}
	if (direction != want)
		return;
	call->syscall = syscall;
	call->shape = shape;
	call->fd = (int)SYSCALL_ARG0(regs);
	call->arg = SYSCALL_ARG1(regs);
	call->vlen = SYSCALL_ARG2(regs);
}

/* Copy up to `len` bytes from user memory at data[offset]; returns the new offset. */
static __always_inline __u32 copy_user(struct scratch *s, __u32 limit, __u32 offset, const void *src,
				       __u64 len)
{
	if (limit > DT_PAYLOAD_MAX)
		limit = DT_PAYLOAD_MAX;
	if (offset >= limit)
		return offset;
	if (len > limit - offset)
		len = limit - offset;
	/* Keeps the compiler from folding these bounds into the ones above, where the
	 * verifier cannot follow them. */
	barrier_var(offset);
	offset &= DT_PAYLOAD_MAX - 1;
	barrier_var(len);
	if (len > DT_PAYLOAD_MAX)
		len = DT_PAYLOAD_MAX;
	if (bpf_probe_read_user(&s->rec.data[offset], len, src) != 0)
		return offset;
	return offset + len;
}

struct iovec_copy {
	struct scratch *s;
	const struct iovec *iovs;
	__u64 vlen;
	__u64 moved;
	__u32 limit;
	__u32 offset;
};

static long copy_one_iovec(__u32 i, void *data)
{
	struct iovec_copy *c = data;
	if (i >= c->vlen || c->moved == 0 || c->offset >= c->limit)
		return 1;
	struct iovec iov = {};
	if (bpf_probe_read_user(&iov, sizeof(iov), &c->iovs[i]) != 0)
		return 1;
	__u64 len = iov.iov_len < c->moved ? iov.iov_len : c->moved;
	c->offset = copy_user(c->s, c->limit, c->offset, iov.iov_base, len);
	c->moved -= len;
	return 0;
}

/* The bpf_loop copy, in a function of its own (verified once, apart from its callers' states). */
__attribute__((noinline)) __u32 copy_iovecs_looping(struct scratch *s, __u32 limit, __u64 iovs, __u64 vlen,
						    __u64 moved)
{
	if (!s || !bpf_core_enum_value_exists(enum bpf_func_id, BPF_FUNC_loop))
		return 0;
	struct iovec_copy c = {.s = s, .iovs = (const struct iovec *)iovs, .vlen = vlen, .moved = moved, .limit = limit};
	bpf_loop(vlen < MAX_IOVECS_LOOP ? vlen : MAX_IOVECS_LOOP, copy_one_iovec, &c, 0);
	return c.offset;
}

/* Copy from an iovec array until `moved` bytes are covered; returns bytes copied. */
static __always_inline __u32 copy_iovecs(struct scratch *s, __u32 limit, const struct iovec *iovs,
					 __u64 vlen, __u64 moved)
{
	if (bpf_core_enum_value_exists(enum bpf_func_id, BPF_FUNC_loop))
		return copy_iovecs_looping(s, limit, (__u64)iovs, vlen, moved);
	__u32 offset = 0;
	for (int i = 0; i < MAX_IOVECS; i++) {
		if (i >= vlen || moved == 0)
			break;
		struct iovec iov = {};
		if (bpf_probe_read_user(&iov, sizeof(iov), &iovs[i]) != 0)
			break;
		__u64 len = iov.iov_len < moved ? iov.iov_len : moved;
		offset = copy_user(s, limit, offset, iov.iov_base, len);
		moved -= len;
	}
	return offset;
}

/* The message of an mmsg call this transfer belongs to: the thread's cursor
 * when it is within a call with the same array and count, else the first.  A
 * call that ends early leaves its cursor behind, so failed transfers reset it
 * (see forget_mmsg); a recvmmsg ended by its timeout still leaves one, and the
 * next call with the same array and count starts at the wrong message (rare:
 * mmsg calls are for datagrams). */
static __always_inline __u64 mmsg_index(struct task_struct *task, struct call *call)
{
	struct mmsg_cursor *cursor = bpf_task_storage_get(&mmsg_cursors, task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!cursor)
		return 0;
	__u64 index = 0;
	if (cursor->array == call->arg && cursor->vlen == call->vlen && cursor->next < call->vlen)
		index = cursor->next;
	cursor->array = call->arg;
	cursor->vlen = call->vlen;
	cursor->next = index + 1;
	return index;
}

static __always_inline void forget_mmsg(void)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct mmsg_cursor *cursor = bpf_task_storage_get(&mmsg_cursors, task, 0, 0);
	if (cursor)
		cursor->next = 0;
}

/* Where the call's bytes are: one buffer, or an iovec array (from its msghdr). */
static __always_inline void resolve_buffer(struct task_struct *task, struct call *call)
{
	call->src = 0;
	call->nvecs = 0;
	if (call->shape == SHAPE_BUF) {
		call->src = call->arg;
	} else if (call->shape == SHAPE_IOV) {
		call->src = call->arg;
		call->nvecs = call->vlen;
	} else if (call->shape == SHAPE_MSG || call->shape == SHAPE_MMSG) {
		const struct user_msghdr *msg = (const struct user_msghdr *)call->arg;
		if (call->shape == SHAPE_MMSG)
			msg = &((const struct mmsghdr *)call->arg)[mmsg_index(task, call)].msg_hdr;
		/* Its two fields we need, not the whole header: the stack is short. */
		if (bpf_probe_read_user(&call->src, sizeof(call->src), &msg->msg_iov) ||
		    bpf_probe_read_user(&call->nvecs, sizeof(call->nvecs), &msg->msg_iovlen))
			call->src = 0;
	}
}

/* Copy up to `limit` of the `moved` bytes into the record's data; returns the bytes copied. */
static __always_inline __u32 copy_call(struct scratch *s, struct call *call, __u32 limit, __u64 moved)
{
	if (!call->src || !limit)
		return 0;
	if (call->shape == SHAPE_BUF)
		return copy_user(s, limit, 0, (const void *)call->src, moved);
	return copy_iovecs(s, limit, (const struct iovec *)call->src, call->nvecs, moved);
}

static __always_inline void fill_record(struct dt_data_record *rec, struct sock *sk, struct call *call, __u64 ts,
					__u32 pid, __u32 tid, __u8 direction, __u32 size, __u32 captured, __u64 seq,
					__u16 key, __u8 shift, __u8 flags)
{
	rec->hdr.kind = DT_REC_DATA;
	rec->hdr.pid = pid;
	rec->hdr.ts_ns = ts;
	rec->sock_id = (__u64)sk;
	rec->conn_id = bpf_get_socket_cookie(sk);
	rec->cgroup_id = bpf_get_current_cgroup_id();
	rec->seq = seq;
	rec->tid = tid;
	rec->fd = call->fd;
	rec->size = size;
	rec->captured = captured;
	rec->direction = direction;
	rec->syscall = call->syscall;
	rec->sample_key = key;
	rec->sample_shift = shift;
	rec->flags = flags;
	dt_sock_endpoints(sk, &rec->family, &rec->lport, &rec->rport, rec->laddr, rec->raddr);
	bpf_get_current_comm(rec->comm, sizeof(rec->comm));
}

static __always_inline void output_record_to(void *ring, struct scratch *s)
{
	__u64 total = __builtin_offsetof(struct dt_data_record, data) + (s->rec.captured & (DT_PAYLOAD_MAX * 2 - 1));
	if (total > sizeof(*s))
		return;
	dt_output(ring, &s->rec, total);
}

static __always_inline void output_record(struct scratch *s)
{
	output_record_to(&data_events, s);
}

/* Another error head within this second's budget? */
static __always_inline bool error_head_allowed(__u64 now)
{
	__u32 zero = 0;
	struct error_budget *b = bpf_map_lookup_elem(&error_budget, &zero);
	if (!b)
		return false;
	__u64 second = now / 1000000000;
	if (b->second != second) {
		b->second = second;
		b->used = 0;
	}
	if (b->used >= error_heads_per_second) {
		dt_count(DT_STAT_ERROR_HEADS_CAPPED);
		return false;
	}
	__sync_fetch_and_add(&b->used, 1);
	return true;
}

/* An error: its request's head (kept by the accounting) and this response's
 * head, as two records for decoding on their own.  Also when the call was
 * copied (`copied`): the connection's own decoding may yet lose the exchange
 * (a gap, a resync, its record lost), and user space reports the error once. */
static __always_inline void emit_error_detail(struct scratch *s, struct sock *sk, struct call *call,
					      struct l7_sock *st, __u64 now, __u32 pid, __u32 tid, __u8 direction,
					      __u32 size, bool copied, bool after_error)
{
	if (!error_head_allowed(now))
		return;
	__builtin_memcpy(s->rec.data, st->head, L7_SAVED_HEAD);
	__u32 head = st->head_len < L7_SAVED_HEAD ? st->head_len : L7_SAVED_HEAD;
	fill_record(&s->rec, sk, call, st->head_ns, pid, tid, st->request_dir, head, head, 0, 0, 0,
		    DT_DATA_ERROR_HEAD);
	output_record_to(&error_heads, s);
	__u32 captured = copy_call(s, call, DT_ERROR_HEAD_BYTES, size);
	fill_record(&s->rec, sk, call, now, pid, tid, direction, size, captured, 0, 0, 0,
		    DT_DATA_ERROR_HEAD | (copied ? DT_DATA_ALSO_COPIED : 0) | (after_error ? DT_DATA_AFTER_ERROR : 0));
	output_record_to(&error_heads, s);
}

/* ---- Datagram (UDP) sockets, for DNS ---------------------------------------
 * Each call moves one datagram.  On a connected socket the peer is the
 * socket's own; on an unconnected one (a server's, a resolver's upstream) a
 * datagram sent names its peer in the call (sendto's dest_addr, sendmsg's
 * msg_name), while a received datagram's source is copied to user space only
 * after sock_recv_length fires: that record says rport 0, and user space
 * learns the peer from the datagram that answers it.  (sendmmsg on an
 * unconnected socket: peer unknown too.)  Muted by cookie, not by address: no
 * close tracepoint fires for a UDP socket to forget its address.  Never
 * accounted in the kernel (l7.bpf.h follows streams): counted in user space. */
enum { SOCK_DGRAM = 2, IPPROTO_UDP = 17 };

/* sendto's fifth argument (dest_addr): x86's r8, which deetune's pt_regs does
 * not declare; a CO-RE flavor of pt_regs reaches it. */
struct pt_regs___dgram {
#if defined(__TARGET_ARCH_x86)
	unsigned long r8;
#else
	__u64 regs[31];
#endif
} __attribute__((preserve_access_index));

/* The UAPI sockaddr_in / sockaddr_in6 prefix. */
struct dgram_sockaddr {
	__u16 family;
	__u16 port;     /* network order */
	__u32 v4;       /* sin_addr; sin6_flowinfo */
	__u8 v6[16];    /* sin6_addr */
};

static __always_inline bool is_udp(struct sock *sk)
{
	return sk->sk_type == SOCK_DGRAM && sk->sk_protocol == IPPROTO_UDP;
}

/* A datagram sent on an unconnected socket: its peer, from the address the call names. */
static __always_inline void dgram_named_peer(struct task_struct *task, struct call *call, struct dt_data_record *rec)
{
	const void *name = 0;
	if (call->syscall == DT_SYS_SENDTO) {
		struct pt_regs___dgram *regs = (struct pt_regs___dgram *)bpf_task_pt_regs(task);
#if defined(__TARGET_ARCH_x86)
		name = (const void *)regs->r8;
#else
		name = (const void *)regs->regs[4];
#endif
	} else if (call->syscall == DT_SYS_SENDMSG) {
		const struct user_msghdr *msg = (const struct user_msghdr *)call->arg;
		if (bpf_probe_read_user(&name, sizeof(name), &msg->msg_name))
			return;
	}
	struct dgram_sockaddr sa = {};
	if (!name || bpf_probe_read_user(&sa, sizeof(sa), name) != 0)
		return;
	if (sa.family == AF_INET && rec->family == AF_INET) {
		__builtin_memset(rec->raddr, 0, 16);
		__builtin_memcpy(rec->raddr, &sa.v4, 4);
	} else if (sa.family == AF_INET6 && rec->family == AF_INET6) {
		__builtin_memcpy(rec->raddr, sa.v6, 16);
	} else {
		return;
	}
	rec->rport = __builtin_bswap16(sa.port);
}

static __always_inline int on_transfer(struct sock *sk, int ret, int flags, __u8 direction)
{
	if (ret <= 0) {
		forget_mmsg();
		return 0;
	}
	/* A peek is read again; the error queue is not the stream. */
	if (flags & (MSG_PEEK | MSG_ERRQUEUE))
		return 0;
	if (DT_STAGE_IS(DT_STAGE_ENTRY))
		return 0;
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	if (!process_selected(pid_tgid >> 32))
		return 0;
	struct task_struct *task = bpf_get_current_task_btf();
	if ((task->flags & PF_KTHREAD) && !(task->flags & PF_IO_WORKER))
		return 0; /* the kernel's own sockets (NFS, …): no process to attribute */
	__u16 family = sk->__sk_common.skc_family;
	bool dgram = is_udp(sk);
	if ((family != AF_INET && family != AF_INET6) || (sk->sk_type != SOCK_STREAM && !dgram) ||
	    !dt_sock_netns_wanted(sk))
		return 0;

	__u32 zero = 0;
	struct dt_payload_controls *ctl = bpf_map_lookup_elem(&controls, &zero);
	if (!ctl)
		return 0;
	__u32 generation = ctl->generation; /* read before the maps behind the verdict */
	if (!generation)
		return 0; /* user space has not set up the maps yet */
	struct verdict *v = bpf_sk_storage_get(&verdicts, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!v || DT_STAGE_IS(DT_STAGE_VERDICT))
		return 0;
	__u16 lport = sk->__sk_common.skc_num;
	__u16 rport = __builtin_bswap16(sk->__sk_common.skc_dport);
	if (v->generation != generation) {
		decide(v, dgram ? bpf_get_socket_cookie(sk) : (__u64)sk, lport, rport);
		v->generation = generation;
	}
	/* Counting never depends on the sampling: only on the filters. */
	bool account = account_l7 && !dgram && v->selected && v->l7.protocol != DT_L7_NONE;
	if (!v->copy && !account)
		return 0;
	__u64 seq = 0;
	__u16 key = sample_key(lport, rport);
	bool copy = v->copy && DT_STAGE_STOP < DT_STAGE_CALL;
	if (copy) {
		/* Counted before the sampling: a call it leaves out is a jump in the stream. */
		seq = __sync_fetch_and_add(&v->moved[direction & 1], (__u64)ret);
		if (key & ctl->sample_mask) {
			dt_count(DT_STAT_SAMPLED_OUT);
			copy = false;
		}
	}
	if (!copy && !account)
		return 0;

	struct scratch *s = dt_scratch_acquire(data_scratch);
	if (!s)
		return 0;
	struct call *call = &s->call;
	__builtin_memset(call, 0, sizeof(*call));
	identify_call(task, direction, call);
	resolve_buffer(task, call);
	if (DT_STAGE_IS(DT_STAGE_CALL)) {
		s->busy = 0;
		return 0;
	}
	__u32 want = copy ? v->capture : 0;
	/* The accounting keeps each request's head in case its response is an error that the
	 * sampling leaves out (or left its request out). */
	bool save_head = error_heads_per_second != 0;
	__u32 need = account ? l7_bytes_wanted(&v->l7, save_head, direction) : 0;
	__u32 captured = copy_call(s, call, want > need ? want : need, ret);
	if (DT_STAGE_IS(DT_STAGE_BYTES)) {
		s->busy = 0;
		return 0;
	}
	__u64 now = bpf_ktime_get_ns();
	int action = L7_NOTHING;
	if (account) {
		struct l7_sock *st = &v->l7;
		const struct l7_bytes *bytes = (const struct l7_bytes *)s->rec.data;
		__u64 how = direction | save_head << 1;
		st->now = now;
		/* PostgreSQL reads headers beyond the bytes copied from the call's buffer. */
		st->user = call->shape == SHAPE_BUF ? call->src : 0;
		if (st->protocol == DT_L7_UNKNOWN) {
			l7_note_endpoints(st, sk);
			/* Classified on this call: copy what the protocol needs of it (Redis: its whole window). */
			if (l7_classify_call(st, bytes, (__u64)captured << 32 | (__u32)ret, how)) {
				need = l7_bytes_wanted(st, save_head, direction);
				if (need > captured && captured < (__u32)ret)
					captured = copy_call(s, call, want > need ? want : need, ret);
			}
		}
		action = l7_account(st, bytes, (__u64)captured << 32 | (__u32)ret, how);
	}
	__u32 pid = pid_tgid >> 32, tid = (__u32)pid_tgid;
	if (copy) {
		fill_record(&s->rec, sk, call, now, pid, tid, direction, ret, captured < want ? captured : want, seq,
			    key, ctl->sample_shift, dgram ? DT_DATA_DATAGRAM : 0);
		if (dgram && !s->rec.rport && direction == DT_EGRESS)
			dgram_named_peer(task, call, &s->rec);
		output_record(s);
	}
	if (action != L7_NOTHING)
		emit_error_detail(s, sk, call, &v->l7, now, pid, tid, direction, ret, copy, action == L7_ERROR_SKIPPED);
	s->busy = 0;
	return 0;
}

SEC("tp_btf/sock_send_length")
int BPF_PROG(capture_send, struct sock *sk, int ret, int flags)
{
	return on_transfer(sk, ret, flags, DT_EGRESS);
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(capture_recv, struct sock *sk, int ret, int flags)
{
	return on_transfer(sk, ret, flags, DT_INGRESS);
}

/* A socket closes: requests it never answered are counted, its mute goes. */
SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(handle_payload_close, struct sock *sk, int oldstate, int newstate)
{
	if (newstate != TCP_CLOSE)
		return 0;
	__u64 key = (__u64)sk;
	bpf_map_delete_elem(&muted_socks, &key);
	struct verdict *v = bpf_sk_storage_get(&verdicts, sk, 0, 0);
	if (v && account_l7) {
		l7_close(&v->l7, bpf_ktime_get_ns());
		v->l7.protocol = DT_L7_NONE;
	}
	return 0;
}
