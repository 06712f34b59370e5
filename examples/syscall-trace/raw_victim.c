// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * syscall-raw-victim: makes system calls from its own `syscall` instructions (x86_64 inline
 * assembly in the main executable and in a dlopen'ed library), not through libc.
 *
 *   syscall-raw-victim N LIB WHEN
 *
 * WHEN: "early" (dlopen LIB before "ready"), "late" (dlopen LIB after "go", then wait until
 * its code has changed — bpftime patched it — printing "patched" or, after 60 s,
 * "unpatched"), "reload" (as "late", then dlclose, dlopen again — often at the same
 * address, with its original bytes — and wait again), or "late-nowait" / "reload-nowait"
 * (the same without waiting: the kernel baseline).
 * Prints "ready <pid>", waits for a line on stdin, then N times: getpid (39) with the number
 * in the instruction stream, write(1000, "bpftime raw\n", 12) with the number in a register
 * (fails with EBADF), LIB's getuid (102), and getppid (110) from code written at run time
 * into an anonymous page far from every library (no file: only a catch-all such as Syscall
 * User Dispatch sees it); a second thread, started before "ready", makes the same getppid
 * calls N times. Then it installs its own SIGSYS handler and raises SIGSYS (what a seccomp
 * user sees), and makes one vfork from its own `syscall` instruction (a site never patched;
 * under Syscall User Dispatch it must run natively). Prints "write_errs E" (calls that
 * returned -EBADF), "app_sigsys K" (times its handler ran), "vfork_status S" (the child's
 * exit status, 3), then "done".
 */
#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* long raw_getpid(void): mov eax, 39; syscall; ret. */
__asm__(".text\n"
	".globl raw_getpid\n"
	".type raw_getpid, @function\n"
	"raw_getpid:\n"
	"	movl $39, %eax\n"
	"	syscall\n"
	"	ret\n"
	".size raw_getpid, . - raw_getpid\n");
long raw_getpid(void);

/* long raw_syscall3(long nr, long a, long b, long c): the number only known at run time. */
__asm__(".text\n"
	".globl raw_syscall3\n"
	".type raw_syscall3, @function\n"
	"raw_syscall3:\n"
	"	movq %rdi, %rax\n"
	"	movq %rsi, %rdi\n"
	"	movq %rdx, %rsi\n"
	"	movq %rcx, %rdx\n"
	"	syscall\n"
	"	cmpq $-4095, %rax\n"
	"	ret\n"
	".size raw_syscall3, . - raw_syscall3\n");
long raw_syscall3(long nr, long a, long b, long c);

/* long raw_vfork(void): the child shares this stack, so the return address stays in rdx. */
__asm__(".text\n"
	".globl raw_vfork\n"
	".type raw_vfork, @function\n"
	"raw_vfork:\n"
	"	popq %rdx\n"
	"	movl $58, %eax\n"
	"	syscall\n"
	"	pushq %rdx\n"
	"	ret\n"
	".size raw_vfork, . - raw_vfork\n");
long raw_vfork(void);

static void *load(const char *lib)
{
	void *h = dlopen(lib, RTLD_NOW);

	if (!h) {
		fprintf(stderr, "dlopen %s: %s\n", lib, dlerror());
		exit(2);
	}
	return h;
}

/* Waits until the first bytes of f differ from what they were (the agent patched them). */
static void wait_patched(const unsigned char *f)
{
	unsigned char before[8];
	struct timespec ts = { 0, 10 * 1000 * 1000 };

	memcpy(before, f, sizeof(before));
	for (int i = 0; i < 6000; i++) {
		if (memcmp(before, f, sizeof(before))) {
			printf("patched\n");
			return;
		}
		nanosleep(&ts, NULL);
	}
	printf("unpatched\n");
}

/* long (*)(void) running mov eax, 110; syscall; ret from an anonymous page. */
static long (*anon_getppid(void))(void)
{
	static const unsigned char code[] = { 0xb8, 110, 0, 0, 0, 0x0f, 0x05, 0xc3 };
	void *hint = (void *)0x100000000000UL;
	void *p = mmap(hint, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED) {
		perror("mmap");
		exit(2);
	}
	memcpy(p, code, sizeof(code));
	if (mprotect(p, 4096, PROT_READ | PROT_EXEC)) {
		perror("mprotect");
		exit(2);
	}
	return (long (*)(void))p;
}

static long n;
static long (*anon)(void);
static int go_pipe[2];
static volatile sig_atomic_t app_sigsys;

static void on_sigsys(int sig)
{
	(void)sig;
	app_sigsys++;
}

/* The second thread: waits for main's "go", then n getppid calls from the anonymous page. */
static void *worker(void *arg)
{
	char c;

	if (read(go_pipe[0], &c, 1) != 1)
		return NULL;
	for (long i = 0; i < n; i++)
		if (anon() != (long)getppid())
			exit(6);
	return arg;
}

int main(int argc, char **argv)
{
	static const char text[] = "bpftime raw\n";
	long (*lib_getuid)(void) = NULL;
	long errs = 0;
	pthread_t t;
	const char *when;
	char line[64];
	void *h = NULL;

	if (argc < 4) {
		fprintf(stderr, "usage: %s N LIB early|late|late-nowait\n", argv[0]);
		return 2;
	}
	n = atol(argv[1]);
	when = argv[3];
	anon = anon_getppid();
	if (pipe(go_pipe) || pthread_create(&t, NULL, worker, NULL)) {
		perror("worker");
		return 2;
	}
	if (!strcmp(when, "early"))
		h = load(argv[2]);
	printf("ready %d\n", (int)getpid());
	fflush(stdout);
	if (!fgets(line, sizeof(line), stdin))
		return 1;
	if (!h)
		h = load(argv[2]);
	lib_getuid = (long (*)(void))dlsym(h, "rawlib_getuid");
	if (!lib_getuid) {
		fprintf(stderr, "dlsym: %s\n", dlerror());
		return 2;
	}
	if (!strcmp(when, "late") || !strcmp(when, "reload"))
		wait_patched((const unsigned char *)lib_getuid);
	if (!strncmp(when, "reload", 6)) {
		dlclose(h);
		h = load(argv[2]);
		lib_getuid = (long (*)(void))dlsym(h, "rawlib_getuid");
		if (!lib_getuid)
			return 2;
		if (!strcmp(when, "reload"))
			wait_patched((const unsigned char *)lib_getuid);
	}
	for (long i = 0; i < n; i++) {
		if (raw_getpid() != getpid())
			return 3;
		if (raw_syscall3(1, 1000, (long)text, 12) == -9)
			errs++;
		if (lib_getuid() != (long)getuid())
			return 4;
		if (anon() != (long)getppid())
			return 5;
	}
	if (write(go_pipe[1], "g", 1) != 1 || pthread_join(t, NULL))
		return 7;
	signal(SIGSYS, on_sigsys);
	raise(SIGSYS);
	long child = raw_vfork();
	int status = 0;

	if (child == 0)
		_exit(3);
	if (child < 0 || waitpid((pid_t)child, &status, 0) != child)
		return 8;
	printf("write_errs %ld\n", errs);
	printf("app_sigsys %d\n", (int)app_sigsys);
	printf("vfork_status %d\n", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
	printf("done\n");
	fflush(stdout);
	return 0;
}
