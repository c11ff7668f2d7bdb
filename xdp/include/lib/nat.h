/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The packet side of the egress NAT (tc programs): parsing a frame into its conntrack key, and
 * rewriting addresses, ports / ICMP identifiers and every checksum that covers them, in place.
 * No maps here: lib/conntrack.h decides the translation, this header applies it.
 *
 * Frames start with an untagged Ethernet header: the programs run on the egress interface
 * itself (for a VLAN, its VLAN device, where the tag is not in the frame).
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
 * rewritten with direct stores and checksums computed here.
 */
#ifndef GD_LIB_NAT_H
#define GD_LIB_NAT_H

#include "lib/common.h"
#include "lib/csum.h"

/* linux/icmp.h does not build for the BPF target (see common.h). */
#define GD_ICMP_ECHOREPLY 0
#define GD_ICMP_ECHO 8
#define GD_ICMP_TIME_EXCEEDED 11
#define GD_ICMP_PARAMETERPROB 12

#define GD_TCP_FIN 0x01
#define GD_TCP_SYN 0x02
#define GD_TCP_RST 0x04
#define GD_TCP_ACK 0x10

#define GD_NAT_L3 ETH_HLEN

/* The largest header span a parser reads: Ethernet + IPv4 with options + TCP. */
#define GD_NAT_PULL (GD_NAT_L3 + 60 + 20)
/* ICMP error: Ethernet + IPv4 with options + ICMP + quoted IPv4 with options + TCP. */
#define GD_NAT_PULL_ICMP_ERR (GD_NAT_L3 + 60 + 8 + 60 + 20)

enum gd_nat_kind {
	GD_NAT_NONE,	   /* not IPv4/IPv6: none of the NAT's business */
	GD_NAT_FLOW,	   /* TCP, UDP, or the ICMP echo message this direction translates */
	GD_NAT_ICMP_ERROR, /* an ICMP error: translated by the flow of the packet it quotes */
	GD_NAT_FRAGMENT,   /* later fragment of TCP/UDP/ICMP: no ports, addresses only */
	GD_NAT_OTHER,	   /* IP, but nothing the NAT can translate */
	GD_NAT_MALFORMED,  /* truncated or inconsistent headers */
};

struct gd_nat_pkt {
	struct gd_flow_key key; /* as on the wire; ICMP echo: sport = dport = identifier */
	__u32 len;		/* skb->len, the byte count of the counters */
	__u16 l4_off;		/* from skb->data */
	__u8 tcp_flags;		/* byte 13 of the TCP header */
	__u8 pad;
};

/* The first 8 bytes of an ICMP / ICMPv6 echo message, or of an error (id = unused/MTU). */
struct gd_icmp_echo {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be16 id;
	__be16 seq;
};

/* Make the first `len` bytes (or the whole packet if shorter) directly accessible. */
static __always_inline int gd_nat_pull(struct __sk_buff *skb, __u32 len)
{
	/* Clamped first: a short packet that is all linear must not pay for a pull. */
	if (len > skb->len)
		len = skb->len;
	if ((void *)(long)skb->data + len <= (void *)(long)skb->data_end)
		return 0;
	return bpf_skb_pull_data(skb, len);
}

static __always_inline int gd_icmp_is_error(__u8 proto, __u8 type)
{
	if (proto == IPPROTO_ICMP)
		return type == GD_ICMP_DEST_UNREACH || type == GD_ICMP_TIME_EXCEEDED ||
		       type == GD_ICMP_PARAMETERPROB;
	return type == ICMPV6_DEST_UNREACH || type == ICMPV6_PKT_TOOBIG ||
	       type == ICMPV6_TIME_EXCEED || type == ICMPV6_PARAMPROB;
}

/* The echo message a direction translates: requests go out, replies come back. */
static __always_inline int gd_icmp_is_echo(__u8 proto, __u8 type, int reply)
{
	if (proto == IPPROTO_ICMP)
		return type == (reply ? GD_ICMP_ECHOREPLY : GD_ICMP_ECHO);
	return type == (reply ? ICMPV6_ECHO_REPLY : ICMPV6_ECHO_REQUEST);
}

/* L4 header at `l4` with `avail` bytes of IP payload after it. */
static __always_inline int gd_nat_parse_l4(void *l4, void *data_end, __u32 avail,
					   struct gd_nat_pkt *p, int reply)
{
	__u8 proto = p->key.proto;

