//! Per-packet cost of the XDP load balancer under BPF_PROG_TEST_RUN, against the cost of a
//! program that only returns XDP_PASS (the floor), and the Maglev table rebuild time.
//!
//! `cargo bench -p gatewayd --bench lb` (root). Method, machine and figures:
//! docs/performance.md.
//!
//! Method. BPF_PROG_TEST_RUN with `repeat = N` does not give each run a fresh copy of the
//! packet: a program that rewrites the packet (encapsulation) sees its own output from the
//! second run on, so such a figure measures the wrong path. Every figure here is therefore
//! one call per packet with `repeat = 1`, summing the kernel-measured duration of each call
//! (which covers the program run plus the kernel's fixed timing overhead, not the syscall or
//! the copies), and the floor is measured the same way. The floor with `repeat = N` is shown
//! too: the difference is the fixed per-call overhead that the repeat=1 method adds to every
//! figure.
//!
//! The datapaths for 1, 1,000 and 100,000 services are loaded side by side and every round
//! of every variant of every service count is interleaved, so that a change of machine load
//! during the run affects all of them alike (the growth from 1 to 100,000 services compares
//! figures taken at the same time).
//!
//! Every variant checks the verdict of every run, the whole output packet of a sample of runs
//! (outer headers, MACs, inner packet byte for byte, the backend Maglev names), and that no
//! packet of an established flow missed the connection table.
//!
//! `GATEWAYD_BENCH_RUNS=<n>` changes the packets per round (default 40000, 7 rounds);
//! `GATEWAYD_BENCH_SERVICES=1,1000` runs only some service counts.

#[path = "../tests/common/mod.rs"]
mod common;

use anyhow::{bail, Context, Result};
use aya::programs::Xdp;
use common::lb::*;
use common::packet::*;
use common::{compile_bpf, loadavg, median, pin_to_one_cpu, require_root, spread_of, OUTLIER_NS};
use gatewayd::datapath::Capacities;
use gatewayd::lb::maglev::{build_table, MaglevBackend};
use gatewayd::lb::plan::LbParams;
use gatewayd::model::{BackendState, Protocol, Service};
use gatewayd_common::maps::{FlowEventRecord, FlowKey, LbFlow, Observe, EVENT_LB_NEW_FLOW};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

const ROUNDS: usize = 7;
const SERVICE_COUNTS: [usize; 3] = [1, 1_000, 100_000];
const ESTABLISHED_FLOWS: u32 = 1_000_000;
/// Prime Maglev table size for every service in the benchmark: 100,000 tables of the default
/// 16381 slots would take 6.5 GB and minutes to write. The per-packet cost does not depend on
/// the size (one array lookup at hash % size), except for cache effects.
const BENCH_TABLE_SIZE: u32 = 31;

/// Above this many services the Maglev tables are written in batches (see serve_batched).
const DAEMON_PATH_MAX_SERVICES: usize = 1_000;

/// Reference programs: the floor, and bare lookups and inserts in LRU hashes shaped like the
/// connection table (same key and value sizes, same capacity), to tell how much of a figure is
/// the table itself: its memory latency, its insert.
const REFERENCE_PROGRAMS: &str = r#"
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct flow_key {
	__u8 src[16];
	__u8 dst[16];
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 family;
	__u16 pad;
};

struct flow {
	__u32 backend_id;
	__u32 service_id;
};

#define FLOW_TABLE(name, flags)                                                                   \
	struct {                                                                                   \
		__uint(type, BPF_MAP_TYPE_LRU_HASH);                                               \
		__type(key, struct flow_key);                                                      \
		__type(value, struct flow);                                                        \
		__uint(max_entries, 1048576);                                                      \
		__uint(map_flags, flags);                                                          \
	} name SEC(".maps")

FLOW_TABLE(bench_flows, 0);
FLOW_TABLE(bench_new, 0);
FLOW_TABLE(bench_new_percpu, BPF_F_NO_COMMON_LRU);

SEC("xdp") int bench_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

/* The 5-tuple of an IPv4 + TCP packet without options. */
static __always_inline int flow_key(struct xdp_md *ctx, struct flow_key *k)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;

	if (data + 38 > end)
		return -1;
	__builtin_memcpy(k->src, data + 26, 4);
	__builtin_memcpy(k->dst, data + 30, 4);
	k->sport = *(__u16 *)(data + 34);
	k->dport = *(__u16 *)(data + 36);
	k->proto = 6;
	k->family = 4;
	return 0;
}

