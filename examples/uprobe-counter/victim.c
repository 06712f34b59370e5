// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * victim: a process for uprobe-counter to probe.
 *
 *   victim [-w | -W FILE] [-m target|nop5|lea] N [ARG_BASE]
 *
 * Calls the selected function N times with arg = ARG_BASE + i, i = 0..N-1
 * (ARG_BASE defaults to 0, so the arguments sum to N*(N-1)/2), then prints
 * "calls N".
 *
 *   -w       print "pid <PID>" and wait for a line on stdin before calling
 *   -W FILE  print "pid <PID>" and wait until FILE exists before calling
 *   -t       time the calls and print "ns_per_call X" (for overhead benchmarks)
 *   -m MODE  which function to call:
 *              target  target_function (C; first instruction push %rbp; default)
 *              nop5    nop5_entry: first instruction is a 5-byte nop
 *                      (0f 1f 44 00 00), which the kernel can optimize
 *              lea     lea_entry: first instruction is `lea`, which the
 *                      kernel must single-step
 *
 * All three functions are global, have symbols, and are never inlined.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#if defined(__GNUC__) && !defined(__clang__)
#define NOIPA __attribute__((noipa))
#else
#define NOIPA
#endif

/*
 * Plain C. Opaque to the optimizer (noinline/noipa + asm with a memory
 * clobber), so every iteration really calls it. Taking the frame address
 * forces a frame, so with gcc and clang at -O2 the first instruction is
 * `push %rbp` (55) -- an instruction the kernel emulates instead of
 * single-stepping -- without depending on -fno-omit-frame-pointer.
 */
__attribute__((noinline, used)) NOIPA int target_function(long arg)
{
	asm volatile("" : : "r"(__builtin_frame_address(0)) : "memory");
	return (int)(arg & 0xff);
}

/*
 * Hand-written so the first instruction is exactly what the benchmarks
 * need, independent of compiler and flags. Both return arg + 1 in %eax.
 */
long nop5_entry(long arg);
long lea_entry(long arg);

asm(
	"	.text\n"
	"	.globl	nop5_entry\n"
	"	.type	nop5_entry, @function\n"
	"	.p2align 4\n"
	"nop5_entry:\n"
	"	.cfi_startproc\n"
	"	.byte	0x0f, 0x1f, 0x44, 0x00, 0x00\n" /* nopl 0x0(%rax,%rax,1) */
	"	leaq	1(%rdi), %rax\n"
	"	ret\n"
	"	.cfi_endproc\n"
	"	.size	nop5_entry, .-nop5_entry\n"
	"\n"
	"	.globl	lea_entry\n"
	"	.type	lea_entry, @function\n"
	"	.p2align 4\n"
	"lea_entry:\n"
	"	.cfi_startproc\n"
	"	leaq	1(%rdi), %rax\n"
	"	ret\n"
	"	.cfi_endproc\n"
	"	.size	lea_entry, .-lea_entry\n");

static void usage(const char *prog)
{
	fprintf(stderr, "usage: %s [-w | -W FILE] [-t] [-m target|nop5|lea] N [ARG_BASE]\n", prog);
}

int main(int argc, char **argv)
{
	long (*fn)(long) = NULL;
	const char *wait_file = NULL;
	int wait_stdin = 0, timed = 0, opt;
	struct timespec t0, t1;
	long n, base = 0, i;
	volatile long sink = 0;
	char *end;

	while ((opt = getopt(argc, argv, "wW:m:th")) != -1) {
		switch (opt) {
		case 'w':
			wait_stdin = 1;
			break;
		case 't':
			timed = 1;
			break;
		case 'W':
			wait_file = optarg;
			break;
		case 'm':
			if (!strcmp(optarg, "target"))
				fn = NULL;
			else if (!strcmp(optarg, "nop5"))
				fn = nop5_entry;
			else if (!strcmp(optarg, "lea"))
				fn = lea_entry;
			else {
				fprintf(stderr, "unknown mode: %s\n", optarg);
				return 2;
			}
			break;
		case 'h':
			usage(argv[0]);
			return 0;
		default:
			usage(argv[0]);
			return 2;
		}
	}
	if (argc - optind < 1 || argc - optind > 2) {
		usage(argv[0]);
		return 2;
	}
	n = strtol(argv[optind], &end, 10);
	if (*end || n < 0) {
		fprintf(stderr, "invalid N: %s\n", argv[optind]);
		return 2;
	}
	if (argc - optind == 2) {
		base = strtol(argv[optind + 1], &end, 10);
		if (*end) {
			fprintf(stderr, "invalid ARG_BASE: %s\n", argv[optind + 1]);
			return 2;
		}
	}

	if (wait_stdin || wait_file) {
		printf("pid %d\n", (int)getpid());
		fflush(stdout);
	}
	if (wait_stdin) {
		char line[64];

		if (!fgets(line, sizeof(line), stdin)) {
			/* EOF: go ahead anyway */
		}
	}
	if (wait_file) {
		while (access(wait_file, F_OK) != 0)
			usleep(1000);
	}

	clock_gettime(CLOCK_MONOTONIC, &t0);
	if (fn) {
		for (i = 0; i < n; i++)
			sink += fn(base + i);
	} else {
		for (i = 0; i < n; i++)
			sink += target_function(base + i);
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);

	if (timed && n > 0)
		printf("ns_per_call %.2f\n",
		       ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / (double)n);
	printf("calls %ld\n", n);
	return 0;
}
