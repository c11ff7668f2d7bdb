//! The XDP load balancer run with BPF_PROG_TEST_RUN on crafted packets, one test per path:
//! what it returns, the packet it leaves, and what it counts.
//!
//! The datapath is loaded and programmed the way the daemon does it (`Datapath::open` on a
//! scratch bpffs directory, services through the reconcile planner), and every run happens in
//! a network namespace where the backends are routed and their neighbours permanent, so
//! bpf_fib_lookup answers as it would on a gateway. Expected backends are computed in
//! userspace from the Maglev table the planner wrote and a copy of the datapath's flow hash,
//! so a test knows which backend a flow must reach, not just that it reached one.
//!
//! Most tests are tables of cases (`common::lb::Case`): the packet sent, what must come out
//! (verdict and output frame, checked byte for byte), the reason counter it must add to, and a
//! line saying what the row is about. Tests that change the configuration between packets run
//! one table per configuration.
//!
//! Needs root; without it each test prints `SKIP: <name> needs root` and passes.

mod common;

use common::hash::flow_hash;
use common::lb::*;
use common::packet::*;
use common::require_root;
use gatewayd::model::{BackendState, Encapsulation, Protocol, Service};
use gatewayd_common::maps::TrafficCounters;
use std::collections::BTreeSet;
use std::net::IpAddr;

const VIP4: &str = "10.100.0.1";
const VIP6: &str = "fd00:100::1";
const CLIENT4: &str = "10.200.0.7";
const CLIENT6: &str = "fd00:200::7";

/// A fresh namespace and datapath serving `services` (None without root: the test is skipped).
fn serving(name: &str, services: &[Service]) -> Option<(Topology, Balancer)> {
    if !require_root(name) {
        return None;
    }
    let topo = Topology::new().expect("test namespace");
    let mut lb = Balancer::new(&test_capacities(), TEST_PARAMS).expect("loading the datapath");
    lb.serve(services).expect("programming the services");
    Some((topo, lb))
}

/// [`serving`], then the table of cases.
fn table(name: &str, services: &[Service], cases: &[Case]) -> Option<(Topology, Balancer, Vec<Ran>)> {
    let (topo, lb) = serving(name, services)?;
    let ran = run_cases(&topo, &lb, cases);
    Some((topo, lb, ran))
}

fn tcp(vip: &str, port: u16, backends: &[IpAddr]) -> Service {
    service(vip, port, Protocol::Tcp, &active(backends))
}

fn udp(vip: &str, port: u16, backends: &[IpAddr]) -> Service {
    service(vip, port, Protocol::Udp, &active(backends))
}

fn v4_backends(range: std::ops::Range<u8>) -> Vec<IpAddr> {
    range.map(uplink_backend4).collect()
}

fn v6_backends(range: std::ops::Range<u8>) -> Vec<IpAddr> {
    range.map(uplink_backend6).collect()
}

fn gue(mut s: Service, port: u16) -> Service {
    s.encapsulation = Encapsulation::Gue { port };
    s
}

fn traffic(packets: u64, bytes: usize, new_flows: u64) -> TrafficCounters {
    TrafficCounters {
        packets,
        bytes: bytes as u64,
        new_flows,
    }
}

/// Transmitted back out of the uplink toward the backend Maglev names.
fn maglev() -> Expect {
    encap(XDP_TX, To::Maglev)
}

fn to(backend: IpAddr) -> Expect {
    encap(XDP_TX, To::Backend(backend))
}

/// Passed to the stack untouched, counted as not for a VIP.
fn not_ours(what: &str, frame: Vec<u8>) -> Case {
    Case::frame(what, frame, Expect::Untouched(XDP_PASS)).counts("non_vip_pass")
}

// ---------------------------------------------------------------------------------------------
// New flows, established flows, backend changes
// ---------------------------------------------------------------------------------------------

#[test]
fn tcp_syn_to_an_ipv4_vip_is_encapsulated_to_its_maglev_backend_and_sent_back_out() {
    let backends = v4_backends(10..15);
    let pkt = Pkt::tcp(CLIENT4, 40000, VIP4, 80).payload(10);
    let Some((_topo, lb, ran)) = table(
        "tcp_syn_to_an_ipv4_vip_is_encapsulated_to_its_maglev_backend_and_sent_back_out",
        &[tcp(VIP4, 80, &backends)],
        &[Case::pkt(
            "a SYN, IPIP to the Maglev backend",
            pkt.clone(),
            maglev(),
        )],
    ) else {
        return;
    };
    let want = ran[0].backend.unwrap();

    // Forwarded packets count as traffic, not as a reason (checked by the table).
    let (svc, len) = (pkt.service_key(), pkt.frame().len());
    assert_eq!(lb.service_traffic(&svc).unwrap(), traffic(1, len, 1));
    for b in &backends {
        let expected = if *b == want {
            traffic(1, len, 1)
        } else {
            TrafficCounters::default()
        };
        assert_eq!(lb.backend_traffic(&svc, *b).unwrap(), expected, "backend {b}");
    }
    let flow = lb.flow(&pkt.flow_key()).expect("flow inserted");
    assert_eq!(flow.backend_id, lb.backend_id(&svc, want));
    assert_eq!(flow.service_id, lb.service_id(&svc));
    assert_eq!(lb.flow_count(), 1);
}

#[test]
fn new_flows_follow_the_maglev_table_over_every_backend() {
    let b4 = v4_backends(10..15);
    let b6 = v6_backends(10..15);
    let Some((topo, lb)) = serving(
        "new_flows_follow_the_maglev_table_over_every_backend",
        &[tcp(VIP4, 443, &b4), udp(VIP6, 443, &b6)],
    ) else {
        return;
    };
    // 200 flows per family: each lands where the userspace copy of the hash says, which
    // also proves that copy right for both families, and every backend gets some.
    for (pkt0, backends) in [
        (Pkt::tcp(CLIENT4, 0, VIP4, 443), &b4),
        (Pkt::udp(CLIENT6, 0, VIP6, 443), &b6),
    ] {
        let flows: Vec<Case> = (20000..20200)
            .map(|port| {
                Case::pkt(
                    format!("flow from port {port}"),
                    pkt0.clone().src_port(port),
                    maglev(),
                )
            })
            .collect();
        let seen: BTreeSet<IpAddr> = run_cases(&topo, &lb, &flows)
            .iter()
            .map(|r| r.backend.unwrap())
            .collect();
        assert_eq!(seen.len(), backends.len(), "every backend gets flows");
        let t = lb.service_traffic(&pkt0.service_key()).unwrap();
        assert_eq!((t.packets, t.new_flows), (200, 200));
    }
    assert_eq!(lb.flow_count(), 400);
}