	if (proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;

		if ((void *)(th + 1) > data_end || avail < sizeof(*th))
			return GD_NAT_MALFORMED;
		p->key.sport = th->source;
		p->key.dport = th->dest;
		p->tcp_flags = ((__u8 *)th)[13];
		return GD_NAT_FLOW;
	}
	if (proto == IPPROTO_UDP) {
		struct udphdr *uh = l4;

		if ((void *)(uh + 1) > data_end || avail < sizeof(*uh))
			return GD_NAT_MALFORMED;
		p->key.sport = uh->source;
		p->key.dport = uh->dest;
		return GD_NAT_FLOW;
	}
	if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6) {
		struct gd_icmp_echo *ic = l4;

		if ((void *)(ic + 1) > data_end || avail < sizeof(*ic))
			return GD_NAT_MALFORMED;
		if (gd_icmp_is_echo(proto, ic->type, reply)) {
			p->key.sport = ic->id;
			p->key.dport = ic->id;
			return GD_NAT_FLOW;
		}
		if (gd_icmp_is_error(proto, ic->type))
			return GD_NAT_ICMP_ERROR;
	}
	return GD_NAT_OTHER;
}

static __always_inline int gd_nat_proto_ok(__u8 family, __u8 proto)
{
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP ||
	       proto == (family == GD_FAMILY_INET ? IPPROTO_ICMP : IPPROTO_ICMPV6);
}

static __always_inline int gd_nat_parse4(void *data, void *data_end, struct gd_nat_pkt *p,
					 int reply)
{
	struct iphdr *iph = data + GD_NAT_L3;
	__u32 hlen, tot;

	if ((void *)(iph + 1) > data_end)
		return GD_NAT_MALFORMED;
	if (iph->version != 4 || iph->ihl < 5)
		return GD_NAT_MALFORMED;
	hlen = iph->ihl * 4;
	tot = bpf_ntohs(iph->tot_len);
	if (tot < hlen || tot > p->len - GD_NAT_L3)
		return GD_NAT_MALFORMED;

	p->key.family = GD_FAMILY_INET;
	p->key.proto = iph->protocol;
	*(__be32 *)p->key.src = iph->saddr;
	*(__be32 *)p->key.dst = iph->daddr;
	if (!gd_nat_proto_ok(GD_FAMILY_INET, iph->protocol))
		return GD_NAT_OTHER;
	if (iph->frag_off & bpf_htons(IP_OFFSET))
		return GD_NAT_FRAGMENT;
	p->l4_off = GD_NAT_L3 + hlen;
	/* hlen is 20..60 (4-bit ihl): a bounded variable offset the verifier accepts. */
	return gd_nat_parse_l4((void *)iph + hlen, data_end, tot - hlen, p, reply);
}

struct gd_nat_frag6 {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off; /* offset in 8-byte units << 3 | M flag */
	__be32 id;
};

static __always_inline int gd_nat_parse6(void *data, void *data_end, struct gd_nat_pkt *p,
					 int reply)
{
	struct ipv6hdr *ip6 = data + GD_NAT_L3;
	__u32 plen, l4 = sizeof(*ip6);
	__u8 nh;

	if ((void *)(ip6 + 1) > data_end)
		return GD_NAT_MALFORMED;
	if (ip6->version != 6)
		return GD_NAT_MALFORMED;
	plen = bpf_ntohs(ip6->payload_len);
	if (sizeof(*ip6) + plen > p->len - GD_NAT_L3)
		return GD_NAT_MALFORMED;

	p->key.family = GD_FAMILY_INET6;
	__builtin_memcpy(p->key.src, &ip6->saddr, 16);
	__builtin_memcpy(p->key.dst, &ip6->daddr, 16);
	nh = ip6->nexthdr;
	/*
	 * Only a Fragment header is walked: other extension headers (hop-by-hop, routing,
	 * destination options...) would cost a loop per packet and are not expected on
	 * pod-to-internet flows; such packets are not translated.
	 */
	if (nh == NEXTHDR_FRAGMENT) {
		struct gd_nat_frag6 *fh = (void *)(ip6 + 1);

		if ((void *)(fh + 1) > data_end || plen < sizeof(*fh))
			return GD_NAT_MALFORMED;
		nh = fh->nexthdr;
		if ((fh->frag_off & bpf_htons(0xFFF8)) && gd_nat_proto_ok(GD_FAMILY_INET6, nh)) {
			p->key.proto = nh;
			return GD_NAT_FRAGMENT;
		}
		l4 += sizeof(*fh);
	}
	p->key.proto = nh;
	if (!gd_nat_proto_ok(GD_FAMILY_INET6, nh))
		return GD_NAT_OTHER;
	if (plen == 0)
		return GD_NAT_MALFORMED; /* jumbogram without hop-by-hop header */
	p->l4_off = GD_NAT_L3 + l4;
	/* l4 is 40 or 48 here. */
	return gd_nat_parse_l4((void *)ip6 + l4, data_end, sizeof(*ip6) + plen - l4, p, reply);
}

