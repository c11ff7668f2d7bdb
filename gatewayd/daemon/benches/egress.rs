//! Per-packet cost of the egress NAT programs under BPF_PROG_TEST_RUN, against a TC program
//! that only returns TC_ACT_OK (the floor, same hook type), measured in the same run.
//!
//! `cargo bench -p gatewayd --bench egress` (root). Figures and method: docs/performance.md.
//!
//! Both NAT programs rewrite the packet, so (as in benches/lb.rs) every figure is one
//! BPF_PROG_TEST_RUN call per packet with `repeat = 1`, which hands the program a fresh copy
//! of the frame, summing the kernel-measured duration of each call; the floor is measured the
//! same way. Rounds of every variant are interleaved so that load changes on the machine
//! affect them alike.
//!
//! Variants: the SNAT of a packet of an established flow (gatewayd_snat at tcx egress), the
//! reverse NAT of its reply (gatewayd_rnat at tcx ingress), and new flows: SYNs with a new
//! 5-tuple each, so every run chooses a port and inserts both conntrack entries (they are
//! deleted after the run, outside the measured time, so the table stays at its working set).
//! Every run's verdict is checked, and one run in 1009 has its whole output frame compared
//! with the frame built from scratch with the translated addresses.
//!
//! `GATEWAYD_BENCH_RUNS=<n>` changes the packets per round (default 40000, 7 rounds).

#[path = "../tests/common/mod.rs"]
mod common;

use anyhow::{bail, ensure, Context, Result};
use aya::programs::SchedClassifier;
use common::egress::*;
use common::packet::*;
use common::{compile_bpf, loadavg, median, pin_to_one_cpu, require_root, spread_of, OUTLIER_NS};
use gatewayd_common::maps::MAX_NAT_ENTRIES;

const ROUNDS: usize = 7;
const SERVER_PORT: u16 = 443;
const POD_PORT: u16 = 40000;

const FLOOR_PROGRAM: &str = r#"
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

SEC("classifier") int bench_tc_ok(struct __sk_buff *skb)
{
	return TC_ACT_OK;
}

char _license[] SEC("license") = "GPL";
"#;

fn main() {
    // `cargo test --all-targets` runs this binary without --bench: a benchmark is not a test.
    if !std::env::args().any(|a| a == "--bench") {
        println!("egress benchmark: run it with `cargo bench -p gatewayd --bench egress`");
        return;
    }
    if !require_root("egress benchmark") {
        return;
    }
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn runs_per_round() -> usize {
    std::env::var("GATEWAYD_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40_000)
}

/// The input frame of run `i`, and the frame the program must leave (None: the input, untouched).
type Packets<'a> = Box<dyn FnMut(usize) -> (Vec<u8>, Option<Vec<u8>>) + 'a>;

/// What one variant runs, and how its output is checked.
struct Variant<'a> {
    name: &'static str,
    /// Target as a multiple of the floor (None: the floor itself).
    target: Option<f64>,
    program: &'a SchedClassifier,
    packet: Packets<'a>,
    /// Run after each measured run, outside the measured time.
    after: Option<Box<dyn FnMut(usize) -> Result<()> + 'a>>,
    samples: Vec<f64>,
    outliers: u64,
}

impl Variant<'_> {
    /// One round of `runs` packets: the mean kernel-measured ns per packet.
    fn round(&mut self, runs: usize, first: usize) -> Result<f64> {
        let (mut total, mut kept) = (0u64, 0u64);
        for i in first..first + runs {
            let (frame, expected) = (self.packet)(i);
            let (verdict, out, ns) = tc_test_run(self.program, &frame)?;
            if ns <= OUTLIER_NS {
                total += ns;
                kept += 1;
            } else {
                self.outliers += 1;
            }
            ensure!(verdict == TC_ACT_OK, "{}: run {i}: verdict {verdict}", self.name);
            if i % 1009 == 0 {
                let expected = expected.as_ref().unwrap_or(&frame);
                ensure!(out == *expected, "{}: run {i}: output frame differs", self.name);
            }
            if let Some(after) = &mut self.after {
                after(i)?;
            }
        }
        Ok(total as f64 / kept.max(1) as f64)
    }
}

/// The i-th new flow: a SYN from a different pod address and port each time.
fn new_flow(i: usize) -> Pkt {
    let pod = format!("10.244.{}.{}", (i / 250) % 250, 1 + i % 250);
    Pkt::tcp(&pod, 1024 + (i % 60000) as u16, REMOTE, SERVER_PORT)
}

