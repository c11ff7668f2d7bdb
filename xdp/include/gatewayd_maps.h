/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Map layouts shared by the eBPF programs and userspace.
 *
 * The contract between the datapath and userspace, named once: every struct a map holds or an
 * event carries, and every constant userspace must agree on (reasons, states, flags, families,
 * prefix lengths, default capacities, hash seeds) as an enum.
 *
 * Everything here has a mirror in gatewayd/common/src/maps.rs. Both sides assert each struct's
 * size (_Static_assert here, a const assert there), and the daemon's BTF test
 * (rust_map_types_match_the_btf_of_the_objects) compares with the BTF of the compiled objects
 * every mirrored struct's size and field offsets and every enum's enumerator names, values and
 * order, so a change on one side that is not made on the other fails the build or the tests.
 * Enums rather than #defines for that reason: only enums reach BTF (through gd_contract below).
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

/* Userspace writes these structs byte for byte: a size change must be made on both sides. */
#define GD_CONTRACT_SIZE(type, size)                                                               \
	_Static_assert(sizeof(struct type) == (size),                                              \
		       "struct " #type " is mirrored in gatewayd/common/src/maps.rs: change both")

enum gd_family {
	GD_FAMILY_INET = 4,
	GD_FAMILY_INET6 = 6,
};

/*
 * Default capacities (max_entries; userspace overrides them from the config at load time) and
 * fixed array lengths.
 */
enum gd_limit {
	GD_MAX_SERVICES = 65536,
	GD_MAX_BACKENDS = 65536,
	GD_MAX_LB_FLOWS = 1048576,
	GD_MAX_AFFINITY = 262144,
	GD_MAX_SOURCE_RANGES = 65536,
	GD_MAX_EGRESS_POLICIES = 4096, /* gd_egress_pols, gd_egress_stats (index = policy_id) */
	GD_MAX_EGRESS_PREFIXES = 65536, /* gd_egress_dst */
	GD_MAX_EGRESS_SOURCES = 65536,	/* gd_egress_src */
	GD_MAX_EGRESS_ADDRS = 1024,	/* gd_egress_addrs */
	GD_MAX_NAT_ENTRIES = 262144,	/* gd_nat: two entries per flow */
	GD_EGRESS_MAX_CANDIDATES = 8,	/* gd_egress_dst.policy_ids */
};

/* Size of the Maglev table template (userspace creates every real table with its own size). */
#define GD_MAGLEV_DEFAULT_SIZE 16381

/*
 * LPM trie keys start with the prefix length, which counts the bits of the fixed fields between
 * it and the address (id, family, pad) plus the CIDR length.
 */
enum gd_lpm_prefix_bits {
	GD_SOURCE_RANGE_PREFIX_BITS = 64, /* gd_source_range_key: service_id, family, pad */
	GD_EGRESS_DST_PREFIX_BITS = 32,	  /* gd_egress_dst_key: family, pad */
	GD_EGRESS_SRC_PREFIX_BITS = 64,	  /* gd_egress_src_key: policy_id, family, pad */
};

/*
 * Seeds of the flow hash (lib/hash.h). Fixed, so every gateway computes the same hash for a
 * flow and userspace can reproduce it ("where would this flow go").
 * - GD_HASH_SEED ("gdwb"): Maglev slot, outer source bits, GUE source port, IPv6 flow label.
 * - GD_NAT_SEED ("gdnt"): the egress NAT's port choice. Distinct so that NAT ports do not
 *   correlate with load-balancer choices.
 */
enum gd_hash_seed {
	GD_HASH_SEED = 0x67647762,
	GD_NAT_SEED = 0x67646e74,
};

/* gd_services: VIP:port/proto -> service. */
struct gd_vip_key {
	__u8 addr[16];
	__be16 port;
	__u8 proto; /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 family;
};
GD_CONTRACT_SIZE(gd_vip_key, 20);

/* gd_service.flags */
enum gd_service_flag {
	GD_SVC_F_SOURCE_RANGES = 1 << 0, /* only clients in gd_source_ranges may connect */
	GD_SVC_F_AFFINITY = 1 << 1,	 /* ClientIP session affinity, see affinity_timeout_s */
};

/* gd_service.encap */
enum gd_encap_type {
	GD_ENCAP_IPIP = 0, /* IPIP / IP6IP6 / 4in6 / 6in4 depending on the two families */
	GD_ENCAP_GUE = 1,  /* GUE variant 1: outer IP + UDP(gue_port) + inner IP packet */
};

struct gd_service {
	__u32 service_id;
	__u32 flags; /* enum gd_service_flag */
	__u32 affinity_timeout_s;
	__u8 encap; /* enum gd_encap_type */
	__u8 pad;
	__be16 gue_port;
};
GD_CONTRACT_SIZE(gd_service, 16);

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
enum gd_backend_state {
	GD_BACKEND_UNUSED = 0,
	GD_BACKEND_ACTIVE = 1,
	GD_BACKEND_TERMINATING = 2, /* keeps its established flows, gets no new ones */
	GD_BACKEND_MAINTENANCE = 3, /* out of the Maglev table and its flows are moved */
};

struct gd_backend {
	__u8 addr[16];
	__u8 family;
	__u8 state; /* enum gd_backend_state */
	__be16 port; /* the service port as the backend sees it (DSR: normally the VIP port) */
	__u32 service_id;
};
GD_CONTRACT_SIZE(gd_backend, 24);

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
GD_CONTRACT_SIZE(gd_flow_key, 40);

struct gd_lb_flow {
	__u32 backend_id;
	__u32 service_id;
};
GD_CONTRACT_SIZE(gd_lb_flow, 8);

/* gd_lb_affinity: LRU, ClientIP session affinity. */
struct gd_affinity_key {
	__u8 client[16];
	__u32 service_id;
	__u8 family;
	__u8 pad[3];
};
GD_CONTRACT_SIZE(gd_affinity_key, 24);

struct gd_affinity {
	__u64 last_seen_ns; /* bpf_ktime_get_ns() (written with the coarse variant: same clock) */
	__u32 backend_id;
	__u32 pad;
};
GD_CONTRACT_SIZE(gd_affinity, 16);

/*
 * gd_source_ranges (pinned as gd_src_ranges): LPM_TRIE of allowed client CIDRs per service.
 * prefixlen = GD_SOURCE_RANGE_PREFIX_BITS + the CIDR length.
 */
struct gd_source_range_key {
	__u32 prefixlen;
	__u32 service_id;
	__u8 family;
	__u8 pad[3];
	__u8 addr[16];
};
GD_CONTRACT_SIZE(gd_source_range_key, 28);

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
	__u32 flags; /* enum gd_lb_flag */
	__u32 pad;
};
GD_CONTRACT_SIZE(gd_lb_settings, 48);

