// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * ringbuf-events: libbpf loader for ringbuf_events.bpf.c.
 *
 *   ringbuf-events [-v] [-o] [-s MS] [-p PID] [-a BASE] [-t POLL_MS] [-n N | -d SECS] BINARY FUNCTION
 *
 * Attaches a uprobe to FUNCTION in BINARY (all processes, or only PID), waits
 * MS milliseconds (default 200), prints "attached", then consumes events with
 * ring_buffer__poll until N events arrived (-n, 30 s timeout), SECS passed
 * (-d) or SIGINT/SIGTERM. Then prints
 *
 *   events <n> lost <l>   (l = reservations that failed because the ring was full)
 *   arg_sum <sum of first arguments>
 *   seq_sum <sum of sequence numbers>
 *   pids <distinct processes>
 *   check ok | check FAILED: <why>
 *
 * With -n N the check expects exactly N events, none lost, sequence numbers
 * 0..N-1 each once and arguments BASE..BASE+N-1 (-a, default 0). -o sends
 * events with bpf_ringbuf_output instead of reserve + submit. -t is the
 * timeout of each ring_buffer__poll (default 100 ms): with a long one, events
 * only arrive in time if the ring buffer's fd wakes epoll.
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

#include "ringbuf_events.skel.h"
#include "stats.h"

#define TIMEOUT_S 30

static volatile sig_atomic_t exiting;
static bool verbose;

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

static int handle_event(void *ctx, void *data, size_t size)
{
	stats_add(ctx, data, size);
	return 0;
}

static void usage(const char *prog)
{
	fprintf(stderr,
		"usage: %s [-v] [-o] [-s MS] [-p PID] [-a BASE] [-t POLL_MS] [-n N | -d SECS] BINARY FUNCTION\n",
		prog);
}

int main(int argc, char **argv)
{
	LIBBPF_OPTS(bpf_uprobe_opts, uopts);
	struct ringbuf_events_bpf *skel = NULL;
	struct ring_buffer *rb = NULL;
	long pid = -1, expected = -1, duration = -1, settle_ms = 200, base = 0, poll_ms = 100;
	bool use_output = false;
	struct stats st = { 0 };
	double deadline;
	int opt, err = 0;

	while ((opt = getopt(argc, argv, "vos:p:a:t:n:d:h")) != -1) {
		switch (opt) {
		case 'v':
			verbose = true;
			break;
		case 'o':
			use_output = true;
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

	skel = ringbuf_events_bpf__open();
	if (!skel) {
		fprintf(stderr, "failed to open BPF skeleton: %s\n", strerror(errno));
		return 1;
	}
	skel->rodata->target_pid = pid > 0 ? (__u32)pid : 0;
	skel->rodata->use_output = use_output;
	err = ringbuf_events_bpf__load(skel);
	if (err) {
		fprintf(stderr, "failed to load BPF skeleton: %s\n", strerror(-err));
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
	rb = ring_buffer__new(bpf_map__fd(skel->maps.events), handle_event, &st, NULL);
	if (!rb) {
		err = -errno;
		fprintf(stderr, "failed to create ring buffer: %s\n", strerror(-err));
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
		err = ring_buffer__poll(rb, (int)poll_ms);
		if (err == -EINTR) {
			err = 0;
			continue;
		}
		if (err < 0) {
			fprintf(stderr, "ring_buffer__poll: %s\n", strerror(-err));
			goto cleanup;
		}
		err = 0;
		if (expected >= 0 && st.events + skel->bss->dropped >= (__u64)expected)
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
	ring_buffer__consume(rb);
	if (stats_report(&st, skel->bss->dropped, expected, base) && !err)
		err = -EINVAL;

cleanup:
	ring_buffer__free(rb);
	ringbuf_events_bpf__destroy(skel);
	free(st.seen);
	return err ? 1 : 0;
bad:
	usage(argv[0]);
	return 2;
}
