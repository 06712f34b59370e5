// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Maps and programs for the host API tests (wasm-host/tests/wasm_api.rs). */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, __u64);
} hash SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u64);
} array SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_QUEUE);
	__uint(max_entries, 4);
	__type(value, __u32);
} queue SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096 * 4);
} ring SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
} perf SEC(".maps");

const volatile __u64 config = 7;
__u64 counter = 0;

SEC("uprobe")
int probe(void *ctx)
{
	__u64 v = config;
	__sync_fetch_and_add(&counter, 1);
	bpf_ringbuf_output(&ring, &v, sizeof(v), 0);
	bpf_perf_event_output(ctx, &perf, BPF_F_CURRENT_CPU, &v, sizeof(v));
	return 0;
}

SEC("uretprobe")
int retprobe(void *ctx)
{
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_openat")
int tp(void *ctx)
{
	return 0;
}

SEC("raw_tp/sys_exit")
int rawtp(void *ctx)
{
	return 0;
}

SEC("kprobe/do_sys_open")
int kp(void *ctx)
{
	return 0;
}

SEC("socket")
int sock(void *ctx)
{
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
