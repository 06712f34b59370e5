/* Shared definitions for the bpftime VM examples.
 *
 * Self-contained on purpose (no libbpf or kernel headers): the examples use no helpers and no
 * maps, only the memory block `bpftime run --mem` hands to the program (r1 = pointer, r2 =
 * length).
 */
#ifndef BPFTIME_VM_EXAMPLES_COMMON_H
#define BPFTIME_VM_EXAMPLES_COMMON_H

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long s64;

#define SEC(name) __attribute__((section(name), used))
#define NOINLINE __attribute__((noinline))

/* r0 returned when the memory block is missing or too short. */
#define BAD_INPUT ((u64)-1)

#endif
