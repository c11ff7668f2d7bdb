/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * "Packet too big" replies for VIP packets that would exceed the path MTU once encapsulated.
 *
 * The outer packet leaves with DF (IPv4) or is IPv6, so a router on the way to the backend
 * would report the problem to the outer source, i.e. to this gateway, and the client would
 * never learn it must send smaller packets (a PMTU black hole). The gateway therefore checks
 * the size itself and answers the client directly, quoting the client's packet, from the VIP,
 * with the MTU the client must use: path MTU minus the encapsulation overhead.
 *
 * The reply is built in place (the received frame is turned into the reply) and sent back
 * out of the receiving port with XDP_TX: the L2 header is kept, MACs swapped, VLAN tags as
 * received.
 *
 * No rate limit is applied (the kernel limits its own ICMP errors, XDP cannot use that): a
 * reply is always smaller than the packet that caused it, so it cannot amplify.
 */
#ifndef GD_LIB_ICMP_H
#define GD_LIB_ICMP_H

#include "lib/common.h"
#include "lib/csum.h"
#include "lib/ctx.h"
#include "lib/parse.h"
#include "lib/proto.h"
#include "lib/reshape.h"

#define GD_ICMP_TTL 64

/* RFC 792: the original IP header (options included) + the first 8 bytes of its payload. */
#define GD_ICMP4_QUOTE_MAX (60 + 8)

/*
 * RFC 4443 2.4(c): quote as much of the packet as fits in the minimum IPv6 MTU: 1280 - 40
 * (IPv6) - 8 (ICMPv6) = 1232 bytes. A packet only triggers this when it is larger than
 * (path MTU - overhead), which for any IPv6-capable path (MTU >= 1280) means it has more than
 * 1232 bytes, so the quote is always exactly 1232 bytes: a constant size keeps the checksum
 * loop-free (three bpf_csum_diff calls of at most 512 bytes, the old-kernel limit).
 */
#define GD_ICMP6_QUOTE 1232

/*
 * IPv4: ICMP type 3 code 4 "fragmentation needed and DF set" carrying the next-hop MTU
 * (RFC 1191). Only for packets with DF: without it the client expects routers to fragment,
 * which the gateway cannot do (the caller drops those).
 */
static __always_inline int gd_icmp4_frag_needed(struct xdp_md *ctx, const struct gd_pkt *pkt,
						__u32 mtu)
{
	void *data = gd_ctx_data(ctx);
	void *data_end = gd_ctx_data_end(ctx);
	__u32 l3 = pkt->l3_off, quote_len;
	struct gd_icmphdr *ic;
	struct iphdr *iph;
	__u8 *quote;
	__u64 sum;
	int i;

	if (l3 > GD_L2_MAX)
		return -1;
	iph = data + l3;
	if ((void *)(iph + 1) > data_end)
		return -1;
	quote_len = iph->ihl * 4 + 8; /* 28..68, all present: the parser saw the L4 header */

	if (gd_xdp_reshape(ctx, pkt, quote_len, sizeof(*iph) + sizeof(*ic), bpf_htons(ETH_P_IP), 1))
		return -1;

	data = gd_ctx_data(ctx);
	data_end = gd_ctx_data_end(ctx);
	iph = data + l3;
	ic = (void *)(iph + 1);
	quote = (void *)(ic + 1);
	if ((void *)(quote + 28) > data_end)
		return -1;
	*(__u8 *)iph = 0x45;
	iph->tos = 0xC0; /* internetwork control, as the kernel sends its ICMP errors */
	iph->tot_len = bpf_htons(sizeof(*iph) + sizeof(*ic) + quote_len);
	iph->id = 0;
	iph->frag_off = 0;
	iph->ttl = GD_ICMP_TTL;
	iph->protocol = IPPROTO_ICMP;
	iph->check = 0;
	iph->saddr = *(const __be32 *)pkt->key.dst; /* from the VIP... */
	iph->daddr = *(const __be32 *)pkt->key.src; /* ...to the client */
	iph->check = gd_ipv4_hdr_csum(iph);

	ic->type = GD_ICMP_DEST_UNREACH;
	ic->code = GD_ICMP_FRAG_NEEDED;
	ic->checksum = 0;
	ic->un.frag.unused = 0;
	ic->un.frag.mtu = bpf_htons(mtu);
	sum = (__u64)((__u32 *)ic)[0] + ((__u32 *)ic)[1];
	/*
	 * The quote is 28..68 bytes (IP options): summed a word at a time, unrolled, each word
	 * bounds-checked. A variable-length bpf_csum_diff over packet memory could not be proven
	 * in bounds by the verifier. Slow path only.
	 */
#pragma unroll
	for (i = 0; i < GD_ICMP4_QUOTE_MAX / 4; i++) {
		__u32 *w = (__u32 *)(quote + i * 4);

		if (i * 4 >= quote_len || (void *)(w + 1) > data_end)
			break;
		sum += *w;
	}
	ic->checksum = gd_csum_finish(sum);
	return 0;
}

/* IPv6: ICMPv6 type 2 "packet too big" (RFC 4443 3.2) with the MTU the client must use. */
static __always_inline int gd_icmp6_too_big(struct xdp_md *ctx, const struct gd_pkt *pkt,
					    __u32 mtu)
{
	__u32 l3 = pkt->l3_off;
	struct gd_icmphdr *ic;
	struct ipv6hdr *ip6;
	void *data, *data_end;
	__u8 *quote;
	__u64 sum;

	if (l3 > GD_L2_MAX || pkt->ip_len < GD_ICMP6_QUOTE)
		return -1;
	if (gd_xdp_reshape(ctx, pkt, GD_ICMP6_QUOTE, sizeof(*ip6) + sizeof(*ic),
			   bpf_htons(ETH_P_IPV6), 1))
		return -1;

	data = gd_ctx_data(ctx);
	data_end = gd_ctx_data_end(ctx);
	ip6 = data + l3;
	ic = (void *)(ip6 + 1);
	quote = (void *)(ic + 1);
	if ((void *)(quote + GD_ICMP6_QUOTE) > data_end)
		return -1;
	*(__be32 *)ip6 = bpf_htonl(0x60000000);
	ip6->payload_len = bpf_htons(sizeof(*ic) + GD_ICMP6_QUOTE);
	ip6->nexthdr = IPPROTO_ICMPV6;
	ip6->hop_limit = GD_ICMP_TTL;
	__builtin_memcpy(&ip6->saddr, pkt->key.dst, 16); /* from the VIP... */
	__builtin_memcpy(&ip6->daddr, pkt->key.src, 16); /* ...to the client */

	ic->type = ICMPV6_PKT_TOOBIG;
	ic->code = 0;
	ic->checksum = 0;
	ic->un.mtu6 = bpf_htonl(mtu);

	sum = gd_csum_pseudo6(pkt->key.dst, pkt->key.src, IPPROTO_ICMPV6,
			      sizeof(*ic) + GD_ICMP6_QUOTE);
	sum += (__u64)((__u32 *)ic)[0] + ((__u32 *)ic)[1];
	sum = gd_csum_mem(sum, quote, 512);
	sum = gd_csum_mem(sum, quote + 512, 512);
	sum = gd_csum_mem(sum, quote + 1024, GD_ICMP6_QUOTE - 1024);
	ic->checksum = gd_csum_finish(sum);
	return 0;
}

#endif /* GD_LIB_ICMP_H */
