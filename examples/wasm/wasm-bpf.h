/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * wasm-bpf.h: the wasm-bpf host API for guests built with
 * `clang --target=wasm32-wasi`, as provided by `bpftime wasm run`.
 *
 * The six functions are imported from module "wasm_bpf". Pointers are guest
 * (32-bit) pointers; the host checks every pointer and length against the
 * guest's memory. Functions returning int return 0 (or a count, or an fd) on
 * success and a negative Linux errno on failure.
 */
#ifndef BPFTIME_WASM_BPF_H
#define BPFTIME_WASM_BPF_H

#include <stddef.h>
#include <stdint.h>

#define WASM_BPF_IMPORT(name) \
	__attribute__((import_module("wasm_bpf"), import_name(#name)))

/* Handle of a loaded BPF object (0: none). */
typedef uint64_t bpf_object_skel;

/* Callback for wasm_bpf_buffer_poll: one record of `size` bytes at `data`.
 * A non-zero return stops the poll and is returned by it. */
typedef int (*bpf_buffer_sample_fn)(void *ctx, void *data, size_t size);

/* Loads an ELF object built with `clang -target bpf` (maps, global data,
 * programs) into the store. Returns its handle, 0 on failure (the host logs
 * why). */
WASM_BPF_IMPORT(wasm_load_bpf_object)
bpf_object_skel wasm_load_bpf_object(const void *obj_buf, int obj_buf_sz);

/* Attaches program `name` (its function name). `attach_target`:
 *   "binary:function" or "binary:function+offset" for a uprobe/uretprobe
 *   (the binary is a path or a name looked up in PATH);
 *   "wasi:path_open" to run the program on the guest's own WASI path_open
 *   (context: struct wasi_path_open_ctx below; a non-zero return denies);
 *   NULL or "" to take the target from the section name,
 *   SEC("uprobe/<binary>:<function>"). */
WASM_BPF_IMPORT(wasm_attach_bpf_program)
int wasm_attach_bpf_program(bpf_object_skel obj, const char *name,
			    const char *attach_target);

/* Waits up to timeout_ms (negative: forever; 0: no wait) for records of the
 * ring buffer or perf event array `fd`, then copies each one into `data`
 * (cut to max_size) and calls sample_func(ctx, data, size). Returns the number
 * of records delivered, the callback's non-zero return, or -errno. */
WASM_BPF_IMPORT(wasm_bpf_buffer_poll)
int wasm_bpf_buffer_poll(bpf_object_skel obj, int fd, int32_t sample_func,
			 uint32_t ctx, char *data, int max_size, int timeout_ms);

/* The fd of map `name` (".rodata", ".bss", ".data" for global data). */
WASM_BPF_IMPORT(wasm_bpf_map_fd_by_name)
int wasm_bpf_map_fd_by_name(bpf_object_skel obj, const char *name);

/* The kernel's BPF_MAP_* command numbers. */
#define WASM_BPF_MAP_LOOKUP_ELEM 1
#define WASM_BPF_MAP_UPDATE_ELEM 2
#define WASM_BPF_MAP_DELETE_ELEM 3
#define WASM_BPF_MAP_GET_NEXT_KEY 4

/* Lookup (value out), update (value in, flags BPF_ANY/NOEXIST/EXIST),
 * delete, get_next_key (key NULL: the first key; next_key out). */
WASM_BPF_IMPORT(wasm_bpf_map_operate)
int wasm_bpf_map_operate(int fd, int cmd, void *key, void *value,
			 void *next_key, uint64_t flags);

/* Detaches the object's programs and removes its maps and programs. */
WASM_BPF_IMPORT(wasm_close_bpf_object)
int wasm_close_bpf_object(bpf_object_skel obj);

/* Convenience wrappers. */
static inline int bpf_map_lookup_elem(int fd, const void *key, void *value)
{
	return wasm_bpf_map_operate(fd, WASM_BPF_MAP_LOOKUP_ELEM, (void *)key,
				    value, NULL, 0);
}

static inline int bpf_map_update_elem(int fd, const void *key,
				      const void *value, uint64_t flags)
{
	return wasm_bpf_map_operate(fd, WASM_BPF_MAP_UPDATE_ELEM, (void *)key,
				    (void *)value, NULL, flags);
}

static inline int bpf_map_delete_elem(int fd, const void *key)
{
	return wasm_bpf_map_operate(fd, WASM_BPF_MAP_DELETE_ELEM, (void *)key,
				    NULL, NULL, 0);
}

static inline int bpf_map_get_next_key(int fd, const void *key, void *next_key)
{
	return wasm_bpf_map_operate(fd, WASM_BPF_MAP_GET_NEXT_KEY, (void *)key,
				    NULL, next_key, 0);
}

/* Polls with a callback: the function pointer is its index in the guest's
 * function table, which the host calls through __indirect_function_table. */
static inline int bpf_buffer_poll(bpf_object_skel obj, int fd,
				  bpf_buffer_sample_fn fn, void *ctx,
				  void *buf, int buf_size, int timeout_ms)
{
	return wasm_bpf_buffer_poll(obj, fd, (int32_t)(uintptr_t)fn,
				    (uint32_t)(uintptr_t)ctx, buf, buf_size,
				    timeout_ms);
}

#endif /* BPFTIME_WASM_BPF_H */
