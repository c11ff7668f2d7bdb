//! The egress NAT programs (`xdp/egress.c`: `gatewayd_snat` on tcx egress, `gatewayd_rnat` on
//! tcx ingress) run with BPF_PROG_TEST_RUN on crafted Ethernet frames.
//!
//! Each test loads the object on a scratch bpffs directory (removed on drop, also when the test
//! fails), programs policies, settings and addresses through aya's typed maps, and checks the
//! verdict, the frame the program left and what it counted. A translated frame must equal, byte
//! for byte, the frame built from scratch with the translated addresses and ports: that proves
//! every checksum the program updated incrementally, and that nothing else changed. Checksums
//! are also verified from scratch on their own. Loading the object proves both programs pass
//! the verifier.
//!
//! BPF_PROG_TEST_RUN refuses frames shorter than Ethernet + a fixed IP header, so truncation is
//! tested from there on (options, lengths, L4 headers, ICMP quotes).
//!
//! Needs root; without it each test prints `SKIP: <name> needs root` and passes.

use anyhow::{Context, Result};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use aya::util::nr_cpus;
use aya::{Ebpf, EbpfLoader};
use gatewayd::datapath::objects;
use gatewayd_common::maps::{
    addr_bytes, EgressAddrKey, EgressCounters, EgressDst, EgressDstData, EgressPolicy, EgressSettings,
    EgressSrcData, FlowKey, NatEntry, ReasonCounters, EGRESS_DST_PREFIX_BITS, EGRESS_SRC_PREFIX_BITS,
    NAT_DIR_ORIGINAL, NAT_DIR_REPLY, NAT_OPEN, NAT_TCP_CLOSING, NAT_TCP_ESTABLISHED, NAT_TCP_SYN_SENT,
    REASON_NAMES,
};
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;

/// The port hash seed of lib/conntrack.h (GD_NAT_SEED).
const NAT_SEED: u32 = 0x6764_6e74;

// Policies of the standard fixture (documentation and private ranges only).
const WIDE: u32 = 1; // 10.244.0.0/16 -> 0.0.0.0/0 except 10.0.0.0/8, via EGRESS_WIDE
const NARROW: u32 = 2; // 10.244.1.0/24 -> 203.0.113.0/24, via EGRESS_NARROW
const V6: u32 = 3; // fd00:244::/64 -> ::/0, via EGRESS_V6
const EGRESS_WIDE: &str = "192.0.2.1";
const EGRESS_NARROW: &str = "192.0.2.2";
const EGRESS_V6: &str = "2001:db8:e::1";

const POD: &str = "10.244.0.5";
const POD_NARROW: &str = "10.244.1.9";
const POD_OTHER: &str = "10.244.2.9";
const POD_UNSELECTED: &str = "10.99.0.1";
const REMOTE: &str = "198.51.100.7";
const REMOTE_NARROW: &str = "203.0.113.5";
const EXCLUDED_DST: &str = "10.1.2.3";
const ROUTER: &str = "198.51.100.254";
const POD6: &str = "fd00:244::5";
const REMOTE6: &str = "2001:db8:100::7";
const ROUTER6: &str = "2001:db8:100::fe";

const PORT_MIN: u16 = 20000;
const PORT_MAX: u16 = 29999;

