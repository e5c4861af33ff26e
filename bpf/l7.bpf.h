/* SPDX-License-Identifier: Apache-2.0
 * Exact L7 accounting in the kernel: HTTP/1.x, Redis (RESP2/3), MySQL and PostgreSQL.
 *
 * Called once per transfer on a socket (payload.bpf.c's send/recv hooks) with
 * the first bytes of the call, it classifies the socket's protocol from its
 * first bytes, follows request and response boundaries in the socket's own
 * storage, reads each response's status from its first bytes and counts every
 * exchange in per-CPU maps keyed by edge, method and status (dt_l7_counts)
 * with a latency histogram (dt_l7_latency): never sampled.  User space reads
 * the maps on its tick (deetune.accounting), so its cost does not grow with the
 * request rate.
 *
 * Boundaries: a request starts with a chunk in the request direction that
 * opens one (an HTTP method, a MySQL command packet, each RESP command); its
 * response starts with the first chunk the other way (HTTP: a status line;
 * Redis: each reply, parsed to its end; MySQL: the first packet).  Latency is
 * from the last request chunk to the first response chunk.  Redis pipelines
 * are parsed command by command and reply by reply within the bytes copied
 * (L7_PARSE_WINDOW per call); what a window cannot reach is counted as
 * unparsed (DT_L7_UNPARSED), never silently.  PostgreSQL: each direction's
 * message framing (type, length) is followed across calls, one header per
 * message (the bytes copied, else the call's user buffer); a Sync or a Query
 * closes a batch of exchanges that its ReadyForQuery answers (see
 * account_postgres).
 *
 * The includer copies l7_bytes_wanted() bytes of each call into a buffer
 * of L7_BUF_SIZE bytes (power of two, with as much slack after it) and calls
 * l7_account(). */
#ifndef __DEETUNE_L7_BPF_H__
#define __DEETUNE_L7_BPF_H__

#include "common.bpf.h"
#include "local_clients.bpf.h"

#ifndef L7_BUF_SIZE
#error "define L7_BUF_SIZE (the copy buffer's size, a power of two) before including l7.bpf.h"
#endif

/* Bytes of a call looked at while classifying, and for HTTP and MySQL. */
#define L7_HEAD_BYTES 64
/* Bytes of a Redis call parsed at most (a pipeline longer than this in one
 * call is counted as far as the window reaches, the rest as unparsed). */
#define L7_PARSE_WINDOW 16384
/* Chunks with data looked at before a socket is given up as none of ours. */
#define L7_CLASSIFY_TRIES 16
/* A request's head kept for an error's detail (see l7_account's return): a
 * Redis pipeline's commands are short and many (16 INCRs take 448 bytes), an
 * HTTP or MySQL request's head says what it is in its first bytes. */
#define L7_SAVED_HEAD 512
#define L7_SAVED_HEAD_SHORT 256
/* Redis: commands whose names are remembered until their replies; aggregates
 * followed inside one reply. */
#define L7_PENDING_RING 16
#define L7_RESP_DEPTH 8

/* Latency bounds (ns, ascending, bounds[count-1] the last) that user space
 * sets before load (deetune.accounting.LATENCY_BOUNDS_NS). */
const volatile __u64 dt_latency_bounds[DT_LATENCY_BOUNDS] = {};
const volatile __u32 dt_latency_bound_count = 0;
/* For each power of two 2^k: how many bounds are below it (user space sets it too). */
const volatile __u16 dt_latency_octaves[64] = {};
/* Bounds within one power of two, at most (user space checks), and one step more. */
#define L7_OCTAVE_BOUNDS 32

/* The counters live in arrays, a slot per key: a socket remembers the slot of
 * its last key, so that an exchange like the one before it (most are) costs
 * array updates and no hash lookup.  dt_l7_slots names each key's slot; free
 * slots wait in dt_l7_free_slots (user space fills it before attaching, and
 * frees the slots of keys long idle, bumping their generation so that no
 * socket's memory of them holds). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, DT_L7_SLOTS);
	__type(key, struct dt_l7_key);
	__type(value, struct dt_l7_slot);
} dt_l7_slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_QUEUE);
	__uint(max_entries, DT_L7_SLOTS);
	__type(value, __u32);
} dt_l7_free_slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, DT_L7_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} dt_l7_slot_gen SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DT_L7_SLOTS);
	__type(key, __u32);
	__type(value, struct dt_l7_counts);
} dt_l7_counts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, DT_L7_SLOTS);
	__type(key, __u32);
	__type(value, struct dt_latency_histogram);
} dt_l7_latency SEC(".maps");

enum l7_phase {
	L7_IDLE = 0,     /* no exchange in progress */
	L7_REQUEST = 1,  /* requests sent, no response yet (or not all: pipelines) */
	L7_RESPONSE = 2, /* a response is coming */
	L7_AUTH = 3,     /* MySQL: between the greeting and the login's OK or ERR */
};

enum resp_state {
	RP_TYPE = 0,    /* at the start of a line: its type byte */
	RP_NUMBER = 1,  /* in the number of a length or count line */
	RP_LINE = 2,    /* in a line read to its LF (simple string, error, the rest of an inline command) */
	RP_NAME = 3,    /* in a command's name (its first bulk string): name_left bytes to keep */
	RP_INLINE = 4,  /* in an inline command's first word (its name) */
};

/* A RESP stream, one direction. */
struct resp_parser {
	__u32 skip;               /* bytes of bulk data and its CRLF still to pass */
	__u32 number;             /* digits of a length line read so far */
	__u32 left[L7_RESP_DEPTH]; /* elements left in each open aggregate, [0] outermost */
	__u8 state;               /* enum resp_state */
	__u8 type;                /* the current line's type byte */
	__u8 depth;               /* aggregates open */
	__u8 attrs;               /* bit d: aggregate d is a RESP3 attribute (not an element) */
	__u8 error;               /* the message being parsed holds an error */
	__u8 negative;
	__u8 push;                /* the message is a RESP3 push (no request asked for it) */
	__u8 lost;                /* out of step: waiting for a message to start a chunk */
	__u8 name_next;           /* request: the next bulk string is the command's name */
	__u8 name_left;           /* RP_NAME: bytes of the name still to keep */
	__u8 name_len;            /* bytes of the name kept */
	__u8 _pad[1];
};

/* Where the Redis parser is in the call being parsed. */
struct resp_scan {
	__u32 pos;
	__u32 errors;      /* error replies counted this call */
	__u8 stop;         /* the call is over (or lost) */
	__u8 _pad[7];
};

struct l7_method {
	char name[DT_L7_METHOD_LEN];
};

struct pending_method {
	__u32 id;                 /* command number it belongs to */
	char method[DT_L7_METHOD_LEN];
};

/* The key of the last exchange a socket counted, and its slot (see dt_l7_slots). */
struct l7_slot_cache {
	char method[DT_L7_METHOD_LEN];
	__u16 status;
	__u8 flags;
	__u8 valid;
	__u32 slot;
	__u32 gen;
	__u32 _pad;
};

/* A socket's ends, noted by the includer while the socket is not classified
 * (l7_note_endpoints): what its edge is made of. */
struct l7_endpoints {
	__u8 laddr[16];
	__u8 raddr[16];
	__u16 lport;
	__u16 rport;
	__u16 family;
	__u16 set;
};


/* PostgreSQL: the exchanges' methods (names in pg_names), as the user-space decoder names them. */
enum pg_method {
	PG_NONE = 0,
	PG_QUERY = 1,
	PG_EXECUTE = 2,
	PG_STARTUP = 3,
	PG_PARSE = 4,
	PG_BIND = 5,
	PG_DESCRIBE = 6,
	PG_CLOSE = 7,
	PG_SYNC = 8,
	PG_FUNCTION_CALL = 9,
	PG_SSL_REQUEST = 10,
	PG_GSSENC_REQUEST = 11,
	PG_CANCEL = 12,
};

/* Batches (Syncs, Queries) sent and not answered yet, at most: pipelines. */
#define L7_PG_BATCHES 16
/* Messages walked in one call at most (a server writes 8 KiB at a time: ~1500 short rows). */
#define L7_PG_STEPS 8192
/* Bytes of a call copied for the walk: headers beyond are read from the call's buffer. */
#ifndef L7_PG_WINDOW
#define L7_PG_WINDOW 4096
#endif

/* What one ReadyForQuery answers: the exchanges a Sync or Query closed, in order: `execs`
 * EXECUTE groups, then a group of another method (`tail`, if any), then `last`. */
struct pg_batch {
	__u64 req_end;    /* its last request byte */
	__u32 execs;
	__u8 tail;        /* enum pg_method: Parse/Bind … messages a Query came after */
	__u8 last;        /* enum pg_method: the Sync's group when not an Execute's, the Query … */
	__u8 _pad[2];
};

/* One direction's framing. */
struct pg_parser {
	__u32 left;       /* bytes of the current message's body still to come */
	__u8 hdr[8];      /* the next message's header, as far as read (split across calls) */
	__u8 have;        /* bytes of it read */
	__u8 special;     /* untyped next: the start-up message (requests), a 1-byte SSL answer (responses) */
	__u8 lost;        /* out of step: waiting to start again */
	__u8 _pad;
};

