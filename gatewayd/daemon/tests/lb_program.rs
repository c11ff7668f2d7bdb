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
//! Needs root; without it each test prints `SKIP: <name> needs root` and passes.

mod common;

use common::*;
use gatewayd::model::{BackendState, Encapsulation, Protocol, Service};
use gatewayd_common::maps::{ReasonCounters, TrafficCounters};
use std::net::IpAddr;

const VIP4: &str = "10.100.0.1";
const VIP6: &str = "fd00:100::1";
const CLIENT4: &str = "10.200.0.7";
const CLIENT6: &str = "fd00:200::7";

fn fixture(name: &str) -> Option<(Topology, Balancer)> {
    if !require_root(name) {
        return None;
    }
    let topo = Topology::new().expect("test namespace");
    let lb = Balancer::new(&test_capacities(), TEST_PARAMS).expect("loading the datapath");
    Some((topo, lb))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
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

fn reason(packets: u64, bytes: usize) -> ReasonCounters {
    ReasonCounters {
        packets,
        bytes: bytes as u64,
    }
}

fn traffic(packets: u64, bytes: usize, new_flows: u64) -> TrafficCounters {
    TrafficCounters {
        packets,
        bytes: bytes as u64,
        new_flows,
    }
}

/// Asserts that only `expected` reasons were counted, with these packet and byte counts.
fn assert_reasons(lb: &Balancer, expected: &[(&str, ReasonCounters)]) {
    let got = lb.reasons().unwrap();
    let want: std::collections::BTreeMap<&str, ReasonCounters> = expected.iter().cloned().collect();
    assert_eq!(got, want, "reason counters");
}

/// The packet went through untouched.
fn assert_untouched(out: &Outcome, frame: &[u8], action: u32) {
    assert_eq!(out.action, action, "verdict");
    assert_eq!(out.data, frame, "packet left as received");
}

// ---------------------------------------------------------------------------------------------
// New flows, established flows, backend changes
// ---------------------------------------------------------------------------------------------

#[test]
fn tcp_syn_to_an_ipv4_vip_is_encapsulated_to_its_maglev_backend_and_sent_back_out() {
    let Some((topo, mut lb)) =
        fixture("tcp_syn_to_an_ipv4_vip_is_encapsulated_to_its_maglev_backend_and_sent_back_out")
    else {
        return;
    };
    let backends = v4_backends(10..15);
    lb.serve(&[service(VIP4, 80, Protocol::Tcp, &active(&backends))])
        .unwrap();
    let pkt = Pkt::tcp(CLIENT4, 40000, VIP4, 80).payload(10);
    let svc = pkt.service_key();
    let want = lb.maglev_pick(&svc, &pkt.flow_key()).unwrap();

    let frame = pkt.frame();
    let out = topo.run(lb.program(), &frame).unwrap();
    let got = assert_encapsulated(&out, &pkt, &Encap::ipip(XDP_TX, want));
    assert_eq!(got, want, "the backend Maglev's table names for this flow");

    // Forwarded packets count as traffic, not as a reason.
    assert_reasons(&lb, &[]);
    assert_eq!(lb.service_traffic(&svc).unwrap(), traffic(1, frame.len(), 1));
    for b in &backends {
        let expected = if *b == want {
            traffic(1, frame.len(), 1)
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
    let Some((topo, mut lb)) = fixture("new_flows_follow_the_maglev_table_over_every_backend") else {
        return;
    };
    let b4 = v4_backends(10..15);
    let b6 = v6_backends(10..15);
    lb.serve(&[
        service(VIP4, 443, Protocol::Tcp, &active(&b4)),
        service(VIP6, 443, Protocol::Udp, &active(&b6)),
    ])
    .unwrap();
    // 200 flows per family: each lands where the userspace copy of the hash says, which
    // also proves that copy right for both families, and every backend gets some.
    for (pkt0, backends) in [
        (Pkt::tcp(CLIENT4, 0, VIP4, 443), &b4),
        (Pkt::udp(CLIENT6, 0, VIP6, 443), &b6),
    ] {
        let mut seen = std::collections::BTreeSet::new();
        for port in 20000..20200 {
            let pkt = pkt0.clone().src_port(port);
            let want = lb.maglev_pick(&pkt.service_key(), &pkt.flow_key()).unwrap();
            let out = topo.run(lb.program(), &pkt.frame()).unwrap();
            assert_eq!(assert_encapsulated(&out, &pkt, &Encap::ipip(XDP_TX, want)), want);
            seen.insert(want);
        }
        assert_eq!(seen.len(), backends.len(), "every backend gets flows");
        let t = lb.service_traffic(&pkt0.service_key()).unwrap();
        assert_eq!((t.packets, t.new_flows), (200, 200));
    }
    assert_eq!(lb.flow_count(), 400);
    assert_reasons(&lb, &[]);
}

#[test]
fn established_flows_keep_their_backend_when_the_backend_set_changes() {
    let Some((topo, mut lb)) = fixture("established_flows_keep_their_backend_when_the_backend_set_changes")
    else {
        return;
    };
    let before = v4_backends(10..14);
    let svc_before = service(VIP4, 80, Protocol::Tcp, &active(&before));
    lb.serve(std::slice::from_ref(&svc_before)).unwrap();
    let flows: Vec<Pkt> = (30000..30064).map(|p| Pkt::tcp(CLIENT4, p, VIP4, 80)).collect();
    let mut first = Vec::new();
    for pkt in &flows {
        let out = topo.run(lb.program(), &pkt.frame()).unwrap();
        let want = lb.maglev_pick(&pkt.service_key(), &pkt.flow_key()).unwrap();
        first.push(assert_encapsulated(&out, pkt, &Encap::ipip(XDP_TX, want)));
    }

    // Thirty more active backends: the Maglev table changes for most flows.
    let after = v4_backends(10..44);
    lb.serve(&[service(VIP4, 80, Protocol::Tcp, &active(&after))])
        .unwrap();
    let mut moved_by_maglev = 0;
    for (pkt, backend) in flows.iter().zip(&first) {
        let ack = pkt.clone().flags(TCP_ACK).payload(100);
        let out = topo.run(lb.program(), &ack.frame()).unwrap();
        assert_eq!(
            assert_encapsulated(&out, &ack, &Encap::ipip(XDP_TX, *backend)),
            *backend,
            "established flow stays on its backend"
        );
        if lb.maglev_pick(&ack.service_key(), &ack.flow_key()) != Some(*backend) {
            moved_by_maglev += 1;
        }
    }
    // Without the connection table these flows would have moved: the test is not vacuous.
    assert!(moved_by_maglev > 32, "only {moved_by_maglev} flows would move");
    assert_reasons(&lb, &[]);
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
    let frame = ack.frame();
    let out = topo.run(lb.program(), &frame).unwrap();
    let want = lb.maglev_pick(&ack.service_key(), &ack.flow_key()).unwrap();
    assert_ne!(want, first[i]);
    assert_eq!(assert_encapsulated(&out, &ack, &Encap::ipip(XDP_TX, want)), want);
    assert_reasons(&lb, &[("lru_miss_non_syn", reason(1, frame.len()))]);
    assert_eq!(
        lb.flow(&ack.flow_key()).unwrap().backend_id,
        lb.backend_id(&ack.service_key(), want),
        "the adopted flow is pinned again"
    );
}

#[test]
fn terminating_backend_keeps_its_flows_but_gets_no_new_ones() {
    let Some((topo, mut lb)) = fixture("terminating_backend_keeps_its_flows_but_gets_no_new_ones") else {
        return;
    };
    let backends = v4_backends(10..14);
    lb.serve(&[service(VIP4, 80, Protocol::Tcp, &active(&backends))])
        .unwrap();
    let syn = Pkt::tcp(CLIENT4, 31000, VIP4, 80);
    let out = topo.run(lb.program(), &syn.frame()).unwrap();
    let drained = lb.maglev_pick(&syn.service_key(), &syn.flow_key()).unwrap();
    assert_encapsulated(&out, &syn, &Encap::ipip(XDP_TX, drained));

    let mut states = active(&backends);
    for (a, s) in &mut states {
        if *a == drained {
            *s = BackendState::Terminating;
        }
    }
    lb.serve(&[service(VIP4, 80, Protocol::Tcp, &states)]).unwrap();

    let ack = syn.clone().flags(TCP_ACK).payload(50);
    let out = topo.run(lb.program(), &ack.frame()).unwrap();
    assert_eq!(
        assert_encapsulated(&out, &ack, &Encap::ipip(XDP_TX, drained)),
        drained,
        "a terminating backend keeps its established flow"
    );
    for port in 32000..32100 {
        let pkt = Pkt::tcp(CLIENT4, port, VIP4, 80);
        let out = topo.run(lb.program(), &pkt.frame()).unwrap();
        let want = lb.maglev_pick(&pkt.service_key(), &pkt.flow_key()).unwrap();
        let got = assert_encapsulated(&out, &pkt, &Encap::ipip(XDP_TX, want));
        assert_ne!(got, drained, "no new flow on a terminating backend");
    }

    // Maintenance: the flow itself moves, to where Maglev now sends it.
    for (a, s) in &mut states {
        if *a == drained {
            *s = BackendState::Maintenance;
        }
    }
    lb.serve(&[service(VIP4, 80, Protocol::Tcp, &states)]).unwrap();
    let frame = ack.frame();
    let out = topo.run(lb.program(), &frame).unwrap();
    let want = lb.maglev_pick(&ack.service_key(), &ack.flow_key()).unwrap();
    assert_ne!(want, drained);
    assert_eq!(assert_encapsulated(&out, &ack, &Encap::ipip(XDP_TX, want)), want);
    assert_reasons(&lb, &[("lru_miss_non_syn", reason(1, frame.len()))]);

    // Removed altogether: same, the flow is re-balanced over what is left.
    let remaining: Vec<IpAddr> = backends
        .iter()
        .copied()
        .filter(|a| *a != drained && *a != want)
        .collect();
    lb.serve(&[service(VIP4, 80, Protocol::Tcp, &active(&remaining))])
        .unwrap();
    let out = topo.run(lb.program(), &frame).unwrap();
    let again = lb.maglev_pick(&ack.service_key(), &ack.flow_key()).unwrap();
    assert!(remaining.contains(&again));
    assert_eq!(
        assert_encapsulated(&out, &ack, &Encap::ipip(XDP_TX, again)),
        again
    );
}

#[test]
fn udp_datagrams_of_one_flow_go_to_one_backend() {
    let Some((topo, mut lb)) = fixture("udp_datagrams_of_one_flow_go_to_one_backend") else {
        return;
    };
    let backends = v4_backends(10..15);
    lb.serve(&[service(VIP4, 53, Protocol::Udp, &active(&backends))])
        .unwrap();
    let pkt = Pkt::udp(CLIENT4, 5353, VIP4, 53).payload(40);
    let svc = pkt.service_key();
    let want = lb.maglev_pick(&svc, &pkt.flow_key()).unwrap();
    let frame = pkt.frame();
    for _ in 0..3 {
        let out = topo.run(lb.program(), &frame).unwrap();
        assert_eq!(assert_encapsulated(&out, &pkt, &Encap::ipip(XDP_TX, want)), want);
    }
    assert_eq!(lb.service_traffic(&svc).unwrap(), traffic(3, 3 * frame.len(), 1));
    assert_eq!(
        lb.backend_traffic(&svc, want).unwrap(),
        traffic(3, 3 * frame.len(), 1)
    );
    assert_reasons(&lb, &[]);
}

// ---------------------------------------------------------------------------------------------
// Address families and encapsulations
// ---------------------------------------------------------------------------------------------

#[test]
fn ipv6_vip_to_ipv6_backends_is_ip6ip6() {
    let Some((topo, mut lb)) = fixture("ipv6_vip_to_ipv6_backends_is_ip6ip6") else {
        return;
    };
    lb.serve(&[service(VIP6, 80, Protocol::Tcp, &active(&v6_backends(10..14)))])
        .unwrap();
    let pkt = Pkt::tcp(CLIENT6, 40000, VIP6, 80).payload(200);
    let want = lb.maglev_pick(&pkt.service_key(), &pkt.flow_key()).unwrap();
    let frame = pkt.frame();
    let out = topo.run(lb.program(), &frame).unwrap();
    assert_eq!(assert_encapsulated(&out, &pkt, &Encap::ipip(XDP_TX, want)), want);
    assert_eq!(
        lb.service_traffic(&pkt.service_key()).unwrap(),
        traffic(1, frame.len(), 1)
    );
    assert_reasons(&lb, &[]);
}

#[test]
fn mixed_families_are_4in6_and_6in4() {
    let Some((topo, mut lb)) = fixture("mixed_families_are_4in6_and_6in4") else {
        return;
    };
    let b6 = uplink_backend6(20);
    let b4 = uplink_backend4(20);
    lb.serve(&[
        service(VIP4, 80, Protocol::Tcp, &active(&[b6])),
        service(VIP6, 80, Protocol::Tcp, &active(&[b4])),
    ])
    .unwrap();
    // IPv4 client packet inside IPv6 (next header 4), and the reverse (protocol 41).
    let p4 = Pkt::tcp(CLIENT4, 40000, VIP4, 80).payload(30);
    let out = topo.run(lb.program(), &p4.frame()).unwrap();
    assert_eq!(assert_encapsulated(&out, &p4, &Encap::ipip(XDP_TX, b6)), b6);
    let p6 = Pkt::tcp(CLIENT6, 40000, VIP6, 80).payload(30);
    let out = topo.run(lb.program(), &p6.frame()).unwrap();
    assert_eq!(assert_encapsulated(&out, &p6, &Encap::ipip(XDP_TX, b4)), b4);
    assert_reasons(&lb, &[]);
}

#[test]
fn gue_services_send_ip_in_udp_to_the_configured_port() {
    let Some((topo, mut lb)) = fixture("gue_services_send_ip_in_udp_to_the_configured_port") else {
        return;
    };
    let b4 = uplink_backend4(30);
    let b6 = uplink_backend6(30);
    lb.serve(&[
        gue(service(VIP4, 80, Protocol::Tcp, &active(&[b4])), 6080),
        gue(service(VIP4, 81, Protocol::Tcp, &active(&[b6])), 6080),
        gue(service(VIP6, 80, Protocol::Tcp, &active(&[b6])), 6081),
        gue(service(VIP4, 53, Protocol::Udp, &active(&[b6])), 6082),
    ])
    .unwrap();
    let cases = [
        // IPv4 outer: UDP checksum zero (RFC 768 allows it).
        (Pkt::tcp(CLIENT4, 40000, VIP4, 80).payload(99), b4, 6080),
        // IPv6 outer: the checksum is derived from the inner headers and must be valid.
        (Pkt::tcp(CLIENT4, 40000, VIP4, 81).payload(99), b6, 6080),
        (Pkt::tcp(CLIENT6, 40000, VIP6, 80).payload(99), b6, 6081),
        (Pkt::tcp(CLIENT6, 40001, VIP6, 80).payload(0), b6, 6081),
        (Pkt::udp(CLIENT4, 40000, VIP4, 53).payload(33), b6, 6082),
        // Inner UDP without checksum: nothing to derive the outer one from, so zero.
        (
            Pkt {
                l4: L4::Udp { zero_checksum: true },
                ..Pkt::udp(CLIENT4, 40001, VIP4, 53).payload(33)
            },
            b6,
            6082,
        ),
    ];
    for (pkt, backend, port) in cases {
        let out = topo.run(lb.program(), &pkt.frame()).unwrap();
        let e = Encap {
            action: XDP_TX,
            outer_src: gateway_source(backend),
            gue_port: Some(port),
        };
        assert_eq!(assert_encapsulated(&out, &pkt, &e), backend, "{pkt:?}");
    }
    assert_reasons(&lb, &[]);
}

#[test]
fn backend_behind_another_interface_is_redirected_there() {
    let Some((topo, mut lb)) = fixture("backend_behind_another_interface_is_redirected_there") else {
        return;
    };
    let b4 = side_backend4(11);
    let b6 = side_backend6(11);
    lb.serve(&[
        service(VIP4, 80, Protocol::Tcp, &active(&[b4])),
        service(VIP6, 80, Protocol::Tcp, &active(&[b6])),
    ])
    .unwrap();
    for (pkt, backend) in [
        (Pkt::tcp(CLIENT4, 40000, VIP4, 80), b4),
        (Pkt::tcp(CLIENT6, 40000, VIP6, 80), b6),
    ] {
        // Twice: the first run fills the next-hop cache, the second is answered from it.
        for _ in 0..2 {
            let out = topo.run(lb.program(), &pkt.frame()).unwrap();
            assert_encapsulated(&out, &pkt, &Encap::ipip(XDP_REDIRECT, backend));
        }
    }
    assert_reasons(&lb, &[]);
}

#[test]
fn outer_source_takes_the_hostmask_bits_from_the_flow_hash() {
    let Some((topo, mut lb)) = fixture("outer_source_takes_the_hostmask_bits_from_the_flow_hash") else {
        return;
    };
    lb.set_sources(Some("10.0.0.64/26"), Some("fd00::100:0/112"))
        .unwrap();
    let b4 = uplink_backend4(11);
    let b6 = uplink_backend6(11);
    lb.serve(&[
        service(VIP4, 80, Protocol::Tcp, &active(&[b4])),
        service(VIP6, 80, Protocol::Tcp, &active(&[b6])),
    ])
    .unwrap();
    // base & ~mask | hash & mask, word by word as the datapath does it: the hash (and its
    // rotations for IPv6 words 1-3) stored in memory order over the address bytes.
    let outer = |base: &[u8], mask: &[u8], h: u32| -> Vec<u8> {
        let words = [h, h.rotate_left(8), h.rotate_left(16), h.rotate_left(24)];
        let hb: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        (0..base.len())
            .map(|i| (base[i] & !mask[i]) | (hb[i] & mask[i]))
            .collect()
    };
    let mut sources = std::collections::BTreeSet::new();
    for port in 1000..1050 {
        let pkt = Pkt::tcp(CLIENT4, port, VIP4, 80);
        let b = outer(&[10, 0, 0, 64], &[0, 0, 0, 63], flow_hash(&pkt.flow_key()));
        let src = IpAddr::V4(std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]));
        assert!(src >= ip("10.0.0.64") && src <= ip("10.0.0.127"));
        let out = topo.run(lb.program(), &pkt.frame()).unwrap();
        let e = Encap {
            action: XDP_TX,
            outer_src: src,
            gue_port: None,
        };
        assert_encapsulated(&out, &pkt, &e);
        sources.insert(src);

        let pkt = Pkt::tcp(CLIENT6, port, VIP6, 80);
        let base = ip("fd00::100:0");
        let IpAddr::V6(base6) = base else { unreachable!() };
        let mut mask = [0u8; 16];
        mask[14] = 0xff;
        mask[15] = 0xff;
        let b = outer(&base6.octets(), &mask, flow_hash(&pkt.flow_key()));
        let src = IpAddr::V6(<[u8; 16]>::try_from(b).unwrap().into());
        let out = topo.run(lb.program(), &pkt.frame()).unwrap();
        let e = Encap {
            action: XDP_TX,
            outer_src: src,
            gue_port: None,
        };
        assert_encapsulated(&out, &pkt, &e);
    }
    assert!(sources.len() > 20, "flows spread over the source range");
}

// ---------------------------------------------------------------------------------------------
// Packets that are not balanced
// ---------------------------------------------------------------------------------------------

#[test]
fn packets_not_for_a_service_pass_untouched() {
    let Some((topo, mut lb)) = fixture("packets_not_for_a_service_pass_untouched") else {
        return;
    };
    let backends = v4_backends(10..12);
    lb.serve(&[
        service(VIP4, 80, Protocol::Tcp, &active(&backends)),
        service(VIP6, 80, Protocol::Tcp, &active(&v6_backends(10..12))),
    ])
    .unwrap();
    let arp = {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&ROUTER_MAC);
        f.extend_from_slice(&[0x08, 0x06]);
        f.extend_from_slice(&[0u8; 28]);
        f
    };
    let icmp_to_vip = {
        // An ICMP echo request to the VIP: IP protocol 1, not balanced.
        let mut f = Pkt::tcp(CLIENT4, 1, VIP4, 80).frame();
        f[14 + 9] = 1;
        let ck = csum(0, &{
            let mut h = f[14..34].to_vec();
            h[10] = 0;
            h[11] = 0;
            h
        });
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
    let frames = [
        Pkt::tcp(CLIENT4, 40000, "10.100.0.2", 80).frame(), // not a VIP
        Pkt::tcp(CLIENT4, 40000, VIP4, 8080).frame(),       // VIP, other port
        Pkt::udp(CLIENT4, 40000, VIP4, 80).frame(),         // VIP:port, other protocol
        Pkt::tcp(CLIENT6, 40000, "fd00:100::2", 80).frame(),
        Pkt::tcp(CLIENT6, 40000, VIP6, 443).frame(),
        Pkt::tcp(CLIENT4, 40000, "10.100.0.2", 80).vlan(7).frame(),
        arp,
        icmp_to_vip,
        hop_by_hop_to_vip,
    ];
    let mut bytes = 0;
    for f in &frames {
        let out = topo.run(lb.program(), f).unwrap();
        assert_untouched(&out, f, XDP_PASS);
        bytes += f.len();
    }
    assert_reasons(&lb, &[("non_vip_pass", reason(frames.len() as u64, bytes))]);
    assert_eq!(lb.flow_count(), 0);
    assert_eq!(
        lb.service_traffic(&Pkt::tcp(CLIENT4, 1, VIP4, 80).service_key())
            .unwrap(),
        TrafficCounters::default()
    );
}

#[test]
fn removed_service_stops_being_balanced() {
    let Some((topo, mut lb)) = fixture("removed_service_stops_being_balanced") else {
        return;
    };
    lb.serve(&[service(VIP4, 80, Protocol::Tcp, &active(&v4_backends(10..12)))])
        .unwrap();
    let pkt = Pkt::tcp(CLIENT4, 40000, VIP4, 80);
    let out = topo.run(lb.program(), &pkt.frame()).unwrap();
    assert_eq!(out.action, XDP_TX);
    lb.serve(&[]).unwrap();
    // Even the established flow: the VIP entry is what makes a packet the balancer's.
    let f = pkt.flags(TCP_ACK).frame();
    let out = topo.run(lb.program(), &f).unwrap();
    assert_untouched(&out, &f, XDP_PASS);
    assert_reasons(&lb, &[("non_vip_pass", reason(1, f.len()))]);
}

/// Removals are written in batches; an entry already gone (removed behind the daemon's back)
/// is skipped, and the rest of the batch still goes.
#[test]
fn removing_services_skips_entries_already_gone() {
    let Some((topo, mut lb)) = fixture("removing_services_skips_entries_already_gone") else {
        return;
    };
    let services: Vec<Service> = (80..83)
        .map(|port| service(VIP4, port, Protocol::Tcp, &active(&v4_backends(10..12))))
        .collect();
    lb.serve(&services).unwrap();
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
    for port in 80..83 {
        let f = Pkt::tcp(CLIENT4, 40000, VIP4, port).frame();
        assert_untouched(&topo.run(lb.program(), &f).unwrap(), &f, XDP_PASS);
    }
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
    let pins = ScratchPins::new();
    let maps_dir = gatewayd::datapath::Pins::new(&pins.path).maps();
    gatewayd::datapath::ensure_bpffs(&pins.path).unwrap();
    std::fs::create_dir_all(&maps_dir).unwrap();
    outer.pin(maps_dir.join("gd_maglev")).unwrap();
    let mut held: HashOfMaps<MapData, u32, MapData> = aya::maps::Map::HashOfMaps(outer).try_into().unwrap();
    held.insert(1, &old_table(), 0).unwrap();

    let mut datapath = gatewayd::datapath::Datapath::open(&pins.path, &test_capacities()).unwrap();
    let mut maps = gatewayd::lb::maps::LbMaps::new(datapath.ebpf_mut(), &maps_dir).unwrap();
    let desired = [service(VIP4, 80, Protocol::Tcp, &active(&v4_backends(10..12)))]
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
    let Some((topo, mut lb)) = fixture("ipv4_fragments_to_a_vip") else {
        return;
    };
    lb.serve(&[service(VIP4, 53, Protocol::Udp, &active(&v4_backends(10..12)))])
        .unwrap();
    // First fragment: ports visible, but its other fragments could not follow it: dropped.
    let first = Pkt {
        frag: Some(Frag {
            offset: 0,
            more: true,
        }),
        df: false,
        ..Pkt::udp(CLIENT4, 5000, VIP4, 53).payload(64)
    }
    .frame();
    let out = topo.run(lb.program(), &first).unwrap();
    assert_eq!(out.action, XDP_DROP);
    // A later fragment has no ports, so no service: passed to the stack as not ours.
    let later = {
        let mut f = Pkt {
            frag: Some(Frag {
                offset: 9,
                more: false,
            }),
            df: false,
            ..Pkt::udp(CLIENT4, 5000, VIP4, 53).payload(64)
        }
        .frame();
        // Its bytes after the IP header are payload, not a UDP header.
        for b in &mut f[34..] {
            *b = 0xaa;
        }
        f
    };
    let out = topo.run(lb.program(), &later).unwrap();
    assert_untouched(&out, &later, XDP_PASS);
    assert_reasons(
        &lb,
        &[
            ("fragment_drop", reason(1, first.len())),
            ("non_vip_pass", reason(1, later.len())),
        ],
    );
    assert_eq!(lb.flow_count(), 0);
}

#[test]
fn ipv6_fragments_to_a_vip() {
    let Some((topo, mut lb)) = fixture("ipv6_fragments_to_a_vip") else {
        return;
    };
    lb.serve(&[service(VIP6, 53, Protocol::Udp, &active(&v6_backends(10..12)))])
        .unwrap();
    let frag = |offset, more| {
        Pkt {
            frag: Some(Frag { offset, more }),
            ..Pkt::udp(CLIENT6, 5000, VIP6, 53).payload(64)
        }
        .frame()
    };
    // First fragment, and an atomic fragment (offset 0, no M: RFC 8021): both dropped.
    let first = frag(0, true);
    let atomic = frag(0, false);
    let later = frag(9, true);
    for f in [&first, &atomic] {
        let out = topo.run(lb.program(), f).unwrap();
        assert_eq!(out.action, XDP_DROP);
    }
    let out = topo.run(lb.program(), &later).unwrap();
    assert_untouched(&out, &later, XDP_PASS);
    assert_reasons(
        &lb,
        &[
            ("fragment_drop", reason(2, first.len() + atomic.len())),
            ("non_vip_pass", reason(1, later.len())),
        ],
    );
}

#[test]
fn truncated_and_inconsistent_headers_pass_untouched() {
    let Some((topo, mut lb)) = fixture("truncated_and_inconsistent_headers_pass_untouched") else {
        return;
    };
    lb.serve(&[
        service(VIP4, 80, Protocol::Tcp, &active(&v4_backends(10..12))),
        service(VIP6, 80, Protocol::Tcp, &active(&v6_backends(10..12))),
        service(VIP4, 53, Protocol::Udp, &active(&v4_backends(10..12))),
    ])
    .unwrap();
    let syn4 = Pkt::tcp(CLIENT4, 40000, VIP4, 80).frame(); // 14 + 20 + 20
    let syn6 = Pkt::tcp(CLIENT6, 40000, VIP6, 80).frame(); // 14 + 40 + 20
    let udp4 = Pkt::udp(CLIENT4, 40000, VIP4, 53).frame(); // 14 + 20 + 8
    let set = |mut f: Vec<u8>, at: usize, bytes: &[u8]| {
        f[at..at + bytes.len()].copy_from_slice(bytes);
        f
    };
    // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header (EINVAL), so a
    // truncated Ethernet header cannot be fed to the program; every shorter header can.
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("IPv4 header cut", syn4[..14 + 12].to_vec()),
        ("TCP header cut", syn4[..14 + 20 + 10].to_vec()),
        (
            "IPv4 total length beyond the frame",
            set(syn4.clone(), 16, &[0, 80]),
        ),
        (
            "IPv4 total length shorter than the header",
            set(syn4.clone(), 16, &[0, 16]),
        ),
        // The frame has the bytes, but the IP packet ends inside the TCP header.
        (
            "TCP header beyond the IPv4 total length",
            set(syn4.clone(), 16, &[0, 30]),
        ),
        ("IPv4 ihl below 5", set(syn4.clone(), 14, &[0x44])),
        ("IPv4 ihl beyond the packet", set(syn4.clone(), 14, &[0x4f])),
        ("version 6 in an IPv4 ethertype", set(syn4.clone(), 14, &[0x65])),
        ("UDP header cut", udp4[..14 + 20 + 6].to_vec()),
        ("IPv6 header cut", syn6[..14 + 30].to_vec()),
        (
            "IPv6 payload length beyond the frame",
            set(syn6.clone(), 18, &[0, 21]),
        ),
        (
            "TCP header beyond the IPv6 payload",
            set(syn6.clone(), 18, &[0, 12]),
        ),
        (
            "IPv6 payload length 0 (jumbogram without hop-by-hop)",
            set(syn6.clone(), 18, &[0, 0]),
        ),
        ("version 4 in an IPv6 ethertype", set(syn6.clone(), 14, &[0x40])),
        ("VLAN tag cut", {
            let mut f = syn4[..12].to_vec();
            f.extend_from_slice(&[0x81, 0x00, 0x00]);
            f
        }),
        ("second VLAN tag cut", {
            let mut f = syn4[..12].to_vec();
            f.extend_from_slice(&[0x88, 0xa8, 0x00, 0x01, 0x81, 0x00, 0x00]);
            f
        }),
        ("IPv6 fragment header cut", {
            let f = Pkt {
                frag: Some(Frag {
                    offset: 0,
                    more: true,
                }),
                ..Pkt::tcp(CLIENT6, 40000, VIP6, 80)
            }
            .frame();
            // Payload length 4: consistent with the frame, too short for the header.
            let mut f = f[..14 + 40 + 4].to_vec();
            f[18..20].copy_from_slice(&[0, 4]);
            f
        }),
    ];
    let mut bytes = 0;
    for (what, f) in &cases {
        let out = topo.run(lb.program(), f).unwrap();
        assert_eq!(out.action, XDP_PASS, "{what}");
        assert_eq!(&out.data, f, "{what}: untouched");
        bytes += f.len();
    }
    assert_reasons(&lb, &[("malformed_pass", reason(cases.len() as u64, bytes))]);
    assert_eq!(lb.flow_count(), 0);
}