/* PASS when the flow is in bench_flows, DROP otherwise. */
SEC("xdp") int bench_lookup(struct xdp_md *ctx)
{
	struct flow_key k = {};

	if (flow_key(ctx, &k))
		return XDP_ABORTED;
	return bpf_map_lookup_elem(&bench_flows, &k) ? XDP_PASS : XDP_DROP;
}

/* Inserts the flow into `table`: PASS when the insert worked. */
#define INSERT_PROGRAM(name, table)                                                               \
	SEC("xdp") int name(struct xdp_md *ctx)                                                    \
	{                                                                                          \
		struct flow_key k = {};                                                            \
		struct flow f = { 1, 1 };                                                          \
                                                                                                   \
		if (flow_key(ctx, &k))                                                             \
			return XDP_ABORTED;                                                        \
		return bpf_map_update_elem(&table, &k, &f, BPF_ANY) ? XDP_DROP : XDP_PASS;         \
	}

INSERT_PROGRAM(bench_insert, bench_new)
/* The same into an LRU hash with per-CPU LRU lists (BPF_F_NO_COMMON_LRU). */
INSERT_PROGRAM(bench_insert_percpu, bench_new_percpu)

char _license[] SEC("license") = "GPL";
"#;

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary without it,
    // and a minute of benchmark is not a test.
    if !std::env::args().any(|a| a == "--bench") {
        println!("lb benchmark: run it with `cargo bench -p gatewayd --bench lb`");
        return;
    }
    if !require_root("lb benchmark") {
        return;
    }
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn service_counts() -> Vec<usize> {
    match std::env::var("GATEWAYD_BENCH_SERVICES") {
        Ok(v) => v.split(',').filter_map(|n| n.trim().parse().ok()).collect(),
        Err(_) => SERVICE_COUNTS.to_vec(),
    }
}

fn runs_per_round() -> usize {
    std::env::var("GATEWAYD_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40_000)
}

/// The reference programs, compiled now rather than kept in xdp/ (build.rs embeds every
/// xdp/*.c into the daemon).
fn load_reference_programs() -> Result<aya::Ebpf> {
    let mut ebpf = aya::Ebpf::load(&compile_bpf(REFERENCE_PROGRAMS)?)?;
    for name in [
        "bench_pass",
        "bench_lookup",
        "bench_insert",
        "bench_insert_percpu",
    ] {
        let prog: &mut Xdp = ebpf.program_mut(name).unwrap().try_into()?;
        prog.load()?;
    }
    Ok(ebpf)
}

/// xorshift64*: reproducible random flow choice without another dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn vip(service: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(
        u32::from(Ipv4Addr::new(10, 100, 0, 0)) + 1 + service as u32,
    ))
}

/// `count` TCP services, two backends each (on the uplink, so the path ends in XDP_TX).
fn services(count: usize) -> Vec<Service> {
    (0..count)
        .map(|i| {
            let a = uplink_backend4(10 + (i % 80) as u8);
            let b = uplink_backend4(10 + ((i + 1) % 80) as u8);
            let mut s = service(
                &vip(i).to_string(),
                80,
                Protocol::Tcp,
                &[(a, BackendState::Active), (b, BackendState::Active)],
            );
            s.name = format!("svc{i}");
            s
        })
        .collect()
}

/// Client `n` of a family of distinct 5-tuples: 40,000 source ports per source address.
fn client(base: [u8; 4], n: u32) -> (IpAddr, u16) {
    let addr = u32::from(Ipv4Addr::from(base)) + n / 40_000;
    (IpAddr::V4(Ipv4Addr::from(addr)), 20_000 + (n % 40_000) as u16)
}

fn packet(template: &Pkt, src: (IpAddr, u16), service: usize) -> Pkt {
    Pkt {
        src: src.0,
        sport: src.1,
        dst: vip(service),
        ..template.clone()
    }
}

type FlowTable = aya::maps::HashMap<aya::maps::MapData, FlowKey, LbFlow>;

/// The connection table a new-flow variant removes its entries from.
enum Forget<'a> {
    Owned(FlowTable),
    Borrowed(&'a mut FlowTable),
}

impl Forget<'_> {
    fn remove(&mut self, key: &FlowKey) -> Result<()> {
        match self {
            Forget::Owned(t) => t.remove(key)?,
            Forget::Borrowed(t) => t.remove(key)?,
        }
        Ok(())
    }
}

