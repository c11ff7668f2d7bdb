/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * One view of the packet for XDP (struct xdp_md) and TC (struct __sk_buff) programs, so that
 * what only reads the packet (the parser) is written once for both hooks, as Cilium's
 * bpf/include/bpf/ctx/{xdp,skb}.h do. The hook is chosen at compile time from the type of the
 * context (C11 _Generic): no runtime cost, and no program-wide define that would make the
 * order of includes matter.
 *
 * - gd_ctx_data(ctx), gd_ctx_data_end(ctx): the directly readable bytes of the frame;
 * - gd_ctx_len(ctx): the length of the whole frame (XDP: all buffers of a multi-buffer frame;
 *   TC: skb->len, linear part and fragments);
 * - gd_ctx_pull(ctx, len): make the first `len` bytes (or the whole frame if shorter) directly
 *   readable; nonzero when the kernel had no memory for it. XDP frames are already linear in
 *   their first buffer: nothing to do.
 * Every helper call may move the packet: read data / data_end again after it.
 */
#ifndef GD_LIB_CTX_H
#define GD_LIB_CTX_H

#include "lib/common.h"

static __always_inline void *gd_xdp_data(struct xdp_md *ctx)
{
	return (void *)(long)ctx->data;
}

static __always_inline void *gd_xdp_data_end(struct xdp_md *ctx)
{
	return (void *)(long)ctx->data_end;
}

/* The helper rather than data_end - data: pointer subtraction needs CAP_PERFMON. */
static __always_inline __u32 gd_xdp_len(struct xdp_md *ctx)
{
	return bpf_xdp_get_buff_len(ctx);
}

static __always_inline int gd_xdp_pull(struct xdp_md *ctx, __u32 len)
{
	return 0;
}

static __always_inline void *gd_skb_data(struct __sk_buff *skb)
{
	return (void *)(long)skb->data;
}

static __always_inline void *gd_skb_data_end(struct __sk_buff *skb)
{
	return (void *)(long)skb->data_end;
}

static __always_inline __u32 gd_skb_len(struct __sk_buff *skb)
{
	return skb->len;
}

static __always_inline int gd_skb_pull(struct __sk_buff *skb, __u32 len)
{
	/* Clamped first: a short packet that is all linear must not pay for a pull. */
	if (len > skb->len)
		len = skb->len;
	if ((void *)(long)skb->data + len <= (void *)(long)skb->data_end)
		return 0;
	return bpf_skb_pull_data(skb, len);
}

#define gd_ctx_data(ctx)                                                                           \
	_Generic((ctx), struct xdp_md *: gd_xdp_data, struct __sk_buff *: gd_skb_data)(ctx)
#define gd_ctx_data_end(ctx)                                                                       \
	_Generic((ctx), struct xdp_md *: gd_xdp_data_end, struct __sk_buff *: gd_skb_data_end)(ctx)
#define gd_ctx_len(ctx)                                                                            \
	_Generic((ctx), struct xdp_md *: gd_xdp_len, struct __sk_buff *: gd_skb_len)(ctx)
#define gd_ctx_pull(ctx, len)                                                                      \
	_Generic((ctx), struct xdp_md *: gd_xdp_pull, struct __sk_buff *: gd_skb_pull)(ctx, len)

#endif /* GD_LIB_CTX_H */
