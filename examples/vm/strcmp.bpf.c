/* Compares two NUL-terminated strings held in the memory block, like strcmp(3).
 *
 * Input:  struct strcmp_in: char a[32], char b[32] (64 bytes); a string without a NUL in its
 *         32 bytes ends at the buffer's end.
 * Output: 0 when equal, else a[i] - b[i] (as unsigned chars) at the first difference, as a
 *         signed 64-bit value. BAD_INPUT when the block is shorter than 64.
 */
#include "common.h"

#define LEN 32

struct strcmp_in {
	char a[LEN];
	char b[LEN];
};

SEC("socket")
s64 strcmp_prog(struct strcmp_in *in, u64 len)
{
	if (len < sizeof(*in))
		return (s64)BAD_INPUT;
	for (u32 i = 0; i < LEN; i++) {
		u8 ca = (u8)in->a[i];
		u8 cb = (u8)in->b[i];
		if (ca != cb)
			return (s64)ca - (s64)cb;
		if (ca == 0)
			return 0;
	}
	return 0;
}

char _license[] SEC("license") = "Dual MIT/GPL";