/// `gatewayctl observe` as the datapath sees it: the gd_observe flag on, and a reader that
/// takes every event out of the ring buffer.
struct Observer {
    maps: std::rc::Rc<std::cell::RefCell<ObserverMaps>>,
    /// Whether each run must produce an event (new flows) or none (established flows).
    expect_event: bool,
}

/// One reader per ring: a ring-buffer handle keeps its own consumer position, so a second
/// handle would read again what the first consumed.
struct ObserverMaps {
    flag: aya::maps::Array<aya::maps::MapData, Observe>,
    ring: aya::maps::RingBuf<aya::maps::MapData>,
}

impl Observer {
    /// Observers of one datapath: one that expects no events, one that expects one per run.
    fn pair(lb: &Balancer) -> Result<(Self, Self)> {
        let maps = lb.datapath.pins().maps();
        let open = |name: &str| -> Result<aya::maps::Map> {
            Ok(aya::maps::Map::from_map_data(aya::maps::MapData::from_pin(
                maps.join(name),
            )?)?)
        };
        let shared = std::rc::Rc::new(std::cell::RefCell::new(ObserverMaps {
            flag: open("gd_observe")?.try_into()?,
            ring: open("gd_events")?.try_into()?,
        }));
        Ok((
            Observer {
                maps: shared.clone(),
                expect_event: false,
            },
            Observer {
                maps: shared,
                expect_event: true,
            },
        ))
    }

    /// Only while its own rounds run: the other variants of the same datapath stay unobserved.
    fn set(&mut self, enabled: bool) -> Result<()> {
        self.maps.borrow_mut().flag.set(
            0,
            Observe {
                enabled: u32::from(enabled),
                pad: 0,
            },
            0,
        )?;
        Ok(())
    }

    /// Consumes what one run wrote (outside the measured time) and checks it: one new-flow
    /// event for a new flow, nothing for an established one.
    fn consume(&mut self, pkt: &Pkt) -> Result<()> {
        let mut events = Vec::new();
        let mut maps = self.maps.borrow_mut();
        while let Some(item) = maps.ring.next() {
            // SAFETY: the datapath writes whole gd_flow_event records; read_unaligned copes
            // with the ring's alignment.
            events.push(unsafe { std::ptr::read_unaligned::<FlowEventRecord>(item.as_ptr().cast()) });
        }
        let key = pkt.flow_key();
        match (events.as_slice(), self.expect_event) {
            ([ev], true) if ev.kind == EVENT_LB_NEW_FLOW && ev.key == key => Ok(()),
            ([], false) => Ok(()),
            (events, _) => bail!("observer: the run for {key:?} produced {events:?}"),
        }
    }
}

/// What a variant feeds a program and expects back.
struct Variant<'a> {
    name: &'static str,
    /// Services configured (0 for the floor, which has none).
    services: usize,
    /// Target as a multiple of the floor (None: the floor itself, or informative).
    target: Option<f64>,
    program: &'a Xdp,
    /// The datapath behind `program`, for the output checks (None for the floor).
    lb: Option<&'a Balancer>,
    /// Set for new-flow variants: each run's entry is removed afterwards (outside the
    /// measured time), so the table keeps the phase's working set and every run inserts.
    forget: Option<Forget<'a>>,
    next: Box<dyn FnMut(&mut Rng) -> Pkt + 'a>,
    action: u32,
    samples: Vec<f64>,
    /// Runs left out as interrupted (see `round`).
    outliers: u64,
    /// Set for the "observer attached" variants.
    observer: Option<Observer>,
}

impl<'a> Variant<'a> {
    fn floor(pass: &'a Xdp, frame: &'a Pkt) -> Self {
        Self::reference("floor: XDP_PASS program", pass, XDP_PASS, move |_| frame.clone())
    }

    /// A reference program: the packet must come back untouched with `action`.
    fn reference(
        name: &'static str,
        program: &'a Xdp,
        action: u32,
        next: impl FnMut(&mut Rng) -> Pkt + 'a,
    ) -> Self {
        Variant {
            name,
            services: 0,
            target: None,
            program,
            lb: None,
            forget: None,
            next: Box::new(next),
            action,
            samples: vec![],
            outliers: 0,
            observer: None,
        }
    }

    fn new(
        name: &'static str,
        target: Option<f64>,
        config: &'a Config,
        action: u32,
        next: impl FnMut(&mut Rng) -> Pkt + 'a,
    ) -> Self {
        Variant {
            services: config.count,
            target,
            lb: Some(&config.lb),
            ..Self::reference(name, config.lb.program(), action, next)
        }
    }

