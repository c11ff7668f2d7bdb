/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Reshaping an XDP frame around its L3 packet: trim what follows, make room for new headers
 * between the L2 header (VLAN tags included) and the L3 one, and move the L2 header back to
 * the front. The encapsulation (lib/encap.h) and the ICMP errors built from a received frame
 * (lib/icmp.h) both start this way. TC programs have bpf_skb_adjust_room, which moves the MAC
 * header itself.
 */
#ifndef GD_LIB_RESHAPE_H
#define GD_LIB_RESHAPE_H

#include "lib/common.h"
#include "lib/ctx.h"
#include "lib/parse.h"
#include "lib/proto.h"

/*
 * After bpf_xdp_adjust_head(ctx, -delta) the received L2 header sits `delta` bytes into the
 * frame: move it back to the front, optionally swapping the MAC addresses (replies), and set
 * the ethertype that announces the L3 header (the last tag's, or the Ethernet one).
 *
 * GD_L2_MAX bytes are always moved whatever the number of tags (what follows a shorter header
 * is overwritten by the caller's new L3 header). Everything goes through registers, loaded
 * before any store, so the overlap of source and destination (delta can be 20 < 22) is
 * harmless and nothing is spilled to the stack, which the verifier limits to 512 bytes.
 */
static __always_inline int gd_l2_move(void *data, void *data_end, __u32 delta, __u32 vlans,
				      __be16 l3_proto, int swap_macs)
{
	void *old = data + delta;
	__u32 mac_a0, mac_b1, tag0, tag1;
	__u16 mac_a1, mac_b0, tag2;

	if (delta > 64 || vlans > GD_VLAN_MAX)
		return -1;
	/* Both checks: the verifier tracks the two pointers' ranges separately. */
	if (data + GD_L2_MAX > data_end || old + GD_L2_MAX > data_end)
		return -1;
	mac_a0 = *(__u32 *)(old + 0); /* destination */
	mac_a1 = *(__u16 *)(old + 4);
	mac_b0 = *(__u16 *)(old + 6); /* source */
	mac_b1 = *(__u32 *)(old + 8);
	tag0 = *(__u32 *)(old + 12); /* ethertype / tags, up to the innermost ethertype */
	tag1 = *(__u32 *)(old + 16);
	tag2 = *(__u16 *)(old + 20);

	if (swap_macs) {
		*(__u16 *)(data + 0) = mac_b0;
		*(__u32 *)(data + 2) = mac_b1;
		*(__u32 *)(data + 6) = mac_a0;
		*(__u16 *)(data + 10) = mac_a1;
	} else {
		*(__u32 *)(data + 0) = mac_a0;
		*(__u16 *)(data + 4) = mac_a1;
		*(__u16 *)(data + 6) = mac_b0;
		*(__u32 *)(data + 8) = mac_b1;
	}
	*(__u32 *)(data + 12) = tag0;
	*(__u32 *)(data + 16) = tag1;
	*(__u16 *)(data + 20) = tag2;
	/* Constant offsets: a variable one would lose the verified packet range. */
	if (vlans == 0)
		*(__be16 *)(data + 12) = l3_proto;
	else if (vlans == 1)
		*(__be16 *)(data + 16) = l3_proto;
	else
		*(__be16 *)(data + 20) = l3_proto;
	return 0;
}

/*
 * Keep `keep` bytes of the L3 packet of `pkt` (dropping the rest and any Ethernet padding),
 * make room for `push` bytes of new headers in front of it, and bring the L2 header back to
 * the front, announcing `l3_proto` (MACs swapped for a reply). Returns -1 if the frame could
 * not be resized: the packet must then be dropped (it may have been modified).
 */
static __always_inline int gd_xdp_reshape(struct xdp_md *ctx, const struct gd_pkt *pkt, __u32 keep,
					  __u32 push, __be16 l3_proto, int swap_macs)
{
	__u32 new_len = pkt->l3_off + keep;

	if (new_len > pkt->len)
		return -1;
	if (new_len < pkt->len && bpf_xdp_adjust_tail(ctx, (int)new_len - (int)pkt->len))
		return -1;
	if (bpf_xdp_adjust_head(ctx, -(int)push))
		return -1;
	return gd_l2_move(gd_ctx_data(ctx), gd_ctx_data_end(ctx), push, pkt->vlans, l3_proto,
			  swap_macs);
}

#endif /* GD_LIB_RESHAPE_H */
