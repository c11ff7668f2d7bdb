/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The one packet parser of the datapath, for the balancer (XDP), the egress NAT and the
 * backend decapsulation (TC): Ethernet, up to two VLAN tags, IPv4 (options) or IPv6 (at most
 * one Fragment header), then the L4 headers the caller asks for (TCP, UDP, ICMP/ICMPv6); and
 * the packet quoted by an ICMP error. Bounds-checked, it never modifies the packet.
 *
 * It answers three questions: what the packet is (the 5-tuple in gatewayd_maps.h layout, ready
 * to be a map key), whether it is well formed enough to be touched, and where its headers are.
 * What a program does with a packet (balance it, translate it, strip its tunnel header) is the
 * program's: each maps the result to its own verdicts.
 *
 * The caller's flags say which L4 headers to read; they are constant at every call site, so
 * what is not asked for is compiled out. An L4 protocol not asked for ends the parse at L3,
 * as does a later fragment (no L4 header) or an IPv6 extension header other than one Fragment
 * header: walking a chain costs a loop per packet and none of the programs' traffic has one.
 */
#ifndef GD_LIB_PARSE_H
#define GD_LIB_PARSE_H

#include "gatewayd_maps.h"
#include "lib/common.h"
#include "lib/ctx.h"
#include "lib/proto.h"

/* What to parse (constant flags of the call). */
#define GD_PARSE_VLAN (1U << 0) /* walk VLAN tags: XDP sees them in the frame, TC normally not */
#define GD_PARSE_TCP (1U << 1)
#define GD_PARSE_UDP (1U << 2)
#define GD_PARSE_ICMP (1U << 3) /* ICMP in IPv4, ICMPv6 in IPv6 */

enum gd_parse_result {
	/* IP and an L4 header asked for: the key is the full 5-tuple. */
	GD_PARSE_L4 = 0,
	/*
	 * IP only: a later fragment (pkt->frag), an L4 protocol not asked for, or IPv6 extension
	 * headers. Addresses, protocol and l4_off are set, ports are zero.
	 */
	GD_PARSE_L3,
	/* Neither IPv4 nor IPv6 (or more VLAN tags than walked), or no memory to pull (TC). */
	GD_PARSE_NOT_IP,
	/* Truncated or inconsistent headers: the stack counts and drops such packets. */
	GD_PARSE_MALFORMED,
};

enum gd_frag {
	GD_FRAG_NONE = 0,
	GD_FRAG_FIRST, /* offset 0 of a fragmented datagram (IPv6: any Fragment header at offset 0) */
	GD_FRAG_LATER, /* no L4 header: its ports are in the first fragment */
};

struct gd_pkt {
	struct gd_flow_key key; /* as on the wire; ICMP echo: sport = dport = identifier */
	__u32 len;		/* frame length as received (L2 included): the counters' bytes */
	__u16 l3_off;		/* Ethernet + VLAN tags: 14, 18 or 22 */
	__u16 l4_off;		/* after the IP header (and the Fragment header) */
	__u16 ip_len;		/* IPv4 tot_len, or 40 + IPv6 payload_len: excludes L2 padding */
	__u8 vlans;		/* VLAN tags walked, 0..GD_VLAN_MAX */
	__u8 frag;		/* enum gd_frag */
	__u8 df;		/* IPv4 DF bit; always 1 for IPv6 (routers never fragment it) */
	__u8 tos;		/* IPv4 TOS / IPv6 traffic class */
	__u8 tcp_flags;		/* byte 13 of the TCP header (GD_TCP_*) */
	__u8 icmp_type;		/* ICMP / ICMPv6 message type */
	__u8 udp_csum_zero;	/* UDP sent without checksum (legal in IPv4 only) */
	__u8 pad[3];
};

/*
 * What a TC parse makes directly readable first: Ethernet, the longest IPv4 header and a TCP
 * header (the longest L4 header parsed). The quote of an ICMP error needs more: see
 * GD_QUOTE_PULL.
 */
#define GD_PARSE_PULL (ETH_HLEN + GD_IPV4_HDR_MAX + 20)

/* Is the header of `proto` one the caller asked for? */
static __always_inline int gd_parse_wants(__u32 flags, __u8 family, __u8 proto)
{
	return ((flags & GD_PARSE_TCP) && proto == IPPROTO_TCP) ||
	       ((flags & GD_PARSE_UDP) && proto == IPPROTO_UDP) ||
	       ((flags & GD_PARSE_ICMP) && proto == gd_icmp_proto(family));
}

