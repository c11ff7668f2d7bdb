/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Routing of the outer (encapsulated) packet: bpf_fib_lookup, optionally behind a short-lived
 * per-CPU next-hop cache.
 *
 * Why a cache: bpf_fib_lookup is by far the most expensive step of the forwarding path (a
 * trie lookup, the route MTU and a neighbour lookup: ~100 ns for IPv4 and ~150-250 ns for
 * IPv6 on the benchmark machine, against ~110 ns for everything else together). With
 * fib_cache_ms > 0 the result (egress ifindex, MACs, route MTU) is remembered per backend
 * for that long. Trade-offs, all bounded by fib_cache_ms:
 *  - a route, neighbour (MAC) or MTU change toward a backend is seen up to fib_cache_ms late;
 *  - the lookup that fills the cache uses the backend's canonical outer header (flow-hash
 *    bits of the source, GUE source port and flow label at zero, TOS 0), so with ECMP
 *    routes toward backends all flows of one backend take one next hop, chosen the same way
 *    on every CPU and at every refresh (no path flapping); per-flow ECMP needs fib_cache_ms=0.
 * Only successful lookups are cached: NO_NEIGH, failures and too-big packets are looked up
 * again on the next packet, so the stack's neighbour resolution is picked up immediately.
 *
 * fib_cache_ms = 0 restores the plain behaviour: one bpf_fib_lookup per packet with the real
 * outer header.
 */
#ifndef GD_LIB_FIB_H
#define GD_LIB_FIB_H

#include "gatewayd_maps.h"
#include "lib/common.h"
#include "lib/encap.h"
#include "lib/parse.h"
#include "lib/proto.h"

/* Slots per CPU; backend ids are direct-mapped (id % slots), a collision is just a miss. */
#define GD_NEXTHOP_SLOTS 1024

struct gd_nexthop {
	__u64 expires_ns; /* bpf_ktime_get_coarse_ns() deadline */
	__u32 backend_id; /* owner of the slot (0 = empty) */
	__u32 ifindex;
	__u32 mtu; /* route MTU toward the backend (bytes of outer IP packet) */
	__u8 smac[ETH_ALEN];
	__u8 dmac[ETH_ALEN];
	/*
	 * The backend address the entry was resolved for. Userspace frees a backend id when its
	 * backend leaves and may give it to another backend in the next reconcile: the id alone
	 * would hand the newcomer the previous backend's MAC until the entry expired.
	 */
	__u8 daddr[16];
	__u8 family;
	__u8 pad[7];
};

static __always_inline int gd_nexthop_is_for(const struct gd_nexthop *nh, __u32 be_id,
					     const struct gd_encap *e)
{
	const __u64 *a = (const __u64 *)nh->daddr;
	const __u64 *b = (const __u64 *)e->daddr;

	return nh->backend_id == be_id && nh->family == e->family && a[0] == b[0] &&
	       a[1] == b[1];
}

/*
 * Per-CPU: each CPU refreshes its own copy, so a reader can never see a half-written entry
 * and no cache line bounces between CPUs. Not pinned: a cache is rebuilt within one refresh
 * period, so there is nothing worth keeping across daemon restarts.
 */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct gd_nexthop);
	__uint(max_entries, GD_NEXTHOP_SLOTS);
} gd_nexthops SEC(".maps");

/*
 * Fill the lookup parameters for the outer header. `canonical` zeroes every input derived
 * from the flow hash (see above) so that the cached answer is the same for all flows.
 */
/* All six bytes zero: no Ethernet device has this address (see the caller in lb.c). */
static __always_inline int gd_zero_mac(const unsigned char *mac)
{
	return !(mac[0] | mac[1] | mac[2] | mac[3] | mac[4] | mac[5]);
}