    fn observed(mut self, observer: Observer) -> Self {
        self.observer = Some(observer);
        self
    }

    fn forgetting(mut self) -> Result<Self> {
        self.forget = Some(Forget::Owned(self.lb.unwrap().open_flows()?));
        Ok(self)
    }

    fn forgetting_in(mut self, table: &'a mut FlowTable) -> Result<Self> {
        self.forget = Some(Forget::Borrowed(table));
        Ok(self)
    }

    /// One round of `runs` packets; returns the mean kernel-measured ns per packet.
    ///
    /// A run longer than OUTLIER_NS was interrupted or preempted inside the timed region (the
    /// slowest path measured here takes about 3 us): it is left out of the mean and counted.
    fn round(&mut self, topo: &Topology, rng: &mut Rng, out: &mut [u8], runs: usize) -> Result<f64> {
        let (mut total, mut kept) = (0u64, 0u64);
        if let Some(o) = &mut self.observer {
            o.set(true)?;
        }
        for i in 0..runs {
            let pkt = (self.next)(rng);
            let frame = pkt.frame();
            let ctx = xdp_md(topo.uplink_ifindex, frame.len());
            let (action, len, ns) = test_run_into(self.program, &ctx, &frame, 1, out)?;
            if ns <= OUTLIER_NS {
                total += ns;
                kept += 1;
            } else {
                self.outliers += 1;
            }
            if action != self.action {
                bail!(
                    "{}: run {i}: verdict {action}, expected {}",
                    self.name,
                    self.action
                );
            }
            if i % 1009 == 0 {
                self.check(&pkt, &frame, &out[..len], action)?;
            }
            if let Some(flows) = &mut self.forget {
                flows.remove(&pkt.flow_key())?;
            }
            if let Some(o) = &mut self.observer {
                o.consume(&pkt)?;
            }
        }
        if let Some(o) = &mut self.observer {
            o.set(false)?;
        }
        Ok(total as f64 / kept.max(1) as f64)
    }

    /// The whole output of a sampled run: encapsulated toward the backend the planner's
    /// Maglev table names (and recorded in the connection table), or untouched.
    fn check(&self, pkt: &Pkt, frame: &[u8], data: &[u8], action: u32) -> Result<()> {
        let out = Outcome {
            action,
            data: data.to_vec(),
            duration_ns: 0,
        };
        match (self.lb, action) {
            (Some(lb), XDP_TX) => {
                let input = Input::Pkt(pkt.clone());
                check_outcome(lb, self.name, &input, &out, &encap(XDP_TX, To::Maglev));
                if self.forget.is_none() {
                    assert!(
                        lb.flow(&pkt.flow_key()).is_some(),
                        "{}: flow in the table",
                        self.name
                    );
                }
            }
            _ => assert_eq!(out.data, frame, "{}: packet untouched", self.name),
        }
        Ok(())
    }
}

/// One loaded datapath serving `count` services.
struct Config {
    count: usize,
    lb: Balancer,
}

