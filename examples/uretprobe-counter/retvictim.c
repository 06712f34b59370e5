// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * retvictim: a process for uretprobe-counter to probe.
 *
 *   retvictim [-w | -W FILE] [-z] [-t] [-a] [-b] [-m MODE] N
 *
 * Runs MODE N times, then prints what a probe of the mode's function must have counted:
 *   "expect entries E returns R ret_sum S" (S wraps around at 2^64), then "calls N".
 *
 *   -w       print "pid <PID>" and wait for a line on stdin first
 *   -W FILE  print "pid <PID>" and wait until FILE exists first
 *   -z       after the report, wait for a line on stdin before exiting
 *   -t       time the loop and print "ns_per_call X" (wall clock) and "cpu_ns_per_call X" (the
 *            calling thread's CPU time: steadier on a loaded machine) (benchmarks)
 *   -a       print "addr <function> <hex address>" for the mode's functions
 *   -b       block every signal (pthread_sigmask) before the calls, as servers do in worker
 *            threads
 *   -T       after the report, execute an int3 of its own (no handler installed): the
 *            process must die of SIGTRAP, probes or not
 *   -m MODE  (default target)
 *     target    target_function(i): C, first instruction push %rbp; returns i & 0xff
 *     nop5      nop5_entry(i): first instruction a 5-byte nop; returns i + 1
 *     lea       lea_entry(i): first instruction lea (the kernel single-steps it); returns i + 1
 *     short     short_fn(i): 4 bytes (lea eax,[rdi+1]; ret), too short for a jump
 *     rec       rec_fn(20): recursive, rec_fn(d) = rec_fn(d - 1) + d, 21 frames per call
 *     threads   8 threads, each calling target_function(i) N times
 *     longjmp   jmp_fn(i): every third call leaves through longjmp from a function it calls
 *     mid       mid_fn(i) = 2i + 1: probe points mid_fn_a (jump-patchable) and mid_fn_b
 *               (a loop branches into the bytes after it) inside the function
 *     override  check_fn(i): returns 0; prints "overridden K", the calls that returned
 *               something else
 *     mix       target_function(i), nop5_entry(i) and short_fn(i) each (entries and returns
 *               of the expect line: all three together)
 */
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
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

#define THREADS 8
#define REC_DEPTH 20

__attribute__((noinline, used)) NOIPA int target_function(long arg)
{
	asm volatile("" : : "r"(__builtin_frame_address(0)) : "memory");
	return (int)(arg & 0xff);
}

long nop5_entry(long arg);
long lea_entry(long arg);
long short_fn(long arg);
long mid_fn(long arg);

asm("	.text\n"
    "	.globl	nop5_entry\n"
    "	.type	nop5_entry, @function\n"
    "	.p2align 4\n"
    "nop5_entry:\n"
    "	.cfi_startproc\n"
    "	.byte	0x0f, 0x1f, 0x44, 0x00, 0x00\n"
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
    "	.size	lea_entry, .-lea_entry\n"
    "\n"
    "	.globl	short_fn\n"
    "	.type	short_fn, @function\n"
    "	.p2align 4\n"
    "short_fn:\n"
    "	.cfi_startproc\n"
    "	leal	1(%rdi), %eax\n"
    "	ret\n"
    "	.cfi_endproc\n"
    "	.size	short_fn, .-short_fn\n"
    "\n"
    /* 2i + 1, with a loop whose target sits 3 bytes after mid_fn_b */
    "	.globl	mid_fn\n"
    "	.type	mid_fn, @function\n"
    "	.p2align 4\n"
    "mid_fn:\n"
    "	.cfi_startproc\n"
    "	movq	%rdi, %rax\n"
    "	movl	$2, %ecx\n"
    "	.globl	mid_fn_a\n"
    "mid_fn_a:\n"
    "	addq	$1, %rax\n"
    "	nop\n"
    "	.globl	mid_fn_b\n"
    "mid_fn_b:\n"
    "	addq	%rdi, %rax\n"
    "1:	decl	%ecx\n"
    "	jnz	1b\n"
    "	ret\n"
    "	.cfi_endproc\n"
    "	.size	mid_fn, .-mid_fn\n");

__attribute__((noinline, used)) NOIPA long rec_fn(long d)
{
	volatile long below;

	if (d == 0)
		return 0;
	below = rec_fn(d - 1);
	return below + d;
}

static jmp_buf jump_env;

__attribute__((noinline, used)) NOIPA void jump_out(long i)
{
	if (i % 3 == 0)
		longjmp(jump_env, 1);
	asm volatile("" ::: "memory");
}

__attribute__((noinline, used)) NOIPA long jmp_fn(long i)
{
	jump_out(i);
	asm volatile("" ::: "memory");
	return i;
}

__attribute__((noinline, used)) NOIPA long check_fn(long i)
{
	asm volatile("" : : "r"(i) : "memory");
	return 0;
}

static long n_calls;

static void *thread_main(void *arg)
{
	long sum = 0;

	(void)arg;
	for (long i = 0; i < n_calls; i++)
		sum += target_function(i);
	return (void *)sum;
}

static void usage(const char *prog)
{
	fprintf(stderr, "usage: %s [-w | -W FILE] [-z] [-t] [-a] [-b] [-T] [-m MODE] N\n", prog);
}

int main(int argc, char **argv)
{
	const char *mode = "target", *wait_file = NULL;
	int wait_stdin = 0, wait_end = 0, timed = 0, addrs = 0, block = 0, own_trap = 0, opt;
	unsigned long long entries = 0, returns = 0, ret_sum = 0;
	long overridden = 0;
	volatile long sink = 0;
	struct timespec t0, t1, c0, c1;
	char *end;

	while ((opt = getopt(argc, argv, "wW:ztabTm:h")) != -1) {
		switch (opt) {
		case 'w':
			wait_stdin = 1;
			break;
		case 'W':
			wait_file = optarg;
			break;
		case 'z':
			wait_end = 1;
			break;
		case 't':
			timed = 1;
			break;
		case 'a':
			addrs = 1;
			break;
		case 'b':
			block = 1;
			break;
		case 'T':
			own_trap = 1;
			break;
		case 'm':
			mode = optarg;
			break;
		default:
			usage(argv[0]);
			return opt == 'h' ? 0 : 2;
		}
	}
	if (argc - optind != 1) {
		usage(argv[0]);
		return 2;
	}
	n_calls = strtol(argv[optind], &end, 10);
	if (*end || n_calls < 0) {
		fprintf(stderr, "invalid N: %s\n", argv[optind]);
		return 2;
	}
	if (addrs) {
		printf("addr target_function %#lx\n", (unsigned long)target_function);
		printf("addr nop5_entry %#lx\n", (unsigned long)nop5_entry);
		printf("addr short_fn %#lx\n", (unsigned long)short_fn);
		printf("addr rec_fn %#lx\n", (unsigned long)rec_fn);
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
	if (wait_file)
		while (access(wait_file, F_OK) != 0)
			usleep(1000);

	if (block) {
		sigset_t all;

		sigfillset(&all);
		pthread_sigmask(SIG_BLOCK, &all, NULL);
	}
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c0);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	if (!strcmp(mode, "target") || !strcmp(mode, "nop5") || !strcmp(mode, "lea") ||
	    !strcmp(mode, "short")) {
		long (*fn)(long) = !strcmp(mode, "nop5")  ? nop5_entry
				   : !strcmp(mode, "lea")   ? lea_entry
				   : !strcmp(mode, "short") ? short_fn
							    : NULL;

		for (long i = 0; i < n_calls; i++) {
			long r = fn ? fn(i) : target_function(i);

			sink += r;
			/* The int return of target_function is sign-extended in rax. */
			ret_sum += fn ? (unsigned long long)r : (unsigned long long)(int)r;
		}
		entries = returns = n_calls;
	} else if (!strcmp(mode, "rec")) {
		for (long i = 0; i < n_calls; i++)
			sink += rec_fn(REC_DEPTH);
		for (long d = 0; d <= REC_DEPTH; d++)
			ret_sum += (unsigned long long)n_calls * (d * (d + 1) / 2);
		entries = returns = (unsigned long long)n_calls * (REC_DEPTH + 1);
	} else if (!strcmp(mode, "threads")) {
		pthread_t t[THREADS];

		for (int i = 0; i < THREADS; i++)
			pthread_create(&t[i], NULL, thread_main, NULL);
		for (int i = 0; i < THREADS; i++) {
			void *r;

			pthread_join(t[i], &r);
			ret_sum += (unsigned long long)(long)r;
		}
		entries = returns = (unsigned long long)n_calls * THREADS;
	} else if (!strcmp(mode, "longjmp")) {
		for (volatile long i = 0; i < n_calls; i++) {
			if (setjmp(jump_env) == 0) {
				sink += jmp_fn(i);
				returns++;
				ret_sum += i;
			}
		}
		entries = n_calls;
	} else if (!strcmp(mode, "mid")) {
		for (long i = 0; i < n_calls; i++) {
			long r = mid_fn(i);

			if (r != 2 * i + 1) {
				fprintf(stderr, "mid_fn(%ld) = %ld\n", i, r);
				return 1;
			}
			sink += r;
			ret_sum += r;
		}
		entries = returns = n_calls;
	} else if (!strcmp(mode, "mix")) {
		for (long i = 0; i < n_calls; i++) {
			long a = target_function(i), b = nop5_entry(i), c = short_fn(i);

			sink += a + b + c;
			ret_sum += (unsigned long long)a + b + c;
		}
		entries = returns = 3ULL * n_calls;
	} else if (!strcmp(mode, "override")) {
		for (long i = 0; i < n_calls; i++) {
			long r = check_fn(i);

			overridden += r != 0;
			ret_sum += r;
		}
		entries = returns = n_calls;
		printf("overridden %ld\n", overridden);
	} else {
		fprintf(stderr, "unknown mode: %s\n", mode);
		return 2;
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c1);

	if (timed && n_calls > 0) {
		printf("ns_per_call %.2f\n",
		       ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / (double)n_calls);
		printf("cpu_ns_per_call %.2f\n",
		       ((c1.tv_sec - c0.tv_sec) * 1e9 + (c1.tv_nsec - c0.tv_nsec)) / (double)n_calls);
	}
	printf("expect entries %llu returns %llu ret_sum %llu\n", entries, returns, ret_sum);
	printf("calls %ld\n", n_calls);
	if (wait_end) {
		char line[64];

		fflush(stdout);
		if (!fgets(line, sizeof(line), stdin)) {
			/* EOF: exit anyway */
		}
	}
	if (own_trap) {
		fflush(stdout);
		__asm__ volatile("int3");
		printf("survived int3\n");
	}
	return 0;
}
