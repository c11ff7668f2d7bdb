//! `#[repr(C)]` mirrors of `xdp/include/gatewayd_maps.h`.
//!
//! Sizes are asserted at compile time here and in the C header; the daemon's tests also compare
//! field offsets against the BTF of the compiled objects, so the two sides cannot drift.

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

/// Default capacities (the C defaults; the daemon overrides them from the config).
pub const MAX_SERVICES: u32 = 65536;
pub const MAX_BACKENDS: u32 = 65536;
pub const MAX_LB_FLOWS: u32 = 1_048_576;
pub const MAX_AFFINITY: u32 = 262_144;
pub const MAX_SOURCE_RANGES: u32 = 65536;

/// Names of the `gd_reasons` slots, in `GD_REASON_*` order.
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
    ]
}

/// Size and field offsets of one `#[repr(C)]` mirror.
#[derive(Debug)]
pub struct StructLayout {
    pub c_name: &'static str,
    pub size: usize,
    pub fields: Vec<(&'static str, usize)>,
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
