// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * usdt-counter: libbpf loader for usdt_counter.bpf.c.
 *
 *   usdt-counter [-v] [-p PID] BINARY PROVIDER NAME
 *
 * Attaches to the USDT probe PROVIDER:NAME of BINARY (bpf_program__attach_usdt: libbpf finds
 * the probe's notes, its argument specs and its semaphore), prints "attached" after 200 ms,
 * waits for SIGINT or SIGTERM, then prints "hits N" and "arg_sum S".
 */
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <bpf/libbpf.h>

#include "usdt_counter.skel.h"

static volatile sig_atomic_t exiting;
static bool verbose;

static void on_signal(int sig)
{
	(void)sig;
	exiting = 1;
}

static int print_fn(enum libbpf_print_level level, const char *fmt, va_list args)
{
	if (level == LIBBPF_DEBUG && !verbose)
		return 0;
	return vfprintf(stderr, fmt, args);
}

int main(int argc, char **argv)
{
	struct usdt_counter_bpf *skel;
	struct bpf_link *link = NULL;
	int pid = -1, opt, err = 1;
	struct timespec settle = { 0, 200 * 1000 * 1000 };

	while ((opt = getopt(argc, argv, "vp:")) != -1) {
		switch (opt) {
		case 'v':
			verbose = true;
			break;
		case 'p':
			pid = atoi(optarg);
			break;
		default:
			fprintf(stderr, "usage: %s [-v] [-p PID] BINARY PROVIDER NAME\n", argv[0]);
			return 2;
		}
	}
	if (argc - optind != 3) {
		fprintf(stderr, "usage: %s [-v] [-p PID] BINARY PROVIDER NAME\n", argv[0]);
		return 2;
	}
	libbpf_set_print(print_fn);
	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);
	skel = usdt_counter_bpf__open_and_load();
	if (!skel) {
		fprintf(stderr, "failed to load the BPF object\n");
		return 1;
	}
	link = bpf_program__attach_usdt(skel->progs.on_usdt, pid, argv[optind], argv[optind + 1],
					argv[optind + 2], NULL);
	if (!link) {
		fprintf(stderr, "failed to attach to %s:%s in %s: %s\n", argv[optind + 1],
			argv[optind + 2], argv[optind], strerror(errno));
		goto out;
	}
	nanosleep(&settle, NULL);
	printf("attached\n");
	fflush(stdout);
	while (!exiting)
		pause();
	printf("hits %llu\n", (unsigned long long)skel->bss->hits);
	printf("arg_sum %llu\n", (unsigned long long)skel->bss->arg_sum);
	fflush(stdout);
	err = 0;
out:
	bpf_link__destroy(link);
	usdt_counter_bpf__destroy(skel);
	return err;
}
