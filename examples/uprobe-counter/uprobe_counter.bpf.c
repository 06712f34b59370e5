// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * uprobe-counter: count calls of one user-space function per process and
 * sum its first argument.
 *
 * Deliberately vmlinux.h-free and CO-RE-free so it needs no kernel BTF.
 * Helpers used: bpf_map_lookup_elem, bpf_map_update_elem,
 * bpf_get_current_pid_tgid (plus atomic adds in the program itself).
 */
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

/* Per-process call counts: key = tgid, value = number of calls. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u64);
} calls SEC(".maps");

/* Sum of the probed function's first argument (single slot, key 0). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} arg_sum SEC(".maps");

/* .rodata: only count this tgid (0 = all); set by the loader before load. */
const volatile __u32 target_pid = 0;

/* .bss: total number of counted calls, read by the loader via mmap. */
__u64 total_calls = 0;

SEC("uprobe")
int count_calls(struct pt_regs *ctx)
{
	long arg = (long)PT_REGS_PARM1(ctx);
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u32 zero = 0;
	__u64 one = 1;
	__u64 *val;

	if (target_pid && tgid != target_pid)
		return 0;

	val = bpf_map_lookup_elem(&calls, &tgid);
	if (val) {
		__sync_fetch_and_add(val, 1);
	} else if (bpf_map_update_elem(&calls, &tgid, &one, BPF_NOEXIST) != 0) {
		/* Lost a race with another CPU creating the entry: retry. */
		val = bpf_map_lookup_elem(&calls, &tgid);
		if (val)
			__sync_fetch_and_add(val, 1);
	}

	val = bpf_map_lookup_elem(&arg_sum, &zero);
	if (val)
		__sync_fetch_and_add(val, (__u64)arg);

	__sync_fetch_and_add(&total_calls, 1);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
