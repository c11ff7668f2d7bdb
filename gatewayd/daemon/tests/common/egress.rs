//! The egress NAT programs' harness, shared by their tests (`tests/egress_program.rs`) and the
//! benchmark (`benches/egress.rs`): the object loaded on a scratch bpffs directory, policies
//! programmed through typed maps, a packet builder with correct checksums, checks of the
//! frames the programs leave, and the datapath's port choice computed in userspace.

use super::{csum, csum_ok, flow_hash_seeded, jhash_3words, pseudo_sum, ScratchPins};
use anyhow::{Context, Result};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use aya::util::nr_cpus;
use aya::{Ebpf, EbpfLoader};
use gatewayd::datapath::objects;
use gatewayd_common::maps::{
    addr_bytes, EgressAddrKey, EgressCounters, EgressDst, EgressDstData, EgressPolicyEntry,
    EgressSettingsEntry, EgressSrcData, FlowKey, NatEntry, ReasonCounters, EGRESS_DST_PREFIX_BITS,
    EGRESS_SRC_PREFIX_BITS, NAT_DIR_ORIGINAL, NAT_DIR_REPLY, REASON_NAMES,
};
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::net::IpAddr;

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

pub const TCP_RST: u8 = 0x04;

/// The port hash seed of lib/conntrack.h (GD_NAT_SEED).
pub const NAT_SEED: u32 = 0x6764_6e74;

// Policies of the standard fixture (documentation and private ranges only).
pub const WIDE: u32 = 1; // 10.244.0.0/16 -> 0.0.0.0/0 except 10.0.0.0/8, via EGRESS_WIDE
pub const NARROW: u32 = 2; // 10.244.1.0/24 -> 203.0.113.0/24, via EGRESS_NARROW
pub const V6: u32 = 3; // fd00:244::/64 -> ::/0, via EGRESS_V6
pub const EGRESS_WIDE: &str = "192.0.2.1";
pub const EGRESS_NARROW: &str = "192.0.2.2";
pub const EGRESS_V6: &str = "2001:db8:e::1";

pub const POD: &str = "10.244.0.5";
pub const POD_NARROW: &str = "10.244.1.9";
pub const POD_OTHER: &str = "10.244.2.9";
pub const POD_UNSELECTED: &str = "10.99.0.1";
pub const REMOTE: &str = "198.51.100.7";
pub const REMOTE_NARROW: &str = "203.0.113.5";
pub const EXCLUDED_DST: &str = "10.1.2.3";
pub const ROUTER: &str = "198.51.100.254";
pub const POD6: &str = "fd00:244::5";
pub const REMOTE6: &str = "2001:db8:100::7";
pub const ROUTER6: &str = "2001:db8:100::fe";

pub const PORT_MIN: u16 = 20000;
pub const PORT_MAX: u16 = 29999;

