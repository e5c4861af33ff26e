/* SPDX-License-Identifier: Apache-2.0
 * The processes behind client sockets connected on this host, so that the
 * server side of a local connection knows its client (for the edge's name):
 * tcp.bpf.c writes an entry when a client connects to a local address and
 * deletes it at the close; the server side's accept (tcp.bpf.c) and first
 * request (l7.bpf.h) look their mirrored 4-tuple up.  One map, shared: user
 * space gives every object that declares it the same one (Probe.share_maps). */
#ifndef __DEETUNE_LOCAL_CLIENTS_BPF_H__
#define __DEETUNE_LOCAL_CLIENTS_BPF_H__

#include "common.bpf.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, struct dt_local_conn);
	__type(value, __u32);
} dt_local_clients SEC(".maps");

/* Whether an address (IPv4 in the first 4 bytes) is a loopback one: a
 * connection to it, or to the socket's own address, stays on this host. */
static __always_inline bool dt_is_loopback(__u16 family, const __u8 addr[16])
{
	if (family == AF_INET)
		return addr[0] == 127;
	const __u32 *w = (const __u32 *)addr;
	if (w[0] == 0 && w[1] == 0 && w[2] == 0)
		return w[3] == __builtin_bswap32(1);                     /* ::1 */
	return w[0] == 0 && w[1] == 0 && w[2] == __builtin_bswap32(0xffff) && addr[12] == 127; /* ::ffff:127.x */
}

static __always_inline bool dt_same_address(const __u8 a[16], const __u8 b[16])
{
	const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;
	return x[0] == y[0] && x[1] == y[1];
}

static __always_inline bool dt_peer_is_local(__u16 family, const __u8 laddr[16], const __u8 raddr[16])
{
	return dt_is_loopback(family, raddr) || dt_same_address(laddr, raddr);
}

/* The key of a connection as its client sees it.  `mirrored`: the caller is
 * the server side, whose local and remote ends are the client's swapped. */
static __always_inline void dt_local_conn_key(struct dt_local_conn *key, __u16 family, const __u8 laddr[16],
					      const __u8 raddr[16], __u16 lport, __u16 rport, bool mirrored)
{
	__builtin_memset(key, 0, sizeof(*key));
	key->family = family;
	if (mirrored) {
		__builtin_memcpy(key->laddr, raddr, 16);
		__builtin_memcpy(key->raddr, laddr, 16);
		key->lport = rport;
		key->rport = lport;
	} else {
		__builtin_memcpy(key->laddr, laddr, 16);
		__builtin_memcpy(key->raddr, raddr, 16);
		key->lport = lport;
		key->rport = rport;
	}
}

/* The local client's process of a server-side connection (0: not local, or not seen). */
static __always_inline __u32 dt_local_client_of(__u16 family, const __u8 laddr[16], const __u8 raddr[16],
						__u16 lport, __u16 rport)
{
	if (!dt_peer_is_local(family, laddr, raddr))
		return 0;
	struct dt_local_conn key;
	dt_local_conn_key(&key, family, laddr, raddr, lport, rport, true);
	__u32 *pid = bpf_map_lookup_elem(&dt_local_clients, &key);
	return pid ? *pid : 0;
}

#endif /* __DEETUNE_LOCAL_CLIENTS_BPF_H__ */
