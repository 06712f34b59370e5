// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * uprobe_events.wasm: a wasm-bpf guest. Loads uprobe_events.bpf.o (embedded),
 * attaches count_calls to BINARY:FUNCTION, prints one line per ring buffer
 * record until N records arrived, then the totals from the maps.
 *
 *   bpftime wasm run uprobe_events.wasm BINARY [N] [FUNCTION]
 *
 * (defaults: N = 10, FUNCTION = target_function). Output:
 *   attached count_calls to BINARY:FUNCTION
 *   event pid P arg A count C        (N lines)
 *   pid P calls C                    (per process, from the "calls" hash)
 *   total_calls T arg_sum S          (from ".bss")
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "wasm-bpf.h"
#include "uprobe_events.h"
#include "uprobe_events.bpf.h" /* uprobe_events_bpf_o[], generated */

struct state {
	long want;
	long seen;
};

static int on_event(void *ctx, void *data, size_t size)
{
	struct state *st = ctx;
	const struct call_event *e = data;

	if (size < sizeof(*e)) {
		fprintf(stderr, "short record: %zu bytes\n", size);
		return -1;
	}
	printf("event pid %u arg %lld count %llu\n", e->pid, e->arg, e->count);
	st->seen++;
	return st->seen >= st->want ? 1 : 0;
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: %s BINARY [N] [FUNCTION]\n", argv[0]);
		return 2;
	}
	struct state st = { .want = argc > 2 ? atol(argv[2]) : 10, .seen = 0 };
	const char *func = argc > 3 ? argv[3] : "target_function";
	char target[512];
	snprintf(target, sizeof(target), "%s:%s", argv[1], func);

	bpf_object_skel obj = wasm_load_bpf_object(uprobe_events_bpf_o,
						   (int)sizeof(uprobe_events_bpf_o));
	if (!obj) {
		fprintf(stderr, "loading the BPF object failed\n");
		return 1;
	}
	int err = wasm_attach_bpf_program(obj, "count_calls", target);
	if (err) {
		fprintf(stderr, "attach to %s failed: %d\n", target, err);
		return 1;
	}
	printf("attached count_calls to %s\n", target);
	fflush(stdout);

	int events = wasm_bpf_map_fd_by_name(obj, "events");
	static char buf[256];
	while (st.seen < st.want) {
		int n = bpf_buffer_poll(obj, events, on_event, &st, buf,
					sizeof(buf), 1000);
		if (n < 0) {
			fprintf(stderr, "poll failed: %d\n", n);
			return 1;
		}
		fflush(stdout);
	}

	int calls = wasm_bpf_map_fd_by_name(obj, "calls");
	unsigned int key, next;
	unsigned int *prev = NULL;
	while (bpf_map_get_next_key(calls, prev, &next) == 0) {
		unsigned long long c = 0;
		if (bpf_map_lookup_elem(calls, &next, &c) == 0)
			printf("pid %u calls %llu\n", next, c);
		key = next;
		prev = &key;
	}
	struct { unsigned long long total_calls; long long arg_sum; } bss;
	unsigned int zero = 0;
	int bss_fd = wasm_bpf_map_fd_by_name(obj, ".bss");
	if (bpf_map_lookup_elem(bss_fd, &zero, &bss) == 0)
		printf("total_calls %llu arg_sum %lld\n", bss.total_calls, bss.arg_sum);
	wasm_close_bpf_object(obj);
	return 0;
}
