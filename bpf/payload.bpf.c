// SPDX-License-Identifier: Apache-2.0
/* Socket payload capture at the syscall level: every read/write/send/recv
 * family call on a TCP socket of a selected process becomes one record with
 * the bytes moved (a prefix of at most capture_bytes) and the full count.
 *
 * One program at syscall exit does the work: it knows how many bytes moved,
 * and the call's arguments are still in the registers the syscall saved on
 * entry.  Selection happens there, before anything is copied: process,
 * cgroup, ports, and connections that user space has muted (no protocol it
 * decodes).  Entry only stamps when a write-side call began (its record's
 * start_ns: a response starts when the server starts writing it).
 *
 * Why no entry program for every call: it looked the socket up and saved
 * the arguments in a per-thread hash map, which cost as much as the capture
 * itself (see docs/performance.md, section 2).
 */
#include "common.bpf.h"

const struct dt_data_record *dt_data_record_btf __attribute__((unused));

/* Knobs, set by user space between open and load. 0 means "any". */
const volatile __u32 targ_tgid = 0;
const volatile __u64 targ_cgroup_id = 0;
/* The agent's own sockets are never captured (its API, its exporters). */
const volatile __u32 self_tgid = 0;
/* Prefix copied per call; at most DT_PAYLOAD_MAX. */
const volatile __u32 capture_bytes = 4096;
/* When set, only sockets whose local or remote port is in capture_ports. */
const volatile bool filter_ports = false;

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 24);
} data_events SEC(".maps");

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

/* Overload sampling: while user space cannot keep up, it sets a mask here and
 * only connections whose hash has none of its bits are copied (1 in mask + 1).
 * The hash takes both ports (a local connection is sampled on both sides or on
 * neither) and the clock's second, so the sampled connections change every
 * second: a host with few busy connections is sampled evenly over time. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} sample_mask SEC(".maps");

/* Sockets user space found to carry nothing it decodes: not copied any more.
 * Entries go when the socket closes (its address may be reused). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u8);
} muted_socks SEC(".maps");

enum buffer_shape {
	SHAPE_BUF = 0,   /* one contiguous buffer */
	SHAPE_IOV = 1,   /* struct iovec[] */
	SHAPE_MSG = 2,   /* struct user_msghdr */
	SHAPE_MMSG = 3,  /* struct mmsghdr[] */
	SHAPE_NONE = 4,  /* sendfile: no user buffer, the length only */
};

/* How many iovecs / messages one call copies from: bounded for the verifier. */
#define MAX_IOVECS 4
#define MAX_MMSGS 8

/* Where a syscall's arguments are in the registers it saved on entry. */
#if defined(__TARGET_ARCH_x86)
#define SYSCALL_ARG0(regs) ((regs)->di)
#define SYSCALL_ARG1(regs) ((regs)->si)
#define SYSCALL_ARG2(regs) ((regs)->dx)
#elif defined(__TARGET_ARCH_arm64)
#define SYSCALL_ARG0(regs) ((regs)->orig_x0) /* x0 holds the return value by exit */
#define SYSCALL_ARG1(regs) ((regs)->regs[1])
#define SYSCALL_ARG2(regs) ((regs)->regs[2])
#else
#error "payload.bpf.c knows the syscall registers of x86 and arm64 only"
#endif

struct call {
	__u64 start_ns;
	__u64 end_ns;
	__u64 sk;
	__u64 arg;      /* buffer, iovec array, msghdr or mmsghdr array */
	__u32 vlen;     /* iovec count */
	__u32 capture;  /* prefix to copy for this call */
	__s32 fd;
	__u8 syscall;
	__u8 direction;
	__u8 shape;
};

/* When the thread's current write-side call began (0: not stamped). */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u64);
} write_started SEC(".maps");

/* A record under construction: per CPU, with slack after data[] so that the
 * verifier can prove every (offset, length) copy stays inside.  An ARRAY map
 * indexed by CPU because per-CPU maps cap values at 32 KiB; user space sets
 * max_entries to the number of possible CPUs. */
