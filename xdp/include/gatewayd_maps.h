/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Map layouts shared by the eBPF programs and userspace.
 *
 * Every struct here has a #[repr(C)] mirror in gatewayd/common/src/maps.rs. Both sides assert
 * the same sizes, and a unit test compares the Rust offsets with the BTF of the compiled
 * objects, so a change on one side that is not made on the other fails the build or the tests.
 *
 * Conventions:
 * - Addresses are 16 bytes. IPv4 uses the first 4 bytes (network order), the rest is zero;
 *   `family` (GD_FAMILY_*) says which. Ports are in network byte order.
 * - Every map is pinned by name under the daemon's bpffs directory, so a restarted daemon
 *   adopts the live maps and connection state survives.
 * - Ids (service_id, backend_id) are small integers allocated by userspace; they index the
 *   per-CPU counter arrays. 0 is never allocated, so a zeroed value means "none".
 */
#ifndef GATEWAYD_MAPS_H
#define GATEWAYD_MAPS_H

#include <linux/types.h>

#define GD_FAMILY_INET 4
#define GD_FAMILY_INET6 6

/* Default capacities; userspace overrides max_entries from the config at load time. */
#define GD_MAX_SERVICES 65536
#define GD_MAX_BACKENDS 65536
#define GD_MAX_LB_FLOWS 1048576
#define GD_MAX_AFFINITY 262144
#define GD_MAX_SOURCE_RANGES 65536
#define GD_MAGLEV_DEFAULT_SIZE 16381

/* gd_services: VIP:port/proto -> service. */
struct gd_vip_key {
	__u8 addr[16];
	__be16 port;
	__u8 proto; /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 family;
};

#define GD_SVC_F_SOURCE_RANGES (1U << 0) /* only clients in gd_source_ranges may connect */
#define GD_SVC_F_AFFINITY (1U << 1)	 /* ClientIP session affinity, see affinity_timeout_s */

#define GD_ENCAP_IPIP 0 /* IPIP / IP6IP6 / 4in6 / 6in4 depending on the two families */
#define GD_ENCAP_GUE 1	/* GUE variant 1: outer IP + UDP(gue_port) + inner IP packet */

struct gd_service {
	__u32 service_id;
	__u32 flags;
	__u32 affinity_timeout_s;
	__u8 encap;
	__u8 pad;
	__be16 gue_port;
};

/*
 * gd_maglev: HASH_OF_MAPS keyed by service_id. The inner map is an ARRAY of backend ids whose
 * size is the Maglev table size (a prime). Userspace fills a fresh inner map and swaps it in
 * with one update, so a VIP never sees a half-written table.
 *
 * Inner map format (a BPF program cannot read an inner map's max_entries, so the table size
 * travels in the map itself):
 * - type ARRAY, key __u32, value __u32, max_entries = table_size + 1;
 * - map_flags BPF_F_INNER_MAP | BPF_F_MMAPABLE (0x1400) on every inner map: the first makes
 *   the kernel accept inner arrays of any max_entries into the outer map (it still requires
 *   equal type, key/value sizes and flags, hence the flags on all of them); the second lets
 *   userspace fill a table through a mapping, one copy instead of an update per slot;
 * - element 0 = table_size (the prime M), elements 1..=M = backend id of Maglev slot 0..M-1.
 * The datapath picks slot = 1 + flow_hash % M; a missing table, M = 0 or backend id 0 mean
 * "no backend" (GD_REASON_NO_BACKEND_DROP).
 */

/* gd_backends: ARRAY indexed by backend_id. */
#define GD_BACKEND_UNUSED 0
#define GD_BACKEND_ACTIVE 1
#define GD_BACKEND_TERMINATING 2 /* keeps its established flows, gets no new ones */
#define GD_BACKEND_MAINTENANCE 3 /* out of the Maglev table and its flows are moved */

struct gd_backend {
	__u8 addr[16];
	__u8 family;
	__u8 state;
	__be16 port; /* the service port as the backend sees it (DSR: normally the VIP port) */
	__u32 service_id;
};

/* gd_lb_flows: LRU connection table. Key is the client's 5-tuple toward the VIP. */
struct gd_flow_key {
	__u8 src[16];
	__u8 dst[16];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 family;
	__u16 pad;
};

