//! The egress NAT programs (`xdp/egress.c`) as their tests (`tests/egress_program.rs`) and the
//! benchmark (`benches/egress.rs`) run them: the object loaded on a scratch bpffs directory,
//! policies programmed through typed maps, checks of the frames the programs leave (packets
//! from [`super::packet`]), and the datapath's port choice computed in userspace.

use super::hash::{flow_hash_seeded, jhash_3words};
use super::packet::*;
use super::ScratchPins;
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
    EGRESS_SRC_PREFIX_BITS, NAT_DIR_ORIGINAL, NAT_DIR_REPLY, NAT_SEED, REASON_NAMES,
};
use ipnet::IpNet;
use std::collections::BTreeMap;

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;

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
// The datapath's port choice, computed here (lookup3 as the kernel's jhash, see lib/hash.h).
// ---------------------------------------------------------------------------------------------

/// The `i`th port the datapath tries for a flow.
pub fn choice(pkt: &Pkt, i: u32, min: u16, max: u16) -> u16 {
    let range = u32::from(max - min) + 1;
    let h = flow_hash_seeded(&pkt.flow_key(), NAT_SEED);
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
    .flow_key()
}

/// The two NAT entries of a translated flow: (ORIGINAL, REPLY), with their keys' relation and
/// shared fields checked.
pub fn flow_entries(nat: &Nat, pkt: &Pkt, egress: &str, port: u16) -> (NatEntry, NatEntry) {
    let o = nat.entry(&pkt.flow_key()).expect("ORIGINAL entry");
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
