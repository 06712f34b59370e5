/* Counts the primes below N by trial division, with a bpf-to-bpf call to a .text function.
 *
 * Input:  struct prime_in (u32 n, little-endian); n is capped at 100000.
 * Output: the number of primes p with 2 <= p < n. BAD_INPUT when the block is shorter than 4.
 */
#include "common.h"

#define MAX_N 100000

struct prime_in {
	u32 n;
};

static NOINLINE u64 is_prime(u32 n)
{
	if (n < 2)
		return 0;
	for (u32 d = 2; d * d <= n; d++) {
		if (n % d == 0)
			return 0;
	}
	return 1;
}

SEC("socket")
u64 prime(struct prime_in *in, u64 len)
{
	if (len < sizeof(*in))
		return BAD_INPUT;
	u32 n = in->n;
	if (n > MAX_N)
		n = MAX_N;
	u64 count = 0;
	for (u32 i = 2; i < n; i++)
		count += is_prime(i);
	return count;
}

char _license[] SEC("license") = "Dual MIT/GPL";
