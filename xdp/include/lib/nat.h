/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The packet side of the egress NAT (tc programs): what a parsed packet is to the NAT, and
 * rewriting addresses, ports / ICMP identifiers and every checksum that covers them, in place.
 * No maps here: lib/conntrack.h decides the translation, this header applies it.
 *
 * Frames start with an untagged Ethernet header: the programs run on the egress interface
 * itself (for a VLAN, its VLAN device, where the tag is not in the frame), so they parse
 * without GD_PARSE_VLAN and the IP header is at GD_NAT_L3.
 *
 * Checksums and the skb's checksum state. TCP/UDP checksums are updated with
 * bpf_l4_csum_replace(), the only way to honour CHECKSUM_PARTIAL (GSO/offloaded packets, where
 * the field holds the pseudo-header seed and the data is summed later): a pseudo-header change
 * goes in with BPF_F_PSEUDO_HDR, a port change without it. The helper also keeps a
 * CHECKSUM_COMPLETE skb->csum right for IPv4, where the rest of the rewrite is neutral (the
 * IPv4 header checksum compensates the address change). IPv6 has no header checksum, so the
 * new address is written with bpf_skb_store_bytes(BPF_F_RECOMPUTE_CSUM), which adds back what
 * the helper subtracted. ICMP echo and ICMP errors are never CHECKSUM_PARTIAL and every change
 * in them is compensated inside the packet (ICMP checksum, quoted header checksum), so they are
 * rewritten with direct stores and checksums computed with lib/csum.h.
 */
#ifndef GD_LIB_NAT_H
#define GD_LIB_NAT_H

#include "gatewayd_maps.h"
#include "lib/common.h"
#include "lib/csum.h"
#include "lib/ctx.h"
#include "lib/parse.h"
#include "lib/proto.h"

#define GD_NAT_L3 ETH_HLEN

/* What the NAT parses: ports of TCP and UDP, identifiers of ICMP echo, ICMP errors. */
#define GD_NAT_PARSE (GD_PARSE_TCP | GD_PARSE_UDP | GD_PARSE_ICMP)

enum gd_nat_kind {
	GD_NAT_NONE,	   /* not IPv4/IPv6: none of the NAT's business */
	GD_NAT_FLOW,	   /* TCP, UDP, or the ICMP echo message this direction translates */
	GD_NAT_ICMP_ERROR, /* an ICMP error: translated by the flow of the packet it quotes */
	GD_NAT_FRAGMENT,   /* later fragment of TCP/UDP/ICMP: no ports, addresses only */
	GD_NAT_OTHER,	   /* IP, but nothing the NAT can translate */
	GD_NAT_MALFORMED,  /* truncated or inconsistent headers */
};

/*
 * What a packet parsed with GD_NAT_PARSE is to the NAT. `reply`: the direction (0 =
 * gatewayd_snat, 1 = gatewayd_rnat), which decides which ICMP echo messages are flows:
 * requests go out, replies come back.
 */
static __always_inline int gd_nat_kind(const struct gd_pkt *p, int parsed, int reply)
{
	__u8 proto = p->key.proto;

	if (parsed == GD_PARSE_NOT_IP)
		return GD_NAT_NONE;
	if (parsed == GD_PARSE_MALFORMED)
		return GD_NAT_MALFORMED;
	if (parsed == GD_PARSE_L3)
		return p->frag == GD_FRAG_LATER && gd_parse_wants(GD_NAT_PARSE, p->key.family, proto)
			       ? GD_NAT_FRAGMENT
			       : GD_NAT_OTHER;
	if (proto != IPPROTO_ICMP && proto != IPPROTO_ICMPV6)
		return GD_NAT_FLOW;
	if (gd_icmp_is_echo(proto, p->icmp_type))
		return gd_icmp_is_echo_reply(proto, p->icmp_type) == reply ? GD_NAT_FLOW
									    : GD_NAT_OTHER;
	if (gd_icmp_is_error(proto, p->icmp_type))
		return GD_NAT_ICMP_ERROR;
	return GD_NAT_OTHER;
}

/* Parse a frame for the NAT (see gd_nat_kind). */
static __always_inline int gd_nat_parse(struct __sk_buff *skb, struct gd_pkt *p, int reply)
{
	return gd_nat_kind(p, gd_parse(skb, p, GD_NAT_PARSE), reply);
}

