// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* A 16 MiB ring buffer for the wasm-host benchmark (benches/wasm.rs). */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 16 << 20);
} ring SEC(".maps");

char LICENSE[] SEC("license") = "GPL";
