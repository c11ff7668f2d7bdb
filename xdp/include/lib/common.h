/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Includes and small definitions every datapath header needs.
 *
 * Only UAPI headers are used (no vmlinux.h/CO-RE): the programs touch packet bytes and the
 * stable BPF context structs only, so they load unchanged on any kernel with the helpers used.
 */
#ifndef GD_LIB_COMMON_H
#define GD_LIB_COMMON_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/icmpv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "gatewayd_maps.h"

/* Not in every UAPI copy; values are fixed by the kernel ABI. */
#ifndef ETH_P_8021AD
#define ETH_P_8021AD 0x88A8
#endif
#ifndef IPPROTO_IPIP
#define IPPROTO_IPIP 4
#endif
#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif
#ifndef IP_DF
#define IP_DF 0x4000
#endif
#ifndef IP_MF
#define IP_MF 0x2000
#endif
#ifndef IP_OFFSET
#define IP_OFFSET 0x1FFF
#endif
#ifndef NEXTHDR_FRAGMENT
#define NEXTHDR_FRAGMENT 44
#endif
#ifndef IPPROTO_ICMPV6
#define IPPROTO_ICMPV6 58
#endif
/* linux/icmp.h drags in glibc socket headers that do not build for the BPF target. */
#define GD_ICMP_DEST_UNREACH 3
#define GD_ICMP_FRAG_NEEDED 4

struct gd_icmphdr {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be16 unused;
	__be16 mtu; /* next-hop MTU (RFC 1191) */
};

#ifndef PACKET_HOST
#define PACKET_HOST 0
#endif
#ifndef TC_ACT_OK
#define TC_ACT_OK 0
#endif

/*
 * The build host's UAPI headers (linux-libc-dev 6.1) predate these skb_adjust_room flags
 * (kernel 6.3); the values are ABI and match the running kernel's BTF.
 */
#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV4
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV6 (1ULL << 8)
#endif

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

#define likely(x) __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)

/* 802.1Q / 802.1AD tag as it sits after the MAC addresses. */
struct gd_vlan_hdr {
	__be16 tci;
	__be16 proto;
};

#define GD_L2_MAX (14 + 2 * 4) /* Ethernet + two VLAN tags */

static __always_inline __u32 gd_rol32(__u32 w, unsigned int s)
{
	return (w << s) | (w >> ((32 - s) & 31));
}

/*
 * After bpf_xdp_adjust_head(ctx, -delta) the received L2 header sits `delta` bytes into the
 * frame: move it back to the front, optionally swapping the MAC addresses (replies), and set
 * the ethertype that announces the L3 header (the last tag's, or the Ethernet one).
 *
 * GD_L2_MAX bytes are always moved whatever the number of tags (what follows a shorter header
 * is overwritten by the caller's new L3 header). Everything goes through registers, loaded
 * before any store, so the overlap of source and destination (delta can be 20 < 22) is
 * harmless and nothing is spilled to the stack, which the verifier limits to 512 bytes.
 */
static __always_inline int gd_l2_move(void *data, void *data_end, __u32 delta, __u32 vlans,
				      __be16 l3_proto, int swap_macs)
{
	void *old = data + delta;
	__u32 mac_a0, mac_b1, tag0, tag1;
	__u16 mac_a1, mac_b0, tag2;

	if (delta > 64 || vlans > 2)
		return -1;
	/* Both checks: the verifier tracks the two pointers' ranges separately. */
	if (data + GD_L2_MAX > data_end || old + GD_L2_MAX > data_end)
		return -1;
	mac_a0 = *(__u32 *)(old + 0);  /* destination */
	mac_a1 = *(__u16 *)(old + 4);
	mac_b0 = *(__u16 *)(old + 6);  /* source */
	mac_b1 = *(__u32 *)(old + 8);
	tag0 = *(__u32 *)(old + 12);   /* ethertype / tags, up to the innermost ethertype */
	tag1 = *(__u32 *)(old + 16);
	tag2 = *(__u16 *)(old + 20);

	if (swap_macs) {
		*(__u16 *)(data + 0) = mac_b0;
		*(__u32 *)(data + 2) = mac_b1;
		*(__u32 *)(data + 6) = mac_a0;
		*(__u16 *)(data + 10) = mac_a1;
	} else {
		*(__u32 *)(data + 0) = mac_a0;
		*(__u16 *)(data + 4) = mac_a1;
		*(__u16 *)(data + 6) = mac_b0;
		*(__u32 *)(data + 8) = mac_b1;
	}
	*(__u32 *)(data + 12) = tag0;
	*(__u32 *)(data + 16) = tag1;
	*(__u16 *)(data + 20) = tag2;
	/* Constant offsets: a variable one would lose the verified packet range. */
	if (vlans == 0)
		*(__be16 *)(data + 12) = l3_proto;
	else if (vlans == 1)
		*(__be16 *)(data + 16) = l3_proto;
	else
		*(__be16 *)(data + 20) = l3_proto;
	return 0;
}

#endif /* GD_LIB_COMMON_H */
