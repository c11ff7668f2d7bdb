//! The load balancer (`xdp/lb.c`) as the tests and the benchmark run it: the datapath loaded
//! exactly as the daemon loads it, services programmed through the real planner, a network
//! namespace that `bpf_fib_lookup` can resolve backends in, BPF_PROG_TEST_RUN, and tables of
//! cases (Katran's `lib/testing` style): each row a packet, the verdict and output it must
//! produce, the reason it must count, and one line of description.

use super::hash::flow_hash;
use super::packet::*;
use super::ScratchPins;
use anyhow::{Context, Result};
use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use gatewayd::datapath::{Capacities, Datapath};
use gatewayd::lb::maps::{self as lb_maps, LbMaps};
use gatewayd::lb::plan::{LbOp, LbParams, Programmed};
use gatewayd::model::{Backend, BackendState, Encapsulation, Protocol, Service, ServiceKey};
use gatewayd_common::maps::{FlowKey, LbFlow, ReasonCounters, TrafficCounters, REASON_NAMES};
use gatewayd_integration::Netns;
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

// ---------------------------------------------------------------------------------------------
// Network namespace with the gateway's interfaces, routes and neighbours.
// ---------------------------------------------------------------------------------------------

/// Gateway interface that receives client traffic; backends on its subnet are reached back
/// out of it (XDP_TX).
/// Its MAC is GATEWAY_MAC, the router's end ROUTER_MAC ([`super::packet`]).
pub const UPLINK: &str = "gd0";
/// Second interface: backends behind it are reached with bpf_redirect (XDP_REDIRECT).
pub const SIDE: &str = "gd1";
pub const SIDE_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 0x01];

/// The gateway's own addresses, used as the outer source of encapsulated packets.
pub const GW4: &str = "10.0.0.1";
pub const GW6: &str = "fd00::1";

/// Backends 10.0.0.10-99 / fd00::10-99 (hex last group) on the uplink, with permanent
/// neighbour entries; 10.1.0.10-19 / fd00:1::10-19 on the side interface.
pub fn uplink_backend4(n: u8) -> IpAddr {
    assert!((10..100).contains(&n));
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))
}
pub fn uplink_backend6(n: u8) -> IpAddr {
    assert!((10..100).contains(&n));
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, n as u16))
}
pub fn side_backend4(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 1, 0, n))
}
pub fn side_backend6(n: u8) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, n as u16))
}
/// On the uplink's subnet but with no neighbour entry: the FIB lookup answers NO_NEIGH.
pub const UNRESOLVED4: &str = "10.0.0.200";
pub const UNRESOLVED6: &str = "fd00::200";
/// No route at all (the namespace has no default route).
pub const UNROUTED4: &str = "10.9.0.1";
pub const UNROUTED6: &str = "fd00:9::1";

