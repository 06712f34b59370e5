// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* A program the loader checks refuse: it calls a helper id that does not exist. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

static long (*no_such_helper)(void) = (void *)9999;

SEC("uprobe")
int bad(void *ctx)
{
	return no_such_helper();
}

char LICENSE[] SEC("license") = "GPL";