struct pg_state {
	struct pg_parser dir[2];  /* [0] requests, [1] responses */
	struct pg_batch ring[L7_PG_BATCHES];
	__u32 pushed;     /* batches closed by the client */
	__u32 popped;     /* batches answered */
	__u32 execs;      /* EXECUTE groups since the last Sync */
	__u32 done;       /* Executes completed (CommandComplete …) in the batch being answered */
	__u32 fail_at;    /* `done` at its first ErrorResponse */
	__u32 pos;        /* the walk's place in the call */
	__u64 resp_ns;    /* the first response byte of the batch being answered (0: none yet) */
	__u8 open;        /* enum pg_method of the extended-protocol group messages join (0: none) */
	__u8 exec_last;   /* the last message was an Execute: a Sync joins its group */
	__u8 failed;      /* an ErrorResponse in the batch being answered */
	__u8 stop;        /* the walk of the call is over */
	__u8 action;      /* enum l7_action for the call */
	__u8 late;        /* requests came after the batch's ErrorResponse (skipped by the server) */
	__u8 _pad[2];
};

/* What the accounting keeps of one socket (in the includer's socket storage). */
struct l7_sock {
	struct dt_edge edge;      /* set when classified */
	struct l7_endpoints ends;
	__u8 protocol;            /* enum dt_l7_protocol */
	__u8 phase;               /* enum l7_phase */
	__u8 tries;               /* chunks looked at while classifying */
	__u8 request_dir;         /* enum dt_direction that requests take on this side */
	__u8 last_flags;          /* key of the last exchange counted (its response bytes follow) */
	__u8 mysql_stash_len;     /* MySQL: a packet header read alone (4 bytes) */
	__u8 mysql_stash_dir;
	__u8 head_wanted;         /* the call just seen began a request: keep its head (2: after the head kept) */
	__u8 head_stashed;        /* MySQL: that request's 4-byte header came alone, before it */
	__u8 classified_now;      /* l7_classify_call settled the protocol on this call */
	__u16 last_status;
	__u16 head_len;
	__u32 pending;            /* requests without a response yet */
	__u32 pushed;             /* Redis: commands seen (ids of the ring) */
	__u32 popped;             /* Redis: replies matched */
	__u32 mysql_left;         /* MySQL: bytes of the request packet still to come */
	__u8 mysql_stash[4];
	__u8 mysql_stash_head[4]; /* the header the current call's packet began with, when stashed */
	__u64 req_end_ns;         /* the last request chunk */
	__u64 head_ns;            /* when the saved head was sent */
	__u64 req_bytes;          /* of the requests not answered yet */
	__u64 resp_bytes;         /* of the response in progress */
	__u64 resp_first;         /* the bytes of the call that began the response being counted:
				   * counted with the exchange (one map update, not two) */
	__u64 now;                /* the call being accounted (set by the includer) */
	__u64 user;               /* its bytes in user memory, when in one buffer (set by the includer; 0: not) */
	char method[DT_L7_METHOD_LEN];      /* HTTP and MySQL: the request in progress */
	char last_method[DT_L7_METHOD_LEN];
	/* One protocol's state at a time (a socket's protocol is settled once): the storage stays
	 * the size it was for the largest. */
	union {
		struct {
			struct pending_method ring[L7_PENDING_RING]; /* HTTP pipelines, Redis */
			struct resp_parser rp[2]; /* Redis: [0] requests, [1] replies */
			struct resp_scan scan;
		};
		struct pg_state pg;       /* PostgreSQL */
	};
	/* The counters' key being built: here rather than on the stack, which the
	 * parser's chain of calls (callback, reply, exchange) would outgrow. */
	struct dt_l7_key key;
	struct l7_slot_cache cache;
	__u8 head[L7_SAVED_HEAD];
};

_Static_assert(sizeof(struct pg_state) <= sizeof(struct pending_method) * L7_PENDING_RING +
		       sizeof(struct resp_parser) * 2 + sizeof(struct resp_scan), "PostgreSQL's state grows l7_sock");

/* The bytes copied of a call (the caller's buffer, L7_BUF_SIZE of them readable). */
struct l7_bytes {
	__u8 b[L7_BUF_SIZE];
};

/* One call, as the accounting sees it. */
struct l7_call {
	const struct l7_bytes *buf; /* the copied bytes: buf->b[0 .. len) */
	__u32 len;
	__u32 size;               /* bytes the call moved */
	__u64 ts;
	__u8 direction;           /* enum dt_direction */
	__u8 save_head;           /* keep requests' heads for errors' detail */
};

/* What l7_account asks of its caller. */
enum l7_action {
	L7_NOTHING = 0,
	/* An error response: emit the saved request head and this response's head
	 * for decoding, whatever the overload sampling copies (user space keeps one
	 * report of each error: deetune.l7). */
	L7_ERROR_DETAIL = 1,
	/* PostgreSQL: the ReadyForQuery that ends requests sent after an error was answered, which
	 * the server skipped (errors too): their heads and this response's, for their detail. */
	L7_ERROR_SKIPPED = 2,
};

/* How many bytes of a call on this socket the accounting needs. */
static __always_inline __u32 l7_bytes_wanted(struct l7_sock *st, bool save_head, __u8 direction)
{
	if (st->protocol == DT_L7_NONE)
		return 0;
	if (st->protocol == DT_L7_UNKNOWN)
		return L7_HEAD_BYTES; /* enough to classify; then what the protocol needs (l7_classify_call) */
	if (st->protocol == DT_L7_REDIS)
		return L7_PARSE_WINDOW;
	if (st->protocol == DT_L7_POSTGRES)
		return L7_PG_WINDOW;
	return save_head && direction == st->request_dir ? L7_SAVED_HEAD_SHORT : L7_HEAD_BYTES;
}

static __always_inline __u8 l7_byte(const struct l7_bytes *buf, __u32 i)
{
	return buf->b[i & (L7_BUF_SIZE - 1)];
}

/* -- counting ----------------------------------------------------------------------------- */

/* The position of the highest bit set (0 for 0 and 1). */
static __always_inline __u32 log2_floor(__u64 x)
{
	__u32 k = 0;
	if (x >> 32) { x >>= 32; k += 32; }
	if (x >> 16) { x >>= 16; k += 16; }
	if (x >> 8) { x >>= 8; k += 8; }
	if (x >> 4) { x >>= 4; k += 4; }
	if (x >> 2) { x >>= 2; k += 2; }
	if (x >> 1) k += 1;
	return k;
}

static __always_inline __u32 latency_bucket(__u64 ns)
{
	/* The first bound not below ns: from the first bound of ns's power of two, a few
	 * steps up user space's table (two or three cache lines, where a binary search
	 * over the whole table touched nine). */
	__u32 count = dt_latency_bound_count;
	if (count > DT_LATENCY_BOUNDS)
		count = DT_LATENCY_BOUNDS;
	__u32 i = dt_latency_octaves[log2_floor(ns) & 63];
	for (int step = 0; step < L7_OCTAVE_BOUNDS; step++) {
		if (i >= count || dt_latency_bounds[i & (DT_LATENCY_BOUNDS - 1)] >= ns)
			break;
		i++;
	}
	return i;
}

/* Copies 8-byte words one at a time: a plain struct copy within one map value
 * makes the compiler load it all into registers first, and spill them to a
 * stack that the parser's chain of calls has little of. */
static __always_inline void copy_words(void *dst, const void *src, int words)
{
	__u64 *d = dst;
	const __u64 *from = src;
	for (int i = 0; i < words; i++) {
		d[i] = from[i];
		barrier();
	}
}

static __always_inline void fill_key(struct dt_l7_key *key, struct l7_sock *st, const char *method, __u16 status,
				     __u8 flags)
{
	copy_words(&key->edge, &st->edge, sizeof(key->edge) / 8);
	copy_words(key->method, method, DT_L7_METHOD_LEN / 8);
	key->status = status;
	key->flags = flags;
	__builtin_memset(key->_pad, 0, sizeof(key->_pad));
}

static __always_inline bool same_method(const char *a, const char *b)
{
	const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;
	return x[0] == y[0] && x[1] == y[1];
}

#define L7_NO_SLOT 0xffffffffu

/* The slot of the socket's edge with this method, status and flags: the one it
 * remembers when the key is the same and the slot still its (generation), else
 * the key's in dt_l7_slots, else a free one given to the key.  `remember`: make
 * it the one remembered (exchanges; not the rare keys of odd counts). */
static __always_inline __u32 slot_of(struct l7_sock *st, const char *method, __u16 status, __u8 flags,
				     bool remember)
{
	struct l7_slot_cache *cache = &st->cache;
	if (cache->valid && cache->status == status && cache->flags == flags && same_method(cache->method, method)) {
		__u32 *gen = bpf_map_lookup_elem(&dt_l7_slot_gen, &cache->slot);
		if (gen && *gen == cache->gen)
			return cache->slot;
	}
	struct dt_l7_key *key = &st->key;
	fill_key(key, st, method, status, flags);
	struct dt_l7_slot *found = bpf_map_lookup_elem(&dt_l7_slots, key);
	if (!found) {
		__u32 slot;
		if (bpf_map_pop_elem(&dt_l7_free_slots, &slot) != 0) {
			dt_count(DT_STAT_ACCOUNTING_FULL);
			return L7_NO_SLOT;
		}
		__u32 *gen = bpf_map_lookup_elem(&dt_l7_slot_gen, &slot);
		struct dt_l7_slot fresh = {.slot = slot, .gen = gen ? *gen : 0};
		/* Another CPU may have given the key a slot meanwhile: then this one goes back. */
		if (!gen || bpf_map_update_elem(&dt_l7_slots, key, &fresh, BPF_NOEXIST) != 0)
			bpf_map_push_elem(&dt_l7_free_slots, &slot, 0);
		found = bpf_map_lookup_elem(&dt_l7_slots, key);
		if (!found) {
			dt_count(DT_STAT_ACCOUNTING_FULL);
			return L7_NO_SLOT;
		}
	}
	if (remember) {
		copy_words(cache->method, method, DT_L7_METHOD_LEN / 8);
		cache->status = status;
		cache->flags = flags;
		cache->slot = found->slot;
		cache->gen = found->gen;
		cache->valid = 1;
	}
	return found->slot;
}

