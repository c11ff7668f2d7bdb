/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Protocol constants and header layouts, in one place: the UAPI headers that build for the BPF
 * target, and what the datapath needs beyond them (kernel-internal constants such as IP_DF,
 * and ICMP: linux/icmp.h drags in glibc socket headers that do not build for BPF).
 */
#ifndef GD_LIB_PROTO_H
#define GD_LIB_PROTO_H

#include "gatewayd_maps.h"
#include "lib/common.h"

#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/icmpv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>

/* ---- Ethernet ------------------------------------------------------------------------------ */

/* 802.1Q / 802.1AD tag as it sits after the MAC addresses. */
struct gd_vlan_hdr {
	__be16 tci;
	__be16 proto;
};

/* Tags the datapath walks (QinQ); a frame with more is not parsed. */
#define GD_VLAN_MAX 2
/* The longest L2 header handled: Ethernet and GD_VLAN_MAX tags. */
#define GD_L2_MAX (ETH_HLEN + GD_VLAN_MAX * 4)

static __always_inline int gd_is_vlan(__be16 proto)
{
	return proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD);
}

/* ---- IP ------------------------------------------------------------------------------------ */

/* IPv4 frag_off bits (host order), from the kernel's net/ip.h. */
#define IP_DF 0x4000
#define IP_MF 0x2000
#define IP_OFFSET 0x1FFF

/* The longest IPv4 header: a 4-bit ihl counts 32-bit words. */
#define GD_IPV4_HDR_MAX 60

/* IPv6 Fragment extension header (RFC 8200 4.5); net/ipv6.h is kernel-internal. */
#define NEXTHDR_FRAGMENT 44

struct gd_frag6_hdr {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off; /* offset in 8-byte units << 3 | M flag */
	__be32 id;
};

/* Address families as bpf_fib_lookup takes them (sys/socket.h does not build for BPF). */
#define AF_INET 2
#define AF_INET6 10

/* Addresses are 16 bytes in the datapath's structs (IPv4 in the first 4, the rest zero). */
static __always_inline int gd_addr_eq(const void *a, const void *b)
{
	const __u32 *x = a, *y = b;

	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

/* ---- TCP ----------------------------------------------------------------------------------- */

/* Byte 13 of the TCP header. */
#define GD_TCP_FIN 0x01
#define GD_TCP_SYN 0x02
#define GD_TCP_RST 0x04
#define GD_TCP_ACK 0x10

/* ---- ICMP and ICMPv6 ----------------------------------------------------------------------- */

#define GD_ICMP_ECHOREPLY 0
#define GD_ICMP_DEST_UNREACH 3
#define GD_ICMP_FRAG_NEEDED 4 /* code of GD_ICMP_DEST_UNREACH */
#define GD_ICMP_ECHO 8
#define GD_ICMP_TIME_EXCEEDED 11
#define GD_ICMP_PARAMETERPROB 12

/* The first 8 bytes of every ICMP and ICMPv6 message. */
struct gd_icmphdr {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	union {
		struct {
			__be16 id;
			__be16 sequence;
		} echo; /* echo request / reply, both versions */
		struct {
			__be16 unused;
			__be16 mtu;
		} frag;	     /* ICMP fragmentation needed (RFC 1191) */
		__be32 mtu6; /* ICMPv6 packet too big (RFC 4443 3.2) */
	} un;
};

/* The ICMP protocol number of a family: ICMP for IPv4, ICMPv6 for IPv6. */
static __always_inline __u8 gd_icmp_proto(__u8 family)
{
	return family == GD_FAMILY_INET ? IPPROTO_ICMP : IPPROTO_ICMPV6;
}

static __always_inline int gd_icmp_is_echo(__u8 proto, __u8 type)
{
	if (proto == IPPROTO_ICMP)
		return type == GD_ICMP_ECHO || type == GD_ICMP_ECHOREPLY;
	return type == ICMPV6_ECHO_REQUEST || type == ICMPV6_ECHO_REPLY;
}

static __always_inline int gd_icmp_is_echo_reply(__u8 proto, __u8 type)
{
	return type == (proto == IPPROTO_ICMP ? GD_ICMP_ECHOREPLY : ICMPV6_ECHO_REPLY);
}

/* The errors that quote the packet they are about (RFC 792, RFC 4443). */
static __always_inline int gd_icmp_is_error(__u8 proto, __u8 type)
{
	if (proto == IPPROTO_ICMP)
		return type == GD_ICMP_DEST_UNREACH || type == GD_ICMP_TIME_EXCEEDED ||
		       type == GD_ICMP_PARAMETERPROB;
	return type == ICMPV6_DEST_UNREACH || type == ICMPV6_PKT_TOOBIG ||
	       type == ICMPV6_TIME_EXCEED || type == ICMPV6_PARAMPROB;
}

#endif /* GD_LIB_PROTO_H */
