/* SPDX-License-Identifier: Apache-2.0
 *
 * The record the signals probe writes into its ring buffer, read on the
 * Python side by deetune_signals/records.py (cffi parses this file, minus
 * preprocessor lines, on top of deetune's own deetune.h).  Same rules as
 * deetune.h:
 *   - fixed-width types only (__u8 … __u64, __s32), no pointers, no bitfields;
 *   - sizes and codes as enum constants, not macros;
 *   - the record starts with struct dt_header; fields ordered so that no
 *     implicit padding is needed (the tests compare sizeof with the layout).
 */
#ifndef __DEETUNE_SIGNALS_H__
#define __DEETUNE_SIGNALS_H__

#include "deetune.h"

/* Record kinds of this plugin.  Each probe has its own ring buffer, so the
 * kind only has to be unique within the probe; 100+ keeps it apart from
 * deetune's own kinds anyway. */
enum dt_signal_record_kind {
	DT_REC_SIGNAL = 100,
};

/* The tracepoint's "result" field (enum trace_signal_result in the kernel's
 * include/trace/events/signal.h): what became of the generated signal. */
enum dt_signal_result {
	DT_SIGNAL_DELIVERED = 0,
	DT_SIGNAL_IGNORED = 1,
	DT_SIGNAL_ALREADY_PENDING = 2,
	DT_SIGNAL_OVERFLOW_FAIL = 3,
	DT_SIGNAL_LOSE_INFO = 4,
};

struct dt_signal_record {
	struct dt_header hdr;        /* hdr.pid: the sender's thread-group id (current) */
	__u32 sender_tid;            /* the sending thread */
	__u32 sender_uid;            /* the sender's real uid */
	__u32 target_pid;            /* the target task's pid as the tracepoint reports it */
	__s32 sig;                   /* signal number */
	__s32 code;                  /* si_code: SI_USER (0) for kill(2), SI_KERNEL (0x80) … */
	__s32 err;                   /* the tracepoint's errno field (si_errno) */
	__s32 result;                /* enum dt_signal_result */
	__u32 group;                 /* 1: process-directed (shared pending), 0: thread-directed */
	char sender_comm[DT_COMM_LEN];
	char target_comm[DT_COMM_LEN];
};

#endif /* __DEETUNE_SIGNALS_H__ */