#[test]
fn ipv4_options_are_carried_inside_the_tunnel() {
    let Some((topo, mut lb)) = fixture("ipv4_options_are_carried_inside_the_tunnel") else {
        return;
    };
    lb.serve(&[service(VIP4, 80, Protocol::Tcp, &active(&v4_backends(10..14)))])
        .unwrap();
    // Options do not stop balancing: the ports are found after ihl*4 bytes, and the client's
    // header, options included, travels unchanged inside the tunnel.
    for options in [
        vec![1, 1, 1, 0],                                // NOPs + end of list
        vec![0x94, 4, 0, 0],                             // router alert
        [vec![7, 39, 4], vec![0; 36], vec![0]].concat(), // record route, ihl 15
    ] {
        let pkt = Pkt {
            options,
            ..Pkt::tcp(CLIENT4, 40000, VIP4, 80).payload(20)
        };
        let out = topo.run(lb.program(), &pkt.frame()).unwrap();
        let want = lb.maglev_pick(&pkt.service_key(), &pkt.flow_key()).unwrap();
        assert_eq!(assert_encapsulated(&out, &pkt, &Encap::ipip(XDP_TX, want)), want);
    }
    assert_reasons(&lb, &[]);
}

#[test]
fn ethernet_padding_is_not_carried_into_the_tunnel() {
    let Some((topo, mut lb)) = fixture("ethernet_padding_is_not_carried_into_the_tunnel") else {
        return;
    };
    lb.serve(&[service(VIP4, 53, Protocol::Udp, &active(&v4_backends(10..12)))])
        .unwrap();
    // 14 + 20 + 8 + 2 = 44 bytes: padded to the 60-byte Ethernet minimum on the wire.
    let pkt = Pkt {
        trailer: vec![0xee; 16],
        ..Pkt::udp(CLIENT4, 40000, VIP4, 53).payload(2)
    };
    let frame = pkt.frame();
    assert_eq!(frame.len(), 60);
    let out = topo.run(lb.program(), &frame).unwrap();
    let want = lb.maglev_pick(&pkt.service_key(), &pkt.flow_key()).unwrap();
    // assert_encapsulated requires the frame to end with the inner packet.
    assert_encapsulated(&out, &pkt, &Encap::ipip(XDP_TX, want));
    assert_eq!(out.data.len(), 14 + 20 + pkt.ip_packet().len());
}