struct scratch {
	struct dt_data_record rec;
	__u8 slack[DT_PAYLOAD_MAX];
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

static __always_inline bool sampled_out(__u16 lport, __u16 rport)
{
	__u32 zero = 0;
	__u32 *mask = bpf_map_lookup_elem(&sample_mask, &zero);
	if (!mask || !*mask)
		return false;
	__u32 second = bpf_ktime_get_ns() >> 30;
	__u32 hash = ((lport ^ rport) + second * 0x9e3779b9u) * 2654435761u;
	return (hash >> 16) & *mask;
}

static __always_inline bool process_selected(__u32 tgid)
{
	if (tgid == self_tgid || (targ_tgid && tgid != targ_tgid))
		return false;
	return !targ_cgroup_id || bpf_get_current_cgroup_id() == targ_cgroup_id;
}

/* The call's socket, if it is a selected TCP socket: fills call->sk and call->capture. */
static __always_inline bool socket_selected(struct call *call)
{
	struct sock *sk = dt_sock_from_fd(call->fd);
	if (!sk)
		return false;
	__u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if ((family != AF_INET && family != AF_INET6) || BPF_CORE_READ(sk, sk_type) != SOCK_STREAM)
		return false;
	__u64 sk_key = (__u64)sk;
	__u16 lport = BPF_CORE_READ(sk, __sk_common.skc_num);
	__u16 rport = __builtin_bswap16(BPF_CORE_READ(sk, __sk_common.skc_dport));
	__u32 capture = capture_bytes;
	__u32 *override = bpf_map_lookup_elem(&port_capture_bytes, &lport);
	if (!override)
		override = bpf_map_lookup_elem(&port_capture_bytes, &rport);
	if (override) {
		/* A recorded connection is copied even when muted or unselected. */
		capture = *override;
	} else {
		if (bpf_map_lookup_elem(&muted_socks, &sk_key))
			return false;
		if (filter_ports && !port_selected(lport) && !port_selected(rport))
			return false;
	}
	/* Recorded connections too: under overload, whole connections beat records lost at random. */
	if (sampled_out(lport, rport)) {
		dt_count(DT_STAT_SAMPLED_OUT);
		return false;
	}
	call->sk = sk_key;
	call->capture = capture;
	return true;
}

static __always_inline struct scratch *scratch_slot(void)
{
	__u32 cpu = bpf_get_smp_processor_id();
	return bpf_map_lookup_elem(&data_scratch, &cpu);
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
	offset &= DT_PAYLOAD_MAX - 1;
	if (len > DT_PAYLOAD_MAX)
		len = DT_PAYLOAD_MAX;
	if (bpf_probe_read_user(&s->rec.data[offset], len, src) != 0)
		return offset;
	return offset + len;
}

/* Copy from an iovec array until `moved` bytes are covered; returns bytes copied. */
static __always_inline __u32 copy_iovecs(struct scratch *s, __u32 limit, const struct iovec *iovs,
					 __u64 vlen, __u64 moved)
{
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

static __always_inline void emit_data(struct scratch *s, struct call *call, __u64 pid_tgid, __u64 size,
				      __u32 captured)
{
	struct dt_data_record *rec = &s->rec;
	rec->hdr.kind = DT_REC_DATA;
	rec->hdr.pid = pid_tgid >> 32;
	rec->hdr.ts_ns = call->end_ns; /* one clock read per call: they are slow in a VM */
	rec->sock_id = call->sk;
	rec->start_ns = call->start_ns;
	rec->cgroup_id = bpf_get_current_cgroup_id();
	rec->tid = (__u32)pid_tgid;
	rec->fd = call->fd;
	rec->size = size;
	rec->captured = captured;
	rec->direction = call->direction;
	rec->syscall = call->syscall;
	dt_sock_endpoints((struct sock *)call->sk, &rec->family, &rec->lport, &rec->rport, rec->laddr,
			  rec->raddr);
	bpf_get_current_comm(rec->comm, sizeof(rec->comm));
	__u64 total = __builtin_offsetof(struct dt_data_record, data) + (captured & (DT_PAYLOAD_MAX * 2 - 1));
	if (total > sizeof(*s))
		return;
	dt_output(&data_events, rec, total);
}

static __always_inline int stamp_write(void)
{
	if (!process_selected(bpf_get_current_pid_tgid() >> 32))
		return 0;
	__u64 *started = bpf_task_storage_get(&write_started, bpf_get_current_task_btf(), 0,
					      BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (started)
		*started = bpf_ktime_get_ns();
	return 0;
}

static __always_inline int on_exit(long ret, __u8 syscall, __u8 direction, __u8 shape)
{
	if (ret <= 0)
		return 0;
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	if (!process_selected(pid_tgid >> 32))
		return 0;
	struct task_struct *task = bpf_get_current_task_btf();
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(task);
	struct call call = {.syscall = syscall, .direction = direction, .shape = shape};
	call.fd = (int)SYSCALL_ARG0(regs);
	if (!socket_selected(&call))
		return 0;
	call.arg = SYSCALL_ARG1(regs);
	call.vlen = (__u32)SYSCALL_ARG2(regs);
	call.end_ns = bpf_ktime_get_ns();
	call.start_ns = call.end_ns;
	if (direction == DT_EGRESS) {
		__u64 *started = bpf_task_storage_get(&write_started, task, 0, 0);
		if (started && *started && *started <= call.end_ns)
			call.start_ns = *started;
		if (started)
			*started = 0; /* a call whose entry we missed must not take this stamp */
	}
	struct scratch *s = scratch_slot();
	if (!s)
		return 0;

	if (shape == SHAPE_MMSG) {
		/* ret counts messages; each has its own length. */
		const struct mmsghdr *msgs = (const struct mmsghdr *)call.arg;
		for (int i = 0; i < MAX_MMSGS; i++) {
			if (i >= ret)
				break;
			struct mmsghdr msg = {};
			if (bpf_probe_read_user(&msg, sizeof(msg), &msgs[i]) != 0)
				break;
			__u32 captured = copy_iovecs(s, call.capture, msg.msg_hdr.msg_iov,
						     msg.msg_hdr.msg_iovlen, msg.msg_len);
			emit_data(s, &call, pid_tgid, msg.msg_len, captured);
		}
		return 0;
	}

	__u32 captured = 0;
	if (shape == SHAPE_BUF) {
		captured = copy_user(s, call.capture, 0, (const void *)call.arg, ret);
	} else if (shape == SHAPE_IOV) {
		captured = copy_iovecs(s, call.capture, (const struct iovec *)call.arg, call.vlen, ret);
	} else if (shape == SHAPE_MSG) {
		struct user_msghdr msg = {};
		if (bpf_probe_read_user(&msg, sizeof(msg), (const void *)call.arg) == 0)
			captured = copy_iovecs(s, call.capture, msg.msg_iov, msg.msg_iovlen, ret);
	}
	emit_data(s, &call, pid_tgid, ret, captured);
	return 0;
}

/* Every captured call has an exit program; write-side calls also stamp their start. */
#define CAPTURE(name, syscall, direction, shape)                                  \
	SEC("tracepoint/syscalls/sys_exit_" #name)                                 \
	int handle_exit_##name(struct trace_event_raw_sys_exit *ctx)               \
	{                                                                          \
		return on_exit(ctx->ret, syscall, direction, shape);               \
	}
#define STAMP(name)                                                               \
	SEC("tracepoint/syscalls/sys_enter_" #name)                                \
	int handle_enter_##name(void *ctx)                                         \
	{                                                                          \
		return stamp_write();                                              \
	}

CAPTURE(read, DT_SYS_READ, DT_INGRESS, SHAPE_BUF)
CAPTURE(write, DT_SYS_WRITE, DT_EGRESS, SHAPE_BUF)
CAPTURE(readv, DT_SYS_READV, DT_INGRESS, SHAPE_IOV)
CAPTURE(writev, DT_SYS_WRITEV, DT_EGRESS, SHAPE_IOV)
CAPTURE(sendto, DT_SYS_SENDTO, DT_EGRESS, SHAPE_BUF)
CAPTURE(recvfrom, DT_SYS_RECVFROM, DT_INGRESS, SHAPE_BUF)
CAPTURE(sendmsg, DT_SYS_SENDMSG, DT_EGRESS, SHAPE_MSG)
CAPTURE(recvmsg, DT_SYS_RECVMSG, DT_INGRESS, SHAPE_MSG)
CAPTURE(sendmmsg, DT_SYS_SENDMMSG, DT_EGRESS, SHAPE_MMSG)
CAPTURE(recvmmsg, DT_SYS_RECVMMSG, DT_INGRESS, SHAPE_MMSG)
CAPTURE(sendfile64, DT_SYS_SENDFILE, DT_EGRESS, SHAPE_NONE)
STAMP(write)
STAMP(writev)
STAMP(sendto)
STAMP(sendmsg)
STAMP(sendmmsg)
STAMP(sendfile64)

SEC("tracepoint/sock/inet_sock_set_state")
int handle_payload_close(struct trace_event_raw_inet_sock_set_state *ctx)
{
	if (ctx->newstate == TCP_CLOSE) {
		__u64 key = (__u64)ctx->skaddr;
		bpf_map_delete_elem(&muted_socks, &key);
	}
	return 0;
}
