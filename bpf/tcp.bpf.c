// SPDX-License-Identifier: Apache-2.0
/* TCP connection lifecycle: active and passive opens, closes with byte counts
 * and retransmits, failed connects, resets.  Built on the BTF tracepoints
 * sock:inet_sock_set_state (state machine), tcp:* (resets, retransmits) and
 * sock:sock_{send,recv}_length (a passive open is claimed by the process that first
 * reads or writes it, or closes it: see unclaimed).  BTF
 * tracepoints call the program with the kernel's own arguments: no record is
 * assembled for it first, as a classic tracepoint does (a quarter of a
 * microsecond per connection, measured). */
#include "common.bpf.h"
#include "local_clients.bpf.h"

/* Keeps the record type in the object's BTF, where tests check its layout
 * against the Python side (the libbpf-bootstrap idiom). */
const struct dt_conn_record *dt_conn_record_btf __attribute__((unused));
const struct dt_tcp_controls *dt_tcp_controls_btf __attribute__((unused));

/* Knobs, set by user space between open and load. 0 means "any". */
const volatile __u32 targ_tgid = 0;
const volatile __u16 targ_port = 0;
/* The agent's own connections (its API, its exporters) are not reported. */
const volatile __u32 self_tgid = 0;

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 22);
} tcp_events SEC(".maps");

/* User space's live settings: overload sampling. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct dt_tcp_controls);
} controls SEC(".maps");

/* Exact connection counters per edge (never sampled), read by user space on its
 * tick: opened at the connect or the accept, failed, closed with their bytes,
 * retransmits and resets. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct dt_edge);
	__type(value, struct dt_conn_counts);
} dt_conn_counts SEC(".maps");

/* What we know of a connection between its open and its close. */
struct conn_info {
	__u64 open_ts_ns;
	__u64 cgroup_id;
	__u32 pid;
	__u32 retransmits;
	__u8 role;
	__u8 flags;
	__u8 sampled_out; /* overload sampling leaves this connection out */
	__u8 sample_shift; /* it stands for 1 << sample_shift connections */
	__u16 sample_key; /* its overload-sampling key (conn_sample_key) */
	__u8 local_client; /* a client of this host's: listed in dt_local_clients */
	__u8 _pad;
	char comm[DT_COMM_LEN];
	struct dt_edge edge; /* its counters' key, set when it opens */
};

static const struct dt_conn_counts zero_conn_counts = {};

/* Add to an edge's connection counters. */
static __always_inline void count_conn(struct dt_edge *edge, __u64 opened, __u64 closed, __u64 failed,
				       __u64 sent, __u64 received, __u64 retransmits, __u64 resets)
{
	struct dt_conn_counts *c = bpf_map_lookup_elem(&dt_conn_counts, edge);
	if (!c) {
		bpf_map_update_elem(&dt_conn_counts, edge, &zero_conn_counts, BPF_NOEXIST);
		c = bpf_map_lookup_elem(&dt_conn_counts, edge);
		if (!c) {
			dt_count(DT_STAT_ACCOUNTING_FULL);
			return;
		}
	}
	if (opened)
		__sync_fetch_and_add(&c->opened, opened);
	if (closed)
		__sync_fetch_and_add(&c->closed, closed);
	if (failed)
		__sync_fetch_and_add(&c->failed, failed);
	if (sent)
		__sync_fetch_and_add(&c->bytes_sent, sent);
	if (received)
		__sync_fetch_and_add(&c->bytes_received, received);
	if (retransmits)
		__sync_fetch_and_add(&c->retransmits, retransmits);
	if (resets)
		__sync_fetch_and_add(&c->resets, resets);
}

/* A connection's edge, from its owner and the socket (server: the local port and
 * the client's process when it is local; client: the server's port). */