struct gd_lb_flow {
	__u32 backend_id;
	__u32 service_id;
};

/* gd_lb_affinity: LRU, ClientIP session affinity. */
struct gd_affinity_key {
	__u8 client[16];
	__u32 service_id;
	__u8 family;
	__u8 pad[3];
};

struct gd_affinity {
	__u64 last_seen_ns; /* bpf_ktime_get_ns() (written with the coarse variant: same clock) */
	__u32 backend_id;
	__u32 pad;
};

/*
 * gd_source_ranges (pinned as gd_src_ranges): LPM_TRIE of allowed client CIDRs per service.
 * prefixlen counts the bits of service_id + family + pad (64) plus the CIDR length.
 */
struct gd_source_range_key {
	__u32 prefixlen;
	__u32 service_id;
	__u8 family;
	__u8 pad[3];
	__u8 addr[16];
};
#define GD_SOURCE_RANGE_PREFIX_BITS 64

/* gd_lb_settings: ARRAY with one entry (index 0), written by userspace on every reconcile. */
struct gd_lb_settings {
	/*
	 * Outer source address of encapsulated packets. The bits set in *_hostmask are replaced by
	 * the flow hash, so the backend NIC's RSS spreads flows over its queues; a zero mask means a
	 * fixed source. A zero base for a family means "no source for this family" and VIP traffic
	 * that needs it is dropped with GD_REASON_NO_ENCAP_SOURCE.
	 */
	__u8 src4[4];
	__u8 src4_hostmask[4];
	__u8 src6[16];
	__u8 src6_hostmask[16];
	__u32 flags; /* GD_LB_F_* */
	__u32 pad;
};

/*
 * Every encapsulated packet is routed by the kernel instead of transmitted from XDP: set in
 * IPsec mode, because XFRM policies (encryption) apply only on the kernel's path.
 */
#define GD_LB_F_KERNEL_ROUTE (1u << 0)

/*
 * gd_service_stats (index service_id) and gd_backend_stats (index backend_id): PERCPU_ARRAY,
 * pinned as gd_svc_stats and gd_be_stats (map names are limited to 15 characters).
 */
struct gd_traffic_counters {
	__u64 packets;
	__u64 bytes;
	__u64 new_flows;
};

/*
 * gd_reasons: PERCPU_ARRAY indexed by GD_REASON_*: what the datapath did with packets it did
 * not simply forward, and why. Names live in gatewayd/common/src/maps.rs (REASON_NAMES) and
 * must keep this order.
 */
#define GD_REASON_NON_VIP_PASS 0      /* not for a VIP: passed to the stack untouched */
#define GD_REASON_MALFORMED_PASS 1    /* truncated or bad header: passed, the stack drops it */
#define GD_REASON_FRAGMENT_DROP 2     /* IP fragment to a VIP: no L4 ports to balance on */
#define GD_REASON_SOURCE_RANGE_DROP 3 /* client outside the service's source_ranges */
#define GD_REASON_NO_BACKEND_DROP 4   /* service has no backend that accepts new flows */
#define GD_REASON_LRU_MISS_NON_SYN 5  /* TCP non-SYN with no flow entry: re-picked via Maglev */
#define GD_REASON_FIB_NO_NEIGH_PASS 6 /* next hop not resolved: encapsulated, passed to stack */
#define GD_REASON_FIB_DROP 7	      /* no route to the backend */
#define GD_REASON_TOO_BIG_ICMP 8      /* too big once encapsulated: ICMP error sent back */
#define GD_REASON_TOO_BIG_DROP 9      /* too big, and no ICMP error possible (IPv4 without DF) */
#define GD_REASON_NO_ENCAP_SOURCE_DROP 10 /* no outer source address for the backend's family */
#define GD_REASON_ENCAP_FAILED_DROP 11	  /* headroom adjustment failed */
#define GD_REASON_VLAN_PASS 12	  /* VIP packet on a VLAN tag: encapsulated, routed by the stack */
#define GD_REASON_BAD_BACKEND_DROP 13 /* Maglev slot names a backend that is gone (racing update) */
#define GD_REASON_DECAP 14	      /* backend side: outer header stripped */
#define GD_REASON_NAT_EXHAUSTED_DROP 15 /* egress: new flow, no free NAT port among those tried */
#define GD_REASON_RNAT_MISS_PASS 16	/* egress: to an egress address, no live NAT mapping */
#define GD_REASON_EGRESS_UNSUPPORTED_PASS 17 /* egress: selected by a policy, not translatable */
#define GD_REASON_L3_DEVICE_PASS 18 /* backend routed via a device without MACs (WireGuard): stack */
#define GD_REASON_KERNEL_ROUTE_PASS 19 /* GD_LB_F_KERNEL_ROUTE (IPsec): encapsulated, to the stack */
#define GD_REASON_MAX 20

