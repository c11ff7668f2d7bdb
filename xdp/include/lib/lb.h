/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The load balancer's tables and the decisions made from them: services, the connection
 * table, ClientIP affinity, Maglev, source ranges, traffic counters. Only gatewayd_lb (lb.c)
 * balances; its maps are defined here, beside the code that reads them.
 */
#ifndef GD_LIB_LB_H
#define GD_LIB_LB_H

#include "gatewayd_maps.h"
#include "lib/common.h"
#include "lib/parse.h"

/*
 * All pinned by name: a restarted daemon adopts them, so flows survive restarts.
 * max_entries are defaults: userspace sets them from its configuration at load time.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct gd_vip_key);
	__type(value, struct gd_service);
	__uint(max_entries, GD_MAX_SERVICES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} gd_services SEC(".maps");

/*
 * Template for the per-service Maglev tables. BPF_F_INNER_MAP lets inner arrays of any
 * max_entries be inserted (each service table has its own prime size); BPF_F_MMAPABLE lets
 * userspace fill a table with one copy. Inner maps must be created with the same type,
 * key/value sizes and flags (0x1400) or the insert is refused.
 */
struct gd_maglev_inner {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_INNER_MAP | BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, GD_MAGLEV_DEFAULT_SIZE + 1);
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	/* Sizes, not BTF types: the kernel rejects BTF key/value types on map-in-map. */
	__uint(key_size, sizeof(__u32));   /* service_id */
	__uint(value_size, sizeof(__u32)); /* inner map fd (userspace) / id (read back) */
	__uint(max_entries, GD_MAX_SERVICES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, struct gd_maglev_inner);
} gd_maglev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct gd_backend);
	__uint(max_entries, GD_MAX_BACKENDS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} gd_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct gd_flow_key);
	__type(value, struct gd_lb_flow);
	__uint(max_entries, GD_MAX_LB_FLOWS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} gd_lb_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct gd_affinity_key);
	__type(value, struct gd_affinity);
	__uint(max_entries, GD_MAX_AFFINITY);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} gd_lb_affinity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct gd_source_range_key);
	__type(value, __u8);
	__uint(max_entries, GD_MAX_SOURCE_RANGES);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* required for LPM tries */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} gd_src_ranges SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct gd_lb_settings);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} gd_lb_settings SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct gd_traffic_counters);
	__uint(max_entries, GD_MAX_SERVICES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} gd_svc_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct gd_traffic_counters);
	__uint(max_entries, GD_MAX_BACKENDS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} gd_be_stats SEC(".maps");


/* The service a parsed TCP/UDP packet is addressed to, if any. */
static __always_inline const struct gd_service *gd_service_lookup(const struct gd_pkt *pkt)
{
	struct gd_vip_key vip = {};

	__builtin_memcpy(vip.addr, pkt->key.dst, sizeof(vip.addr));
	vip.port = pkt->key.dport;
	vip.proto = pkt->key.proto;
	vip.family = pkt->key.family;
	return bpf_map_lookup_elem(&gd_services, &vip);
}

/*
 * May this backend carry a packet of service `svc_id`? New flows need ACTIVE; established
 * ones also stay on a TERMINATING backend (graceful drain). The service check catches an id
 * that userspace freed and reused for another service while flows still pointed at it.
 */
static __always_inline const struct gd_backend *gd_backend_get(__u32 id, __u32 svc_id,
								 int established)
{
	const struct gd_backend *be;

	if (!id)
		return NULL;
	be = bpf_map_lookup_elem(&gd_backends, &id);
	if (!be || be->service_id != svc_id)
		return NULL;
	if (be->state == GD_BACKEND_ACTIVE ||
	    (established && be->state == GD_BACKEND_TERMINATING))
		return be;
	return NULL;
}

/* Source ranges: the client must fall inside one of the service's CIDRs. */
static __always_inline int gd_source_allowed(const struct gd_pkt *pkt, __u32 svc_id)
{
	struct gd_source_range_key k = {
		.prefixlen = GD_SOURCE_RANGE_PREFIX_BITS +
			     (pkt->key.family == GD_FAMILY_INET ? 32 : 128),
		.service_id = svc_id,
		.family = pkt->key.family,
	};

	__builtin_memcpy(k.addr, pkt->key.src, sizeof(k.addr));
	return bpf_map_lookup_elem(&gd_src_ranges, &k) != NULL;
}

static __always_inline void gd_affinity_key(struct gd_affinity_key *k, const struct gd_pkt *pkt,
					    __u32 svc_id)
{
	__builtin_memset(k, 0, sizeof(*k));
	__builtin_memcpy(k->client, pkt->key.src, sizeof(k->client));
	k->service_id = svc_id;
	k->family = pkt->key.family;
}

/*
 * ClientIP affinity: the backend this client was last sent to, if that was less than the
 * service's timeout ago and the backend still takes new flows. Like kube-proxy, the timer
 * restarts with each new connection (not each packet: established packets never come here).
 */
static __always_inline __u32 gd_affinity_lookup(const struct gd_affinity_key *k,
						const struct gd_service *svc, __u64 now)
{
	const struct gd_affinity *a = bpf_map_lookup_elem(&gd_lb_affinity, k);

	if (!a)
		return 0;
	if (now - a->last_seen_ns > (__u64)svc->affinity_timeout_s * 1000000000ULL)
		return 0;
	return a->backend_id;
}

/*
 * Maglev: the service's inner array holds the table size at index 0 and the backend ids of
 * slots 0..size-1 at indexes 1..size (see gd_maglev in gatewayd_maps.h). The size must be
 * read from the map because a BPF program cannot see an inner map's max_entries, and tables
 * of different (prime) sizes share the one outer map.
 */
static __always_inline __u32 gd_maglev_pick(__u32 svc_id, __u32 hash)
{
	__u32 zero = 0, slot, *size, *id;
	void *table;

	table = bpf_map_lookup_elem(&gd_maglev, &svc_id);
	if (!table)
		return 0;
	size = bpf_map_lookup_elem(table, &zero);
	if (!size || !*size)
		return 0;
	slot = 1 + hash % *size;
	id = bpf_map_lookup_elem(table, &slot);
	return id ? *id : 0;
}

static __always_inline void gd_count_traffic(void *map, __u32 id, __u64 bytes, __u64 new_flow)
{
	struct gd_traffic_counters *c = bpf_map_lookup_elem(map, &id);

	if (c) {
		c->packets++;
		c->bytes += bytes;
		c->new_flows += new_flow;
	}
}

#endif /* GD_LIB_LB_H */
