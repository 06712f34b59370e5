/* A tiny accumulator machine: a dense switch over opcodes read from the memory block.
 *
 * Input:  struct switch_in: u64 acc (initial accumulator), u8 ops[16] (24 bytes). Each op byte
 *         selects one of 10 operations; 0xff stops early, other values are skipped.
 * Output: the final accumulator. BAD_INPUT when the block is shorter than 24.
 */
#include "common.h"

struct switch_in {
	u64 acc;
	u8 ops[16];
};

SEC("socket")
u64 switch_prog(struct switch_in *in, u64 len)
{
	if (len < sizeof(*in))
		return BAD_INPUT;
	u64 acc = in->acc;
	for (u32 i = 0; i < 16; i++) {
		u8 op = in->ops[i];
		if (op == 0xff)
			break;
		switch (op) {
		case 0: acc += 1; break;
		case 1: acc -= 1; break;
		case 2: acc *= 3; break;
		case 3: acc <<= 4; break;
		case 4: acc >>= 1; break;
		case 5: acc ^= 0x5a5a; break;
		case 6: acc = ~acc; break;
		case 7: acc += acc >> 3; break;
		case 8: acc = (acc << 32) | (acc >> 32); break;
		case 9: acc *= acc; break;
		default: break;
		}
	}
	return acc;
}

char _license[] SEC("license") = "Dual MIT/GPL";