/* The L4 header at `l4`, `avail` bytes of IP payload from there on. */
static __always_inline int gd_parse_l4(void *l4, void *data_end, __u32 avail, struct gd_pkt *pkt,
				       __u32 flags)
{
	__u8 proto = pkt->key.proto;

	gd_opaque(l4);
	if ((flags & GD_PARSE_TCP) && proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;

		if ((void *)(th + 1) > data_end || avail < sizeof(*th))
			return GD_PARSE_MALFORMED;
		pkt->key.sport = th->source;
		pkt->key.dport = th->dest;
		pkt->tcp_flags = ((__u8 *)th)[13];
		return GD_PARSE_L4;
	}
	if ((flags & GD_PARSE_UDP) && proto == IPPROTO_UDP) {
		struct udphdr *uh = l4;

		if ((void *)(uh + 1) > data_end || avail < sizeof(*uh))
			return GD_PARSE_MALFORMED;
		pkt->key.sport = uh->source;
		pkt->key.dport = uh->dest;
		pkt->udp_csum_zero = uh->check == 0;
		return GD_PARSE_L4;
	}
	if ((flags & GD_PARSE_ICMP) && proto == gd_icmp_proto(pkt->key.family)) {
		struct gd_icmphdr *ic = l4;

		if ((void *)(ic + 1) > data_end || avail < sizeof(*ic))
			return GD_PARSE_MALFORMED;
		pkt->icmp_type = ic->type;
		/* The identifier plays the port of an echo flow (both ends see the same one). */
		if (gd_icmp_is_echo(proto, ic->type)) {
			pkt->key.sport = ic->un.echo.id;
			pkt->key.dport = ic->un.echo.id;
		}
		return GD_PARSE_L4;
	}
	return GD_PARSE_L3;
}

static __always_inline int gd_parse_ipv4(void *data, void *data_end, __u32 off, struct gd_pkt *pkt,
					 __u32 flags)
{
	struct iphdr *iph = data + off;
	__u32 hlen, tot;
	__u16 frag;

	if ((void *)(iph + 1) > data_end)
		return GD_PARSE_MALFORMED;
	if (iph->version != 4 || iph->ihl < 5)
		return GD_PARSE_MALFORMED;
	hlen = iph->ihl * 4;
	tot = bpf_ntohs(iph->tot_len);
	/* Scalar checks (no pointer maths): the frame may carry Ethernet padding after tot. */
	if (tot < hlen || tot > pkt->len - off)
		return GD_PARSE_MALFORMED;

	pkt->key.family = GD_FAMILY_INET;
	pkt->key.proto = iph->protocol;
	*(__be32 *)pkt->key.src = iph->saddr;
	*(__be32 *)pkt->key.dst = iph->daddr;
	pkt->ip_len = tot;
	pkt->tos = iph->tos;
	pkt->l4_off = off + hlen;
	frag = bpf_ntohs(iph->frag_off);
	pkt->df = !!(frag & IP_DF);
	if (frag & IP_OFFSET) {
		pkt->frag = GD_FRAG_LATER;
		return GD_PARSE_L3;
	}
	if (frag & IP_MF)
		pkt->frag = GD_FRAG_FIRST;
	/* hlen is 20..60 (4-bit ihl): a bounded variable offset the verifier accepts. */
	return gd_parse_l4((void *)iph + hlen, data_end, tot - hlen, pkt, flags);
}

