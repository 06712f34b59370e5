// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * tailcall: libbpf loader for tailcall.bpf.c.
 *
 *   tailcall [-v] [-c] [-l] [-s MS] [-p PID] [-n HITS] BINARY FUNCTION
 *
 * Loads the skeleton, fills the program arrays (handlers[0..2] = handler0-2,
 * self[0] = chain) with the programs' fds, attaches `dispatch` (or `chain`
 * with -c) as a uprobe on FUNCTION in BINARY (all processes, or only PID),
 * waits MS milliseconds (default 200), prints "attached", waits until HITS
 * probe hits were counted (30 s timeout; default: until SIGINT/SIGTERM), then
 * prints the counts:
 *
 *   handler0 N / handler1 N / handler2 N   calls of each tail-call target
 *   fallthrough N                          tail calls into the empty slot 3
 *   chain N                                runs of `chain` (34 per hit)
 *   dispatch N                             hits of `dispatch`
 *   loops N                                bpf_loop iterations (handler1)
 *   visits N                               bpf_for_each_map_elem visits (handler2)
 *
 * -l ("late"): attach with the handler slots empty, print "attached", read a
 * line on stdin, then fill them and print "filled": calls before that fall
 * through, calls after it reach the handlers (the array is read at call time).
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
#include <time.h>
#include <unistd.h>

#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "tailcall.skel.h"

#define WAIT_TIMEOUT_S 30
#define NR_COUNTS 8

static const char *const count_names[NR_COUNTS] = {
	"handler0", "handler1", "handler2", "fallthrough", "chain", "dispatch", "loops", "visits",
};

static volatile sig_atomic_t exiting;
static bool verbose;

static void sig_handler(int sig)
{
	(void)sig;
	exiting = 1;
}

static int libbpf_print_fn(enum libbpf_print_level level, const char *fmt, va_list args)
{
	if (level == LIBBPF_DEBUG && !verbose)
		return 0;
	return vfprintf(stderr, fmt, args);
}

static void usage(const char *prog)
{
	fprintf(stderr,
		"usage: %s [-v] [-c] [-l] [-s MS] [-p PID] [-n HITS] BINARY FUNCTION\n"
		"  -c       attach `chain` (tail-calls itself) instead of `dispatch`\n"
		"  -l       fill the handler slots only after a line on stdin\n"
		"  -p PID   only probe process PID\n"
		"  -n HITS  wait until HITS probe hits were counted (30 s timeout)\n"
		"  -s MS    settle MS milliseconds before printing \"attached\" (default 200)\n"
		"  -v       libbpf debug output on stderr\n",
		prog);
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int parse_long(const char *s, long min, long *out)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (errno || end == s || *end || v < min)
		return -1;
	*out = v;
	return 0;
}

static int set_slot(struct bpf_map *map, __u32 key, struct bpf_program *prog)
{
	int fd = bpf_program__fd(prog);

	if (bpf_map_update_elem(bpf_map__fd(map), &key, &fd, BPF_ANY)) {
		int err = -errno;

		fprintf(stderr, "failed to set slot %u of %s: %s\n", key, bpf_map__name(map),
			strerror(-err));
		return err;
	}
	return 0;
}

static int fill_handlers(struct tailcall_bpf *skel)
{
	struct bpf_program *progs[3] = {
		skel->progs.handler0, skel->progs.handler1, skel->progs.handler2,
	};
	int err;

	for (__u32 i = 0; i < 3; i++) {
		err = set_slot(skel->maps.handlers, i, progs[i]);
		if (err)
			return err;
	}
	return 0;
}

static int read_count(struct tailcall_bpf *skel, __u32 slot, __u64 *out)
{
	if (bpf_map_lookup_elem(bpf_map__fd(skel->maps.counts), &slot, out))
		return -errno;
	return 0;
}