// ---------------------------------------------------------------------------------------------
// Policy: source ranges, no backend, affinity, non-SYN adoption
// ---------------------------------------------------------------------------------------------

#[test]
fn source_ranges_admit_listed_clients_and_drop_the_others() {
    let Some((topo, mut lb)) = fixture("source_ranges_admit_listed_clients_and_drop_the_others") else {
        return;
    };
    let mut s4 = service(VIP4, 80, Protocol::Tcp, &active(&v4_backends(10..12)));
    s4.source_ranges = vec!["10.200.0.0/16".parse().unwrap(), "10.77.1.1/32".parse().unwrap()];
    let mut s6 = service(VIP6, 80, Protocol::Tcp, &active(&v6_backends(10..12)));
    s6.source_ranges = vec!["fd00:200::/32".parse().unwrap()];
    lb.serve(&[s4.clone(), s6]).unwrap();

    for (client, vip) in [(CLIENT4, VIP4), ("10.77.1.1", VIP4), (CLIENT6, VIP6)] {
        let pkt = Pkt::tcp(client, 40000, vip, 80);
        let out = topo.run(lb.program(), &pkt.frame()).unwrap();
        let want = lb.maglev_pick(&pkt.service_key(), &pkt.flow_key()).unwrap();
        assert_eq!(
            assert_encapsulated(&out, &pkt, &Encap::ipip(XDP_TX, want)),
            want,
            "{client}"
        );
    }
    let mut dropped = 0;
    for (client, vip) in [("10.201.0.7", VIP4), ("10.77.1.2", VIP4), ("fd00:201::7", VIP6)] {
        let f = Pkt::tcp(client, 40000, vip, 80).frame();
        let out = topo.run(lb.program(), &f).unwrap();
        assert_eq!(out.action, XDP_DROP, "{client}");
        dropped += f.len();
    }
    assert_reasons(&lb, &[("source_range_drop", reason(3, dropped))]);

    // Ranges are checked on every packet: narrowing them cuts an established flow.
    s4.source_ranges = vec!["10.77.1.1/32".parse().unwrap()];
    lb.serve(&[s4]).unwrap();
    let f = Pkt::tcp(CLIENT4, 40000, VIP4, 80).flags(TCP_ACK).frame();
    let out = topo.run(lb.program(), &f).unwrap();
    assert_eq!(out.action, XDP_DROP);
    assert_reasons(&lb, &[("source_range_drop", reason(4, dropped + f.len()))]);
}

