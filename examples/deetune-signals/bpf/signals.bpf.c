// SPDX-License-Identifier: Apache-2.0
/* Signals: every signal the kernel generates (kill(2), tgkill(2), the kernel's
 * own SIGCHLD, SIGSEGV, SIGPIPE …), with its sender (the current task), its
 * target, and what became of it. */
#include "common.bpf.h"     /* deetune's: vmlinux.h, libbpf helpers, dt_stats, dt_output */
#include "signals_kern.h"   /* this plugin's extra kernel types */
#include "signals.h"        /* this plugin's record layout */

/* Knobs, set by user space between open and load.  0 means "any". */
/* Only this signal number. */
const volatile __u32 targ_sig = 0;
/* Only signals sent by, or sent to, this process (thread-group id). */
const volatile __u32 targ_tgid = 0;

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 18);
} signal_events SEC(".maps");

SEC("tracepoint/signal/signal_generate")
int handle_signal(struct trace_event_raw_signal_generate *ctx)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tgid = pid_tgid >> 32;
	int sig = ctx->sig;
	pid_t target = ctx->pid;

	if (targ_sig && (__u32)sig != targ_sig)
		return 0;
	if (targ_tgid && tgid != targ_tgid && (__u32)target != targ_tgid)
		return 0;

	/* 80 bytes: small enough to build on the stack. */
	struct dt_signal_record rec = {};
	dt_fill_header(&rec.hdr, DT_REC_SIGNAL, tgid);
	rec.sender_tid = (__u32)pid_tgid;
	rec.sender_uid = (__u32)bpf_get_current_uid_gid();
	rec.target_pid = target;
	rec.sig = sig;
	rec.code = ctx->code;
	rec.err = ctx->errno;
	rec.result = ctx->result;
	rec.group = ctx->group != 0;
	bpf_get_current_comm(rec.sender_comm, sizeof(rec.sender_comm));
	/* The verifier refuses memcpy from a ctx pointer plus an offset. */
	bpf_probe_read_kernel(rec.target_comm, sizeof(rec.target_comm), ctx->comm);
	dt_output(&signal_events, &rec, sizeof(rec));
	return 0;
}