static __always_inline void set_conn_edge(struct conn_info *info, struct sock *sk, __u16 lport, __u16 rport)
{
	struct dt_edge *e = &info->edge;
	__u8 laddr[16];
	dt_sock_addresses(sk, &e->family, laddr, e->raddr);
	e->pid = info->pid;
	e->cgroup_id = info->cgroup_id;
	e->role = info->role;
	e->protocol = DT_L7_UNKNOWN;
	if (info->role == DT_ROLE_SERVER) {
		e->port = lport;
		e->peer_pid = dt_local_client_of(e->family, laddr, e->raddr, lport, rport);
		return;
	}
	e->port = rport;
	e->peer_pid = 0;
	if (dt_peer_is_local(e->family, laddr, e->raddr)) {
		/* The server side of this host will look its client up (dt_local_clients). */
		struct dt_local_conn key;
		dt_local_conn_key(&key, e->family, laddr, e->raddr, lport, rport, false);
		if (bpf_map_update_elem(&dt_local_clients, &key, &info->pid, BPF_ANY) == 0)
			info->local_client = 1;
	}
}

static __always_inline void forget_local_client(struct conn_info *info, struct sock *sk, __u16 lport, __u16 rport)
{
	if (!info->local_client)
		return;
	struct dt_local_conn key;
	__u8 laddr[16];
	__u8 raddr[16];
	__u16 family;
	dt_sock_addresses(sk, &family, laddr, raddr);
	dt_local_conn_key(&key, family, laddr, raddr, lport, rport, false);
	bpf_map_delete_elem(&dt_local_clients, &key);
}

/* Keyed by struct sock address.  A plain hash, not an LRU: at 35,000
 * connections/s the LRU's free-list upkeep cost the host ~1.5 us of CPU per
 * connection more (docs/performance.md, section 1).  Every TCP socket passes
 * through TCP_CLOSE, where its entry goes; an entry a race leaves behind is
 * overwritten when the socket's memory is reused for another connection, and a
 * full table is counted as lost records. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct conn_info);
} conns SEC(".maps");

/* Passive opens no process has claimed yet (see claim): marked 1 at the handshake,
 * which completes in softirq context, where the pid is whoever was interrupted;
 * 0 once claimed (kept, not deleted: freeing it costs more than keeping the word
 * until the socket goes). */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u64); /* 64 bits: the atomic exchange below */
} unclaimed SEC(".maps");

static const __u64 unclaimed_mark = 1;

static __always_inline bool is_unclaimed(struct sock *sk)
{
	__u64 *mark = bpf_sk_storage_get(&unclaimed, sk, 0, 0);
	return mark && *mark;
}

/* True for the one caller that claims the socket (two threads may read it at once). */
static __always_inline bool take_unclaimed(struct sock *sk)
{
	__u64 *mark = bpf_sk_storage_get(&unclaimed, sk, 0, 0);
	return mark && *mark && __sync_lock_test_and_set(mark, 0);
}

static __always_inline bool port_wanted(__u16 lport, __u16 rport)
{
	return targ_port == 0 || targ_port == lport || targ_port == rport;
}

static __always_inline bool pid_wanted(__u32 tgid)
{
	if (self_tgid && tgid == self_tgid)
		return false;
	return targ_tgid == 0 || targ_tgid == tgid;
}

/* The local port at a state change, host order.  At close too, when the socket
 * has already been unhashed: skc_num is 0 by then, inet_sport is not. */
static __always_inline __u16 local_port_at_state_change(struct sock *sk)
{
	return __builtin_bswap16(BPF_CORE_READ((struct inet_sock *)sk, inet_sport));
}

static __always_inline __u16 remote_port_at_state_change(struct sock *sk)
{
	return __builtin_bswap16(sk->__sk_common.skc_dport);
}

/* The rest of a record's endpoints, once the sampling (which needs the ports
 * only) has taken the connection. */