/// Rounds of every variant in turn, so that drift over the run spreads over all of them;
/// then checks that established packets found their flow (a miss is counted as
/// lru_miss_non_syn).
fn measure(topo: &Topology, configs: &[Config], variants: &mut [Variant<'_>], seed: u64) -> Result<Vec<Row>> {
    let misses = |c: &Config| -> Result<u64> {
        Ok(c.lb
            .reasons()?
            .get("lru_miss_non_syn")
            .map(|r| r.packets)
            .unwrap_or(0))
    };
    let before: Vec<u64> = configs.iter().map(misses).collect::<Result<_>>()?;
    let (mut rng, mut out, runs) = (Rng(seed), vec![0u8; 4096], runs_per_round());
    for _ in 0..ROUNDS {
        for v in variants.iter_mut() {
            let ns = v.round(topo, &mut rng, &mut out, runs)?;
            v.samples.push(ns);
        }
    }
    for (c, b) in configs.iter().zip(before) {
        if misses(c)? != b {
            bail!(
                "{} services: established packets missed the connection table",
                c.count
            );
        }
    }
    let floor = median(&variants[0].samples);
    for v in variants.iter().filter(|v| v.outliers > 0) {
        println!(
            "  {} ({}): {} of {} runs over {} us left out (interrupted)",
            v.name,
            if v.services == 0 {
                "reference".to_string()
            } else {
                format!("{} services", v.services)
            },
            v.outliers,
            v.samples.len() * runs,
            OUTLIER_NS / 1000
        );
    }
    Ok(variants
        .iter()
        .map(|v| Row {
            variant: v.name.to_string(),
            services: v.services,
            ns: median(&v.samples),
            spread: spread_of(&v.samples),
            floor,
            target: v.target,
            overhead: 0.0,
        })
        .collect())
}

struct Row {
    variant: String,
    services: usize,
    ns: f64,
    spread: (f64, f64),
    floor: f64,
    target: Option<f64>,
    /// Fixed cost of the repeat=1 method included in `ns` (0 for repeat=N rows).
    overhead: f64,
}

fn print_rows(rows: &[Row]) {
    println!(
        "{:<36} {:>8} {:>8} {:>15} {:>8} {:>8} {:>7} {:>5}",
        "variant", "services", "ns/pkt", "(min-max)", "net ns", "x floor", "target", ""
    );
    for r in rows {
        let mult = r.ns / r.floor;
        let (target, verdict) = match r.target {
            Some(t) => (format!("{t:.0}x"), if mult <= t { "PASS" } else { "MISS" }),
            None => ("-".to_string(), ""),
        };
        println!(
            "{:<36} {:>8} {:>8.1} {:>15} {:>8.1} {:>8.2} {:>7} {:>5}",
            r.variant,
            if r.services == 0 {
                "-".to_string()
            } else {
                r.services.to_string()
            },
            r.ns,
            format!("({:.1}-{:.1})", r.spread.0, r.spread.1),
            r.ns - r.overhead,
            mult,
            target,
            verdict
        );
    }
    println!(
        "ns/pkt: kernel-measured time per packet, median of the rounds' means (min-max of the rounds).\n\
         net ns: ns/pkt minus the fixed timing overhead of one repeat=1 call (floor repeat=1 - floor repeat=1M).\n\
         x floor: ns/pkt / the floor measured the same way in the same phase."
    );
}

fn run() -> Result<()> {
    let counts = service_counts();
    println!(
        "gatewayd lb benchmark: BPF_PROG_TEST_RUN, repeat=1 per packet, {ROUNDS} rounds x {} packets per variant, median round shown",
        runs_per_round()
    );
    println!("load average at start: {}", loadavg());
    let topo = Topology::new()?;
    let mut reference = load_reference_programs()?;
    let mut take =
        |name: &str| -> Result<FlowTable> { Ok(FlowTable::try_from(reference.take_map(name).unwrap())?) };
    let mut tables = [
        take("bench_flows")?,
        take("bench_new")?,
        take("bench_new_percpu")?,
    ];

    let mut configs = Vec::new();
    for count in counts {
        configs.push(setup(count)?);
    }
    let rows = topo.enter(|| -> Result<Vec<Row>> {
        pin_to_one_cpu()?;
        let refs = References {
            pass: reference.program("bench_pass").unwrap().try_into()?,
            lookup: reference.program("bench_lookup").unwrap().try_into()?,
            insert: reference.program("bench_insert").unwrap().try_into()?,
            insert_percpu: reference.program("bench_insert_percpu").unwrap().try_into()?,
        };
        bench(&topo, &refs, &mut tables, &mut configs)
    })??;
    println!("load average at end: {}", loadavg());
    println!();
    print_rows(&rows);

    println!();
    println!("growth with the number of services (same phase, same time):");
    let mut seen = Vec::new();
    for r in rows.iter().filter(|r| r.services == 1) {
        if seen.contains(&r.variant) {
            continue;
        }
        seen.push(r.variant.clone());
        let at = |n: usize| {
            rows.iter()
                .find(|x| x.variant == r.variant && x.services == n)
                .map(|x| x.ns)
        };
        let mut line = format!("  {:<34} 1: {:7.1}", r.variant, r.ns);
        for n in [1_000, 100_000] {
            if let Some(v) = at(n) {
                line += &format!("  {n}: {v:7.1} ({:+.0}%)", (v / r.ns - 1.0) * 100.0);
            }
        }
        println!("{line}");
    }

    println!();
    maglev_rebuild();
    drop(configs);
    Ok(())
}

fn setup(count: usize) -> Result<Config> {
    println!();
    println!("{count} service(s):");
    let t = Instant::now();
    let capacities = Capacities {
        max_services: 131_072,
        max_backends: 262_144,
        // The daemon's default: 1M established flows fill it to 95%.
        flow_table_size: gatewayd_common::maps::MAX_LB_FLOWS,
        nat_table_size: 1024,
    };
    let params = LbParams {
        table_size: BENCH_TABLE_SIZE,
        seed: 7,
        max_services: capacities.max_services,
        max_backends: capacities.max_backends,
    };
    let mut lb = Balancer::new(&capacities, params)?;
    println!("  load the datapath: {:?}", t.elapsed());
    let t = Instant::now();
    if count <= DAEMON_PATH_MAX_SERVICES {
        lb.serve(&services(count))?;
        let took = t.elapsed();
        println!(
            "  program {count} services as the daemon does (plan + LbMaps::apply, Maglev tables of {BENCH_TABLE_SIZE}): {took:?} ({:?} per service)",
            took / count as u32
        );
    } else {
        serve_batched(&mut lb, &services(count))?;
        println!(
            "  program {count} services (plan + LbMaps::apply, Maglev tables of {BENCH_TABLE_SIZE} written in batches): {:?}",
            t.elapsed()
        );
    }
    Ok(Config { count, lb })
}

/// Writes (or removes) the entries of `ESTABLISHED_FLOWS` established flows, as their first
/// packets would have left them.
fn established_flows(
    lb: &mut Balancer,
    base: [u8; 4],
    template: &Pkt,
    service_of: impl Fn(u32) -> usize,
    insert: bool,
) -> Result<()> {
    for n in 0..ESTABLISHED_FLOWS {
        let pkt = packet(template, client(base, n), service_of(n));
        let key = pkt.flow_key();
        if insert {
            let service_id = lb.service_id(&pkt.service_key());
            let backend_id = lb.maglev_pick_id(service_id, &key).context("no backend")?;
            lb.flows.insert(
                key,
                LbFlow {
                    backend_id,
                    service_id,
                },
                0,
            )?;
        } else {
            lb.flows.remove(&key)?;
        }
    }
    Ok(())
}

/// The same variant on every datapath (1, 1,000, 100,000 services), measured in one phase.
fn on_every_config<'a>(
    configs: &'a [Config],
    name: &'static str,
    target: Option<f64>,
    action: u32,
    next: impl FnMut(&mut Rng) -> Pkt + Clone + 'a,
) -> Vec<Variant<'a>> {
    configs
        .iter()
        .map(|c| Variant::new(name, target, c, action, next.clone()))
        .collect()
}

