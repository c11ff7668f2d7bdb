//! `#[repr(C)]` mirrors of `xdp/include/gatewayd_maps.h`, the contract between the datapath and
//! userspace: its structs, and its enums as constants.
//!
//! Struct sizes are asserted at compile time on both sides (a `const` assert here,
//! `_Static_assert` in the C header). The daemon's BTF test
//! (`rust_map_types_match_the_btf_of_the_objects`) compares [`layouts`] (every struct's size
//! and field offsets) and [`enums`] (every enum's enumerators: names, values, order) with the
//! BTF of the compiled objects, so the two sides cannot drift.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const FAMILY_INET: u8 = 4;
pub const FAMILY_INET6: u8 = 6;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

pub const SVC_F_SOURCE_RANGES: u32 = 1 << 0;
pub const SVC_F_AFFINITY: u32 = 1 << 1;

pub const ENCAP_IPIP: u8 = 0;
pub const ENCAP_GUE: u8 = 1;

pub const BACKEND_UNUSED: u8 = 0;
pub const BACKEND_ACTIVE: u8 = 1;
pub const BACKEND_TERMINATING: u8 = 2;
pub const BACKEND_MAINTENANCE: u8 = 3;

pub const SOURCE_RANGE_PREFIX_BITS: u32 = 64;

/// Seeds of the datapath's flow hash (lookup3, `xdp/include/lib/hash.h`): the balancer's
/// (Maglev slot, outer source bits, GUE source port, IPv6 flow label) and the egress NAT's port
/// choice. Fixed, so every gateway hashes a flow alike and userspace can reproduce it.
pub const HASH_SEED: u32 = 0x6764_7762;
pub const NAT_SEED: u32 = 0x6764_6e74;

/// Default capacities (the C defaults; the daemon overrides them from the config).
pub const MAX_SERVICES: u32 = 65536;
pub const MAX_BACKENDS: u32 = 65536;
pub const MAX_LB_FLOWS: u32 = 1_048_576;
pub const MAX_AFFINITY: u32 = 262_144;
pub const MAX_SOURCE_RANGES: u32 = 65536;

/// Names of the `gd_reasons` slots, in `enum gd_reason` order: each is its enumerator's name
/// without `GD_REASON_`, lower case (checked against the objects' BTF).
pub const REASON_NAMES: [&str; 20] = [
    "non_vip_pass",
    "malformed_pass",
    "fragment_drop",
    "source_range_drop",
    "no_backend_drop",
    "lru_miss_non_syn",
    "fib_no_neigh_pass",
    "fib_drop",
    "too_big_icmp",
    "too_big_drop",
    "no_encap_source_drop",
    "encap_failed_drop",
    "vlan_pass",
    "bad_backend_drop",
    "decap",
    "nat_exhausted_drop",
    "rnat_miss_pass",
    "egress_unsupported_pass",
    "l3_device_pass",
    "kernel_route_pass",
];
pub const REASON_MAX: u32 = REASON_NAMES.len() as u32;

/// A 16-byte address as the datapath stores it: IPv4 in the first four bytes.
pub fn addr_bytes(ip: IpAddr) -> ([u8; 16], u8) {
    match ip {
        IpAddr::V4(v4) => {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&v4.octets());
            (a, FAMILY_INET)
        }
        IpAddr::V6(v6) => (v6.octets(), FAMILY_INET6),
    }
}