static __always_inline void add_counts(__u32 slot, __u64 requests, __u64 req_bytes, __u64 resp_bytes,
				       __u64 latency)
{
	struct dt_l7_counts *c = bpf_map_lookup_elem(&dt_l7_counts, &slot);
	if (!c)
		return; /* L7_NO_SLOT: counted as DT_STAT_ACCOUNTING_FULL */
	/* Atomic: a tracing program can be preempted by another task's run on this CPU. */
	if (requests)
		__sync_fetch_and_add(&c->requests, requests);
	if (req_bytes)
		__sync_fetch_and_add(&c->request_bytes, req_bytes);
	if (resp_bytes)
		__sync_fetch_and_add(&c->response_bytes, resp_bytes);
	if (latency)
		__sync_fetch_and_add(&c->latency_sum_ns, latency);
}

static __always_inline void add_latency(__u32 slot, __u64 latency, __u32 n)
{
	struct dt_latency_histogram *h = bpf_map_lookup_elem(&dt_l7_latency, &slot);
	if (!h)
		return;
	__u32 bucket = latency_bucket(latency);
	if (bucket >= DT_LATENCY_BUCKETS)
		bucket = DT_LATENCY_BUCKETS - 1;
	__sync_fetch_and_add(&h->buckets[bucket], n);
}

/* The counting functions below are global: the verifier checks each once, not
 * at every call site (the Redis parser calls them from a bpf_loop callback).
 * Their pointer arguments may be NULL to the verifier, hence the checks. */

/* An exchange counted without a latency (a command that expects no response). */
#define L7_NO_LATENCY 0x100

static __always_inline void flush_response_bytes(struct l7_sock *st)
{
	if (!st->resp_bytes)
		return;
	add_counts(slot_of(st, st->last_method, st->last_status, st->last_flags, true), 0, 0, st->resp_bytes, 0);
	st->resp_bytes = 0;
}

/* The response bytes of the last exchange counted go to its key once it is over. */
__attribute__((noinline)) int l7_flush_response_bytes(struct l7_sock *st)
{
	if (!st)
		return 0;
	flush_response_bytes(st);
	return 0;
}

/* One exchange: its response started now (or never came: DT_L7_NO_RESPONSE). */
__attribute__((noinline)) int l7_count_exchange(struct l7_sock *st, struct l7_method *method, __u32 status,
						__u32 flags, __u64 now)
{
	if (!st || !method)
		return 0;
	flush_response_bytes(st);
	__u64 latency = 0;
	bool timed = !(flags & (DT_L7_NO_RESPONSE | L7_NO_LATENCY));
	if (timed && st->req_end_ns && now >= st->req_end_ns)
		latency = now - st->req_end_ns;
	__u32 slot = slot_of(st, method->name, status, flags, true);
	add_counts(slot, 1, st->req_bytes, st->resp_first, latency);
	st->req_bytes = 0;
	st->resp_first = 0;
	copy_words(st->last_method, method->name, DT_L7_METHOD_LEN / 8);
	st->last_status = status;
	st->last_flags = flags;
	if (timed)
		add_latency(slot, latency, 1);
	return 0;
}

/* `n` exchanges of one key answered by one response (a PostgreSQL batch), `latency` each
 * (none with DT_L7_NO_RESPONSE or L7_NO_LATENCY). */
__attribute__((noinline)) int l7_count_exchanges(struct l7_sock *st, struct l7_method *method, __u32 flags, __u32 n,
						 __u64 latency)
{
	if (!st || !method || !n)
		return 0;
	flush_response_bytes(st);
	bool timed = !(flags & (DT_L7_NO_RESPONSE | L7_NO_LATENCY));
	flags &= 0xff;
	if (!timed)
		latency = 0;
	__u32 slot = slot_of(st, method->name, 0, flags, true);
	add_counts(slot, n, st->req_bytes, st->resp_first, latency * n);
	st->req_bytes = 0;
	st->resp_first = 0;
	copy_words(st->last_method, method->name, DT_L7_METHOD_LEN / 8);
	st->last_status = 0;
	st->last_flags = flags;
	if (timed)
		add_latency(slot, latency, n);
	return 0;
}

/* Something that is not an exchange (see dt_l7_flags): `n` of them. */
__attribute__((noinline)) int l7_count_other(struct l7_sock *st, __u32 flags, __u64 n)
{
	if (!st)
		return 0;
	char none[DT_L7_METHOD_LEN] = {};
	add_counts(slot_of(st, none, 0, flags, false), n, 0, 0, 0);
	return 0;
}

/* Requests still waiting when the connection ends or the replies are lost track of. */
__attribute__((noinline)) int l7_count_unanswered(struct l7_sock *st, __u32 flags)
{
	if (!st || !st->pending)
		return 0;
	char none[DT_L7_METHOD_LEN] = {};
	/* MySQL has one request at a time; HTTP and Redis pipelines: which ones is not kept. */
	add_counts(slot_of(st, st->protocol == DT_L7_MYSQL ? st->method : none, 0, flags, false), st->pending,
		   st->req_bytes, 0, 0);
	st->req_bytes = 0;
	st->pending = 0;
	st->popped = st->pushed;
	return 0;
}

/* -- PostgreSQL ------------------------------------------------------------------------------- */

/* Exchanges as the user-space decoder (deetune.decoders.postgres) groups them, counted when the
 * ReadyForQuery that ends them comes: a Query is one; in the extended protocol the messages up to
 * an Execute are one (EXECUTE), a Sync right behind an Execute joins it, Parse/Bind/Describe/Close
 * messages a Sync closes without an Execute are one (named by the first, BIND over the others), a
 * Sync alone is one (SYNC).  A batch is what one ReadyForQuery answers (all since the last Sync or
 * Query); each Execute completed (CommandComplete, EmptyQueryResponse, PortalSuspended) before an
 * ErrorResponse was an exchange that succeeded, the one that failed and every one after it up to the
 * Sync are errors (the server skips them).  The start-up is one (STARTUP) up to the first
 * ReadyForQuery, or an error. */

static const char pg_names[16][DT_L7_METHOD_LEN] = {
	"", "QUERY", "EXECUTE", "STARTUP", "PARSE", "BIND", "DESCRIBE", "CLOSE", "SYNC", "FUNCTION_CALL",
	"SSL_REQUEST", "GSSENC_REQUEST", "CANCEL",
};

#define PG_CODE_PROTOCOL_3 196608
#define PG_CODE_SSL 80877103
#define PG_CODE_GSSENC 80877104
#define PG_CODE_CANCEL 80877102
#define PG_MAX_LENGTH (1u << 30)

static __always_inline __u32 pg_be32(const __u8 *h)
{
	return (__u32)h[0] << 24 | (__u32)h[1] << 16 | (__u32)h[2] << 8 | h[3];
}

/* Frontend message types (the decoder's): B C D E F H P Q S X c d f p. */
static __always_inline bool pg_frontend_type(__u8 t)
{
	return t == 'B' || t == 'C' || t == 'D' || t == 'E' || t == 'F' || t == 'H' || t == 'P' || t == 'Q' ||
	       t == 'S' || t == 'X' || t == 'c' || t == 'd' || t == 'f' || t == 'p';
}

/* Backend message types: 1 2 3 A C D E G H I K N R S T V W Z c d n s t v. */
static __always_inline bool pg_backend_type(__u8 t)
{
	return (t >= '1' && t <= '3') || t == 'A' || t == 'C' || t == 'D' || t == 'E' || t == 'G' || t == 'H' ||
	       t == 'I' || t == 'K' || t == 'N' || t == 'R' || t == 'S' || t == 'T' || t == 'V' || t == 'W' ||
	       t == 'Z' || t == 'c' || t == 'd' || t == 'n' || t == 's' || t == 't' || t == 'v';
}

/* `n` (at most 8) bytes of the call at `pos`: from the bytes copied, else from the call's buffer
 * (st->user).  False when neither has them. */
static __always_inline bool pg_read(struct l7_sock *st, const struct l7_bytes *buf, __u32 len, __u32 pos, __u8 *out,
				    __u32 n)
{
	if (n > 8)
		return false;
	if (pos + n <= len) {
		for (int i = 0; i < 8; i++)
			if (i < n)
				out[i] = l7_byte(buf, pos + i);
		return true;
	}
	if (!st->user)
		return false;
	return bpf_probe_read_user(out, n, (const void *)(st->user + pos)) == 0;
}

