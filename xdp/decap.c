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
#include "lib/common.h"
#include "lib/maps.h"

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

/* Make the first `len` bytes linear so they can be read with direct packet access. */
static __always_inline int gd_skb_linear(struct __sk_buff *skb, __u32 len)
{
	if ((void *)(long)skb->data + len <= (void *)(long)skb->data_end)
		return 0;
	if (len > skb->len)
		return -1;
	return bpf_skb_pull_data(skb, len);
}

SEC("classifier")
int gatewayd_decap(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u8 outer_family, inner_family = 0, dst[16];
	__u32 outer_len, pkt_len = skb->len;
	__u64 flags = BPF_F_ADJ_ROOM_FIXED_GSO;
	__be16 inner_proto;

	/* Multicast/broadcast/other-host frames are never tunnel traffic for this host. */
	if (skb->pkt_type != PACKET_HOST)
		return TC_ACT_OK;
	if ((void *)(eth + 1) > data_end)
		return TC_ACT_OK;

	/*
	 * Worst case headers: Ethernet + IPv6 + UDP + inner IPv6 = 14 + 40 + 8 + 40. Pulled only
	 * for IP frames, and only when the driver left them in fragments.
	 */
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *iph;

		if (gd_skb_linear(skb, sizeof(*eth) + sizeof(*iph)))
			return TC_ACT_OK;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		iph = data + sizeof(*eth);
		if ((void *)(iph + 1) > data_end)
			return TC_ACT_OK;
		if (iph->version != 4 || iph->ihl < 5)
			return TC_ACT_OK;
		/* A fragment cannot be decapsulated alone; the outer header is sent with DF. */
		if (iph->frag_off & bpf_htons(IP_MF | IP_OFFSET))
			return TC_ACT_OK;
		outer_family = GD_FAMILY_INET;
		outer_len = iph->ihl * 4;
		*(__be32 *)dst = iph->daddr;
		if (iph->protocol == IPPROTO_IPIP)
			inner_family = GD_FAMILY_INET;
		else if (iph->protocol == IPPROTO_IPV6)
			inner_family = GD_FAMILY_INET6;
		else if (iph->protocol == IPPROTO_UDP && gue_port)
			outer_len += sizeof(struct udphdr);
		else
			return TC_ACT_OK;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6;

		if (gd_skb_linear(skb, sizeof(*eth) + sizeof(*ip6)))
			return TC_ACT_OK;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		ip6 = data + sizeof(*eth);
		if ((void *)(ip6 + 1) > data_end)
			return TC_ACT_OK;
		outer_family = GD_FAMILY_INET6;
		outer_len = sizeof(*ip6);
		__builtin_memcpy(dst, &ip6->daddr, 16);
		/* Extension headers (fragments included) are not produced by gatewayd_lb. */
		if (ip6->nexthdr == IPPROTO_IPIP)
			inner_family = GD_FAMILY_INET;
		else if (ip6->nexthdr == IPPROTO_IPV6)
			inner_family = GD_FAMILY_INET6;
		else if (ip6->nexthdr == IPPROTO_UDP && gue_port)
			outer_len += sizeof(struct udphdr);
		else
			return TC_ACT_OK;
	} else {
		return TC_ACT_OK;
	}

	/* Outer header + the first byte of the inner one (its version). */
	if (outer_len > 60 + sizeof(struct udphdr))
		return TC_ACT_OK;
	if (gd_skb_linear(skb, sizeof(*eth) + outer_len + 1))
		return TC_ACT_OK;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;

	if (!inner_family) {
		/* GUE candidate: our port, and variant 1 (the payload is a bare IP packet). */
		struct udphdr *uh = data + sizeof(*eth) + outer_len - sizeof(*uh);
		__u8 *inner = (void *)(uh + 1);

		if ((void *)(inner + 1) > data_end)
			return TC_ACT_OK;
		if (uh->dest != gue_port)
			return TC_ACT_OK;
		if ((*inner >> 4) == 4)
			inner_family = GD_FAMILY_INET;
		else if ((*inner >> 4) == 6)
			inner_family = GD_FAMILY_INET6;
		else
			return TC_ACT_OK; /* GUE variant 0 or something else on that port */
	} else {
		__u8 *inner = data + sizeof(*eth) + outer_len;

		if ((void *)(inner + 1) > data_end)
			return TC_ACT_OK;
		if ((*inner >> 4) != (inner_family == GD_FAMILY_INET ? 4 : 6))
			return TC_ACT_OK;
	}

	/* The outer destination must be this host: a router in the path leaves tunnels alone. */
	if (!gd_is_local(skb, outer_family, dst))
		return TC_ACT_OK;

	/*
	 * Remove the outer header right after the MAC header. FIXED_GSO: for a GRO-merged
	 * packet, gso_size is the inner TCP MSS, which does not change when the outer header
	 * goes. When the families differ, the DECAP_L3 flag (kernel >= 6.3) switches
	 * skb->protocol; bpf_skb_change_proto() is not used because it also resizes the header
	 * room (it is meant for NAT64-style translation), which is wrong here.
	 */
	inner_proto = inner_family == GD_FAMILY_INET ? bpf_htons(ETH_P_IP) : bpf_htons(ETH_P_IPV6);
	if (inner_family != outer_family)
		flags |= inner_family == GD_FAMILY_INET ? BPF_F_ADJ_ROOM_DECAP_L3_IPV4
							: BPF_F_ADJ_ROOM_DECAP_L3_IPV6;
	if (bpf_skb_adjust_room(skb, -(__s32)outer_len, BPF_ADJ_ROOM_MAC, flags))
		return TC_ACT_OK;

	if (inner_family != outer_family) {
		/* The stack goes by skb->protocol, but captures and later hooks read the frame. */
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		eth = data;
		if ((void *)(eth + 1) <= data_end)
			eth->h_proto = inner_proto;
	}
	gd_count_reason(GD_REASON_DECAP, pkt_len);
	return TC_ACT_OK;
}

char _license[] SEC("license") = "Dual BSD/GPL";
