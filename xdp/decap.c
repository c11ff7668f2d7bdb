// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * gatewayd_decap: TC ingress (tcx) program for the backend hosts.
 *
 * Strips the outer header that gatewayd_lb pushed (IPIP, 6in4, 4in6, 6in6, or GUE variant 1
 * when gue_port is set) from packets addressed to this host, so the client's packet goes up
 * the stack as if it had arrived directly and reaches the VIP bound on the loopback; the
 * answer goes straight back to the client (direct server return). This replaces the ipip /
 * ip6_tunnel / fou modules, which need not be loaded. Anything else is left untouched.
 */
#include "gatewayd_maps.h"
#include "lib/common.h"
#include "lib/ctx.h"
#include "lib/parse.h"
#include "lib/proto.h"
#include "lib/report.h"

/*
 * UDP destination port of GUE tunnels, network byte order; 0 disables GUE decapsulation.
 * Set by the loader (aya set_global) before the program is loaded: a read-only global is a
 * constant to the verifier, so the disabled case costs nothing.
 */
volatile const __u16 gue_port = 0;

/*
 * Is `addr` one of this host's addresses? The FIB answers NOT_FWDED for local (and
 * broadcast/multicast, excluded by the caller's PACKET_HOST check) destinations. A host that
 * does not forward on this interface makes the kernel answer FWD_DISABLED before looking
 * anything up: such a host can only deliver a unicast packet locally (or drop it), so it
 * counts as local as well.
 */
static __always_inline int gd_is_local(struct __sk_buff *skb, __u8 family, const void *addr)
{
	struct bpf_fib_lookup fib = {};
	long rc;

	fib.ifindex = skb->ingress_ifindex;
	if (family == GD_FAMILY_INET) {
		fib.family = AF_INET;
		fib.ipv4_dst = *(const __be32 *)addr;
	} else {
		fib.family = AF_INET6;
		__builtin_memcpy(fib.ipv6_dst, addr, 16);
	}
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	return rc == BPF_FIB_LKUP_RET_NOT_FWDED || rc == BPF_FIB_LKUP_RET_FWD_DISABLED;
}

/*
 * The family of the packet a parsed frame tunnels to this program (0: not a tunnel of ours),
 * and the length of the outer headers after the MAC header. IPIP is recognised by protocol
 * number (4 carries IPv4, 41 IPv6), GUE variant 1 by the UDP port; either way the inner
 * version nibble must agree.
 */
static __always_inline __u8 gd_tunnel_inner_family(struct __sk_buff *skb, const struct gd_pkt *pkt,
						    int parsed, __u32 *outer_len)
{
	__u8 family, *inner, *data_end;
	__u32 off = pkt->l4_off;

	/* The outer header is sent with DF: a fragment cannot be decapsulated alone. */
	if (pkt->frag != GD_FRAG_NONE)
		return 0;
	if (parsed == GD_PARSE_L3 && pkt->key.proto == IPPROTO_IPIP) {
		family = GD_FAMILY_INET;
	} else if (parsed == GD_PARSE_L3 && pkt->key.proto == IPPROTO_IPV6) {
		family = GD_FAMILY_INET6;
	} else if (parsed == GD_PARSE_L4 && gue_port && pkt->key.dport == gue_port) {
		/* GUE variant 1: the payload is a bare IP packet, its version says which. */
		family = 0;
		off += sizeof(struct udphdr);
	} else {
		return 0;
	}
	/* Bounded for the verifier: Ethernet, IPv4 with options (or IPv6 + Fragment), UDP. */
	if (off > ETH_HLEN + GD_IPV4_HDR_MAX + sizeof(struct udphdr))
		return 0;
	inner = gd_ctx_data(skb) + off;
	data_end = gd_ctx_data_end(skb);
	if (inner + 1 > data_end)
		return 0;
	if (!family)
		family = *inner >> 4 == 4 ? GD_FAMILY_INET : *inner >> 4 == 6 ? GD_FAMILY_INET6 : 0;
	else if (*inner >> 4 != family)
		return 0; /* GD_FAMILY_* are the IP version numbers */
	*outer_len = off - pkt->l3_off;
	return family;
}

SEC("classifier")
int gatewayd_decap(struct __sk_buff *skb)
{
	__u64 flags = BPF_F_ADJ_ROOM_FIXED_GSO;
	__u8 inner_family;
	struct ethhdr *eth;
	struct gd_pkt pkt;
	__u32 outer_len;
	int parsed;

	/* Multicast/broadcast/other-host frames are never tunnel traffic for this host. */
	if (skb->pkt_type != PACKET_HOST)
		return TC_ACT_OK;
	/* Only the GUE header (UDP) is read: IPIP ends the parse at the outer IP header. */
	parsed = gd_parse(skb, &pkt, GD_PARSE_UDP);
	if (parsed != GD_PARSE_L3 && parsed != GD_PARSE_L4)
		return TC_ACT_OK;
	inner_family = gd_tunnel_inner_family(skb, &pkt, parsed, &outer_len);
	if (!inner_family)
		return TC_ACT_OK;

	/* The outer destination must be this host: a router in the path leaves tunnels alone. */
	if (!gd_is_local(skb, pkt.key.family, pkt.key.dst))
		return TC_ACT_OK;

	/*
	 * Remove the outer header right after the MAC header. FIXED_GSO: for a GRO-merged
	 * packet, gso_size is the inner TCP MSS, which does not change when the outer header
	 * goes. When the families differ, the DECAP_L3 flag (kernel >= 6.3) switches
	 * skb->protocol; bpf_skb_change_proto() is not used because it also resizes the header
	 * room (it is meant for NAT64-style translation), which is wrong here.
	 */
	if (inner_family != pkt.key.family)
		flags |= inner_family == GD_FAMILY_INET ? BPF_F_ADJ_ROOM_DECAP_L3_IPV4
							: BPF_F_ADJ_ROOM_DECAP_L3_IPV6;
	if (bpf_skb_adjust_room(skb, -(__s32)outer_len, BPF_ADJ_ROOM_MAC, flags))
		return TC_ACT_OK;

	if (inner_family != pkt.key.family) {
		/* The stack goes by skb->protocol, but captures and later hooks read the frame. */
		eth = gd_ctx_data(skb);
		if ((void *)(eth + 1) <= gd_ctx_data_end(skb))
			eth->h_proto = inner_family == GD_FAMILY_INET ? bpf_htons(ETH_P_IP)
								      : bpf_htons(ETH_P_IPV6);
	}
	gd_count_reason(GD_REASON_DECAP, pkt.len);
	return TC_ACT_OK;
}

char _license[] SEC("license") = "Dual BSD/GPL";
