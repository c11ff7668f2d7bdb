/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Connection tracking of the egress NAT: the two gd_nat entries of a flow, their TCP state and
 * timeouts, and the choice of a NAT port for a new flow (see gd_nat_entry in gatewayd_maps.h).
 * The table and the settings it follows are defined here, beside the code that reads them.
 */
#ifndef GD_LIB_CONNTRACK_H
#define GD_LIB_CONNTRACK_H

#include "gatewayd_maps.h"
#include "lib/common.h"
#include "lib/hash.h"
#include "lib/proto.h"

/*
 * Pinned by name: a restarted daemon adopts them, so NAT mappings survive restarts.
 * max_entries are defaults: userspace sets them from its configuration at load time.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct gd_flow_key);
	__type(value, struct gd_nat_entry);
	__uint(max_entries, GD_MAX_NAT_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} gd_nat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct gd_egress_settings);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} gd_egress_cfg SEC(".maps");

/*
 * Ports tried for a new flow before it is dropped as GD_REASON_NAT_EXHAUSTED_DROP. Every
 * candidate derives from the flow hash with GD_NAT_SEED (gatewayd_maps.h), fixed like
 * GD_HASH_SEED so that every gateway derives the same port from the same flow: a standby that
 * takes over the egress address translates a flow it has never seen exactly as the failed
 * gateway did, and the flow survives (unless the standby already holds another flow on that
 * port).
 */
#define GD_NAT_PROBES 32
/* Both halves of a flow are rewritten at most this often (and on TCP state changes). */
#define GD_NAT_REFRESH_NS 1000000000ULL
/* expires_ns of an expired entry that one CPU is taking over for a new flow. */
#define GD_NAT_CLAIMED 1ULL

static __always_inline int gd_nat_is_icmp(__u8 proto)
{
	return proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6;
}

static __always_inline __u64 gd_nat_timeout_ns(const struct gd_egress_settings *s, __u8 proto,
					       __u8 state)
{
	__u32 t;

	if (proto == IPPROTO_TCP) {
		if (state == GD_NAT_TCP_ESTABLISHED)
			t = s->tcp_established_s;
		else if (state == GD_NAT_TCP_CLOSING)
			t = s->tcp_closing_s;
		else
			t = s->tcp_syn_s;
	} else if (proto == IPPROTO_UDP) {
		t = s->udp_s;
	} else {
		t = s->icmp_s;
	}
	return (__u64)t * 1000000000ULL;
}

/*
 * State of a new flow. A TCP segment other than a SYN opens an ESTABLISHED entry: after a
 * failover the standby sees the middle of the failed gateway's connections, and the
 * deterministic port lets them continue.
 */
static __always_inline __u8 gd_nat_first_state(__u8 proto, __u8 tcp_flags)
{
	if (proto != IPPROTO_TCP)
		return GD_NAT_OPEN;
	if (tcp_flags & (GD_TCP_FIN | GD_TCP_RST))
		return GD_NAT_TCP_CLOSING;
	if ((tcp_flags & (GD_TCP_SYN | GD_TCP_ACK)) == GD_TCP_SYN)
		return GD_NAT_TCP_SYN_SENT;
	return GD_NAT_TCP_ESTABLISHED;
}

/*
 * State after a packet of a tracked flow. FIN or RST in either direction closes early (the
 * short closing timeout); the first reply with ACK establishes; a new SYN from the pod on a
 * closing entry reopens the 5-tuple (port reuse after TIME_WAIT).
 */
static __always_inline __u8 gd_nat_next_state(__u8 proto, __u8 state, __u8 tcp_flags, int reply)
{
	if (proto != IPPROTO_TCP)
		return GD_NAT_OPEN;
	if (tcp_flags & (GD_TCP_FIN | GD_TCP_RST))
		return GD_NAT_TCP_CLOSING;
	if (!reply && state == GD_NAT_TCP_CLOSING &&
	    (tcp_flags & (GD_TCP_SYN | GD_TCP_ACK)) == GD_TCP_SYN)
		return GD_NAT_TCP_SYN_SENT;
	if (reply && state == GD_NAT_TCP_SYN_SENT && (tcp_flags & GD_TCP_ACK))
		return GD_NAT_TCP_ESTABLISHED;
	return state;
}

/* The key of the other half of the flow whose entry `e` is stored under `k`. */
static __always_inline void gd_nat_peer_key(struct gd_flow_key *peer, const struct gd_flow_key *k,
					    const struct gd_nat_entry *e)
{
	int icmp = gd_nat_is_icmp(k->proto);

	__builtin_memset(peer, 0, sizeof(*peer));
	peer->proto = k->proto;
	peer->family = k->family;
	if (e->dir == GD_NAT_DIR_ORIGINAL) {
		/* (pod, dst, pod port, dst port) -> (dst, egress, dst port, NAT port) */
		__builtin_memcpy(peer->src, k->dst, 16);
		__builtin_memcpy(peer->dst, e->addr, 16);
		peer->sport = icmp ? e->port : k->dport;
		peer->dport = e->port;
	} else {
		/* (dst, egress, dst port, NAT port) -> (pod, dst, pod port, dst port) */
		__builtin_memcpy(peer->src, e->addr, 16);
		__builtin_memcpy(peer->dst, k->src, 16);
		peer->sport = e->port;
		peer->dport = icmp ? e->port : k->sport;
	}
}

/*
 * Is `peer`, found under gd_nat_peer_key(k, e), the other half of this flow? It translates back
 * to k's untranslated side: the pod's address and port for an ORIGINAL half, the egress
 * address and NAT port for a REPLY half.
 */
