// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * uretprobe-counter: count calls and returns of one user-space function and sum its return
 * values, bpftrace count() style (lookup + increment + update on a per-CPU array).
 *
 * Programs (the loader attaches the ones asked for):
 *   count_entry     uprobe     count()
 *   count_return    uretprobe  count(), sum of PT_REGS_RC
 *   info_entry      uprobe     atomic count, bpf_get_attach_cookie / bpf_get_func_ip into .bss
 *   info_return     uretprobe  atomic count and sum of PT_REGS_RC, cookie / func ip into .bss
 *   override_entry  uprobe     atomic count, then bpf_override_return(ctx, override_value)
 *   trap_entry      uprobe     count(), then reads memory at the first argument directly
 *   trap_return     uretprobe  count(), then reads memory at the return value directly
 *
 * The trap programs dereference a user-space value without bpf_probe_read_user: the kernel's
 * verifier refuses them at load; bpftime checks accesses at run time and stops each run at
 * the read (an integer argument is no address the program may read).
 *
 * vmlinux.h-free and CO-RE-free: needs no kernel BTF.
 */
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

struct counter {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
};

struct counter entries SEC(".maps");
struct counter returns SEC(".maps");
struct counter ret_sum SEC(".maps");

/* .rodata, set by the loader before load */
const volatile __s64 override_value = 0;

/* .bss: what the info programs saw last */
__u64 entry_cookie = 0;
__u64 entry_ip = 0;
__u64 return_cookie = 0;
__u64 return_ip = 0;

static __always_inline void count(void *map, __u64 add)
{
	__u32 zero = 0;
	__u64 *v = bpf_map_lookup_elem(map, &zero);
	__u64 n = v ? *v + add : add;

	bpf_map_update_elem(map, &zero, &n, BPF_ANY);
}

/*
 * The same with an atomic add: exact when threads of one process share a CPU slot (the kernel
 * runs a probe's program with preemption off; a userspace runtime cannot, so two threads can
 * interleave a lookup-then-update on one per-CPU value).
 */
static __always_inline void count_atomic(void *map, __u64 add)
{
	__u32 zero = 0;
	__u64 *v = bpf_map_lookup_elem(map, &zero);

	if (v)
		__sync_fetch_and_add(v, add);
}

SEC("uprobe")
int count_entry(struct pt_regs *ctx)
{
	count(&entries, 1);
	return 0;
}

SEC("uretprobe")
int count_return(struct pt_regs *ctx)
{
	count(&returns, 1);
	count(&ret_sum, PT_REGS_RC(ctx));
	return 0;
}

SEC("uprobe")
int info_entry(struct pt_regs *ctx)
{
	count_atomic(&entries, 1);
	entry_cookie = bpf_get_attach_cookie(ctx);
	entry_ip = bpf_get_func_ip(ctx);
	return 0;
}

SEC("uretprobe")
int info_return(struct pt_regs *ctx)
{
	count_atomic(&returns, 1);
	count_atomic(&ret_sum, PT_REGS_RC(ctx));
	return_cookie = bpf_get_attach_cookie(ctx);
	return_ip = bpf_get_func_ip(ctx);
	return 0;
}

SEC("uprobe")
int override_entry(struct pt_regs *ctx)
{
	count_atomic(&entries, 1);
	bpf_override_return(ctx, override_value);
	return 0;
}

SEC("uprobe")
int trap_entry(struct pt_regs *ctx)
{
	count(&entries, 1);
	count(&ret_sum, *(volatile __u64 *)PT_REGS_PARM1(ctx));
	return 0;
}

SEC("uretprobe")
int trap_return(struct pt_regs *ctx)
{
	count(&returns, 1);
	count(&ret_sum, *(volatile __u64 *)PT_REGS_RC(ctx));
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
