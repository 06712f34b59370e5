// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * bpftrace-victim: calls for the bpftrace one-liner matrix (tests/e2e_bpftrace.rs).
 *
 *   bpftrace-victim -W FILE N
 *
 * Prints "pid <PID>", waits until FILE exists, then for i = 0..N-1:
 *   malloc(1000 + i) (freed right away), six_args(i, 2i, 3i, 4i, 5i, 6i) (returns their sum),
 *   greet(name) with name "alice" for even i and "bob" for odd i (returns strlen(name));
 * then words({"one", "two", "three", NULL}) once, prints "calls N", and waits until FILE is
 * gone before it exits (so a tracer can still read its /proc/PID files to resolve symbols).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

__attribute__((noinline, used)) long six_args(long a, long b, long c, long d, long e, long f)
{
	asm volatile("" : : "r"(__builtin_frame_address(0)) : "memory");
	return a + b + c + d + e + f;
}

__attribute__((noinline, used)) int greet(const char *name)
{
	asm volatile("" : : "r"(__builtin_frame_address(0)) : "memory");
	return (int)strlen(name);
}

__attribute__((noinline, used)) int words(char **w)
{
	int n = 0;

	asm volatile("" : : "r"(__builtin_frame_address(0)) : "memory");
	while (w[n])
		n++;
	return n;
}

int main(int argc, char **argv)
{
	volatile long sink = 0;
	const char *wait_file;
	long n, i;

	if (argc != 4 || strcmp(argv[1], "-W") != 0) {
		fprintf(stderr, "usage: %s -W FILE N\n", argv[0]);
		return 2;
	}
	wait_file = argv[2];
	n = atol(argv[3]);
	printf("pid %d\n", (int)getpid());
	fflush(stdout);
	while (access(wait_file, F_OK) != 0)
		usleep(1000);
	for (i = 0; i < n; i++) {
		void *p = malloc(1000 + i);

		asm volatile("" : : "r"(p) : "memory"); /* keep the malloc */
		sink += (long)(p != NULL);
		free(p);
		sink += six_args(i, 2 * i, 3 * i, 4 * i, 5 * i, 6 * i);
		sink += greet(i % 2 ? "bob" : "alice");
	}
	{
		char *w[] = { "one", "two", "three", NULL };

		sink += words(w);
	}
	printf("calls %ld\n", n);
	fflush(stdout);
	while (access(wait_file, F_OK) == 0)
		usleep(1000);
	return 0;
}