/*
 * Parse the frame for the NAT. `reply`: the direction (0 = gatewayd_snat, 1 = gatewayd_rnat),
 * which decides which ICMP echo messages are flows. The key is
 * fully initialised (pad and unused address bytes zero) so it can be used as a map key as is.
 */
static __always_inline int gd_nat_parse(struct __sk_buff *skb, struct gd_nat_pkt *p, int reply)
{
	void *data, *data_end;
	struct ethhdr *eth;

	__builtin_memset(p, 0, sizeof(*p));
	p->len = skb->len;
	if (gd_nat_pull(skb, GD_NAT_PULL))
		return GD_NAT_NONE; /* no memory to linearise: nothing can be done, pass */
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return GD_NAT_NONE;
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		return gd_nat_parse4(data, data_end, p, reply);
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return gd_nat_parse6(data, data_end, p, reply);
	return GD_NAT_NONE;
}

static __always_inline int gd_addr_eq(const void *a, const void *b)
{
	const __u32 *x = a, *y = b;

	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

/* RFC 1624 update of a checksum for a 16-byte field changing from `from` to `to`. */
static __always_inline __u64 gd_csum_replace16_sum(__u64 sum, const void *from, const void *to)
{
	const __u32 *f = from, *t = to;
	int i;

#pragma unroll
	for (i = 0; i < 4; i++)
		sum = gd_csum_sub32(sum, f[i]) + t[i];
	return sum;
}

/* The partial sum that turns a checksum covering `from` into one covering `to` (4 bytes). */
static __always_inline __u64 gd_csum_delta4(__u64 sum, __be32 from, __be32 to)
{
	return gd_csum_sub32(sum, from) + to;
}

static __always_inline __u64 gd_csum_delta2(__u64 sum, __be16 from, __be16 to)
{
	return sum + (__u16)~from + to;
}

/*
 * Rewrite the source (snat, to_dst = 0) or the destination (rnat, to_dst = 1) address and port
 * (ICMP echo: identifier) of a GD_NAT_FLOW packet to addr/port. Returns nonzero, with nothing
 * written, only if the skb cannot be made writable.
 */
static __always_inline int gd_nat_rewrite(struct __sk_buff *skb, const struct gd_nat_pkt *p,
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
	if (l4 > GD_NAT_L3 + 60)
		return -1;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;

	if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6) {
		struct gd_icmp_echo *ic = data + l4;
		__u64 sum;

		if ((void *)(ic + 1) > data_end)
			return -1;
		sum = gd_csum_delta2((__u16)~ic->checksum, ic->id, port);
		if (p->key.family == GD_FAMILY_INET) {
			struct iphdr *iph = data + GD_NAT_L3;
			__be32 *a;

			if ((void *)(iph + 1) > data_end)
				return -1;
			a = to_dst ? &iph->daddr : &iph->saddr;
			iph->check = gd_csum_finish(gd_csum_delta4((__u16)~iph->check, *a,
								   *(const __be32 *)addr));
			*a = *(const __be32 *)addr;
		} else {
			struct ipv6hdr *ip6 = data + GD_NAT_L3;
			void *a;

			if ((void *)(ip6 + 1) > data_end)
				return -1;
			a = to_dst ? (void *)&ip6->daddr : (void *)&ip6->saddr;
			/* ICMPv6 covers a pseudo-header: the address is part of its sum. */
			sum = gd_csum_replace16_sum(sum, a, addr);
			__builtin_memcpy(a, addr, 16);
		}
		ic->id = port;
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
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	{
		__be16 *pp = data + poff;

		if ((void *)(pp + 1) > data_end)
			return -1;
		*pp = port;
	}
	if (p->key.family == GD_FAMILY_INET) {
		struct iphdr *iph = data + GD_NAT_L3;
		__be32 new4 = *(const __be32 *)addr;

		if ((void *)(iph + 1) > data_end)
			return -1;
		if (to_dst)
			iph->daddr = new4;
		else
			iph->saddr = new4;
		iph->check = gd_csum_finish(gd_csum_delta4((__u16)~iph->check, old4, new4));
	}
	return 0;
}

/*
 * A later fragment (no L4 header): only the address changes. The L4 checksum, in the first
 * fragment, was updated for the whole datagram when that fragment was translated.
 */
static __always_inline int gd_nat_rewrite_addr(struct __sk_buff *skb, const struct gd_nat_pkt *p,
					       int to_dst, const __u8 *addr)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;

	if (p->key.family == GD_FAMILY_INET) {
		struct iphdr *iph = data + GD_NAT_L3;
		__be32 *a;

		if ((void *)(iph + 1) > data_end)
			return -1;
		a = to_dst ? &iph->daddr : &iph->saddr;
		iph->check = gd_csum_finish(gd_csum_delta4((__u16)~iph->check, *a,
							   *(const __be32 *)addr));
		*a = *(const __be32 *)addr;
		return 0;
	}
	return bpf_skb_store_bytes(skb,
				   GD_NAT_L3 + (to_dst ? offsetof(struct ipv6hdr, daddr)
						       : offsetof(struct ipv6hdr, saddr)),
				   addr, 16, BPF_F_RECOMPUTE_CSUM);
}

