// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * ringbuf-events: one event per call of a uprobed function, sent through a
 * BPF ring buffer (BPF_MAP_TYPE_RINGBUF).
 *
 * Each event carries the caller's tgid/tid, the function's first argument and
 * a global sequence number, so the loader can check that it received every
 * event exactly once. Reservations that fail (ring full) are counted in .bss.
 * With .rodata use_output set, events go through bpf_ringbuf_output (a copy
 * from the stack) instead of bpf_ringbuf_reserve + bpf_ringbuf_submit.
 *
 * vmlinux.h-free and CO-RE-free, like uprobe-counter.
 */
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#include "event.h"

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

/* .rodata, set by the loader before load. */
const volatile __u32 target_pid = 0;
const volatile __u32 use_output = 0;

/* .bss */
__u64 seq = 0;
__u64 dropped = 0;

SEC("uprobe")
int on_call(struct pt_regs *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tgid = id >> 32;
	struct event *e, local;

	if (target_pid && tgid != target_pid)
		return 0;

	if (use_output) {
		local.pid = tgid;
		local.tid = (__u32)id;
		local.arg = PT_REGS_PARM1(ctx);
		local.seq = __sync_fetch_and_add(&seq, 1);
		if (bpf_ringbuf_output(&events, &local, sizeof(local), 0))
			__sync_fetch_and_add(&dropped, 1);
		return 0;
	}

	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		__sync_fetch_and_add(&dropped, 1);
		return 0;
	}
	e->pid = tgid;
	e->tid = (__u32)id;
	e->arg = PT_REGS_PARM1(ctx);
	e->seq = __sync_fetch_and_add(&seq, 1);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
