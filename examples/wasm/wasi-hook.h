/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Context of a BPF program attached to "wasi:path_open" (shared by the BPF
 * program and the host; the host's layout is PathOpenCtx in
 * wasm-host/src/wasi.rs). Return 0 to allow the open, non-zero to deny it
 * (the guest's open then fails with EACCES).
 */
#ifndef BPFTIME_WASI_HOOK_H
#define BPFTIME_WASI_HOOK_H

struct wasi_path_open_ctx {
	unsigned int dirfd;
	unsigned int dirflags;
	unsigned int oflags;
	unsigned int fdflags;
	unsigned long long rights_base;
	unsigned long long rights_inheriting;
	unsigned int path_len;  /* full length of the path */
	unsigned int reserved;
	char path[256];         /* NUL-terminated, cut to 255 bytes */
};

#endif
