/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Internet checksum (RFC 1071) arithmetic, the one library for every program: sums of headers
 * built from scratch (encapsulation, ICMP errors) and RFC 1624 incremental updates of
 * checksums over rewritten fields (NAT). The skb helpers that also keep the kernel's checksum
 * state right (bpf_l4_csum_replace) are used by lib/nat.h on top of these.
 *
 * Sums are accumulated in a __u64 from 16- or 32-bit words loaded exactly as they sit in
 * memory (network order) and folded at the end. The one's complement sum does not care about
 * byte order as long as every word is taken the same way, so no byte swapping is needed and
 * the folded result can be stored into the packet as is. Values that are not in the packet
 * (lengths, protocol numbers) are added in network order (bpf_htons/bpf_htonl) for the same
 * reason.
 */
#ifndef GD_LIB_CSUM_H
#define GD_LIB_CSUM_H

#include <linux/ip.h>

#include "lib/common.h"

/* Fold a 64-bit accumulator to 16 bits (end-around carry), not complemented. */
static __always_inline __u16 gd_csum_fold(__u64 sum)
{
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

/* The value to store in a checksum field. */
static __always_inline __sum16 gd_csum_finish(__u64 sum)
{
	return (__sum16)~gd_csum_fold(sum);
}

/* The partial sum a checksum field stands for: where an incremental update starts. */
static __always_inline __u64 gd_csum_unfold(__sum16 check)
{
	return (__u16)~check;
}

/*
 * One's complement subtraction of a 32-bit word: adding ~x is adding -x modulo 2^32-1, which
 * is also -x modulo 2^16-1 (a factor of it), so it survives the final fold.
 */
static __always_inline __u64 gd_csum_sub32(__u64 sum, __u32 x)
{
	return sum + (__u32)~x;
}

/*
 * RFC 1624: the partial sum `sum` once a field of the summed data changes from `from` to `to`
 * (HC' = ~(~HC + ~m + m')), for 2-, 4- and 16-byte fields.
 */
static __always_inline __u64 gd_csum_delta2(__u64 sum, __be16 from, __be16 to)
{
	return sum + (__u16)~from + to;
}

static __always_inline __u64 gd_csum_delta4(__u64 sum, __be32 from, __be32 to)
{
	return gd_csum_sub32(sum, from) + to;
}

static __always_inline __u64 gd_csum_delta16(__u64 sum, const void *from, const void *to)
{
	const __u32 *f = from, *t = to;
	int i;

#pragma unroll
	for (i = 0; i < 4; i++)
		sum = gd_csum_delta4(sum, f[i], t[i]);
	return sum;
}

/* The checksum field `check` once a 4-byte field it covers changes from `from` to `to`. */
static __always_inline __sum16 gd_csum_replace4(__sum16 check, __be32 from, __be32 to)
{
	return gd_csum_finish(gd_csum_delta4(gd_csum_unfold(check), from, to));
}

/*
 * Sum of memory through bpf_csum_diff (used where the region is too long to unroll). Recent
 * kernels return the sum folded to 16 bits, older ones a 32-bit partial sum: either is a
 * valid partial sum to add, so the result is the same on every kernel. The seed is kept at
 * zero for that reason. `size` must be a multiple of 4 and at most 512 bytes
 * (the limit of older kernels).
 */
static __always_inline __u64 gd_csum_mem(__u64 sum, void *p, __u32 size)
{
	__s64 r = bpf_csum_diff(NULL, 0, p, size, 0);

	return r < 0 ? sum : sum + (__u32)r;
}

/* Checksum of a 20-byte IPv4 header (no options) whose check field is zero. */
static __always_inline __sum16 gd_ipv4_hdr_csum(const struct iphdr *iph)
{
	const __u32 *w = (const __u32 *)iph;

	return gd_csum_finish((__u64)w[0] + w[1] + w[2] + w[3] + w[4]);
}

/* IPv6 pseudo-header (RFC 8200 8.1) as a partial sum. */
static __always_inline __u64 gd_csum_pseudo6(const void *saddr, const void *daddr, __u8 nh,
					     __u32 len)
{
	const __u32 *s = saddr, *d = daddr;

	return (__u64)s[0] + s[1] + s[2] + s[3] + d[0] + d[1] + d[2] + d[3] + bpf_htonl(len) +
	       bpf_htonl((__u32)nh);
}

#endif /* GD_LIB_CSUM_H */