#[test]
fn service_without_an_active_backend_drops_new_flows() {
    let Some((topo, mut lb)) = fixture("service_without_an_active_backend_drops_new_flows") else {
        return;
    };
    let b = v4_backends(10..12);
    lb.serve(&[
        service(VIP4, 80, Protocol::Tcp, &[]),
        service(
            VIP4,
            81,
            Protocol::Tcp,
            &[
                (b[0], BackendState::Terminating),
                (b[1], BackendState::Maintenance),
            ],
        ),
        service(VIP6, 80, Protocol::Udp, &[]),
    ])
    .unwrap();
    let frames = [
        Pkt::tcp(CLIENT4, 40000, VIP4, 80).frame(),
        Pkt::tcp(CLIENT4, 40000, VIP4, 81).frame(),
        Pkt::udp(CLIENT6, 40000, VIP6, 80).frame(),
    ];
    for f in &frames {
        let out = topo.run(lb.program(), f).unwrap();
        assert_eq!(out.action, XDP_DROP);
    }
    let bytes = frames.iter().map(|f| f.len()).sum();
    assert_reasons(&lb, &[("no_backend_drop", reason(3, bytes))]);
    assert_eq!(lb.flow_count(), 0);
}

#[test]
fn tcp_segment_without_a_flow_entry_is_adopted_through_maglev() {
    let Some((topo, mut lb)) = fixture("tcp_segment_without_a_flow_entry_is_adopted_through_maglev") else {
        return;
    };
    lb.serve(&[service(VIP4, 80, Protocol::Tcp, &active(&v4_backends(10..15)))])
        .unwrap();
    // The flow started on another gateway (ECMP change) or before a restart without pins.
    let pkt = Pkt::tcp(CLIENT4, 40000, VIP4, 80)
        .flags(TCP_ACK | TCP_PSH)
        .payload(300);
    let frame = pkt.frame();
    let out = topo.run(lb.program(), &frame).unwrap();
    let want = lb.maglev_pick(&pkt.service_key(), &pkt.flow_key()).unwrap();
    assert_eq!(assert_encapsulated(&out, &pkt, &Encap::ipip(XDP_TX, want)), want);
    assert_reasons(&lb, &[("lru_miss_non_syn", reason(1, frame.len()))]);
    assert!(lb.flow(&pkt.flow_key()).is_some(), "adopted into the table");
    // The next segment finds the entry: no second miss.
    let out = topo.run(lb.program(), &frame).unwrap();
    assert_encapsulated(&out, &pkt, &Encap::ipip(XDP_TX, want));
    assert_reasons(&lb, &[("lru_miss_non_syn", reason(1, frame.len()))]);
    assert_eq!(lb.service_traffic(&pkt.service_key()).unwrap().new_flows, 1);
}