#[test]
fn established_flows_keep_their_backend_when_the_backend_set_changes() {
    let flows: Vec<Pkt> = (30000..30064).map(|p| Pkt::tcp(CLIENT4, p, VIP4, 80)).collect();
    let syns: Vec<Case> = flows
        .iter()
        .map(|p| Case::pkt("the flow's SYN", p.clone(), maglev()))
        .collect();
    let Some((topo, mut lb, ran)) = table(
        "established_flows_keep_their_backend_when_the_backend_set_changes",
        &[tcp(VIP4, 80, &v4_backends(10..14))],
        &syns,
    ) else {
        return;
    };
    let first: Vec<IpAddr> = ran.iter().map(|r| r.backend.unwrap()).collect();

    // Thirty more active backends: the Maglev table changes for most flows.
    lb.serve(&[tcp(VIP4, 80, &v4_backends(10..44))]).unwrap();
    let acks: Vec<Case> = flows
        .iter()
        .zip(&first)
        .map(|(p, b)| {
            let ack = p.clone().flags(TCP_ACK).payload(100);
            Case::pkt("established flow stays on its backend", ack, to(*b))
        })
        .collect();
    run_cases(&topo, &lb, &acks);
    let moved_by_maglev = flows
        .iter()
        .zip(&first)
        .filter(|(p, b)| lb.maglev_pick(&p.service_key(), &p.flow_key()) != Some(**b))
        .count();
    // Without the connection table these flows would have moved: the test is not vacuous.
    assert!(moved_by_maglev > 32, "only {moved_by_maglev} flows would move");
    let t = lb.service_traffic(&flows[0].service_key()).unwrap();
    assert_eq!((t.packets, t.new_flows), (128, 64));

    // Forget one flow (as after an LRU eviction): its next segment is re-balanced by Maglev
    // onto the new table, and counted as a non-SYN miss.
    let (i, pkt) = flows
        .iter()
        .enumerate()
        .find(|(i, p)| lb.maglev_pick(&p.service_key(), &p.flow_key()) != Some(first[*i]))
        .unwrap();
    lb.forget_flow(&pkt.flow_key()).unwrap();
    let ack = pkt.clone().flags(TCP_ACK);
    let ran = run_cases(
        &topo,
        &lb,
        &[Case::pkt("a forgotten flow's ACK", ack.clone(), maglev()).counts("lru_miss_non_syn")],
    );
    let want = ran[0].backend.unwrap();
    assert_ne!(want, first[i]);
    assert_eq!(
        lb.flow(&ack.flow_key()).unwrap().backend_id,
        lb.backend_id(&ack.service_key(), want),
        "the adopted flow is pinned again"
    );
}

#[test]
fn terminating_backend_keeps_its_flows_but_gets_no_new_ones() {
    let backends = v4_backends(10..14);
    let syn = Pkt::tcp(CLIENT4, 31000, VIP4, 80);
    let Some((topo, mut lb, ran)) = table(
        "terminating_backend_keeps_its_flows_but_gets_no_new_ones",
        &[tcp(VIP4, 80, &backends)],
        &[Case::pkt("the flow's SYN", syn.clone(), maglev())],
    ) else {
        return;
    };
    let drained = ran[0].backend.unwrap();
    let with_state = |state| -> Vec<(IpAddr, BackendState)> {
        backends
            .iter()
            .map(|a| {
                (
                    *a,
                    if *a == drained {
                        state
                    } else {
                        BackendState::Active
                    },
                )
            })
            .collect()
    };
    lb.serve(&[service(
        VIP4,
        80,
        Protocol::Tcp,
        &with_state(BackendState::Terminating),
    )])
    .unwrap();
    let ack = syn.clone().flags(TCP_ACK).payload(50);
    let mut cases = vec![Case::pkt(
        "a terminating backend keeps its established flow",
        ack.clone(),
        to(drained),
    )];
    cases.extend(
        (32000..32100).map(|port| Case::pkt("a new flow", Pkt::tcp(CLIENT4, port, VIP4, 80), maglev())),
    );
    for ran in &run_cases(&topo, &lb, &cases)[1..] {
        assert_ne!(ran.backend, Some(drained), "no new flow on a terminating backend");
    }

    // Maintenance: the flow itself moves, to where Maglev now sends it.
    lb.serve(&[service(
        VIP4,
        80,
        Protocol::Tcp,
        &with_state(BackendState::Maintenance),
    )])
    .unwrap();
    let moved =
        Case::pkt("the flow of a backend in maintenance", ack.clone(), maglev()).counts("lru_miss_non_syn");
    let want = run_cases(&topo, &lb, &[moved])[0].backend.unwrap();
    assert_ne!(want, drained);

    // Removed altogether: same, the flow is re-balanced over what is left.
    let remaining: Vec<IpAddr> = backends
        .iter()
        .copied()
        .filter(|a| *a != drained && *a != want)
        .collect();
    lb.serve(&[tcp(VIP4, 80, &remaining)]).unwrap();
    let again = Case::pkt("the flow of a removed backend", ack.clone(), maglev()).counts("lru_miss_non_syn");
    let again = run_cases(&topo, &lb, &[again])[0].backend.unwrap();
    assert!(remaining.contains(&again));
}

#[test]
fn udp_datagrams_of_one_flow_go_to_one_backend() {
    let pkt = Pkt::udp(CLIENT4, 5353, VIP4, 53).payload(40);
    let datagram = Case::pkt("a datagram of the flow", pkt.clone(), maglev());
    let Some((_topo, lb, ran)) = table(
        "udp_datagrams_of_one_flow_go_to_one_backend",
        &[udp(VIP4, 53, &v4_backends(10..15))],
        &[datagram.clone(), datagram.clone(), datagram],
    ) else {
        return;
    };
    let (svc, len) = (pkt.service_key(), pkt.frame().len());
    assert_eq!(lb.service_traffic(&svc).unwrap(), traffic(3, 3 * len, 1));
    let want = ran[0].backend.unwrap();
    assert_eq!(lb.backend_traffic(&svc, want).unwrap(), traffic(3, 3 * len, 1));
}

// ---------------------------------------------------------------------------------------------
// Address families and encapsulations
// ---------------------------------------------------------------------------------------------

