/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Encapsulation toward a backend: push an outer IPv4/IPv6 header (IPIP family of tunnels) or
 * outer IP + UDP (GUE variant 1) in front of the client's IP packet, keeping its L2 header
 * (and VLAN tags) in front.
 *
 * Outer protocol numbers follow the inner family, whatever the outer one is: 4 (IPIP) carries
 * IPv4, 41 (IPv6) carries IPv6, so 4in4, 6in4, 4in6 and 6in6 are all covered and the backend
 * knows the inner family without looking. GUE variant 1 (draft-ietf-intarea-gue) has no GUE
 * header at all: the UDP payload is the IP packet and its version nibble tells the family.
 */
#ifndef GD_LIB_ENCAP_H
#define GD_LIB_ENCAP_H

#include "gatewayd_maps.h"
#include "lib/common.h"
#include "lib/csum.h"
#include "lib/ctx.h"
#include "lib/parse.h"
#include "lib/proto.h"
#include "lib/reshape.h"

#define GD_OUTER_TTL 64
/* RFC 8086 / GUE: source port from the flow hash, inside the dynamic range 49152-65535. */
#define GD_GUE_SPORT_BASE 0xC000
#define GD_GUE_SPORT_MASK 0x3FFF

struct gd_encap {
	__u8 family;	/* outer family (= the backend's) */
	__u8 proto;	/* outer IP protocol / next header: 4, 41 or 17 (GUE) */
	__u16 overhead; /* bytes pushed: 20 or 40, plus 8 for GUE */
	__be16 sport;	/* GUE only */
	__be16 dport;	/* GUE only: the service's gue_port */
	__u32 hash;	/* flow hash: outer source bits, GUE source port, IPv6 flow label */
	__u8 saddr[16];
	const __u8 *daddr; /* the backend's address, in its gd_backends entry */
};

/*
 * Outer source = configured base with the hostmask bits taken from the flow hash, so that
 * the backend NIC's RSS (which hashes the outer header only for IPIP) spreads flows over
 * its queues. IPv6 words get differently rotated copies of the hash so that a hash that XORs
 * address words together cannot cancel them out. Returns -1 when the family has no source.
 */
static __always_inline int gd_outer_source(const struct gd_lb_settings *s, __u8 family,
					   __u32 hash, __u8 *out)
{
	if (family == GD_FAMILY_INET) {
		__u32 base = *(const __u32 *)s->src4;
		__u32 mask = *(const __u32 *)s->src4_hostmask;

		if (!base)
			return -1;
		*(__u32 *)out = (base & ~mask) | (hash & mask);
		return 0;
	}

	const __u32 *b = (const __u32 *)s->src6;
	const __u32 *m = (const __u32 *)s->src6_hostmask;
	__u32 *o = (__u32 *)out;

	if (!(b[0] | b[1] | b[2] | b[3]))
		return -1;
	o[0] = (b[0] & ~m[0]) | (hash & m[0]);
	o[1] = (b[1] & ~m[1]) | (gd_rol32(hash, 8) & m[1]);
	o[2] = (b[2] & ~m[2]) | (gd_rol32(hash, 16) & m[2]);
	o[3] = (b[3] & ~m[3]) | (gd_rol32(hash, 24) & m[3]);
	return 0;
}

/* Describe the outer headers for a backend/service; the addresses are filled by the caller. */
static __always_inline void gd_encap_init(struct gd_encap *e, const struct gd_pkt *pkt,
					  const struct gd_service *svc, __u8 be_family, __u32 hash)
{
	e->family = be_family;
	e->hash = hash;
	e->overhead = be_family == GD_FAMILY_INET ? sizeof(struct iphdr) : sizeof(struct ipv6hdr);
	if (svc->encap == GD_ENCAP_GUE) {
		e->proto = IPPROTO_UDP;
		e->overhead += sizeof(struct udphdr);
		e->sport = bpf_htons(GD_GUE_SPORT_BASE | (hash & GD_GUE_SPORT_MASK));
		e->dport = svc->gue_port;
	} else {
		e->proto = pkt->key.family == GD_FAMILY_INET ? IPPROTO_IPIP : IPPROTO_IPV6;
		e->sport = 0;
		e->dport = 0;
	}
}