/// New flows to the first service of every datapath (target 10x the floor); each run's entry
/// is removed after it, so every run inserts.
fn new_flows_on_every_config<'a>(
    configs: &'a [Config],
    name: &'static str,
    new_flow: impl Fn(usize) -> Pkt + Copy + 'a,
) -> Result<Vec<Variant<'a>>> {
    on_every_config(configs, name, Some(10.0), XDP_TX, move |_| new_flow(0))
        .into_iter()
        .map(Variant::forgetting)
        .collect()
}

/// New flows of every multi-service datapath, each to a service picked at random: every packet
/// meets another service entry, Maglev table and counters (informative: no target).
fn new_flows_any_service<'a>(
    name: &'static str,
    configs: &'a [Config],
    new_flow: impl Fn(usize) -> Pkt + Copy + 'a,
) -> Result<Vec<Variant<'a>>> {
    configs
        .iter()
        .filter(|c| c.count > 1)
        .map(|c| {
            let count = c.count as u64;
            Variant::new(name, None, c, XDP_TX, move |rng: &mut Rng| {
                new_flow(rng.below(count) as usize)
            })
            .forgetting()
        })
        .collect()
}

/// The reference programs.
struct References<'a> {
    pass: &'a Xdp,
    lookup: &'a Xdp,
    insert: &'a Xdp,
    insert_percpu: &'a Xdp,
}

