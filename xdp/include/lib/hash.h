/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Bob Jenkins' lookup3 (the kernel's jhash) over a gd_flow_key: the load balancer's flow hash
 * (Maglev slot, outer source bits) and the egress NAT's deterministic port choice.
 */
#ifndef GD_LIB_HASH_H
#define GD_LIB_HASH_H

#include "gatewayd_maps.h"
#include "lib/common.h"

/*
 * Flow hash: Bob Jenkins' lookup3 exactly as the kernel's jhash_3words()/jhash2() compute it
 * (include/linux/jhash.h), over the client 5-tuple, with a fixed seed (enum gd_hash_seed).
 *
 * - IPv4: jhash_3words(src, dst, ports, GD_HASH_SEED + proto)
 * - IPv6: jhash2({src[0..3], dst[0..3], ports, proto}, 10, GD_HASH_SEED)
 *
 * Every word is the 4 bytes of the packet field read as a host-order (little-endian) u32;
 * `ports` is sport:dport as they sit in the packet. The seed is fixed on purpose: every
 * gateway must pick the same Maglev slot for a flow, so that when the upstream router's ECMP
 * moves a flow to another gateway (gateway added/removed) it still reaches the same backend.
 * Userspace can reproduce the hash to answer "where would this flow go".
 */
#define GD_JHASH_INITVAL 0xdeadbeef

#define gd_jhash_mix(a, b, c)                                                                     \
	do {                                                                                       \
		a -= c; a ^= gd_rol32(c, 4); c += b;                                                \
		b -= a; b ^= gd_rol32(a, 6); a += c;                                                \
		c -= b; c ^= gd_rol32(b, 8); b += a;                                                \
		a -= c; a ^= gd_rol32(c, 16); c += b;                                               \
		b -= a; b ^= gd_rol32(a, 19); a += c;                                               \
		c -= b; c ^= gd_rol32(b, 4); b += a;                                                \
	} while (0)

#define gd_jhash_final(a, b, c)                                                                   \
	do {                                                                                       \
		c ^= b; c -= gd_rol32(b, 14);                                                       \
		a ^= c; a -= gd_rol32(c, 11);                                                       \
		b ^= a; b -= gd_rol32(a, 25);                                                       \
		c ^= b; c -= gd_rol32(b, 16);                                                       \
		a ^= c; a -= gd_rol32(c, 4);                                                        \
		b ^= a; b -= gd_rol32(a, 14);                                                       \
		c ^= b; c -= gd_rol32(b, 24);                                                       \
	} while (0)

static __always_inline __u32 gd_jhash_3words(__u32 a, __u32 b, __u32 c, __u32 initval)
{
	initval += GD_JHASH_INITVAL + (3 << 2);
	a += initval;
	b += initval;
	c += initval;
	gd_jhash_final(a, b, c);
	return c;
}

/* The flow hash with another seed, for uses that must not correlate with the Maglev choice. */
static __always_inline __u32 gd_flow_hash_seeded(const struct gd_flow_key *k, __u32 seed)
{
	const __u32 *s = (const __u32 *)k->src;
	const __u32 *d = (const __u32 *)k->dst;
	__u32 ports = *(const __u32 *)&k->sport;
	__u32 a, b, c;

	if (k->family == GD_FAMILY_INET)
		return gd_jhash_3words(s[0], d[0], ports, seed + k->proto);

	/* jhash2 over 10 words, unrolled: three mixing rounds, then the tenth word. */
	a = b = c = GD_JHASH_INITVAL + (10 << 2) + seed;
	a += s[0]; b += s[1]; c += s[2];
	gd_jhash_mix(a, b, c);
	a += s[3]; b += d[0]; c += d[1];
	gd_jhash_mix(a, b, c);
	a += d[2]; b += d[3]; c += ports;
	gd_jhash_mix(a, b, c);
	a += k->proto;
	gd_jhash_final(a, b, c);
	return c;
}

static __always_inline __u32 gd_flow_hash(const struct gd_flow_key *k)
{
	return gd_flow_hash_seeded(k, GD_HASH_SEED);
}

#endif /* GD_LIB_HASH_H */
