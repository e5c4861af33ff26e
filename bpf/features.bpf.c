// SPDX-License-Identifier: Apache-2.0
/* One trivial program per attach type: `deetune.agent doctor` loads and
 * attaches each on its own to learn what this kernel allows. */
#include "common.bpf.h"

SEC("tracepoint/syscalls/sys_enter_getppid")
int feat_tracepoint(void *ctx) { return 0; }

SEC("raw_tp/sys_enter")
int feat_raw_tp(void *ctx) { return 0; }

SEC("tp_btf/sched_process_fork")
int feat_tp_btf(void *ctx) { return 0; }

SEC("uprobe")
int feat_uprobe(void *ctx) { return 0; }

SEC("kprobe/do_nanosleep")
int feat_kprobe(void *ctx) { return 0; }

SEC("fentry/do_nanosleep")
int feat_fentry(void *ctx) { return 0; }

SEC("socket")
int feat_socket_filter(void *ctx) { return 0; }

SEC("cgroup_skb/egress")
int feat_cgroup_skb(void *ctx) { return 1; }

SEC("sockops")
int feat_sockops(void *ctx) { return 1; }

/* Ring buffers are what every probe reports through. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} feat_ring SEC(".maps");