/// The MAC the namespace's neighbour table gives a backend address.
pub fn neigh_mac(addr: IpAddr) -> [u8; 6] {
    match addr {
        IpAddr::V4(a) => [0x02, 0, 0, 0x44, a.octets()[2], a.octets()[3]],
        IpAddr::V6(a) => [0x02, 0, 0, 0x66, a.octets()[3], a.octets()[15]],
    }
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// A network namespace laid out as a gateway: two veth pairs (uplink and side), addresses,
/// forwarding on (bpf_fib_lookup refuses to answer otherwise), permanent neighbours for the
/// backends. Deleted on drop.
pub struct Topology {
    pub netns: Netns,
    pub uplink_ifindex: u32,
    pub side_ifindex: u32,
}

impl Topology {
    pub fn new() -> Result<Self> {
        // From here on, drop deletes the namespace even if the setup below fails.
        let netns = Netns::new("gdlb")?;
        let mut batch = String::new();
        let mut cmd = |s: String| {
            batch.push_str(&s);
            batch.push('\n');
        };
        cmd(format!(
            "link add {UPLINK} address {} type veth peer name {UPLINK}p address {}",
            mac_str(GATEWAY_MAC),
            mac_str(ROUTER_MAC)
        ));
        cmd(format!(
            "link add {SIDE} address {} type veth peer name {SIDE}p",
            mac_str(SIDE_MAC)
        ));
        cmd(format!("addr add {GW4}/24 dev {UPLINK}"));
        cmd(format!("addr add {GW6}/64 dev {UPLINK} nodad"));
        cmd(format!("addr add 10.1.0.1/24 dev {SIDE}"));
        cmd(format!("addr add fd00:1::1/64 dev {SIDE} nodad"));
        for dev in [UPLINK, SIDE] {
            cmd(format!("link set {dev} up"));
            cmd(format!("link set {dev}p up"));
        }
        for n in 10..100u8 {
            for addr in [uplink_backend4(n), uplink_backend6(n)] {
                cmd(format!(
                    "neigh add {addr} lladdr {} dev {UPLINK} nud permanent",
                    mac_str(neigh_mac(addr))
                ));
            }
        }
        for n in 10..20u8 {
            for addr in [side_backend4(n), side_backend6(n)] {
                cmd(format!(
                    "neigh add {addr} lladdr {} dev {SIDE} nud permanent",
                    mac_str(neigh_mac(addr))
                ));
            }
        }
        netns.ip_batch(&batch)?;
        netns.sysctl("net.ipv4.conf.all.forwarding", "1")?;
        netns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        let (uplink_ifindex, side_ifindex) = netns.run_in(|| {
            Ok((
                nix::net::if_::if_nametoindex(UPLINK)?,
                nix::net::if_::if_nametoindex(SIDE)?,
            ))
        })?;
        Ok(Topology {
            netns,
            uplink_ifindex,
            side_ifindex,
        })
    }

    /// Runs `f` on a thread that joined the namespace: bpf_fib_lookup, and the ingress ifindex
    /// of a test run, are resolved in the network namespace of the calling thread.
    pub fn enter<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R> {
        self.netns.run_in(|| Ok(f()))
    }

    /// One packet through the program as received on the uplink.
    pub fn run(&self, program: &Xdp, frame: &[u8]) -> Result<Outcome> {
        self.enter(|| test_run(program, self.uplink_ifindex, frame))?
    }
}

/// The verdict of one run and the packet as the program left it.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub action: u32,
    pub data: Vec<u8>,
    /// Kernel-measured run time (ns) of this one run.
    pub duration_ns: u64,
}

/// `struct xdp_md` as BPF_PROG_TEST_RUN takes it in ctx_in: data offsets, the ingress
/// interface (looked up in the caller's namespace), queue 0.
pub fn xdp_md(ifindex: u32, len: usize) -> [u8; 24] {
    let fields = [0u32, len as u32, 0, ifindex, 0, 0];
    let mut out = [0u8; 24];
    for (i, f) in fields.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&f.to_ne_bytes());
    }
    out
}

/// One BPF_PROG_TEST_RUN of `frame` repeated `repeat` times, output into `out`: returns the
/// verdict, the output length and the kernel-measured time per run (ns). With repeat > 1 the
/// kernel does NOT restore the packet between runs: a program that rewrites it sees its own
/// output from the second run on.
pub fn test_run_into(
    program: &Xdp,
    ctx: &[u8],
    frame: &[u8],
    repeat: u32,
    out: &mut [u8],
) -> Result<(u32, usize, u64)> {
    let r = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(out),
            ctx_in: Some(ctx),
            repeat,
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    Ok((
        r.return_value,
        r.data_size_out as usize,
        r.duration.as_nanos() as u64,
    ))
}

/// One BPF_PROG_TEST_RUN with repeat = 1: the program sees a fresh copy of `frame`.
pub fn test_run(program: &Xdp, ifindex: u32, frame: &[u8]) -> Result<Outcome> {
    let ctx = xdp_md(ifindex, frame.len());
    let mut out = vec![0u8; 4096];
    let (action, len, duration_ns) = test_run_into(program, &ctx, frame, 1, &mut out)?;
    out.truncate(len);
    Ok(Outcome {
        action,
        data: out,
        duration_ns,
    })
}