static __always_inline void endpoints_at_state_change(struct dt_conn_record *rec, struct sock *sk,
						      __u16 lport, __u16 rport)
{
	rec->family = sk->__sk_common.skc_family;
	rec->lport = lport;
	rec->rport = rport;
	if (rec->family == AF_INET6) {
		__builtin_memcpy(rec->laddr, &sk->__sk_common.skc_v6_rcv_saddr, 16);
		__builtin_memcpy(rec->raddr, &sk->__sk_common.skc_v6_daddr, 16);
	} else {
		__builtin_memcpy(rec->laddr, &sk->__sk_common.skc_rcv_saddr, 4);
		__builtin_memcpy(rec->raddr, &sk->__sk_common.skc_daddr, 4);
	}
}

/* A connection's overload-sampling key: its ports, hashed, so that a local
 * connection's two sides agree.  Unlike the payload probe's (sample_key) it
 * does not change with time: a close with no entry is sampled by computing it
 * again, so that a server connection the sampling leaves out needs no entry. */
static __always_inline __u16 conn_sample_key(__u16 lport, __u16 rport)
{
	return ((__u32)(lport ^ rport) * 2654435761u) >> 16;
}

/* Overload sampling, decided once per connection as it is announced (its open
 * record, or its failed one), so that its open and close go together; false
 * when it is left out, its record counted as such (a close is counted at the
 * close).  The key travels in the records: when the sampling grows sparser,
 * user space applies it to the records already in the ring as well. */
static __always_inline bool sample(struct conn_info *info, __u16 lport, __u16 rport)
{
	__u32 zero = 0;
	struct dt_tcp_controls *ctl = bpf_map_lookup_elem(&controls, &zero);
	info->sample_key = conn_sample_key(lport, rport);
	if (!ctl || !ctl->sample_mask)
		return true;
	if (info->sample_key & ctl->sample_mask) {
		info->sampled_out = 1;
		dt_count(DT_STAT_SAMPLED_OUT);
		return false;
	}
	info->sample_shift = ctl->sample_shift;
	return true;
}

/* Did the peer's FIN arrive?  Told by the state the socket closes from: the
 * FIN takes one sequence number that bytes_received counts but is no payload. */
static __always_inline bool fin_received(int oldstate, __u8 flags)
{
	if (oldstate == TCP_CLOSE_WAIT || oldstate == TCP_LAST_ACK || oldstate == TCP_CLOSING)
		return true;
	/* FIN_WAIT2 -> CLOSE is the move to TIME_WAIT, unless a reset ended it. */
	return oldstate == TCP_FIN_WAIT2 && !(flags & DT_CONN_RESET_RECEIVED);
}

/* An abortive close (SO_LINGER 0, close with unread data, shutdown of a
 * busy socket) moves the socket to CLOSE *before* tcp_send_active_reset()
 * fires its tracepoint, so that reset is told by the state left instead:
 * these states close gracefully only through FIN states, and a timeout
 * (sk_err ETIMEDOUT) or a received reset are the other ways out. */
static __always_inline bool aborted_by_us(struct sock *sk, int oldstate, __u8 flags)
{
	if (flags & DT_CONN_RESET_RECEIVED)
		return false;
	if (oldstate != TCP_ESTABLISHED && oldstate != TCP_CLOSE_WAIT && oldstate != TCP_FIN_WAIT1)
		return false;
	return BPF_CORE_READ(sk, sk_err) != ETIMEDOUT;
}

/* What a connection's close tells: its payload bytes each way and how it ended. */
struct close_facts {
	__u64 sent;
	__u64 received;
	__u8 flags; /* the connection's, with DT_CONN_RESET_SENT when it aborted */
};

static __always_inline void facts_at_close(struct close_facts *facts, struct sock *sk, int oldstate, __u8 flags)
{
	struct tcp_sock *tp = (struct tcp_sock *)sk;
	/* Payload only: bytes_sent counts retransmitted bytes again, and
	 * bytes_acked would count SYN and FIN sequence numbers. */
	facts->sent = BPF_CORE_READ(tp, bytes_sent) - BPF_CORE_READ(tp, bytes_retrans);
	facts->received = BPF_CORE_READ(tp, bytes_received);
	if (facts->received && fin_received(oldstate, flags))
		facts->received -= 1;
	facts->flags = flags;
	if (aborted_by_us(sk, oldstate, flags))
		facts->flags |= DT_CONN_RESET_SENT;
}

