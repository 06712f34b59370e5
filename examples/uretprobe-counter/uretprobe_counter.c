// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * uretprobe-counter: libbpf loader for uretprobe_counter.bpf.c.
 *
 *   uretprobe-counter [-v] [-e] [-r] [-i | -t] [-o VALUE] [-c COOKIE] [-p PID] [-s MS]
 *                     [-n N | -d SECONDS] BINARY FUNCTION[+OFFSET]
 *
 *   -e        attach the uprobe program      } neither: both
 *   -r        attach the uretprobe program   }
 *   -i        the info programs: record bpf_get_attach_cookie and bpf_get_func_ip
 *   -t        the trap programs: count, then read memory at the argument / return value
 *             without bpf_probe_read_user (the kernel refuses to load them)
 *   -o VALUE  the uprobe program calls bpf_override_return(ctx, VALUE)
 *   -c COOKIE BPF cookie of both attachments
 *   -p PID    only process PID (perf_event_open pid filter)
 *   -s MS     settle MS milliseconds after attaching before printing "attached" (default 200;
 *             see examples/uprobe-counter/README.md for why the kernel needs it)
 *   -n N      wait until N events were counted (entries, or returns with -r alone; 30 s
 *             timeout), then 100 ms more
 *   -d SECS   wait SECS seconds
 *   default   wait for SIGINT or SIGTERM
 *
 * Then prints
 *   entries <n>
 *   returns <n>
 *   ret_sum <sum of the return values (64-bit wrap-around)>
 * and with -i: entry_cookie, entry_ip, return_cookie, return_ip (hex addresses).
 *
 * FUNCTION+OFFSET probes OFFSET bytes into FUNCTION (libbpf adds it to the symbol's offset).
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

#include "uretprobe_counter.skel.h"

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

static void usage(const char *prog)
{
	fprintf(stderr,
		"usage: %s [-v] [-e] [-r] [-i | -t] [-o VALUE] [-c COOKIE] [-p PID] [-s MS]\n"
		"          [-n N | -d SECONDS] BINARY FUNCTION[+OFFSET]\n",
		prog);
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };

	nanosleep(&ts, NULL);
}

/* Sum of a one-slot per-CPU array over every possible CPU. */
static __u64 percpu_sum(struct bpf_map *map)
{
	int n = libbpf_num_possible_cpus(), i;
	__u32 zero = 0;
	__u64 sum = 0, *vals;

	if (n <= 0)
		return 0;
	vals = calloc(n, sizeof(*vals));
	if (!vals)
		return 0;
	if (bpf_map_lookup_elem(bpf_map__fd(map), &zero, vals) == 0)
		for (i = 0; i < n; i++)
			sum += vals[i];
	free(vals);
	return sum;
}

