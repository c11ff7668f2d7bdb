// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * gatewayd_lb: XDP direct-server-return L4 load balancer for the gateway nodes.
 *
 * Packets to a VIP:port/proto listed in gd_services are sent to one backend, chosen once per
 * flow (connection table, then ClientIP affinity, then Maglev) and encapsulated toward it;
 * the backend answers the client directly. Everything else is passed to the stack untouched.
 * What happened to packets that were not simply forwarded is counted in gd_reasons (see
 * GD_REASON_* in gatewayd_maps.h and README.md).
 */
#include "gatewayd_maps.h"
#include "lib/common.h"
#include "lib/ctx.h"
#include "lib/encap.h"
#include "lib/fib.h"
#include "lib/hash.h"
#include "lib/icmp.h"
#include "lib/lb.h"
#include "lib/parse.h"
#include "lib/report.h"

/*
 * Lifetime of a cached next hop toward a backend, in milliseconds; 0 = bpf_fib_lookup on
 * every packet. See lib/fib.h for what the cache trades. Set by the loader (aya set_global)
 * before load; the verifier sees a constant and drops the unused branch.
 */
volatile const __u32 fib_cache_ms = 50;

static __always_inline int gd_verdict(enum gd_reason reason, __u64 bytes, int action)
{
	gd_count_reason(reason, bytes);
	return action;
}

/* A dropped packet of a parsed flow: counted, and shown to observers with its reason. */
static __always_inline int gd_drop(enum gd_reason reason, __u64 bytes, const struct gd_pkt *pkt,
				   __u32 svc_id)
{
	gd_count_reason(reason, bytes);
	gd_emit_event(GD_EVENT_DROP, reason, &pkt->key, svc_id, 0, bytes);
	return XDP_DROP;
}

/*
 * The packet is too big for the path once encapsulated: tell the client (from the VIP) what
 * size it may send, or drop it when that is impossible.
 */
static __always_inline int gd_too_big(struct xdp_md *ctx, const struct gd_pkt *pkt, __u32 svc_id,
				      __u32 path_mtu, __u32 overhead)
{
	__u32 mtu = path_mtu > overhead ? path_mtu - overhead : 0;

	if (pkt->key.family == GD_FAMILY_INET) {
		/* Without DF the client relies on fragmentation, which XDP cannot do. */
		if (!pkt->df)
			return gd_drop(GD_REASON_TOO_BIG_DROP, pkt->len, pkt, svc_id);
		if (mtu < 68) /* RFC 791 minimum; a path this small is misconfigured anyway */
			mtu = 68;
		if (gd_icmp4_frag_needed(ctx, pkt, mtu))
			return gd_drop(GD_REASON_TOO_BIG_DROP, pkt->len, pkt, svc_id);
	} else {
		/*
		 * Below 1280 the client cannot comply (RFC 8200 minimum MTU) and will keep sending
		 * 1280-byte packets: the outer path must carry 1280 + overhead. The true value is
		 * still reported so the problem is visible in the client's captures.
		 */
		if (gd_icmp6_too_big(ctx, pkt, mtu))
			return gd_drop(GD_REASON_TOO_BIG_DROP, pkt->len, pkt, svc_id);
	}
	return gd_verdict(GD_REASON_TOO_BIG_ICMP, pkt->len, XDP_TX);
}

