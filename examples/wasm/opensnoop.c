// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * opensnoop.wasm: a wasm-bpf guest tracing openat(2) in every process started
 * with `bpftime start` on the same store (opensnoop.bpf.c, embedded).
 *
 *   bpftime wasm run opensnoop.wasm [-p PID] [-x MATCH] [-n COUNT]
 *
 * Prints a header, then one line per open: PID COMM FD ERR PATH.
 *   -p PID    only this process
 *   -x MATCH  exit after the first open whose path contains MATCH
 *   -n COUNT  exit after COUNT opens
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "wasm-bpf.h"
#include "opensnoop.h"
#include "opensnoop.bpf.h" /* opensnoop_bpf_o[], generated */

struct opts {
	const char *match;
	long count;
	long seen;
	int done;
};

static int on_event(void *ctx, void *data, size_t size)
{
	struct opts *o = ctx;
	const struct open_event *e = data;

	if (size < sizeof(*e))
		return 0;
	int fd = e->ret >= 0 ? e->ret : -1;
	int err = e->ret >= 0 ? 0 : -e->ret;
	printf("%-7u %-16.16s %3d %3d %s\n", e->pid, e->comm, fd, err, e->fname);
	o->seen++;
	if ((o->match && strstr(e->fname, o->match)) ||
	    (o->count && o->seen >= o->count)) {
		o->done = 1;
		return 1;
	}
	return 0;
}

int main(int argc, char **argv)
{
	struct opts o = { 0 };
	unsigned int pid = 0;

	for (int i = 1; i + 1 < argc; i += 2) {
		if (!strcmp(argv[i], "-p"))
			pid = (unsigned int)atol(argv[i + 1]);
		else if (!strcmp(argv[i], "-x"))
			o.match = argv[i + 1];
		else if (!strcmp(argv[i], "-n"))
			o.count = atol(argv[i + 1]);
		else {
			fprintf(stderr, "usage: %s [-p PID] [-x MATCH] [-n COUNT]\n", argv[0]);
			return 2;
		}
	}
	bpf_object_skel obj = wasm_load_bpf_object(opensnoop_bpf_o,
						   (int)sizeof(opensnoop_bpf_o));
	if (!obj) {
		fprintf(stderr, "loading the BPF object failed\n");
		return 1;
	}
	if (pid) {
		/* .rodata holds target_tgid, its only variable. */
		unsigned int zero = 0;
		if (bpf_map_update_elem(wasm_bpf_map_fd_by_name(obj, ".rodata"), &zero, &pid, 0)) {
			fprintf(stderr, "setting the pid filter failed\n");
			return 1;
		}
	}
	/* Targets from the section names. */
	const char *progs[] = { "enter_openat", "exit_openat" };
	for (int i = 0; i < 2; i++) {
		int err = wasm_attach_bpf_program(obj, progs[i], NULL);
		if (err) {
			fprintf(stderr, "attaching %s failed: %d\n", progs[i], err);
			return 1;
		}
	}
	printf("%-7s %-16s %3s %3s %s\n", "PID", "COMM", "FD", "ERR", "PATH");
	fflush(stdout);
	int events = wasm_bpf_map_fd_by_name(obj, "events");
	static char buf[sizeof(struct open_event)];
	while (!o.done) {
		int n = bpf_buffer_poll(obj, events, on_event, &o, buf, sizeof(buf), 1000);
		if (n < 0) {
			fprintf(stderr, "poll failed: %d\n", n);
			return 1;
		}
		fflush(stdout);
	}
	wasm_close_bpf_object(obj);
	return 0;
}