/* gd_lb_settings.flags */
enum gd_lb_flag {
	/*
	 * Every encapsulated packet is routed by the kernel instead of transmitted from XDP: set
	 * in IPsec mode, because XFRM policies (encryption) apply only on the kernel's path.
	 */
	GD_LB_F_KERNEL_ROUTE = 1 << 0,
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
GD_CONTRACT_SIZE(gd_traffic_counters, 24);

/*
 * gd_reasons: PERCPU_ARRAY indexed by GD_REASON_*: what the datapath did with packets it did
 * not simply forward, and why. Userspace names each slot after its enumerator
 * (REASON_NAMES in gatewayd/common/src/maps.rs: GD_REASON_NON_VIP_PASS is "non_vip_pass"), and
 * the BTF test checks names and order: a reordered enum cannot silently relabel the metrics.
 */
enum gd_reason {
	GD_REASON_NON_VIP_PASS,		   /* not for a VIP: passed to the stack untouched */
	GD_REASON_MALFORMED_PASS,	   /* truncated or bad header: passed, the stack drops it */
	GD_REASON_FRAGMENT_DROP,	   /* IP fragment to a VIP: no L4 ports to balance on */
	GD_REASON_SOURCE_RANGE_DROP,	   /* client outside the service's source_ranges */
	GD_REASON_NO_BACKEND_DROP,	   /* service has no backend that accepts new flows */
	GD_REASON_LRU_MISS_NON_SYN,	   /* TCP non-SYN with no flow entry: re-picked via Maglev */
	GD_REASON_FIB_NO_NEIGH_PASS,	   /* next hop not resolved: encapsulated, passed to stack */
	GD_REASON_FIB_DROP,		   /* no route to the backend */
	GD_REASON_TOO_BIG_ICMP,		   /* too big once encapsulated: ICMP error sent back */
	GD_REASON_TOO_BIG_DROP,		   /* too big, and no ICMP error possible (IPv4 without DF) */
	GD_REASON_NO_ENCAP_SOURCE_DROP,	   /* no outer source address for the backend's family */
	GD_REASON_ENCAP_FAILED_DROP,	   /* headroom adjustment failed */
	GD_REASON_VLAN_PASS,		   /* VIP packet on a VLAN tag: encapsulated, routed by the stack */
	GD_REASON_BAD_BACKEND_DROP,	   /* Maglev slot names a backend that is gone (racing update) */
	GD_REASON_DECAP,		   /* backend side: outer header stripped */
	GD_REASON_NAT_EXHAUSTED_DROP,	   /* egress: new flow, no free NAT port among those tried */
	GD_REASON_RNAT_MISS_PASS,	   /* egress: to an egress address, no live NAT mapping */
	GD_REASON_EGRESS_UNSUPPORTED_PASS, /* egress: selected by a policy, not translatable */
	GD_REASON_L3_DEVICE_PASS,	   /* backend routed via a device without MACs (WireGuard) */
	GD_REASON_KERNEL_ROUTE_PASS,	   /* GD_LB_F_KERNEL_ROUTE (IPsec): encapsulated, to the stack */
	GD_REASON_MAX,			   /* the number of reasons: gd_reasons' max_entries */
};

struct gd_reason_counters {
	__u64 packets;
	__u64 bytes;
};
GD_CONTRACT_SIZE(gd_reason_counters, 16);

/*
 * gd_events: RINGBUF of flow events for `gatewayctl observe`. Programs write events only while
 * gd_observe[0].enabled is set (an observer is connected), and only on new flows and drops:
 * with nobody listening the cost is one array lookup on those paths and nothing on established
 * flows. A full ring drops events, never packets.
 */
enum gd_event_kind {
	GD_EVENT_LB_NEW_FLOW = 1, /* a flow was assigned a backend */
	GD_EVENT_DROP = 2,	  /* a packet was dropped; reason says why */
};

struct gd_flow_event {
	__u64 ts_ns; /* bpf_ktime_get_ns() */
	struct gd_flow_key key;
	__u32 service_id;
	__u32 backend_id;
	__u32 bytes;
	__u16 reason; /* enum gd_reason */
	__u8 kind;    /* enum gd_event_kind */
	__u8 pad;
};
GD_CONTRACT_SIZE(gd_flow_event, 64);

/* gd_observe: ARRAY with one entry, written by userspace. */
struct gd_observe {
	__u32 enabled;
	__u32 pad;
};
GD_CONTRACT_SIZE(gd_observe, 8);

/*
 * ---------------------------------------------------------------------------------------------
 * Egress gateway (xdp/egress.c): selected pod traffic leaving the egress interface is SNATed to
 * a policy's egress address (gatewayd_snat, tcx egress) and its replies are translated back
 * (gatewayd_rnat, tcx ingress of the same interface). xdp/README.md describes the whole walk.
 * ---------------------------------------------------------------------------------------------
 */
/*
 * gd_egress_dst: LPM_TRIE, consulted only for packets without a NAT entry. One entry per
 * distinct prefix named by any policy's destination or excluded CIDRs; prefixlen =
 * GD_EGRESS_DST_PREFIX_BITS + the CIDR length. The longest match is the most specific prefix
 * covering the destination; its value lists the policies that apply there, best first.
 */
struct gd_egress_dst_key {
	__u32 prefixlen;
	__u8 family;
	__u8 pad[3];
	__u8 addr[16];
};
GD_CONTRACT_SIZE(gd_egress_dst_key, 24);

struct gd_egress_dst {
	__u32 count; /* used entries of policy_ids; 0 = excluded destination: never translated */
	__u32 policy_ids[GD_EGRESS_MAX_CANDIDATES]; /* most specific destination CIDR first, then name */
};
GD_CONTRACT_SIZE(gd_egress_dst, 36);

/*
 * gd_egress_src: LPM_TRIE of each policy's source set (pod addresses as /32 or /128, source
 * CIDRs). prefixlen = GD_EGRESS_SRC_PREFIX_BITS + the CIDR length. The first candidate of
 * gd_egress_dst whose source set holds the packet's source is the flow's policy.
 */
struct gd_egress_src_key {
	__u32 prefixlen;
	__u32 policy_id;
	__u8 family;
	__u8 pad[3];
	__u8 addr[16];
};
GD_CONTRACT_SIZE(gd_egress_src_key, 28);

/* gd_egress_pols: ARRAY indexed by policy_id (0 unused). family 0 = no such policy. */
struct gd_egress_policy {
	__u8 egress_addr[16]; /* the SNAT source; must be of the family of the policy's traffic */
	__u8 family;
	__u8 pad[3];
};
GD_CONTRACT_SIZE(gd_egress_policy, 20);

/*
 * gd_egress_addrs: HASH, the set of every policy's egress address (value unused, 1). Only used
 * to count replies that find no mapping (GD_REASON_RNAT_MISS_PASS); translation never needs it.
 */
struct gd_egress_addr_key {
	__u8 addr[16];
	__u8 family;
	__u8 pad[3];
};
GD_CONTRACT_SIZE(gd_egress_addr_key, 20);

/*
 * gd_egress_cfg: ARRAY with one entry (index 0). Written by userspace before the first policy:
 * an empty port range makes every new flow fail allocation (GD_REASON_NAT_EXHAUSTED_DROP).
 */
struct gd_egress_settings {
	/* Idle timeouts in seconds, by protocol and TCP state (enum gd_nat_state). */
	__u32 tcp_established_s;
	__u32 tcp_closing_s; /* after a FIN or RST in either direction */
	__u32 tcp_syn_s;     /* SYN sent, no answer yet */
	__u32 udp_s;
	__u32 icmp_s;   /* echo request/reply identifiers */
	__u16 port_min; /* NAT ports (and ICMP identifiers), inclusive; HOST byte order: a range, */
	__u16 port_max; /* not a packet field. Keep it outside net.ipv4.ip_local_port_range. */
};
GD_CONTRACT_SIZE(gd_egress_settings, 24);

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
enum gd_nat_dir {
	GD_NAT_DIR_ORIGINAL = 0,
	GD_NAT_DIR_REPLY = 1,
};

enum gd_nat_state {
	GD_NAT_OPEN = 0,	    /* UDP and ICMP: one timeout per protocol */
	GD_NAT_TCP_SYN_SENT = 1,    /* opened by a SYN, no reply seen yet */
	GD_NAT_TCP_ESTABLISHED = 2, /* a reply was seen, or the flow was adopted mid-stream */
	GD_NAT_TCP_CLOSING = 3,	    /* FIN or RST seen in either direction */
};

struct gd_nat_entry {
	__u8 addr[16];	     /* ORIGINAL: egress address; REPLY: pod address */
	__u64 created_ns;    /* when the mapping was made */
	__u64 last_seen_ns;  /* last refresh (the datapath refreshes at most once a second) */
	__u64 expires_ns;    /* last_seen_ns + the timeout of (protocol, state); 1 = being replaced */
	__u32 policy_id;
	__be16 port;	     /* ORIGINAL: NAT port / identifier; REPLY: pod port / identifier */
	__u8 state;	     /* enum gd_nat_state */
	__u8 dir;	     /* enum gd_nat_dir */
};
GD_CONTRACT_SIZE(gd_nat_entry, 48);

/* gd_egress_stats: PERCPU_ARRAY indexed by policy_id. */
struct gd_egress_counters {
	__u64 packets_out;  /* translated by gatewayd_snat (bytes: frame length) */
	__u64 bytes_out;
	__u64 packets_in;   /* translated back by gatewayd_rnat, ICMP errors included */
	__u64 bytes_in;
	__u64 new_flows;    /* NAT mappings created */
	__u64 nat_failures; /* new flows dropped: no free port (GD_REASON_NAT_EXHAUSTED_DROP) */
};
GD_CONTRACT_SIZE(gd_egress_counters, 48);

/*
 * Only the types of maps and globals reach an object's BTF, not those of locals or constants:
 * this read-only global, in every object, puts the event layout and every enum above there, so
 * the BTF test can check them against their Rust mirrors. No program reads it.
 */
struct gd_contract {
	struct gd_flow_event event;
	enum gd_family family;
	enum gd_limit limit;
	enum gd_lpm_prefix_bits lpm_prefix_bits;
	enum gd_hash_seed hash_seed;
	enum gd_service_flag service_flag;
	enum gd_encap_type encap_type;
	enum gd_backend_state backend_state;
	enum gd_lb_flag lb_flag;
	enum gd_reason reason;
	enum gd_event_kind event_kind;
	enum gd_nat_dir nat_dir;
	enum gd_nat_state nat_state;
};
const volatile struct gd_contract gd_contract __attribute__((used));

#endif /* GATEWAYD_MAPS_H */