fn bench(
    topo: &Topology,
    refs: &References<'_>,
    tables: &mut [FlowTable; 3],
    configs: &mut [Config],
) -> Result<Vec<Row>> {
    let pass = refs.pass;
    let [bare_flows, bare_new, bare_new_percpu] = tables;
    // 54-byte frames: Ethernet, IPv4, TCP, no payload.
    let syn = Pkt::tcp("10.200.0.1", 1, "10.100.0.1", 80).payload(0);
    let ack = syn.clone().flags(TCP_ACK);
    let non_vip = Pkt::tcp("10.200.0.1", 40000, "10.99.0.1", 80).payload(0);
    let (syn, ack, non_vip) = (&syn, &ack, &non_vip);
    // New flows get distinct 5-tuples over the whole run, so each one really inserts.
    let fresh = std::cell::Cell::new(0u32);
    let fresh = &fresh;
    let new_flow = move |service: usize| {
        fresh.set(fresh.get() + 1);
        packet(syn, client([10, 210, 0, 0], fresh.get()), service)
    };
    let one_flow = packet(ack, client([10, 200, 0, 1], 0), 0);
    let one_flow = &one_flow;

    // Phase 1: an (almost) empty connection table. The established flow is opened by its
    // SYN before the measurement.
    println!();
    println!("phase 1: empty connection table");
    for c in configs.iter() {
        let syn0 = packet(syn, client([10, 200, 0, 1], 0), 0);
        let out = test_run(c.lb.program(), topo.uplink_ifindex, &syn0.frame())?;
        if out.action != XDP_TX {
            bail!("opening the established flow: verdict {}", out.action);
        }
    }
    let mut rows = {
        let mut v = vec![Variant::floor(pass, one_flow)];
        v.extend(on_every_config(
            configs,
            "non-VIP packet (pass)",
            Some(2.0),
            XDP_PASS,
            |_| non_vip.clone(),
        ));
        v.extend(on_every_config(
            configs,
            "established flow, 1 flow",
            Some(5.0),
            XDP_TX,
            |_| one_flow.clone(),
        ));
        v.extend(new_flows_on_every_config(
            configs,
            "new flow, empty table",
            new_flow,
        )?);
        // `gatewayctl observe` attached: what event emission costs the paths that emit
        // (new flows) and those that do not (established flows).
        let c = &configs[0];
        let (quiet, chatty) = Observer::pair(&c.lb)?;
        v.push(
            Variant::new("established flow, observer attached", None, c, XDP_TX, |_| {
                one_flow.clone()
            })
            .observed(quiet),
        );
        v.push(
            Variant::new(
                "new flow, empty table, observer attached",
                None,
                c,
                XDP_TX,
                move |_| new_flow(0),
            )
            .forgetting()?
            .observed(chatty),
        );
        v.push(
            Variant::reference("bare LRU insert, empty table", refs.insert, XDP_PASS, move |_| {
                new_flow(0)
            })
            .forgetting_in(bare_new)?,
        );
        v.push(
            Variant::reference(
                "bare LRU insert, per-CPU LRU lists",
                refs.insert_percpu,
                XDP_PASS,
                move |_| new_flow(0),
            )
            .forgetting_in(bare_new_percpu)?,
        );
        v.extend(new_flows_any_service(
            "new flow, empty table, any service",
            configs,
            new_flow,
        )?);
        measure(topo, configs, &mut v, 0x9e37_79b9_7f4a_7c15)?
    };

    // Phase 2: 1M established flows of one service.
    let t = Instant::now();
    for c in configs.iter_mut() {
        established_flows(&mut c.lb, [10, 220, 0, 0], ack, |_| 0, true)?;
    }
    for n in 0..ESTABLISHED_FLOWS {
        let pkt = packet(ack, client([10, 220, 0, 0], n), 0);
        let f = LbFlow {
            backend_id: 1,
            service_id: 1,
        };
        bare_flows.insert(pkt.flow_key(), f, 0)?;
    }
    println!();
    println!(
        "phase 2: {ESTABLISHED_FLOWS} flows of one service ({:?} to write them)",
        t.elapsed()
    );
    rows.extend({
        let mut v = vec![Variant::floor(pass, one_flow)];
        v.push(Variant::reference(
            "bare LRU lookup, 1 of 1M entries",
            refs.lookup,
            XDP_PASS,
            |_| packet(ack, client([10, 220, 0, 0], 7), 0),
        ));
        // An ACK of one of the 1M established flows, picked at random.
        let any_established = |rng: &mut Rng| {
            let n = rng.below(ESTABLISHED_FLOWS as u64) as u32;
            packet(ack, client([10, 220, 0, 0], n), 0)
        };
        v.push(Variant::reference(
            "bare LRU lookup, 1M entries",
            refs.lookup,
            XDP_PASS,
            any_established,
        ));
        v.extend(on_every_config(
            configs,
            "established flow, 1M flows",
            Some(5.0),
            XDP_TX,
            any_established,
        ));
        v.extend(new_flows_on_every_config(
            configs,
            "new flow, table of 1M flows",
            new_flow,
        )?);
        measure(topo, configs, &mut v, 0x2545_f491_4f6c_dd1d)?
    });

    // Phase 3: the 1M flows spread over every service, so that each packet also meets a
    // different service, Maglev table, backend and counters: out of the CPU caches when there
    // are many services. Informative: a memory-latency figure.
    if configs.iter().any(|c| c.count > 1) {
        let t = Instant::now();
        for c in configs.iter_mut().filter(|c| c.count > 1) {
            let count = c.count;
            established_flows(&mut c.lb, [10, 220, 0, 0], ack, |_| 0, false)?;
            established_flows(&mut c.lb, [10, 230, 0, 0], ack, |n| n as usize % count, true)?;
        }
        println!();
        println!(
            "phase 3: {ESTABLISHED_FLOWS} flows over all services ({:?} to rewrite them)",
            t.elapsed()
        );
        rows.extend({
            let mut v = vec![Variant::floor(pass, one_flow)];
            for c in configs.iter().filter(|c| c.count > 1) {
                let count = c.count;
                v.push(Variant::new(
                    "established, 1M flows, all services",
                    None,
                    c,
                    XDP_TX,
                    move |rng: &mut Rng| {
                        let n = rng.below(ESTABLISHED_FLOWS as u64) as u32;
                        packet(ack, client([10, 230, 0, 0], n), n as usize % count)
                    },
                ));
            }
            v.extend(new_flows_any_service(
                "new flow, 1M table, any service",
                configs,
                new_flow,
            )?);
            measure(topo, configs, &mut v, 0x5851_f42d_4c95_7f2d)?
        });
    }

    // The repeat=N method where it is valid (nothing rewritten): its floor shows the fixed
    // per-call overhead that repeat=1 adds to every figure above.
    let frame = one_flow.frame();
    let ctx = xdp_md(topo.uplink_ifindex, frame.len());
    let nv = non_vip.frame();
    let nv_ctx = xdp_md(topo.uplink_ifindex, nv.len());
    let mut out = vec![0u8; 4096];
    let mut floor_n = Vec::new();
    let mut nonvip_n: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    for _ in 0..ROUNDS {
        floor_n.push(test_run_into(pass, &ctx, &frame, 1_000_000, &mut out)?.2 as f64);
        for (c, samples) in configs.iter().zip(&mut nonvip_n) {
            samples.push(test_run_into(c.lb.program(), &nv_ctx, &nv, 1_000_000, &mut out)?.2 as f64);
        }
    }
    let overhead = rows[0].ns - median(&floor_n);
    for r in &mut rows {
        r.overhead = overhead;
    }
    rows.push(Row {
        variant: "floor, repeat=1M (info)".into(),
        services: 0,
        ns: median(&floor_n),
        spread: spread_of(&floor_n),
        floor: median(&floor_n),
        target: None,
        overhead: 0.0,
    });
    for (c, samples) in configs.iter().zip(&nonvip_n) {
        rows.push(Row {
            variant: "non-VIP, repeat=1M (info)".into(),
            services: c.count,
            ns: median(samples),
            spread: spread_of(samples),
            floor: median(&floor_n),
            target: Some(2.0),
            overhead: 0.0,
        });
    }
    Ok(rows)
}

