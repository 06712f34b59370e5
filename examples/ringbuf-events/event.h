/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
#ifndef EVENTS_EVENT_H
#define EVENTS_EVENT_H

/* One event per call of the probed function (shared by the BPF side and the loader). */
struct event {
	__u32 pid;
	__u32 tid;
	__u64 arg;
	__u64 seq;
};

#endif