/// Inverse of [`addr_bytes`]; `None` for an unknown family.
pub fn addr_from_bytes(addr: &[u8; 16], family: u8) -> Option<IpAddr> {
    match family {
        FAMILY_INET => Some(IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))),
        FAMILY_INET6 => Some(IpAddr::V6(Ipv6Addr::from(*addr))),
        _ => None,
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipKey {
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceEntry {
    pub service_id: u32,
    pub flags: u32,
    pub affinity_timeout_s: u32,
    pub encap: u8,
    pub pad: u8,
    /// Network byte order.
    pub gue_port: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendEntry {
    pub addr: [u8; 16],
    pub family: u8,
    pub state: u8,
    /// Network byte order.
    pub port: u16,
    pub service_id: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbFlow {
    pub backend_id: u32,
    pub service_id: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityKey {
    pub client: [u8; 16],
    pub service_id: u32,
    pub family: u8,
    pub pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Affinity {
    pub last_seen_ns: u64,
    pub backend_id: u32,
    pub pad: u32,
}

/// Key data of the `gd_src_ranges` LPM trie (aya's `lpm_trie::Key` adds the prefix length).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceRangeData {
    pub service_id: u32,
    pub family: u8,
    pub pad: [u8; 3],
    pub addr: [u8; 16],
}

/// `LbSettingsEntry::flags`: every encapsulated packet is routed by the kernel (IPsec mode: XFRM
/// applies only on the kernel's path). GD_LB_F_KERNEL_ROUTE.
pub const LB_F_KERNEL_ROUTE: u32 = 1 << 0;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbSettingsEntry {
    pub src4: [u8; 4],
    pub src4_hostmask: [u8; 4],
    pub src6: [u8; 16],
    pub src6_hostmask: [u8; 16],
    pub flags: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReasonCounters {
    pub packets: u64,
    pub bytes: u64,
}

pub const EVENT_LB_NEW_FLOW: u8 = 1;
pub const EVENT_DROP: u8 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEventRecord {
    /// CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns).
    pub ts_ns: u64,
    pub key: FlowKey,
    pub service_id: u32,
    pub backend_id: u32,
    pub bytes: u32,
    pub reason: u16,
    pub kind: u8,
    pub pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Observe {
    pub enabled: u32,
    pub pad: u32,
}

/// Default egress capacities (the C defaults).
pub const MAX_EGRESS_POLICIES: u32 = 4096;
pub const MAX_EGRESS_PREFIXES: u32 = 65536;
pub const MAX_EGRESS_SOURCES: u32 = 65536;
pub const MAX_EGRESS_ADDRS: u32 = 1024;
pub const MAX_NAT_ENTRIES: u32 = 262_144;
pub const EGRESS_MAX_CANDIDATES: usize = 8;
pub const EGRESS_DST_PREFIX_BITS: u32 = 32;
pub const EGRESS_SRC_PREFIX_BITS: u32 = 64;

pub const NAT_DIR_ORIGINAL: u8 = 0;
pub const NAT_DIR_REPLY: u8 = 1;
pub const NAT_OPEN: u8 = 0;
pub const NAT_TCP_SYN_SENT: u8 = 1;
pub const NAT_TCP_ESTABLISHED: u8 = 2;
pub const NAT_TCP_CLOSING: u8 = 3;

/// Key data of the `gd_egress_dst` LPM trie (aya's `lpm_trie::Key` adds the prefix length,
/// which counts these 32 bits of family and pad plus the CIDR length).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressDstData {
    pub family: u8,
    pub pad: [u8; 3],
    pub addr: [u8; 16],
}

/// `gd_egress_dst` value: the candidate policies of a destination prefix, best first.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressDst {
    /// Used entries of `policy_ids`; 0 = excluded destination.
    pub count: u32,
    pub policy_ids: [u32; EGRESS_MAX_CANDIDATES],
}

/// Key data of the `gd_egress_src` LPM trie (prefix length: these 64 bits plus the CIDR length).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressSrcData {
    pub policy_id: u32,
    pub family: u8,
    pub pad: [u8; 3],
    pub addr: [u8; 16],
}

/// `gd_egress_pols` value (index policy_id); family 0 = unused id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressPolicyEntry {
    pub egress_addr: [u8; 16],
    pub family: u8,
    pub pad: [u8; 3],
}

/// `gd_egress_addrs` key: every policy's egress address (value: u8, 1).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EgressAddrKey {
    pub addr: [u8; 16],
    pub family: u8,
    pub pad: [u8; 3],
}

/// `gd_egress_cfg[0]`: NAT timeouts and port range.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressSettingsEntry {
    pub tcp_established_s: u32,
    pub tcp_closing_s: u32,
    pub tcp_syn_s: u32,
    pub udp_s: u32,
    pub icmp_s: u32,
    /// Host byte order (a range, not a packet field), inclusive.
    pub port_min: u16,
    pub port_max: u16,
}

/// `gd_nat` value (key: [`FlowKey`] as on the wire). Live while `expires_ns` >= CLOCK_MONOTONIC.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatEntry {
    /// ORIGINAL: egress address; REPLY: pod address.
    pub addr: [u8; 16],
    pub created_ns: u64,
    pub last_seen_ns: u64,
    pub expires_ns: u64,
    pub policy_id: u32,
    /// Network byte order. ORIGINAL: NAT port; REPLY: pod port (ICMP: identifiers).
    pub port: u16,
    pub state: u8,
    pub dir: u8,
}

/// `gd_egress_stats` value (per CPU, index policy_id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressCounters {
    pub packets_out: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    pub new_flows: u64,
    pub nat_failures: u64,
}

