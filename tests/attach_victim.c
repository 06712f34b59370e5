// SPDX-License-Identifier: MIT OR Apache-2.0
/*
 * attach_victim: a long-running process for `bpftime attach` tests (tests/e2e_attach.rs).
 * Started WITHOUT the agent; counts its own calls of target_function.
 *
 *   attach_victim        command mode: prints "pid <PID>", then reads commands on stdin
 *                        (the main thread spends its time blocked in read()):
 *     call N             main thread calls target_function N times  -> "called N"
 *     start K            K worker threads call it non-stop           -> "started K"
 *                        (workers run at nice 19: the tools under test get the CPU first)
 *     stop               stop and join the workers                   -> "stopped calls T"
 *                        (T = calls the workers made since start)
 *     burst K N          K threads make exactly N calls each         -> "burst K N"
 *     sleep MS           nanosleep(MS ms) in the main thread: prints "sleeping", then
 *                        "slept rc R elapsed_ms E" (R = nanosleep's return value)
 *     quit               -> "bye", exit 0
 *   attach_victim -s     spin mode: prints "pid <PID>" and "spinning", then the main thread
 *                        spins in an assembly loop holding known values in every
 *                        general-purpose register, xmm/ymm register, MXCSR and the
 *                        direction flag, checking them after each round; a second thread
 *                        waits for "stop" on stdin. Prints "spin ok ROUNDS", or
 *                        "spin CORRUPT <what>" and exits 1 as soon as a value changed.
 *
 * The process allows any process of its user to ptrace it (PR_SET_PTRACER_ANY), so tests
 * also pass where kernel.yama.ptrace_scope is 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#ifndef PR_SET_PTRACER
#define PR_SET_PTRACER 0x59616d61
#endif
#ifndef PR_SET_PTRACER_ANY
#define PR_SET_PTRACER_ANY ((unsigned long)-1)
#endif

#if defined(__GNUC__) && !defined(__clang__)
#define NOIPA __attribute__((noipa))
#else
#define NOIPA
#endif

__attribute__((noinline, used)) NOIPA int target_function(long arg)
{
	asm volatile("" : : "r"(__builtin_frame_address(0)) : "memory");
	return (int)(arg & 0xff);
}

static atomic_int run_workers;
static atomic_long worker_calls;
static volatile long sink;

struct work {
	pthread_t th;
	long n; /* < 0: until run_workers is cleared */
};

static void *worker(void *p)
{
	struct work *w = p;
	long i, local = 0;

	/* Lowest priority: still calling non-stop whenever a CPU is free, but the attach and
	 * detach commands and the agent thread get the CPU when they need it (2-core CI). */
	(void)setpriority(PRIO_PROCESS, (id_t)gettid(), 19);

	if (w->n < 0) {
		for (i = 0; atomic_load_explicit(&run_workers, memory_order_relaxed); i++) {
			sink += target_function(i);
			local++;
		}
	} else {
		for (i = 0; i < w->n; i++)
			sink += target_function(i);
		local = w->n;
	}
	atomic_fetch_add(&worker_calls, local);
	return NULL;
}

static struct work workers[64];
static int nworkers;

static int spawn(int k, long n)
{
	int i;

	if (k < 1 || k > 64)
		return -1;
	for (i = 0; i < k; i++) {
		workers[i].n = n;
		if (pthread_create(&workers[i].th, NULL, worker, &workers[i]))
			return -1;
	}
	nworkers = k;
	return 0;
}

static void join_all(void)
{
	int i;

	for (i = 0; i < nworkers; i++)
		pthread_join(workers[i].th, NULL);
	nworkers = 0;
}