// ---------------------------------------------------------------------------------------------
// The datapath as the daemon loads and programs it.
// ---------------------------------------------------------------------------------------------

pub fn test_capacities() -> Capacities {
    Capacities {
        max_services: 64,
        max_backends: 256,
        flow_table_size: 4096,
        // The egress NAT table is not used here: its minimum.
        nat_table_size: 1024,
    }
}

pub const TEST_PARAMS: LbParams = LbParams {
    table_size: 251,
    seed: 7,
    max_services: 64,
    max_backends: 256,
};

/// The loaded datapath, its maps, and what the planner has programmed into them.
/// Field order is drop order: map handles and program first, the pins last.
pub struct Balancer {
    pub lb: LbMaps,
    pub datapath: Datapath,
    /// Read-write handle on the connection table (the daemon only reads it).
    pub flows: BpfHashMap<MapData, FlowKey, LbFlow>,
    pub programmed: Programmed,
    pub params: LbParams,
    /// The Maglev table last written for each service id, as backend ids.
    pub tables: BTreeMap<u32, Vec<u32>>,
    /// Backend id -> address, over every service.
    pub backend_addrs: std::collections::HashMap<u32, IpAddr>,
    pub pins: ScratchPins,
}

impl Balancer {
    pub fn new(capacities: &Capacities, params: LbParams) -> Result<Self> {
        let pins = ScratchPins::new();
        let mut datapath = Datapath::open(&pins.path, capacities)?;
        let maps_dir = datapath.pins().maps();
        let mut lb = LbMaps::new(datapath.ebpf_mut(), &maps_dir)?;
        lb.set_settings(&lb_maps::lb_settings(
            Some(format!("{GW4}/32").parse()?),
            Some(format!("{GW6}/128").parse()?),
        ))?;
        let flows_pin = maps_dir.join("gd_lb_flows");
        let flows = BpfHashMap::try_from(aya::maps::Map::from_map_data(MapData::from_pin(&flows_pin)?)?)?;
        Ok(Balancer {
            lb,
            datapath,
            flows,
            programmed: Programmed::default(),
            params,
            tables: BTreeMap::new(),
            backend_addrs: Default::default(),
            pins,
        })
    }

    pub fn program(&self) -> &Xdp {
        self.datapath.program()
    }

    /// Makes the maps serve exactly `services`, through the planner as the daemon does.
    pub fn serve(&mut self, services: &[Service]) -> Result<Vec<LbOp>> {
        let (ops, next) = self.plan(services)?;
        self.lb.apply(&ops)?;
        self.record(&ops, next);
        Ok(ops)
    }

    /// The planner's operations toward `services`, and the state after them.
    pub fn plan(&self, services: &[Service]) -> Result<(Vec<LbOp>, Programmed)> {
        let desired: BTreeMap<ServiceKey, std::sync::Arc<Service>> = services
            .iter()
            .map(|s| (s.key, std::sync::Arc::new(s.clone())))
            .collect();
        let plan = self.programmed.plan(&desired, &self.params)?;
        Ok((plan.ops, plan.next))
    }

    /// Takes note of operations applied and the state they led to.
    pub fn record(&mut self, ops: &[LbOp], next: Programmed) {
        for op in ops {
            match op {
                LbOp::PutMaglev { service_id, table } => {
                    self.tables.insert(*service_id, table.build());
                }
                LbOp::DeleteMaglev { service_id } => {
                    self.tables.remove(service_id);
                }
                _ => {}
            }
        }
        self.programmed = next;
        self.backend_addrs = self
            .programmed
            .services
            .values()
            .flat_map(|s| s.backends.iter().map(|(a, b)| (b.backend_id, *a)))
            .collect();
    }