/* Write a new IPv4 source (to_dst = 0) or destination address, updating the header checksum. */
static __always_inline void gd_ipv4_set_addr(struct iphdr *iph, int to_dst, __be32 addr)
{
	__be32 *a = to_dst ? &iph->daddr : &iph->saddr;

	iph->check = gd_csum_replace4(iph->check, *a, addr);
	*a = addr;
}

/*
 * Rewrite the source (snat, to_dst = 0) or the destination (rnat, to_dst = 1) address and port
 * (ICMP echo: identifier) of a GD_NAT_FLOW packet to addr/port. Returns nonzero, with nothing
 * written, only if the skb cannot be made writable.
 */
static __always_inline int gd_nat_rewrite(struct __sk_buff *skb, const struct gd_pkt *p,
					  int to_dst, const __u8 *addr, __be16 port)
{
	__u32 l4 = p->l4_off, aoff, poff, csum_off;
	__u8 proto = p->key.proto, old6[16];
	__u64 mm0 = proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	void *data, *data_end;
	__be32 old4 = 0;
	__be16 old_port;
	__s64 diff;

	/* Bounded for the verifier: the parser set 34..74 (IPv4) or 54/62 (IPv6). */
	if (l4 > GD_NAT_L3 + GD_IPV4_HDR_MAX)
		return -1;
	data = gd_ctx_data(skb);
	data_end = gd_ctx_data_end(skb);

	if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6) {
		struct gd_icmphdr *ic = data + l4;
		__u64 sum;

		if ((void *)(ic + 1) > data_end)
			return -1;
		sum = gd_csum_delta2(gd_csum_unfold(ic->checksum), ic->un.echo.id, port);
		if (p->key.family == GD_FAMILY_INET) {
			struct iphdr *iph = data + GD_NAT_L3;

			if ((void *)(iph + 1) > data_end)
				return -1;
			gd_ipv4_set_addr(iph, to_dst, *(const __be32 *)addr);
		} else {
			struct ipv6hdr *ip6 = data + GD_NAT_L3;
			void *a;

			if ((void *)(ip6 + 1) > data_end)
				return -1;
			a = to_dst ? (void *)&ip6->daddr : (void *)&ip6->saddr;
			/* ICMPv6 covers a pseudo-header: the address is part of its sum. */
			sum = gd_csum_delta16(sum, a, addr);
			__builtin_memcpy(a, addr, 16);
		}
		ic->un.echo.id = port;
		ic->checksum = gd_csum_finish(sum);
		return 0;
	}

	csum_off = l4 + (proto == IPPROTO_TCP ? offsetof(struct tcphdr, check)
					      : offsetof(struct udphdr, check));
	poff = l4 + (to_dst ? offsetof(struct tcphdr, dest) : offsetof(struct tcphdr, source));
	{
		__be16 *pp = data + poff;

		if ((void *)(pp + 1) > data_end)
			return -1;
		old_port = *pp;
	}

	/* The first helper call is the only one that can fail (making the skb writable). */
	if (p->key.family == GD_FAMILY_INET) {
		struct iphdr *iph = data + GD_NAT_L3;

		if ((void *)(iph + 1) > data_end)
			return -1;
		old4 = to_dst ? iph->daddr : iph->saddr;
		if (bpf_l4_csum_replace(skb, csum_off, old4, *(const __be32 *)addr,
					BPF_F_PSEUDO_HDR | mm0 | sizeof(old4)))
			return -1;
	} else {
		struct ipv6hdr *ip6 = data + GD_NAT_L3;

		if ((void *)(ip6 + 1) > data_end)
			return -1;
		__builtin_memcpy(old6, to_dst ? (void *)&ip6->daddr : (void *)&ip6->saddr, 16);
		diff = bpf_csum_diff((__be32 *)old6, 16, (__be32 *)addr, 16, 0);
		if (bpf_l4_csum_replace(skb, csum_off, 0, diff, BPF_F_PSEUDO_HDR | mm0))
			return -1;
		aoff = GD_NAT_L3 + (to_dst ? offsetof(struct ipv6hdr, daddr)
					   : offsetof(struct ipv6hdr, saddr));
		/* Adds the address change to a CHECKSUM_COMPLETE skb->csum (see the top). */
		bpf_skb_store_bytes(skb, aoff, addr, 16, BPF_F_RECOMPUTE_CSUM);
	}
	bpf_l4_csum_replace(skb, csum_off, old_port, port, mm0 | sizeof(port));

	/* The helpers invalidated every packet pointer. */
	data = gd_ctx_data(skb);
	data_end = gd_ctx_data_end(skb);
	{
		__be16 *pp = data + poff;

		if ((void *)(pp + 1) > data_end)
			return -1;
		*pp = port;
	}
	if (p->key.family == GD_FAMILY_INET) {
		struct iphdr *iph = data + GD_NAT_L3;

		if ((void *)(iph + 1) > data_end)
			return -1;
		gd_ipv4_set_addr(iph, to_dst, *(const __be32 *)addr);
	}
	return 0;
}