/* A call of whole frontend messages that a request round trip opens with: a Query alone, or
 * Parse/Bind … ending with a Sync or Flush exactly where the call ends (a connection joined after
 * its start-up, or followed again after a loss).  Strict, so that other protocols never pass. */
__attribute__((noinline)) int pg_frontend_call(struct l7_sock *st, const struct l7_bytes *buf, __u64 lengths)
{
	if (!st || !buf)
		return 0;
	__u32 len = lengths >> 32, size = (__u32)lengths, pos = 0;
	__u8 h[8] = {};
	for (int i = 0; i < 8; i++) {
		if (pos > size || size - pos < 5 || !pg_read(st, buf, len, pos, h, 5))
			return 0;
		__u8 t = h[0];
		__u32 length = pg_be32(&h[1]);
		if (length < 4 || length > PG_MAX_LENGTH)
			return 0;
		if (t == 'Q') {
			/* A statement: NUL-terminated, starting like SQL. */
			if (i || length + 1 != size || length < 6 || !pg_read(st, buf, len, 5, h, 1))
				return 0;
			__u8 c = h[0] | 0x20;
			if (!((c >= 'a' && c <= 'z') || c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '(' ||
			      c == '/' || c == '-'))
				return 0;
			return pg_read(st, buf, len, size - 1, h, 1) && h[0] == 0;
		}
		if (i == 0 ? t != 'P' && t != 'B'
			   : t != 'P' && t != 'B' && t != 'D' && t != 'E' && t != 'S' && t != 'H' && t != 'C')
			return 0;
		__u64 next = (__u64)pos + 1 + length;
		if (next == size)
			return (t == 'S' || t == 'H') && length == 4;
		if (next > size)
			return 0;
		pos = next;
	}
	return 0;
}

/* The name of a method, in st->method for the counting functions. */
static __always_inline struct l7_method *pg_method(struct l7_sock *st, __u8 code)
{
	copy_words(st->method, pg_names[code & 15], DT_L7_METHOD_LEN / 8);
	return (struct l7_method *)st->method;
}

static __always_inline void pg_count(struct l7_sock *st, __u8 code, __u32 flags, __u32 n, __u64 latency)
{
	if (n)
		l7_count_exchanges(st, pg_method(st, code), flags, n, latency);
}

static __always_inline void pg_answered_reset(struct pg_state *pg)
{
	pg->done = 0;
	pg->fail_at = 0;
	pg->failed = 0;
	pg->late = 0;
	pg->resp_ns = 0;
}

/* The batch at the head was answered (a ReadyForQuery, a refused start-up, an SSL answer). */
static __always_inline void pg_answer(struct l7_sock *st)
{
	struct pg_state *pg = &st->pg;
	struct pg_batch *b = &pg->ring[pg->popped & (L7_PG_BATCHES - 1)];
	__u32 execs = b->execs;
	__u8 tail = b->tail, last = b->last;
	__u64 latency = b->req_end && pg->resp_ns > b->req_end ? pg->resp_ns - b->req_end : 0;
	__u32 n = execs + (tail ? 1 : 0) + (last ? 1 : 0);
	__u32 ok = execs;
	bool tail_error = false, last_error = false;
	if (pg->failed && n) {
		/* The group that failed: the one after the Executes completed (or the last). */
		__u32 f = pg->fail_at < n - 1 ? pg->fail_at : n - 1;
		ok = f < execs ? f : execs;
		tail_error = tail && f <= execs;
		last_error = last != 0;
	}
	pg_count(st, PG_EXECUTE, 0, ok, latency);
	pg_count(st, PG_EXECUTE, DT_L7_ERROR, execs - ok, latency);
	if (tail)
		pg_count(st, tail, tail_error ? DT_L7_ERROR : 0, 1, latency);
	if (last)
		pg_count(st, last, last_error ? DT_L7_ERROR : 0, 1, latency);
	pg->popped++;
	st->pending = st->pending > n ? st->pending - n : 0;
	pg_answered_reset(pg);
}

/* The client closed a batch (a Sync, a Query, the start-up …). */
static __always_inline void pg_push(struct l7_sock *st, __u8 tail, __u8 last, __u64 ts)
{
	struct pg_state *pg = &st->pg;
	if (pg->pushed - pg->popped >= L7_PG_BATCHES) {
		/* Too many unanswered: the oldest is counted as answered without its status (its answer
		 * then ends the next: the counts stay whole, a status may shift). */
		struct pg_batch *old = &pg->ring[pg->popped & (L7_PG_BATCHES - 1)];
		__u32 n = old->execs + (old->tail ? 1 : 0) + (old->last ? 1 : 0);
		pg_count(st, PG_NONE, DT_L7_STATUS_UNKNOWN | L7_NO_LATENCY, n, 0);
		pg->popped++;
		st->pending = st->pending > n ? st->pending - n : 0;
		pg_answered_reset(pg);
	}
	struct pg_batch *b = &pg->ring[pg->pushed & (L7_PG_BATCHES - 1)];
	b->req_end = ts;
	b->execs = pg->execs;
	b->tail = tail;
	b->last = last;
	pg->pushed++;
	st->pending += pg->execs + (tail ? 1 : 0) + (last ? 1 : 0);
	pg->execs = 0;
	pg->open = 0;
	pg->exec_last = 0;
}

/* The parse of one call (bpf_loop: one message a step; what changes lives in the socket's storage). */
struct pg_walk {
	struct l7_sock *st;
	const struct l7_bytes *buf;
	__u64 ts;
	__u32 len;   /* bytes copied */
	__u32 size;  /* bytes the call moved */
	__u8 request;
};

static __always_inline void pg_lost(struct pg_state *pg, struct pg_parser *p)
{
	p->lost = 1;
	pg->stop = 1;
}

/* The header read in p->hdr of a typed message, a frontend one or a backend one: its type, its
 * body's length to skip in p->left; 0 when it is no such message (the direction is lost). */
static __always_inline __u8 pg_typed_header(struct pg_state *pg, struct pg_parser *p, bool frontend)
{
	__u8 t = p->hdr[0];
	__u32 length = pg_be32(&p->hdr[1]);
	if (length < 4 || length > PG_MAX_LENGTH || !(frontend ? pg_frontend_type(t) : pg_backend_type(t))) {
		pg_lost(pg, p);
		return 0; /* (no message type is 0) */
	}
	p->left = length - 4;
	return t;
}

static __always_inline void pg_request_message(struct pg_walk *w, struct pg_parser *p)
{
	struct l7_sock *st = w->st;
	struct pg_state *pg = &st->pg;
	const __u8 *h = p->hdr;
	if (p->special) {
		/* Untyped: a length and a code. */
		__u32 length = pg_be32(h), code = pg_be32(&h[4]);
		p->special = 0;
		if (length < 8 || length > 10000) {
			pg_lost(pg, p);
			return;
		}
		p->left = length - 8;
		if ((code >> 16) == 3) {
			pg_push(st, 0, PG_STARTUP, w->ts);
		} else if (code == PG_CODE_SSL || code == PG_CODE_GSSENC) {
			pg_push(st, 0, code == PG_CODE_SSL ? PG_SSL_REQUEST : PG_GSSENC_REQUEST, w->ts);
			pg->dir[1].special = 1; /* answered by one byte */
		} else if (code == PG_CODE_CANCEL) {
			/* A connection of its own, closed by the server without an answer. */
			l7_count_exchange(st, pg_method(st, PG_CANCEL), 0, L7_NO_LATENCY, w->ts);
			st->protocol = DT_L7_NONE;
			pg->stop = 1;
		} else {
			pg_lost(pg, p);
		}
		return;
	}
	__u8 t = pg_typed_header(pg, p, true);
	if (!t)
		return;
	if (t == 'P' || t == 'B' || t == 'D' || t == 'C') {
		pg->exec_last = 0;
		if (!pg->open)
			pg->open = t == 'P' ? PG_PARSE : t == 'B' ? PG_BIND : t == 'D' ? PG_DESCRIBE : PG_CLOSE;
		else if (t == 'B')
			pg->open = PG_BIND;
	} else if (t == 'E') {
		pg->execs++;
		pg->open = 0;
		pg->exec_last = 1;
	} else if (t == 'S') {
		pg_push(st, 0, pg->open ? pg->open : pg->exec_last ? PG_NONE : PG_SYNC, w->ts);
	} else if (t == 'Q' || t == 'F') {
		pg_push(st, pg->open, t == 'Q' ? PG_QUERY : PG_FUNCTION_CALL, w->ts);
	} else if (t == 'p' || t == 'd' || t == 'c' || t == 'f') {
		/* A password, COPY data: sent when the server asked, the answer runs from here. */
		if (pg->pushed != pg->popped) {
			pg->ring[pg->popped & (L7_PG_BATCHES - 1)].req_end = w->ts;
			pg->resp_ns = 0;
		}
	}
	/* 'H' Flush and 'X' Terminate: no exchange of their own. */
}