#[test]
fn ipv6_vip_to_ipv6_backends_is_ip6ip6() {
    let pkt = Pkt::tcp(CLIENT6, 40000, VIP6, 80).payload(200);
    let Some((_topo, lb, _)) = table(
        "ipv6_vip_to_ipv6_backends_is_ip6ip6",
        &[tcp(VIP6, 80, &v6_backends(10..14))],
        &[Case::pkt(
            "IPv6 in IPv6 to the Maglev backend",
            pkt.clone(),
            maglev(),
        )],
    ) else {
        return;
    };
    assert_eq!(
        lb.service_traffic(&pkt.service_key()).unwrap(),
        traffic(1, pkt.frame().len(), 1)
    );
}

#[test]
fn mixed_families_are_4in6_and_6in4() {
    let (b4, b6) = (uplink_backend4(20), uplink_backend6(20));
    table(
        "mixed_families_are_4in6_and_6in4",
        &[tcp(VIP4, 80, &[b6]), tcp(VIP6, 80, &[b4])],
        &[
            Case::pkt(
                "IPv4 inside IPv6 (next header 4)",
                Pkt::tcp(CLIENT4, 40000, VIP4, 80).payload(30),
                to(b6),
            ),
            Case::pkt(
                "IPv6 inside IPv4 (protocol 41)",
                Pkt::tcp(CLIENT6, 40000, VIP6, 80).payload(30),
                to(b4),
            ),
        ],
    );
}

#[test]
fn gue_services_send_ip_in_udp_to_the_configured_port() {
    let (b4, b6) = (uplink_backend4(30), uplink_backend6(30));
    table(
        "gue_services_send_ip_in_udp_to_the_configured_port",
        &[
            gue(tcp(VIP4, 80, &[b4]), 6080),
            gue(tcp(VIP4, 81, &[b6]), 6080),
            gue(tcp(VIP6, 80, &[b6]), 6081),
            gue(udp(VIP4, 53, &[b6]), 6082),
        ],
        &[
            Case::pkt(
                "IPv4 outer: UDP checksum zero (RFC 768 allows it)",
                Pkt::tcp(CLIENT4, 40000, VIP4, 80).payload(99),
                gue_to(b4, 6080),
            ),
            Case::pkt(
                "IPv6 outer: the checksum is derived from the inner headers and must be valid",
                Pkt::tcp(CLIENT4, 40000, VIP4, 81).payload(99),
                gue_to(b6, 6080),
            ),
            Case::pkt(
                "IPv6 in IPv6 GUE",
                Pkt::tcp(CLIENT6, 40000, VIP6, 80).payload(99),
                gue_to(b6, 6081),
            ),
            Case::pkt(
                "no payload",
                Pkt::tcp(CLIENT6, 40001, VIP6, 80).payload(0),
                gue_to(b6, 6081),
            ),
            Case::pkt(
                "inner UDP",
                Pkt::udp(CLIENT4, 40000, VIP4, 53).payload(33),
                gue_to(b6, 6082),
            ),
            Case::pkt(
                "inner UDP without checksum: nothing to derive the outer one from, so zero",
                Pkt {
                    l4: L4::UdpNoChecksum,
                    ..Pkt::udp(CLIENT4, 40001, VIP4, 53).payload(33)
                },
                gue_to(b6, 6082),
            ),
        ],
    );
}

#[test]
fn backend_behind_another_interface_is_redirected_there() {
    let (b4, b6) = (side_backend4(11), side_backend6(11));
    let redirected = |pkt: Pkt, backend| {
        // Twice: the first run fills the next-hop cache, the second is answered from it.
        let case = Case::pkt(
            "redirected to the side interface",
            pkt,
            encap(XDP_REDIRECT, To::Backend(backend)),
        );
        [case.clone(), case]
    };
    table(
        "backend_behind_another_interface_is_redirected_there",
        &[tcp(VIP4, 80, &[b4]), tcp(VIP6, 80, &[b6])],
        &[
            redirected(Pkt::tcp(CLIENT4, 40000, VIP4, 80), b4),
            redirected(Pkt::tcp(CLIENT6, 40000, VIP6, 80), b6),
        ]
        .concat(),
    );
}

#[test]
fn outer_source_takes_the_hostmask_bits_from_the_flow_hash() {
    let (b4, b6) = (uplink_backend4(11), uplink_backend6(11));
    // base & ~mask | hash & mask, word by word as the datapath does it: the hash (and its
    // rotations for IPv6 words 1-3) stored in memory order over the address bytes.
    let outer = |base: &[u8], mask: &[u8], h: u32| -> Vec<u8> {
        let words = [h, h.rotate_left(8), h.rotate_left(16), h.rotate_left(24)];
        let hb: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        (0..base.len())
            .map(|i| (base[i] & !mask[i]) | (hb[i] & mask[i]))
            .collect()
    };
    let from = |pkt: Pkt, src: IpAddr, backend| {
        let e = Expect::Encap {
            action: XDP_TX,
            to: To::Backend(backend),
            gue_port: None,
            outer_src: Some(src),
        };
        Case::pkt(format!("outer source {src}"), pkt, e)
    };
    let mut sources = BTreeSet::new();
    let mut cases = Vec::new();
    for port in 1000..1050 {
        let pkt = Pkt::tcp(CLIENT4, port, VIP4, 80);
        let b = outer(&[10, 0, 0, 64], &[0, 0, 0, 63], flow_hash(&pkt.flow_key()));
        let src = IpAddr::V4(std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]));
        assert!(src >= ip("10.0.0.64") && src <= ip("10.0.0.127"));
        cases.push(from(pkt, src, b4));
        sources.insert(src);

        let pkt = Pkt::tcp(CLIENT6, port, VIP6, 80);
        let IpAddr::V6(base6) = ip("fd00::100:0") else {
            unreachable!()
        };
        let mut mask = [0u8; 16];
        mask[14] = 0xff;
        mask[15] = 0xff;
        let b = outer(&base6.octets(), &mask, flow_hash(&pkt.flow_key()));
        cases.push(from(pkt, IpAddr::V6(<[u8; 16]>::try_from(b).unwrap().into()), b6));
    }
    assert!(sources.len() > 20, "flows spread over the source range");
    let Some((topo, mut lb)) = serving(
        "outer_source_takes_the_hostmask_bits_from_the_flow_hash",
        &[tcp(VIP4, 80, &[b4]), tcp(VIP6, 80, &[b6])],
    ) else {
        return;
    };
    lb.set_sources(Some("10.0.0.64/26"), Some("fd00::100:0/112"))
        .unwrap();
    run_cases(&topo, &lb, &cases);
}