pub fn settings() -> EgressSettingsEntry {
    EgressSettingsEntry {
        tcp_established_s: 3600,
        tcp_closing_s: 10,
        tcp_syn_s: 60,
        udp_s: 120,
        icmp_s: 30,
        port_min: PORT_MIN,
        port_max: PORT_MAX,
    }
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

// ---------------------------------------------------------------------------------------------
// The loaded object and its maps.
// ---------------------------------------------------------------------------------------------

/// The egress object loaded and verified, with typed handles on its maps. Field order is drop
/// order: maps and programs first, the pins last.
pub struct Nat {
    pub ebpf: Ebpf,
    pub table: HashMap<MapData, FlowKey, NatEntry>,
    pub stats: PerCpuArray<MapData, EgressCounters>,
    pub reasons: PerCpuArray<MapData, ReasonCounters>,
    pub cfg: Array<MapData, EgressSettingsEntry>,
    pub dst: LpmTrie<MapData, EgressDstData, EgressDst>,
    pub src: LpmTrie<MapData, EgressSrcData, u8>,
    pub pols: Array<MapData, EgressPolicyEntry>,
    pub addrs: HashMap<MapData, EgressAddrKey, u8>,
    pub _pins: ScratchPins,
}

impl Nat {
    /// The object with no policy, the given settings and room for `nat_entries` entries.
    pub fn empty(settings: EgressSettingsEntry, nat_entries: u32) -> Result<Nat> {
        let pins = ScratchPins::new();
        std::fs::create_dir_all(&pins.path).with_context(|| format!("creating {}", pins.path.display()))?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pins.path)
            .map_max_entries("gd_nat", nat_entries)
            .load(objects::EGRESS)
            .context("loading the egress object")?;
        for name in ["gatewayd_snat", "gatewayd_rnat"] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("{name} not in the object"))?
                .try_into()?;
            prog.load().with_context(|| format!("verifying {name}"))?;
        }
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} not in the object"))
        };
        let table = HashMap::try_from(take("gd_nat")?)?;
        let stats = PerCpuArray::try_from(take("gd_egress_stats")?)?;
        let reasons = PerCpuArray::try_from(take("gd_reasons")?)?;
        let cfg = Array::try_from(take("gd_egress_cfg")?)?;
        let dst = LpmTrie::try_from(take("gd_egress_dst")?)?;
        let src = LpmTrie::try_from(take("gd_egress_src")?)?;
        let pols = Array::try_from(take("gd_egress_pols")?)?;
        let addrs = HashMap::try_from(take("gd_egress_addrs")?)?;
        let mut nat = Nat {
            ebpf,
            table,
            stats,
            reasons,
            cfg,
            dst,
            src,
            pols,
            addrs,
            _pins: pins,
        };
        nat.cfg.set(0, settings, 0)?;
        Ok(nat)
    }

    /// The standard policies with a small NAT table (4096 entries), as the tests use them.
    pub fn new(settings: EgressSettingsEntry) -> Result<Nat> {
        Nat::sized(settings, 4096)
    }

    /// The standard policies (see WIDE, NARROW, V6), programmed the way the daemon's compiler
    /// lays them out: one destination entry per prefix any policy names, candidates most
    /// specific destination first, an excluded prefix without candidates.
    pub fn sized(settings: EgressSettingsEntry, nat_entries: u32) -> Result<Nat> {
        let mut nat = Nat::empty(settings, nat_entries)?;
        nat.policy(WIDE, EGRESS_WIDE, &["10.244.0.0/16"])?;
        nat.policy(NARROW, EGRESS_NARROW, &["10.244.1.0/24"])?;
        nat.policy(V6, EGRESS_V6, &["fd00:244::/64"])?;
        nat.destination("0.0.0.0/0", &[WIDE])?;
        nat.destination("10.0.0.0/8", &[])?;
        nat.destination("203.0.113.0/24", &[NARROW, WIDE])?;
        nat.destination("::/0", &[V6])?;
        Ok(nat)
    }

    pub fn policy(&mut self, id: u32, egress: &str, sources: &[&str]) -> Result<()> {
        let (egress_addr, family) = addr_bytes(ip(egress));
        self.pols.set(
            id,
            EgressPolicyEntry {
                egress_addr,
                family,
                pad: [0; 3],
            },
            0,
        )?;
        let key = EgressAddrKey {
            addr: egress_addr,
            family,
            pad: [0; 3],
        };
        self.addrs.insert(key, 1, 0)?;
        for s in sources {
            let s = net(s);
            let (addr, family) = addr_bytes(s.addr());
            let data = EgressSrcData {
                policy_id: id,
                family,
                pad: [0; 3],
                addr,
            };
            let bits = EGRESS_SRC_PREFIX_BITS + u32::from(s.prefix_len());
            self.src.insert(&Key::new(bits, data), 1, 0)?;
        }
        Ok(())
    }

    pub fn destination(&mut self, prefix: &str, candidates: &[u32]) -> Result<()> {
        let p = net(prefix);
        let (addr, family) = addr_bytes(p.addr());
        let mut value = EgressDst {
            count: candidates.len() as u32,
            ..Default::default()
        };
        value.policy_ids[..candidates.len()].copy_from_slice(candidates);
        let data = EgressDstData {
            family,
            pad: [0; 3],
            addr,
        };
        let bits = EGRESS_DST_PREFIX_BITS + u32::from(p.prefix_len());
        self.dst.insert(&Key::new(bits, data), value, 0)?;
        Ok(())
    }

    pub fn run(&self, program: &str, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        let (verdict, out, _) = tc_test_run(self.program(program)?, frame)?;
        Ok((verdict, out))
    }

    pub fn program(&self, name: &str) -> Result<&SchedClassifier> {
        Ok(self
            .ebpf
            .program(name)
            .with_context(|| format!("{name} not in the object"))?
            .try_into()?)
    }

    /// One frame through gatewayd_snat (leaving the egress interface).
    pub fn snat(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run("gatewayd_snat", frame).unwrap()
    }

    /// One frame through gatewayd_rnat (arriving on the egress interface).
    pub fn rnat(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run("gatewayd_rnat", frame).unwrap()
    }

    pub fn entry(&self, key: &FlowKey) -> Option<NatEntry> {
        self.table.get(key, 0).ok()
    }

    pub fn entries(&self) -> Vec<(FlowKey, NatEntry)> {
        self.table.iter().map(|r| r.unwrap()).collect()
    }

    pub fn put_entry(&mut self, key: FlowKey, e: NatEntry) {
        self.table.insert(key, e, 0).unwrap();
    }

    pub fn counters(&self, policy_id: u32) -> EgressCounters {
        let mut sum = EgressCounters::default();
        for c in self.stats.get(&policy_id, 0).unwrap().iter() {
            sum.packets_out += c.packets_out;
            sum.bytes_out += c.bytes_out;
            sum.packets_in += c.packets_in;
            sum.bytes_in += c.bytes_in;
            sum.new_flows += c.new_flows;
            sum.nat_failures += c.nat_failures;
        }
        sum
    }

    /// The non-zero reason counters by name, summed over CPUs: (packets, bytes).
    pub fn reasons(&self) -> BTreeMap<&'static str, (u64, u64)> {
        let mut out = BTreeMap::new();
        for (i, name) in REASON_NAMES.iter().enumerate() {
            let values = self.reasons.get(&(i as u32), 0).unwrap();
            let (p, b) = values
                .iter()
                .fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes));
            if p != 0 {
                out.insert(*name, (p, b));
            }
        }
        out
    }

    pub fn clear_reasons(&mut self) {
        let cpus = nr_cpus().unwrap();
        for i in 0..REASON_NAMES.len() as u32 {
            let zero = PerCpuValues::try_from(vec![ReasonCounters::default(); cpus]).unwrap();
            self.reasons.set(i, zero, 0).unwrap();
        }
    }
}