SEC("xdp")
int gatewayd_lb(struct xdp_md *ctx)
{
	const struct gd_lb_settings *settings;
	const struct gd_backend *be = NULL;
	const struct gd_service *svc;
	const struct gd_lb_flow *flow;
	struct bpf_fib_lookup fib;
	struct gd_affinity_key ak;
	struct gd_encap e;
	struct gd_pkt pkt;
	__u32 svc_id, be_id = 0, hash, zero = 0;
	__u64 new_flow = 0, now = 0, len;
	void *data, *data_end;
	struct ethhdr *eth;
	int rc;

	/*
	 * Later fragments, other protocols and IPv6 extension headers (GD_PARSE_L3) have no
	 * ports to find a service by: not balanced.
	 */
	rc = gd_parse(ctx, &pkt, GD_PARSE_VLAN | GD_PARSE_TCP | GD_PARSE_UDP);
	len = pkt.len;
	if (unlikely(rc == GD_PARSE_MALFORMED))
		return gd_verdict(GD_REASON_MALFORMED_PASS, len, XDP_PASS);
	if (rc != GD_PARSE_L4)
		return gd_verdict(GD_REASON_NON_VIP_PASS, len, XDP_PASS);

	svc = gd_service_lookup(&pkt);
	if (!svc)
		return gd_verdict(GD_REASON_NON_VIP_PASS, len, XDP_PASS);
	svc_id = svc->service_id;

	/* Balancing a first fragment would split the datagram: its other fragments have no
	 * ports, so they cannot follow it to the same backend. */
	if (pkt.frag)
		return gd_drop(GD_REASON_FRAGMENT_DROP, len, &pkt, svc_id);
	/* Checked on every packet, so removing a range also cuts established flows. */
	if ((svc->flags & GD_SVC_F_SOURCE_RANGES) && !gd_source_allowed(&pkt, svc_id))
		return gd_drop(GD_REASON_SOURCE_RANGE_DROP, len, &pkt, svc_id);

	hash = gd_flow_hash(&pkt.key);

	/* Fast path: an established flow keeps its backend while that backend accepts it. */
	flow = bpf_map_lookup_elem(&gd_lb_flows, &pkt.key);
	if (flow && flow->service_id == svc_id) {
		be_id = flow->backend_id;
		be = gd_backend_get(be_id, svc_id, 1);
	}
	if (!be) {
		new_flow = 1;
		/*
		 * A TCP segment that does not open a connection but has no entry: the table was
		 * full (LRU eviction), the gateway restarted without its pins, or ECMP moved the
		 * flow here from another gateway. Maglev picks the same backend in the common case,
		 * so the flow is adopted rather than dropped; the counter tells how often it happens.
		 */
		if (pkt.key.proto == IPPROTO_TCP &&
		    (pkt.tcp_flags & (GD_TCP_SYN | GD_TCP_ACK)) != GD_TCP_SYN)
			gd_count_reason(GD_REASON_LRU_MISS_NON_SYN, len);
		if (svc->flags & GD_SVC_F_AFFINITY) {
			/* Same clock as bpf_ktime_get_ns() at jiffy resolution, without a clock read. */
			now = bpf_ktime_get_coarse_ns();
			gd_affinity_key(&ak, &pkt, svc_id);
			be_id = gd_affinity_lookup(&ak, svc, now);
			be = gd_backend_get(be_id, svc_id, 0);
		}
		if (!be) {
			be_id = gd_maglev_pick(svc_id, hash);
			if (!be_id)
				return gd_drop(GD_REASON_NO_BACKEND_DROP, len, &pkt, svc_id);
			be = gd_backend_get(be_id, svc_id, 0);
			if (!be)
				return gd_drop(GD_REASON_BAD_BACKEND_DROP, len, &pkt, svc_id);
		}
	}

	settings = bpf_map_lookup_elem(&gd_lb_settings, &zero);
	if (!settings)
		return gd_drop(GD_REASON_NO_ENCAP_SOURCE_DROP, len, &pkt, svc_id);
	gd_encap_init(&e, &pkt, svc, be->family, hash);
	if (gd_outer_source(settings, be->family, hash, e.saddr))
		return gd_drop(GD_REASON_NO_ENCAP_SOURCE_DROP, len, &pkt, svc_id);
	e.daddr = be->addr;

	if (new_flow) {
		struct gd_lb_flow f = { .backend_id = be_id, .service_id = svc_id };

		bpf_map_update_elem(&gd_lb_flows, &pkt.key, &f, BPF_ANY);
		if (svc->flags & GD_SVC_F_AFFINITY) {
			struct gd_affinity a = { .last_seen_ns = now, .backend_id = be_id };

			bpf_map_update_elem(&gd_lb_affinity, &ak, &a, BPF_ANY);
		}
		gd_emit_event(GD_EVENT_LB_NEW_FLOW, 0, &pkt.key, svc_id, be_id, len);
	}
	gd_count_traffic(&gd_svc_stats, svc_id, len, new_flow);
	gd_count_traffic(&gd_be_stats, be_id, len, new_flow);

	/*
	 * Route the outer packet before building it: the route MTU is checked against the
	 * encapsulated size, so a too-big packet is answered from the original frame without
	 * undoing anything.
	 */
	rc = gd_route(ctx, &pkt, &e, settings, be_id, fib_cache_ms, &fib);
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		return gd_too_big(ctx, &pkt, svc_id, fib.mtu_result, e.overhead);

	/*
	 * Tagged frames are encapsulated but handed to the stack whatever the route: the way out
	 * is usually a VLAN device, which XDP cannot transmit on, and which tags to put on the
	 * way out is the stack's business.
	 */
	if (!pkt.vlans && rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return gd_drop(GD_REASON_FIB_DROP, len, &pkt, svc_id);
	if (gd_encap(ctx, &pkt, &e))
		return gd_drop(GD_REASON_ENCAP_FAILED_DROP, len, &pkt, svc_id);
	if (pkt.vlans)
		return gd_verdict(GD_REASON_VLAN_PASS, len, XDP_PASS);
	/* IPsec: only the kernel's path applies the XFRM policies that encrypt the packet. */
	if (settings->flags & GD_LB_F_KERNEL_ROUTE)
		return gd_verdict(GD_REASON_KERNEL_ROUTE_PASS, len, XDP_PASS);
	/* The stack forwards this one and resolves the neighbour for the next packets. */
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return gd_verdict(GD_REASON_FIB_NO_NEIGH_PASS, len, XDP_PASS);

	/*
	 * A device without link-layer addresses (WireGuard, kernel or a TUN like boringtun's)
	 * cannot take an Ethernet frame from XDP: the stack routes the packet into it. No
	 * Ethernet device has the all-zero MAC, so both being zero means such a device.
	 */
	if (gd_zero_mac(fib.smac) && gd_zero_mac(fib.dmac))
		return gd_verdict(GD_REASON_L3_DEVICE_PASS, len, XDP_PASS);

	data = gd_ctx_data(ctx);
	data_end = gd_ctx_data_end(ctx);
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return gd_drop(GD_REASON_ENCAP_FAILED_DROP, len, &pkt, svc_id);
	__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
	if (fib.ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	return bpf_redirect(fib.ifindex, 0);
}

char _license[] SEC("license") = "Dual BSD/GPL";