// ---------------------------------------------------------------------------------------------
// Packets that are not balanced
// ---------------------------------------------------------------------------------------------

#[test]
fn packets_not_for_a_service_pass_untouched() {
    let icmp_to_vip = {
        // An ICMP echo request to the VIP: IP protocol 1, not balanced.
        let mut f = Pkt::tcp(CLIENT4, 1, VIP4, 80).frame();
        f[14 + 9] = 1;
        f[24..26].copy_from_slice(&[0, 0]);
        let ck = csum(0, &f[14..34]);
        f[24..26].copy_from_slice(&ck.to_be_bytes());
        f
    };
    let hop_by_hop_to_vip = {
        // IPv6 with a hop-by-hop header before TCP: extension chains are not walked.
        let pkt = Pkt::tcp(CLIENT6, 1, VIP6, 80);
        let mut ip6 = pkt.ip_packet();
        let seg = ip6.split_off(40);
        let plen = (seg.len() + 8) as u16;
        ip6[4..6].copy_from_slice(&plen.to_be_bytes());
        ip6[6] = 0;
        ip6.extend_from_slice(&[6, 0, 1, 4, 0, 0, 0, 0]);
        ip6.extend_from_slice(&seg);
        let mut f = pkt.frame()[..14].to_vec();
        f.extend_from_slice(&ip6);
        f
    };
    let Some((_topo, lb, _)) = table(
        "packets_not_for_a_service_pass_untouched",
        &[
            tcp(VIP4, 80, &v4_backends(10..12)),
            tcp(VIP6, 80, &v6_backends(10..12)),
        ],
        &[
            not_ours("not a VIP", Pkt::tcp(CLIENT4, 40000, "10.100.0.2", 80).frame()),
            not_ours("VIP, other port", Pkt::tcp(CLIENT4, 40000, VIP4, 8080).frame()),
            not_ours(
                "VIP:port, other protocol",
                Pkt::udp(CLIENT4, 40000, VIP4, 80).frame(),
            ),
            not_ours(
                "not an IPv6 VIP",
                Pkt::tcp(CLIENT6, 40000, "fd00:100::2", 80).frame(),
            ),
            not_ours(
                "IPv6 VIP, other port",
                Pkt::tcp(CLIENT6, 40000, VIP6, 443).frame(),
            ),
            not_ours(
                "not a VIP, on a VLAN",
                Pkt::tcp(CLIENT4, 40000, "10.100.0.2", 80).vlan(7).frame(),
            ),
            not_ours("ARP", arp_request()),
            not_ours("ICMP to a VIP", icmp_to_vip),
            not_ours("IPv6 hop-by-hop header before TCP", hop_by_hop_to_vip),
        ],
    ) else {
        return;
    };
    assert_eq!(lb.flow_count(), 0);
    assert_eq!(
        lb.service_traffic(&Pkt::tcp(CLIENT4, 1, VIP4, 80).service_key())
            .unwrap(),
        TrafficCounters::default()
    );
}

#[test]
fn removed_service_stops_being_balanced() {
    let pkt = Pkt::tcp(CLIENT4, 40000, VIP4, 80);
    let Some((topo, mut lb, _)) = table(
        "removed_service_stops_being_balanced",
        &[tcp(VIP4, 80, &v4_backends(10..12))],
        &[Case::pkt(
            "balanced while the service exists",
            pkt.clone(),
            maglev(),
        )],
    ) else {
        return;
    };
    lb.serve(&[]).unwrap();
    // Even the established flow: the VIP entry is what makes a packet the balancer's.
    run_cases(
        &topo,
        &lb,
        &[not_ours(
            "the established flow, service removed",
            pkt.flags(TCP_ACK).frame(),
        )],
    );
}

/// Removals are written in batches; an entry already gone (removed behind the daemon's back)
/// is skipped, and the rest of the batch still goes.
#[test]
fn removing_services_skips_entries_already_gone() {
    let services: Vec<Service> = (80..83)
        .map(|port| tcp(VIP4, port, &v4_backends(10..12)))
        .collect();
    let Some((topo, mut lb)) = serving("removing_services_skips_entries_already_gone", &services) else {
        return;
    };
    let maps = lb.datapath.pins().maps();
    let open = |name: &str| aya::maps::MapData::from_pin(maps.join(name)).unwrap();
    let mut vips: aya::maps::HashMap<_, gatewayd_common::maps::VipKey, gatewayd_common::maps::ServiceEntry> =
        aya::maps::Map::HashMap(open("gd_services")).try_into().unwrap();
    let mut tables: aya::maps::HashOfMaps<_, u32, aya::maps::MapData> =
        aya::maps::Map::HashOfMaps(open("gd_maglev")).try_into().unwrap();
    let middle = &services[1].key;
    vips.remove(&gatewayd::lb::plan::vip_key(middle)).unwrap();
    tables.remove(&lb.service_id(middle)).unwrap();

    lb.serve(&[]).unwrap();
    assert_eq!(vips.keys().count(), 0);
    assert_eq!(tables.keys().count(), 0);
    let gone: Vec<Case> = (80..83)
        .map(|port| not_ours("a removed service", Pkt::tcp(CLIENT4, 40000, VIP4, port).frame()))
        .collect();
    run_cases(&topo, &lb, &gone);
}