/// One BPF_PROG_TEST_RUN of a TC program on a fresh copy of `frame`: the verdict, the frame it
/// left, and the kernel-measured run time (ns).
pub fn tc_test_run(prog: &SchedClassifier, frame: &[u8]) -> Result<(u32, Vec<u8>, u64)> {
    let mut out = vec![0u8; frame.len() + 256];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    out.truncate(r.data_size_out as usize);
    Ok((r.return_value, out, r.duration.as_nanos() as u64))
}

// ---------------------------------------------------------------------------------------------
// Packets: built from scratch with correct checksums, and checked from scratch.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    Tcp(u8),
    Udp,
    /// UDP sent without a checksum (IPv4).
    UdpNoChecksum,
    /// ICMP / ICMPv6 echo request (reply = false) or reply; the identifier is `sport`.
    Echo {
        reply: bool,
    },
    /// Any other IP protocol, payload only.
    Raw(u8),
}

#[derive(Debug, Clone)]
pub struct Pkt {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub l4: L4,
    pub payload: Vec<u8>,
    /// Fragment offset in 8-byte units (the datagram's payload: no L4 header when non-zero).
    pub frag_offset: u16,
    pub more_fragments: bool,
}

impl Pkt {
    pub fn new(src: &str, sport: u16, dst: &str, dport: u16, l4: L4) -> Pkt {
        Pkt {
            src: ip(src),
            dst: ip(dst),
            sport,
            dport,
            l4,
            payload: (0..23).map(|i| (i * 37 + 11) as u8).collect(),
            frag_offset: 0,
            more_fragments: false,
        }
    }

    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Pkt {
        Pkt::new(src, sport, dst, dport, L4::Tcp(flags))
    }

    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Pkt {
        Pkt::new(src, sport, dst, dport, L4::Udp)
    }

    /// An echo request (or reply) with identifier `id`.
    pub fn echo(src: &str, dst: &str, id: u16, reply: bool) -> Pkt {
        Pkt::new(src, id, dst, id, L4::Echo { reply })
    }

    pub fn is_v4(&self) -> bool {
        self.src.is_ipv4()
    }

    pub fn proto(&self) -> u8 {
        match self.l4 {
            L4::Tcp(_) => IPPROTO_TCP,
            L4::Udp | L4::UdpNoChecksum => IPPROTO_UDP,
            L4::Echo { .. } if self.is_v4() => IPPROTO_ICMP,
            L4::Echo { .. } => IPPROTO_ICMPV6,
            L4::Raw(p) => p,
        }
    }

