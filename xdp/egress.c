// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Egress gateway NAT, a pair of TC programs on the egress interface:
 *
 * - gatewayd_snat (tcx egress): pod traffic the cluster routed through this gateway leaves with
 *   the source address of its policy's egress address and a NAT port (ICMP echo: identifier);
 * - gatewayd_rnat (tcx ingress): replies to egress address:port, and ICMP errors quoting a
 *   translated packet, get the pod's address and port back; the stack then routes them to it.
 *
 * A packet first looks up its conntrack entry (gd_nat); only a flow without one pays for the
 * policy lookup (gd_egress_dst, gd_egress_src) and the port choice. Traffic that no policy
 * selects, and excluded destinations, pass untouched. What happened to packets that were not
 * simply translated or passed is counted in gd_reasons; see xdp/README.md.
 */
#include "gatewayd_maps.h"
#include "lib/common.h"
#include "lib/conntrack.h"
#include "lib/nat.h"
#include "lib/parse.h"
#include "lib/proto.h"
#include "lib/report.h"

/*
 * The policy maps (the NAT table is in lib/conntrack.h). All pinned by name: a restarted
 * daemon adopts them. max_entries are defaults: userspace sets them from its configuration at
 * load time.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct gd_egress_dst_key);
	__type(value, struct gd_egress_dst);
	__uint(max_entries, GD_MAX_EGRESS_PREFIXES);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* required for LPM tries */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} gd_egress_dst SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct gd_egress_src_key);
	__type(value, __u8);
	__uint(max_entries, GD_MAX_EGRESS_SOURCES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} gd_egress_src SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct gd_egress_policy);
	__uint(max_entries, GD_MAX_EGRESS_POLICIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} gd_egress_pols SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct gd_egress_addr_key);
	__type(value, __u8);
	__uint(max_entries, GD_MAX_EGRESS_ADDRS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} gd_egress_addrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct gd_egress_counters);
	__uint(max_entries, GD_MAX_EGRESS_POLICIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} gd_egress_stats SEC(".maps");


static __always_inline struct gd_egress_counters *gd_egress_counters(__u32 policy_id)
{
	return bpf_map_lookup_elem(&gd_egress_stats, &policy_id);
}

static __always_inline void gd_count_out(__u32 policy_id, __u64 bytes, __u64 new_flow)
{
	struct gd_egress_counters *c = gd_egress_counters(policy_id);

	if (c) {
		c->packets_out++;
		c->bytes_out += bytes;
		c->new_flows += new_flow;
	}
}

static __always_inline void gd_count_in(__u32 policy_id, __u64 bytes)
{
	struct gd_egress_counters *c = gd_egress_counters(policy_id);

	if (c) {
		c->packets_in++;
		c->bytes_in += bytes;
	}
}

/*
 * The policy of a packet without a NAT entry, 0 if none. The destination trie gives the most
 * specific prefix any policy names and its candidates, best first (userspace orders them: most
 * specific destination CIDR, then policy name; an excluded prefix has none); the first one
 * whose source set holds the packet's source wins.
 */
static __always_inline __u32 gd_egress_select(const struct gd_flow_key *k)
{
	__u32 bits = k->family == GD_FAMILY_INET ? 32 : 128, i, n;
	struct gd_egress_dst_key dk = {};
	struct gd_egress_src_key sk = {};
	const struct gd_egress_dst *d;

	dk.prefixlen = GD_EGRESS_DST_PREFIX_BITS + bits;
	dk.family = k->family;
	__builtin_memcpy(dk.addr, k->dst, 16);
	d = bpf_map_lookup_elem(&gd_egress_dst, &dk);
	if (!d)
		return 0;
	n = d->count;
	sk.prefixlen = GD_EGRESS_SRC_PREFIX_BITS + bits;
	sk.family = k->family;
	__builtin_memcpy(sk.addr, k->src, 16);
	for (i = 0; i < GD_EGRESS_MAX_CANDIDATES && i < n; i++) {
		sk.policy_id = d->policy_ids[i];
		if (bpf_map_lookup_elem(&gd_egress_src, &sk))
			return sk.policy_id;
	}
	return 0;
}

/* The policy's egress address, if the policy exists and is of the packet's family. */
static __always_inline const struct gd_egress_policy *gd_egress_policy(__u32 policy_id, __u8 family)
{
	const struct gd_egress_policy *pol = bpf_map_lookup_elem(&gd_egress_pols, &policy_id);

	return pol && pol->family == family ? pol : NULL;
}