fn run() -> Result<()> {
    let runs = runs_per_round();
    println!(
        "gatewayd egress benchmark: BPF_PROG_TEST_RUN, repeat=1 per packet, {ROUNDS} rounds x {runs} packets per variant, median round shown"
    );
    println!("load average at start: {}", loadavg());
    pin_to_one_cpu()?;
    let mut floor_obj = aya::Ebpf::load(&compile_bpf(FLOOR_PROGRAM)?)?;
    let floor: &mut SchedClassifier = floor_obj
        .program_mut("bench_tc_ok")
        .context("bench_tc_ok")?
        .try_into()?;
    floor.load()?;
    let floor: &SchedClassifier = floor_obj.program("bench_tc_ok").unwrap().try_into()?;

    // An established flow: its SYN went out first (and was checked like in the tests).
    // Both at the daemon's default NAT table size.
    let nat = Nat::sized(settings(), MAX_NAT_ENTRIES)?;
    let syn = Pkt::tcp(POD, POD_PORT, REMOTE, SERVER_PORT);
    let port = assert_snat(&nat, &syn, EGRESS_WIDE);
    let ack = Pkt::tcp(POD, POD_PORT, REMOTE, SERVER_PORT).flags(TCP_ACK);
    let ack_out = ack.with(EGRESS_WIDE, port, REMOTE, SERVER_PORT).frame();
    let reply = ack.reply(ack.l4).with(REMOTE, SERVER_PORT, EGRESS_WIDE, port);
    let reply_out = reply.with(REMOTE, SERVER_PORT, POD, POD_PORT).frame();
    let (ack, reply) = (ack.frame(), reply.frame());
    // New flows in a datapath of their own, so their entries never meet the established one.
    let mut fresh = Nat::sized(settings(), MAX_NAT_ENTRIES)?;
    let fresh_snat: &SchedClassifier = fresh
        .ebpf
        .program("gatewayd_snat")
        .context("gatewayd_snat")?
        .try_into()?;

    let mut variants = vec![
        Variant {
            name: "floor: TC_ACT_OK program",
            target: None,
            program: floor,
            packet: Box::new(|_| (ack.clone(), None)),
            after: None,
            samples: vec![],
            outliers: 0,
        },
        Variant {
            name: "SNAT, established flow",
            target: Some(4.0),
            program: nat.program("gatewayd_snat")?,
            packet: Box::new(|_| (ack.clone(), Some(ack_out.clone()))),
            after: None,
            samples: vec![],
            outliers: 0,
        },
        Variant {
            name: "reverse NAT, reply of that flow",
            target: Some(4.0),
            program: nat.program("gatewayd_rnat")?,
            packet: Box::new(|_| (reply.clone(), Some(reply_out.clone()))),
            after: None,
            samples: vec![],
            outliers: 0,
        },
        Variant {
            name: "SNAT, new flow (port + 2 entries)",
            target: Some(10.0),
            program: fresh_snat,
            packet: Box::new(|i| {
                let p = new_flow(i);
                // An empty table: the port is the flow's first choice.
                let port = first_choice(&p, PORT_MIN, PORT_MAX);
                let out = p.with(EGRESS_WIDE, port, REMOTE, SERVER_PORT).frame();
                (p.frame(), Some(out))
            }),
            after: Some(Box::new(|i| {
                let p = new_flow(i);
                let port = first_choice(&p, PORT_MIN, PORT_MAX);
                let original = fresh
                    .table
                    .get(&p.flow_key(), 0)
                    .context("no ORIGINAL entry after a new flow")?;
                ensure!(
                    u16::from_be(original.port) == port,
                    "new flow {i}: port {}",
                    u16::from_be(original.port)
                );
                fresh.table.remove(&p.flow_key())?;
                Ok(fresh.table.remove(&reply_key(&p, EGRESS_WIDE, port))?)
            })),
            samples: vec![],
            outliers: 0,
        },
    ];
    for round in 0..ROUNDS {
        for v in variants.iter_mut() {
            let ns = v.round(runs, round * runs)?;
            v.samples.push(ns);
        }
    }
    println!("load average at end: {}", loadavg());
    let rows: Vec<_> = variants
        .into_iter()
        .map(|v| (v.name, v.target, v.samples, v.outliers))
        .collect();
    let floor_ns = median(&rows[0].2);
    println!();
    println!(
        "{:<36} {:>8} {:>15} {:>8} {:>7} {:>5}",
        "variant", "ns/pkt", "(min-max)", "x floor", "target", ""
    );
    for (name, target, samples, outliers) in &rows {
        let ns = median(samples);
        let (lo, hi) = spread_of(samples);
        let mult = ns / floor_ns;
        let (target, verdict) = match target {
            Some(t) => (format!("{t:.0}x"), if mult <= *t { "PASS" } else { "MISS" }),
            None => ("-".into(), ""),
        };
        println!(
            "{:<36} {ns:>8.1} {:>15} {mult:>8.2} {target:>7} {verdict:>5}",
            name,
            format!("({lo:.1}-{hi:.1})")
        );
        if *outliers > 0 {
            println!(
                "  ({} of {} runs over {} us left out: interrupted)",
                outliers,
                ROUNDS * runs,
                OUTLIER_NS / 1000
            );
        }
    }
    println!("ns/pkt: kernel-measured time per packet, median of the rounds' means (min-max of the rounds).");
    if !nat.reasons().is_empty() || !fresh.reasons().is_empty() {
        bail!(
            "the programs counted drop/pass reasons: {:?} {:?}",
            nat.reasons(),
            fresh.reasons()
        );
    }
    Ok(())
}