static __always_inline void gd_fib_init(struct bpf_fib_lookup *fib, struct xdp_md *ctx,
					const struct gd_pkt *pkt, const struct gd_encap *e,
					const struct gd_lb_settings *settings, int canonical)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->l4_protocol = e->proto;
	fib->sport = canonical && e->sport ? bpf_htons(GD_GUE_SPORT_BASE) : e->sport;
	fib->dport = e->dport;
	fib->ifindex = ctx->ingress_ifindex;
	if (e->family == GD_FAMILY_INET) {
		fib->family = AF_INET;
		if (canonical)
			gd_outer_source(settings, GD_FAMILY_INET, 0, (__u8 *)&fib->ipv4_src);
		else
			fib->ipv4_src = *(const __be32 *)e->saddr;
		fib->tos = canonical ? 0 : pkt->tos;
		fib->ipv4_dst = *(const __be32 *)e->daddr;
	} else {
		fib->family = AF_INET6;
		if (canonical) {
			gd_outer_source(settings, GD_FAMILY_INET6, 0, (__u8 *)fib->ipv6_src);
		} else {
			__builtin_memcpy(fib->ipv6_src, e->saddr, 16);
			fib->flowinfo = bpf_htonl(((__u32)pkt->tos << 20) | (e->hash & 0xFFFFF));
		}
		__builtin_memcpy(fib->ipv6_dst, e->daddr, 16);
	}
}

/*
 * Route the outer packet of `outer_len` bytes toward backend `be_id`. Returns a
 * BPF_FIB_LKUP_RET_* code with, in `fib`: on SUCCESS ifindex/smac/dmac, on FRAG_NEEDED the
 * route MTU in mtu_result.
 */
static __always_inline int gd_route(struct xdp_md *ctx, const struct gd_pkt *pkt,
				    const struct gd_encap *e, const struct gd_lb_settings *settings,
				    __u32 be_id, __u32 cache_ms, struct bpf_fib_lookup *fib)
{
	__u32 outer_len = pkt->ip_len + e->overhead, slot, mtu;
	struct gd_nexthop *nh;
	__u64 now;
	int rc;

	if (!cache_ms) {
		gd_fib_init(fib, ctx, pkt, e, settings, 0);
		fib->tot_len = outer_len; /* lets the kernel check the route MTU */
		return bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
	}

	slot = be_id % GD_NEXTHOP_SLOTS;
	nh = bpf_map_lookup_elem(&gd_nexthops, &slot);
	if (!nh) /* cannot happen for an in-range array index; keeps the verifier happy */
		return BPF_FIB_LKUP_RET_NOT_FWDED;
	now = bpf_ktime_get_coarse_ns(); /* jiffy resolution, no clock read: ~free */
	if (gd_nexthop_is_for(nh, be_id, e) && now < nh->expires_ns) {
		if (outer_len > nh->mtu) {
			fib->mtu_result = nh->mtu;
			return BPF_FIB_LKUP_RET_FRAG_NEEDED;
		}
		fib->ifindex = nh->ifindex;
		__builtin_memcpy(fib->smac, nh->smac, ETH_ALEN);
		__builtin_memcpy(fib->dmac, nh->dmac, ETH_ALEN);
		return BPF_FIB_LKUP_RET_SUCCESS;
	}

	/*
	 * Refresh. The first lookup asks for a 64 KiB packet: the kernel checks the MTU before
	 * it resolves the next hop or touches any other output field, so FRAG_NEEDED tells the
	 * route MTU, and the same parameters can then be looked up again with the real length.
	 */
	gd_fib_init(fib, ctx, pkt, e, settings, 1);
	fib->tot_len = 0xFFFF;
	rc = bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
	mtu = 0xFFFF;
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED) {
		mtu = fib->mtu_result;
		if (outer_len > mtu)
			return rc; /* mtu_result holds the MTU */
		fib->tot_len = outer_len;
		rc = bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
	}
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return rc;

	nh->backend_id = be_id;
	__builtin_memcpy(nh->daddr, e->daddr, sizeof(nh->daddr));
	nh->family = e->family;
	nh->ifindex = fib->ifindex;
	nh->mtu = mtu;
	__builtin_memcpy(nh->smac, fib->smac, ETH_ALEN);
	__builtin_memcpy(nh->dmac, fib->dmac, ETH_ALEN);
	nh->expires_ns = now + (__u64)cache_ms * 1000000;
	return rc;
}

#endif /* GD_LIB_FIB_H */
