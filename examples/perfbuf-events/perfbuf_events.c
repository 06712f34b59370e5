// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * perfbuf-events: libbpf loader for perfbuf_events.bpf.c.
 *
 *   perfbuf-events [-v] [-s MS] [-p PID] [-a BASE] [-P PAGES] [-t POLL_MS] [-n N | -d SECS] BINARY FUNCTION
 *
 * As ringbuf-events, with a perf buffer of PAGES pages per CPU (default 64)
 * read by perf_buffer__poll. "lost" counts the samples the kernel reported
 * lost (PERF_RECORD_LOST) plus outputs that failed in the program. -t is the
 * timeout of each perf_buffer__poll (default 100 ms).
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

#include "perfbuf_events.skel.h"
#include "stats.h"

#define TIMEOUT_S 30

static volatile sig_atomic_t exiting;
static bool verbose;
static __u64 lost_samples;

static void sig_handler(int sig)
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

static void handle_event(void *ctx, int cpu, void *data, __u32 size)
{
	(void)cpu;
	stats_add(ctx, data, size);
}

static void handle_lost(void *ctx, int cpu, __u64 n)
{
	(void)ctx;
	(void)cpu;
	lost_samples += n;
}

static void usage(const char *prog)
{
	fprintf(stderr,
		"usage: %s [-v] [-s MS] [-p PID] [-a BASE] [-P PAGES] [-t POLL_MS] [-n N | -d SECS] BINARY FUNCTION\n",
		prog);
}

int main(int argc, char **argv)
{
	LIBBPF_OPTS(bpf_uprobe_opts, uopts);
	struct perfbuf_events_bpf *skel = NULL;
	struct perf_buffer *pb = NULL;
	long pid = -1, expected = -1, duration = -1, settle_ms = 200, base = 0, poll_ms = 100, pages = 64;
	struct stats st = { 0 };
	double deadline;
	int opt, err = 0;

	while ((opt = getopt(argc, argv, "vs:p:a:P:t:n:d:h")) != -1) {
		switch (opt) {
		case 'v':
			verbose = true;
			break;
		case 's':
			if (parse_long(optarg, 0, &settle_ms))
				goto bad;
			break;
		case 'p':
			if (parse_long(optarg, 1, &pid))
				goto bad;
			break;
		case 'a':
			if (parse_long(optarg, 0, &base))
				goto bad;
			break;
		case 'P':
			if (parse_long(optarg, 1, &pages))
				goto bad;
			break;
		case 't':
			if (parse_long(optarg, 0, &poll_ms))
				goto bad;
			break;
		case 'n':
			if (parse_long(optarg, 0, &expected))
				goto bad;
			break;
		case 'd':
			if (parse_long(optarg, 0, &duration))
				goto bad;
			break;
		case 'h':
			usage(argv[0]);
			return 0;
		default:
			goto bad;
		}
	}
	if (argc - optind != 2 || (expected >= 0 && duration >= 0))
		goto bad;

	libbpf_set_print(print_fn);
	signal(SIGINT, sig_handler);
	signal(SIGTERM, sig_handler);

	skel = perfbuf_events_bpf__open();
	if (!skel) {
		fprintf(stderr, "failed to open BPF skeleton: %s\n", strerror(errno));
		return 1;
	}
	skel->rodata->target_pid = pid > 0 ? (__u32)pid : 0;
	err = perfbuf_events_bpf__load(skel);
	if (err) {
		fprintf(stderr, "failed to load BPF skeleton: %s\n", strerror(-err));
		goto cleanup;
	}
	pb = perf_buffer__new(bpf_map__fd(skel->maps.events), pages, handle_event, handle_lost,
			      &st, NULL);
	if (!pb) {
		err = -errno;
		fprintf(stderr, "failed to create perf buffer: %s\n", strerror(-err));
		goto cleanup;
	}
	uopts.func_name = argv[optind + 1];
	skel->links.on_call = bpf_program__attach_uprobe_opts(
		skel->progs.on_call, pid > 0 ? (pid_t)pid : -1, argv[optind], 0, &uopts);
	if (!skel->links.on_call) {
		err = -errno;
		fprintf(stderr, "failed to attach uprobe to %s:%s: %s\n", argv[optind],
			argv[optind + 1], strerror(-err));
		goto cleanup;
	}
	if (settle_ms > 0) {
		struct timespec ts = { settle_ms / 1000, (settle_ms % 1000) * 1000000L };

		while (nanosleep(&ts, &ts) && errno == EINTR && !exiting)
			;
	}
	printf("attached\n");
	fflush(stdout);

	deadline = now_s() + (duration >= 0 ? duration : TIMEOUT_S);
	while (!exiting) {
		err = perf_buffer__poll(pb, (int)poll_ms);
		if (err == -EINTR) {
			err = 0;
			continue;
		}
		if (err < 0) {
			fprintf(stderr, "perf_buffer__poll: %s\n", strerror(-err));
			goto cleanup;
		}
		err = 0;
		if (expected >= 0 &&
		    st.events + lost_samples + skel->bss->dropped >= (__u64)expected)
			break;
		if (now_s() >= deadline) {
			if (expected >= 0) {
				fprintf(stderr, "timeout: %llu of %ld events\n",
					(unsigned long long)st.events, expected);
				err = -ETIMEDOUT;
			}
			break;
		}
	}
	bpf_link__destroy(skel->links.on_call);
	skel->links.on_call = NULL;
	perf_buffer__consume(pb);
	if (stats_report(&st, lost_samples + skel->bss->dropped, expected, base) && !err)
		err = -EINVAL;

cleanup:
	perf_buffer__free(pb);
	perfbuf_events_bpf__destroy(skel);
	free(st.seen);
	return err ? 1 : 0;
bad:
	usage(argv[0]);
	return 2;
}