struct gd_reason_counters {
	__u64 packets;
	__u64 bytes;
};

/*
 * gd_events: RINGBUF of flow events for `gatewayctl observe`. Programs write events only while
 * gd_observe[0].enabled is set (an observer is connected), and only on new flows and drops:
 * with nobody listening the cost is one array lookup on those paths and nothing on established
 * flows. A full ring drops events, never packets.
 */
#define GD_EVENT_LB_NEW_FLOW 1 /* a flow was assigned a backend */
#define GD_EVENT_DROP 2	       /* a packet was dropped; reason says why */

struct gd_flow_event {
	__u64 ts_ns; /* bpf_ktime_get_ns() */
	struct gd_flow_key key;
	__u32 service_id;
	__u32 backend_id;
	__u32 bytes;
	__u16 reason; /* GD_REASON_* */
	__u8 kind;    /* GD_EVENT_* */
	__u8 pad;
};

/* gd_observe: ARRAY with one entry, written by userspace. */
struct gd_observe {
	__u32 enabled;
	__u32 pad;
};

/*
 * ---------------------------------------------------------------------------------------------
 * Egress gateway (xdp/egress.c): selected pod traffic leaving the egress interface is SNATed to
 * a policy's egress address (gatewayd_snat, tcx egress) and its replies are translated back
 * (gatewayd_rnat, tcx ingress of the same interface). xdp/README.md describes the whole walk.
 * ---------------------------------------------------------------------------------------------
 */
#define GD_MAX_EGRESS_POLICIES 4096   /* gd_egress_pols, gd_egress_stats (index = policy_id) */
#define GD_MAX_EGRESS_PREFIXES 65536  /* gd_egress_dst */
#define GD_MAX_EGRESS_SOURCES 65536   /* gd_egress_src */
#define GD_MAX_EGRESS_ADDRS 1024      /* gd_egress_addrs */
#define GD_MAX_NAT_ENTRIES 262144     /* gd_nat: two entries per flow */
#define GD_EGRESS_MAX_CANDIDATES 8

/*
 * gd_egress_dst: LPM_TRIE, consulted only for packets without a NAT entry. One entry per
 * distinct prefix named by any policy's destination or excluded CIDRs; prefixlen counts the
 * family + pad bits (32) plus the CIDR length. The longest match is the most specific prefix
 * covering the destination; its value lists the policies that apply there, best first.
 */
struct gd_egress_dst_key {
	__u32 prefixlen;
	__u8 family;
	__u8 pad[3];
	__u8 addr[16];
};
#define GD_EGRESS_DST_PREFIX_BITS 32

struct gd_egress_dst {
	__u32 count; /* used entries of policy_ids; 0 = excluded destination: never translated */
	__u32 policy_ids[GD_EGRESS_MAX_CANDIDATES]; /* most specific destination CIDR first, then name */
};

/*
 * gd_egress_src: LPM_TRIE of each policy's source set (pod addresses as /32 or /128, source
 * CIDRs). prefixlen counts policy_id + family + pad (64) plus the CIDR length. The first
 * candidate of gd_egress_dst whose source set holds the packet's source is the flow's policy.
 */
struct gd_egress_src_key {
	__u32 prefixlen;
	__u32 policy_id;
	__u8 family;
	__u8 pad[3];
	__u8 addr[16];
};
#define GD_EGRESS_SRC_PREFIX_BITS 64