fn settings() -> EgressSettings {
    EgressSettings {
        tcp_established_s: 3600,
        tcp_closing_s: 10,
        tcp_syn_s: 60,
        udp_s: 120,
        icmp_s: 30,
        port_min: PORT_MIN,
        port_max: PORT_MAX,
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// True when the caller may run; otherwise prints the skip line and the caller returns.
fn require_root(name: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    println!("SKIP: {name} needs root");
    false
}

fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

// ---------------------------------------------------------------------------------------------
// The loaded object and its maps.
// ---------------------------------------------------------------------------------------------

/// A bpffs directory of our own, removed (pins and all) on drop.
struct ScratchPins(PathBuf);

impl ScratchPins {
    fn new() -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = PathBuf::from("/sys/fs/bpf").join(format!(
            "gatewayd-egress-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(ScratchPins(path))
    }
}

impl Drop for ScratchPins {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("warning: removing {}: {e}", self.0.display());
        }
    }
}

/// The egress object loaded and verified, with typed handles on its maps. Field order is drop
/// order: maps and programs first, the pins last.
struct Nat {
    ebpf: Ebpf,
    table: HashMap<MapData, FlowKey, NatEntry>,
    stats: PerCpuArray<MapData, EgressCounters>,
    reasons: PerCpuArray<MapData, ReasonCounters>,
    cfg: Array<MapData, EgressSettings>,
    dst: LpmTrie<MapData, EgressDstData, EgressDst>,
    src: LpmTrie<MapData, EgressSrcData, u8>,
    pols: Array<MapData, EgressPolicy>,
    addrs: HashMap<MapData, EgressAddrKey, u8>,
    _pins: ScratchPins,
}

impl Nat {
    /// The object with no policy and the given settings.
    fn empty(settings: EgressSettings) -> Result<Nat> {
        let pins = ScratchPins::new()?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pins.0)
            .map_max_entries("gd_nat", 4096)
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

    /// The standard policies (see WIDE, NARROW, V6), programmed the way the daemon's compiler
    /// lays them out: one destination entry per prefix any policy names, candidates most
    /// specific destination first, an excluded prefix without candidates.
    fn new(settings: EgressSettings) -> Result<Nat> {
        let mut nat = Nat::empty(settings)?;
        nat.policy(WIDE, EGRESS_WIDE, &["10.244.0.0/16"])?;
        nat.policy(NARROW, EGRESS_NARROW, &["10.244.1.0/24"])?;
        nat.policy(V6, EGRESS_V6, &["fd00:244::/64"])?;
        nat.destination("0.0.0.0/0", &[WIDE])?;
        nat.destination("10.0.0.0/8", &[])?;
        nat.destination("203.0.113.0/24", &[NARROW, WIDE])?;
        nat.destination("::/0", &[V6])?;
        Ok(nat)
    }

    fn policy(&mut self, id: u32, egress: &str, sources: &[&str]) -> Result<()> {
        let (egress_addr, family) = addr_bytes(ip(egress));
        self.pols.set(
            id,
            EgressPolicy {
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

    fn destination(&mut self, prefix: &str, candidates: &[u32]) -> Result<()> {
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

    fn run(&self, program: &str, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        let prog: &SchedClassifier = self
            .ebpf
            .program(program)
            .context("program missing")?
            .try_into()?;
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
        Ok((r.return_value, out))
    }

    /// One frame through gatewayd_snat (leaving the egress interface).
    fn snat(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run("gatewayd_snat", frame).unwrap()
    }

    /// One frame through gatewayd_rnat (arriving on the egress interface).
    fn rnat(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run("gatewayd_rnat", frame).unwrap()
    }

    fn entry(&self, key: &FlowKey) -> Option<NatEntry> {
        self.table.get(key, 0).ok()
    }

    fn entries(&self) -> Vec<(FlowKey, NatEntry)> {
        self.table.iter().map(|r| r.unwrap()).collect()
    }

    fn put_entry(&mut self, key: FlowKey, e: NatEntry) {
        self.table.insert(key, e, 0).unwrap();
    }

    fn counters(&self, policy_id: u32) -> EgressCounters {
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
    fn reasons(&self) -> BTreeMap<&'static str, (u64, u64)> {
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

    fn clear_reasons(&mut self) {
        let cpus = nr_cpus().unwrap();
        for i in 0..REASON_NAMES.len() as u32 {
            let zero = PerCpuValues::try_from(vec![ReasonCounters::default(); cpus]).unwrap();
            self.reasons.set(i, zero, 0).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Packets: built from scratch with correct checksums, and checked from scratch.
// ---------------------------------------------------------------------------------------------

/// One's complement sum of `data` (big-endian 16-bit words, odd byte padded) added to `sum`.
fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(w);
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum
}

/// The value of a checksum field covering `data` (whose field is zero) and a seed sum.
fn csum(seed: u32, data: &[u8]) -> u16 {
    !(csum_add(seed, data) as u16)
}

/// A region that holds its checksum verifies when it sums to 0xffff.
fn csum_ok(seed: u32, data: &[u8]) -> bool {
    csum_add(seed, data) == 0xffff
}

fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    match (src, dst) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let s = csum_add(csum_add(0, &a.octets()), &b.octets());
            csum_add(csum_add(s, &[0, proto]), &(len as u16).to_be_bytes())
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let s = csum_add(csum_add(0, &a.octets()), &b.octets());
            csum_add(csum_add(s, &(len as u32).to_be_bytes()), &[0, 0, 0, proto])
        }
        _ => panic!("mixed families"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum L4 {
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
struct Pkt {
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    l4: L4,
    payload: Vec<u8>,
    /// Fragment offset in 8-byte units (the datagram's payload: no L4 header when non-zero).
    frag_offset: u16,
    more_fragments: bool,
}

impl Pkt {
    fn new(src: &str, sport: u16, dst: &str, dport: u16, l4: L4) -> Pkt {
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

    fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Pkt {
        Pkt::new(src, sport, dst, dport, L4::Tcp(flags))
    }

    fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Pkt {
        Pkt::new(src, sport, dst, dport, L4::Udp)
    }

    /// An echo request (or reply) with identifier `id`.
    fn echo(src: &str, dst: &str, id: u16, reply: bool) -> Pkt {
        Pkt::new(src, id, dst, id, L4::Echo { reply })
    }

    fn is_v4(&self) -> bool {
        self.src.is_ipv4()
    }

    fn proto(&self) -> u8 {
        match self.l4 {
            L4::Tcp(_) => IPPROTO_TCP,
            L4::Udp | L4::UdpNoChecksum => IPPROTO_UDP,
            L4::Echo { .. } if self.is_v4() => IPPROTO_ICMP,
            L4::Echo { .. } => IPPROTO_ICMPV6,
            L4::Raw(p) => p,
        }
    }

    /// The same packet with other addresses and ports (what a translation must produce).
    fn with(&self, src: &str, sport: u16, dst: &str, dport: u16) -> Pkt {
        Pkt {
            src: ip(src),
            dst: ip(dst),
            sport,
            dport,
            ..self.clone()
        }
    }

    /// The answer from the destination: addresses and ports swapped.
    fn reply(&self, l4: L4) -> Pkt {
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
    fn key(&self) -> FlowKey {
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

    fn segment(&self) -> Vec<u8> {
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
            pseudo(self.src, self.dst, self.proto(), seg.len())
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

    fn ip_packet(&self) -> Vec<u8> {
        ip_packet(self.src, self.dst, self.proto(), &self.segment(), self.frag())
    }

    fn frag(&self) -> Option<(u16, bool)> {
        (self.frag_offset != 0 || self.more_fragments).then_some((self.frag_offset, self.more_fragments))
    }

    fn frame(&self) -> Vec<u8> {
        frame(&self.ip_packet())
    }
}

/// An IP packet around `payload`: IPv4 (ID 0x4242, DF unless fragmented, TTL 63) or IPv6
/// (with a Fragment header if `frag` is set).
fn ip_packet(src: IpAddr, dst: IpAddr, proto: u8, payload: &[u8], frag: Option<(u16, bool)>) -> Vec<u8> {
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

const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

fn frame(ip: &[u8]) -> Vec<u8> {
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
fn icmp_error(from: &str, to: &str, quote: &[u8]) -> Vec<u8> {
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
        pseudo(from, to, proto, msg.len())
    };
    let c = csum(seed, &msg);
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    frame(&ip_packet(from, to, proto, &msg, None))
}

/// What a frame carries, after every checksum it holds was verified from scratch.
#[derive(Debug)]
struct View {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    /// The L4 bytes (for a later fragment: the fragment's payload).
    l4: Vec<u8>,
}

impl View {
    fn port(&self, off: usize) -> u16 {
        u16::from_be_bytes([self.l4[off], self.l4[off + 1]])
    }
    fn sport(&self) -> u16 {
        self.port(0)
    }
    fn dport(&self) -> u16 {
        self.port(2)
    }
    fn echo_id(&self) -> u16 {
        self.port(4)
    }
}

/// Parses an IP packet and asserts its IPv4 header checksum and (unless it is a later
/// fragment, or `l4_complete` is false) its L4 checksum; a zero UDP checksum over IPv4 is
/// accepted as "none".
fn check_ip(ip: &[u8], l4_complete: bool) -> View {
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
            pseudo(src, dst, proto, l4.len())
        };
        let zero_udp = proto == IPPROTO_UDP && src.is_ipv4() && l4[6..8] == [0, 0];
        if matches!(proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMP | IPPROTO_ICMPV6) && !zero_udp {
            assert!(csum_ok(seed, &l4), "L4 checksum (protocol {proto}) of {ip:02x?}");
        }
    }
    View { src, dst, proto, l4 }
}

fn check_frame(frame: &[u8]) -> View {
    check_ip(&frame[14..], true)
}

// ---------------------------------------------------------------------------------------------
// The datapath's port choice, computed here (lookup3 as the kernel's jhash, see lib/hash.h).
// ---------------------------------------------------------------------------------------------

fn jhash_final(mut a: u32, mut b: u32, mut c: u32) -> u32 {
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(14));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(11));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(25));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(16));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(4));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(14));
    c ^= b;
    c.wrapping_sub(b.rotate_left(24))
}

fn jhash_mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c) ^ c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a) ^ a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b) ^ b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c) ^ c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a) ^ a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b) ^ b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