static __always_inline int gd_parse_ipv6(void *data, void *data_end, __u32 off, struct gd_pkt *pkt,
					 __u32 flags)
{
	struct ipv6hdr *ip6 = data + off;
	__u32 plen, l4 = sizeof(*ip6);
	__u8 nh;

	if ((void *)(ip6 + 1) > data_end)
		return GD_PARSE_MALFORMED;
	if (ip6->version != 6)
		return GD_PARSE_MALFORMED;
	plen = bpf_ntohs(ip6->payload_len);
	if (sizeof(*ip6) + plen > pkt->len - off)
		return GD_PARSE_MALFORMED;

	pkt->key.family = GD_FAMILY_INET6;
	__builtin_memcpy(pkt->key.src, &ip6->saddr, 16);
	__builtin_memcpy(pkt->key.dst, &ip6->daddr, 16);
	pkt->ip_len = sizeof(*ip6) + plen;
	pkt->tos = (ip6->priority << 4) | (ip6->flow_lbl[0] >> 4);
	pkt->df = 1;

	nh = ip6->nexthdr;
	if (nh == NEXTHDR_FRAGMENT) {
		struct gd_frag6_hdr *fh = (void *)(ip6 + 1);

		if ((void *)(fh + 1) > data_end || plen < sizeof(*fh))
			return GD_PARSE_MALFORMED;
		nh = fh->nexthdr;
		l4 += sizeof(*fh);
		/* Offset 0, with or without M (atomic fragments included): a first fragment. */
		pkt->frag = fh->frag_off & bpf_htons(0xFFF8) ? GD_FRAG_LATER : GD_FRAG_FIRST;
	}
	pkt->key.proto = nh;
	pkt->l4_off = off + l4;
	/* Not asked for: extension headers (hop-by-hop, routing, ...) and other protocols. */
	if (pkt->frag == GD_FRAG_LATER || !gd_parse_wants(flags, GD_FAMILY_INET6, nh))
		return GD_PARSE_L3;
	if (plen == 0)
		return GD_PARSE_MALFORMED; /* jumbogram without hop-by-hop header */
	/* l4 is 40 or 48 here. */
	return gd_parse_l4((void *)ip6 + l4, data_end, sizeof(*ip6) + plen - l4, pkt, flags);
}

/*
 * The IP packet of family `eth_proto` (ETH_P_IP / ETH_P_IPV6, network order) at `off`: the
 * entry point for a packet inside a tunnel as well as for a frame's own.
 */
static __always_inline int gd_parse_ip(void *data, void *data_end, __u32 off, __be16 eth_proto,
				       struct gd_pkt *pkt, __u32 flags)
{
	if (eth_proto == bpf_htons(ETH_P_IP))
		return gd_parse_ipv4(data, data_end, off, pkt, flags);
	if (eth_proto == bpf_htons(ETH_P_IPV6))
		return gd_parse_ipv6(data, data_end, off, pkt, flags);
	return GD_PARSE_NOT_IP;
}

/*
 * Parse the frame at [data, data_end), `len` bytes in all. The key is fully initialised
 * (padding and unused address bytes zero) so it can be used as a map key as is.
 */
static __always_inline int gd_parse_frame(void *data, void *data_end, __u32 len,
					  struct gd_pkt *pkt, __u32 flags)
{
	struct ethhdr *eth = data;
	__u32 off = sizeof(*eth);
	__be16 proto;

	__builtin_memset(pkt, 0, sizeof(*pkt));
	pkt->len = len;
	if ((void *)(eth + 1) > data_end)
		return GD_PARSE_MALFORMED;
	proto = eth->h_proto;

	/* Unrolled by hand: at most GD_VLAN_MAX (two) tags; a third is not IP to us. */
	if ((flags & GD_PARSE_VLAN) && gd_is_vlan(proto)) {
		struct gd_vlan_hdr *vh = data + off;

		if ((void *)(vh + 1) > data_end)
			return GD_PARSE_MALFORMED;
		proto = vh->proto;
		off += sizeof(*vh);
		pkt->vlans = 1;
		if (gd_is_vlan(proto)) {
			vh = data + off;
			if ((void *)(vh + 1) > data_end)
				return GD_PARSE_MALFORMED;
			proto = vh->proto;
			off += sizeof(*vh);
			pkt->vlans = 2;
		}
	}
	pkt->l3_off = off;
	return gd_parse_ip(data, data_end, off, proto, pkt, flags);
}

/*
 * Parse the frame of an XDP or TC context (lib/ctx.h). TC makes the headers readable first; a
 * frame the kernel had no memory to linearise is reported as not IP: nothing can be done with
 * it but to pass it on.
 */
#define gd_parse(ctx, pkt, flags)                                                                  \
	(gd_ctx_pull((ctx), GD_PARSE_PULL)                                                         \
		 ? gd_parse_nothing(pkt)                                                            \
		 : gd_parse_frame(gd_ctx_data(ctx), gd_ctx_data_end(ctx), gd_ctx_len(ctx), (pkt),    \
				  (flags)))

static __always_inline int gd_parse_nothing(struct gd_pkt *pkt)
{
	__builtin_memset(pkt, 0, sizeof(*pkt));
	return GD_PARSE_NOT_IP;
}

/* ---- The packet an ICMP error quotes ------------------------------------------------------- */