#[test]
fn client_ip_affinity_sends_new_connections_of_a_client_to_its_backend() {
    let Some((topo, mut lb)) = fixture("client_ip_affinity_sends_new_connections_of_a_client_to_its_backend")
    else {
        return;
    };
    let mut s = service(VIP4, 80, Protocol::Tcp, &active(&v4_backends(10..15)));
    s.affinity_timeout = Some(3600);
    lb.serve(&[s]).unwrap();
    let first = Pkt::tcp(CLIENT4, 40000, VIP4, 80);
    let out = topo.run(lb.program(), &first.frame()).unwrap();
    let sticky = lb.maglev_pick(&first.service_key(), &first.flow_key()).unwrap();
    assert_encapsulated(&out, &first, &Encap::ipip(XDP_TX, sticky));
    // New connections from the same client whose own Maglev slot names another backend.
    let mut others = 0;
    for port in 40001..40100 {
        let pkt = Pkt::tcp(CLIENT4, port, VIP4, 80);
        if lb.maglev_pick(&pkt.service_key(), &pkt.flow_key()) == Some(sticky) {
            continue;
        }
        others += 1;
        let out = topo.run(lb.program(), &pkt.frame()).unwrap();
        assert_eq!(
            assert_encapsulated(&out, &pkt, &Encap::ipip(XDP_TX, sticky)),
            sticky,
            "affinity overrides the Maglev pick"
        );
    }
    assert!(others > 50);
    // Another client is balanced normally.
    let pkt = Pkt::tcp("10.200.0.8", 40000, VIP4, 80);
    let out = topo.run(lb.program(), &pkt.frame()).unwrap();
    let want = lb.maglev_pick(&pkt.service_key(), &pkt.flow_key()).unwrap();
    assert_eq!(assert_encapsulated(&out, &pkt, &Encap::ipip(XDP_TX, want)), want);
}

