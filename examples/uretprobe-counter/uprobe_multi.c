// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * uprobe-multi: attaches one program to several offsets of a binary with a single
 * BPF_LINK_CREATE of attach type BPF_TRACE_UPROBE_MULTI (48). libbpf 1.1 predates it, so the
 * link is made with a raw bpf() call; the program is loaded through the skeleton with
 * expected_attach_type 48.
 *
 *   uprobe-multi [-r] [-p PID] BINARY OFFSET:COOKIE...
 *
 *   -r       uretprobes (BPF_F_UPROBE_MULTI_RETURN)
 *   -p PID   only process PID
 *
 * Prints "attached", waits for SIGINT or SIGTERM, then prints "hits N", "cookie_sum S" (the
 * cookies of the points hit) and "rc_sum R" (rax at each hit: return values with -r).
 */
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "uprobe_multi.skel.h"

#define TRACE_UPROBE_MULTI 48
#define F_UPROBE_MULTI_RETURN 1

/* union bpf_attr's link_create with the uprobe_multi member (Linux 6.6 uapi). */
struct link_create_uprobe_multi {
	uint32_t prog_fd;
	uint32_t target_fd;
	uint32_t attach_type;
	uint32_t flags;
	uint64_t path;
	uint64_t offsets;
	uint64_t ref_ctr_offsets;
	uint64_t cookies;
	uint32_t cnt;
	uint32_t multi_flags;
	uint32_t pid;
	uint32_t pad;
};

static volatile sig_atomic_t exiting;

static void on_signal(int sig)
{
	(void)sig;
	exiting = 1;
}

int main(int argc, char **argv)
{
	struct link_create_uprobe_multi attr;
	struct uprobe_multi_bpf *skel;
	uint64_t *offsets, *cookies;
	int pid = 0, ret = 0, opt, n, link_fd, err = 1;
	struct timespec settle = { 0, 200 * 1000 * 1000 };

	while ((opt = getopt(argc, argv, "rp:")) != -1) {
		switch (opt) {
		case 'r':
			ret = 1;
			break;
		case 'p':
			pid = atoi(optarg);
			break;
		default:
			fprintf(stderr, "usage: %s [-r] [-p PID] BINARY OFFSET:COOKIE...\n", argv[0]);
			return 2;
		}
	}
	n = argc - optind - 1;
	if (n < 1) {
		fprintf(stderr, "usage: %s [-r] [-p PID] BINARY OFFSET:COOKIE...\n", argv[0]);
		return 2;
	}
	offsets = calloc(n, sizeof(*offsets));
	cookies = calloc(n, sizeof(*cookies));
	if (!offsets || !cookies)
		return 1;
	for (int i = 0; i < n; i++) {
		char *colon;

		offsets[i] = strtoull(argv[optind + 1 + i], &colon, 0);
		cookies[i] = *colon == ':' ? strtoull(colon + 1, NULL, 0) : 0;
	}
	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);
	skel = uprobe_multi_bpf__open();
	if (!skel)
		return 1;
	bpf_program__set_expected_attach_type(skel->progs.on_multi, TRACE_UPROBE_MULTI);
	if (uprobe_multi_bpf__load(skel)) {
		fprintf(stderr, "failed to load the BPF object\n");
		goto out;
	}
	memset(&attr, 0, sizeof(attr));
	attr.prog_fd = bpf_program__fd(skel->progs.on_multi);
	attr.attach_type = TRACE_UPROBE_MULTI;
	attr.path = (uint64_t)(uintptr_t)argv[optind];
	attr.offsets = (uint64_t)(uintptr_t)offsets;
	attr.cookies = (uint64_t)(uintptr_t)cookies;
	attr.cnt = n;
	attr.multi_flags = ret ? F_UPROBE_MULTI_RETURN : 0;
	attr.pid = pid;
	link_fd = syscall(__NR_bpf, BPF_LINK_CREATE, &attr, sizeof(attr));
	if (link_fd < 0) {
		fprintf(stderr, "BPF_LINK_CREATE(uprobe_multi): %s\n", strerror(errno));
		goto out;
	}
	nanosleep(&settle, NULL);
	printf("attached\n");
	fflush(stdout);
	while (!exiting)
		pause();
	printf("hits %llu\n", (unsigned long long)skel->bss->hits);
	printf("cookie_sum %llu\n", (unsigned long long)skel->bss->cookie_sum);
	printf("rc_sum %llu\n", (unsigned long long)skel->bss->rc_sum);
	fflush(stdout);
	close(link_fd);
	err = 0;
out:
	uprobe_multi_bpf__destroy(skel);
	return err;
}
