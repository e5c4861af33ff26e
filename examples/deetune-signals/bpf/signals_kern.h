/* SPDX-License-Identifier: Apache-2.0
 *
 * Kernel types this plugin reads that deetune's trimmed vmlinux.h does not
 * declare.  Same convention as vmlinux.h: only the fields we use, each struct
 * with preserve_access_index so that libbpf relocates the offsets against the
 * running kernel's BTF (CO-RE).  Include it after common.bpf.h (it needs
 * struct trace_entry and pid_t from deetune's vmlinux.h).
 */
#ifndef __DEETUNE_SIGNALS_KERN_H__
#define __DEETUNE_SIGNALS_KERN_H__

/* /sys/kernel/tracing/events/signal/signal_generate/format */
struct trace_event_raw_signal_generate {
	struct trace_entry ent;
	int sig;
	int errno;
	int code;
	char comm[16];
	pid_t pid;
	int group;
	int result;
} __attribute__((preserve_access_index));

#endif /* __DEETUNE_SIGNALS_KERN_H__ */
