/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * What every program reports to userspace: the reason counters (gd_reasons: what happened to
 * packets that were not simply forwarded) and the flow events of `gatewayctl observe`
 * (gd_events, written only while gd_observe says someone listens).
 *
 * Every object includes these maps and carries its own definition; pinning by name makes the
 * loader reuse the pinned map when a second object is loaded, so the definitions must stay
 * identical (the loader refuses a pinned map whose type/sizes/flags differ): hence one header.
 */
#ifndef GD_LIB_REPORT_H
#define GD_LIB_REPORT_H

#include "gatewayd_maps.h"
#include "lib/common.h"

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct gd_reason_counters);
	__uint(max_entries, GD_REASON_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} gd_reasons SEC(".maps");

static __always_inline void gd_count_reason(enum gd_reason reason, __u64 bytes)
{
	__u32 key = reason;
	struct gd_reason_counters *c = bpf_map_lookup_elem(&gd_reasons, &key);

	if (c) {
		c->packets++;
		c->bytes += bytes;
	}
}

/* Shared by every program that reports flows; see gd_flow_event in gatewayd_maps.h. */
#define GD_EVENTS_WAKEUP_BYTES (64 * sizeof(struct gd_flow_event))
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20); /* bytes: 16384 events of 64 bytes */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} gd_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct gd_observe);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} gd_observe SEC(".maps");

/* Reports a flow event if someone is observing. */
static __always_inline void gd_emit_event(enum gd_event_kind kind, enum gd_reason reason,
					  const struct gd_flow_key *key,
					  __u32 service_id, __u32 backend_id, __u64 bytes)
{
	const struct gd_observe *o;
	struct gd_flow_event *ev;
	__u32 zero = 0;

	o = bpf_map_lookup_elem(&gd_observe, &zero);
	if (!o || !o->enabled)
		return;
	ev = bpf_ringbuf_reserve(&gd_events, sizeof(*ev), 0);
	if (!ev)
		return;
	ev->ts_ns = bpf_ktime_get_ns();
	__builtin_memcpy(&ev->key, key, sizeof(ev->key));
	ev->service_id = service_id;
	ev->backend_id = backend_id;
	ev->bytes = bytes;
	ev->reason = reason;
	ev->kind = kind;
	ev->pad = 0;
	/*
	 * Waking the reader costs more than the rest of a new flow: wake it only once a batch is
	 * waiting. The daemon also drains the ring on a short timer, so a trickle is not stuck.
	 */
	bpf_ringbuf_submit(ev, bpf_ringbuf_query(&gd_events, BPF_RB_AVAIL_DATA) >= GD_EVENTS_WAKEUP_BYTES
				       ? BPF_RB_FORCE_WAKEUP
				       : BPF_RB_NO_WAKEUP);
}

#endif /* GD_LIB_REPORT_H */