int main(int argc, char **argv)
{
	struct uretprobe_counter_bpf *skel;
	struct bpf_link *links[2] = { NULL, NULL };
	bool entry = false, ret = false, info = false, trap = false, override = false;
	long long override_value = 0;
	unsigned long long cookie = 0;
	long settle_ms = 200, wait_n = -1, wait_s = -1, offset = 0;
	int pid = -1, opt, err = 1;
	char *func, *plus, *end;

	while ((opt = getopt(argc, argv, "verito:c:p:s:n:d:h")) != -1) {
		switch (opt) {
		case 'v':
			verbose = true;
			break;
		case 'e':
			entry = true;
			break;
		case 'r':
			ret = true;
			break;
		case 'i':
			info = true;
			break;
		case 't':
			trap = true;
			break;
		case 'o':
			override = true;
			override_value = strtoll(optarg, NULL, 0);
			break;
		case 'c':
			cookie = strtoull(optarg, NULL, 0);
			break;
		case 'p':
			pid = atoi(optarg);
			break;
		case 's':
			settle_ms = atol(optarg);
			break;
		case 'n':
			wait_n = atol(optarg);
			break;
		case 'd':
			wait_s = atol(optarg);
			break;
		default:
			usage(argv[0]);
			return opt == 'h' ? 0 : 2;
		}
	}
	if (argc - optind != 2) {
		usage(argv[0]);
		return 2;
	}
	if (!entry && !ret)
		entry = ret = true;
	func = strdup(argv[optind + 1]);
	plus = func ? strchr(func, '+') : NULL;
	if (plus) {
		*plus = 0;
		offset = strtol(plus + 1, &end, 0);
		if (*end || offset < 0) {
			fprintf(stderr, "bad offset in %s\n", argv[optind + 1]);
			return 2;
		}
	}
	libbpf_set_print(print_fn);
	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);

	skel = uretprobe_counter_bpf__open();
	if (!skel) {
		fprintf(stderr, "failed to open the BPF object\n");
		return 1;
	}
	skel->rodata->override_value = override_value;
	/* Load only what is used: a kernel without a helper refuses the whole object. */
	bpf_program__set_autoload(skel->progs.count_entry, entry && !info && !trap && !override);
	bpf_program__set_autoload(skel->progs.info_entry, entry && info && !override);
	bpf_program__set_autoload(skel->progs.trap_entry, entry && trap && !override);
	bpf_program__set_autoload(skel->progs.override_entry, entry && override);
	bpf_program__set_autoload(skel->progs.count_return, ret && !info && !trap);
	bpf_program__set_autoload(skel->progs.info_return, ret && info);
	bpf_program__set_autoload(skel->progs.trap_return, ret && trap);
	if (uretprobe_counter_bpf__load(skel)) {
		fprintf(stderr, "failed to load the BPF object\n");
		goto out;
	}
	for (int r = 0; r < 2; r++) {
		struct bpf_program *prog;
		LIBBPF_OPTS(bpf_uprobe_opts, uo, .func_name = func, .retprobe = r == 1,
			    .bpf_cookie = cookie);

		if ((r == 0 && !entry) || (r == 1 && !ret))
			continue;
		if (r == 0)
			prog = override ? skel->progs.override_entry
			       : info	 ? skel->progs.info_entry
			       : trap	 ? skel->progs.trap_entry
					 : skel->progs.count_entry;
		else
			prog = info   ? skel->progs.info_return
			       : trap ? skel->progs.trap_return
				      : skel->progs.count_return;
		links[r] = bpf_program__attach_uprobe_opts(prog, pid, argv[optind], offset, &uo);
		if (!links[r]) {
			fprintf(stderr, "failed to attach %s to %s:%s: %s\n",
				bpf_program__name(prog), argv[optind], argv[optind + 1],
				strerror(errno));
			goto out;
		}
	}
	if (settle_ms > 0)
		sleep_ms(settle_ms);
	printf("attached\n");
	fflush(stdout);

	if (wait_n >= 0) {
		double deadline = now_s() + 30;
		struct bpf_map *m = entry ? skel->maps.entries : skel->maps.returns;

		while (!exiting && (long)percpu_sum(m) < wait_n && now_s() < deadline)
			sleep_ms(10);
		sleep_ms(100);
	} else if (wait_s >= 0) {
		double deadline = now_s() + wait_s;

		while (!exiting && now_s() < deadline)
			sleep_ms(10);
	} else {
		while (!exiting)
			pause();
	}

	printf("entries %llu\n", (unsigned long long)percpu_sum(skel->maps.entries));
	printf("returns %llu\n", (unsigned long long)percpu_sum(skel->maps.returns));
	printf("ret_sum %llu\n", (unsigned long long)percpu_sum(skel->maps.ret_sum));
	if (info) {
		printf("entry_cookie %llu\n", (unsigned long long)skel->bss->entry_cookie);
		printf("entry_ip %#llx\n", (unsigned long long)skel->bss->entry_ip);
		printf("return_cookie %llu\n", (unsigned long long)skel->bss->return_cookie);
		printf("return_ip %#llx\n", (unsigned long long)skel->bss->return_ip);
	}
	fflush(stdout);
	err = 0;
out:
	bpf_link__destroy(links[0]);
	bpf_link__destroy(links[1]);
	uretprobe_counter_bpf__destroy(skel);
	free(func);
	return err;
}