fn maglev_rebuild() {
    let keys: Vec<String> = (0..1000)
        .map(|i| format!("10.{}.{}.{}", 1 + i / 65536, (i / 256) % 256, i % 256))
        .collect();
    let backends: Vec<MaglevBackend<'_>> = keys
        .iter()
        .map(|k| MaglevBackend {
            key: k.as_bytes(),
            weight: 1,
        })
        .collect();
    println!("Maglev table rebuild, 1,000 backends (target < 10 ms):");
    for size in [16381u32, 131071] {
        let mut times = Vec::new();
        for _ in 0..11 {
            let t = Instant::now();
            let table = build_table(&backends, size, 7);
            times.push(t.elapsed());
            assert_eq!(table.len(), size as usize);
        }
        times.sort();
        let med = times[times.len() / 2];
        let max = *times.last().unwrap();
        println!(
            "  table size {size:>6}: median {:>8.3} ms, max {:>8.3} ms  {}",
            ms(med),
            ms(max),
            if med < Duration::from_millis(10) {
                "PASS"
            } else {
                "MISS"
            }
        );
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Programs `services` through the planner and `LbMaps::apply`, as the daemon does (the
/// Maglev swaps of a plan go to the kernel as batches).
fn serve_batched(lb: &mut Balancer, services: &[Service]) -> Result<()> {
    let (ops, next) = lb.plan(services)?;
    lb.lb.apply(&ops)?;
    lb.record(&ops, next);
    Ok(())
}
