/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Maps defined by more than one program object.
 *
 * Each object that includes this header carries its own definition, and pinning by name makes
 * the loader reuse the pinned map when a second object is loaded: the definitions must stay
 * identical (the loader refuses a pinned map whose type/sizes/flags differ), hence one header.
 */
#ifndef GD_LIB_MAPS_H
#define GD_LIB_MAPS_H

#include "lib/common.h"

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct gd_reason_counters);
	__uint(max_entries, GD_REASON_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} gd_reasons SEC(".maps");

static __always_inline void gd_count_reason(__u32 reason, __u64 bytes)
{
	struct gd_reason_counters *c = bpf_map_lookup_elem(&gd_reasons, &reason);

	if (c) {
		c->packets++;
		c->bytes += bytes;
	}
}

#endif /* GD_LIB_MAPS_H */