// ---------------------------------------------------------------------------------------------
// Routing outcomes
// ---------------------------------------------------------------------------------------------

#[test]
fn unresolved_next_hop_is_encapsulated_and_left_to_the_stack() {
    let Some((topo, mut lb)) = fixture("unresolved_next_hop_is_encapsulated_and_left_to_the_stack") else {
        return;
    };
    lb.serve(&[
        service(VIP4, 80, Protocol::Tcp, &active(&[ip(UNRESOLVED4)])),
        service(VIP6, 80, Protocol::Tcp, &active(&[ip(UNRESOLVED6)])),
    ])
    .unwrap();
    let mut bytes = 0;
    for (pkt, backend) in [
        (Pkt::tcp(CLIENT4, 40000, VIP4, 80), ip(UNRESOLVED4)),
        (Pkt::tcp(CLIENT6, 40000, VIP6, 80), ip(UNRESOLVED6)),
    ] {
        let f = pkt.frame();
        let out = topo.run(lb.program(), &f).unwrap();
        assert_encapsulated(&out, &pkt, &Encap::ipip(XDP_PASS, backend));
        bytes += f.len();
    }
    assert_reasons(&lb, &[("fib_no_neigh_pass", reason(2, bytes))]);
}

#[test]
fn backend_without_a_route_is_dropped() {
    let Some((topo, mut lb)) = fixture("backend_without_a_route_is_dropped") else {
        return;
    };
    lb.serve(&[
        service(VIP4, 80, Protocol::Tcp, &active(&[ip(UNROUTED4)])),
        service(VIP6, 80, Protocol::Tcp, &active(&[ip(UNROUTED6)])),
    ])
    .unwrap();
    let frames = [
        Pkt::tcp(CLIENT4, 40000, VIP4, 80).frame(),
        Pkt::tcp(CLIENT6, 40000, VIP6, 80).frame(),
    ];
    for f in &frames {
        let out = topo.run(lb.program(), f).unwrap();
        assert_eq!(out.action, XDP_DROP);
    }
    assert_reasons(&lb, &[("fib_drop", reason(2, frames[0].len() + frames[1].len()))]);
}

