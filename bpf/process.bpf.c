// SPDX-License-Identifier: Apache-2.0
/* Process lifecycle: exec (with full command line), fork, exit. */
#include "common.bpf.h"

/* Keeps the record type in the object's BTF, where tests check its layout
 * against the Python side (the libbpf-bootstrap idiom). */
const struct dt_process_record *dt_process_record_btf __attribute__((unused));

/* Knobs, set by user space between open and load. */
const volatile bool emit_forks = true;
/* Only report processes in this thread group (0: all). */
const volatile __u32 targ_tgid = 0;

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} process_events SEC(".maps");

/* A process record is 4 KiB: too big for the BPF stack, so it is built in a
 * per-CPU scratch slot and only its used part is copied to the ring. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct dt_process_record);
} process_scratch SEC(".maps");

static __always_inline struct dt_process_record *scratch_record(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&process_scratch, &zero);
}

static __always_inline bool wanted(__u32 tgid)
{
	return (targ_tgid == 0 || targ_tgid == tgid) && dt_task_netns_wanted();
}

static __always_inline void fill_common(struct dt_process_record *rec, __u32 kind,
					 struct task_struct *task)
{
	dt_fill_header(&rec->hdr, kind, BPF_CORE_READ(task, tgid));
	rec->ppid = BPF_CORE_READ(task, real_parent, tgid);
	rec->cgroup_id = bpf_get_current_cgroup_id();
	rec->exit_code = 0;
	rec->cmdline_len = 0;
	rec->cmdline_truncated = 0;
	bpf_get_current_comm(rec->comm, sizeof(rec->comm));
}

static __always_inline void emit(struct dt_process_record *rec)
{
	__u64 size = __builtin_offsetof(struct dt_process_record, cmdline) + rec->cmdline_len;
	if (size > sizeof(*rec))
		size = sizeof(*rec);
	dt_output(&process_events, rec, size);
}

SEC("tracepoint/sched/sched_process_exec")
int handle_exec(struct trace_event_raw_sched_process_exec *ctx)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct dt_process_record *rec = scratch_record();
	if (!rec || !wanted(BPF_CORE_READ(task, tgid)))
		return 0;
	fill_common(rec, DT_REC_EXEC, task);

	unsigned long arg_start = BPF_CORE_READ(task, mm, arg_start);
	unsigned long arg_end = BPF_CORE_READ(task, mm, arg_end);
	unsigned long len = arg_end - arg_start;
	if (len > DT_CMDLINE_MAX) {
		len = DT_CMDLINE_MAX;
		rec->cmdline_truncated = 1;
	}
	/* The masked length keeps the verifier sure of the bound. */
	len &= (DT_CMDLINE_MAX - 1) | DT_CMDLINE_MAX;
	if (len > DT_CMDLINE_MAX)
		return 0;
	if (len > 0 && bpf_probe_read_user(rec->cmdline, len, (void *)arg_start) == 0)
		rec->cmdline_len = len;
	emit(rec);
	return 0;
}

SEC("tp_btf/sched_process_fork")
int BPF_PROG(handle_fork, struct task_struct *parent, struct task_struct *child)
{
	if (!emit_forks)
		return 0;
	/* New threads also fork: report only new thread groups (processes). */
	if (child->pid != child->tgid)
		return 0;
	if (!wanted(parent->tgid) && !wanted(child->tgid))
		return 0;
	struct dt_process_record *rec = scratch_record();
	if (!rec)
		return 0;
	fill_common(rec, DT_REC_FORK, child);
	rec->ppid = parent->tgid;
	emit(rec);
	return 0;
}

SEC("tracepoint/sched/sched_process_exit")
int handle_exit(void *ctx)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	__u32 pid = BPF_CORE_READ(task, pid);
	__u32 tgid = BPF_CORE_READ(task, tgid);
	/* Threads exit too; the process ends when its leader does. */
	if (pid != tgid || !wanted(tgid))
		return 0;
	struct dt_process_record *rec = scratch_record();
	if (!rec)
		return 0;
	fill_common(rec, DT_REC_EXIT, task);
	rec->exit_code = BPF_CORE_READ(task, exit_code);
	emit(rec);
	return 0;
}
