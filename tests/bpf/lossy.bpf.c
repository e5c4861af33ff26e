// SPDX-License-Identifier: Apache-2.0
/* Test helper: drops every Nth incoming data packet of a cgroup's sockets, so
 * that their peers must retransmit (netem is not on every test machine). */
#include "common.bpf.h"

/* UAPI (include/uapi/linux/bpf.h): the verifier checks context offsets
 * against it; len is the first field. */
struct __sk_buff {
	__u32 len;
};

const volatile __u32 drop_every = 4;
const volatile __u32 min_len = 1000;

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} lossy_counts SEC(".maps");

SEC("cgroup_skb/ingress")
int drop_some(struct __sk_buff *skb)
{
	if (skb->len < min_len)
		return 1;
	__u32 seen_key = 0, dropped_key = 1;
	__u64 *seen = bpf_map_lookup_elem(&lossy_counts, &seen_key);
	__u64 *dropped = bpf_map_lookup_elem(&lossy_counts, &dropped_key);
	if (!seen || !dropped)
		return 1;
	__u64 n = __sync_fetch_and_add(seen, 1);
	if (n % drop_every != drop_every - 1)
		return 1;
	__sync_fetch_and_add(dropped, 1);
	return 0;
}
