/* SPDX-License-Identifier: Apache-2.0
 * Pieces every deetune probe object shares: the stats map and emit helpers. */
#ifndef __DEETUNE_COMMON_BPF_H__
#define __DEETUNE_COMMON_BPF_H__

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "deetune.h"

char LICENSE[] SEC("license") = "GPL";

/* Per-CPU counters, read (and summed) by user space: records emitted and
 * records lost because the ring buffer was full. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DT_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} dt_stats SEC(".maps");

/* Scope: only this network namespace (its inode number; 0: every one).  Set
 * by user space between open and load, like every object's knobs; an agent
 * scoped to a namespace sees that namespace as its host. */
/* Overload sampling's period: the connections sampled change every 16 jiffies (64 ms at
 * HZ=250), short enough that each busy edge has sampled exchanges in every second (the detail's
 * weights then follow the kernel's counts closely), long enough that a sampled period holds
 * whole exchanges. */
#define DT_SAMPLE_PERIOD_SHIFT 4

const volatile __u32 dt_targ_netns = 0;

static __always_inline bool dt_sock_netns_wanted(struct sock *sk)
{
	return !dt_targ_netns || BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum) == dt_targ_netns;
}

/* The calling task's network namespace (a task keeps its nsproxy until after
 * sched_process_exit). */
static __always_inline bool dt_task_netns_wanted(void)
{
	if (!dt_targ_netns)
		return true;
	struct task_struct *task = bpf_get_current_task_btf();
	return BPF_CORE_READ(task, nsproxy, net_ns, ns.inum) == dt_targ_netns;
}

static __always_inline void dt_count(__u32 stat)
{
	__u64 *value = bpf_map_lookup_elem(&dt_stats, &stat);
	if (value)
		*value += 1;
}

/* Copy a finished record into the ring buffer, counting it as emitted or lost.
 *
 * The reader is woken by every DT_RING_WAKE_RECORDS-th record of a CPU only:
 * user space drains on its own timer anyway (every 50 ms), and keeps draining
 * without sleeping while the ring stays over 1/DT_RING_WAKE_FRACTION full.  A
 * wake-up costs an irq_work (a self-IPI, several microseconds in a VM), so
 * waking on every record (libbpf's adaptive default when the reader keeps up)
 * cost far more than the record.  Counting records, rather than asking the
 * ring how full it is, spares two helper calls that read positions other
 * CPUs write (1.5 % of a traced nginx's time). */
static __always_inline void dt_output(void *ringbuf, void *record, __u64 size)
{
	__u32 key = DT_STAT_EMITTED;
	__u64 *emitted = bpf_map_lookup_elem(&dt_stats, &key);
	if (!emitted)
		return;
	__u64 flags = (*emitted + 1) % DT_RING_WAKE_RECORDS ? BPF_RB_NO_WAKEUP : BPF_RB_FORCE_WAKEUP;
	if (bpf_ringbuf_output(ringbuf, record, size, flags) == 0)
		*emitted += 1;
	else
		dt_count(DT_STAT_LOST);
}

static __always_inline void dt_fill_header(struct dt_header *hdr, __u32 kind, __u32 pid)
{
	hdr->kind = kind;
	hdr->pid = pid;
	hdr->ts_ns = bpf_ktime_get_ns();
}

/* A socket's family and addresses (IPv4 in the first 4 bytes, the rest zero),
 * read from the socket itself. */
static __always_inline void dt_sock_addresses(struct sock *sk, __u16 *family, __u8 laddr[16], __u8 raddr[16])
{
	*family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (*family == AF_INET6) {
		/* Not BPF_CORE_READ_INTO: it reads sizeof(*dst), one byte of an array. */
		bpf_core_read(laddr, 16, &sk->__sk_common.skc_v6_rcv_saddr);
		bpf_core_read(raddr, 16, &sk->__sk_common.skc_v6_daddr);
	} else {
		__builtin_memset(laddr, 0, 16);
		__builtin_memset(raddr, 0, 16);
		bpf_core_read(laddr, 4, &sk->__sk_common.skc_rcv_saddr);
		bpf_core_read(raddr, 4, &sk->__sk_common.skc_daddr);
	}
}

/* A socket's ports, host order, read from the socket itself. */
static __always_inline void dt_sock_ports(struct sock *sk, __u16 *lport, __u16 *rport)
{
	*lport = BPF_CORE_READ(sk, __sk_common.skc_num);
	*rport = __builtin_bswap16(BPF_CORE_READ(sk, __sk_common.skc_dport));
}

/* Both. */
static __always_inline void dt_sock_endpoints(struct sock *sk, __u16 *family, __u16 *lport, __u16 *rport,
					      __u8 laddr[16], __u8 raddr[16])
{
	dt_sock_ports(sk, lport, rport);
	dt_sock_addresses(sk, family, laddr, raddr);
}


/* A free scratch record of this CPU's in `map`, an ARRAY of DT_SCRATCH_SLOTS records per CPU
 * whose value has a `busy` field; NULL when all are in use.  Release with `->busy = 0`.  A
 * program run in process context can be preempted, and another task's run on the same CPU
 * must not write over its bytes.  The check and the mark are not one atomic step: a run
 * preempted between them has not yet written the slot, and the one that took it meanwhile
 * is done when it resumes. */
#define dt_scratch_acquire(map)                                                  \
	({                                                                       \
		__u32 __key = bpf_get_smp_processor_id() * DT_SCRATCH_SLOTS;    \
		typeof((map).value) __found = 0;                                 \
		for (int __i = 0; __i < DT_SCRATCH_SLOTS; __i++, __key++) {     \
			typeof((map).value) __each = bpf_map_lookup_elem(&(map), &__key); \
			if (__each && !__each->busy) {                           \
				__each->busy = 1;                                \
				__found = __each;                                \
				break;                                           \
			}                                                        \
		}                                                                \
		__found;                                                         \
	})

#endif /* __DEETUNE_COMMON_BPF_H__ */