/* RFC 792: the quote holds the offending IP header and at least the first 8 bytes after it. */
#define GD_QUOTE_L4_MIN 8
/* What a TC parse of a quote makes readable: frame, ICMP header, quoted IPv4 header and TCP. */
#define GD_QUOTE_PULL (ETH_HLEN + GD_IPV4_HDR_MAX + 8 + GD_IPV4_HDR_MAX + 20)

struct gd_quote {
	struct gd_flow_key key; /* the quoted packet's 5-tuple as it sits in the quote */
	__u16 l3_off;		/* the quoted IP header */
	__u16 l4_off;		/* the quoted L4 header */
	__u8 icmp_type;		/* a quoted ICMP message's type */
	__u8 pad[3];
};

/*
 * The packet quoted by the ICMP error `pkt` (parsed with GD_PARSE_ICMP, GD_PARSE_L4): its
 * addresses, protocol, and the ports (echo: identifier) of the L4 protocols in `flags`. A quote
 * is a truncated packet: its lengths are not checked against what is there, and only the first
 * GD_QUOTE_L4_MIN bytes after its IP header are required. GD_PARSE_L3: a quoted later fragment,
 * an L4 protocol not asked for, an IPv6 quote with extension headers, or an error that itself
 * sits behind an IPv6 Fragment header (a second place to look for the quote is not worth it).
 */
static __always_inline int gd_parse_quote_frame(void *data, void *data_end,
						const struct gd_pkt *pkt, struct gd_quote *q,
						__u32 flags)
{
	__u32 l3 = pkt->l4_off + sizeof(struct gd_icmphdr), l4;
	struct gd_icmphdr *ic;
	__be16 *ports;
	__u8 proto;

	__builtin_memset(q, 0, sizeof(*q));
	/* Bounded for the verifier: the outer header ends at 34..74 (IPv4) or 54/62 (IPv6). */
	if (pkt->l4_off > GD_L2_MAX + GD_IPV4_HDR_MAX)
		return GD_PARSE_MALFORMED;
	if (pkt->key.family == GD_FAMILY_INET) {
		struct iphdr *in = data + l3;

		if ((void *)(in + 1) > data_end)
			return GD_PARSE_MALFORMED;
		if (in->version != 4 || in->ihl < 5)
			return GD_PARSE_MALFORMED;
		q->key.family = GD_FAMILY_INET;
		q->key.proto = in->protocol;
		*(__be32 *)q->key.src = in->saddr;
		*(__be32 *)q->key.dst = in->daddr;
		l4 = l3 + in->ihl * 4;
		if (in->frag_off & bpf_htons(IP_OFFSET))
			return GD_PARSE_L3; /* a later fragment's quote has no ports */
	} else {
		struct ipv6hdr *in = data + l3;

		if (pkt->frag != GD_FRAG_NONE)
			return GD_PARSE_L3;
		if ((void *)(in + 1) > data_end)
			return GD_PARSE_MALFORMED;
		if (in->version != 6)
			return GD_PARSE_MALFORMED;
		q->key.family = GD_FAMILY_INET6;
		q->key.proto = in->nexthdr; /* extension headers: not asked for, below */
		__builtin_memcpy(q->key.src, &in->saddr, 16);
		__builtin_memcpy(q->key.dst, &in->daddr, 16);
		l4 = l3 + sizeof(*in);
	}
	q->l3_off = l3;
	q->l4_off = l4;
	proto = q->key.proto;
	if (!gd_parse_wants(flags, q->key.family, proto))
		return GD_PARSE_L3;
	ports = data + l4;
	if ((void *)ports + GD_QUOTE_L4_MIN > data_end)
		return GD_PARSE_MALFORMED;
	if (proto == IPPROTO_TCP || proto == IPPROTO_UDP) {
		q->key.sport = ports[0];
		q->key.dport = ports[1];
		return GD_PARSE_L4;
	}
	ic = (void *)ports;
	q->icmp_type = ic->type;
	if (gd_icmp_is_echo(proto, ic->type)) {
		q->key.sport = ic->un.echo.id;
		q->key.dport = ic->un.echo.id;
	}
	return GD_PARSE_L4;
}

#define gd_parse_quote(ctx, pkt, q, flags)                                                         \
	(gd_ctx_pull((ctx), GD_QUOTE_PULL)                                                         \
		 ? GD_PARSE_MALFORMED                                                               \
		 : gd_parse_quote_frame(gd_ctx_data(ctx), gd_ctx_data_end(ctx), (pkt), (q), (flags)))

#endif /* GD_LIB_PARSE_H */