static __always_inline void pg_response_message(struct pg_walk *w, struct pg_parser *p)
{
	struct l7_sock *st = w->st;
	struct pg_state *pg = &st->pg;
	const __u8 *h = p->hdr;
	bool waiting = pg->pushed != pg->popped;
	/* Answers may come before the Sync that closes their batch (after a Flush, or when the
	 * server reads the Sync late): they belong to the batch being built. */
	bool building = !waiting && (pg->execs || pg->open);
	if (p->special) {
		/* The one-byte answer to an SSLRequest or GSSENCRequest. */
		__u8 c = h[0];
		p->special = 0;
		if (!waiting || (c != 'S' && c != 'G' && c != 'N')) {
			pg_lost(pg, p);
			return;
		}
		if (!pg->resp_ns)
			pg->resp_ns = w->ts;
		pg_answer(st);
		if (c == 'N') {
			pg->dir[0].special = 1; /* refused: the start-up message follows */
		} else {
			st->protocol = DT_L7_NONE; /* encrypted from here on (the tls probe may see its plaintext) */
			pg->stop = 1;
		}
		return;
	}
	__u8 t = pg_typed_header(pg, p, false);
	if (!t)
		return;
	if (!waiting && !building)
		return; /* asynchronous (notice, parameter, notification), or answering a request not seen */
	if (!pg->resp_ns)
		pg->resp_ns = w->ts;
	if (t == 'C' || t == 'I' || t == 's') {
		pg->done++;
	} else if (t == 'E') {
		if (!pg->failed) {
			pg->failed = 1;
			pg->fail_at = pg->done;
			pg->action = L7_ERROR_DETAIL;
		}
		struct pg_batch *b = &pg->ring[pg->popped & (L7_PG_BATCHES - 1)];
		if (waiting && b->last == PG_STARTUP)
			pg_answer(st); /* a refused start-up: the server closes the connection */
	} else if (t == 'Z' && waiting) {
		if (pg->failed && pg->late)
			pg->action = L7_ERROR_SKIPPED;
		pg_answer(st);
	}
}

static long pg_step(__u32 index, void *ctx)
{
	struct pg_walk *w = ctx;
	struct l7_sock *st = w->st;
	struct pg_state *pg = &st->pg;
	struct pg_parser *p = &pg->dir[w->request ? 0 : 1];
	__u32 size = w->size;
	if (pg->pos >= size)
		return 1;
	if (p->left) {
		/* The body of the message whose header was read: skipped, not read. */
		__u32 rest = size - pg->pos;
		if (p->left >= rest) {
			p->left -= rest;
			pg->pos = size;
			return 1;
		}
		pg->pos += p->left;
		p->left = 0;
	}
	if (pg->pos >= size)
		return 1;
	__u32 need = p->special ? (w->request ? 8 : 1) : 5;
	if (!p->have && size - pg->pos >= need) {
		if (!pg_read(st, w->buf, w->len, pg->pos, p->hdr, need)) {
			pg_lost(pg, p);
			return 1;
		}
		pg->pos += need;
	} else {
		/* A header split across calls: its bytes one at a time, the rest with the next call. */
		for (int i = 0; i < 8; i++) {
			if (p->have >= need || pg->pos >= size)
				break;
			if (!pg_read(st, w->buf, w->len, pg->pos, &p->hdr[p->have & 7], 1)) {
				pg_lost(pg, p);
				return 1;
			}
			p->have++;
			pg->pos++;
		}
		if (p->have < need)
			return 1;
		p->have = 0;
	}
	if (w->request)
		pg_request_message(w, p);
	else
		pg_response_message(w, p);
	return pg->stop ? 1 : 0;
}

static __always_inline int account_postgres(struct l7_sock *st, struct l7_call *call)
{
	struct pg_state *pg = &st->pg;
	bool request = call->direction == st->request_dir;
	struct pg_parser *p = &pg->dir[request ? 0 : 1];
	if (request) {
		st->req_bytes += call->size;
		st->req_end_ns = call->ts;
		if (pg->dir[1].lost) {
			/* The responses were lost track of: what they answered is counted so, and they are
			 * followed again from the next response call (one that answers this request). */
			l7_count_unanswered(st, DT_L7_STATUS_UNKNOWN);
			pg->popped = pg->pushed;
			pg_answered_reset(pg);
			__builtin_memset(&pg->dir[1], 0, sizeof(pg->dir[1]));
		}
	}
	if (p->lost) {
		/* Requests start again at a call that is a whole query. */
		if (!request || !pg_frontend_call(st, call->buf, (__u64)call->len << 32 | call->size)) {
			l7_count_other(st, DT_L7_UNPARSED, 1);
			if (!request)
				st->resp_bytes += call->size;
			return L7_NOTHING;
		}
		__builtin_memset(p, 0, sizeof(*p));
	}
	if (request) {
		if (pg->failed) {
			/* After the batch's ErrorResponse was written: the server skips these up to the
			 * Sync, errors whose detail the heads of the error did not have. */
			st->head_wanted = pg->late ? 2 : 1;
			pg->late = 1;
		} else if (pg->pushed != pg->popped || pg->execs || pg->open)
			/* More of requests not all answered (a pipeline sent in several calls): kept after
			 * the head so far, an error's detail needs the requests its answer begins with. */
			st->head_wanted = 2;
		else if (!p->left && !p->have)
			st->head_wanted = 1; /* begins with a message: the head an error's detail needs */
	}
	pg->pos = 0;
	pg->stop = 0;
	pg->action = L7_NOTHING;
	/* A response call's bytes go with the first exchange it ends (one map update, not two). */
	st->resp_first = request ? 0 : call->size;
	struct pg_walk walk = {
		.st = st, .buf = call->buf, .ts = call->ts, .len = call->len, .size = call->size, .request = request,
	};
	bpf_loop(L7_PG_STEPS, pg_step, &walk, 0);
	if (st->protocol == DT_L7_POSTGRES && !p->lost && pg->pos < call->size)
		p->lost = 1; /* the steps ran out */
	if (p->lost)
		l7_count_other(st, DT_L7_UNPARSED, 1);
	st->resp_bytes += st->resp_first; /* it ended none: to the key counted last */
	st->resp_first = 0;
	return pg->action;
}


/* -- classification ------------------------------------------------------------------------ */

/* Length of the HTTP method opening buf (with its space), or 0. */
static __always_inline __u32 http_method_len(const struct l7_bytes *b, __u32 len)
{
	if (len < 4)
		return 0;
	__u8 c0 = l7_byte(b, 0), c1 = l7_byte(b, 1), c2 = l7_byte(b, 2), c3 = l7_byte(b, 3);
	if (c0 == 'G' && c1 == 'E' && c2 == 'T' && c3 == ' ')
		return 4;
	if (c0 == 'P' && c1 == 'U' && c2 == 'T' && c3 == ' ')
		return 4;
	if (len < 5)
		return 0;
	__u8 c4 = l7_byte(b, 4);
	if (c0 == 'P' && c1 == 'O' && c2 == 'S' && c3 == 'T' && c4 == ' ')
		return 5;
	if (c0 == 'H' && c1 == 'E' && c2 == 'A' && c3 == 'D' && c4 == ' ')
		return 5;
	if (len < 6)
		return 0;
	__u8 c5 = l7_byte(b, 5);
	if (c0 == 'P' && c1 == 'A' && c2 == 'T' && c3 == 'C' && c4 == 'H' && c5 == ' ')
		return 6;
	if (c0 == 'T' && c1 == 'R' && c2 == 'A' && c3 == 'C' && c4 == 'E' && c5 == ' ')
		return 6;
	if (len < 7)
		return 0;
	__u8 c6 = l7_byte(b, 6);
	if (c0 == 'D' && c1 == 'E' && c2 == 'L' && c3 == 'E' && c4 == 'T' && c5 == 'E' && c6 == ' ')
		return 7;
	if (len < 8)
		return 0;
	__u8 c7 = l7_byte(b, 7);
	if (c0 == 'O' && c1 == 'P' && c2 == 'T' && c3 == 'I' && c4 == 'O' && c5 == 'N' && c6 == 'S' && c7 == ' ')
		return 8;
	if (c0 == 'C' && c1 == 'O' && c2 == 'N' && c3 == 'N' && c4 == 'E' && c5 == 'C' && c6 == 'T' && c7 == ' ')
		return 8;
	return 0;
}

/* The status of an HTTP/1.x status line opening buf, or 0. */
static __always_inline __u16 http_status(const struct l7_bytes *b, __u32 len)
{
	if (len < 12)
		return 0;
	if (l7_byte(b, 0) != 'H' || l7_byte(b, 1) != 'T' || l7_byte(b, 2) != 'T' || l7_byte(b, 3) != 'P' ||
	    l7_byte(b, 4) != '/' || l7_byte(b, 5) != '1' || l7_byte(b, 6) != '.' || l7_byte(b, 8) != ' ')
		return 0;
	__u8 d0 = l7_byte(b, 9) - '0', d1 = l7_byte(b, 10) - '0', d2 = l7_byte(b, 11) - '0';
	if (d0 < 1 || d0 > 5 || d1 > 9 || d2 > 9)
		return 0;
	return d0 * 100 + d1 * 10 + d2;
}

static __always_inline __u32 mysql_length(const __u8 h[4])
{
	return h[0] | (h[1] << 8) | (h[2] << 16);
}

/* Command codes a client sends (the user-space decoder's table). */
static __always_inline bool mysql_command(__u8 code)
{
	return (code >= 0x01 && code <= 0x1f && code != 0x12 && code != 0x1e) || code == 0xfa;
}

static __always_inline bool mysql_expects_response(__u8 code)
{
	return code != 0x01 && code != 0x18 && code != 0x19; /* QUIT, STMT_SEND_LONG_DATA, STMT_CLOSE */
}