/* gd_egress_pols: ARRAY indexed by policy_id (0 unused). family 0 = no such policy. */
struct gd_egress_policy {
	__u8 egress_addr[16]; /* the SNAT source; must be of the family of the policy's traffic */
	__u8 family;
	__u8 pad[3];
};

/*
 * gd_egress_addrs: HASH, the set of every policy's egress address (value unused, 1). Only used
 * to count replies that find no mapping (GD_REASON_RNAT_MISS_PASS); translation never needs it.
 */
struct gd_egress_addr_key {
	__u8 addr[16];
	__u8 family;
	__u8 pad[3];
};

/*
 * gd_egress_cfg: ARRAY with one entry (index 0). Written by userspace before the first policy:
 * an empty port range makes every new flow fail allocation (GD_REASON_NAT_EXHAUSTED_DROP).
 */
struct gd_egress_settings {
	/* Idle timeouts in seconds, by protocol and TCP state (GD_NAT_TCP_*). */
	__u32 tcp_established_s;
	__u32 tcp_closing_s; /* after a FIN or RST in either direction */
	__u32 tcp_syn_s;     /* SYN sent, no answer yet */
	__u32 udp_s;
	__u32 icmp_s;   /* echo request/reply identifiers */
	__u16 port_min; /* NAT ports (and ICMP identifiers), inclusive; HOST byte order: a range, */
	__u16 port_max; /* not a packet field. Keep it outside net.ipv4.ip_local_port_range. */
};

/*
 * gd_nat: LRU_HASH keyed by the 5-tuple as seen on the wire (struct gd_flow_key; for ICMP echo
 * sport = dport = identifier). Every flow has two entries:
 * - ORIGINAL, key (pod, dst, pod port, dst port): addr/port = egress address and NAT port;
 * - REPLY, key (dst, egress address, dst port, NAT port): addr/port = pod address and port.
 * Both carry the same state, policy and times; each direction refreshes both (at most once a
 * second, or when the TCP state changes).
 *
 * An entry is live while now <= expires_ns (bpf_ktime_get_ns clock = CLOCK_MONOTONIC, written
 * with the coarse variant). Past that the datapath treats it as absent and replaces it; the
 * daemon's garbage collector deletes entries with expires_ns < CLOCK_MONOTONIC now, except
 * expires_ns == 1 (a CPU is taking the entry over right now; both halves expire together), and
 * deletes a policy's entries (policy_id) when the policy is removed or changes its egress
 * address. Counting live entries gives the table occupancy.
 */
#define GD_NAT_DIR_ORIGINAL 0
#define GD_NAT_DIR_REPLY 1

#define GD_NAT_OPEN 0		 /* UDP and ICMP: one timeout per protocol */
#define GD_NAT_TCP_SYN_SENT 1	 /* opened by a SYN, no reply seen yet */
#define GD_NAT_TCP_ESTABLISHED 2 /* a reply was seen, or the flow was adopted mid-stream */
#define GD_NAT_TCP_CLOSING 3	 /* FIN or RST seen in either direction */

struct gd_nat_entry {
	__u8 addr[16];	     /* ORIGINAL: egress address; REPLY: pod address */
	__u64 created_ns;    /* when the mapping was made */
	__u64 last_seen_ns;  /* last refresh (the datapath refreshes at most once a second) */
	__u64 expires_ns;    /* last_seen_ns + the timeout of (protocol, state); 1 = being replaced */
	__u32 policy_id;
	__be16 port;	     /* ORIGINAL: NAT port / identifier; REPLY: pod port / identifier */
	__u8 state;	     /* GD_NAT_OPEN or GD_NAT_TCP_* */
	__u8 dir;	     /* GD_NAT_DIR_* */
};

/* gd_egress_stats: PERCPU_ARRAY indexed by policy_id. */
struct gd_egress_counters {
	__u64 packets_out;  /* translated by gatewayd_snat (bytes: frame length) */
	__u64 bytes_out;
	__u64 packets_in;   /* translated back by gatewayd_rnat, ICMP errors included */
	__u64 bytes_in;
	__u64 new_flows;    /* NAT mappings created */
	__u64 nat_failures; /* new flows dropped: no free port (GD_REASON_NAT_EXHAUSTED_DROP) */
};

#endif /* GATEWAYD_MAPS_H */
