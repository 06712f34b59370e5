// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * syscall-trace: libbpf loader for syscall_trace.bpf.c.
 *
 *   syscall-trace [-v] [-p PID] [-i PATH] [-r] [-g] [-w]
 *
 * Attaches the openat tracepoints and raw_syscalls:sys_enter (-r: the raw tracepoint
 * sys_enter instead), for every process or only PID; -i PATH also loads the program that
 * makes openat(PATH) fail with ENOENT; -g attaches only the sys_enter_getpid counter (the
 * benchmark's); -w attaches raw_syscalls:sys_enter and the write tracepoints for
 * syscall-raw-victim (no openat). Prints "attached", then waits for a line on stdin (or EOF, SIGINT, SIGTERM)
 * and prints:
 *
 *   openat_enter N / openat_exit N
 *   path P opens N ok N errs N errno_sum N     (one line per path, sorted)
 *   nr NR calls N                              (one line per system call number, sorted)
 *   getpid_calls N
 *   raw_write enter N bytes N text N exit N ret_sum N
 *
 * Written against libbpf 1.1 (Debian 12).
 */
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "syscall_trace.skel.h"

#define PATH_LEN 64

static bool verbose;

static int libbpf_print_fn(enum libbpf_print_level level, const char *fmt, va_list args)
{
	if (level == LIBBPF_DEBUG && !verbose)
		return 0;
	return vfprintf(stderr, fmt, args);
}

static void on_signal(int sig)
{
	(void)sig;
}

struct path_key {
	char path[PATH_LEN];
};

struct path_stat {
	__u64 opens, ok, errs, errno_sum;
};

struct path_row {
	struct path_key k;
	struct path_stat s;
};

struct nr_row {
	__u32 nr;
	__u64 calls;
};

static int cmp_path(const void *a, const void *b)
{
	return strcmp(((const struct path_row *)a)->k.path, ((const struct path_row *)b)->k.path);
}

static int cmp_nr(const void *a, const void *b)
{
	__u32 x = ((const struct nr_row *)a)->nr, y = ((const struct nr_row *)b)->nr;

	return x < y ? -1 : x > y;
}

static void report(struct syscall_trace_bpf *skel)
{
	struct path_row rows[1024];
	struct nr_row nrs[1024];
	struct path_key pk, *pprev = NULL;
	__u32 nk, *nprev = NULL;
	size_t n = 0, m = 0, i;

	printf("openat_enter %llu\n", (unsigned long long)skel->bss->openat_enter);
	printf("openat_exit %llu\n", (unsigned long long)skel->bss->openat_exit);
	while (n < 1024 && bpf_map_get_next_key(bpf_map__fd(skel->maps.paths), pprev, &rows[n].k) == 0) {
		pk = rows[n].k;
		pprev = &pk;
		if (bpf_map_lookup_elem(bpf_map__fd(skel->maps.paths), &rows[n].k, &rows[n].s) == 0)
			n++;
	}
	qsort(rows, n, sizeof(rows[0]), cmp_path);
	for (i = 0; i < n; i++)
		printf("path %s opens %llu ok %llu errs %llu errno_sum %llu\n", rows[i].k.path,
		       (unsigned long long)rows[i].s.opens, (unsigned long long)rows[i].s.ok,
		       (unsigned long long)rows[i].s.errs, (unsigned long long)rows[i].s.errno_sum);
	while (m < 1024 && bpf_map_get_next_key(bpf_map__fd(skel->maps.nrs), nprev, &nrs[m].nr) == 0) {
		nk = nrs[m].nr;
		nprev = &nk;
		if (bpf_map_lookup_elem(bpf_map__fd(skel->maps.nrs), &nrs[m].nr, &nrs[m].calls) == 0)
			m++;
	}
	qsort(nrs, m, sizeof(nrs[0]), cmp_nr);
	for (i = 0; i < m; i++)
		printf("nr %u calls %llu\n", nrs[i].nr, (unsigned long long)nrs[i].calls);
	printf("getpid_calls %llu\n", (unsigned long long)skel->bss->getpid_calls);
	printf("raw_write enter %llu bytes %llu text %llu exit %llu ret_sum %lld\n",
	       (unsigned long long)skel->bss->raw_write_enter,
	       (unsigned long long)skel->bss->raw_write_bytes,
	       (unsigned long long)skel->bss->raw_write_text,
	       (unsigned long long)skel->bss->raw_write_exit,
	       (long long)skel->bss->raw_write_ret_sum);
	fflush(stdout);
}

int main(int argc, char **argv)
{
	struct syscall_trace_bpf *skel;
	const char *inject = NULL;
	bool raw_tp = false, getpid_only = false, raw_writes = false;
	long pid = 0;
	char line[64];
	int opt, err;

	while ((opt = getopt(argc, argv, "p:i:rgwv")) != -1) {
		switch (opt) {
		case 'p':
			pid = strtol(optarg, NULL, 10);
			break;
		case 'i':
			inject = optarg;
			break;
		case 'r':
			raw_tp = true;
			break;
		case 'g':
			getpid_only = true;
			break;
		case 'w':
			raw_writes = true;
			break;
		case 'v':
			verbose = true;
			break;
		default:
			fprintf(stderr, "usage: %s [-v] [-p PID] [-i PATH] [-r] [-g] [-w]\n", argv[0]);
			return 2;
		}
	}
	if (inject && strlen(inject) >= PATH_LEN) {
		fprintf(stderr, "path too long: %s\n", inject);
		return 2;
	}
	libbpf_set_print(libbpf_print_fn);
	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);

	skel = syscall_trace_bpf__open();
	if (!skel) {
		fprintf(stderr, "failed to open BPF skeleton: %s\n", strerror(errno));
		return 1;
	}
	skel->rodata->target_pid = (__u32)pid;
	if (inject)
		strncpy((char *)skel->rodata->inject_path, inject, PATH_LEN - 1);
	bpf_program__set_autoload(skel->progs.inject, inject != NULL);
	bpf_program__set_autoload(skel->progs.raw_enter, !getpid_only && !raw_tp);
	bpf_program__set_autoload(skel->progs.raw_tp_enter, !getpid_only && raw_tp);
	bpf_program__set_autoload(skel->progs.enter_openat, !getpid_only && !raw_writes);
	bpf_program__set_autoload(skel->progs.exit_openat, !getpid_only && !raw_writes);
	bpf_program__set_autoload(skel->progs.enter_write, raw_writes);
	bpf_program__set_autoload(skel->progs.exit_write, raw_writes);
	bpf_program__set_autoload(skel->progs.getpid_count, getpid_only);

	err = syscall_trace_bpf__load(skel);
	if (err) {
		fprintf(stderr, "failed to load BPF skeleton: %s\n", strerror(-err));
		goto out;
	}
	err = syscall_trace_bpf__attach(skel);
	if (err) {
		fprintf(stderr, "failed to attach: %s\n", strerror(-err));
		goto out;
	}
	printf("attached\n");
	fflush(stdout);
	/* Until a line, EOF or a signal. */
	if (!fgets(line, sizeof(line), stdin) && verbose)
		fprintf(stderr, "stdin closed\n");
	syscall_trace_bpf__detach(skel);
	report(skel);
out:
	syscall_trace_bpf__destroy(skel);
	return err ? 1 : 0;
}