/*
 * A later fragment (no L4 header): only the address changes. The L4 checksum, in the first
 * fragment, was updated for the whole datagram when that fragment was translated.
 */
static __always_inline int gd_nat_rewrite_addr(struct __sk_buff *skb, const struct gd_pkt *p,
					       int to_dst, const __u8 *addr)
{
	if (p->key.family == GD_FAMILY_INET) {
		struct iphdr *iph = gd_ctx_data(skb) + GD_NAT_L3;

		if ((void *)(iph + 1) > gd_ctx_data_end(skb))
			return -1;
		gd_ipv4_set_addr(iph, to_dst, *(const __be32 *)addr);
		return 0;
	}
	return bpf_skb_store_bytes(skb,
				   GD_NAT_L3 + (to_dst ? offsetof(struct ipv6hdr, daddr)
						       : offsetof(struct ipv6hdr, saddr)),
				   addr, 16, BPF_F_RECOMPUTE_CSUM);
}

/*
 * An ICMP error quotes a packet that went the other way. Arriving (reply = 1) for the egress
 * address, it quotes a packet as it left, translated: source = egress address and NAT port;
 * the REPLY entry of that flow translates it back. Sent by a pod (reply = 0, e.g. port
 * unreachable for a late answer), it quotes a reply as the pod received it: destination = pod
 * address and port; the ORIGINAL entry translates it. Either way the entry's key (`key`) is
 * the quoted packet's 5-tuple reversed, and the outer address on the pod's side must be the
 * quoted one. Returns GD_NAT_ICMP_ERROR when the quote can be translated, GD_NAT_OTHER when it
 * cannot (quoted later fragment, other protocol or echo message, outer/quoted address
 * mismatch), GD_NAT_MALFORMED when truncated.
 */
static __always_inline int gd_nat_parse_quote(struct __sk_buff *skb, const struct gd_pkt *p,
					      struct gd_quote *q, struct gd_flow_key *key, int reply)
{
	int rc = gd_parse_quote(skb, p, q, GD_NAT_PARSE);
	__u8 proto = q->key.proto;

	if (rc == GD_PARSE_MALFORMED)
		return GD_NAT_MALFORMED;
	if (rc != GD_PARSE_L4)
		return GD_NAT_OTHER;
	if (!gd_addr_eq(reply ? q->key.src : q->key.dst, reply ? p->key.dst : p->key.src))
		return GD_NAT_OTHER;
	/* The quoted packet went the other way: a request going out, a reply coming in. */
	if ((proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6) &&
	    (!gd_icmp_is_echo(proto, q->icmp_type) ||
	     gd_icmp_is_echo_reply(proto, q->icmp_type) == reply))
		return GD_NAT_OTHER;
	__builtin_memset(key, 0, sizeof(*key));
	__builtin_memcpy(key->src, q->key.dst, 16);
	__builtin_memcpy(key->dst, q->key.src, 16);
	key->sport = q->key.dport;
	key->dport = q->key.sport;
	key->proto = proto;
	key->family = q->key.family;
	return GD_NAT_ICMP_ERROR;
}

/*
 * Translate an ICMP error: on the pod's side of it (reply = 1: the outer destination and the
 * quoted source; reply = 0: the outer source and the quoted destination) the address becomes
 * addr and the quoted port / identifier port. Fixed along: the quoted IPv4 header checksum,
 * the quoted L4 checksum when the quote holds it (UDP and ICMP always, TCP only if 18+ bytes
 * were quoted; a zero UDP checksum stays zero), the outer IPv4 and ICMP checksums.
 *
 * ICMP errors are at least 70 bytes, never Ethernet-padded: data_end is the end of the quote.
 */
