/* Copies bytes within the memory block, then checksums the copy.
 *
 * Input:  struct memcpy_in: u32 len (capped at 64), u32 pad, u8 src[64], u8 dst[64] (136 bytes).
 * Effect: dst[0..len) = src[0..len).
 * Output: FNV-1a (64-bit) of dst[0..len). BAD_INPUT when the block is shorter than 136.
 */
#include "common.h"

#define BUF 64

struct memcpy_in {
	u32 len;
	u32 pad;
	u8 src[BUF];
	u8 dst[BUF];
};

SEC("socket")
u64 memcpy_prog(struct memcpy_in *in, u64 len)
{
	if (len < sizeof(*in))
		return BAD_INPUT;
	u32 n = in->len;
	if (n > BUF)
		n = BUF;
	/* Copy eight bytes at a time while possible, then the tail byte by byte. */
	u32 i = 0;
	for (; i + 8 <= n; i += 8)
		*(volatile u64 *)&in->dst[i] = *(volatile u64 *)&in->src[i];
	for (; i < n; i++)
		*(volatile u8 *)&in->dst[i] = *(volatile u8 *)&in->src[i];

	u64 h = 0xcbf29ce484222325ULL;
	for (u32 j = 0; j < n; j++) {
		h ^= in->dst[j];
		h *= 0x100000001b3ULL;
	}
	return h;
}

char _license[] SEC("license") = "Dual MIT/GPL";