/* Where the packet quoted by an ICMP error sits, and the key of its flow's NAT entry. */
struct gd_nat_quote {
	struct gd_flow_key key; /* (quoted dst, quoted src, quoted dport, quoted sport) */
	__u16 inner_l3;		/* offset of the quoted IP header */
	__u16 inner_l4;		/* offset of the quoted L4 header */
};

/*
 * An ICMP error quotes a packet that went the other way. Arriving (reply = 1) for the egress
 * address, it quotes a packet as it left, translated: source = egress address and NAT port;
 * the REPLY entry of that flow translates it back. Sent by a pod (reply = 0, e.g. port
 * unreachable for a late answer), it quotes a reply as the pod received it: destination = pod
 * address and port; the ORIGINAL entry translates it. Either way the entry's key is the quoted
 * packet's 5-tuple reversed, and the outer address on the pod's side must be the quoted one.
 * Returns GD_NAT_ICMP_ERROR when the quote can be translated, GD_NAT_OTHER when it cannot
 * (quoted later fragment, other protocol or echo message, outer/quoted address mismatch),
 * GD_NAT_MALFORMED when truncated.
 */
static __always_inline int gd_nat_parse_quote(struct __sk_buff *skb, const struct gd_nat_pkt *p,
					      struct gd_nat_quote *q, int reply)
{
	void *data, *data_end;
	__u32 l4 = p->l4_off;
	__be16 *ports;
	__u8 proto;

	__builtin_memset(q, 0, sizeof(*q));
	if (gd_nat_pull(skb, GD_NAT_PULL_ICMP_ERR))
		return GD_NAT_MALFORMED;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	if (l4 > GD_NAT_L3 + 60)
		return GD_NAT_MALFORMED;

