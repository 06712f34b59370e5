// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * usdt-counter: count hits of one USDT probe and sum its two arguments (libbpf's USDT
 * support: SEC("usdt"), BPF_USDT, bpf_usdt_arg; uprobes with semaphores underneath).
 */
#include <stdbool.h>
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/usdt.bpf.h>

__u64 hits = 0;
__u64 arg_sum = 0;

SEC("usdt")
int BPF_USDT(on_usdt, long a, long b)
{
	__sync_fetch_and_add(&hits, 1);
	__sync_fetch_and_add(&arg_sum, a + b);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