const _: () = {
    use std::mem::size_of;
    assert!(size_of::<VipKey>() == 20);
    assert!(size_of::<ServiceEntry>() == 16);
    assert!(size_of::<BackendEntry>() == 24);
    assert!(size_of::<FlowKey>() == 40);
    assert!(size_of::<LbFlow>() == 8);
    assert!(size_of::<AffinityKey>() == 24);
    assert!(size_of::<Affinity>() == 16);
    assert!(size_of::<SourceRangeData>() == 24);
    assert!(size_of::<LbSettingsEntry>() == 48);
    assert!(size_of::<TrafficCounters>() == 24);
    assert!(size_of::<ReasonCounters>() == 16);
    assert!(size_of::<FlowEventRecord>() == 64);
    assert!(size_of::<Observe>() == 8);
    assert!(size_of::<EgressDstData>() == 20);
    assert!(size_of::<EgressDst>() == 36);
    assert!(size_of::<EgressSrcData>() == 24);
    assert!(size_of::<EgressPolicyEntry>() == 20);
    assert!(size_of::<EgressAddrKey>() == 20);
    assert!(size_of::<EgressSettingsEntry>() == 24);
    assert!(size_of::<NatEntry>() == 48);
    assert!(size_of::<EgressCounters>() == 48);
};

/// Every mirrored struct with its C name, size and field offsets, for the BTF drift test.
pub fn layouts() -> Vec<StructLayout> {
    use std::mem::{offset_of, size_of};
    macro_rules! layout {
        ($c:literal, $t:ty, [$($f:ident),*]) => {
            StructLayout {
                c_name: $c,
                size: size_of::<$t>(),
                fields: vec![$((stringify!($f), offset_of!($t, $f))),*],
            }
        };
    }
    // An LPM trie key as userspace writes it: aya's `lpm_trie::Key` (packed: the u32 prefix
    // length, then the data) around the mirror of the fields after `prefixlen`.
    macro_rules! lpm_key_layout {
        ($c:literal, $t:ty, [$($f:ident),*]) => {
            StructLayout {
                c_name: $c,
                size: size_of::<u32>() + size_of::<$t>(),
                fields: vec![
                    ("prefixlen", 0),
                    $((stringify!($f), size_of::<u32>() + offset_of!($t, $f))),*
                ],
            }
        };
    }
    vec![
        layout!("gd_vip_key", VipKey, [addr, port, proto, family]),
        layout!(
            "gd_service",
            ServiceEntry,
            [service_id, flags, affinity_timeout_s, encap, pad, gue_port]
        ),
        layout!(
            "gd_backend",
            BackendEntry,
            [addr, family, state, port, service_id]
        ),
        layout!(
            "gd_flow_key",
            FlowKey,
            [src, dst, sport, dport, proto, family, pad]
        ),
        layout!("gd_lb_flow", LbFlow, [backend_id, service_id]),
        layout!("gd_affinity_key", AffinityKey, [client, service_id, family, pad]),
        layout!("gd_affinity", Affinity, [last_seen_ns, backend_id, pad]),
        layout!(
            "gd_lb_settings",
            LbSettingsEntry,
            [src4, src4_hostmask, src6, src6_hostmask, flags, pad]
        ),
        layout!(
            "gd_traffic_counters",
            TrafficCounters,
            [packets, bytes, new_flows]
        ),
        layout!("gd_reason_counters", ReasonCounters, [packets, bytes]),
        layout!(
            "gd_flow_event",
            FlowEventRecord,
            [ts_ns, key, service_id, backend_id, bytes, reason, kind, pad]
        ),
        layout!("gd_observe", Observe, [enabled, pad]),
        layout!("gd_egress_dst", EgressDst, [count, policy_ids]),
        layout!("gd_egress_policy", EgressPolicyEntry, [egress_addr, family, pad]),
        layout!("gd_egress_addr_key", EgressAddrKey, [addr, family, pad]),
        layout!(
            "gd_egress_settings",
            EgressSettingsEntry,
            [
                tcp_established_s,
                tcp_closing_s,
                tcp_syn_s,
                udp_s,
                icmp_s,
                port_min,
                port_max
            ]
        ),
        layout!(
            "gd_nat_entry",
            NatEntry,
            [
                addr,
                created_ns,
                last_seen_ns,
                expires_ns,
                policy_id,
                port,
                state,
                dir
            ]
        ),
        layout!(
            "gd_egress_counters",
            EgressCounters,
            [
                packets_out,
                bytes_out,
                packets_in,
                bytes_in,
                new_flows,
                nat_failures
            ]
        ),
        lpm_key_layout!(
            "gd_source_range_key",
            SourceRangeData,
            [service_id, family, pad, addr]
        ),
        lpm_key_layout!("gd_egress_dst_key", EgressDstData, [family, pad, addr]),
        lpm_key_layout!("gd_egress_src_key", EgressSrcData, [policy_id, family, pad, addr]),
    ]
}