/* A RESP command: "*<digits>\r\n$" */
static __always_inline bool resp_command(const struct l7_bytes *b, __u32 len)
{
	if (len < 8 || l7_byte(b, 0) != '*')
		return false;
	__u8 c = l7_byte(b, 1);
	if (c < '1' || c > '9')
		return false;
	for (int i = 2; i < 8; i++) {
		if ((__u32)i + 2 >= len)
			return false;
		c = l7_byte(b, i);
		if (c == '\r')
			return l7_byte(b, i + 1) == '\n' && l7_byte(b, i + 2) == '$';
		if (c < '0' || c > '9')
			return false;
	}
	return false;
}

static __always_inline void set_edge(struct l7_sock *st, struct l7_call *call, __u8 protocol, __u8 role)
{
	struct l7_endpoints *ends = &st->ends;
	struct dt_edge *e = &st->edge;
	e->family = ends->family;
	__builtin_memcpy(e->raddr, ends->raddr, 16);
	e->pid = bpf_get_current_pid_tgid() >> 32;
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->role = role;
	e->protocol = protocol;
	if (role == DT_ROLE_SERVER) {
		e->port = ends->lport;
		e->peer_pid = dt_local_client_of(ends->family, ends->laddr, ends->raddr, ends->lport, ends->rport);
	} else {
		e->port = ends->rport;
		e->peer_pid = 0;
	}
	st->protocol = protocol;
	/* A client writes its requests; a server reads them. */
	st->request_dir = role == DT_ROLE_CLIENT ? DT_EGRESS : DT_INGRESS;
}

/* Settles the protocol from a chunk's first bytes; false while it cannot tell. */
static __always_inline bool classify(struct l7_sock *st, struct l7_call *call)
{
	const struct l7_bytes *b = call->buf;
	__u32 len = call->len;
	bool egress = call->direction == DT_EGRESS;
	if (http_method_len(b, len)) {
		set_edge(st, call, DT_L7_HTTP, egress ? DT_ROLE_CLIENT : DT_ROLE_SERVER);
		return true;
	}
	if (http_status(b, len)) {
		set_edge(st, call, DT_L7_HTTP, egress ? DT_ROLE_SERVER : DT_ROLE_CLIENT);
		return true;
	}
	if (resp_command(b, len)) {
		set_edge(st, call, DT_L7_REDIS, egress ? DT_ROLE_CLIENT : DT_ROLE_SERVER);
		return true;
	}
	if (len >= 8 && l7_byte(b, 0) == 0) {
		/* PostgreSQL's untyped first messages: the start-up, an SSL or GSS request, a cancel. */
		__u8 h[8];
		for (int i = 0; i < 8; i++)
			h[i] = l7_byte(b, i);
		__u32 length = pg_be32(h), code = pg_be32(&h[4]);
		if ((code == PG_CODE_PROTOCOL_3 && length == call->size && length > 8 && length <= 10000) ||
		    ((code == PG_CODE_SSL || code == PG_CODE_GSSENC) && length == 8 && call->size == 8) ||
		    (code == PG_CODE_CANCEL && length == 16 && call->size == 16)) {
			set_edge(st, call, DT_L7_POSTGRES, egress ? DT_ROLE_CLIENT : DT_ROLE_SERVER);
			st->pg.dir[0].special = 1;
			return true;
		}
	}
	/* A PostgreSQL query on a connection older than the agent (before MySQL's looser test). */
	if (pg_frontend_call(st, b, (__u64)len << 32 | call->size)) {
		set_edge(st, call, DT_L7_POSTGRES, egress ? DT_ROLE_CLIENT : DT_ROLE_SERVER);
		return true;
	}
	if (len >= 5) {
		__u32 plen = mysql_length(b->b);
		__u8 seq = l7_byte(b, 3), first = l7_byte(b, 4);
		/* The server's greeting: protocol version 10, alone in its call. */
		if (seq == 0 && first == 0x0a && plen + 4 == call->size && plen > 32 && plen < 1024) {
			set_edge(st, call, DT_L7_MYSQL, egress ? DT_ROLE_SERVER : DT_ROLE_CLIENT);
			st->phase = L7_AUTH;
			return true;
		}
		/* A command packet alone in its call (a connection older than the agent). */
		if (seq == 0 && plen + 4 == call->size && mysql_command(first)) {
			set_edge(st, call, DT_L7_MYSQL, egress ? DT_ROLE_CLIENT : DT_ROLE_SERVER);
			return true;
		}
	}
	if (len == 4 && call->size == 4) {
		/* A MySQL packet's header read alone: remember it for the next chunk. */
		__builtin_memcpy(st->mysql_stash, b->b, 4);
		st->mysql_stash_len = 4;
		st->mysql_stash_dir = call->direction;
		return false;
	}
	if (st->mysql_stash_len == 4 && st->mysql_stash_dir == call->direction && len >= 1) {
		st->mysql_stash_len = 0;
		__u32 plen = mysql_length(st->mysql_stash);
		if (st->mysql_stash[3] == 0 && plen == call->size && mysql_command(l7_byte(b, 0))) {
			set_edge(st, call, DT_L7_MYSQL, egress ? DT_ROLE_CLIENT : DT_ROLE_SERVER);
			st->mysql_stash_len = 4; /* the command's header: account_mysql reads it */
			return true;
		}
	}
	return false;
}

/* -- HTTP --------------------------------------------------------------------------------- */

static __always_inline void ring_push(struct l7_sock *st, const char *method)
{
	__u32 id = st->pushed++;
	if (id - st->popped < L7_PENDING_RING) {
		struct pending_method *slot = &st->ring[id & (L7_PENDING_RING - 1)];
		slot->id = id;
		__builtin_memcpy(slot->method, method, DT_L7_METHOD_LEN);
	}
}

/* The method of the oldest request waiting, into `out` ("" when the ring overflowed). */
static __always_inline void ring_pop(struct l7_sock *st, char out[DT_L7_METHOD_LEN])
{
	__u32 id = st->popped++;
	struct pending_method *slot = &st->ring[id & (L7_PENDING_RING - 1)];
	if (slot->id == id)
		__builtin_memcpy(out, slot->method, DT_L7_METHOD_LEN);
	else
		__builtin_memset(out, 0, DT_L7_METHOD_LEN);
}

static __always_inline int account_http(struct l7_sock *st, struct l7_call *call)
{
	const struct l7_bytes *b = call->buf;
	if (call->direction == st->request_dir) {
		__u32 mlen = http_method_len(b, call->len);
		if (mlen) {
			char method[DT_L7_METHOD_LEN] = {};
			for (int i = 0; i < 8; i++)
				if (i + 1 < mlen)
					method[i] = l7_byte(b, i);
			if (st->phase != L7_REQUEST)
				l7_flush_response_bytes(st);
			if (st->pending >= L7_PENDING_RING) {
				/* Responses we cannot match (coalesced pipelined replies): counted
				 * now, once, rather than held forever. */
				l7_count_unanswered(st, DT_L7_NO_RESPONSE);
			}
			st->pending++;
			ring_push(st, method);
			st->phase = L7_REQUEST;
			st->head_wanted = 1;
		}
		st->req_bytes += call->size;
		st->req_end_ns = call->ts;
		return L7_NOTHING;
	}
	__u16 status = http_status(b, call->len);
	if (!status) {
		st->resp_bytes += call->size;
		return L7_NOTHING;
	}
	if (!st->pending) {
		l7_count_other(st, DT_L7_UNSOLICITED, 1);
		st->resp_bytes += call->size;
		return L7_NOTHING;
	}
	if (status < 200 && status != 101) {
		st->resp_bytes += call->size; /* interim (100 Continue): the final response follows */
		return L7_NOTHING;
	}
	char method[DT_L7_METHOD_LEN];
	ring_pop(st, method);
	st->pending--;
	bool error = status >= 500;
	st->resp_first = call->size;
	l7_count_exchange(st, (struct l7_method *)method, status, error ? DT_L7_ERROR : 0, call->ts);
	st->phase = L7_RESPONSE;
	if (status == 101)
		st->protocol = DT_L7_NONE; /* another protocol from here on */
	return error ? L7_ERROR_DETAIL : L7_NOTHING;
}

/* -- MySQL -------------------------------------------------------------------------------- */