    pub fn set_sources(&mut self, v4: Option<&str>, v6: Option<&str>) -> Result<()> {
        let parse = |s: Option<&str>| -> Result<Option<IpNet>> {
            Ok(match s {
                Some(s) => Some(s.parse()?),
                None => None,
            })
        };
        self.lb
            .set_settings(&lb_maps::lb_settings(parse(v4)?, parse(v6)?))?;
        Ok(())
    }

    pub fn service_id(&self, key: &ServiceKey) -> u32 {
        self.programmed.services[key].service_id
    }

    pub fn backend_id(&self, key: &ServiceKey, addr: IpAddr) -> u32 {
        self.programmed.services[key].backends[&addr].backend_id
    }

    /// The backend address behind an id.
    pub fn backend_addr(&self, backend_id: u32) -> Option<IpAddr> {
        self.backend_addrs.get(&backend_id).copied()
    }

    /// The backend id Maglev gives a new flow of service `service_id` (None: empty table).
    pub fn maglev_pick_id(&self, service_id: u32, flow: &FlowKey) -> Option<u32> {
        let table = self.tables.get(&service_id)?;
        if table.is_empty() {
            return None;
        }
        Some(table[(flow_hash(flow) % table.len() as u32) as usize])
    }

    /// Where Maglev sends a new flow of `flow` (None when the table is empty).
    pub fn maglev_pick(&self, service: &ServiceKey, flow: &FlowKey) -> Option<IpAddr> {
        let id = self.maglev_pick_id(self.service_id(service), flow)?;
        self.backend_addr(id)
    }

    /// Reason counters by name, only those that are not zero.
    pub fn reasons(&self) -> Result<BTreeMap<&'static str, ReasonCounters>> {
        Ok(self
            .lb
            .counters()
            .reasons()?
            .into_iter()
            .zip(REASON_NAMES)
            .filter(|(c, _)| c.packets != 0 || c.bytes != 0)
            .map(|(c, n)| (n, c))
            .collect())
    }

    pub fn service_traffic(&self, key: &ServiceKey) -> Result<TrafficCounters> {
        self.lb.counters().service_traffic(self.service_id(key))
    }

    pub fn backend_traffic(&self, key: &ServiceKey, addr: IpAddr) -> Result<TrafficCounters> {
        self.lb.counters().backend_traffic(self.backend_id(key, addr))
    }

    pub fn flow(&self, key: &FlowKey) -> Option<LbFlow> {
        self.flows.get(key, 0).ok()
    }

    /// Another read-write handle on the connection table, for a user that only holds `&self`.
    pub fn open_flows(&self) -> Result<BpfHashMap<MapData, FlowKey, LbFlow>> {
        let pin = self.datapath.pins().maps().join("gd_lb_flows");
        Ok(BpfHashMap::try_from(aya::maps::Map::from_map_data(
            MapData::from_pin(&pin)?,
        )?)?)
    }

    pub fn forget_flow(&mut self, key: &FlowKey) -> Result<()> {
        self.flows.remove(key)?;
        Ok(())
    }

    pub fn flow_count(&self) -> usize {
        self.flows.keys().filter(|k| k.is_ok()).count()
    }
}

/// A service as the config would describe it: IPIP, no ranges, no affinity.
pub fn service(vip: &str, port: u16, protocol: Protocol, backends: &[(IpAddr, BackendState)]) -> Service {
    let vip: IpAddr = vip.parse().expect("vip");
    Service {
        name: format!("{vip}:{port}/{protocol}"),
        key: ServiceKey { vip, port, protocol },
        source_ranges: vec![],
        affinity_timeout: None,
        encapsulation: Encapsulation::Ipip,
        backends: backends
            .iter()
            .map(|(address, state)| Backend {
                address: *address,
                weight: 1,
                state: *state,
            })
            .collect(),
    }
}

pub fn active(addrs: &[IpAddr]) -> Vec<(IpAddr, BackendState)> {
    addrs.iter().map(|a| (*a, BackendState::Active)).collect()
}

// ---------------------------------------------------------------------------------------------
// Checking the program's output.
// ---------------------------------------------------------------------------------------------

