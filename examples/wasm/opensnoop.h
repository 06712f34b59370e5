/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* One ring buffer record of opensnoop.bpf.c. */
#ifndef OPENSNOOP_H
#define OPENSNOOP_H

#define OPENSNOOP_NAME_LEN 256

struct open_event {
	unsigned int pid;
	unsigned int tid;
	int ret;     /* fd, or -errno */
	int flags;   /* open flags */
	char comm[16];
	char fname[OPENSNOOP_NAME_LEN];
};

#endif