/*
 * One's complement sum of the whole inner IP packet, from its headers alone.
 *
 * A valid TCP/UDP checksum makes the segment sum to the negated pseudo-header (that is what
 * the receiver checks), and a valid IPv4 header sums to zero. So the sum of the inner packet
 * is known without reading the payload: no loop over data, constant cost for any size (the
 * "local checksum offload" identity the kernel uses for tunnels). If the client's checksum
 * is wrong the outer checksum comes out wrong too, and the packet is dropped one hop
 * earlier than it would have been anyway.
 *
 * Not derivable for UDP sent without a checksum: returns -1 and the caller sends a zero
 * outer UDP checksum (see gd_encap).
 */
static __always_inline int gd_inner_sum(void *data, void *data_end, const struct gd_pkt *pkt,
					__u64 *sum)
{
	__u32 l3 = pkt->l3_off, l4len;

	if (pkt->key.proto == IPPROTO_UDP && pkt->udp_csum_zero)
		return -1;
	if (l3 > GD_L2_MAX)
		return -1;
	l4len = pkt->ip_len - (pkt->l4_off - l3);

	if (pkt->key.family == GD_FAMILY_INET) {
		struct iphdr *iph = data + l3;
		__u64 s = 0;

		if ((void *)(iph + 1) > data_end)
			return -1;
		/* header: 0; segment: -(saddr + daddr + proto + l4len) */
		s = gd_csum_sub32(s, iph->saddr);
		s = gd_csum_sub32(s, iph->daddr);
		s = gd_csum_sub32(s, bpf_htons((__u16)pkt->key.proto));
		s = gd_csum_sub32(s, bpf_htons((__u16)l4len));
		*sum = s;
		return 0;
	}

	struct ipv6hdr *ip6 = data + l3;
	const __u32 *w = (const __u32 *)ip6;
	__u64 s;

	if ((void *)(ip6 + 1) > data_end)
		return -1;
	/*
	 * header - pseudo-header: both contain the two addresses, which cancel; what is left
	 * is the first two words of the header minus the pseudo-header's length and next header.
	 */
	s = (__u64)w[0] + w[1];
	s = gd_csum_sub32(s, bpf_htonl(l4len));
	s = gd_csum_sub32(s, bpf_htonl((__u32)pkt->key.proto));
	*sum = s;
	return 0;
}

/*
 * Write the outer headers described by `e` at `outer` (the room for them in front of the
 * inner IP packet of `pkt`). `inner_sum` is the inner packet's sum (gd_inner_sum) when the
 * outer UDP checksum of GUE over IPv6 is to be computed, or NULL. Returns -1 when the room is
 * not within [outer, data_end). Independent of the hook: XDP makes the room with
 * gd_xdp_reshape, a TC program would with bpf_skb_adjust_room.
 */
