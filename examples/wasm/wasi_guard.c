// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * wasi_guard.wasm: a wasm-bpf guest that attaches a BPF program to its own
 * WASI path_open calls (wasi_guard.bpf.c, embedded), then opens files.
 *
 *   bpftime wasm run --dir HOSTDIR::/data wasi_guard.wasm DENY FILE...
 *
 * DENY is a path as path_open sees it (relative to the preopened directory,
 * e.g. "secret.txt"); FILEs are guest paths (e.g. /data/secret.txt). Output:
 *   open FILE: ok | open FILE: denied (EACCES) | open FILE: error N
 *   opens N denied M
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include "wasm-bpf.h"
#include "wasi_guard.bpf.h" /* wasi_guard_bpf_o[], generated */

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: %s DENY FILE...\n", argv[0]);
		return 2;
	}
	bpf_object_skel obj = wasm_load_bpf_object(wasi_guard_bpf_o,
						   (int)sizeof(wasi_guard_bpf_o));
	if (!obj) {
		fprintf(stderr, "loading the BPF object failed\n");
		return 1;
	}
	char name[64] = { 0 };
	strncpy(name, argv[1], sizeof(name) - 1);
	unsigned int zero = 0;
	if (bpf_map_update_elem(wasm_bpf_map_fd_by_name(obj, "deny"), &zero, name, 0)) {
		fprintf(stderr, "setting the denied path failed\n");
		return 1;
	}
	/* No target: it comes from the section name, "uprobe/wasi:path_open". */
	int err = wasm_attach_bpf_program(obj, "guard_open", NULL);
	if (err) {
		fprintf(stderr, "attach failed: %d\n", err);
		return 1;
	}
	for (int i = 2; i < argc; i++) {
		FILE *f = fopen(argv[i], "r");
		if (f) {
			printf("open %s: ok\n", argv[i]);
			fclose(f);
		} else if (errno == EACCES) {
			printf("open %s: denied (EACCES)\n", argv[i]);
		} else {
			printf("open %s: error %d\n", argv[i], errno);
		}
	}
	int counts = wasm_bpf_map_fd_by_name(obj, "counts");
	unsigned long long opens = 0, denied = 0;
	unsigned int one = 1;
	bpf_map_lookup_elem(counts, &zero, &opens);
	bpf_map_lookup_elem(counts, &one, &denied);
	printf("opens %llu denied %llu\n", opens, denied);
	wasm_close_bpf_object(obj);
	return 0;
}
