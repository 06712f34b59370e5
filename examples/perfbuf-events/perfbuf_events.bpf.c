// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * perfbuf-events: one event per call of a uprobed function, sent with
 * bpf_perf_event_output to the current CPU's perf buffer
 * (BPF_MAP_TYPE_PERF_EVENT_ARRAY of PERF_COUNT_SW_BPF_OUTPUT events).
 *
 * Same events as ringbuf-events (pid, tid, first argument, sequence number);
 * outputs that fail are counted in .bss. vmlinux.h-free and CO-RE-free.
 */
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#include "event.h"

struct {
	__uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
} events SEC(".maps");

const volatile __u32 target_pid = 0;

__u64 seq = 0;
__u64 dropped = 0;

SEC("uprobe")
int on_call(struct pt_regs *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tgid = id >> 32;
	struct event e;

	if (target_pid && tgid != target_pid)
		return 0;
	e.pid = tgid;
	e.tid = (__u32)id;
	e.arg = PT_REGS_PARM1(ctx);
	e.seq = __sync_fetch_and_add(&seq, 1);
	if (bpf_perf_event_output(ctx, &events, BPF_F_CURRENT_CPU, &e, sizeof(e)))
		__sync_fetch_and_add(&dropped, 1);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
