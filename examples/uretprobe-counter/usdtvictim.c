// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * usdtvictim: a process with a USDT probe guarded by a semaphore.
 *
 *   usdtvictim [-w] N
 *
 * Prints "semaphore V" (its value before the loop), then runs i = 0..N-1: when the
 * semaphore of bpftime_test:tick is set (a tracer is attached), fires
 * STAP_PROBE2(bpftime_test, tick, i, 2 * i) and counts it. Prints "enabled K" (the
 * iterations that saw the semaphore set), "expect hits K arg_sum S"; then, with -w, waits for
 * a second line and prints "semaphore V" again (0 once every tracer left).
 */
#define _SDT_HAS_SEMAPHORES 1
#include <sys/sdt.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

__extension__ unsigned short bpftime_test_tick_semaphore
	__attribute__((unused)) __attribute__((section(".probes")));

static volatile unsigned short *const sema = &bpftime_test_tick_semaphore;

int main(int argc, char **argv)
{
	int wait = argc > 1 && !strcmp(argv[1], "-w");
	long n, enabled = 0;
	unsigned long long sum = 0;
	char line[64];

	if (argc != 2 + wait) {
		fprintf(stderr, "usage: %s [-w] N\n", argv[0]);
		return 2;
	}
	n = strtol(argv[1 + wait], NULL, 10);
	if (wait) {
		printf("pid %d\n", (int)getpid());
		fflush(stdout);
		if (!fgets(line, sizeof(line), stdin)) {
			/* EOF: go ahead anyway */
		}
	}
	printf("semaphore %u\n", *sema);
	for (long i = 0; i < n; i++) {
		if (*sema) {
			STAP_PROBE2(bpftime_test, tick, i, 2 * i);
			enabled++;
			sum += 3 * i;
		}
	}
	printf("enabled %ld\n", enabled);
	printf("expect hits %ld arg_sum %llu\n", enabled, sum);
	fflush(stdout);
	if (wait) {
		if (!fgets(line, sizeof(line), stdin)) {
			/* EOF */
		}
		printf("semaphore %u\n", *sema);
	}
	printf("calls %ld\n", n);
	return 0;
}
