//! The datapath's flow hash (xdp/include/lib/hash.h: lookup3 as the kernel's jhash), computed
//! here to predict Maglev picks, outer header fields and NAT port choices.

use gatewayd_common::maps::{FlowKey, FAMILY_INET, HASH_SEED};

const JHASH_INITVAL: u32 = 0xdead_beef;

fn jhash_mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

fn jhash_final(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(14));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(11));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(25));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(16));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(4));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(14));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(24));
}

/// The kernel's jhash_3words / jhash2 over the client 5-tuple, words read little-endian from
/// the key's bytes, exactly as `gd_flow_hash` does with the balancer's seed.
pub fn flow_hash(k: &FlowKey) -> u32 {
    flow_hash_seeded(k, HASH_SEED)
}

/// `gd_flow_hash` with another seed (the egress NAT's port choice uses its own).
pub fn flow_hash_seeded(k: &FlowKey, seed: u32) -> u32 {
    let w = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let mut pb = [0u8; 4];
    pb[..2].copy_from_slice(&k.sport.to_ne_bytes());
    pb[2..].copy_from_slice(&k.dport.to_ne_bytes());
    let ports = u32::from_le_bytes(pb);
    let (s, d) = (&k.src, &k.dst);
    if k.family == FAMILY_INET {
        let init = seed
            .wrapping_add(k.proto as u32)
            .wrapping_add(JHASH_INITVAL)
            .wrapping_add(3 << 2);
        let (mut a, mut b, mut c) = (
            w(&s[0..4]).wrapping_add(init),
            w(&d[0..4]).wrapping_add(init),
            ports.wrapping_add(init),
        );
        jhash_final(&mut a, &mut b, &mut c);
        return c;
    }
    let init = JHASH_INITVAL.wrapping_add(10 << 2).wrapping_add(seed);
    let (mut a, mut b, mut c) = (init, init, init);
    let words = [
        w(&s[0..4]),
        w(&s[4..8]),
        w(&s[8..12]),
        w(&s[12..16]),
        w(&d[0..4]),
        w(&d[4..8]),
        w(&d[8..12]),
        w(&d[12..16]),
        ports,
    ];
    for chunk in words.chunks(3) {
        a = a.wrapping_add(chunk[0]);
        b = b.wrapping_add(chunk[1]);
        c = c.wrapping_add(chunk[2]);
        jhash_mix(&mut a, &mut b, &mut c);
    }
    a = a.wrapping_add(k.proto as u32);
    jhash_final(&mut a, &mut b, &mut c);
    c
}

/// The kernel's jhash_3words.
pub fn jhash_3words(a: u32, b: u32, c: u32, initval: u32) -> u32 {
    let init = initval.wrapping_add(JHASH_INITVAL).wrapping_add(3 << 2);
    let (mut a, mut b, mut c) = (a.wrapping_add(init), b.wrapping_add(init), c.wrapping_add(init));
    jhash_final(&mut a, &mut b, &mut c);
    c
}