static __always_inline int account_mysql(struct l7_sock *st, struct l7_call *call)
{
	const struct l7_bytes *b = call->buf;
	__u32 len = call->len;
	bool request = call->direction == st->request_dir;
	/* A packet: its 4-byte header (maybe read alone, before) and its first byte. */
	__u8 h[4];
	__u32 off = 0;
	if (st->mysql_stash_len == 4 && st->mysql_stash_dir == call->direction) {
		__builtin_memcpy(h, st->mysql_stash, 4);
	} else {
		if (len == 4 && call->size == 4 && (request ? !st->mysql_left : st->phase == L7_REQUEST || st->phase == L7_AUTH)) {
			/* Its bytes count with the packet's body, which says what the packet is. */
			__builtin_memcpy(st->mysql_stash, b->b, 4);
			st->mysql_stash_len = 4;
			st->mysql_stash_dir = call->direction;
			return L7_NOTHING;
		}
		h[0] = l7_byte(b, 0);
		h[1] = l7_byte(b, 1);
		h[2] = l7_byte(b, 2);
		h[3] = l7_byte(b, 3);
		off = 4;
	}
	bool stashed = off == 0;
	st->mysql_stash_len = 0;
	if (stashed)
		__builtin_memcpy(st->mysql_stash_head, h, 4);
	if (len < off + 1)
		return L7_NOTHING;
	__u8 first = l7_byte(b, off);
	__u32 plen = mysql_length(h);

	if (request) {
		st->req_end_ns = call->ts;
		if (st->mysql_left) { /* the rest of a packet begun before */
			st->mysql_left = call->size >= st->mysql_left ? 0 : st->mysql_left - call->size;
			st->req_bytes += call->size;
			return L7_NOTHING;
		}
		__u32 moved = call->size + (stashed ? 4 : 0);
		st->mysql_left = plen + 4 > moved ? plen + 4 - moved : 0;
		if (st->phase == L7_AUTH) {
			if (!st->pending) {
				/* The handshake response; an SSL request (32 bytes, CLIENT_SSL) means TLS follows. */
				if (plen == 32 && (l7_byte(b, off + 1) & 0x08)) {
					st->protocol = DT_L7_NONE;
					return L7_NOTHING;
				}
				__builtin_memset(st->method, 0, DT_L7_METHOD_LEN);
				st->method[0] = 2; /* LOGIN (see deetune.accounting) */
				st->pending = 1;
			}
			st->req_bytes += moved;
			return L7_NOTHING;
		}
		if (h[3] != 0 || !mysql_command(first)) {
			st->req_bytes += moved; /* more of a command (LOCAL INFILE data, …) */
			return L7_NOTHING;
		}
		if (st->pending)
			l7_count_exchange(st, (struct l7_method *)st->method, 0, DT_L7_NO_RESPONSE, call->ts);
		else
			l7_flush_response_bytes(st);
		__builtin_memset(st->method, 0, DT_L7_METHOD_LEN);
		st->method[0] = 1;
		st->method[1] = first;
		st->req_bytes += moved;
		st->head_wanted = 1;
		st->head_stashed = stashed;
		if (mysql_expects_response(first)) {
			st->pending = 1;
			st->phase = L7_REQUEST;
		} else {
			l7_count_exchange(st, (struct l7_method *)st->method, 0, L7_NO_LATENCY, call->ts);
			st->phase = L7_IDLE;
		}
		return L7_NOTHING;
	}
	if (!st->pending) {
		st->resp_bytes += call->size;
		return L7_NOTHING;
	}
	/* The first packet of the response: OK 0x00, ERR 0xff, EOF 0xfe, else a result set. */
	bool login = st->method[0] == 2 || (st->method[0] == 1 && st->method[1] == 0x11); /* LOGIN, CHANGE_USER */
	if (login && first != 0x00 && first != 0xff) {
		st->resp_bytes += call->size; /* auth switch or more data: the answer follows */
		return L7_NOTHING;
	}
	bool error = first == 0xff;
	st->pending = 0;
	l7_count_exchange(st, (struct l7_method *)st->method, 0, error ? DT_L7_ERROR : 0, call->ts);
	st->resp_bytes = call->size + (stashed ? 4 : 0);
	st->phase = L7_RESPONSE;
	return error ? L7_ERROR_DETAIL : L7_NOTHING;
}

/* -- Redis (RESP) --------------------------------------------------------------------------- */


/* The parse of one call.  What changes from byte to byte lives in the socket's
 * storage (struct resp_scan), not on the stack: the verifier tracks stack
 * values exactly and would walk every position apart. */
struct resp_walk {
	struct l7_sock *st;
	struct resp_parser *p;
	struct resp_scan *scan;
	const struct l7_bytes *buf;
	__u32 len;         /* bytes copied (the window) */
	__u32 size;        /* bytes the call moved */
	__u64 ts;
	__u8 request;
};

/* A reply ended (outcome: bit 0 an error, bit 1 a push): the oldest command waiting
 * is answered. */
__attribute__((noinline)) int l7_redis_reply(struct l7_sock *st, __u32 outcome, __u64 now)
{
	if (!st)
		return 0;
	if ((outcome & 2) || !st->pending)
		return l7_count_other(st, DT_L7_UNSOLICITED, 1);
	struct l7_method method;
	ring_pop(st, method.name);
	st->pending--;
	l7_count_exchange(st, &method, 0, (outcome & 1) ? DT_L7_ERROR : 0, now);
	st->scan.errors += outcome & 1;
	return 0;
}

/* An element ended at the current depth: close the aggregates it completes,
 * and the message when it was the outermost (recorded, counted after the round). */
static __always_inline void resp_element_done(struct resp_walk *w)
{
	struct resp_parser *p = w->p;
	bool message = false;
	for (int i = 0; i < L7_RESP_DEPTH; i++) {
		if (!p->depth) {
			message = true;
			break;
		}
		__u32 d = (p->depth - 1) & (L7_RESP_DEPTH - 1);
		if (p->left[d] > 1) {
			p->left[d]--;
			break;
		}
		/* The aggregate is complete: it is an element of its parent (an attribute is not). */
		p->depth--;
		if (p->attrs & (1 << d)) {
			p->attrs &= ~(1 << d);
			break;
		}
	}
	if (!message)
		return;
	if (!w->request)
		l7_redis_reply(w->st, p->error | (p->push << 1), w->ts);
	p->error = 0;
	p->push = 0;
}

/* A command began (an array at depth 0, or an inline command): its name follows. */
static __always_inline void resp_command_begins(struct resp_walk *w)
{
	struct l7_sock *st = w->st;
	if (st->phase != L7_REQUEST)
		l7_flush_response_bytes(st);
	st->pending++;
	st->phase = L7_REQUEST;
	char none[DT_L7_METHOD_LEN] = {};
	ring_push(st, none);
}

/* One more byte of the name of the command last pushed (the bytes are read one
 * per step: a loop over them would multiply the paths the verifier walks); user
 * space upper-cases it. */
static __always_inline void resp_name_byte(struct resp_walk *w, __u8 c)
{
	struct l7_sock *st = w->st;
	struct resp_parser *p = w->p;
	__u32 id = st->pushed - 1;
	if (p->name_len < DT_L7_METHOD_LEN - 1 && id - st->popped < L7_PENDING_RING)
		st->ring[id & (L7_PENDING_RING - 1)].method[p->name_len & (DT_L7_METHOD_LEN - 1)] = c;
	p->name_len++;
}

/* One byte (or one jump over bulk data): a bpf_loop callback; 1 stops. */
static long resp_step(__u32 index, void *ctx)
{
	struct resp_walk *w = ctx;
	struct resp_parser *p = w->p;
	struct resp_scan *scan = w->scan;
	if (p->skip && p->state != RP_NAME) {
		__u32 left = w->size - scan->pos; /* beyond the window too: bulk data is skipped, not read */
		if (p->skip > left) {
			p->skip -= left;
			scan->pos = w->size;
			scan->stop = 1;
			return 1;
		}
		scan->pos += p->skip;
		p->skip = 0;
		resp_element_done(w);
		return 0;
	}
	if (scan->pos >= w->len) {
		if (scan->pos < w->size)
			p->lost = 1; /* the call goes on beyond what was copied */
		scan->stop = 1;
		return 1;
	}
	__u8 c = l7_byte(w->buf, scan->pos);
	scan->pos++;
	if (p->state == RP_TYPE) {
		p->type = c;
		p->number = 0;
		p->negative = 0;
		if (w->request && p->depth == 0) {
			resp_command_begins(w);
			p->name_len = 0;
			if (c != '*') {
				/* An inline command: a line of words, the first its name. */
				if (c == '\n') {
					resp_element_done(w);
					return 0;
				}
				p->state = RP_INLINE;
				if (c != ' ' && c != '\r')
					resp_name_byte(w, c);
				else
					p->state = RP_LINE;
				return 0;
			}
			p->name_next = 1;
		}
		if (c == '*' || c == '%' || c == '~' || c == '>' || c == '|' || c == '$' || c == '!' || c == '=') {
			p->state = RP_NUMBER;
		} else if (c == '+' || c == ':' || c == ',' || c == '#' || c == '_' || c == '(' || c == '-') {
			p->state = RP_LINE;
		} else {
			p->lost = 1;
			scan->stop = 1;
			return 1;
		}
		if (c == '-' || c == '!')
			p->error = 1;
		if (c == '>' && p->depth == 0)
			p->push = 1;
		return 0;
	}
	if (p->state == RP_LINE || p->state == RP_INLINE) {
		if (c == '\n') {
			p->state = RP_TYPE;
			resp_element_done(w);
		} else if (p->state == RP_INLINE) {
			if (c == ' ' || c == '\r')
				p->state = RP_LINE;
			else
				resp_name_byte(w, c);
		}
		return 0;
	}
	if (p->state == RP_NAME) {
		resp_name_byte(w, c);
		if (--p->name_left == 0)
			p->state = RP_TYPE; /* the rest of the bulk string is skipped */
		return 0;
	}
	/* RP_NUMBER: digits up to CR LF. */
	if (c >= '0' && c <= '9') {
		p->number = p->number * 10 + (c - '0');
		return 0;
	}
	if (c == '-') {
		p->negative = 1;
		return 0;
	}
	if (c == '\r')
		return 0;
	if (c != '\n') { /* '?': a RESP3 streamed aggregate or string, not followed */
		p->lost = 1;
		scan->stop = 1;
		return 1;
	}
	p->state = RP_TYPE;
	__u8 t = p->type;
	__u32 n = p->number;
	if (t == '$' || t == '!' || t == '=') {
		if (p->negative) { /* a null bulk string */
			resp_element_done(w);
			return 0;
		}
		p->skip = n + 2;
		if (w->request && p->name_next && p->depth == 1) {
			p->name_next = 0;
			p->name_left = n < DT_L7_METHOD_LEN - 1 ? n : DT_L7_METHOD_LEN - 1;
			p->skip -= p->name_left;
			if (p->name_left)
				p->state = RP_NAME;
		}
		return 0;
	}
	/* An aggregate: its elements follow (maps and attributes count keys and values). */
	if (t == '%' || t == '|')
		n *= 2;
	if (p->negative || n == 0) {
		resp_element_done(w);
		return 0;
	}
	if (p->depth >= L7_RESP_DEPTH) {
		p->lost = 1;
		scan->stop = 1;
		return 1;
	}
	__u32 d = p->depth & (L7_RESP_DEPTH - 1);
	p->left[d] = n;
	if (t == '|')
		p->attrs |= 1 << d;
	p->depth++;
	return 0;
}

