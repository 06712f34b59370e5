/* Integer log2 (index of the highest set bit) of a 64-bit value.
 *
 * Input:  struct log2_in (8 bytes, little-endian u64).
 * Output: floor(log2(value)); 0 for value 0 and 1. BAD_INPUT when the block is shorter than 8.
 */
#include "common.h"

struct log2_in {
	u64 value;
};

SEC("socket")
u64 log2_prog(struct log2_in *in, u64 len)
{
	if (len < sizeof(*in))
		return BAD_INPUT;
	u64 v = in->value;
	u64 r = 0;
	/* Binary search over the shift amounts 32, 16, 8, 4, 2, 1: a bounded loop. */
	for (u32 shift = 32; shift > 0; shift >>= 1) {
		if (v >> shift) {
			v >>= shift;
			r += shift;
		}
	}
	return r;
}

char _license[] SEC("license") = "Dual MIT/GPL";