    /// The same packet with other addresses and ports (what a translation must produce).
    pub fn with(&self, src: &str, sport: u16, dst: &str, dport: u16) -> Pkt {
        Pkt {
            src: ip(src),
            dst: ip(dst),
            sport,
            dport,
            ..self.clone()
        }
    }

    /// The answer from the destination: addresses and ports swapped.
    pub fn reply(&self, l4: L4) -> Pkt {
        Pkt {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            l4,
            ..self.clone()
        }
    }

    /// The key the datapath looks this packet up with.
    pub fn key(&self) -> FlowKey {
        let (src, family) = addr_bytes(self.src);
        let (dst, _) = addr_bytes(self.dst);
        FlowKey {
            src,
            dst,
            sport: self.sport.to_be(),
            dport: self.dport.to_be(),
            proto: self.proto(),
            family,
            pad: 0,
        }
    }

    pub fn segment(&self) -> Vec<u8> {
        if self.frag_offset != 0 {
            return self.payload.clone();
        }
        let mut seg = match self.l4 {
            L4::Tcp(flags) => {
                let mut h = vec![0u8; 20];
                h[0..2].copy_from_slice(&self.sport.to_be_bytes());
                h[2..4].copy_from_slice(&self.dport.to_be_bytes());
                h[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
                h[8..12].copy_from_slice(&0x0bad_cafeu32.to_be_bytes());
                h[12] = 5 << 4;
                h[13] = flags;
                h[14..16].copy_from_slice(&64240u16.to_be_bytes());
                h
            }
            L4::Udp | L4::UdpNoChecksum => {
                let mut h = vec![0u8; 8];
                h[0..2].copy_from_slice(&self.sport.to_be_bytes());
                h[2..4].copy_from_slice(&self.dport.to_be_bytes());
                h[4..6].copy_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                h
            }
            L4::Echo { reply } => {
                let t = match (self.is_v4(), reply) {
                    (true, false) => 8,
                    (true, true) => 0,
                    (false, false) => 128,
                    (false, true) => 129,
                };
                let mut h = vec![t, 0, 0, 0];
                h.extend_from_slice(&self.sport.to_be_bytes());
                h.extend_from_slice(&7u16.to_be_bytes()); // sequence
                h
            }
            L4::Raw(_) => vec![],
        };
        seg.extend_from_slice(&self.payload);
        let seed = if self.proto() == IPPROTO_ICMP {
            0
        } else {
            pseudo_sum(self.src, self.dst, self.proto(), seg.len())
        };
        let c = csum(seed, &seg);
        match self.l4 {
            L4::Tcp(_) => seg[16..18].copy_from_slice(&c.to_be_bytes()),
            L4::Udp => {
                let c = if c == 0 { 0xffff } else { c };
                seg[6..8].copy_from_slice(&c.to_be_bytes());
            }
            L4::Echo { .. } => seg[2..4].copy_from_slice(&c.to_be_bytes()),
            L4::UdpNoChecksum | L4::Raw(_) => {}
        }
        seg
    }

    pub fn ip_packet(&self) -> Vec<u8> {
        ip_packet(self.src, self.dst, self.proto(), &self.segment(), self.frag())
    }

    pub fn frag(&self) -> Option<(u16, bool)> {
        (self.frag_offset != 0 || self.more_fragments).then_some((self.frag_offset, self.more_fragments))
    }

    pub fn frame(&self) -> Vec<u8> {
        frame(&self.ip_packet())
    }
}

/// An IP packet around `payload`: IPv4 (ID 0x4242, DF unless fragmented, TTL 63) or IPv6
/// (with a Fragment header if `frag` is set).
pub fn ip_packet(src: IpAddr, dst: IpAddr, proto: u8, payload: &[u8], frag: Option<(u16, bool)>) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h = vec![0u8; 20];
            h[0] = 0x45;
            h[1] = 0x28;
            h[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
            h[4..6].copy_from_slice(&0x4242u16.to_be_bytes());
            let f = match frag {
                Some((offset, more)) => offset | if more { 0x2000 } else { 0 },
                None => 0x4000,
            };
            h[6..8].copy_from_slice(&f.to_be_bytes());
            h[8] = 63;
            h[9] = proto;
            h[12..16].copy_from_slice(&s.octets());
            h[16..20].copy_from_slice(&d.octets());
            let c = csum(0, &h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            h.extend_from_slice(payload);
            h
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut ext = vec![];
            let mut nh = proto;
            if let Some((offset, more)) = frag {
                ext = vec![proto, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef];
                ext[2..4].copy_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
                nh = 44;
            }
            let mut h = vec![0u8; 40];
            h[0..4].copy_from_slice(&0x6280_0000u32.to_be_bytes());
            h[4..6].copy_from_slice(&((ext.len() + payload.len()) as u16).to_be_bytes());
            h[6] = nh;
            h[7] = 63;
            h[8..24].copy_from_slice(&s.octets());
            h[24..40].copy_from_slice(&d.octets());
            h.extend_from_slice(&ext);
            h.extend_from_slice(payload);
            h
        }
        _ => panic!("mixed families"),
    }
}