/// What an encapsulated packet must look like.
pub struct Encap {
    pub action: u32,
    pub outer_src: IpAddr,
    pub gue_port: Option<u16>,
}

impl Encap {
    pub fn ipip(action: u32, backend: IpAddr) -> Encap {
        Encap {
            action,
            outer_src: gateway_source(backend),
            gue_port: None,
        }
    }
}

pub fn gateway_source(backend: IpAddr) -> IpAddr {
    if backend.is_ipv4() {
        GW4.parse().unwrap()
    } else {
        GW6.parse().unwrap()
    }
}

/// Checks every byte of an encapsulated packet against the input and returns the backend it
/// was sent to (the outer destination):
/// - L2: toward the neighbour's MAC from the egress interface's MAC when transmitted or
///   redirected; the received addresses untouched when passed to the stack; tags as received;
///   the innermost ethertype announcing the outer family.
/// - outer IPv4: 20-byte header, TOS copied, total length, DF, TTL 64, protocol 4/41 (or 17
///   for GUE), valid header checksum; outer IPv6: traffic class copied, flow label from the
///   flow hash, payload length, next header, hop limit 64.
/// - GUE: source port from the flow hash in 49152-65535, the service's port, UDP length, and a
///   checksum that is zero over IPv4 and valid over IPv6.
/// - inner: the client's IP packet byte for byte, and nothing after it.
pub fn assert_encapsulated(out: &Outcome, pkt: &Pkt, e: &Encap) -> IpAddr {
    assert_eq!(
        out.action, e.action,
        "verdict (0 aborted 1 drop 2 pass 3 tx 4 redirect)"
    );
    let f = &out.data;
    let eth = parse_eth(f);
    let inner = pkt.ip_packet();
    let hash = flow_hash(&pkt.flow_key());
    assert_eq!(eth.tags, pkt.vlans, "VLAN tags are kept");
    let (outer_proto, backend, l4) = match eth.ethertype {
        0x0800 => {
            let h = &f[eth.l3..eth.l3 + 20];
            assert_eq!(h[0], 0x45, "outer IPv4 version/ihl");
            assert_eq!(h[1], pkt.tos, "outer TOS is the inner one");
            let overhead = 20 + if e.gue_port.is_some() { 8 } else { 0 };
            assert_eq!(be16(h, 2) as usize, inner.len() + overhead, "outer total length");
            assert_eq!(be16(h, 6), 0x4000, "outer DF, not a fragment");
            assert_eq!(h[8], 64, "outer TTL");
            assert!(csum_ok(0, h), "outer IPv4 header checksum");
            assert_eq!(ipv4_at(h, 12), e.outer_src, "outer source");
            (h[9], ipv4_at(h, 16), eth.l3 + 20)
        }
        0x86dd => {
            let h = &f[eth.l3..eth.l3 + 40];
            let first = be32(h, 0);
            assert_eq!(first >> 28, 6, "outer IPv6 version");
            assert_eq!((first >> 20) & 0xff, pkt.tos as u32, "outer traffic class");
            assert_eq!(first & 0xfffff, hash & 0xfffff, "outer flow label = flow hash");
            let overhead = if e.gue_port.is_some() { 8 } else { 0 };
            assert_eq!(
                be16(h, 4) as usize,
                inner.len() + overhead,
                "outer payload length"
            );
            assert_eq!(h[7], 64, "outer hop limit");
            assert_eq!(ipv6_at(h, 8), e.outer_src, "outer source");
            (h[6], ipv6_at(h, 24), eth.l3 + 40)
        }
        other => panic!("outer ethertype {other:#x}"),
    };
    let inner_at = match e.gue_port {
        Some(port) => {
            assert_eq!(outer_proto, 17, "GUE is UDP");
            let u = &f[l4..l4 + 8];
            assert_eq!(be16(u, 0) as u32, 0xc000 | (hash & 0x3fff), "GUE source port");
            assert_eq!(be16(u, 2), port, "GUE destination port");
            assert_eq!(be16(u, 4) as usize, 8 + inner.len(), "UDP length");
            let check = be16(u, 6);
            if backend.is_ipv4() {
                assert_eq!(check, 0, "UDP checksum over IPv4 is left out");
            } else if pkt.l4 == L4::UdpNoChecksum {
                assert_eq!(check, 0, "no inner checksum to derive the outer one from");
            } else {
                assert_ne!(check, 0, "UDP checksum over IPv6 is required");
                let sum = pseudo_sum(e.outer_src, backend, 17, 8 + inner.len());
                assert!(csum_ok(sum, &f[l4..]), "outer UDP checksum");
            }
            l4 + 8
        }
        None => {
            let want = if pkt.is_v4() { 4 } else { 41 };
            assert_eq!(outer_proto, want, "outer protocol follows the inner family");
            l4
        }
    };
    assert_eq!(
        &f[inner_at..],
        &inner[..],
        "inner packet is the client's IP packet, unchanged"
    );
    match e.action {
        XDP_TX => {
            assert_eq!(
                eth.dst,
                neigh_mac(backend),
                "destination MAC from the neighbour table"
            );
            assert_eq!(eth.src, GATEWAY_MAC, "source MAC of the egress interface");
        }
        XDP_REDIRECT => {
            assert_eq!(
                eth.dst,
                neigh_mac(backend),
                "destination MAC from the neighbour table"
            );
            assert_eq!(eth.src, SIDE_MAC, "source MAC of the egress interface");
        }
        _ => {
            assert_eq!(eth.dst, pkt.dst_mac, "passed to the stack: MACs as received");
            assert_eq!(eth.src, pkt.src_mac, "passed to the stack: MACs as received");
        }
    }
    backend
}