/// A `gd_maglev` pinned by an older build, whose inner maps have other flags (before they
/// were mmapable), would refuse every new table: it is recreated at load, and tables go in.
#[test]
fn maglev_map_of_an_older_layout_is_recreated() {
    if !require_root("maglev_map_of_an_older_layout_is_recreated") {
        return;
    }
    use aya::maps::{HashOfMaps, MapData};
    use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
    const OLD_FLAGS: u32 = 1 << 12; // BPF_F_INNER_MAP alone
    let old_table = || {
        MapData::create(
            aya_obj::Map::new_from_params(2 /* ARRAY */, 4, 4, 8, OLD_FLAGS),
            "old_tbl",
            None,
        )
        .unwrap()
    };
    // The outer map as the older build created it (aya cannot create a map-in-map).
    #[repr(C)]
    #[derive(Default)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        inner_map_fd: u32,
        numa_node: u32,
        map_name: [u8; 16],
        rest: [u32; 16],
    }
    let template = old_table();
    let mut attr = MapCreate {
        map_type: 13, // HASH_OF_MAPS
        key_size: 4,
        value_size: 4,
        max_entries: test_capacities().max_services,
        inner_map_fd: template.fd().as_fd().as_raw_fd() as u32,
        ..Default::default()
    };
    attr.map_name[..9].copy_from_slice(b"gd_maglev");
    // SAFETY: BPF_MAP_CREATE (0) with a zero-padded attr of the kernel's leading layout.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0,
            &mut attr as *mut MapCreate,
            std::mem::size_of::<MapCreate>(),
        )
    };
    assert!(fd >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: the kernel just returned this descriptor to us.
    let outer = MapData::from_fd(unsafe { OwnedFd::from_raw_fd(fd as i32) }).unwrap();
    let pins = common::ScratchPins::new();
    let maps_dir = gatewayd::datapath::Pins::new(&pins.path).maps();
    gatewayd::datapath::ensure_bpffs(&pins.path).unwrap();
    std::fs::create_dir_all(&maps_dir).unwrap();
    outer.pin(maps_dir.join("gd_maglev")).unwrap();
    let mut held: HashOfMaps<MapData, u32, MapData> = aya::maps::Map::HashOfMaps(outer).try_into().unwrap();
    held.insert(1, &old_table(), 0).unwrap();

    let mut datapath = gatewayd::datapath::Datapath::open(&pins.path, &test_capacities()).unwrap();
    let mut maps = gatewayd::lb::maps::LbMaps::new(datapath.ebpf_mut(), &maps_dir).unwrap();
    let desired = [tcp(VIP4, 80, &v4_backends(10..12))]
        .into_iter()
        .map(|s| (s.key, std::sync::Arc::new(s)))
        .collect();
    let ops = gatewayd::lb::plan::Programmed::default()
        .plan(&desired, &TEST_PARAMS)
        .unwrap()
        .ops;
    maps.apply(&ops).unwrap();
}

#[test]
fn ipv4_fragments_to_a_vip() {
    let datagram = Pkt::udp(CLIENT4, 5000, VIP4, 53).payload(64);
    let Some((_topo, lb, _)) = table(
        "ipv4_fragments_to_a_vip",
        &[udp(VIP4, 53, &v4_backends(10..12))],
        &[
            Case::pkt(
                "first fragment: ports visible, but its other fragments could not follow it",
                datagram.clone().fragment(0, true),
                Expect::Drop,
            )
            .counts("fragment_drop"),
            // Its bytes after the IP header are payload, not a UDP header.
            not_ours(
                "a later fragment: no ports, so no service",
                datagram.fragment(9, false).frame(),
            ),
        ],
    ) else {
        return;
    };
    assert_eq!(lb.flow_count(), 0);
}

#[test]
fn ipv6_fragments_to_a_vip() {
    let datagram = Pkt::udp(CLIENT6, 5000, VIP6, 53).payload(64);
    let dropped = |what, pkt| Case::pkt(what, pkt, Expect::Drop).counts("fragment_drop");
    table(
        "ipv6_fragments_to_a_vip",
        &[udp(VIP6, 53, &v6_backends(10..12))],
        &[
            dropped("first fragment", datagram.clone().fragment(0, true)),
            dropped(
                "atomic fragment (offset 0, no M: RFC 8021)",
                datagram.clone().fragment(0, false),
            ),
            not_ours("a later fragment", datagram.fragment(9, true).frame()),
        ],
    );
}

#[test]
fn truncated_and_inconsistent_headers_pass_untouched() {
    let syn4 = Pkt::tcp(CLIENT4, 40000, VIP4, 80).payload(0).frame(); // 14 + 20 + 20
    let syn6 = Pkt::tcp(CLIENT6, 40000, VIP6, 80).payload(0).frame(); // 14 + 40 + 20
    let udp4 = Pkt::udp(CLIENT4, 40000, VIP4, 53).payload(0).frame(); // 14 + 20 + 8
    let set = |mut f: Vec<u8>, at: usize, bytes: &[u8]| {
        f[at..at + bytes.len()].copy_from_slice(bytes);
        f
    };
    let malformed =
        |what, frame| Case::frame(what, frame, Expect::Untouched(XDP_PASS)).counts("malformed_pass");
    // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header (EINVAL), so a
    // truncated Ethernet header cannot be fed to the program; every shorter header can.
    let Some((_topo, lb, _)) = table(
        "truncated_and_inconsistent_headers_pass_untouched",
        &[
            tcp(VIP4, 80, &v4_backends(10..12)),
            tcp(VIP6, 80, &v6_backends(10..12)),
            udp(VIP4, 53, &v4_backends(10..12)),
        ],
        &[
            malformed("IPv4 header cut", syn4[..14 + 12].to_vec()),
            malformed("TCP header cut", syn4[..14 + 20 + 10].to_vec()),
            malformed(
                "IPv4 total length beyond the frame",
                set(syn4.clone(), 16, &[0, 80]),
            ),
            malformed(
                "IPv4 total length shorter than the header",
                set(syn4.clone(), 16, &[0, 16]),
            ),
            // The frame has the bytes, but the IP packet ends inside the TCP header.
            malformed(
                "TCP header beyond the IPv4 total length",
                set(syn4.clone(), 16, &[0, 30]),
            ),
            malformed("IPv4 ihl below 5", set(syn4.clone(), 14, &[0x44])),
            malformed("IPv4 ihl beyond the packet", set(syn4.clone(), 14, &[0x4f])),
            malformed("version 6 in an IPv4 ethertype", set(syn4.clone(), 14, &[0x65])),
            malformed("UDP header cut", udp4[..14 + 20 + 6].to_vec()),
            malformed("IPv6 header cut", syn6[..14 + 30].to_vec()),
            malformed(
                "IPv6 payload length beyond the frame",
                set(syn6.clone(), 18, &[0, 21]),
            ),
            malformed(
                "TCP header beyond the IPv6 payload",
                set(syn6.clone(), 18, &[0, 12]),
            ),
            malformed(
                "IPv6 payload length 0 (jumbogram without hop-by-hop)",
                set(syn6.clone(), 18, &[0, 0]),
            ),
            malformed("version 4 in an IPv6 ethertype", set(syn6.clone(), 14, &[0x40])),
            malformed("VLAN tag cut", [&syn4[..12], &[0x81, 0x00, 0x00]].concat()),
            malformed(
                "second VLAN tag cut",
                [&syn4[..12], &[0x88, 0xa8, 0x00, 0x01, 0x81, 0x00, 0x00]].concat(),
            ),
            malformed("IPv6 fragment header cut", {
                let f = Pkt::tcp(CLIENT6, 40000, VIP6, 80).fragment(0, true).frame();
                // Payload length 4: consistent with the frame, too short for the header.
                set(f[..14 + 40 + 4].to_vec(), 18, &[0, 4])
            }),
        ],
    ) else {
        return;
    };
    assert_eq!(lb.flow_count(), 0);
}