pub const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

pub fn frame(ip: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&ROUTER_MAC);
    f.extend_from_slice(&GATEWAY_MAC);
    let ethertype: u16 = if ip[0] >> 4 == 4 { 0x0800 } else { 0x86dd };
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(ip);
    f
}

/// An ICMP error from `from` to `to` quoting `quote` (bytes of the offending IP packet):
/// IPv4 "fragmentation needed" with MTU 1400, or ICMPv6 "packet too big" with MTU 1280.
pub fn icmp_error(from: &str, to: &str, quote: &[u8]) -> Vec<u8> {
    let (from, to) = (ip(from), ip(to));
    let mut msg = if from.is_ipv4() {
        vec![3, 4, 0, 0, 0, 0, 0x05, 0x78]
    } else {
        vec![2, 0, 0, 0, 0, 0, 0x05, 0x00]
    };
    msg.extend_from_slice(quote);
    let proto = if from.is_ipv4() {
        IPPROTO_ICMP
    } else {
        IPPROTO_ICMPV6
    };
    let seed = if from.is_ipv4() {
        0
    } else {
        pseudo_sum(from, to, proto, msg.len())
    };
    let c = csum(seed, &msg);
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    frame(&ip_packet(from, to, proto, &msg, None))
}

/// What a frame carries, after every checksum it holds was verified from scratch.
#[derive(Debug)]
pub struct View {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    /// The L4 bytes (for a later fragment: the fragment's payload).
    pub l4: Vec<u8>,
}

impl View {
    pub fn port(&self, off: usize) -> u16 {
        u16::from_be_bytes([self.l4[off], self.l4[off + 1]])
    }
    pub fn sport(&self) -> u16 {
        self.port(0)
    }
    pub fn dport(&self) -> u16 {
        self.port(2)
    }
    pub fn echo_id(&self) -> u16 {
        self.port(4)
    }
}

/// Parses an IP packet and asserts its IPv4 header checksum and (unless it is a later
/// fragment, or `l4_complete` is false) its L4 checksum; a zero UDP checksum over IPv4 is
/// accepted as "none".
pub fn check_ip(ip: &[u8], l4_complete: bool) -> View {
    let (src, dst, proto, l4, later_fragment) = if ip[0] >> 4 == 4 {
        let hlen = usize::from(ip[0] & 0xf) * 4;
        assert!(csum_ok(0, &ip[..hlen]), "IPv4 header checksum of {ip:02x?}");
        let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        let tot = tot.min(ip.len());
        let s: [u8; 4] = ip[12..16].try_into().unwrap();
        let d: [u8; 4] = ip[16..20].try_into().unwrap();
        let later = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0;
        (
            IpAddr::from(s),
            IpAddr::from(d),
            ip[9],
            ip[hlen..tot].to_vec(),
            later,
        )
    } else {
        let s: [u8; 16] = ip[8..24].try_into().unwrap();
        let d: [u8; 16] = ip[24..40].try_into().unwrap();
        let (mut nh, mut off, mut later) = (ip[6], 40, false);
        if nh == 44 {
            later = u16::from_be_bytes([ip[42], ip[43]]) & 0xfff8 != 0;
            nh = ip[40];
            off = 48;
        }
        (IpAddr::from(s), IpAddr::from(d), nh, ip[off..].to_vec(), later)
    };
    if l4_complete && !later_fragment {
        let seed = if proto == IPPROTO_ICMP {
            0
        } else {
            pseudo_sum(src, dst, proto, l4.len())
        };
        let zero_udp = proto == IPPROTO_UDP && src.is_ipv4() && l4[6..8] == [0, 0];
        if matches!(proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMP | IPPROTO_ICMPV6) && !zero_udp {
            assert!(csum_ok(seed, &l4), "L4 checksum (protocol {proto}) of {ip:02x?}");
        }
    }
    View { src, dst, proto, l4 }
}