/// Checks an ICMP "fragmentation needed" built from `pkt`: back out of the receiving port
/// (MACs swapped, tags kept), from the VIP to the client, quoting the client's IP header and
/// the first 8 bytes after it, with the MTU the client must use.
pub fn assert_frag_needed(out: &Outcome, pkt: &Pkt, mtu: u16) {
    assert_eq!(out.action, XDP_TX, "verdict");
    let f = &out.data;
    let eth = parse_eth(f);
    assert_eq!((eth.dst, eth.src), (pkt.src_mac, pkt.dst_mac), "MACs swapped");
    assert_eq!(eth.tags, pkt.vlans, "tags as received");
    assert_eq!(eth.ethertype, 0x0800);
    let h = &f[eth.l3..];
    let inner = pkt.ip_packet();
    let quote_len = (inner[0] & 0xf) as usize * 4 + 8;
    assert_eq!(h[0], 0x45);
    assert_eq!(be16(h, 2) as usize, 20 + 8 + quote_len, "total length");
    assert_eq!(h.len(), 20 + 8 + quote_len, "nothing after the quote");
    assert_eq!(h[8], 64, "TTL");
    assert_eq!(h[9], 1, "ICMP");
    assert!(csum_ok(0, &h[..20]), "IPv4 header checksum");
    assert_eq!(ipv4_at(h, 12), pkt.dst, "from the VIP");
    assert_eq!(ipv4_at(h, 16), pkt.src, "to the client");
    let icmp = &h[20..];
    assert_eq!(
        (icmp[0], icmp[1]),
        (3, 4),
        "destination unreachable / fragmentation needed"
    );
    assert_eq!(be16(icmp, 6), mtu, "next-hop MTU");
    assert!(csum_ok(0, icmp), "ICMP checksum");
    assert_eq!(&icmp[8..], &inner[..quote_len], "quote of the client's packet");
}

