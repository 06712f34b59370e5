// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * syscall-victim: makes a known set of system calls when told to.
 *
 *   syscall-victim N [INJECT_PATH]
 *   syscall-victim -b N        (benchmark: N getpid() calls, prints "ns_per_call X")
 *
 * Prints "ready <pid>", waits for a line on stdin, then N times: openat(/etc/hostname)
 * (+ close), openat of a missing file, getppid() through libc, syscall(SYS_getppid), and
 * umask() through libc; with INJECT_PATH, openat(INJECT_PATH) too. Prints
 * "inject ok K err E errno_sum S" for the INJECT_PATH opens, then "done".
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* The thread's CPU time (user + system): steady on a loaded machine, and it includes the
 * kernel's tracepoint work, which runs in the calling thread. */
static double now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static int bench(long n)
{
	double t0 = now_ns();

	for (long i = 0; i < n; i++)
		getpid();
	printf("ns_per_call %.2f\n", (now_ns() - t0) / n);
	return 0;
}

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 100;
	const char *inject = argc > 2 ? argv[2] : NULL;
	long ok = 0, err = 0, errno_sum = 0;
	char line[64];

	if (argc > 2 && argv[1][0] == '-' && argv[1][1] == 'b')
		return bench(atol(argv[2]));
	printf("ready %d\n", (int)getpid());
	fflush(stdout);
	if (!fgets(line, sizeof(line), stdin))
		return 1;
	for (long i = 0; i < n; i++) {
		int fd = openat(AT_FDCWD, "/etc/hostname", O_RDONLY);

		if (fd >= 0)
			close(fd);
		if (openat(AT_FDCWD, "/nonexistent/bpftime-victim", O_RDONLY) >= 0)
			return 3;
		getppid();
		syscall(SYS_getppid);
		umask(022);
		if (inject) {
			fd = open(inject, O_RDONLY);
			if (fd >= 0) {
				ok++;
				close(fd);
			} else {
				err++;
				errno_sum += errno;
			}
		}
	}
	if (inject)
		printf("inject ok %ld err %ld errno_sum %ld\n", ok, err, errno_sum);
	printf("done\n");
	fflush(stdout);
	return 0;
}