static __always_inline int gd_encap_write(void *outer, void *data_end, const struct gd_pkt *pkt,
					  const struct gd_encap *e, const __u64 *inner_sum)
{
	__u32 outer_len = pkt->ip_len + e->overhead;

	if (e->family == GD_FAMILY_INET) {
		struct iphdr *ip = outer;
		struct udphdr *uh = (void *)(ip + 1);

		if ((void *)(uh + 1) > data_end)
			return -1;
		*(__u8 *)ip = 0x45; /* version 4, 20-byte header */
		ip->tos = pkt->tos;
		ip->tot_len = bpf_htons(outer_len);
		ip->id = 0; /* atomic datagram (DF set): RFC 6864 lets the ID be anything */
		ip->frag_off = bpf_htons(IP_DF);
		ip->ttl = GD_OUTER_TTL;
		ip->protocol = e->proto;
		ip->check = 0;
		ip->saddr = *(const __be32 *)e->saddr;
		ip->daddr = *(const __be32 *)e->daddr;
		ip->check = gd_ipv4_hdr_csum(ip);
		if (e->proto == IPPROTO_UDP) {
			uh->source = e->sport;
			uh->dest = e->dport;
			uh->len = bpf_htons(outer_len - sizeof(*ip));
			uh->check = 0;
		}
		return 0;
	}

	struct ipv6hdr *ip6 = outer;
	struct udphdr *uh = (void *)(ip6 + 1);
	__u32 plen = outer_len - sizeof(*ip6);

	if ((void *)(uh + 1) > data_end)
		return -1;
	/* Flow label from the hash: the ECMP/RSS input for IPv6 routers and NICs. */
	*(__be32 *)ip6 = bpf_htonl(0x60000000 | ((__u32)pkt->tos << 20) | (e->hash & 0xFFFFF));
	ip6->payload_len = bpf_htons(plen);
	ip6->nexthdr = e->proto;
	ip6->hop_limit = GD_OUTER_TTL;
	__builtin_memcpy(&ip6->saddr, e->saddr, 16);
	__builtin_memcpy(&ip6->daddr, e->daddr, 16);
	if (e->proto == IPPROTO_UDP) {
		uh->source = e->sport;
		uh->dest = e->dport;
		uh->len = bpf_htons(plen);
		uh->check = 0;
		if (inner_sum) {
			__u64 sum = gd_csum_pseudo6(e->saddr, e->daddr, IPPROTO_UDP, plen);
			__sum16 c;

			sum += (__u64)e->sport + e->dport + bpf_htons(plen) + *inner_sum;
			c = gd_csum_finish(sum);
			uh->check = c ? c : (__sum16)0xFFFF; /* 0 would mean "no checksum" */
		}
	}
	return 0;
}

/*
 * Push the outer headers described by `e`. On return the frame is
 * [L2 (+tags, innermost ethertype = outer family)][outer IP][UDP if GUE][inner IP packet];
 * the MAC addresses are still the received ones (the caller rewrites them after the FIB
 * lookup, or leaves them when passing to the stack). Ethernet padding of short frames is
 * dropped, or it would travel inside the tunnel as trailing garbage after the inner packet.
 * Returns -1 if the frame could not be resized, in which case the packet must be dropped (it
 * may have been modified).
 */
static __always_inline int gd_encap(struct xdp_md *ctx, const struct gd_pkt *pkt,
				    const struct gd_encap *e)
{
	__u32 l2_len = pkt->l3_off;
	__u64 inner_sum = 0;
	int udp_csum = 0;

	if (l2_len > GD_L2_MAX || pkt->ip_len + e->overhead > 0xFFFF)
		return -1;

	/*
	 * RFC 6935/6936 allow a zero UDP checksum over IPv6 only for tunnels whose endpoints
	 * opt in, and middleboxes may drop such packets, so it is computed whenever that is
	 * cheap (see gd_inner_sum). IPv4 outer: zero checksum, as RFC 768 allows.
	 */
	if (e->proto == IPPROTO_UDP && e->family == GD_FAMILY_INET6)
		udp_csum = gd_inner_sum(gd_ctx_data(ctx), gd_ctx_data_end(ctx), pkt, &inner_sum) == 0;

	if (gd_xdp_reshape(ctx, pkt, pkt->ip_len, e->overhead,
			   e->family == GD_FAMILY_INET ? bpf_htons(ETH_P_IP) : bpf_htons(ETH_P_IPV6),
			   0))
		return -1;
	return gd_encap_write(gd_ctx_data(ctx) + l2_len, gd_ctx_data_end(ctx), pkt, e,
			      udp_csum ? &inner_sum : NULL);
}

#endif /* GD_LIB_ENCAP_H */
