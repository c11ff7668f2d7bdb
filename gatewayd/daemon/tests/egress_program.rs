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

mod common;

use common::egress::*;
use common::packet::*;
use common::require_root;
use gatewayd::datapath::monotonic_ns;
use gatewayd_common::maps::{
    addr_bytes, EgressCounters, NatEntry, NAT_DIR_REPLY, NAT_OPEN, NAT_TCP_CLOSING, NAT_TCP_ESTABLISHED,
    NAT_TCP_SYN_SENT,
};

/// A live REPLY entry of another pod's flow (POD_OTHER, port 41000), in `state`.
fn foreign_reply(state: u8) -> NatEntry {
    NatEntry {
        addr: addr_bytes(ip(POD_OTHER)).0,
        created_ns: monotonic_ns(),
        last_seen_ns: monotonic_ns(),
        expires_ns: monotonic_ns() + 3600 * S,
        policy_id: WIDE,
        port: 41000u16.to_be(),
        state,
        dir: NAT_DIR_REPLY,
    }
}

/// The NAT object with the standard policies and settings (None without root: skipped).
fn standard(name: &str) -> Option<Nat> {
    require_root(name).then(|| Nat::new(settings()).unwrap())
}

// ---------------------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------------------

#[test]
fn tcp_udp_and_echo_are_translated_and_their_replies_translated_back() {
    let Some(nat) = standard("tcp_udp_and_echo_are_translated_and_their_replies_translated_back") else {
        return;
    };
    let before = monotonic_ns();

    // TCP: the SYN opens the mapping, the SYN-ACK comes back to the pod and establishes it.
    let syn = Pkt::tcp(POD, 40000, REMOTE, 443);
    let port = assert_snat(&nat, &syn, EGRESS_WIDE);
    assert_eq!(port, first_choice(&syn, PORT_MIN, PORT_MAX));
    let (o, _) = flow_entries(&nat, &syn, EGRESS_WIDE, port);
    assert_eq!((o.state, o.policy_id), (NAT_TCP_SYN_SENT, WIDE));
    assert_eq!(timeout_ns(&o), 60 * S);
    assert_eq!(o.created_ns, o.last_seen_ns);
    assert!(o.last_seen_ns + S >= before && o.last_seen_ns <= monotonic_ns());

    let syn_ack = Pkt::tcp(REMOTE, 443, EGRESS_WIDE, port).flags(TCP_SYN | TCP_ACK);
    let (verdict, out) = nat.rnat(&syn_ack.frame());
    assert_eq!(verdict, TC_ACT_OK);
    check_frame(&out);
    assert_eq!(out, syn_ack.with(REMOTE, 443, POD, 40000).frame());
    let (o, _) = flow_entries(&nat, &syn, EGRESS_WIDE, port);
    assert_eq!(o.state, NAT_TCP_ESTABLISHED);
    assert_eq!(timeout_ns(&o), 3600 * S);

    // Established traffic keeps the port, with a payload.
    let data = Pkt::tcp(POD, 40000, REMOTE, 443).flags(TCP_ACK | TCP_PSH);
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
    let Some(nat) = standard("ipv6_tcp_udp_and_echo_are_translated_both_ways") else {
        return;
    };
    for pkt in [
        Pkt::tcp(POD6, 40000, REMOTE6, 443),
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
    let Some(nat) = standard("unselected_sources_excluded_destinations_and_other_traffic_pass_untouched")
    else {
        return;
    };
    for pkt in [
        Pkt::tcp(POD_UNSELECTED, 40000, REMOTE, 443),
        Pkt::tcp(POD, 40000, EXCLUDED_DST, 443),
        Pkt::udp(POD, 40000, EXCLUDED_DST, 53),
        Pkt::echo(POD, EXCLUDED_DST, 1, false),
        Pkt::udp("fd00:99::1", 40000, REMOTE6, 53),
    ] {
        let frame = pkt.frame();
        assert_eq!(nat.snat(&frame), (TC_ACT_OK, frame.clone()), "{pkt:?}");
    }
    // Replies to addresses without a mapping, and traffic that is not IP.
    let stray = Pkt::tcp(REMOTE, 443, "192.0.2.99", 20001).flags(TCP_ACK).frame();
    assert_eq!(nat.rnat(&stray), (TC_ACT_OK, stray.clone()));
    let arp = arp_request();
    assert_eq!(nat.snat(&arp), (TC_ACT_OK, arp.clone()));
    assert_eq!(nat.rnat(&arp), (TC_ACT_OK, arp.clone()));

    assert!(nat.entries().is_empty());
    assert!(nat.reasons().is_empty(), "{:?}", nat.reasons());
    assert_eq!(nat.counters(WIDE), EgressCounters::default());
}

#[test]
fn most_specific_destination_wins_and_sources_pick_among_candidates() {
    let Some(nat) = standard("most_specific_destination_wins_and_sources_pick_among_candidates") else {
        return;
    };
    // 203.0.113.0/24 lists NARROW (its own /24) before WIDE (0.0.0.0/0).
    let narrow = Pkt::tcp(POD_NARROW, 40000, REMOTE_NARROW, 443);
    assert_snat(&nat, &narrow, EGRESS_NARROW);
    // Not in NARROW's sources: the next candidate, WIDE, takes it.
    let other = Pkt::tcp(POD_OTHER, 40000, REMOTE_NARROW, 443);
    assert_snat(&nat, &other, EGRESS_WIDE);
    // Outside 203.0.113.0/24 NARROW's pods go through WIDE too.
    let elsewhere = Pkt::tcp(POD_NARROW, 40000, REMOTE, 443);
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
        Pkt::tcp(POD, 40000, REMOTE, 443),
        Pkt::tcp(POD, 40001, REMOTE, 443),
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
    let Some(mut nat) = standard("a_port_held_by_another_flow_is_not_reused_but_an_expired_one_is") else {
        return;
    };
    let pkt = Pkt::tcp(POD, 40000, REMOTE, 443);
    let first = first_choice(&pkt, PORT_MIN, PORT_MAX);
    // Another pod's flow to the same destination holds the first choice.
    let reply_key = Pkt::tcp(REMOTE, 443, EGRESS_WIDE, first)
        .flags(TCP_ACK)
        .flow_key();
    let foreign = foreign_reply(NAT_TCP_ESTABLISHED);
    nat.put_entry(reply_key, foreign);
    let port = assert_snat(&nat, &pkt, EGRESS_WIDE);
    assert_ne!(port, first, "the held port must not be given to a second flow");
    // The next candidate is a function of the flow too: a standby picks it the same way.
    assert_eq!(port, choice(&pkt, 1, PORT_MIN, PORT_MAX));
    assert_eq!(nat.entry(&reply_key), Some(foreign), "the holder is untouched");
    flow_entries(&nat, &pkt, EGRESS_WIDE, port);
    // Its replies reach this pod, the holder's reach the holder.
    let back = Pkt::tcp(REMOTE, 443, EGRESS_WIDE, port).flags(TCP_SYN | TCP_ACK);
    let (_, out) = nat.rnat(&back.frame());
    assert_eq!(out, back.with(REMOTE, 443, POD, 40000).frame());
    let holder = Pkt::tcp(REMOTE, 443, EGRESS_WIDE, first).flags(TCP_ACK);
    let (_, out) = nat.rnat(&holder.frame());
    assert_eq!(out, holder.with(REMOTE, 443, POD_OTHER, 41000).frame());

    // The same port toward another destination is free: ports are per destination.
    let elsewhere = Pkt::tcp(POD, 40000, "198.51.100.8", 443);
    let p2 = assert_snat(&nat, &elsewhere, EGRESS_WIDE);
    assert_eq!(p2, first_choice(&elsewhere, PORT_MIN, PORT_MAX));

    // Once the holder has expired, a new flow that wants the port takes it over.
    let mut expired = foreign;
    expired.expires_ns = 2;
    nat.put_entry(reply_key, expired);
    let pkt2 = Pkt::tcp(POD, 40000, REMOTE, 443);
    nat.table.remove(&pkt2.flow_key()).unwrap();
    let old_reply = Pkt::tcp(REMOTE, 443, EGRESS_WIDE, port).flags(TCP_ACK).flow_key();
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
    assert!(nat.entry(&c.flow_key()).is_none());
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
    let Some(mut nat) = standard("fin_and_rst_move_both_entries_to_the_closing_timeout") else {
        return;
    };
    // FIN from the pod.
    let syn = Pkt::tcp(POD, 40000, REMOTE, 443);
    let port = assert_snat(&nat, &syn, EGRESS_WIDE);
    let syn_ack = Pkt::tcp(REMOTE, 443, EGRESS_WIDE, port).flags(TCP_SYN | TCP_ACK);
    nat.rnat(&syn_ack.frame());
    assert_eq!(
        flow_entries(&nat, &syn, EGRESS_WIDE, port).0.state,
        NAT_TCP_ESTABLISHED
    );
    assert_snat(
        &nat,
        &Pkt::tcp(POD, 40000, REMOTE, 443).flags(TCP_FIN | TCP_ACK),
        EGRESS_WIDE,
    );
    let (o, _) = flow_entries(&nat, &syn, EGRESS_WIDE, port);
    assert_eq!((o.state, timeout_ns(&o)), (NAT_TCP_CLOSING, 10 * S));
    // The last ACK still goes through while closing.
    let last = Pkt::tcp(REMOTE, 443, EGRESS_WIDE, port).flags(TCP_FIN | TCP_ACK);
    let (_, out) = nat.rnat(&last.frame());
    assert_eq!(out, last.with(REMOTE, 443, POD, 40000).frame());

    // RST from the remote side.
    let syn2 = Pkt::tcp(POD, 40002, REMOTE, 443);
    let port2 = assert_snat(&nat, &syn2, EGRESS_WIDE);
    let rst = Pkt::tcp(REMOTE, 443, EGRESS_WIDE, port2).flags(TCP_RST | TCP_ACK);
    let (_, out) = nat.rnat(&rst.frame());
    assert_eq!(out, rst.with(REMOTE, 443, POD, 40002).frame());
    let (o, _) = flow_entries(&nat, &syn2, EGRESS_WIDE, port2);
    assert_eq!((o.state, timeout_ns(&o)), (NAT_TCP_CLOSING, 10 * S));

    // Past the timeout the mapping is gone for replies and made anew by the pod's next SYN,
    // on the same (deterministic) port.
    for key in [syn2.flow_key(), rst.flow_key()] {
        let mut e = nat.entry(&key).unwrap();
        e.expires_ns = monotonic_ns() - S;
        nat.put_entry(key, e);
    }
    let late = Pkt::tcp(REMOTE, 443, EGRESS_WIDE, port2).flags(TCP_ACK).frame();
    assert_eq!(nat.rnat(&late), (TC_ACT_OK, late.clone()), "expired: untouched");
    assert_eq!(nat.reasons().get("rnat_miss_pass"), Some(&(1, late.len() as u64)));
    assert_eq!(assert_snat(&nat, &syn2, EGRESS_WIDE), port2);
    let (o, _) = flow_entries(&nat, &syn2, EGRESS_WIDE, port2);
    assert_eq!(o.state, NAT_TCP_SYN_SENT);
    assert_eq!(nat.counters(WIDE).new_flows, 3);
}

#[test]
fn a_lost_half_is_rebuilt_on_the_same_port() {
    let Some(mut nat) = standard("a_lost_half_is_rebuilt_on_the_same_port") else {
        return;
    };
    let pkt = Pkt::udp(POD, 5353, REMOTE, 53);
    let port = assert_snat(&nat, &pkt, EGRESS_WIDE);
    // The ORIGINAL half evicted: the next packet maps again and finds its own REPLY half.
    nat.table.remove(&pkt.flow_key()).unwrap();
    assert_eq!(assert_snat(&nat, &pkt, EGRESS_WIDE), port);
    flow_entries(&nat, &pkt, EGRESS_WIDE, port);

    // The REPLY half evicted: the next refresh of the ORIGINAL half finds it missing and
    // drops the ORIGINAL half too, so that the flow maps again rather than half-working.
    let reply = pkt.reply(L4::Udp).with(REMOTE, 53, EGRESS_WIDE, port);
    nat.table.remove(&reply.flow_key()).unwrap();
    let mut o = nat.entry(&pkt.flow_key()).unwrap();
    o.last_seen_ns -= 2 * S; // due for a refresh
    nat.put_entry(pkt.flow_key(), o);
    assert_eq!(assert_snat(&nat, &pkt, EGRESS_WIDE), port);
    assert!(nat.entry(&pkt.flow_key()).is_none());
    assert_eq!(assert_snat(&nat, &pkt, EGRESS_WIDE), port);
    flow_entries(&nat, &pkt, EGRESS_WIDE, port);

    // The REPLY key now holds another pod's flow: the same, and the flow moves to a new port.
    let foreign = foreign_reply(NAT_OPEN);
    nat.put_entry(reply.flow_key(), foreign);
    let mut o = nat.entry(&pkt.flow_key()).unwrap();
    o.last_seen_ns -= 2 * S;
    nat.put_entry(pkt.flow_key(), o);
    assert_eq!(assert_snat(&nat, &pkt, EGRESS_WIDE), port);
    assert!(nat.entry(&pkt.flow_key()).is_none());
    assert_eq!(nat.entry(&reply.flow_key()), Some(foreign));
    let moved = assert_snat(&nat, &pkt, EGRESS_WIDE);
    assert_ne!(moved, port);
    flow_entries(&nat, &pkt, EGRESS_WIDE, moved);
}

#[test]
fn icmp_errors_quoting_translated_packets_are_translated_back() {
    let Some(nat) = standard("icmp_errors_quoting_translated_packets_are_translated_back") else {
        return;
    };
    let cases: [(Pkt, &str, &str, &str); 6] = [
        (Pkt::udp(POD, 5353, REMOTE, 53), EGRESS_WIDE, ROUTER, POD),
        (Pkt::tcp(POD, 40000, REMOTE, 443), EGRESS_WIDE, ROUTER, POD),
        (Pkt::echo(POD, REMOTE, 0x0abc, false), EGRESS_WIDE, ROUTER, POD),
        (Pkt::udp(POD6, 5353, REMOTE6, 53), EGRESS_V6, ROUTER6, POD6),
        (Pkt::tcp(POD6, 40000, REMOTE6, 443), EGRESS_V6, ROUTER6, POD6),
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
        let port = u16::from_be(nat.entry(&flow.flow_key()).expect("flow mapped above").port);
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
    let Some(nat) = standard("a_zero_udp_checksum_stays_zero") else {
        return;
    };
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
    let Some(nat) = standard("later_fragments_get_the_egress_address_and_unsupported_protocols_are_counted")
    else {
        return;
    };
    for (pod, remote, egress) in [(POD, REMOTE, EGRESS_WIDE), (POD6, REMOTE6, EGRESS_V6)] {
        // The first fragment carries the ports and goes through the conntrack...
        let first = Pkt::udp(pod, 5353, remote, 53).fragment(0, true);
        let port = assert_snat(&nat, &first, egress);
        // ...its L4 checksum covers the whole datagram, so only the header sum is checkable.
        let later = Pkt::udp(pod, 5353, remote, 53).fragment(4, false);
        let (verdict, out) = nat.snat(&later.frame());
        assert_eq!(verdict, TC_ACT_OK);
        check_frame(&out);
        assert_eq!(out, later.with(egress, 5353, remote, 53).frame());
        // The reply's later fragments carry no port to find the pod by: passed, counted.
        let back = Pkt::udp(remote, 53, egress, port).fragment(4, false);
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
    let Some(mut nat) = standard("malformed_and_truncated_packets_pass_untouched") else {
        return;
    };
    let tcp = Pkt::tcp(POD, 40000, REMOTE, 443).frame();
    let udp = Pkt::udp(POD, 5353, REMOTE, 53).frame();
    let echo = Pkt::echo(POD, REMOTE, 9, false).frame();
    let tcp6 = Pkt::tcp(POD6, 40000, REMOTE6, 443).frame();
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