	if (p->key.family == GD_FAMILY_INET) {
		struct iphdr *in = data + l4 + sizeof(struct gd_icmp_echo);
		__u32 ihl;

		if ((void *)(in + 1) > data_end)
			return GD_NAT_MALFORMED;
		if (in->version != 4 || in->ihl < 5)
			return GD_NAT_MALFORMED;
		if (in->frag_off & bpf_htons(IP_OFFSET))
			return GD_NAT_OTHER; /* a later fragment's quote has no ports */
		if (reply ? in->saddr != *(const __be32 *)p->key.dst
			  : in->daddr != *(const __be32 *)p->key.src)
			return GD_NAT_OTHER;
		proto = in->protocol;
		ihl = in->ihl * 4;
		q->inner_l3 = l4 + sizeof(struct gd_icmp_echo);
		q->inner_l4 = q->inner_l3 + ihl;
		*(__be32 *)q->key.src = in->daddr;
		*(__be32 *)q->key.dst = in->saddr;
		q->key.family = GD_FAMILY_INET;
		ports = (void *)in + ihl;
	} else {
		struct ipv6hdr *in = data + l4 + sizeof(struct gd_icmp_echo);

		/* An outer Fragment header would put the quote at a second offset: not worth it. */
		if (l4 != GD_NAT_L3 + sizeof(struct ipv6hdr))
			return GD_NAT_OTHER;
		if ((void *)(in + 1) > data_end)
			return GD_NAT_MALFORMED;
		if (in->version != 6)
			return GD_NAT_MALFORMED;
		if (!gd_addr_eq(reply ? (void *)&in->saddr : (void *)&in->daddr,
				reply ? p->key.dst : p->key.src))
			return GD_NAT_OTHER;
		proto = in->nexthdr; /* extension headers in the quote: not translated (below) */
		q->inner_l3 = l4 + sizeof(struct gd_icmp_echo);
		q->inner_l4 = q->inner_l3 + sizeof(*in);
		__builtin_memcpy(q->key.src, &in->daddr, 16);
		__builtin_memcpy(q->key.dst, &in->saddr, 16);
		q->key.family = GD_FAMILY_INET6;
		ports = (void *)(in + 1);
	}
	if (!gd_nat_proto_ok(q->key.family, proto))
		return GD_NAT_OTHER;
	if ((void *)(ports + 4) > data_end)
		return GD_NAT_MALFORMED; /* RFC 792: at least 8 bytes of the datagram */
	if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6) {
		struct gd_icmp_echo *ic = (void *)ports;

		/* The quoted packet went the other way: a request going out, a reply coming in. */
		if (!gd_icmp_is_echo(proto, ic->type, !reply))
			return GD_NAT_OTHER;
		q->key.sport = ic->id;
		q->key.dport = ic->id;
	} else {
		q->key.sport = ports[1];
		q->key.dport = ports[0];
	}
	q->key.proto = proto;
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
static __always_inline int gd_nat_rewrite_quote(struct __sk_buff *skb, const struct gd_nat_pkt *p,
						const struct gd_nat_quote *q, int reply,
						const __u8 *addr, __be16 port)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 l4 = p->l4_off, il3 = q->inner_l3, il4 = q->inner_l4;
	__u8 proto = q->key.proto;
	struct gd_icmp_echo *outer;
	__u64 sum, l4sum = 0;
	__sum16 *l4check = NULL;
	__be16 *pp;

	/*
	 * Bounds for the verifier, checked before any pointer is made from these offsets: outer
	 * and quoted IPv4 headers are at most 60 bytes each.
	 */
	if (l4 > GD_NAT_L3 + 60 || il3 > GD_NAT_L3 + 60 + 8 || il4 > GD_NAT_L3 + 60 + 8 + 60)
		return -1;
	outer = data + l4;
	if ((void *)(outer + 1) > data_end)
		return -1;
	if (proto == IPPROTO_TCP || proto == IPPROTO_UDP)
		pp = data + il4 + (reply ? offsetof(struct udphdr, source) : offsetof(struct udphdr, dest));
	else
		pp = data + il4 + offsetof(struct gd_icmp_echo, id);
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
		l4check = data + il4 + offsetof(struct gd_icmp_echo, checksum);
		if ((void *)(l4check + 1) > data_end)
			return -1;
	}
	if (l4check)
		l4sum = gd_csum_delta2((__u16)~*l4check, *pp, port);
	/* ICMP checksum: every byte changed inside the message. */
	sum = gd_csum_delta2((__u16)~outer->checksum, *pp, port);

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
		in->check = gd_csum_finish(gd_csum_delta4((__u16)~old_check, old4, new4));
		*inner_a = new4;
		sum = gd_csum_delta4(sum, old4, new4);
		sum = gd_csum_delta2(sum, old_check, in->check);
		/* The outer address on the pod's side is the quoted one (checked by the parser). */
		iph->check = gd_csum_finish(gd_csum_delta4((__u16)~iph->check, old4, new4));
		if (reply)
			iph->daddr = new4;
		else
			iph->saddr = new4;
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
			l4sum = gd_csum_replace16_sum(l4sum, old6, addr);
		/* Twice: in the ICMPv6 pseudo-header (outer address) and in the quote. */
		sum = gd_csum_replace16_sum(sum, old6, addr);
		sum = gd_csum_replace16_sum(sum, old6, addr);
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
