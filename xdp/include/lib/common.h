/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The toolchain side every datapath header needs: the BPF UAPI and libbpf's helper
 * declarations, compiler attributes, and BPF ABI values missing from older UAPI copies.
 * Protocols are in lib/proto.h, the contract with userspace in gatewayd_maps.h.
 *
 * Only UAPI headers are used (no vmlinux.h/CO-RE): the programs touch packet bytes and the
 * stable BPF context structs only, so they load unchanged on any kernel with the helpers used.
 */
#ifndef GD_LIB_COMMON_H
#define GD_LIB_COMMON_H

#include <linux/bpf.h>
#include <linux/types.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/*
 * The build host's UAPI headers (linux-libc-dev 6.1) predate these skb_adjust_room flags
 * (kernel 6.3); the values are ABI and match the running kernel's BTF.
 */
#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV4
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV6 (1ULL << 8)
#endif

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

#define likely(x) __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)

/*
 * Make `ptr` opaque to the compiler where a packet pointer is computed from a variable offset:
 * clang may otherwise compute base + offset again for the reads after the bounds check, in a
 * new register the verifier cannot link to the checked one ("invalid access to packet").
 */
#define gd_opaque(ptr) asm volatile("" : "+r"(ptr))

static __always_inline __u32 gd_rol32(__u32 w, unsigned int s)
{
	return (w << s) | (w >> ((32 - s) & 31));
}

#endif /* GD_LIB_COMMON_H */