int main(int argc, char **argv)
{
	LIBBPF_OPTS(bpf_uprobe_opts, uopts);
	struct tailcall_bpf *skel = NULL;
	struct bpf_program *attach;
	struct bpf_link *link = NULL;
	long pid = -1, hits = -1, settle_ms = 200;
	bool use_chain = false, late = false;
	const char *binary, *func;
	int opt, err = 0;

	while ((opt = getopt(argc, argv, "clp:n:s:vh")) != -1) {
		switch (opt) {
		case 'c':
			use_chain = true;
			break;
		case 'l':
			late = true;
			break;
		case 'p':
			if (parse_long(optarg, 1, &pid)) {
				fprintf(stderr, "invalid pid: %s\n", optarg);
				return 2;
			}
			break;
		case 'n':
			if (parse_long(optarg, 0, &hits)) {
				fprintf(stderr, "invalid hit count: %s\n", optarg);
				return 2;
			}
			break;
		case 's':
			if (parse_long(optarg, 0, &settle_ms)) {
				fprintf(stderr, "invalid settle time: %s\n", optarg);
				return 2;
			}
			break;
		case 'v':
			verbose = true;
			break;
		case 'h':
			usage(argv[0]);
			return 0;
		default:
			usage(argv[0]);
			return 2;
		}
	}
	if (argc - optind != 2) {
		usage(argv[0]);
		return 2;
	}
	binary = argv[optind];
	func = argv[optind + 1];

	libbpf_set_print(libbpf_print_fn);
	signal(SIGINT, sig_handler);
	signal(SIGTERM, sig_handler);

	skel = tailcall_bpf__open_and_load();
	if (!skel) {
		err = -errno;
		fprintf(stderr, "failed to open and load BPF skeleton: %s\n", strerror(-err));
		return 1;
	}

	err = set_slot(skel->maps.self, 0, skel->progs.chain);
	if (!err && !late)
		err = fill_handlers(skel);
	if (err)
		goto cleanup;

	attach = use_chain ? skel->progs.chain : skel->progs.dispatch;
	uopts.func_name = func;
	link = bpf_program__attach_uprobe_opts(attach, pid > 0 ? (pid_t)pid : -1, binary, 0,
					       &uopts);
	if (!link) {
		err = -errno;
		fprintf(stderr, "failed to attach uprobe to %s:%s: %s\n", binary, func,
			strerror(-err));
		goto cleanup;
	}

	if (settle_ms > 0) {
		struct timespec ts = { settle_ms / 1000, (settle_ms % 1000) * 1000000L };

		while (nanosleep(&ts, &ts) && errno == EINTR && !exiting)
			;
	}
	printf("attached\n");
	fflush(stdout);

	if (late) {
		char line[64];

		if (!fgets(line, sizeof(line), stdin)) {
			fprintf(stderr, "stdin closed before the slots were to be filled\n");
			err = -EIO;
			goto cleanup;
		}
		err = fill_handlers(skel);
		if (err)
			goto cleanup;
		printf("filled\n");
		fflush(stdout);
	}

	if (hits >= 0) {
		/* A `dispatch` hit counts 1 in its slot; a `chain` hit counts 34 runs. */
		__u32 slot = use_chain ? 4 : 5;
		__u64 want = use_chain ? 34 * (__u64)hits : (__u64)hits;
		double deadline = now_s() + WAIT_TIMEOUT_S;
		struct timespec ts = { 0, 10 * 1000 * 1000L };

		while (!exiting) {
			__u64 n;

			err = read_count(skel, slot, &n);
			if (err) {
				fprintf(stderr, "failed to read counts: %s\n", strerror(-err));
				goto cleanup;
			}
			if (n >= want)
				break;
			if (now_s() >= deadline) {
				fprintf(stderr, "timeout: counted %llu of %llu\n",
					(unsigned long long)n, (unsigned long long)want);
				err = -ETIMEDOUT;
				break;
			}
			nanosleep(&ts, NULL);
		}
	} else {
		while (!exiting)
			pause();
	}

	/* Detach first so the numbers are final. */
	bpf_link__destroy(link);
	link = NULL;
	for (__u32 i = 0; i < NR_COUNTS; i++) {
		__u64 n;
		int rerr = read_count(skel, i, &n);

		if (rerr) {
			fprintf(stderr, "failed to read counts: %s\n", strerror(-rerr));
			err = rerr;
			goto cleanup;
		}
		printf("%s %llu\n", count_names[i], (unsigned long long)n);
	}
	fflush(stdout);

cleanup:
	bpf_link__destroy(link);
	tailcall_bpf__destroy(skel);
	return err ? 1 : 0;
}
