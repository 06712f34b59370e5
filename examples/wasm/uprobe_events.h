/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* One ring buffer record of uprobe_events.bpf.c. */
#ifndef UPROBE_EVENTS_H
#define UPROBE_EVENTS_H

struct call_event {
	unsigned int pid;
	unsigned int tid;
	long long arg;             /* the probed function's first argument */
	unsigned long long count;  /* calls counted for this pid so far */
};

#endif