#[test]
fn backend_family_without_an_outer_source_is_dropped() {
    let Some((topo, mut lb)) = fixture("backend_family_without_an_outer_source_is_dropped") else {
        return;
    };
    lb.set_sources(Some("10.0.0.1/32"), None).unwrap();
    lb.serve(&[
        service(VIP4, 80, Protocol::Tcp, &active(&[uplink_backend6(10)])),
        service(VIP4, 81, Protocol::Tcp, &active(&[uplink_backend4(10)])),
    ])
    .unwrap();
    let f = Pkt::tcp(CLIENT4, 40000, VIP4, 80).frame();
    let out = topo.run(lb.program(), &f).unwrap();
    assert_eq!(out.action, XDP_DROP);
    let ok = Pkt::tcp(CLIENT4, 40000, VIP4, 81);
    let out = topo.run(lb.program(), &ok.frame()).unwrap();
    assert_encapsulated(&out, &ok, &Encap::ipip(XDP_TX, uplink_backend4(10)));
    assert_reasons(&lb, &[("no_encap_source_drop", reason(1, f.len()))]);
}

// ---------------------------------------------------------------------------------------------
// Too big once encapsulated
// ---------------------------------------------------------------------------------------------

/// Checks an ICMP "fragmentation needed" built from `pkt`: back out of the receiving port
/// (MACs swapped, tags kept), from the VIP to the client, quoting the client's IP header and
/// the first 8 bytes after it, with the MTU the client must use.
fn assert_frag_needed(out: &Outcome, pkt: &Pkt, mtu: u16) {
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

#[test]
fn too_big_ipv4_with_df_gets_fragmentation_needed_with_the_inner_mtu() {
    let Some((topo, mut lb)) = fixture("too_big_ipv4_with_df_gets_fragmentation_needed_with_the_inner_mtu")
    else {
        return;
    };
    lb.serve(&[
        service(VIP4, 80, Protocol::Tcp, &active(&[uplink_backend4(10)])),
        service(VIP4, 81, Protocol::Tcp, &active(&[uplink_backend6(10)])),
        gue(
            service(VIP4, 82, Protocol::Tcp, &active(&[uplink_backend4(10)])),
            6080,
        ),
    ])
    .unwrap();
    // Uplink MTU 1500. Each case: the largest packet that still fits, and one byte more.
    // The first run of a backend looks the route up; the following ones use the cached next
    // hop and its MTU, so both ways of detecting the problem are covered.
    let mut icmp_bytes = 0;
    let mut n = 0;
    for (port, overhead) in [(80u16, 20usize), (81, 40), (82, 28)] {
        let fits = 1500 - overhead;
        let mk = |ip_len: usize| Pkt::tcp(CLIENT4, 40000, VIP4, port).payload(ip_len - 40);
        let mut too_big = |big: Pkt| {
            let f = big.frame();
            let out = topo.run(lb.program(), &f).unwrap();
            assert_frag_needed(&out, &big, fits as u16);
            icmp_bytes += f.len();
            n += 1;
        };
        // Nothing cached yet: found by the route lookup.
        too_big(mk(fits + 1));
        let ok = mk(fits);
        let out = topo.run(lb.program(), &ok.frame()).unwrap();
        assert_eq!(out.action, XDP_TX);
        assert_eq!(out.data.len(), 14 + 1500, "exactly the MTU once encapsulated");
        // Now from the cached next hop.
        too_big(mk(fits + 1));
        too_big(mk(1500));
    }
    // IPv4 options make the quote longer (ihl*4 + 8 bytes).
    let opt = Pkt {
        options: vec![1; 12],
        ..Pkt::tcp(CLIENT4, 40001, VIP4, 80).payload(1600 - 52)
    };
    let f = opt.frame();
    let out = topo.run(lb.program(), &f).unwrap();
    assert_frag_needed(&out, &opt, 1480);
    icmp_bytes += f.len();
    n += 1;
    // Tagged: the reply goes back with the same tags.
    let tagged = Pkt::tcp(CLIENT4, 40002, VIP4, 80).payload(1460).vlan(42);
    let f = tagged.frame();
    let out = topo.run(lb.program(), &f).unwrap();
    assert_frag_needed(&out, &tagged, 1480);
    icmp_bytes += f.len();
    n += 1;
    assert_reasons(&lb, &[("too_big_icmp", reason(n, icmp_bytes))]);
}

#[test]
fn too_big_ipv4_without_df_is_dropped() {
    let Some((topo, mut lb)) = fixture("too_big_ipv4_without_df_is_dropped") else {
        return;
    };
    lb.serve(&[service(VIP4, 53, Protocol::Udp, &active(&[uplink_backend4(10)]))])
        .unwrap();
    // The client expects routers to fragment, which XDP cannot do.
    let pkt = Pkt {
        df: false,
        ..Pkt::udp(CLIENT4, 5000, VIP4, 53).payload(1481 - 28)
    };
    let f = pkt.frame();
    let out = topo.run(lb.program(), &f).unwrap();
    assert_eq!(out.action, XDP_DROP);
    assert_reasons(&lb, &[("too_big_drop", reason(1, f.len()))]);
}

#[test]
fn too_big_ipv6_gets_packet_too_big_with_the_inner_mtu() {
    let Some((topo, mut lb)) = fixture("too_big_ipv6_gets_packet_too_big_with_the_inner_mtu") else {
        return;
    };
    lb.serve(&[
        service(VIP6, 80, Protocol::Tcp, &active(&[uplink_backend6(10)])),
        service(VIP6, 53, Protocol::Udp, &active(&[uplink_backend4(10)])),
    ])
    .unwrap();
    let mut bytes = 0;
    for (pkt, mtu) in [
        (Pkt::tcp(CLIENT6, 40000, VIP6, 80).payload(1461 - 60), 1460u32),
        (Pkt::tcp(CLIENT6, 40000, VIP6, 80).payload(1500 - 60), 1460),
        (Pkt::udp(CLIENT6, 40000, VIP6, 53).payload(1481 - 48), 1480),
        (
            Pkt::tcp(CLIENT6, 40000, VIP6, 80).payload(1461 - 60).qinq(5, 6),
            1460,
        ),
    ] {
        let f = pkt.frame();
        bytes += f.len();
        let out = topo.run(lb.program(), &f).unwrap();
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
    assert_reasons(&lb, &[("too_big_icmp", reason(4, bytes))]);
}

#[test]
fn in_ipsec_mode_encapsulated_packets_are_routed_by_the_kernel() {
    let Some((topo, mut lb)) = fixture("in_ipsec_mode_encapsulated_packets_are_routed_by_the_kernel") else {
        return;
    };
    let b4 = uplink_backend4(10);
    let b6 = uplink_backend6(10);
    lb.serve(&[
        service(VIP4, 80, Protocol::Tcp, &active(&[b4])),
        service(VIP6, 80, Protocol::Tcp, &active(&[b6])),
    ])
    .unwrap();
    let mut settings = gatewayd::lb::maps::lb_settings(
        Some(format!("{GW4}/32").parse().unwrap()),
        Some(format!("{GW6}/128").parse().unwrap()),
    );
    settings.flags |= gatewayd_common::maps::LB_F_KERNEL_ROUTE;
    lb.lb.set_settings(&settings).unwrap();
    // The backend's MAC is known, yet the packet goes to the kernel, whose XFRM policies
    // encrypt it: XDP transmission would send it in the clear.
    let mut bytes = 0;
    for (pkt, backend) in [
        (Pkt::tcp(CLIENT4, 40000, VIP4, 80), b4),
        (Pkt::tcp(CLIENT6, 40000, VIP6, 80), b6),
    ] {
        let f = pkt.frame();
        let out = topo.run(lb.program(), &f).unwrap();
        assert_encapsulated(&out, &pkt, &Encap::ipip(XDP_PASS, backend));
        bytes += f.len();
    }
    assert_reasons(&lb, &[("kernel_route_pass", reason(2, bytes))]);
}

// ---------------------------------------------------------------------------------------------
// VLAN
// ---------------------------------------------------------------------------------------------

#[test]
fn vlan_tagged_vip_packets_are_encapsulated_and_left_to_the_stack() {
    let Some((topo, mut lb)) = fixture("vlan_tagged_vip_packets_are_encapsulated_and_left_to_the_stack")
    else {
        return;
    };
    let b4 = uplink_backend4(10);
    let b6 = uplink_backend6(10);
    lb.serve(&[
        service(VIP4, 80, Protocol::Tcp, &active(&[b4])),
        service(VIP6, 80, Protocol::Tcp, &active(&[b6])),
    ])
    .unwrap();
    // The way out of a tagged network is a VLAN device XDP cannot transmit on: the packet is
    // encapsulated in place, tags and MACs as received, and the stack routes it.
    let mut bytes = 0;
    for (pkt, backend) in [
        (Pkt::tcp(CLIENT4, 40000, VIP4, 80).vlan(100), b4),
        (Pkt::tcp(CLIENT6, 40000, VIP6, 80).vlan(100), b6),
        (Pkt::tcp(CLIENT4, 40001, VIP4, 80).qinq(10, 20).payload(7), b4),
        (Pkt::tcp(CLIENT6, 40001, VIP6, 80).qinq(10, 20).payload(7), b6),
    ] {
        let f = pkt.frame();
        let out = topo.run(lb.program(), &f).unwrap();
        assert_encapsulated(&out, &pkt, &Encap::ipip(XDP_PASS, backend));
        bytes += f.len();
    }
    assert_reasons(&lb, &[("vlan_pass", reason(4, bytes))]);
    // A third tag is not parsed: not balanced.
    let mut f = Pkt::tcp(CLIENT4, 40002, VIP4, 80).qinq(1, 2).frame();
    f.splice(20..20, [0x81, 0x00, 0x00, 0x03]);
    let out = topo.run(lb.program(), &f).unwrap();
    assert_untouched(&out, &f, XDP_PASS);
}

// ---------------------------------------------------------------------------------------------
// Next-hop cache
// ---------------------------------------------------------------------------------------------

#[test]
fn reused_backend_id_does_not_inherit_the_previous_backends_next_hop() {
    let Some((topo, mut lb)) = fixture("reused_backend_id_does_not_inherit_the_previous_backends_next_hop")
    else {
        return;
    };
    let (a, b, c) = (uplink_backend4(10), uplink_backend4(11), uplink_backend4(12));
    let pkt = Pkt::tcp(CLIENT4, 40000, VIP4, 80);
    // The cache is per CPU and lives fib_cache_ms (50 ms): everything runs on one CPU, and
    // quickly, so that a stale entry would still be there to be (wrongly) used.
    topo.enter(|| {
        let cpu0 = {
            let mut set = nix::sched::CpuSet::new();
            set.set(0).unwrap();
            set
        };
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpu0).unwrap();
        lb.serve(&[service(VIP4, 80, Protocol::Tcp, &active(&[a]))])
            .unwrap();
        let key = pkt.service_key();
        let id_a = lb.backend_id(&key, a);
        let out = test_run(lb.program(), topo.uplink_ifindex, &pkt.frame()).unwrap();
        assert_encapsulated(&out, &pkt, &Encap::ipip(XDP_TX, a));
        // A leaves (its id is freed), then C arrives and is given A's old id.
        lb.serve(&[service(VIP4, 80, Protocol::Tcp, &active(&[b]))])
            .unwrap();
        lb.serve(&[service(
            VIP4,
            80,
            Protocol::Tcp,
            &[(c, BackendState::Active), (b, BackendState::Terminating)],
        )])
        .unwrap();
        assert_eq!(lb.backend_id(&key, c), id_a, "the planner reuses the freed id");
        let ack = pkt.clone().src_port(40001);
        let out = test_run(lb.program(), topo.uplink_ifindex, &ack.frame()).unwrap();
        assert_encapsulated(&out, &ack, &Encap::ipip(XDP_TX, c));
    })
    .unwrap();
}