/// Checks an ICMPv6 "packet too big" built from `pkt`: back out of the receiving port (MACs
/// swapped, tags kept), from the VIP to the client, quoting as much of the client's packet as
/// fits in 1280 bytes (RFC 4443), with the MTU the client must use.
pub fn assert_packet_too_big(out: &Outcome, pkt: &Pkt, mtu: u32) {
    assert_eq!(out.action, XDP_TX);
    let d = &out.data;
    let eth = parse_eth(d);
    assert_eq!((eth.dst, eth.src), (pkt.src_mac, pkt.dst_mac), "MACs swapped");
    assert_eq!(eth.tags, pkt.vlans);
    assert_eq!(eth.ethertype, 0x86dd);
    let h = &d[eth.l3..];
    let inner = pkt.ip_packet();
    // RFC 4443: as much of the packet as fits in 1280 bytes.
    assert_eq!(h.len(), 40 + 8 + 1232);
    assert_eq!(be32(h, 0) >> 28, 6);
    assert_eq!(be16(h, 4), 8 + 1232, "payload length");
    assert_eq!(h[6], 58, "ICMPv6");
    assert_eq!(h[7], 64, "hop limit");
    assert_eq!(ipv6_at(h, 8), pkt.dst, "from the VIP");
    assert_eq!(ipv6_at(h, 24), pkt.src, "to the client");
    let icmp = &h[40..];
    assert_eq!((icmp[0], icmp[1]), (2, 0), "packet too big");
    assert_eq!(be32(icmp, 4), mtu, "MTU");
    assert!(
        csum_ok(pseudo_sum(pkt.dst, pkt.src, 58, icmp.len()), icmp),
        "ICMPv6 checksum"
    );
    assert_eq!(&icmp[8..], &inner[..1232], "quote");
}

// ---------------------------------------------------------------------------------------------
// Tables of cases.
// ---------------------------------------------------------------------------------------------

/// Where an encapsulated packet must go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum To {
    /// The backend the service's Maglev table names for the flow (computed in userspace).
    Maglev,
    Backend(IpAddr),
}

/// What must come out of the program for one packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Encapsulated with this verdict toward `to`, checked byte for byte
    /// ([`assert_encapsulated`]); GUE to `gue_port` if set; the outer source is the gateway's
    /// address unless `outer_src` says otherwise.
    Encap {
        action: u32,
        to: To,
        gue_port: Option<u16>,
        outer_src: Option<IpAddr>,
    },
    /// Left as received, with this verdict.
    Untouched(u32),
    /// Dropped.
    Drop,
    /// Answered with ICMP fragmentation needed, with this MTU ([`assert_frag_needed`]).
    FragNeeded(u16),
    /// Answered with ICMPv6 packet too big, with this MTU ([`assert_packet_too_big`]).
    PacketTooBig(u32),
}

/// IPIP encapsulation with this verdict toward `to`.
pub fn encap(action: u32, to: To) -> Expect {
    Expect::Encap {
        action,
        to,
        gue_port: None,
        outer_src: None,
    }
}

/// GUE encapsulation to `port`, transmitted toward `backend`.
pub fn gue_to(backend: IpAddr, port: u16) -> Expect {
    Expect::Encap {
        action: XDP_TX,
        to: To::Backend(backend),
        gue_port: Some(port),
        outer_src: None,
    }
}

/// What a case feeds the program: a packet (needed to compute an expected output), or raw
/// bytes that no builder makes (truncated, inconsistent).
#[derive(Debug, Clone)]
pub enum Input {
    Pkt(Pkt),
    Frame(Vec<u8>),
}

impl Input {
    pub fn frame(&self) -> Vec<u8> {
        match self {
            Input::Pkt(p) => p.frame(),
            Input::Frame(f) => f.clone(),
        }
    }
}

/// One row: what is sent, what must come of it, and the reason it must count (packets + 1,
/// bytes + its frame length, no other reason changed; `None`: nothing counted).
#[derive(Debug, Clone)]
pub struct Case {
    pub what: String,
    pub input: Input,
    pub expect: Expect,
    pub reason: Option<&'static str>,
}

impl Case {
    pub fn pkt(what: impl Into<String>, pkt: Pkt, expect: Expect) -> Case {
        Case {
            what: what.into(),
            input: Input::Pkt(pkt),
            expect,
            reason: None,
        }
    }