pub fn check_frame(frame: &[u8]) -> View {
    check_ip(&frame[14..], true)
}

// ---------------------------------------------------------------------------------------------
// The datapath's port choice, computed here (lookup3 as the kernel's jhash, see lib/hash.h).
// ---------------------------------------------------------------------------------------------

/// The `i`th port the datapath tries for a flow.
pub fn choice(pkt: &Pkt, i: u32, min: u16, max: u16) -> u16 {
    let range = u32::from(max - min) + 1;
    let h = flow_hash_seeded(&pkt.key(), NAT_SEED);
    let h = if i == 0 {
        h
    } else {
        jhash_3words(h, i, 0, NAT_SEED)
    };
    min + (h % range) as u16
}

/// The first port the datapath tries for a flow (no collision: the port it uses).
pub fn first_choice(pkt: &Pkt, min: u16, max: u16) -> u16 {
    choice(pkt, 0, min, max)
}

// ---------------------------------------------------------------------------------------------
// Assertions shared by the tests.
// ---------------------------------------------------------------------------------------------

/// Runs `pkt` through gatewayd_snat and checks it left as `pkt` from `egress`:nat_port, every
/// byte and checksum included; returns the NAT port.
pub fn assert_snat(nat: &Nat, pkt: &Pkt, egress: &str) -> u16 {
    let (verdict, out) = nat.snat(&pkt.frame());
    assert_eq!(verdict, TC_ACT_OK, "snat verdict");
    let v = check_frame(&out);
    assert_eq!(v.src, ip(egress), "translated source");
    assert_eq!((v.dst, v.proto), (pkt.dst, pkt.proto()), "destination untouched");
    let port = match pkt.l4 {
        L4::Echo { .. } => v.echo_id(),
        _ => {
            assert_eq!(v.dport(), pkt.dport, "destination port untouched");
            v.sport()
        }
    };
    assert!(
        (PORT_MIN..=PORT_MAX).contains(&port),
        "NAT port {port} outside the range"
    );
    let dport = if matches!(pkt.l4, L4::Echo { .. }) {
        port
    } else {
        pkt.dport
    };
    let expected = pkt.with(egress, port, &pkt.dst.to_string(), dport);
    assert_eq!(out, expected.frame(), "translated frame");
    port
}

/// The key of the REPLY entry of `pkt`'s flow translated to `egress`:`port` (what the answer
/// looks like when it arrives).
pub fn reply_key(pkt: &Pkt, egress: &str, port: u16) -> FlowKey {
    let icmp = matches!(pkt.l4, L4::Echo { .. });
    Pkt {
        src: pkt.dst,
        dst: ip(egress),
        sport: if icmp { port } else { pkt.dport },
        dport: port,
        ..pkt.clone()
    }
    .key()
}

/// The two NAT entries of a translated flow: (ORIGINAL, REPLY), with their keys' relation and
/// shared fields checked.
pub fn flow_entries(nat: &Nat, pkt: &Pkt, egress: &str, port: u16) -> (NatEntry, NatEntry) {
    let o = nat.entry(&pkt.key()).expect("ORIGINAL entry");
    let r = nat.entry(&reply_key(pkt, egress, port)).expect("REPLY entry");
    assert_eq!((o.dir, r.dir), (NAT_DIR_ORIGINAL, NAT_DIR_REPLY));
    assert_eq!(o.addr, addr_bytes(ip(egress)).0);
    assert_eq!(u16::from_be(o.port), port);
    assert_eq!(r.addr, addr_bytes(pkt.src).0);
    assert_eq!(u16::from_be(r.port), pkt.sport);
    assert_eq!((o.state, o.policy_id), (r.state, r.policy_id));
    assert_eq!((o.last_seen_ns, o.expires_ns), (r.last_seen_ns, r.expires_ns));
    (o, r)
}

pub fn timeout_ns(e: &NatEntry) -> u64 {
    e.expires_ns - e.last_seen_ns
}

pub const S: u64 = 1_000_000_000;
