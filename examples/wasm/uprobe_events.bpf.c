// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * uprobe_events: count calls of one user-space function per process, sum its
 * first argument, and send one ring buffer record per call. Loaded by the
 * uprobe_events.wasm guest. No vmlinux.h, no CO-RE.
 */
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "uprobe_events.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u64);
} calls SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

/* Only count this tgid (0 = all); the guest may set it through ".rodata". */
const volatile __u32 target_pid = 0;

/* Totals, read by the guest through ".bss". */
struct {
	__u64 calls;
	__s64 arg_sum;
} totals = {};

SEC("uprobe")
int count_calls(struct pt_regs *ctx)
{
	long arg = (long)PT_REGS_PARM1(ctx);
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tgid = id >> 32;
	__u64 one = 1, n = 1;
	__u64 *val;
	struct call_event *e;

	if (target_pid && tgid != target_pid)
		return 0;

	val = bpf_map_lookup_elem(&calls, &tgid);
	if (val) {
		n = __sync_fetch_and_add(val, 1) + 1;
	} else if (bpf_map_update_elem(&calls, &tgid, &one, BPF_NOEXIST) != 0) {
		val = bpf_map_lookup_elem(&calls, &tgid);
		if (val)
			n = __sync_fetch_and_add(val, 1) + 1;
	}
	__sync_fetch_and_add(&totals.calls, 1);
	__sync_fetch_and_add(&totals.arg_sum, arg);

	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e)
		return 0;
	e->pid = tgid;
	e->tid = (__u32)id;
	e->arg = arg;
	e->count = n;
	bpf_ringbuf_submit(e, 0);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