fn flow_hash(k: &FlowKey, seed: u32) -> u32 {
    let w = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap());
    let mut ports = [0u8; 4];
    ports[..2].copy_from_slice(&k.sport.to_ne_bytes());
    ports[2..].copy_from_slice(&k.dport.to_ne_bytes());
    let ports = w(&ports);
    if k.family == 4 {
        let init = 0xdead_beefu32
            .wrapping_add(3 << 2)
            .wrapping_add(seed.wrapping_add(u32::from(k.proto)));
        return jhash_final(
            w(&k.src[..4]).wrapping_add(init),
            w(&k.dst[..4]).wrapping_add(init),
            ports.wrapping_add(init),
        );
    }
    let init = 0xdead_beefu32.wrapping_add(10 << 2).wrapping_add(seed);
    let (mut a, mut b, mut c) = (init, init, init);
    a = a.wrapping_add(w(&k.src[0..4]));
    b = b.wrapping_add(w(&k.src[4..8]));
    c = c.wrapping_add(w(&k.src[8..12]));
    jhash_mix(&mut a, &mut b, &mut c);
    a = a.wrapping_add(w(&k.src[12..16]));
    b = b.wrapping_add(w(&k.dst[0..4]));
    c = c.wrapping_add(w(&k.dst[4..8]));
    jhash_mix(&mut a, &mut b, &mut c);
    a = a.wrapping_add(w(&k.dst[8..12]));
    b = b.wrapping_add(w(&k.dst[12..16]));
    c = c.wrapping_add(ports);
    jhash_mix(&mut a, &mut b, &mut c);
    a = a.wrapping_add(u32::from(k.proto));
    jhash_final(a, b, c)
}

fn jhash_3words(a: u32, b: u32, c: u32, initval: u32) -> u32 {
    let init = initval.wrapping_add(0xdead_beef).wrapping_add(3 << 2);
    jhash_final(a.wrapping_add(init), b.wrapping_add(init), c.wrapping_add(init))
}

/// The `i`th port the datapath tries for a flow.
fn choice(pkt: &Pkt, i: u32, min: u16, max: u16) -> u16 {
    let range = u32::from(max - min) + 1;
    let h = flow_hash(&pkt.key(), NAT_SEED);
    let h = if i == 0 {
        h
    } else {
        jhash_3words(h, i, 0, NAT_SEED)
    };
    min + (h % range) as u16
}

/// The first port the datapath tries for a flow (no collision: the port it uses).
fn first_choice(pkt: &Pkt, min: u16, max: u16) -> u16 {
    choice(pkt, 0, min, max)
}

// ---------------------------------------------------------------------------------------------
// Assertions shared by the tests.
// ---------------------------------------------------------------------------------------------