#[test]
fn ipv4_options_are_carried_inside_the_tunnel() {
    // Options do not stop balancing: the ports are found after ihl*4 bytes, and the client's
    // header, options included, travels unchanged inside the tunnel.
    let with = |options: Vec<u8>| Pkt {
        options,
        ..Pkt::tcp(CLIENT4, 40000, VIP4, 80).payload(20)
    };
    table(
        "ipv4_options_are_carried_inside_the_tunnel",
        &[tcp(VIP4, 80, &v4_backends(10..14))],
        &[
            Case::pkt("NOPs + end of list", with(vec![1, 1, 1, 0]), maglev()),
            Case::pkt("router alert", with(vec![0x94, 4, 0, 0]), maglev()),
            Case::pkt(
                "record route, ihl 15",
                with([vec![7, 39, 4], vec![0; 36], vec![0]].concat()),
                maglev(),
            ),
        ],
    );
}

#[test]
fn ethernet_padding_is_not_carried_into_the_tunnel() {
    // 14 + 20 + 8 + 2 = 44 bytes: padded to the 60-byte Ethernet minimum on the wire.
    let pkt = Pkt {
        trailer: vec![0xee; 16],
        ..Pkt::udp(CLIENT4, 40000, VIP4, 53).payload(2)
    };
    assert_eq!(pkt.frame().len(), 60);
    let Some((_topo, _lb, ran)) = table(
        "ethernet_padding_is_not_carried_into_the_tunnel",
        &[udp(VIP4, 53, &v4_backends(10..12))],
        // assert_encapsulated requires the frame to end with the inner packet.
        &[Case::pkt("a padded frame", pkt.clone(), maglev())],
    ) else {
        return;
    };
    assert_eq!(ran[0].out.data.len(), 14 + 20 + pkt.ip_packet().len());
}

// ---------------------------------------------------------------------------------------------
// Policy: source ranges, no backend, affinity, non-SYN adoption
// ---------------------------------------------------------------------------------------------

#[test]
fn source_ranges_admit_listed_clients_and_drop_the_others() {
    let mut s4 = tcp(VIP4, 80, &v4_backends(10..12));
    s4.source_ranges = vec!["10.200.0.0/16".parse().unwrap(), "10.77.1.1/32".parse().unwrap()];
    let mut s6 = tcp(VIP6, 80, &v6_backends(10..12));
    s6.source_ranges = vec!["fd00:200::/32".parse().unwrap()];
    let admitted = |client, vip| {
        Case::pkt(
            format!("{client} is listed"),
            Pkt::tcp(client, 40000, vip, 80),
            maglev(),
        )
    };
    let dropped = |client, vip| {
        Case::pkt(
            format!("{client} is not"),
            Pkt::tcp(client, 40000, vip, 80),
            Expect::Drop,
        )
        .counts("source_range_drop")
    };
    let Some((topo, mut lb, _)) = table(
        "source_ranges_admit_listed_clients_and_drop_the_others",
        &[s4.clone(), s6],
        &[
            admitted(CLIENT4, VIP4),
            admitted("10.77.1.1", VIP4),
            admitted(CLIENT6, VIP6),
            dropped("10.201.0.7", VIP4),
            dropped("10.77.1.2", VIP4),
            dropped("fd00:201::7", VIP6),
        ],
    ) else {
        return;
    };

    // Ranges are checked on every packet: narrowing them cuts an established flow.
    s4.source_ranges = vec!["10.77.1.1/32".parse().unwrap()];
    lb.serve(&[s4]).unwrap();
    let ack = Pkt::tcp(CLIENT4, 40000, VIP4, 80).flags(TCP_ACK);
    run_cases(
        &topo,
        &lb,
        &[Case::pkt("established, no longer listed", ack, Expect::Drop).counts("source_range_drop")],
    );
}

#[test]
fn service_without_an_active_backend_drops_new_flows() {
    let b = v4_backends(10..12);
    let dropped = |what, pkt| Case::pkt(what, pkt, Expect::Drop).counts("no_backend_drop");
    let Some((_topo, lb, _)) = table(
        "service_without_an_active_backend_drops_new_flows",
        &[
            tcp(VIP4, 80, &[]),
            service(
                VIP4,
                81,
                Protocol::Tcp,
                &[
                    (b[0], BackendState::Terminating),
                    (b[1], BackendState::Maintenance),
                ],
            ),
            udp(VIP6, 80, &[]),
        ],
        &[
            dropped("no backend", Pkt::tcp(CLIENT4, 40000, VIP4, 80)),
            dropped(
                "terminating and maintenance only",
                Pkt::tcp(CLIENT4, 40000, VIP4, 81),
            ),
            dropped("no backend, IPv6 UDP", Pkt::udp(CLIENT6, 40000, VIP6, 80)),
        ],
    ) else {
        return;
    };
    assert_eq!(lb.flow_count(), 0);
}

#[test]
fn tcp_segment_without_a_flow_entry_is_adopted_through_maglev() {
    // The flow started on another gateway (ECMP change) or before a restart without pins.
    let pkt = Pkt::tcp(CLIENT4, 40000, VIP4, 80)
        .flags(TCP_ACK | TCP_PSH)
        .payload(300);
    let Some((topo, lb, _)) = table(
        "tcp_segment_without_a_flow_entry_is_adopted_through_maglev",
        &[tcp(VIP4, 80, &v4_backends(10..15))],
        &[Case::pkt("a segment of an unknown flow", pkt.clone(), maglev()).counts("lru_miss_non_syn")],
    ) else {
        return;
    };
    assert!(lb.flow(&pkt.flow_key()).is_some(), "adopted into the table");
    // The next segment finds the entry: no second miss.
    run_cases(
        &topo,
        &lb,
        &[Case::pkt("its next segment", pkt.clone(), maglev())],
    );
    assert_eq!(lb.service_traffic(&pkt.service_key()).unwrap().new_flows, 1);
}

