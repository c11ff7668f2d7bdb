/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Bounds-checked parsing of Ethernet / VLAN / IPv4 / IPv6 / TCP / UDP into a gd_pkt.
 *
 * The parser decides three things: is this something the balancer could own (IPv4/IPv6
 * carrying TCP/UDP whose ports are visible), is it well formed enough to be touched, and
 * where the headers are. It never modifies the packet.
 */
#ifndef GD_LIB_PARSE_H
#define GD_LIB_PARSE_H

#include "lib/common.h"

enum gd_parse_result {
	GD_PARSE_OK = 0,
	/*
	 * Not a candidate for balancing: not IP, not TCP/UDP, IPv6 extension headers other than
	 * a leading Fragment header, or a non-first fragment (no ports, so the service cannot
	 * be identified). Passed untouched.
	 */
	GD_PARSE_NOT_BALANCED,
	/* Truncated or inconsistent headers: passed, the stack counts and drops it. */
	GD_PARSE_MALFORMED,
};

struct gd_pkt {
	struct gd_flow_key key; /* client 5-tuple toward the VIP, gatewayd_maps.h layout */
	__u32 len;		/* frame length as received (L2 included) */
	__u16 l3_off;		/* Ethernet + VLAN tags: 14, 18 or 22 */
	__u16 l4_off;
	__u16 ip_len;		/* IPv4 tot_len, or 40 + IPv6 payload_len: excludes L2 padding */
	__u8 vlans;		/* number of VLAN tags, 0..2 */
	__u8 df;		/* IPv4 DF bit; always 1 for IPv6 (routers never fragment it) */
	__u8 fragment;		/* first fragment of a fragmented datagram (ports are valid) */
	__u8 syn;		/* TCP SYN without ACK: the only packet that may open a flow */
	__u8 tos;		/* IPv4 TOS / IPv6 traffic class, copied to the outer header */
	__u8 udp_csum_zero;	/* UDP sent without checksum (IPv4 only legally) */
};

static __always_inline int gd_is_vlan(__be16 proto)
{
	return proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD);
}

/* TCP/UDP header at l4; fills ports and flags. `avail` = bytes of the IP packet after l4. */
static __always_inline int gd_parse_l4(void *l4, void *data_end, __u32 avail,
				       struct gd_pkt *pkt)
{
	if (pkt->key.proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;

		if ((void *)(th + 1) > data_end || avail < sizeof(*th))
			return GD_PARSE_MALFORMED;
		pkt->key.sport = th->source;
		pkt->key.dport = th->dest;
		/* Byte 13 holds CWR..FIN; SYN=0x02, ACK=0x10. */
		pkt->syn = (((__u8 *)th)[13] & 0x12) == 0x02;
		return GD_PARSE_OK;
	}
	if (pkt->key.proto == IPPROTO_UDP) {
		struct udphdr *uh = l4;

		if ((void *)(uh + 1) > data_end || avail < sizeof(*uh))
			return GD_PARSE_MALFORMED;
		pkt->key.sport = uh->source;
		pkt->key.dport = uh->dest;
		pkt->udp_csum_zero = uh->check == 0;
		return GD_PARSE_OK;
	}
	return GD_PARSE_NOT_BALANCED;
}

static __always_inline int gd_parse_ipv4(void *data, void *data_end, __u32 off,
					 struct gd_pkt *pkt)
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
	frag = bpf_ntohs(iph->frag_off);
	pkt->df = !!(frag & IP_DF);

	if (iph->protocol != IPPROTO_TCP && iph->protocol != IPPROTO_UDP)
		return GD_PARSE_NOT_BALANCED;
	if (frag & IP_OFFSET)
		return GD_PARSE_NOT_BALANCED; /* later fragment: no ports to find the service by */
	pkt->fragment = !!(frag & IP_MF);

	pkt->l4_off = off + hlen;
	/* hlen is 20..60 (4-bit ihl): a bounded variable offset the verifier accepts. */
	return gd_parse_l4((void *)iph + hlen, data_end, tot - hlen, pkt);
}

struct gd_frag6 {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off; /* offset in 8-byte units << 3 | M flag */
	__be32 id;
};

static __always_inline int gd_parse_ipv6(void *data, void *data_end, __u32 off,
					 struct gd_pkt *pkt)
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
		struct gd_frag6 *fh = (void *)(ip6 + 1);

		if ((void *)(fh + 1) > data_end || plen < sizeof(*fh))
			return GD_PARSE_MALFORMED;
		if (fh->frag_off & bpf_htons(0xFFF8))
			return GD_PARSE_NOT_BALANCED; /* later fragment: no ports */
		/* Offset 0, with or without M (atomic fragments included): treated as a fragment. */
		pkt->fragment = 1;
		nh = fh->nexthdr;
		l4 += sizeof(*fh);
	}
	/*
	 * Hop-by-hop, routing, destination options, AH, ESP...: walking a chain of extension
	 * headers costs a loop per packet and such traffic is not expected toward a VIP, so it is
	 * not balanced.
	 */
	if (nh != IPPROTO_TCP && nh != IPPROTO_UDP)
		return GD_PARSE_NOT_BALANCED;
	pkt->key.proto = nh;
	if (plen == 0)
		return GD_PARSE_MALFORMED; /* jumbogram without hop-by-hop header */

	pkt->l4_off = off + l4;
	/* l4 is 40 or 48 here. */
	return gd_parse_l4((void *)ip6 + l4, data_end, sizeof(*ip6) + plen - l4, pkt);
}

/*
 * Parse the frame at [data, data_end) of `len` bytes. The key is fully initialised (padding
 * and unused address bytes are zero) so it can be used as a map key as is.
 */
static __always_inline int gd_parse(void *data, void *data_end, __u32 len, struct gd_pkt *pkt)
{
	struct ethhdr *eth = data;
	__u32 off = sizeof(*eth);
	__be16 proto;

	__builtin_memset(pkt, 0, sizeof(*pkt));
	pkt->len = len;
	if ((void *)(eth + 1) > data_end)
		return GD_PARSE_MALFORMED;
	proto = eth->h_proto;

	/* Unrolled by hand: at most two tags (QinQ); a third is not balanced. */
	if (gd_is_vlan(proto)) {
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

	if (proto == bpf_htons(ETH_P_IP))
		return gd_parse_ipv4(data, data_end, off, pkt);
	if (proto == bpf_htons(ETH_P_IPV6))
		return gd_parse_ipv6(data, data_end, off, pkt);
	return GD_PARSE_NOT_BALANCED;
}

#endif /* GD_LIB_PARSE_H */