static __always_inline void emit_conn(struct dt_conn_record *rec, struct sock *sk, __u64 conn_id, __u32 kind,
				      struct conn_info *info, __s32 error, struct close_facts *facts)
{
	dt_fill_header(&rec->hdr, kind, info->pid);
	rec->sock_id = (__u64)sk;
	rec->conn_id = conn_id;
	rec->open_ts_ns = info->open_ts_ns;
	rec->cgroup_id = info->cgroup_id;
	rec->role = info->role;
	rec->flags = info->flags;
	rec->retransmits = info->retransmits;
	rec->sample_shift = info->sample_shift;
	rec->sample_key = info->sample_key;
	__builtin_memcpy(rec->comm, info->comm, sizeof(rec->comm));
	if (facts) {
		rec->bytes_sent = facts->sent;
		rec->bytes_received = facts->received;
		rec->flags = facts->flags;
	}
	rec->error = error;
	if (!port_wanted(rec->lport, rec->rport))
		return;
	dt_output(&tcp_events, rec, sizeof(*rec));
}

/* The record of a state change, for a connection the sampling has taken. */
static __always_inline void emit_at_state_change(struct sock *sk, __u32 kind, struct conn_info *info,
						 __s32 error, struct close_facts *facts, __u16 lport, __u16 rport)
{
	struct dt_conn_record rec = {};
	endpoints_at_state_change(&rec, sk, lport, rport);
	emit_conn(&rec, sk, bpf_get_socket_cookie(sk), kind, info, error, facts);
}

/* The calling process as the connection's owner; the entry is not stored yet. */
static __always_inline void owner_is_current(struct conn_info *info, __u8 role)
{
	info->open_ts_ns = bpf_ktime_get_ns();
	info->cgroup_id = bpf_get_current_cgroup_id();
	info->pid = bpf_get_current_pid_tgid() >> 32;
	info->role = role;
	bpf_get_current_comm(info->comm, sizeof(info->comm));
}

/* A close with no entry.  Entries are stored for wanted processes only, and
 * for the server's side only when the sampling takes the connection: a close
 * the sampling leaves out is counted.  No entry and no file: still in the
 * accept queue (an orphan has left ESTABLISHED and CLOSE_WAIT), its close is
 * the server's, owner none; so is one accepted but ended by a reset before its
 * owner read, wrote or closed it (unclaimed).  Otherwise it predates the agent:
 * user space knows what it can from its start-up snapshot and filters by pid
 * itself. */
static __always_inline void close_unknown(struct sock *sk, int oldstate)
{
	if (oldstate == TCP_SYN_SENT || oldstate == TCP_LISTEN || oldstate == TCP_SYN_RECV)
		return;
	__u16 lport = local_port_at_state_change(sk), rport = remote_port_at_state_change(sk);
	if (!port_wanted(lport, rport))
		return; /* filtered out: neither reported nor counted as left out */
	struct conn_info unknown = {};
	if (!sample(&unknown, lport, rport))
		return;
	/* No entry counted its retransmits. */
	unknown.retransmits = BPF_CORE_READ((struct tcp_sock *)sk, total_retrans);
	if ((oldstate == TCP_ESTABLISHED || oldstate == TCP_CLOSE_WAIT) &&
	    (!sk->sk_socket || is_unclaimed(sk))) {
		unknown.role = DT_ROLE_SERVER;
		/* No entry to flag a received reset in: tcp_reset() set sk_err
		 * first (the listener closing it sets it after the close). */
		if (sk->sk_err && sk->sk_err != ETIMEDOUT)
			unknown.flags = DT_CONN_RESET_RECEIVED;
	} else {
		unknown.flags = DT_CONN_OPEN_UNSEEN;
	}
	struct close_facts facts;
	facts_at_close(&facts, sk, oldstate, unknown.flags);
	emit_at_state_change(sk, DT_REC_CONN_CLOSE, &unknown, 0, &facts, lport, rport);
}