static __always_inline int gd_nat_is_peer(const struct gd_nat_entry *peer,
					  const struct gd_flow_key *k, const struct gd_nat_entry *e)
{
	int orig = e->dir == GD_NAT_DIR_ORIGINAL;

	return peer->dir != e->dir && peer->expires_ns != GD_NAT_CLAIMED &&
	       peer->port == (orig ? k->sport : k->dport) &&
	       gd_addr_eq(peer->addr, orig ? k->src : k->dst);
}

/*
 * Write `state` and fresh times into both halves of a tracked flow. A missing or foreign other
 * half (LRU eviction, or its port since given to another flow) makes this half useless: it is
 * deleted, so the flow's next packet from the pod maps it again (normally to the same port)
 * rather than translating replies that can no longer come back. `e` must not be used after.
 */
static __always_inline void gd_nat_touch(const struct gd_flow_key *k, struct gd_nat_entry *e,
					 __u8 state, __u64 now)
{
	const struct gd_egress_settings *s;
	struct gd_nat_entry *peer;
	struct gd_flow_key pk;
	__u32 zero = 0;
	__u64 expires;

	s = bpf_map_lookup_elem(&gd_egress_cfg, &zero);
	if (!s)
		return;
	expires = now + gd_nat_timeout_ns(s, k->proto, state);
	gd_nat_peer_key(&pk, k, e);
	peer = bpf_map_lookup_elem(&gd_nat, &pk);
	if (!peer || !gd_nat_is_peer(peer, k, e)) {
		bpf_map_delete_elem(&gd_nat, k);
		return;
	}
	peer->state = state;
	peer->last_seen_ns = now;
	peer->expires_ns = expires;
	e->state = state;
	e->last_seen_ns = now;
	e->expires_ns = expires;
}

/*
 * Choose the NAT port (ICMP: identifier) of a new flow with original key `k` and insert the
 * flow's REPLY half; returns the port in network order, or 0 when every port tried is taken.
 *
 * The candidates are port_min + H_i % range, H_0 = the flow hash with GD_NAT_SEED and
 * H_i = jhash(H_0, i): all functions of the flow alone, so two gateways holding the same flows
 * choose the same ports. A port is taken for this flow when the REPLY key (dst, egress
 * address, dst port, port) is free; only flows to the same destination address and port
 * compete. A live entry there belongs to another flow unless it maps back to this very flow
 * (whose ORIGINAL half was lost), which is reused. An expired one is taken over: its
 * expires_ns is swapped to GD_NAT_CLAIMED first, so two CPUs cannot both take it and a reader
 * sees it expired until it is complete. A free key is inserted with BPF_NOEXIST: if another CPU
 * inserted it first, the next candidate is tried.
 */
static __always_inline __be16 gd_nat_alloc(const struct gd_flow_key *k, const __u8 *egress,
					   __u32 policy_id, __u8 state,
					   const struct gd_egress_settings *s, __u64 now)
{
	int icmp = gd_nat_is_icmp(k->proto);
	struct gd_nat_entry r = {};
	struct gd_flow_key rk = {};
	__u32 range, h, i;

	if (!s->port_min || s->port_max < s->port_min)
		return 0;
	range = (__u32)s->port_max - s->port_min + 1;

	__builtin_memcpy(r.addr, k->src, 16);
	r.port = k->sport;
	r.policy_id = policy_id;
	r.state = state;
	r.dir = GD_NAT_DIR_REPLY;
	r.created_ns = now;
	r.last_seen_ns = now;
	r.expires_ns = now + gd_nat_timeout_ns(s, k->proto, state);

	__builtin_memcpy(rk.src, k->dst, 16);
	__builtin_memcpy(rk.dst, egress, 16);
	rk.sport = k->dport;
	rk.proto = k->proto;
	rk.family = k->family;

	h = gd_flow_hash_seeded(k, GD_NAT_SEED);
	for (i = 0; i < GD_NAT_PROBES; i++) {
		__u32 hi = i ? gd_jhash_3words(h, i, 0, GD_NAT_SEED) : h;
		__be16 port = bpf_htons(s->port_min + hi % range);
		struct gd_nat_entry *cur;
		__u64 old;

		rk.dport = port;
		if (icmp)
			rk.sport = port;
		cur = bpf_map_lookup_elem(&gd_nat, &rk);
		if (!cur) {
			if (!bpf_map_update_elem(&gd_nat, &rk, &r, BPF_NOEXIST))
				return port;
			continue;
		}
		old = cur->expires_ns;
		if (now <= old) {
			if (cur->dir != GD_NAT_DIR_REPLY || cur->port != r.port ||
			    !gd_addr_eq(cur->addr, r.addr))
				continue;
			cur->policy_id = policy_id;
			cur->state = state;
			cur->last_seen_ns = now;
			cur->expires_ns = r.expires_ns;
			return port;
		}
		if (old == GD_NAT_CLAIMED || __sync_val_compare_and_swap(&cur->expires_ns, old,
									  GD_NAT_CLAIMED) != old)
			continue;
		__builtin_memcpy(cur->addr, r.addr, 16);
		cur->created_ns = now;
		cur->last_seen_ns = now;
		cur->policy_id = policy_id;
		cur->port = r.port;
		cur->state = state;
		cur->dir = GD_NAT_DIR_REPLY;
		cur->expires_ns = r.expires_ns;
		return port;
	}
	return 0;
}

#endif /* GD_LIB_CONNTRACK_H */
