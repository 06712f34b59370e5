// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * wasi_guard: runs on the Wasm host's own WASI path_open (attach target
 * "wasi:path_open", here from the section name): counts the guest's opens and
 * denies opening the path stored in the "deny" map.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "wasi-hook.h"

#define NAME_MAX_LEN 64

/* The path to deny (NUL-terminated), written by the guest. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, char[NAME_MAX_LEN]);
} deny SEC(".maps");

/* Key 0: opens seen; key 1: opens denied. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} counts SEC(".maps");

static __always_inline void bump(__u32 k)
{
	__u64 *v = bpf_map_lookup_elem(&counts, &k);
	if (v)
		__sync_fetch_and_add(v, 1);
}

SEC("uprobe/wasi:path_open")
int guard_open(struct wasi_path_open_ctx *ctx)
{
	__u32 zero = 0;
	const char *name = bpf_map_lookup_elem(&deny, &zero);
	int i;

	bump(0);
	if (!name || !name[0])
		return 0;
	for (i = 0; i < NAME_MAX_LEN; i++) {
		if (name[i] != ctx->path[i])
			return 0;
		if (!name[i])
			break;
	}
	bump(1);
	return 1; /* deny */
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