static __always_inline void store(struct sock *sk, struct conn_info *info)
{
	__u64 key = (__u64)sk;
	if (bpf_map_update_elem(&conns, &key, info, BPF_ANY))
		dt_count(DT_STAT_LOST); /* table full: its records cannot be made */
}

/* A passive open is claimed by the process that reads, writes or closes it
 * first (in practice the one that accepted it): that runs in the process's
 * context, where the pid is right.  It is stored and announced then, so the
 * server side's duration runs from its first read or write.  (It was claimed at
 * accept(2)'s exit: a syscall tracepoint sends every syscall of every process on
 * the host through the kernel's slow path, ~55 ns each on our test VM.) */
static __always_inline void claim(struct sock *sk)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (!pid_wanted(tgid))
		return;
	/* Closed already (a reset in the accept queue): its close has been reported. */
	if (BPF_CORE_READ(sk, __sk_common.skc_state) == TCP_CLOSE)
		return;
	struct dt_conn_record rec = {};
	dt_sock_ports(sk, &rec.lport, &rec.rport);
	dt_sock_addresses(sk, &rec.family, rec.laddr, rec.raddr);
	if (rec.family != AF_INET && rec.family != AF_INET6)
		return;
	/* Every connection is counted and keeps an entry (its close is counted too);
	 * the sampling decides whether its records are made. */
	struct conn_info info = {};
	bool taken = sample(&info, rec.lport, rec.rport);
	owner_is_current(&info, DT_ROLE_SERVER);
	set_conn_edge(&info, sk, rec.lport, rec.rport);
	count_conn(&info.edge, 1, 0, 0, 0, 0, 0, 0);
	store(sk, &info);
	if (!taken)
		return;
	/* The cookie was made at the handshake (handle_set_state). */
	emit_conn(&rec, sk, BPF_CORE_READ(sk, __sk_common.skc_cookie.counter), DT_REC_CONN_OPEN, &info, 0, 0);
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(handle_set_state, struct sock *sk, int oldstate, int newstate)
{
	if (sk->sk_protocol != IPPROTO_TCP || !dt_sock_netns_wanted(sk))
		return 0;
	__u64 key = (__u64)sk;

	if (newstate == TCP_SYN_SENT) {
		/* connect(2) runs in the caller's context: the pid is right. */
		__u32 tgid = bpf_get_current_pid_tgid() >> 32;
		if (pid_wanted(tgid)) {
			struct conn_info info = {};
			owner_is_current(&info, DT_ROLE_CLIENT);
			store(sk, &info);
		}
		return 0;
	}
	if (oldstate == TCP_SYN_RECV && newstate == TCP_ESTABLISHED) {
		/* A passive open: give the socket its cookie (its id in every record)
		 * now, where the helper can; the claim reads it.  Filtered out by port:
		 * no entry, not counted; its close is not reported either. */
		bpf_get_socket_cookie(sk);
		if (port_wanted(local_port_at_state_change(sk), remote_port_at_state_change(sk)))
			bpf_sk_storage_get(&unclaimed, sk, (void *)&unclaimed_mark, BPF_SK_STORAGE_GET_F_CREATE);
		return 0;
	}
	/* Closed by its owner before any read or write: a close(2) or shutdown(2),
	 * which runs in the owner's context (a reset received is no owner's doing). */
	if ((newstate == TCP_FIN_WAIT1 || newstate == TCP_LAST_ACK ||
	     (newstate == TCP_CLOSE && (oldstate == TCP_ESTABLISHED || oldstate == TCP_CLOSE_WAIT) && !sk->sk_err)) &&
	    sk->sk_socket && take_unclaimed(sk))
		claim(sk);
	if (oldstate == TCP_SYN_SENT && newstate == TCP_ESTABLISHED) {
		struct conn_info *info = bpf_map_lookup_elem(&conns, &key);
		if (!info)
			return 0;
		__u16 lport = local_port_at_state_change(sk), rport = remote_port_at_state_change(sk);
		set_conn_edge(info, sk, lport, rport);
		if (!port_wanted(lport, rport)) {
			info->sampled_out = 1; /* filtered out: no records (nor counted as left out) */
			return 0;
		}
		count_conn(&info->edge, 1, 0, 0, 0, 0, 0, 0);
		if (sample(info, lport, rport))
			emit_at_state_change(sk, DT_REC_CONN_OPEN, info, 0, 0, lport, rport);
		return 0;
	}
	if (newstate != TCP_CLOSE)
		return 0;

	struct conn_info *info = bpf_map_lookup_elem(&conns, &key);
	if (!info) {
		close_unknown(sk, oldstate);
		return 0;
	}
	if (oldstate != TCP_LISTEN && oldstate != TCP_SYN_RECV) {
		__u16 lport = local_port_at_state_change(sk), rport = remote_port_at_state_change(sk);
		if (!port_wanted(lport, rport)) {
			/* filtered out: not counted, no records */
		} else if (oldstate == TCP_SYN_SENT) {
			set_conn_edge(info, sk, lport, rport);
			count_conn(&info->edge, 0, 0, 1, 0, 0, 0, 0);
			/* Failed connects are sampled too: a storm of refused connects
			 * is as many records as a storm of connections. */
			if (sample(info, lport, rport))
				emit_at_state_change(sk, DT_REC_CONN_FAILED, info, sk->sk_err, 0, lport, rport);
		} else {
			struct close_facts facts;
			facts_at_close(&facts, sk, oldstate, info->flags);
			bool reset = facts.flags & (DT_CONN_RESET_SENT | DT_CONN_RESET_RECEIVED);
			bool server = info->role == DT_ROLE_SERVER;
			count_conn(&info->edge, 0, 1, 0, server ? facts.received : facts.sent,
				   server ? facts.sent : facts.received, info->retransmits, reset);
			if (info->sampled_out)
				dt_count(DT_STAT_SAMPLED_OUT);
			else
				emit_at_state_change(sk, DT_REC_CONN_CLOSE, info, 0, &facts, lport, rport);
		}
		forget_local_client(info, sk, lport, rport);
	}
	bpf_map_delete_elem(&conns, &key);
	return 0;
}

