// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * exvictim: C++ exceptions thrown through a probed frame.
 *
 *   exvictim [-w] N
 *
 * Calls thrower(i) for i = 0..N-1 inside try/catch: odd i throw std::runtime_error through
 * thrower's frame, even i return i. Prints "caught K", the
 * "expect entries N returns R ret_sum S" line of retvictim (a uretprobe on thrower sees only
 * the calls that return), and "calls N".
 */
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <unistd.h>

extern "C" __attribute__((noinline, used)) long thrower(long x)
{
	asm volatile("" : : "r"(x) : "memory");
	if (x % 2)
		throw std::runtime_error("odd");
	return x;
}

int main(int argc, char **argv)
{
	int argi = 1;
	bool wait = false;

	if (argc > 1 && !strcmp(argv[1], "-w")) {
		wait = true;
		argi++;
	}
	if (argc != argi + 1) {
		fprintf(stderr, "usage: %s [-w] N\n", argv[0]);
		return 2;
	}
	long n = strtol(argv[argi], nullptr, 10);
	if (wait) {
		printf("pid %d\n", (int)getpid());
		fflush(stdout);
		char line[64];
		if (!fgets(line, sizeof(line), stdin)) {
			/* EOF: go ahead anyway */
		}
	}
	long caught = 0;
	unsigned long long sum = 0, returns = 0;
	for (long i = 0; i < n; i++) {
		try {
			sum += thrower(i);
			returns++;
		} catch (const std::exception &) {
			caught++;
		}
	}
	printf("caught %ld\n", caught);
	printf("expect entries %ld returns %llu ret_sum %llu\n", n, returns, sum);
	printf("calls %ld\n", n);
	return 0;
}