/// Runs `pkt` through gatewayd_snat and checks it left as `pkt` from `egress`:nat_port, every
/// byte and checksum included; returns the NAT port.
fn assert_snat(nat: &Nat, pkt: &Pkt, egress: &str) -> u16 {
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

/// The two NAT entries of a translated flow: (ORIGINAL, REPLY), with their keys' relation and
/// shared fields checked.
fn flow_entries(nat: &Nat, pkt: &Pkt, egress: &str, port: u16) -> (NatEntry, NatEntry) {
    let o = nat.entry(&pkt.key()).expect("ORIGINAL entry");
    let icmp = matches!(pkt.l4, L4::Echo { .. });
    let reply_key = Pkt {
        src: pkt.dst,
        dst: ip(egress),
        sport: if icmp { port } else { pkt.dport },
        dport: port,
        ..pkt.clone()
    }
    .key();
    let r = nat.entry(&reply_key).expect("REPLY entry");
    assert_eq!((o.dir, r.dir), (NAT_DIR_ORIGINAL, NAT_DIR_REPLY));
    assert_eq!(o.addr, addr_bytes(ip(egress)).0);
    assert_eq!(u16::from_be(o.port), port);
    assert_eq!(r.addr, addr_bytes(pkt.src).0);
    assert_eq!(u16::from_be(r.port), pkt.sport);
    assert_eq!((o.state, o.policy_id), (r.state, r.policy_id));
    assert_eq!((o.last_seen_ns, o.expires_ns), (r.last_seen_ns, r.expires_ns));
    (o, r)
}

fn timeout_ns(e: &NatEntry) -> u64 {
    e.expires_ns - e.last_seen_ns
}

const S: u64 = 1_000_000_000;

// ---------------------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------------------

#[test]
fn tcp_udp_and_echo_are_translated_and_their_replies_translated_back() {
    if !require_root("tcp_udp_and_echo_are_translated_and_their_replies_translated_back") {
        return;
    }
    let nat = Nat::new(settings()).unwrap();
    let before = monotonic_ns();

    // TCP: the SYN opens the mapping, the SYN-ACK comes back to the pod and establishes it.
    let syn = Pkt::tcp(POD, 40000, REMOTE, 443, TCP_SYN);
    let port = assert_snat(&nat, &syn, EGRESS_WIDE);
    assert_eq!(port, first_choice(&syn, PORT_MIN, PORT_MAX));
    let (o, _) = flow_entries(&nat, &syn, EGRESS_WIDE, port);
    assert_eq!((o.state, o.policy_id), (NAT_TCP_SYN_SENT, WIDE));
    assert_eq!(timeout_ns(&o), 60 * S);
    assert_eq!(o.created_ns, o.last_seen_ns);
    assert!(o.last_seen_ns + S >= before && o.last_seen_ns <= monotonic_ns());

    let syn_ack = Pkt::tcp(REMOTE, 443, EGRESS_WIDE, port, TCP_SYN | TCP_ACK);
    let (verdict, out) = nat.rnat(&syn_ack.frame());
    assert_eq!(verdict, TC_ACT_OK);
    check_frame(&out);
    assert_eq!(out, syn_ack.with(REMOTE, 443, POD, 40000).frame());
    let (o, _) = flow_entries(&nat, &syn, EGRESS_WIDE, port);
    assert_eq!(o.state, NAT_TCP_ESTABLISHED);
    assert_eq!(timeout_ns(&o), 3600 * S);

    // Established traffic keeps the port, with a payload.
    let data = Pkt::tcp(POD, 40000, REMOTE, 443, TCP_ACK | TCP_PSH);
    assert_eq!(assert_snat(&nat, &data, EGRESS_WIDE), port);

    // UDP.
    let udp = Pkt::udp(POD, 5353, REMOTE, 53);
    let uport = assert_snat(&nat, &udp, EGRESS_WIDE);
    assert_eq!(uport, first_choice(&udp, PORT_MIN, PORT_MAX));
    let (o, _) = flow_entries(&nat, &udp, EGRESS_WIDE, uport);
    assert_eq!((o.state, timeout_ns(&o)), (NAT_OPEN, 120 * S));
    let answer = udp.reply(L4::Udp).with(REMOTE, 53, EGRESS_WIDE, uport);
    let (verdict, out) = nat.rnat(&answer.frame());
    assert_eq!(verdict, TC_ACT_OK);
    check_frame(&out);
    assert_eq!(out, answer.with(REMOTE, 53, POD, 5353).frame());

    // ICMP echo: the identifier is the port.
    let ping = Pkt::echo(POD, REMOTE, 0x0abc, false);
    let id = assert_snat(&nat, &ping, EGRESS_WIDE);
    assert_eq!(id, first_choice(&ping, PORT_MIN, PORT_MAX));
    let (o, _) = flow_entries(&nat, &ping, EGRESS_WIDE, id);
    assert_eq!(timeout_ns(&o), 30 * S);
    let pong = Pkt::echo(REMOTE, EGRESS_WIDE, id, true);
    let (verdict, out) = nat.rnat(&pong.frame());
    assert_eq!(verdict, TC_ACT_OK);
    check_frame(&out);
    assert_eq!(out, Pkt::echo(REMOTE, POD, 0x0abc, true).frame());

    let c = nat.counters(WIDE);
    assert_eq!((c.packets_out, c.packets_in, c.new_flows), (4, 3, 3));
    let out_bytes: u64 = [&syn, &data, &udp, &ping]
        .iter()
        .map(|p| p.frame().len() as u64)
        .sum();
    assert_eq!(c.bytes_out, out_bytes);
    assert_eq!(c.nat_failures, 0);
    assert!(nat.reasons().is_empty(), "{:?}", nat.reasons());
    assert_eq!(nat.entries().len(), 6, "two entries per flow");
}

#[test]
fn ipv6_tcp_udp_and_echo_are_translated_both_ways() {
    if !require_root("ipv6_tcp_udp_and_echo_are_translated_both_ways") {
        return;
    }
    let nat = Nat::new(settings()).unwrap();
    for pkt in [
        Pkt::tcp(POD6, 40000, REMOTE6, 443, TCP_SYN),
        Pkt::udp(POD6, 5353, REMOTE6, 53),
        Pkt::echo(POD6, REMOTE6, 0x0abc, false),
    ] {
        let port = assert_snat(&nat, &pkt, EGRESS_V6);
        assert_eq!(port, first_choice(&pkt, PORT_MIN, PORT_MAX), "{:?}", pkt.l4);
        let (o, _) = flow_entries(&nat, &pkt, EGRESS_V6, port);
        assert_eq!(o.policy_id, V6);

        let (back, translated) = match pkt.l4 {
            L4::Echo { .. } => (
                Pkt::echo(REMOTE6, EGRESS_V6, port, true),
                Pkt::echo(REMOTE6, POD6, pkt.sport, true),
            ),
            l4 => {
                let r = pkt.reply(l4).with(REMOTE6, pkt.dport, EGRESS_V6, port);
                let t = r.with(REMOTE6, pkt.dport, POD6, pkt.sport);
                (r, t)
            }
        };
        let (verdict, out) = nat.rnat(&back.frame());
        assert_eq!(verdict, TC_ACT_OK);
        check_frame(&out);
        assert_eq!(out, translated.frame(), "{:?} reply", pkt.l4);
    }
    let c = nat.counters(V6);
    assert_eq!((c.packets_out, c.packets_in, c.new_flows), (3, 3, 3));
}

#[test]
fn unselected_sources_excluded_destinations_and_other_traffic_pass_untouched() {
    if !require_root("unselected_sources_excluded_destinations_and_other_traffic_pass_untouched") {
        return;
    }
    let nat = Nat::new(settings()).unwrap();
    for pkt in [
        Pkt::tcp(POD_UNSELECTED, 40000, REMOTE, 443, TCP_SYN),
        Pkt::tcp(POD, 40000, EXCLUDED_DST, 443, TCP_SYN),
        Pkt::udp(POD, 40000, EXCLUDED_DST, 53),
        Pkt::echo(POD, EXCLUDED_DST, 1, false),
        Pkt::udp("fd00:99::1", 40000, REMOTE6, 53),
    ] {
        let frame = pkt.frame();
        assert_eq!(nat.snat(&frame), (TC_ACT_OK, frame.clone()), "{pkt:?}");
    }
    // Replies to addresses without a mapping, and traffic that is not IP.
    let stray = Pkt::tcp(REMOTE, 443, "192.0.2.99", 20001, TCP_ACK).frame();
    assert_eq!(nat.rnat(&stray), (TC_ACT_OK, stray.clone()));
    let mut arp = frame(&[0u8; 28]);
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    assert_eq!(nat.snat(&arp), (TC_ACT_OK, arp.clone()));
    assert_eq!(nat.rnat(&arp), (TC_ACT_OK, arp.clone()));

    assert!(nat.entries().is_empty());
    assert!(nat.reasons().is_empty(), "{:?}", nat.reasons());
    assert_eq!(nat.counters(WIDE), EgressCounters::default());
}

#[test]
fn most_specific_destination_wins_and_sources_pick_among_candidates() {
    if !require_root("most_specific_destination_wins_and_sources_pick_among_candidates") {
        return;
    }
    let nat = Nat::new(settings()).unwrap();
    // 203.0.113.0/24 lists NARROW (its own /24) before WIDE (0.0.0.0/0).
    let narrow = Pkt::tcp(POD_NARROW, 40000, REMOTE_NARROW, 443, TCP_SYN);
    assert_snat(&nat, &narrow, EGRESS_NARROW);
    // Not in NARROW's sources: the next candidate, WIDE, takes it.
    let other = Pkt::tcp(POD_OTHER, 40000, REMOTE_NARROW, 443, TCP_SYN);
    assert_snat(&nat, &other, EGRESS_WIDE);
    // Outside 203.0.113.0/24 NARROW's pods go through WIDE too.
    let elsewhere = Pkt::tcp(POD_NARROW, 40000, REMOTE, 443, TCP_SYN);
    assert_snat(&nat, &elsewhere, EGRESS_WIDE);

    assert_eq!(nat.counters(NARROW).new_flows, 1);
    assert_eq!(nat.counters(WIDE).new_flows, 2);
}

#[test]
fn the_first_choice_port_is_the_same_on_a_fresh_datapath() {
    if !require_root("the_first_choice_port_is_the_same_on_a_fresh_datapath") {
        return;
    }
    let flows = [
        Pkt::tcp(POD, 40000, REMOTE, 443, TCP_SYN),
        Pkt::tcp(POD, 40001, REMOTE, 443, TCP_SYN),
        Pkt::udp(POD_NARROW, 123, REMOTE_NARROW, 123),
        Pkt::echo(POD6, REMOTE6, 77, false),
    ];
    let ports = |nat: &Nat| -> Vec<u16> {
        flows
            .iter()
            .map(|p| {
                let (_, out) = nat.snat(&p.frame());
                let v = check_frame(&out);
                match p.l4 {
                    L4::Echo { .. } => v.echo_id(),
                    _ => v.sport(),
                }
            })
            .collect()
    };
    let first = ports(&Nat::new(settings()).unwrap());
    let second = ports(&Nat::new(settings()).unwrap());
    assert_eq!(first, second, "a standby gateway must choose the same ports");
    let expected: Vec<u16> = flows
        .iter()
        .map(|p| first_choice(p, PORT_MIN, PORT_MAX))
        .collect();
    assert_eq!(first, expected);
}

#[test]
fn a_port_held_by_another_flow_is_not_reused_but_an_expired_one_is() {
    if !require_root("a_port_held_by_another_flow_is_not_reused_but_an_expired_one_is") {
        return;
    }
    let mut nat = Nat::new(settings()).unwrap();
    let pkt = Pkt::tcp(POD, 40000, REMOTE, 443, TCP_SYN);
    let first = first_choice(&pkt, PORT_MIN, PORT_MAX);
    // Another pod's flow to the same destination holds the first choice.
    let reply_key = Pkt::tcp(REMOTE, 443, EGRESS_WIDE, first, TCP_ACK).key();
    let foreign = NatEntry {
        addr: addr_bytes(ip(POD_OTHER)).0,
        created_ns: monotonic_ns(),
        last_seen_ns: monotonic_ns(),
        expires_ns: monotonic_ns() + 3600 * S,
        policy_id: WIDE,
        port: 41000u16.to_be(),
        state: NAT_TCP_ESTABLISHED,
        dir: NAT_DIR_REPLY,
    };
    nat.put_entry(reply_key, foreign);
    let port = assert_snat(&nat, &pkt, EGRESS_WIDE);
    assert_ne!(port, first, "the held port must not be given to a second flow");
    // The next candidate is a function of the flow too: a standby picks it the same way.
    assert_eq!(port, choice(&pkt, 1, PORT_MIN, PORT_MAX));
    assert_eq!(nat.entry(&reply_key), Some(foreign), "the holder is untouched");
    flow_entries(&nat, &pkt, EGRESS_WIDE, port);
    // Its replies reach this pod, the holder's reach the holder.
    let back = Pkt::tcp(REMOTE, 443, EGRESS_WIDE, port, TCP_SYN | TCP_ACK);
    let (_, out) = nat.rnat(&back.frame());
    assert_eq!(out, back.with(REMOTE, 443, POD, 40000).frame());
    let holder = Pkt::tcp(REMOTE, 443, EGRESS_WIDE, first, TCP_ACK);
    let (_, out) = nat.rnat(&holder.frame());
    assert_eq!(out, holder.with(REMOTE, 443, POD_OTHER, 41000).frame());

    // The same port toward another destination is free: ports are per destination.
    let elsewhere = Pkt::tcp(POD, 40000, "198.51.100.8", 443, TCP_SYN);
    let p2 = assert_snat(&nat, &elsewhere, EGRESS_WIDE);
    assert_eq!(p2, first_choice(&elsewhere, PORT_MIN, PORT_MAX));

    // Once the holder has expired, a new flow that wants the port takes it over.
    let mut expired = foreign;
    expired.expires_ns = 2;
    nat.put_entry(reply_key, expired);
    let pkt2 = Pkt::tcp(POD, 40000, REMOTE, 443, TCP_SYN);
    nat.table.remove(&pkt2.key()).unwrap();
    let old_reply = Pkt::tcp(REMOTE, 443, EGRESS_WIDE, port, TCP_ACK).key();
    nat.table.remove(&old_reply).unwrap();
    assert_eq!(assert_snat(&nat, &pkt2, EGRESS_WIDE), first);
    let (_, r) = flow_entries(&nat, &pkt2, EGRESS_WIDE, first);
    assert_eq!(r.addr, addr_bytes(ip(POD)).0);
}

#[test]
fn exhaustion_drops_and_counts_never_translating_wrongly() {
    if !require_root("exhaustion_drops_and_counts_never_translating_wrongly") {
        return;
    }
    let mut small = settings();
    small.port_min = 30000;
    small.port_max = 30001;
    let nat = Nat::new(small).unwrap();
    let a = Pkt::udp(POD, 1000, REMOTE, 53);
    let b = Pkt::udp(POD, 1001, REMOTE, 53);
    let c = Pkt::udp(POD, 1002, REMOTE, 53);
    let pa = check_frame(&nat.snat(&a.frame()).1).sport();
    let pb = check_frame(&nat.snat(&b.frame()).1).sport();
    let mut got = [pa, pb];
    got.sort();
    assert_eq!(got, [30000, 30001], "both ports used, each once");

    let frame = c.frame();
    let (verdict, _) = nat.snat(&frame);
    assert_eq!(verdict, TC_ACT_SHOT, "no port left: dropped");
    assert!(nat.entry(&c.key()).is_none());
    let reasons = nat.reasons();
    assert_eq!(reasons.get("nat_exhausted_drop"), Some(&(1, frame.len() as u64)));
    let counters = nat.counters(WIDE);
    assert_eq!((counters.new_flows, counters.nat_failures), (2, 1));

    // Established flows keep working, and another destination still has both ports.
    assert_eq!(check_frame(&nat.snat(&a.frame()).1).sport(), pa);
    let d = Pkt::udp(POD, 1002, "198.51.100.8", 53);
    assert_eq!(nat.snat(&d.frame()).0, TC_ACT_OK);

    // An empty range allocates nothing.
    let mut none = settings();
    none.port_min = 0;
    none.port_max = 0;
    let nat = Nat::new(none).unwrap();
    assert_eq!(nat.snat(&a.frame()).0, TC_ACT_SHOT);
}

#[test]
fn fin_and_rst_move_both_entries_to_the_closing_timeout() {
    if !require_root("fin_and_rst_move_both_entries_to_the_closing_timeout") {
        return;
    }
    let mut nat = Nat::new(settings()).unwrap();
    // FIN from the pod.
    let syn = Pkt::tcp(POD, 40000, REMOTE, 443, TCP_SYN);
    let port = assert_snat(&nat, &syn, EGRESS_WIDE);
    let syn_ack = Pkt::tcp(REMOTE, 443, EGRESS_WIDE, port, TCP_SYN | TCP_ACK);
    nat.rnat(&syn_ack.frame());
    assert_eq!(
        flow_entries(&nat, &syn, EGRESS_WIDE, port).0.state,
        NAT_TCP_ESTABLISHED
    );
    assert_snat(
        &nat,
        &Pkt::tcp(POD, 40000, REMOTE, 443, TCP_FIN | TCP_ACK),
        EGRESS_WIDE,
    );
    let (o, _) = flow_entries(&nat, &syn, EGRESS_WIDE, port);
    assert_eq!((o.state, timeout_ns(&o)), (NAT_TCP_CLOSING, 10 * S));
    // The last ACK still goes through while closing.
    let last = Pkt::tcp(REMOTE, 443, EGRESS_WIDE, port, TCP_FIN | TCP_ACK);
    let (_, out) = nat.rnat(&last.frame());
    assert_eq!(out, last.with(REMOTE, 443, POD, 40000).frame());

    // RST from the remote side.
    let syn2 = Pkt::tcp(POD, 40002, REMOTE, 443, TCP_SYN);
    let port2 = assert_snat(&nat, &syn2, EGRESS_WIDE);
    let rst = Pkt::tcp(REMOTE, 443, EGRESS_WIDE, port2, TCP_RST | TCP_ACK);
    let (_, out) = nat.rnat(&rst.frame());
    assert_eq!(out, rst.with(REMOTE, 443, POD, 40002).frame());
    let (o, _) = flow_entries(&nat, &syn2, EGRESS_WIDE, port2);
    assert_eq!((o.state, timeout_ns(&o)), (NAT_TCP_CLOSING, 10 * S));

    // Past the timeout the mapping is gone for replies and made anew by the pod's next SYN,
    // on the same (deterministic) port.
    for key in [syn2.key(), rst.key()] {
        let mut e = nat.entry(&key).unwrap();
        e.expires_ns = monotonic_ns() - S;
        nat.put_entry(key, e);
    }
    let late = Pkt::tcp(REMOTE, 443, EGRESS_WIDE, port2, TCP_ACK).frame();
    assert_eq!(nat.rnat(&late), (TC_ACT_OK, late.clone()), "expired: untouched");
    assert_eq!(nat.reasons().get("rnat_miss_pass"), Some(&(1, late.len() as u64)));
    assert_eq!(assert_snat(&nat, &syn2, EGRESS_WIDE), port2);
    let (o, _) = flow_entries(&nat, &syn2, EGRESS_WIDE, port2);
    assert_eq!(o.state, NAT_TCP_SYN_SENT);
    assert_eq!(nat.counters(WIDE).new_flows, 3);
}

#[test]
fn a_lost_half_is_rebuilt_on_the_same_port() {
    if !require_root("a_lost_half_is_rebuilt_on_the_same_port") {
        return;
    }
    let mut nat = Nat::new(settings()).unwrap();
    let pkt = Pkt::udp(POD, 5353, REMOTE, 53);
    let port = assert_snat(&nat, &pkt, EGRESS_WIDE);
    // The ORIGINAL half evicted: the next packet maps again and finds its own REPLY half.
    nat.table.remove(&pkt.key()).unwrap();
    assert_eq!(assert_snat(&nat, &pkt, EGRESS_WIDE), port);
    flow_entries(&nat, &pkt, EGRESS_WIDE, port);

    // The REPLY half evicted: the next refresh of the ORIGINAL half finds it missing and
    // drops the ORIGINAL half too, so that the flow maps again rather than half-working.
    let reply = pkt.reply(L4::Udp).with(REMOTE, 53, EGRESS_WIDE, port);
    nat.table.remove(&reply.key()).unwrap();
    let mut o = nat.entry(&pkt.key()).unwrap();
    o.last_seen_ns -= 2 * S; // due for a refresh
    nat.put_entry(pkt.key(), o);
    assert_eq!(assert_snat(&nat, &pkt, EGRESS_WIDE), port);
    assert!(nat.entry(&pkt.key()).is_none());
    assert_eq!(assert_snat(&nat, &pkt, EGRESS_WIDE), port);
    flow_entries(&nat, &pkt, EGRESS_WIDE, port);

    // The REPLY key now holds another pod's flow: the same, and the flow moves to a new port.
    let foreign = NatEntry {
        addr: addr_bytes(ip(POD_OTHER)).0,
        created_ns: monotonic_ns(),
        last_seen_ns: monotonic_ns(),
        expires_ns: monotonic_ns() + 3600 * S,
        policy_id: WIDE,
        port: 41000u16.to_be(),
        state: NAT_OPEN,
        dir: NAT_DIR_REPLY,
    };
    nat.put_entry(reply.key(), foreign);
    let mut o = nat.entry(&pkt.key()).unwrap();
    o.last_seen_ns -= 2 * S;
    nat.put_entry(pkt.key(), o);
    assert_eq!(assert_snat(&nat, &pkt, EGRESS_WIDE), port);
    assert!(nat.entry(&pkt.key()).is_none());
    assert_eq!(nat.entry(&reply.key()), Some(foreign));
    let moved = assert_snat(&nat, &pkt, EGRESS_WIDE);
    assert_ne!(moved, port);
    flow_entries(&nat, &pkt, EGRESS_WIDE, moved);
}

#[test]
fn icmp_errors_quoting_translated_packets_are_translated_back() {
    if !require_root("icmp_errors_quoting_translated_packets_are_translated_back") {
        return;
    }
    let nat = Nat::new(settings()).unwrap();
    let cases: [(Pkt, &str, &str, &str); 6] = [
        (Pkt::udp(POD, 5353, REMOTE, 53), EGRESS_WIDE, ROUTER, POD),
        (
            Pkt::tcp(POD, 40000, REMOTE, 443, TCP_SYN),
            EGRESS_WIDE,
            ROUTER,
            POD,
        ),
        (Pkt::echo(POD, REMOTE, 0x0abc, false), EGRESS_WIDE, ROUTER, POD),
        (Pkt::udp(POD6, 5353, REMOTE6, 53), EGRESS_V6, ROUTER6, POD6),
        (
            Pkt::tcp(POD6, 40000, REMOTE6, 443, TCP_SYN),
            EGRESS_V6,
            ROUTER6,
            POD6,
        ),
        (Pkt::echo(POD6, REMOTE6, 0x0abc, false), EGRESS_V6, ROUTER6, POD6),
    ];
    let mut count = 0;
    for (pkt, egress, router, pod) in cases {
        let (_, sent) = nat.snat(&pkt.frame());
        let sent_ip = &sent[14..];
        // A full quote (every checksum inside can be verified) and the RFC 792 minimum of
        // IP header + 8 bytes (the TCP checksum is not in it).
        let hlen = if pkt.is_v4() { 20 } else { 40 };
        for quote_len in [sent_ip.len(), hlen + 8] {
            let err = icmp_error(router, egress, &sent_ip[..quote_len]);
            let (verdict, out) = nat.rnat(&err);
            assert_eq!(verdict, TC_ACT_OK);
            let outer = check_frame(&out);
            assert_eq!((outer.src, outer.dst), (ip(router), ip(pod)));
            let quoted = &outer.l4[8..];
            let inner = check_ip(quoted, quote_len == sent_ip.len());
            assert_eq!((inner.src, inner.dst), (ip(pod), pkt.dst));
            // Byte for byte the pod's own packet, as an error sent to the pod would quote it.
            let expected = icmp_error(router, pod, &pkt.ip_packet()[..quote_len]);
            assert_eq!(out, expected, "{:?}, quote of {quote_len}", pkt.l4);
            count += 1;
        }
    }
    let c = nat.counters(WIDE).packets_in + nat.counters(V6).packets_in;
    assert_eq!(c, count);

    // An error quoting a flow the gateway does not know passes untouched, counted.
    let unknown = Pkt::udp(EGRESS_WIDE, 29999, REMOTE, 53).ip_packet();
    let err = icmp_error(ROUTER, EGRESS_WIDE, &unknown);
    assert_eq!(nat.rnat(&err), (TC_ACT_OK, err.clone()));
    assert_eq!(nat.reasons().get("rnat_miss_pass").map(|r| r.0), Some(1));

    // A pod's own error about a reply it received (say, port unreachable for a late answer)
    // leaves from the egress address, quoting the reply as it reached the gateway.
    let out_before = nat.counters(WIDE).packets_out + nat.counters(V6).packets_out;
    let mut sent = 0;
    for (pod, remote, egress) in [(POD, REMOTE, EGRESS_WIDE), (POD6, REMOTE6, EGRESS_V6)] {
        let flow = Pkt::udp(pod, 5353, remote, 53);
        let port = u16::from_be(nat.entry(&flow.key()).expect("flow mapped above").port);
        let at_gateway = flow.reply(L4::Udp).with(remote, 53, egress, port);
        let at_pod = at_gateway.with(remote, 53, pod, 5353);
        let hlen = if flow.is_v4() { 20 } else { 40 };
        for quote_len in [at_pod.ip_packet().len(), hlen + 8] {
            let err = icmp_error(pod, remote, &at_pod.ip_packet()[..quote_len]);
            let (verdict, out) = nat.snat(&err);
            assert_eq!(verdict, TC_ACT_OK);
            check_frame(&out);
            let expected = icmp_error(egress, remote, &at_gateway.ip_packet()[..quote_len]);
            assert_eq!(out, expected, "pod's error, quote of {quote_len}");
            sent += 1;
        }
    }
    let out_after = nat.counters(WIDE).packets_out + nat.counters(V6).packets_out;
    assert_eq!(out_after - out_before, sent);
    // About a flow it does not have: an untranslatable packet of a selected pod.
    let stray = Pkt::udp(REMOTE, 53, POD, 999).ip_packet();
    let err = icmp_error(POD, REMOTE, &stray);
    assert_eq!(nat.snat(&err), (TC_ACT_OK, err.clone()));
    assert_eq!(nat.reasons().get("egress_unsupported_pass").map(|r| r.0), Some(1));
}

#[test]
fn a_zero_udp_checksum_stays_zero() {
    if !require_root("a_zero_udp_checksum_stays_zero") {
        return;
    }
    let nat = Nat::new(settings()).unwrap();
    let pkt = Pkt::new(POD, 5353, REMOTE, 53, L4::UdpNoChecksum);
    let port = assert_snat(&nat, &pkt, EGRESS_WIDE);
    let (_, out) = nat.snat(&pkt.frame());
    assert_eq!(&out[14 + 20 + 6..14 + 20 + 8], &[0, 0]);
    let back = pkt.reply(L4::UdpNoChecksum).with(REMOTE, 53, EGRESS_WIDE, port);
    let (_, out) = nat.rnat(&back.frame());
    assert_eq!(out, back.with(REMOTE, 53, POD, 5353).frame());
    assert_eq!(&out[14 + 20 + 6..14 + 20 + 8], &[0, 0]);

    // A checksum that computes to zero is sent as all ones (RFC 768) after each translation:
    // SNAT, reverse NAT, and the quote of an ICMP error.
    let mut out_zero = Pkt::udp(POD, 6000, REMOTE, 53);
    let port = first_choice(&out_zero, PORT_MIN, PORT_MAX);
    out_zero.payload = zero_sum(out_zero.with(EGRESS_WIDE, port, REMOTE, 53)).payload;
    assert_eq!(assert_snat(&nat, &out_zero, EGRESS_WIDE), port);
    assert_eq!(
        &nat.snat(&out_zero.frame()).1[14 + 20 + 6..14 + 20 + 8],
        &[0xff, 0xff]
    );

    let back_zero = zero_sum(out_zero.reply(L4::Udp));
    let mut back = back_zero.with(REMOTE, 53, EGRESS_WIDE, port);
    back.payload = back_zero.payload.clone();
    let (_, out) = nat.rnat(&back.frame());
    assert_eq!(out, back_zero.frame());

    let quoted_zero = zero_sum(Pkt::udp(POD, 6001, REMOTE, 53));
    let (_, sent) = nat.snat(&quoted_zero.frame());
    let (_, out) = nat.rnat(&icmp_error(ROUTER, EGRESS_WIDE, &sent[14..]));
    assert_eq!(out, icmp_error(ROUTER, POD, &quoted_zero.ip_packet()));
}

/// `p` (UDP) with its first two payload bytes chosen so that its checksum computes to zero,
/// which is sent as 0xffff.
fn zero_sum(mut p: Pkt) -> Pkt {
    p.payload[..2].copy_from_slice(&[0, 0]);
    let seg = p.segment();
    p.payload[..2].copy_from_slice(&seg[6..8]);
    assert_eq!(p.segment()[6..8], [0xff, 0xff]);
    p
}

#[test]
fn later_fragments_get_the_egress_address_and_unsupported_protocols_are_counted() {
    if !require_root("later_fragments_get_the_egress_address_and_unsupported_protocols_are_counted") {
        return;
    }
    let nat = Nat::new(settings()).unwrap();
    for (pod, remote, egress) in [(POD, REMOTE, EGRESS_WIDE), (POD6, REMOTE6, EGRESS_V6)] {
        // The first fragment carries the ports and goes through the conntrack...
        let mut first = Pkt::udp(pod, 5353, remote, 53);
        first.more_fragments = true;
        let port = assert_snat(&nat, &first, egress);
        // ...its L4 checksum covers the whole datagram, so only the header sum is checkable.
        let mut later = Pkt::udp(pod, 5353, remote, 53);
        later.frag_offset = 4;
        let (verdict, out) = nat.snat(&later.frame());
        assert_eq!(verdict, TC_ACT_OK);
        check_frame(&out);
        assert_eq!(out, later.with(egress, 5353, remote, 53).frame());
        // The reply's later fragments carry no port to find the pod by: passed, counted.
        let mut back = Pkt::udp(remote, 53, egress, port);
        back.frag_offset = 4;
        let frame = back.frame();
        assert_eq!(nat.rnat(&frame), (TC_ACT_OK, frame.clone()));
    }
    assert_eq!(nat.reasons().get("rnat_miss_pass").map(|r| r.0), Some(2));

    // GRE, or an echo reply, from a selected pod toward a policy destination: nothing the
    // gateway can translate (it only translates flows the pods open), counted.
    let gre = Pkt::new(POD, 0, REMOTE, 0, L4::Raw(47)).frame();
    assert_eq!(nat.snat(&gre), (TC_ACT_OK, gre.clone()));
    let pong = Pkt::echo(POD, REMOTE, 1, true).frame();
    assert_eq!(nat.snat(&pong), (TC_ACT_OK, pong.clone()));
    assert_eq!(
        nat.reasons().get("egress_unsupported_pass"),
        Some(&(2, (gre.len() + pong.len()) as u64))
    );
    // From an unselected pod it is none of the gateway's business.
    let gre = Pkt::new(POD_UNSELECTED, 0, REMOTE, 0, L4::Raw(47)).frame();
    assert_eq!(nat.snat(&gre), (TC_ACT_OK, gre.clone()));
    assert_eq!(nat.reasons().get("egress_unsupported_pass").map(|r| r.0), Some(2));
}

#[test]
fn malformed_and_truncated_packets_pass_untouched() {
    if !require_root("malformed_and_truncated_packets_pass_untouched") {
        return;
    }
    let mut nat = Nat::new(settings()).unwrap();
    let tcp = Pkt::tcp(POD, 40000, REMOTE, 443, TCP_SYN).frame();
    let udp = Pkt::udp(POD, 5353, REMOTE, 53).frame();
    let echo = Pkt::echo(POD, REMOTE, 9, false).frame();
    let tcp6 = Pkt::tcp(POD6, 40000, REMOTE6, 443, TCP_SYN).frame();
    let mutate = |f: &[u8], edit: &dyn Fn(&mut Vec<u8>)| {
        let mut f = f.to_vec();
        edit(&mut f);
        f
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("IHL beyond the packet", {
            let mut f = tcp[..14 + 20].to_vec();
            f[14] = 0x4f;
            f[16..18].copy_from_slice(&20u16.to_be_bytes());
            f
        }),
        ("IHL below 5", mutate(&tcp, &|f| f[14] = 0x44)),
        ("version 6 in an IPv4 frame", mutate(&tcp, &|f| f[14] = 0x65)),
        (
            "total length beyond the frame",
            mutate(&tcp, &|f| f[16..18].copy_from_slice(&200u16.to_be_bytes())),
        ),
        (
            "total length below the header",
            mutate(&tcp, &|f| f[16..18].copy_from_slice(&12u16.to_be_bytes())),
        ),
        ("TCP header cut", {
            let mut f = tcp[..14 + 20 + 10].to_vec();
            f[16..18].copy_from_slice(&30u16.to_be_bytes());
            f
        }),
        ("UDP header cut", {
            let mut f = udp[..14 + 20 + 4].to_vec();
            f[16..18].copy_from_slice(&24u16.to_be_bytes());
            f
        }),
        ("ICMP header cut", {
            let mut f = echo[..14 + 20 + 4].to_vec();
            f[16..18].copy_from_slice(&24u16.to_be_bytes());
            f
        }),
        ("IPv6 header alone, payload length 0", {
            let mut f = tcp6[..14 + 40].to_vec();
            f[18..20].copy_from_slice(&0u16.to_be_bytes());
            f
        }),
        (
            "IPv6 payload length beyond the frame",
            mutate(&tcp6, &|f| f[18..20].copy_from_slice(&500u16.to_be_bytes())),
        ),
        ("IPv6 TCP header cut", {
            let mut f = tcp6[..14 + 40 + 8].to_vec();
            f[18..20].copy_from_slice(&8u16.to_be_bytes());
            f
        }),
    ];
    for (what, frame) in &cases {
        for (dir, (verdict, out)) in [("snat", nat.snat(frame)), ("rnat", nat.rnat(frame))] {
            assert_eq!(verdict, TC_ACT_OK, "{what} ({dir})");
            assert_eq!(&out, frame, "{what} ({dir}): untouched");
        }
    }
    let malformed = nat.reasons().get("malformed_pass").map(|r| r.0);
    assert_eq!(malformed, Some(2 * cases.len() as u64));
    assert!(nat.entries().is_empty());

    // ICMP errors with a cut or nonsensical quote.
    nat.clear_reasons();
    let sent = nat.snat(&Pkt::udp(POD, 5353, REMOTE, 53).frame()).1;
    let quote = &sent[14..];
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "quote cut inside the IP header",
            icmp_error(ROUTER, EGRESS_WIDE, &quote[..12]),
        ),
        (
            "quote without its ports",
            icmp_error(ROUTER, EGRESS_WIDE, &quote[..22]),
        ),
        (
            "quoted IHL below 5",
            icmp_error(ROUTER, EGRESS_WIDE, &mutate(quote, &|q| q[0] = 0x43)),
        ),
    ];
    for (what, frame) in &cases {
        assert_eq!(nat.rnat(frame), (TC_ACT_OK, frame.clone()), "{what}");
    }
    assert_eq!(nat.reasons().get("malformed_pass").map(|r| r.0), Some(3));
}
