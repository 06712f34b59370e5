// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * tailcall: a uprobe program that dispatches through a program array.
 *
 *   dispatch  counts the hit, then bpf_tail_call(ctx, &handlers, arg % 4); slots 0-2 hold
 *             handler0-2 (filled by the loader), slot 3 stays empty, so that call falls
 *             through and dispatch counts a fall-through.
 *   handlerK  counts one call in counts[K]; handler1 also runs bpf_loop for arg % 5 + 1
 *             iterations (counted by the callback), handler2 records its argument in the
 *             hash `seen` and visits every element with bpf_for_each_map_elem.
 *   chain     counts one run, then tail-calls itself (slot 0 of `self`): the kernel stops
 *             after 33 tail calls, so one hit counts 34.
 *
 * None of the handlers is attached anywhere: they run only as tail-call targets.
 * vmlinux.h-free and CO-RE-free, like examples/uprobe-counter.
 */
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

struct bpf_map;

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 4);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
} handlers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
} self SEC(".maps");

/*
 * counts[0..2] handlers, [3] fall-throughs, [4] chain runs, [5] dispatch hits,
 * [6] bpf_loop iterations, [7] bpf_for_each_map_elem visits.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 8);
	__type(key, __u32);
	__type(value, __u64);
} counts SEC(".maps");

/* Arguments handler2 has seen (value: how often). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u64);
} seen SEC(".maps");

#define SLOT_FALLTHROUGH 3
#define SLOT_CHAIN 4
#define SLOT_DISPATCH 5
#define SLOT_LOOPS 6
#define SLOT_VISITS 7

static __always_inline void bump(__u32 slot)
{
	__u64 *v = bpf_map_lookup_elem(&counts, &slot);

	if (v)
		__sync_fetch_and_add(v, 1);
}

SEC("uprobe")
int dispatch(struct pt_regs *ctx)
{
	__u32 slot = (__u32)PT_REGS_PARM1(ctx) % 4;

	bump(SLOT_DISPATCH);
	bpf_tail_call(ctx, &handlers, slot);
	bump(SLOT_FALLTHROUGH);
	return 0;
}

SEC("uprobe")
int handler0(struct pt_regs *ctx)
{
	bump(0);
	return 0;
}

struct loop_ctx {
	__u64 iterations;
};

static int count_iteration(__u32 index, void *data)
{
	struct loop_ctx *lc = data;

	lc->iterations++;
	bump(SLOT_LOOPS);
	return 0;
}

SEC("uprobe")
int handler1(struct pt_regs *ctx)
{
	struct loop_ctx lc = {};
	long n = bpf_loop((__u32)PT_REGS_PARM1(ctx) % 5 + 1, count_iteration, &lc, 0);

	/* Counted only if bpf_loop and its callback agree. */
	if (n == (long)lc.iterations)
		bump(1);
	return 0;
}

static long visit(struct bpf_map *map, const void *key, void *value, void *data)
{
	__u64 *visits = data;

	(*visits)++;
	return 0;
}

SEC("uprobe")
int handler2(struct pt_regs *ctx)
{
	__u64 arg = PT_REGS_PARM1(ctx), one = 1, visits = 0;
	__u64 *v;
	__u32 slot = SLOT_VISITS;
	long n;

	if (bpf_map_update_elem(&seen, &arg, &one, BPF_NOEXIST)) {
		v = bpf_map_lookup_elem(&seen, &arg);
		if (v)
			__sync_fetch_and_add(v, 1);
	}
	n = bpf_for_each_map_elem(&seen, visit, &visits, 0);
	v = bpf_map_lookup_elem(&counts, &slot);
	if (v && n == (long)visits)
		__sync_fetch_and_add(v, visits);
	bump(2);
	return 0;
}

SEC("uprobe")
int chain(struct pt_regs *ctx)
{
	bump(SLOT_CHAIN);
	bpf_tail_call(ctx, &self, 0);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
