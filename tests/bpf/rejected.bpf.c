// SPDX-License-Identifier: Apache-2.0
/* A program the verifier must reject: it dereferences a number as a pointer. */
#include "common.bpf.h"

SEC("tracepoint/syscalls/sys_enter_getppid")
int derefs_a_scalar(void *ctx)
{
	long *pointer = (long *)(unsigned long)bpf_get_prandom_u32();
	return *pointer;
}
