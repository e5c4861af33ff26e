// SPDX-License-Identifier: Apache-2.0
/* Test object for the bindings: maps of each kind, a knob, a ring buffer. */
#include "common.bpf.h"

const volatile __u32 knob_u32 = 7;
const volatile __u64 knob_u64 = 0;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u64);
} test_hash SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u32);
} test_percpu SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} test_ring SEC(".maps");

/* Every getppid(2) from the target process writes knob_u32 into test_hash[1]
 * and a 16-byte record (knob_u64, its pid) into the ring buffer. */
const volatile __u32 targ_tgid = 0;

SEC("tracepoint/syscalls/sys_enter_getppid")
int on_getppid(void *ctx)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (tgid != targ_tgid)
		return 0;
	__u32 key = 1;
	__u64 value = knob_u32;
	bpf_map_update_elem(&test_hash, &key, &value, BPF_ANY);
	__u64 rec[2] = { knob_u64, tgid };
	dt_output(&test_ring, rec, sizeof(rec));
	return 0;
}
