// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * syscall-trace: syscall tracepoints of one process (or all).
 *
 *  - syscalls:sys_enter_openat / sys_exit_openat: per-path open counts, successes and the
 *    errno sum of failures (the path read with bpf_probe_read_user_str at entry, matched at
 *    exit by thread id);
 *  - raw_syscalls:sys_enter (or the raw tracepoint sys_enter with -r): calls per number;
 *  - inject (loaded only with -i): openat of one path fails with ENOENT without being made
 *    (bpf_override_return; the kernel refuses it in a tracepoint program, bpftime does not);
 *  - getpid_count (loaded only with -g): counts sys_enter_getpid, the benchmark's program;
 *  - enter_write / exit_write (loaded only with -w, with raw_syscalls:sys_enter): the raw
 *    victim's write(1000, "bpftime raw\n", 12) calls, bytes, text and EBADF results.
 *
 * vmlinux.h-free: the contexts are declared as the tracefs format files describe them.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define PATH_LEN 64

/* events/syscalls/sys_enter_<name>/format */
struct sys_enter_ctx {
	unsigned short common_type;
	unsigned char common_flags;
	unsigned char common_preempt_count;
	int common_pid;
	int nr;
	unsigned long args[6];
};

/* events/syscalls/sys_exit_<name>/format */
struct sys_exit_ctx {
	unsigned short common_type;
	unsigned char common_flags;
	unsigned char common_preempt_count;
	int common_pid;
	int nr;
	long ret;
};

/* events/raw_syscalls/sys_enter/format */
struct raw_enter_ctx {
	unsigned short common_type;
	unsigned char common_flags;
	unsigned char common_preempt_count;
	int common_pid;
	long id;
	unsigned long args[6];
};

struct path_key {
	char path[PATH_LEN];
};

struct path_stat {
	__u64 opens;
	__u64 ok;
	__u64 errs;
	__u64 errno_sum;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct path_key);
} pending SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct path_key);
	__type(value, struct path_stat);
} paths SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u64);
} nrs SEC(".maps");

/* .rodata, set by the loader: only this tgid (0 = every process); the path to fail. */
const volatile __u32 target_pid = 0;
const volatile char inject_path[PATH_LEN] = {};

/* .bss */
__u64 openat_enter = 0;
__u64 openat_exit = 0;
__u64 getpid_calls = 0;
/* The raw victim's writes: write(RAW_FD, "bpftime raw\n", 12), which fail with EBADF. */
__u64 raw_write_enter = 0;
__u64 raw_write_bytes = 0;
__u64 raw_write_text = 0;
__u64 raw_write_exit = 0;
__s64 raw_write_ret_sum = 0;

#define RAW_FD 1000

static __always_inline int wanted(void)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;

	return !target_pid || tgid == target_pid;
}

SEC("tracepoint/syscalls/sys_enter_openat")
int enter_openat(struct sys_enter_ctx *ctx)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct path_key k = {};

	if (!wanted())
		return 0;
	__sync_fetch_and_add(&openat_enter, 1);
	bpf_probe_read_user_str(k.path, sizeof(k.path), (const void *)ctx->args[1]);
	bpf_map_update_elem(&pending, &tid, &k, BPF_ANY);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_openat")
int exit_openat(struct sys_exit_ctx *ctx)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct path_stat zero = {}, *st;
	struct path_key *k;

	if (!wanted())
		return 0;
	__sync_fetch_and_add(&openat_exit, 1);
	k = bpf_map_lookup_elem(&pending, &tid);
	if (!k)
		return 0;
	st = bpf_map_lookup_elem(&paths, k);
	if (!st) {
		bpf_map_update_elem(&paths, k, &zero, BPF_NOEXIST);
		st = bpf_map_lookup_elem(&paths, k);
	}
	if (st) {
		__sync_fetch_and_add(&st->opens, 1);
		if (ctx->ret >= 0) {
			__sync_fetch_and_add(&st->ok, 1);
		} else {
			__sync_fetch_and_add(&st->errs, 1);
			__sync_fetch_and_add(&st->errno_sum, -ctx->ret);
		}
	}
	bpf_map_delete_elem(&pending, &tid);
	return 0;
}

static __always_inline void count_nr(__u32 nr)
{
	__u64 one = 1, *v;

	v = bpf_map_lookup_elem(&nrs, &nr);
	if (v)
		__sync_fetch_and_add(v, 1);
	else if (bpf_map_update_elem(&nrs, &nr, &one, BPF_NOEXIST)) {
		v = bpf_map_lookup_elem(&nrs, &nr);
		if (v)
			__sync_fetch_and_add(v, 1);
	}
}

SEC("tp/raw_syscalls/sys_enter")
int raw_enter(struct raw_enter_ctx *ctx)
{
	if (wanted())
		count_nr((__u32)ctx->id);
	return 0;
}

/* The raw tracepoint sys_enter(struct pt_regs *regs, long id). */
SEC("raw_tp/sys_enter")
int raw_tp_enter(struct bpf_raw_tracepoint_args *ctx)
{
	if (wanted())
		count_nr((__u32)ctx->args[1]);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_openat")
int inject(struct sys_enter_ctx *ctx)
{
	char path[PATH_LEN] = {};

	if (!wanted())
		return 0;
	bpf_probe_read_user_str(path, sizeof(path), (const void *)ctx->args[1]);
	for (int i = 0; i < PATH_LEN; i++) {
		if (path[i] != inject_path[i])
			return 0;
		if (!path[i])
			break;
	}
	bpf_override_return((void *)ctx, -2 /* ENOENT */);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_getpid")
int getpid_count(struct sys_enter_ctx *ctx)
{
	__sync_fetch_and_add(&getpid_calls, 1);
	return 0;
}

/* -w: the raw victim's write(RAW_FD, ...) calls, their byte counts and text. */
SEC("tracepoint/syscalls/sys_enter_write")
int enter_write(struct sys_enter_ctx *ctx)
{
	char text[12] = {};

	if (!wanted() || ctx->args[0] != RAW_FD)
		return 0;
	__sync_fetch_and_add(&raw_write_enter, 1);
	__sync_fetch_and_add(&raw_write_bytes, ctx->args[2]);
	if (bpf_probe_read_user(text, sizeof(text), (const void *)ctx->args[1]) == 0 &&
	    text[0] == 'b' && text[8] == 'r' && text[11] == '\n')
		__sync_fetch_and_add(&raw_write_text, 1);
	return 0;
}

/* Only the raw victim's writes fail with EBADF. */
SEC("tracepoint/syscalls/sys_exit_write")
int exit_write(struct sys_exit_ctx *ctx)
{
	if (!wanted() || ctx->ret != -9 /* EBADF */)
		return 0;
	__sync_fetch_and_add(&raw_write_exit, 1);
	__sync_fetch_and_add(&raw_write_ret_sum, ctx->ret);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