#[test]
fn client_ip_affinity_sends_new_connections_of_a_client_to_its_backend() {
    let mut s = tcp(VIP4, 80, &v4_backends(10..15));
    s.affinity_timeout = Some(3600);
    let Some((topo, lb, ran)) = table(
        "client_ip_affinity_sends_new_connections_of_a_client_to_its_backend",
        &[s],
        &[Case::pkt(
            "the client's first connection",
            Pkt::tcp(CLIENT4, 40000, VIP4, 80),
            maglev(),
        )],
    ) else {
        return;
    };
    let sticky = ran[0].backend.unwrap();
    // New connections from the same client whose own Maglev slot names another backend.
    let others: Vec<Case> = (40001..40100)
        .map(|port| Pkt::tcp(CLIENT4, port, VIP4, 80))
        .filter(|pkt| lb.maglev_pick(&pkt.service_key(), &pkt.flow_key()) != Some(sticky))
        .map(|pkt| Case::pkt("affinity overrides the Maglev pick", pkt, to(sticky)))
        .collect();
    assert!(others.len() > 50);
    run_cases(&topo, &lb, &others);
    // Another client is balanced normally.
    run_cases(
        &topo,
        &lb,
        &[Case::pkt(
            "another client",
            Pkt::tcp("10.200.0.8", 40000, VIP4, 80),
            maglev(),
        )],
    );
}

// ---------------------------------------------------------------------------------------------
// Routing outcomes
// ---------------------------------------------------------------------------------------------

#[test]
fn unresolved_next_hop_is_encapsulated_and_left_to_the_stack() {
    let passed = |pkt, backend: &str| {
        Case::pkt(
            "next hop unresolved",
            pkt,
            encap(XDP_PASS, To::Backend(ip(backend))),
        )
        .counts("fib_no_neigh_pass")
    };
    table(
        "unresolved_next_hop_is_encapsulated_and_left_to_the_stack",
        &[
            tcp(VIP4, 80, &[ip(UNRESOLVED4)]),
            tcp(VIP6, 80, &[ip(UNRESOLVED6)]),
        ],
        &[
            passed(Pkt::tcp(CLIENT4, 40000, VIP4, 80), UNRESOLVED4),
            passed(Pkt::tcp(CLIENT6, 40000, VIP6, 80), UNRESOLVED6),
        ],
    );
}

#[test]
fn backend_without_a_route_is_dropped() {
    let dropped = |pkt| Case::pkt("no route to the backend", pkt, Expect::Drop).counts("fib_drop");
    table(
        "backend_without_a_route_is_dropped",
        &[tcp(VIP4, 80, &[ip(UNROUTED4)]), tcp(VIP6, 80, &[ip(UNROUTED6)])],
        &[
            dropped(Pkt::tcp(CLIENT4, 40000, VIP4, 80)),
            dropped(Pkt::tcp(CLIENT6, 40000, VIP6, 80)),
        ],
    );
}

