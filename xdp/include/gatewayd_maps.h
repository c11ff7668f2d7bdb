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
 * - map_flags BPF_F_INNER_MAP (0x1000) on every inner map: with it the kernel accepts inner
 *   arrays of any max_entries into the outer map (it still requires equal type, key/value
 *   sizes and flags, hence the flag on all of them);
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
	__u32 flags;
	__u32 pad;
};

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
#define GD_REASON_MAX 15

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

#endif /* GATEWAYD_MAPS_H */