static __always_inline void resp_reset(struct resp_parser *p)
{
	__builtin_memset(p, 0, sizeof(*p));
}

static __always_inline int account_redis(struct l7_sock *st, struct l7_call *call)
{
	struct resp_walk walk, *w = &walk; /* on the stack: bpf_loop takes its context there */
	bool request = call->direction == st->request_dir;
	struct resp_parser *p = &st->rp[request ? 0 : 1];
	if (request) {
		st->req_end_ns = call->ts;
		st->req_bytes += call->size;
		st->head_wanted = 1; /* a pipeline's error may be in any chunk: keep the latest */
		struct resp_parser *replies = &st->rp[1];
		if (replies->lost) {
			/* The replies were lost track of; this command was sent after them. */
			l7_count_unanswered(st, DT_L7_STATUS_UNKNOWN);
			resp_reset(replies);
		}
	}
	if (p->lost) {
		/* Start again where a chunk opens a message. */
		__u8 c = call->len ? l7_byte(call->buf, 0) : 0;
		if (!request || c != '*') {
			l7_count_other(st, DT_L7_UNPARSED, 1);
			if (!request)
				st->resp_bytes += call->size;
			return L7_NOTHING;
		}
		resp_reset(p);
	}
	struct resp_scan *scan = &st->scan;
	__builtin_memset(scan, 0, sizeof(*scan));
	w->st = st;
	w->p = p;
	w->scan = scan;
	w->buf = call->buf;
	w->len = call->len < L7_PARSE_WINDOW ? call->len : L7_PARSE_WINDOW;
	w->size = call->size;
	w->ts = call->ts;
	w->request = request;
	bpf_loop(L7_PARSE_WINDOW, resp_step, w, 0);
	if (!p->lost && scan->pos < w->size && !p->skip)
		p->lost = 1; /* the steps ran out */
	if (p->lost)
		l7_count_other(st, DT_L7_UNPARSED, 1);
	if (request)
		return L7_NOTHING;
	st->resp_bytes += call->size; /* after the replies it completed: theirs is the key flushed next */
	return scan->errors ? L7_ERROR_DETAIL : L7_NOTHING;
}


/* -- the entry points ------------------------------------------------------------------------ */

/* Settle a socket's protocol from a call's first bytes (at most L7_HEAD_BYTES of them are
 * looked at): true once known.  A caller that calls it before l7_account can copy what the
 * protocol needs of the same call (l7_bytes_wanted) in between.  Same arguments as l7_account. */
__attribute__((noinline)) int l7_classify_call(struct l7_sock *st, const struct l7_bytes *buf, __u64 lengths,
					       __u64 how)
{
	if (!st || !buf || st->protocol != DT_L7_UNKNOWN || !(lengths >> 32))
		return 0;
	struct l7_call call = {
		.buf = buf, .len = lengths >> 32, .size = (__u32)lengths, .ts = st->now, .direction = how & 1,
	};
	if (!classify(st, &call)) {
		if (++st->tries >= L7_CLASSIFY_TRIES)
			st->protocol = DT_L7_NONE;
		return 0;
	}
	st->classified_now = 1;
	return 1;
}

/* Count what this call does to the socket's exchanges (global: its own frame, checked once).
 * `lengths`: bytes copied << 32 | bytes moved; `how`: the direction | keep requests' heads << 1;
 * the time is st->now, set by the caller. */
__attribute__((noinline)) int l7_account(struct l7_sock *st, const struct l7_bytes *buf, __u64 lengths, __u64 how)
{
	if (!st || !buf || st->protocol == DT_L7_NONE || !(__u32)lengths)
		return L7_NOTHING;
	struct l7_call local = {
		.buf = buf, .len = lengths >> 32, .size = (__u32)lengths, .ts = st->now,
		.direction = how & 1, .save_head = (how >> 1) & 1,
	}, *call = &local;
	if (st->protocol == DT_L7_UNKNOWN || st->classified_now) {
		/* The caller classifies first (l7_classify) and copies what the protocol needs. */
		if (!st->classified_now && !l7_classify_call(st, buf, lengths, how))
			return L7_NOTHING;
		st->classified_now = 0;
		if (st->protocol == DT_L7_MYSQL && st->phase == L7_AUTH)
			return L7_NOTHING; /* the greeting itself */
	}
	int action;
	st->head_wanted = 0;
	if (st->protocol == DT_L7_HTTP)
		action = account_http(st, call);
	else if (st->protocol == DT_L7_MYSQL)
		action = account_mysql(st, call);
	else if (st->protocol == DT_L7_POSTGRES)
		action = account_postgres(st, call);
	else
		action = account_redis(st, call);
	/* Response bytes go to their exchange's key as they come: an edge's bytes are exact at
	 * every read, also while a keep-alive connection waits for its next request. */
	if (st->resp_bytes)
		l7_flush_response_bytes(st);
	/* Each request's head is kept (the overload sampling may leave its response out, or
	 * have left it out): an error's detail.  Its copy is 32 words, cheap beside the call. */
	if (call->save_head && st->head_wanted == 2) {
		/* After the head kept (PostgreSQL: account_postgres), up to L7_SAVED_HEAD in all. */
		if (st->head_len < L7_SAVED_HEAD_SHORT) {
			__u32 at = st->head_len & (L7_SAVED_HEAD_SHORT - 1);
			__u32 n = call->len < L7_SAVED_HEAD_SHORT ? call->len : L7_SAVED_HEAD_SHORT;
			if (bpf_probe_read_kernel(st->head + at, n & (L7_SAVED_HEAD_SHORT * 2 - 1), call->buf->b) == 0)
				st->head_len = at + n;
		}
	} else if (call->save_head && st->head_wanted) {
		if (st->head_stashed) { /* the packet's header, read alone before, comes first */
			__builtin_memcpy(st->head, st->mysql_stash_head, 4);
			__builtin_memcpy(st->head + 4, call->buf->b, L7_SAVED_HEAD_SHORT - 4);
			st->head_len = call->len < L7_SAVED_HEAD_SHORT - 4 ? call->len + 4 : L7_SAVED_HEAD_SHORT;
		} else if (st->protocol == DT_L7_REDIS) { /* its calls are copied up to L7_PARSE_WINDOW */
			__builtin_memcpy(st->head, call->buf->b, L7_SAVED_HEAD);
			st->head_len = call->len < L7_SAVED_HEAD ? call->len : L7_SAVED_HEAD;
		} else {
			__builtin_memcpy(st->head, call->buf->b, L7_SAVED_HEAD_SHORT);
			st->head_len = call->len < L7_SAVED_HEAD_SHORT ? call->len : L7_SAVED_HEAD_SHORT;
		}
		st->head_ns = call->ts;
		st->head_stashed = 0;
	}
	if (action != L7_NOTHING && !call->save_head)
		return L7_NOTHING;
	return action;
}

/* Before a socket is classified, its includer notes its ends (once). */
static __always_inline void l7_note_endpoints(struct l7_sock *st, struct sock *sk)
{
	if (st->protocol != DT_L7_UNKNOWN || st->ends.set)
		return;
	struct l7_endpoints *ends = &st->ends;
	dt_sock_ports(sk, &ends->lport, &ends->rport);
	dt_sock_addresses(sk, &ends->family, ends->laddr, ends->raddr);
	ends->set = 1;
}

/* The connection ended: requests never answered are counted as such. */
static __always_inline void l7_close(struct l7_sock *st, __u64 now)
{
	if (st->protocol == DT_L7_UNKNOWN || st->protocol == DT_L7_NONE) {
		if (st->protocol == DT_L7_NONE && st->edge.protocol)
			l7_flush_response_bytes(st); /* upgraded (101): its last HTTP response */
		return;
	}
	l7_flush_response_bytes(st);
	if (st->protocol == DT_L7_POSTGRES) /* and the groups no Sync closed */
		st->pending += st->pg.execs + (st->pg.open ? 1 : 0);
	l7_count_unanswered(st, DT_L7_NO_RESPONSE);
}

#endif /* __DEETUNE_L7_BPF_H__ */