#[test]
fn backend_family_without_an_outer_source_is_dropped() {
    let Some((topo, mut lb)) = serving(
        "backend_family_without_an_outer_source_is_dropped",
        &[
            tcp(VIP4, 80, &[uplink_backend6(10)]),
            tcp(VIP4, 81, &[uplink_backend4(10)]),
        ],
    ) else {
        return;
    };
    lb.set_sources(Some("10.0.0.1/32"), None).unwrap();
    run_cases(
        &topo,
        &lb,
        &[
            Case::pkt(
                "IPv6 backend, no IPv6 source",
                Pkt::tcp(CLIENT4, 40000, VIP4, 80),
                Expect::Drop,
            )
            .counts("no_encap_source_drop"),
            Case::pkt(
                "IPv4 backend",
                Pkt::tcp(CLIENT4, 40000, VIP4, 81),
                to(uplink_backend4(10)),
            ),
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// Too big once encapsulated
// ---------------------------------------------------------------------------------------------

#[test]
fn too_big_ipv4_with_df_gets_fragmentation_needed_with_the_inner_mtu() {
    let b4 = uplink_backend4(10);
    let Some((topo, lb)) = serving(
        "too_big_ipv4_with_df_gets_fragmentation_needed_with_the_inner_mtu",
        &[
            tcp(VIP4, 80, &[b4]),
            tcp(VIP4, 81, &[uplink_backend6(10)]),
            gue(tcp(VIP4, 82, &[b4]), 6080),
        ],
    ) else {
        return;
    };
    // Uplink MTU 1500. Each case: the largest packet that still fits, and one byte more.
    // The first run of a backend looks the route up; the following ones use the cached next
    // hop and its MTU, so both ways of detecting the problem are covered.
    let too_big =
        |what, pkt, mtu: usize| Case::pkt(what, pkt, Expect::FragNeeded(mtu as u16)).counts("too_big_icmp");
    for (port, overhead, backend) in [(80u16, 20usize, b4), (81, 40, uplink_backend6(10)), (82, 28, b4)] {
        let fits = 1500 - overhead;
        let mk = |ip_len: usize| Pkt::tcp(CLIENT4, 40000, VIP4, port).payload(ip_len - 40);
        let e = Expect::Encap {
            action: XDP_TX,
            to: To::Backend(backend),
            gue_port: (port == 82).then_some(6080),
            outer_src: None,
        };
        let ran = run_cases(
            &topo,
            &lb,
            &[
                too_big(
                    "nothing cached yet: found by the route lookup",
                    mk(fits + 1),
                    fits,
                ),
                Case::pkt("the largest packet that fits", mk(fits), e),
                too_big("from the cached next hop", mk(fits + 1), fits),
                too_big("the uplink's MTU", mk(1500), fits),
            ],
        );
        assert_eq!(ran[1].out.action, XDP_TX);
        assert_eq!(
            ran[1].out.data.len(),
            14 + 1500,
            "exactly the MTU once encapsulated"
        );
    }
    run_cases(
        &topo,
        &lb,
        &[
            // IPv4 options make the quote longer (ihl*4 + 8 bytes).
            too_big(
                "with IPv4 options",
                Pkt {
                    options: vec![1; 12],
                    ..Pkt::tcp(CLIENT4, 40001, VIP4, 80).payload(1600 - 52)
                },
                1480,
            ),
            // Tagged: the reply goes back with the same tags.
            too_big(
                "tagged",
                Pkt::tcp(CLIENT4, 40002, VIP4, 80).payload(1460).vlan(42),
                1480,
            ),
        ],
    );
}

#[test]
fn too_big_ipv4_without_df_is_dropped() {
    // The client expects routers to fragment, which XDP cannot do.
    let pkt = Pkt {
        df: false,
        ..Pkt::udp(CLIENT4, 5000, VIP4, 53).payload(1481 - 28)
    };
    table(
        "too_big_ipv4_without_df_is_dropped",
        &[udp(VIP4, 53, &[uplink_backend4(10)])],
        &[Case::pkt("too big without DF", pkt, Expect::Drop).counts("too_big_drop")],
    );
}

#[test]
fn too_big_ipv6_gets_packet_too_big_with_the_inner_mtu() {
    let too_big = |what, pkt, mtu| Case::pkt(what, pkt, Expect::PacketTooBig(mtu)).counts("too_big_icmp");
    table(
        "too_big_ipv6_gets_packet_too_big_with_the_inner_mtu",
        &[
            tcp(VIP6, 80, &[uplink_backend6(10)]),
            udp(VIP6, 53, &[uplink_backend4(10)]),
        ],
        &[
            too_big(
                "one byte too many, 6in6",
                Pkt::tcp(CLIENT6, 40000, VIP6, 80).payload(1461 - 60),
                1460,
            ),
            too_big(
                "the uplink's MTU",
                Pkt::tcp(CLIENT6, 40000, VIP6, 80).payload(1500 - 60),
                1460,
            ),
            too_big(
                "6in4",
                Pkt::udp(CLIENT6, 40000, VIP6, 53).payload(1481 - 48),
                1480,
            ),
            too_big(
                "QinQ",
                Pkt::tcp(CLIENT6, 40000, VIP6, 80).payload(1461 - 60).qinq(5, 6),
                1460,
            ),
        ],
    );
}

#[test]
fn in_ipsec_mode_encapsulated_packets_are_routed_by_the_kernel() {
    let (b4, b6) = (uplink_backend4(10), uplink_backend6(10));
    let Some((topo, mut lb)) = serving(
        "in_ipsec_mode_encapsulated_packets_are_routed_by_the_kernel",
        &[tcp(VIP4, 80, &[b4]), tcp(VIP6, 80, &[b6])],
    ) else {
        return;
    };
    let mut settings = gatewayd::lb::maps::lb_settings(
        Some(format!("{GW4}/32").parse().unwrap()),
        Some(format!("{GW6}/128").parse().unwrap()),
    );
    settings.flags |= gatewayd_common::maps::LB_F_KERNEL_ROUTE;
    lb.lb.set_settings(&settings).unwrap();
    // The backend's MAC is known, yet the packet goes to the kernel, whose XFRM policies
    // encrypt it: XDP transmission would send it in the clear.
    let routed = |pkt, backend| {
        Case::pkt("to the kernel's XFRM", pkt, encap(XDP_PASS, To::Backend(backend)))
            .counts("kernel_route_pass")
    };
    run_cases(
        &topo,
        &lb,
        &[
            routed(Pkt::tcp(CLIENT4, 40000, VIP4, 80), b4),
            routed(Pkt::tcp(CLIENT6, 40000, VIP6, 80), b6),
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// VLAN
// ---------------------------------------------------------------------------------------------

#[test]
fn vlan_tagged_vip_packets_are_encapsulated_and_left_to_the_stack() {
    let (b4, b6) = (uplink_backend4(10), uplink_backend6(10));
    // The way out of a tagged network is a VLAN device XDP cannot transmit on: the packet is
    // encapsulated in place, tags and MACs as received, and the stack routes it.
    let tagged =
        |what, pkt, backend| Case::pkt(what, pkt, encap(XDP_PASS, To::Backend(backend))).counts("vlan_pass");
    let mut three_tags = Pkt::tcp(CLIENT4, 40002, VIP4, 80).qinq(1, 2).frame();
    three_tags.splice(20..20, [0x81, 0x00, 0x00, 0x03]);
    table(
        "vlan_tagged_vip_packets_are_encapsulated_and_left_to_the_stack",
        &[tcp(VIP4, 80, &[b4]), tcp(VIP6, 80, &[b6])],
        &[
            tagged("IPv4, one tag", Pkt::tcp(CLIENT4, 40000, VIP4, 80).vlan(100), b4),
            tagged("IPv6, one tag", Pkt::tcp(CLIENT6, 40000, VIP6, 80).vlan(100), b6),
            tagged(
                "IPv4, QinQ",
                Pkt::tcp(CLIENT4, 40001, VIP4, 80).qinq(10, 20).payload(7),
                b4,
            ),
            tagged(
                "IPv6, QinQ",
                Pkt::tcp(CLIENT6, 40001, VIP6, 80).qinq(10, 20).payload(7),
                b6,
            ),
            not_ours("a third tag is not parsed: not balanced", three_tags),
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// Next-hop cache
// ---------------------------------------------------------------------------------------------

#[test]
fn reused_backend_id_does_not_inherit_the_previous_backends_next_hop() {
    let (a, b, c) = (uplink_backend4(10), uplink_backend4(11), uplink_backend4(12));
    let Some((topo, mut lb)) = serving(
        "reused_backend_id_does_not_inherit_the_previous_backends_next_hop",
        &[tcp(VIP4, 80, &[a])],
    ) else {
        return;
    };
    let pkt = Pkt::tcp(CLIENT4, 40000, VIP4, 80);
    let key = pkt.service_key();
    let id_a = lb.backend_id(&key, a);
    // The cache is per CPU and lives fib_cache_ms (50 ms): everything runs on one CPU, and
    // quickly, so that a stale entry would still be there to be (wrongly) used.
    topo.enter(|| {
        let cpu0 = {
            let mut set = nix::sched::CpuSet::new();
            set.set(0).unwrap();
            set
        };
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpu0).unwrap();
        let send = |lb: &Balancer, what: &str, pkt: Pkt, backend| {
            let out = test_run(lb.program(), topo.uplink_ifindex, &pkt.frame()).unwrap();
            check_outcome(lb, what, &Input::Pkt(pkt), &out, &to(backend));
        };
        send(&lb, "to A, caching its next hop", pkt.clone(), a);
        // A leaves (its id is freed), then C arrives and is given A's old id.
        lb.serve(&[tcp(VIP4, 80, &[b])]).unwrap();
        lb.serve(&[service(
            VIP4,
            80,
            Protocol::Tcp,
            &[(c, BackendState::Active), (b, BackendState::Terminating)],
        )])
        .unwrap();
        assert_eq!(lb.backend_id(&key, c), id_a, "the planner reuses the freed id");
        send(&lb, "to C, under A's old id", pkt.clone().src_port(40001), c);
    })
    .unwrap();
}