    pub fn frame(what: impl Into<String>, frame: Vec<u8>, expect: Expect) -> Case {
        Case {
            what: what.into(),
            input: Input::Frame(frame),
            expect,
            reason: None,
        }
    }

    /// The reason counter this packet adds to.
    pub fn counts(mut self, reason: &'static str) -> Case {
        self.reason = Some(reason);
        self
    }
}

/// What a case produced: the program's outcome, and the backend it encapsulated toward.
#[derive(Debug, Clone)]
pub struct Ran {
    pub out: Outcome,
    pub backend: Option<IpAddr>,
}

/// Checks one outcome against `expect`; returns the backend of an encapsulated packet.
pub fn check_outcome(
    lb: &Balancer,
    what: &str,
    input: &Input,
    out: &Outcome,
    expect: &Expect,
) -> Option<IpAddr> {
    let pkt = || match input {
        Input::Pkt(p) => p,
        Input::Frame(_) => panic!("{what}: {expect:?} needs a packet, not raw bytes"),
    };
    match *expect {
        Expect::Encap {
            action,
            to,
            gue_port,
            outer_src,
        } => {
            let pkt = pkt();
            let want = match to {
                To::Maglev => lb
                    .maglev_pick(&pkt.service_key(), &pkt.flow_key())
                    .unwrap_or_else(|| panic!("{what}: Maglev names no backend")),
                To::Backend(b) => b,
            };
            let e = Encap {
                action,
                outer_src: outer_src.unwrap_or_else(|| gateway_source(want)),
                gue_port,
            };
            let got = assert_encapsulated(out, pkt, &e);
            assert_eq!(got, want, "{what}: backend");
            Some(got)
        }
        Expect::Untouched(action) => {
            assert_eq!(out.action, action, "{what}: verdict");
            assert_eq!(out.data, input.frame(), "{what}: packet left as received");
            None
        }
        Expect::Drop => {
            assert_eq!(out.action, XDP_DROP, "{what}: verdict");
            None
        }
        Expect::FragNeeded(mtu) => {
            assert_frag_needed(out, pkt(), mtu);
            None
        }
        Expect::PacketTooBig(mtu) => {
            assert_packet_too_big(out, pkt(), mtu);
            None
        }
    }
}

/// Runs the cases in order (one BPF_PROG_TEST_RUN each, received on the uplink), checking
/// each one's verdict, output and reason counters as it goes.
pub fn run_cases(topo: &Topology, lb: &Balancer, cases: &[Case]) -> Vec<Ran> {
    cases
        .iter()
        .map(|case| {
            let frame = case.input.frame();
            let before = lb.reasons().unwrap();
            let out = topo.run(lb.program(), &frame).unwrap();
            let backend = check_outcome(lb, &case.what, &case.input, &out, &case.expect);
            let counted = reasons_added(&before, &lb.reasons().unwrap());
            let expected: BTreeMap<&str, ReasonCounters> = case
                .reason
                .map(|r| (r, reason_count(1, frame.len())))
                .into_iter()
                .collect();
            assert_eq!(counted, expected, "{}: reasons counted", case.what);
            Ran { out, backend }
        })
        .collect()
}

pub fn reason_count(packets: u64, bytes: usize) -> ReasonCounters {
    ReasonCounters {
        packets,
        bytes: bytes as u64,
    }
}

/// The reason counters that grew from `before` to `after`, by how much.
fn reasons_added(
    before: &BTreeMap<&'static str, ReasonCounters>,
    after: &BTreeMap<&'static str, ReasonCounters>,
) -> BTreeMap<&'static str, ReasonCounters> {
    after
        .iter()
        .filter_map(|(name, c)| {
            let b = before.get(name).copied().unwrap_or_default();
            let grown = ReasonCounters {
                packets: c.packets - b.packets,
                bytes: c.bytes - b.bytes,
            };
            (grown != ReasonCounters::default()).then_some((*name, grown))
        })
        .collect()
}