/*
 * Packets without a NAT entry: a fragment gets its policy's egress address (ports live in the
 * first fragment only, which went through the conntrack), anything else selected by a policy
 * cannot be translated and is counted.
 */
static __always_inline int gd_snat_stateless(struct __sk_buff *skb, const struct gd_pkt *p,
					     int kind)
{
	const struct gd_egress_policy *pol;
	__u32 policy_id = gd_egress_select(&p->key);

	if (!policy_id)
		return TC_ACT_OK;
	if (kind == GD_NAT_FRAGMENT) {
		pol = gd_egress_policy(policy_id, p->key.family);
		if (!pol)
			return TC_ACT_OK;
		/* Fails only without memory to unshare the header: never let the pod address out. */
		if (gd_nat_rewrite_addr(skb, p, 0, pol->egress_addr))
			return TC_ACT_SHOT;
		gd_count_out(policy_id, p->len, 0);
		return TC_ACT_OK;
	}
	gd_count_reason(GD_REASON_EGRESS_UNSUPPORTED_PASS, p->len);
	return TC_ACT_OK;
}

/*
 * An ICMP error, translated by the flow of the packet it quotes (see gd_nat_parse_quote):
 * arriving (reply) it goes back to the pod, sent by a pod it leaves from the egress address.
 * Returns 1 when translated, 0 when it quotes no live flow, -1 when malformed.
 */
static __always_inline int gd_nat_icmp_error(struct __sk_buff *skb, const struct gd_pkt *p,
					     int reply)
{
	const struct gd_nat_entry *e;
	struct gd_flow_key key;
	struct gd_quote q;
	int rc;

	rc = gd_nat_parse_quote(skb, p, &q, &key, reply);
	if (rc == GD_NAT_MALFORMED)
		return -1;
	if (rc != GD_NAT_ICMP_ERROR)
		return 0;
	e = bpf_map_lookup_elem(&gd_nat, &key);
	if (!e || e->dir != (reply ? GD_NAT_DIR_REPLY : GD_NAT_DIR_ORIGINAL) ||
	    bpf_ktime_get_coarse_ns() > e->expires_ns)
		return 0;
	/* Fails on bounds only, before anything is written. */
	if (gd_nat_rewrite_quote(skb, p, &q, reply, e->addr, e->port))
		return 0;
	if (reply)
		gd_count_in(e->policy_id, p->len);
	else
		gd_count_out(e->policy_id, p->len, 0);
	return 1;
}

/* A new flow: policy, port, both NAT entries, then the translation. */
static __always_inline int gd_snat_new(struct __sk_buff *skb, const struct gd_pkt *p, __u64 now)
{
	const struct gd_egress_settings *s;
	const struct gd_egress_policy *pol;
	struct gd_egress_counters *c;
	struct gd_nat_entry o = {};
	__u32 policy_id, zero = 0;
	__be16 port;
	__u8 state;

	policy_id = gd_egress_select(&p->key);
	if (!policy_id)
		return TC_ACT_OK;
	pol = gd_egress_policy(policy_id, p->key.family);
	s = bpf_map_lookup_elem(&gd_egress_cfg, &zero);
	if (!pol || !s)
		return TC_ACT_OK;

	state = gd_nat_first_state(p->key.proto, p->tcp_flags);
	port = gd_nat_alloc(&p->key, pol->egress_addr, policy_id, state, s, now);
	if (!port) {
		/* Sending it untranslated would leak the pod address; a wrong port, a flow. */
		gd_count_reason(GD_REASON_NAT_EXHAUSTED_DROP, p->len);
		c = gd_egress_counters(policy_id);
		if (c)
			c->nat_failures++;
		gd_emit_event(GD_EVENT_DROP, GD_REASON_NAT_EXHAUSTED_DROP, &p->key, 0, 0, p->len);
		return TC_ACT_SHOT;
	}

	__builtin_memcpy(o.addr, pol->egress_addr, 16);
	o.created_ns = now;
	o.last_seen_ns = now;
	o.expires_ns = now + gd_nat_timeout_ns(s, p->key.proto, state);
	o.policy_id = policy_id;
	o.port = port;
	o.state = state;
	o.dir = GD_NAT_DIR_ORIGINAL;
	bpf_map_update_elem(&gd_nat, &p->key, &o, BPF_ANY);

	if (gd_nat_rewrite(skb, p, 0, o.addr, port))
		return TC_ACT_SHOT;
	gd_count_out(policy_id, p->len, 1);
	return TC_ACT_OK;
}