static __always_inline int gd_nat_rewrite_quote(struct __sk_buff *skb, const struct gd_pkt *p,
						const struct gd_quote *q, int reply,
						const __u8 *addr, __be16 port)
{
	void *data = gd_ctx_data(skb);
	void *data_end = gd_ctx_data_end(skb);
	__u32 l4 = p->l4_off, il3 = q->l3_off, il4 = q->l4_off;
	__u8 proto = q->key.proto;
	struct gd_icmphdr *outer;
	__u64 sum, l4sum = 0;
	__sum16 *l4check = NULL;
	__be16 *pp;

	/*
	 * Bounds for the verifier, checked before any pointer is made from these offsets: outer
	 * and quoted IPv4 headers are at most 60 bytes each.
	 */
	if (l4 > GD_NAT_L3 + GD_IPV4_HDR_MAX || il3 > GD_NAT_L3 + GD_IPV4_HDR_MAX + 8 ||
	    il4 > GD_NAT_L3 + GD_IPV4_HDR_MAX + 8 + GD_IPV4_HDR_MAX)
		return -1;
	outer = data + l4;
	if ((void *)(outer + 1) > data_end)
		return -1;
	if (proto == IPPROTO_TCP || proto == IPPROTO_UDP)
		pp = data + il4 + (reply ? offsetof(struct udphdr, source) : offsetof(struct udphdr, dest));
	else
		pp = data + il4 + offsetof(struct gd_icmphdr, un.echo.id);
	if ((void *)(pp + 1) > data_end)
		return -1;

	/* The quoted L4 checksum: its pseudo-header holds the quoted addresses (ICMPv4: none). */
	if (proto == IPPROTO_UDP) {
		l4check = data + il4 + offsetof(struct udphdr, check);
		if ((void *)(l4check + 1) > data_end || !*l4check)
			l4check = NULL;
	} else if (proto == IPPROTO_TCP) {
		l4check = data + il4 + offsetof(struct tcphdr, check);
		if ((void *)(l4check + 1) > data_end)
			l4check = NULL;
	} else {
		l4check = data + il4 + offsetof(struct gd_icmphdr, checksum);
		if ((void *)(l4check + 1) > data_end)
			return -1;
	}
	if (l4check)
		l4sum = gd_csum_delta2(gd_csum_unfold(*l4check), *pp, port);
	/* ICMP checksum: every byte changed inside the message. */
	sum = gd_csum_delta2(gd_csum_unfold(outer->checksum), *pp, port);

	if (p->key.family == GD_FAMILY_INET) {
		struct iphdr *iph = data + GD_NAT_L3;
		struct iphdr *in = data + il3;
		__be32 new4 = *(const __be32 *)addr, old4, *inner_a;
		__sum16 old_check;

		if ((void *)(iph + 1) > data_end || (void *)(in + 1) > data_end)
			return -1;
		inner_a = reply ? &in->saddr : &in->daddr;
		old4 = *inner_a;
		if (l4check && proto != IPPROTO_ICMP)
			l4sum = gd_csum_delta4(l4sum, old4, new4);
		old_check = in->check;
		in->check = gd_csum_replace4(old_check, old4, new4);
		*inner_a = new4;
		sum = gd_csum_delta4(sum, old4, new4);
		sum = gd_csum_delta2(sum, old_check, in->check);
		/* The outer address on the pod's side is the quoted one (gd_nat_parse_quote). */
		gd_ipv4_set_addr(iph, reply, new4);
	} else {
		struct ipv6hdr *ip6 = data + GD_NAT_L3;
		struct ipv6hdr *in = data + il3;
		void *inner_a, *outer_a;
		__u8 old6[16];

		if ((void *)(ip6 + 1) > data_end || (void *)(in + 1) > data_end)
			return -1;
		inner_a = reply ? (void *)&in->saddr : (void *)&in->daddr;
		outer_a = reply ? (void *)&ip6->daddr : (void *)&ip6->saddr;
		__builtin_memcpy(old6, inner_a, 16);
		if (l4check)
			l4sum = gd_csum_delta16(l4sum, old6, addr);
		/* Twice: in the ICMPv6 pseudo-header (outer address) and in the quote. */
		sum = gd_csum_delta16(sum, old6, addr);
		sum = gd_csum_delta16(sum, old6, addr);
		__builtin_memcpy(inner_a, addr, 16);
		__builtin_memcpy(outer_a, addr, 16);
	}
	if (l4check) {
		__sum16 old_l4 = *l4check, new_l4 = gd_csum_finish(l4sum);

		/* A computed UDP checksum of zero is sent as all ones (RFC 768). */
		if (proto == IPPROTO_UDP && !new_l4)
			new_l4 = 0xffff;
		*l4check = new_l4;
		sum = gd_csum_delta2(sum, old_l4, new_l4);
	}
	*pp = port;
	outer->checksum = gd_csum_finish(sum);
	return 0;
}

#endif /* GD_LIB_NAT_H */