static double now_ms(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

/*
 * Spin mode. Layout of the pattern and result arrays (u64 slots):
 * [0..14) rbx rbp r12 r13 r14 r15 rcx rdx rdi r8 r9 r10 r11 rsi,
 * [14..78) 16 vector registers x 32 bytes, [78] MXCSR, [79] RFLAGS (result only).
 * spin_check(iters, pattern, out) loads everything, runs `dec; jnz` iters times with the
 * direction flag set, and stores everything back.
 */
enum { N_GP = 14, VEC = 14, MXCSR = 78, FLAGS = 79, SLOTS = 80 };
static const char *gp_names[N_GP] = { "rbx", "rbp", "r12", "r13", "r14", "r15", "rcx",
				      "rdx", "rdi", "r8",  "r9",  "r10", "r11", "rsi" };

#define SPIN_PROLOGUE                                                          \
	"	push %rbx\n push %rbp\n push %r12\n push %r13\n push %r14\n push %r15\n" \
	"	sub $16, %rsp\n"                                                       \
	"	stmxcsr 8(%rsp)\n"                                                     \
	"	mov %rdx, 0(%rsp)\n"                                                   \
	"	ldmxcsr 624(%rsi)\n"
#define SPIN_LOOP                                                              \
	"	mov %rdi, %rax\n"                                                      \
	"	mov 0(%rsi), %rbx\n mov 8(%rsi), %rbp\n mov 16(%rsi), %r12\n"           \
	"	mov 24(%rsi), %r13\n mov 32(%rsi), %r14\n mov 40(%rsi), %r15\n"         \
	"	mov 48(%rsi), %rcx\n mov 56(%rsi), %rdx\n mov 64(%rsi), %rdi\n"         \
	"	mov 72(%rsi), %r8\n mov 80(%rsi), %r9\n mov 88(%rsi), %r10\n"           \
	"	mov 96(%rsi), %r11\n mov 104(%rsi), %rsi\n"                             \
	"	std\n"                                                                 \
	"1:	dec %rax\n"                                                            \
	"	jnz 1b\n"                                                              \
	"	pushfq\n"                                                              \
	"	cld\n"                                                                 \
	"	push %rsi\n"                                                           \
	"	mov 16(%rsp), %rsi\n"                                                  \
	"	mov %rbx, 0(%rsi)\n mov %rbp, 8(%rsi)\n mov %r12, 16(%rsi)\n"           \
	"	mov %r13, 24(%rsi)\n mov %r14, 32(%rsi)\n mov %r15, 40(%rsi)\n"         \
	"	mov %rcx, 48(%rsi)\n mov %rdx, 56(%rsi)\n mov %rdi, 64(%rsi)\n"         \
	"	mov %r8, 72(%rsi)\n mov %r9, 80(%rsi)\n mov %r10, 88(%rsi)\n"           \
	"	mov %r11, 96(%rsi)\n"                                                  \
	"	pop %rax\n mov %rax, 104(%rsi)\n"                                      \
	"	pop %rax\n mov %rax, 632(%rsi)\n"                                      \
	"	stmxcsr 624(%rsi)\n"
#define SPIN_EPILOGUE                                                          \
	"	ldmxcsr 8(%rsp)\n"                                                     \
	"	add $16, %rsp\n"                                                       \
	"	pop %r15\n pop %r14\n pop %r13\n pop %r12\n pop %rbp\n pop %rbx\n"      \
	"	ret\n"

#define VEC_OP(op, r, n) "	" op " " #n "(%rsi), %" r "\n"
#define VEC_ST(op, r, n) "	" op " %" r ", " #n "(%rsi)\n"
#define VEC_ALL(M, op, p)                                                      \
	M(op, p "0", 112) M(op, p "1", 144) M(op, p "2", 176) M(op, p "3", 208)    \
	M(op, p "4", 240) M(op, p "5", 272) M(op, p "6", 304) M(op, p "7", 336)    \
	M(op, p "8", 368) M(op, p "9", 400) M(op, p "10", 432) M(op, p "11", 464)  \
	M(op, p "12", 496) M(op, p "13", 528) M(op, p "14", 560) M(op, p "15", 592)

long spin_check_sse(long iters, const uint64_t *pattern, uint64_t *out);
long spin_check_avx(long iters, const uint64_t *pattern, uint64_t *out);

asm("	.text\n"
    "	.globl spin_check_sse\n"
    "	.type spin_check_sse, @function\n"
    "spin_check_sse:\n" SPIN_PROLOGUE VEC_ALL(VEC_OP, "movdqu", "xmm") SPIN_LOOP
	    VEC_ALL(VEC_ST, "movdqu", "xmm") SPIN_EPILOGUE
    "	.size spin_check_sse, .-spin_check_sse\n"
    "	.globl spin_check_avx\n"
    "	.type spin_check_avx, @function\n"
    "spin_check_avx:\n" SPIN_PROLOGUE VEC_ALL(VEC_OP, "vmovdqu", "ymm") SPIN_LOOP
	    VEC_ALL(VEC_ST, "vmovdqu", "ymm") "	vzeroupper\n" SPIN_EPILOGUE
    "	.size spin_check_avx, .-spin_check_avx\n");

static atomic_int spin_stop;

static void *stdin_waiter(void *p)
{
	char line[64];

	(void)p;
	while (fgets(line, sizeof(line), stdin))
		if (!strncmp(line, "stop", 4))
			break;
	atomic_store(&spin_stop, 1);
	return NULL;
}

static int spin_mode(void)
{
	uint64_t pattern[SLOTS], out[SLOTS];
	int avx = __builtin_cpu_supports("avx");
	long rounds = 0;
	pthread_t th;
	int i, vec_words = avx ? 4 : 2;

	for (i = 0; i < SLOTS; i++)
		pattern[i] = 0x0101010101010101ull * (uint64_t)(i + 1) ^ 0x8000000000000000ull;
	pattern[MXCSR] = 0x7f80; /* all exceptions masked, round toward zero */
	if (pthread_create(&th, NULL, stdin_waiter, NULL))
		return 2;
	printf("spinning\n");
	fflush(stdout);
	while (!atomic_load(&spin_stop)) {
		memset(out, 0, sizeof(out));
		if (avx)
			spin_check_avx(1 << 22, pattern, out);
		else
			spin_check_sse(1 << 22, pattern, out);
		rounds++;
		for (i = 0; i < N_GP; i++)
			if (out[i] != pattern[i]) {
				printf("spin CORRUPT %s\n", gp_names[i]);
				return 1;
			}
		for (i = 0; i < 16; i++) {
			int w;

			for (w = 0; w < vec_words; w++)
				if (out[VEC + 4 * i + w] != pattern[VEC + 4 * i + w]) {
					printf("spin CORRUPT %smm%d word %d\n", avx ? "y" : "x", i, w);
					return 1;
				}
		}
		if ((uint32_t)out[MXCSR] != (uint32_t)pattern[MXCSR]) {
			printf("spin CORRUPT mxcsr %#x\n", (unsigned)out[MXCSR]);
			return 1;
		}
		if (!(out[FLAGS] & (1 << 10))) {
			printf("spin CORRUPT direction flag\n");
			return 1;
		}
	}
	pthread_join(th, NULL);
	printf("spin ok %ld\n", rounds);
	return 0;
}

int main(int argc, char **argv)
{
	char line[128];

	setvbuf(stdout, NULL, _IOLBF, 0);
	(void)prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0);
	printf("pid %d\n", (int)getpid());
	if (argc > 1 && !strcmp(argv[1], "-s"))
		return spin_mode();

	while (fgets(line, sizeof(line), stdin)) {
		long a = 0, b = 0, i;

		if (sscanf(line, "call %ld", &a) == 1) {
			for (i = 0; i < a; i++)
				sink += target_function(i);
			printf("called %ld\n", a);
		} else if (sscanf(line, "start %ld", &a) == 1) {
			atomic_store(&worker_calls, 0);
			atomic_store(&run_workers, 1);
			if (spawn((int)a, -1)) {
				printf("error start\n");
				return 2;
			}
			printf("started %ld\n", a);
		} else if (!strncmp(line, "stop", 4)) {
			atomic_store(&run_workers, 0);
			join_all();
			printf("stopped calls %ld\n", atomic_load(&worker_calls));
		} else if (sscanf(line, "burst %ld %ld", &a, &b) == 2) {
			if (spawn((int)a, b)) {
				printf("error burst\n");
				return 2;
			}
			join_all();
			printf("burst %ld %ld\n", a, b);
		} else if (sscanf(line, "sleep %ld", &a) == 1) {
			struct timespec ts = { a / 1000, (a % 1000) * 1000000 };
			double t0;
			int rc;

			printf("sleeping\n");
			t0 = now_ms();
			rc = nanosleep(&ts, NULL);
			printf("slept rc %d elapsed_ms %.0f\n", rc == 0 ? 0 : errno, now_ms() - t0);
		} else if (!strncmp(line, "quit", 4)) {
			printf("bye\n");
			return 0;
		} else {
			printf("error unknown command\n");
		}
	}
	return 0;
}