/// The C enums of the contract, each with the Rust constants that mirror it, in declaration
/// order, for the BTF drift test. An enumerator `GD_X` is mirrored by the constant `X`.
pub fn enums() -> Vec<EnumContract> {
    macro_rules! mirror {
        ($c:literal, [$($name:ident),*]) => {
            EnumContract {
                c_name: $c,
                enumerators: vec![$((concat!("GD_", stringify!($name)).to_string(), $name as u64)),*],
            }
        };
    }
    let mut reasons: Vec<(String, u64)> = REASON_NAMES
        .iter()
        .enumerate()
        .map(|(i, name)| (format!("GD_REASON_{}", name.to_uppercase()), i as u64))
        .collect();
    reasons.push(("GD_REASON_MAX".to_string(), u64::from(REASON_MAX)));
    vec![
        mirror!("gd_family", [FAMILY_INET, FAMILY_INET6]),
        mirror!(
            "gd_limit",
            [
                MAX_SERVICES,
                MAX_BACKENDS,
                MAX_LB_FLOWS,
                MAX_AFFINITY,
                MAX_SOURCE_RANGES,
                MAX_EGRESS_POLICIES,
                MAX_EGRESS_PREFIXES,
                MAX_EGRESS_SOURCES,
                MAX_EGRESS_ADDRS,
                MAX_NAT_ENTRIES,
                EGRESS_MAX_CANDIDATES
            ]
        ),
        mirror!(
            "gd_lpm_prefix_bits",
            [
                SOURCE_RANGE_PREFIX_BITS,
                EGRESS_DST_PREFIX_BITS,
                EGRESS_SRC_PREFIX_BITS
            ]
        ),
        mirror!("gd_hash_seed", [HASH_SEED, NAT_SEED]),
        mirror!("gd_service_flag", [SVC_F_SOURCE_RANGES, SVC_F_AFFINITY]),
        mirror!("gd_encap_type", [ENCAP_IPIP, ENCAP_GUE]),
        mirror!(
            "gd_backend_state",
            [
                BACKEND_UNUSED,
                BACKEND_ACTIVE,
                BACKEND_TERMINATING,
                BACKEND_MAINTENANCE
            ]
        ),
        mirror!("gd_lb_flag", [LB_F_KERNEL_ROUTE]),
        EnumContract {
            c_name: "gd_reason",
            enumerators: reasons,
        },
        mirror!("gd_event_kind", [EVENT_LB_NEW_FLOW, EVENT_DROP]),
        mirror!("gd_nat_dir", [NAT_DIR_ORIGINAL, NAT_DIR_REPLY]),
        mirror!(
            "gd_nat_state",
            [NAT_OPEN, NAT_TCP_SYN_SENT, NAT_TCP_ESTABLISHED, NAT_TCP_CLOSING]
        ),
    ]
}

/// Structs of the objects' BTF that userspace neither reads nor writes: the datapath's own
/// next-hop cache, the Maglev inner-map template and the anchor that puts the enums in BTF.
pub const DATAPATH_ONLY_STRUCTS: [&str; 3] = ["gd_nexthop", "gd_maglev_inner", "gd_contract"];

/// Size and field offsets of one `#[repr(C)]` mirror.
#[derive(Debug)]
pub struct StructLayout {
    pub c_name: &'static str,
    pub size: usize,
    pub fields: Vec<(&'static str, usize)>,
}

/// One C enum and the values of its enumerators, by name, in declaration order.
#[derive(Debug)]
pub struct EnumContract {
    pub c_name: &'static str,
    pub enumerators: Vec<(String, u64)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_in_datapath_form() {
        for ip in ["10.1.2.3", "fd00::1", "0.0.0.0", "::"] {
            let ip: IpAddr = ip.parse().unwrap();
            let (bytes, family) = addr_bytes(ip);
            assert_eq!(addr_from_bytes(&bytes, family), Some(ip));
        }
        assert_eq!(addr_bytes("10.1.2.3".parse().unwrap()).0[4..], [0u8; 12]);
        assert_eq!(addr_from_bytes(&[0; 16], 0), None);
    }
}
