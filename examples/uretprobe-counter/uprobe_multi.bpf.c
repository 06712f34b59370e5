// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * uprobe-multi: one program on many probe points through a BPF_TRACE_UPROBE_MULTI link
 * (kernel 6.6+), each point with its own cookie.
 */
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

__u64 hits = 0;
__u64 cookie_sum = 0;
__u64 rc_sum = 0;

SEC("uprobe")
int on_multi(struct pt_regs *ctx)
{
	__sync_fetch_and_add(&hits, 1);
	__sync_fetch_and_add(&cookie_sum, bpf_get_attach_cookie(ctx));
	__sync_fetch_and_add(&rc_sum, PT_REGS_RC(ctx));
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