SEC("classifier")
int gatewayd_snat(struct __sk_buff *skb)
{
	struct gd_nat_entry *e;
	struct gd_pkt p;
	__u64 now;
	__u8 state;
	int kind, rc;

	kind = gd_nat_parse(skb, &p, 0);
	if (likely(kind == GD_NAT_FLOW)) {
		now = bpf_ktime_get_coarse_ns(); /* jiffy resolution, no clock read */
		e = bpf_map_lookup_elem(&gd_nat, &p.key);
		if (!e || now > e->expires_ns)
			return gd_snat_new(skb, &p, now);
		/* A REPLY key leaving by this interface is not a pod's flow. */
		if (e->dir != GD_NAT_DIR_ORIGINAL)
			return TC_ACT_OK;
		if (gd_nat_rewrite(skb, &p, 0, e->addr, e->port))
			return TC_ACT_SHOT;
		gd_count_out(e->policy_id, p.len, 0);
		state = gd_nat_next_state(p.key.proto, e->state, p.tcp_flags, 0);
		if (state != e->state || now - e->last_seen_ns >= GD_NAT_REFRESH_NS)
			gd_nat_touch(&p.key, e, state, now);
		return TC_ACT_OK;
	}
	if (kind == GD_NAT_ICMP_ERROR) {
		rc = gd_nat_icmp_error(skb, &p, 0);
		if (rc > 0)
			return TC_ACT_OK;
		if (rc == 0)
			return gd_snat_stateless(skb, &p, GD_NAT_OTHER);
		kind = GD_NAT_MALFORMED;
	}
	if (kind == GD_NAT_MALFORMED) {
		gd_count_reason(GD_REASON_MALFORMED_PASS, p.len);
		return TC_ACT_OK;
	}
	if (kind == GD_NAT_FRAGMENT || kind == GD_NAT_OTHER)
		return gd_snat_stateless(skb, &p, kind);
	return TC_ACT_OK;
}

/* Nothing to translate back: counted if it was addressed to an egress address. */
static __always_inline int gd_rnat_miss(const struct gd_pkt *p)
{
	struct gd_egress_addr_key a = {};

	__builtin_memcpy(a.addr, p->key.dst, 16);
	a.family = p->key.family;
	if (bpf_map_lookup_elem(&gd_egress_addrs, &a))
		gd_count_reason(GD_REASON_RNAT_MISS_PASS, p->len);
	return TC_ACT_OK;
}

SEC("classifier")
int gatewayd_rnat(struct __sk_buff *skb)
{
	struct gd_nat_entry *e;
	struct gd_pkt p;
	__u64 now;
	__u8 state;
	int kind, rc;

	kind = gd_nat_parse(skb, &p, 1);
	if (likely(kind == GD_NAT_FLOW)) {
		now = bpf_ktime_get_coarse_ns();
		e = bpf_map_lookup_elem(&gd_nat, &p.key);
		/* An ORIGINAL key arriving here is a pod's packet on a one-armed gateway. */
		if (!e || e->dir != GD_NAT_DIR_REPLY || now > e->expires_ns)
			return gd_rnat_miss(&p);
		if (gd_nat_rewrite(skb, &p, 1, e->addr, e->port))
			return TC_ACT_SHOT;
		gd_count_in(e->policy_id, p.len);
		state = gd_nat_next_state(p.key.proto, e->state, p.tcp_flags, 1);
		if (state != e->state || now - e->last_seen_ns >= GD_NAT_REFRESH_NS)
			gd_nat_touch(&p.key, e, state, now);
		return TC_ACT_OK;
	}
	if (kind == GD_NAT_ICMP_ERROR) {
		rc = gd_nat_icmp_error(skb, &p, 1);
		if (rc > 0)
			return TC_ACT_OK;
		if (rc == 0)
			return gd_rnat_miss(&p);
		kind = GD_NAT_MALFORMED;
	}
	if (kind == GD_NAT_MALFORMED) {
		gd_count_reason(GD_REASON_MALFORMED_PASS, p.len);
		return TC_ACT_OK;
	}
	/* Later fragments of replies carry no port to find the pod by. */
	if (kind == GD_NAT_FRAGMENT)
		return gd_rnat_miss(&p);
	return TC_ACT_OK;
}

char _license[] SEC("license") = "Dual BSD/GPL";
