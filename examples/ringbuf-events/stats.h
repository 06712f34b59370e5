/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Event bookkeeping shared by ringbuf-events and perfbuf-events: counts events,
 * sums their arguments and sequence numbers, and checks that every sequence
 * number arrived exactly once.
 */
#ifndef EVENTS_STATS_H
#define EVENTS_STATS_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/types.h>

#include "event.h"

#define MAX_PIDS 64

struct stats {
	__u64 events;     /* well-formed events received */
	__u64 bad;        /* records of the wrong size */
	__u64 dups;       /* sequence numbers seen twice */
	__u64 arg_sum;
	__u64 seq_sum;
	__u64 max_seq;
	__u8 *seen;       /* one byte per sequence number */
	size_t seen_cap;
	__u32 pids[MAX_PIDS];
	int npids;
};

static inline void stats_add(struct stats *s, const void *data, size_t size)
{
	const struct event *e = data;
	int i;

	if (size < sizeof(*e)) {
		s->bad++;
		return;
	}
	s->events++;
	s->arg_sum += e->arg;
	s->seq_sum += e->seq;
	if (e->seq > s->max_seq)
		s->max_seq = e->seq;
	if (e->seq >= s->seen_cap) {
		size_t cap = s->seen_cap ? s->seen_cap : 4096;
		__u8 *n;

		while (cap <= e->seq)
			cap *= 2;
		n = realloc(s->seen, cap);
		if (!n) {
			s->bad++;
			return;
		}
		memset(n + s->seen_cap, 0, cap - s->seen_cap);
		s->seen = n;
		s->seen_cap = cap;
	}
	if (s->seen[e->seq]++)
		s->dups++;
	for (i = 0; i < s->npids; i++)
		if (s->pids[i] == e->pid)
			return;
	if (s->npids < MAX_PIDS)
		s->pids[s->npids++] = e->pid;
}

/*
 * Prints the report and checks it. With expected >= 0 (the number of calls
 * made, with arguments base, base+1, ...): exactly that many events, none lost,
 * sequence numbers 0..expected-1 each once, the argument sum. Returns 0 if the
 * checks pass.
 */
static inline int stats_report(const struct stats *s, __u64 lost, long expected, long base)
{
	const char *why = NULL;
	__u64 n = (__u64)expected;

	printf("events %llu lost %llu\n", (unsigned long long)s->events, (unsigned long long)lost);
	printf("arg_sum %llu\n", (unsigned long long)s->arg_sum);
	printf("seq_sum %llu\n", (unsigned long long)s->seq_sum);
	printf("pids %d\n", s->npids);
	if (s->bad)
		why = "malformed records";
	else if (s->dups)
		why = "duplicate sequence numbers";
	else if (expected >= 0 && (s->events != n || lost))
		why = "wrong event count";
	else if (expected > 0 && (s->max_seq != n - 1 || s->seq_sum != n * (n - 1) / 2))
		why = "missing sequence numbers";
	else if (expected >= 0 && s->arg_sum != n * (__u64)base + n * (n - 1) / 2)
		why = "wrong argument sum";
	if (why)
		printf("check FAILED: %s\n", why);
	else
		printf("check ok\n");
	fflush(stdout);
	return why ? 1 : 0;
}

#endif