/* Every read and write on a socket: the first on an unclaimed passive open claims
 * it.  Any other socket has no such storage: one lookup, then out. */
static __always_inline int on_transfer(struct sock *sk)
{
	if (take_unclaimed(sk))
		claim(sk);
	return 0;
}

SEC("tp_btf/sock_send_length")
int BPF_PROG(claim_on_send, struct sock *sk, int ret, int flags)
{
	return on_transfer(sk);
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(claim_on_recv, struct sock *sk, int ret, int flags)
{
	return on_transfer(sk);
}

SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(handle_retransmit, struct sock *sk)
{
	__u64 key = (__u64)sk;
	struct conn_info *info = bpf_map_lookup_elem(&conns, &key);
	if (info)
		__sync_fetch_and_add(&info->retransmits, 1);
	return 0;
}

static __always_inline void flag_conn(struct sock *sk, __u8 flag)
{
	__u64 key = (__u64)sk;
	struct conn_info *info = bpf_map_lookup_elem(&conns, &key);
	if (info)
		info->flags |= flag;
}

SEC("tp_btf/tcp_receive_reset")
int BPF_PROG(handle_receive_reset, struct sock *sk)
{
	flag_conn(sk, DT_CONN_RESET_RECEIVED);
	return 0;
}

SEC("tp_btf/tcp_send_reset")
int BPF_PROG(handle_send_reset, struct sock *sk)
{
	/* Resets answering a segment with no socket have sk == NULL. */
	if (sk)
		flag_conn(sk, DT_CONN_RESET_SENT);
	return 0;
}
