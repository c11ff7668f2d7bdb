//! Harness shared by the XDP program tests (`tests/lb_program.rs`) and the benchmark
//! (`benches/lb.rs`): the datapath loaded exactly as the daemon loads it, services programmed
//! through the real planner, a network namespace that `bpf_fib_lookup` can resolve backends
//! in, BPF_PROG_TEST_RUN, a packet builder with correct checksums, and a userspace copy of the
//! datapath's flow hash so tests can predict which backend Maglev picks.
//!
//! Everything created here is removed on drop (pins, namespace), so a failing test leaves
//! nothing behind. Only 10.x and fd00:: addresses are used, inside namespaces created here.

#![allow(dead_code)] // each user (test, bench) uses a different part

use anyhow::{bail, Context, Result};
use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use gatewayd::datapath::{Capacities, Datapath};
use gatewayd::lb::maps::{self as lb_maps, LbMaps};
use gatewayd::lb::plan::{LbOp, LbParams, Programmed};
use gatewayd::model::{Backend, BackendState, Encapsulation, Protocol, Service, ServiceKey};
use gatewayd_common::maps::{FlowKey, LbFlow, ReasonCounters, TrafficCounters, REASON_NAMES};
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

pub mod egress;

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// True when the caller may run; otherwise prints the skip line and the caller returns.
pub fn require_root(name: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    println!("SKIP: {name} needs root");
    false
}

// ---------------------------------------------------------------------------------------------
// Benchmark figures (benches/*.rs).
// ---------------------------------------------------------------------------------------------

/// A run longer than this was interrupted or preempted inside the timed region (the slowest
/// path measured takes about 3 us): benchmarks leave it out of their means and count it.
pub const OUTLIER_NS: u64 = 10_000;

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    s[s.len() / 2]
}

/// (min, max) of the rounds' figures.
pub fn spread_of(v: &[f64]) -> (f64, f64) {
    (
        v.iter().cloned().fold(f64::MAX, f64::min),
        v.iter().cloned().fold(0.0, f64::max),
    )
}

/// The 1, 5 and 15 minute load averages: how busy the machine was while a benchmark ran.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Pins the calling thread to one CPU (the second if there is one): per-CPU maps and caches
/// stay warm, and figures do not mix two CPUs.
pub fn pin_to_one_cpu() -> Result<()> {
    let mut cpu = nix::sched::CpuSet::new();
    cpu.set(1).or_else(|_| cpu.set(0))?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpu)?;
    Ok(())
}

/// Compiles a BPF C program (reference programs of the benchmarks, kept out of xdp/ because
/// build.rs embeds every xdp/*.c into the daemon) and returns the object. `BPF_CLANG`
/// overrides the compiler (default clang-19).
pub fn compile_bpf(source: &str) -> Result<Vec<u8>> {
    let dir = std::env::temp_dir().join(unique("gatewayd-bpf-"));
    std::fs::create_dir_all(&dir)?;
    let (src, obj) = (dir.join("program.c"), dir.join("program.o"));
    std::fs::write(&src, source)?;
    let clang = std::env::var("BPF_CLANG").unwrap_or_else(|_| "clang-19".into());
    let out = Command::new(&clang)
        .args(["-O2", "-g", "-target", "bpf", "-c"])
        .arg(format!("-I/usr/include/{}-linux-gnu", std::env::consts::ARCH))
        .arg(&src)
        .arg("-o")
        .arg(&obj)
        .output()
        .with_context(|| format!("running {clang}"));
    let bytes = std::fs::read(&obj);
    std::fs::remove_dir_all(&dir)?;
    let out = out?;
    if !out.status.success() {
        bail!("{clang}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(bytes?)
}

/// A name unique to this process and call, short enough for an interface or namespace.
fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program}"))?;
    if let Some(text) = stdin {
        child.stdin.take().unwrap().write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

// ---------------------------------------------------------------------------------------------
// Network namespace with the gateway's interfaces, routes and neighbours.
// ---------------------------------------------------------------------------------------------

/// Gateway interface that receives client traffic; backends on its subnet are reached back
/// out of it (XDP_TX).
pub const UPLINK: &str = "gd0";
pub const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// MAC of whatever sent the client's frames (the upstream router).
pub const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
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
    pub netns: String,
    pub uplink_ifindex: u32,
    pub side_ifindex: u32,
}

impl Topology {
    pub fn new() -> Result<Self> {
        let netns = unique("gdlb");
        run("ip", &["netns", "add", &netns], None)?;
        // From here on, drop deletes the namespace even if the setup below fails.
        let mut topo = Topology {
            netns,
            uplink_ifindex: 0,
            side_ifindex: 0,
        };
        let mut batch = String::new();
        let mut cmd = |s: String| {
            batch.push_str(&s);
            batch.push('\n');
        };
        cmd("link set lo up".into());
        cmd(format!(
            "link add {UPLINK} address {} type veth peer name {UPLINK}p address {}",
            mac_str(UPLINK_MAC),
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
            for (addr, dev) in [(uplink_backend4(n), UPLINK), (uplink_backend6(n), UPLINK)] {
                cmd(format!(
                    "neigh add {addr} lladdr {} dev {dev} nud permanent",
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
        run("ip", &["-n", &topo.netns, "-batch", "-"], Some(&batch))?;
        run(
            "ip",
            &[
                "netns",
                "exec",
                &topo.netns,
                "sysctl",
                "-qw",
                "net.ipv4.conf.all.forwarding=1",
                "net.ipv6.conf.all.forwarding=1",
            ],
            None,
        )?;
        let (up, side) = topo.enter(|| {
            (
                nix::net::if_::if_nametoindex(UPLINK),
                nix::net::if_::if_nametoindex(SIDE),
            )
        })?;
        topo.uplink_ifindex = up?;
        topo.side_ifindex = side?;
        Ok(topo)
    }

    /// Runs `f` on a thread that joined the namespace: bpf_fib_lookup, and the ingress ifindex
    /// of a test run, are resolved in the network namespace of the calling thread.
    pub fn enter<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R> {
        let path = Path::new("/var/run/netns").join(&self.netns);
        std::thread::scope(|s| {
            s.spawn(|| -> Result<R> {
                let ns = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .context("setns into the test namespace")?;
                Ok(f())
            })
            .join()
            .expect("namespace thread panicked")
        })
    }

    /// One packet through the program as received on the uplink.
    pub fn run(&self, program: &Xdp, frame: &[u8]) -> Result<Outcome> {
        self.run_on(program, self.uplink_ifindex, frame)
    }

    pub fn run_on(&self, program: &Xdp, ifindex: u32, frame: &[u8]) -> Result<Outcome> {
        self.enter(|| test_run(program, ifindex, frame))?
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Err(e) = run("ip", &["netns", "del", &self.netns], None) {
            eprintln!("warning: could not delete namespace {}: {e:#}", self.netns);
        }
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

/// A bpffs directory of our own, torn down (pins removed) on drop.
pub struct ScratchPins {
    pub path: PathBuf,
}

impl ScratchPins {
    pub fn new() -> Self {
        ScratchPins {
            path: PathBuf::from("/sys/fs/bpf").join(unique("gatewayd-test-")),
        }
    }
}

impl Default for ScratchPins {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ScratchPins {
    fn drop(&mut self) {
        if let Err(e) = gatewayd::datapath::teardown(&self.path) {
            eprintln!("warning: teardown of {}: {e:#}", self.path.display());
        }
    }
}

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
// The datapath's flow hash (xdp/include/lib/lb.h), to predict Maglev picks and outer fields.
// ---------------------------------------------------------------------------------------------

const HASH_SEED: u32 = 0x6764_7762; // "gdwb"
const JHASH_INITVAL: u32 = 0xdead_beef;

fn jhash_mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

fn jhash_final(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(14));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(11));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(25));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(16));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(4));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(14));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(24));
}

/// The kernel's jhash_3words / jhash2 over the client 5-tuple, words read little-endian from
/// the key's bytes, exactly as `gd_flow_hash` does with the balancer's seed.
pub fn flow_hash(k: &FlowKey) -> u32 {
    flow_hash_seeded(k, HASH_SEED)
}

/// `gd_flow_hash` with another seed (the egress NAT's port choice uses its own).
pub fn flow_hash_seeded(k: &FlowKey, seed: u32) -> u32 {
    let w = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let mut pb = [0u8; 4];
    pb[..2].copy_from_slice(&k.sport.to_ne_bytes());
    pb[2..].copy_from_slice(&k.dport.to_ne_bytes());
    let ports = u32::from_le_bytes(pb);
    let (s, d) = (&k.src, &k.dst);
    if k.family == gatewayd_common::maps::FAMILY_INET {
        let init = seed
            .wrapping_add(k.proto as u32)
            .wrapping_add(JHASH_INITVAL)
            .wrapping_add(3 << 2);
        let (mut a, mut b, mut c) = (
            w(&s[0..4]).wrapping_add(init),
            w(&d[0..4]).wrapping_add(init),
            ports.wrapping_add(init),
        );
        jhash_final(&mut a, &mut b, &mut c);
        return c;
    }
    let init = JHASH_INITVAL.wrapping_add(10 << 2).wrapping_add(seed);
    let (mut a, mut b, mut c) = (init, init, init);
    let words = [
        w(&s[0..4]),
        w(&s[4..8]),
        w(&s[8..12]),
        w(&s[12..16]),
        w(&d[0..4]),
        w(&d[4..8]),
        w(&d[8..12]),
        w(&d[12..16]),
        ports,
    ];
    for chunk in words.chunks(3) {
        a = a.wrapping_add(chunk[0]);
        b = b.wrapping_add(chunk[1]);
        c = c.wrapping_add(chunk[2]);
        jhash_mix(&mut a, &mut b, &mut c);
    }
    a = a.wrapping_add(k.proto as u32);
    jhash_final(&mut a, &mut b, &mut c);
    c
}

/// The kernel's jhash_3words.
pub fn jhash_3words(a: u32, b: u32, c: u32, initval: u32) -> u32 {
    let init = initval.wrapping_add(JHASH_INITVAL).wrapping_add(3 << 2);
    let (mut a, mut b, mut c) = (a.wrapping_add(init), b.wrapping_add(init), c.wrapping_add(init));
    jhash_final(&mut a, &mut b, &mut c);
    c
}

// ---------------------------------------------------------------------------------------------
// Packets.
// ---------------------------------------------------------------------------------------------

/// One's complement sum of `data` (16-bit big-endian words) added to `sum`, not folded.
pub fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_be_bytes([c[0], c[1]]) as u32;
        if sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
    }
    if let [last] = chunks.remainder() {
        sum += (*last as u32) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum
}

/// The checksum field value for `data` with its checksum field zeroed.
pub fn csum(sum: u32, data: &[u8]) -> u16 {
    !(csum_add(sum, data) as u16)
}

/// A region whose checksum field is filled checks out when it sums to 0xffff.
pub fn csum_ok(sum: u32, data: &[u8]) -> bool {
    csum_add(sum, data) == 0xffff
}

/// The pseudo-header sum for an L4 checksum.
pub fn pseudo_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut s = 0;
    match (src, dst) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            s = csum_add(s, &a.octets());
            s = csum_add(s, &b.octets());
            s = csum_add(s, &[0, proto]);
            csum_add(s, &(len as u16).to_be_bytes())
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            s = csum_add(s, &a.octets());
            s = csum_add(s, &b.octets());
            s = csum_add(s, &(len as u32).to_be_bytes());
            csum_add(s, &[0, 0, 0, proto])
        }
        _ => panic!("mixed families in a pseudo-header"),
    }
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_PSH: u8 = 0x08;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    Tcp { flags: u8 },
    Udp { zero_checksum: bool },
}

/// IPv4 fragment offset (8-byte units) and more-fragments flag, or an IPv6 Fragment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frag {
    pub offset: u16,
    pub more: bool,
}

/// A client packet toward a VIP, built with correct lengths and checksums.
#[derive(Debug, Clone)]
pub struct Pkt {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// (TPID, TCI) per tag, outermost first.
    pub vlans: Vec<(u16, u16)>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub l4: L4,
    pub payload: Vec<u8>,
    pub ttl: u8,
    pub tos: u8,
    pub df: bool,
    /// IPv4 options (a multiple of 4 bytes, at most 40).
    pub options: Vec<u8>,
    pub frag: Option<Frag>,
    /// Bytes after the IP packet (Ethernet padding of short frames).
    pub trailer: Vec<u8>,
}

impl Pkt {
    fn new(src: &str, sport: u16, dst: &str, dport: u16, l4: L4) -> Pkt {
        Pkt {
            dst_mac: UPLINK_MAC,
            src_mac: ROUTER_MAC,
            vlans: vec![],
            src: src.parse().expect("src"),
            dst: dst.parse().expect("dst"),
            sport,
            dport,
            l4,
            payload: vec![],
            ttl: 57,
            tos: 0x28,
            df: true,
            options: vec![],
            frag: None,
            trailer: vec![],
        }
    }

    /// A TCP SYN from `src:sport` to `dst:dport`.
    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16) -> Pkt {
        Pkt::new(src, sport, dst, dport, L4::Tcp { flags: TCP_SYN })
    }

    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Pkt {
        Pkt::new(src, sport, dst, dport, L4::Udp { zero_checksum: false })
    }

    pub fn flags(mut self, flags: u8) -> Pkt {
        self.l4 = L4::Tcp { flags };
        self
    }

    /// `n` bytes of recognisable payload.
    pub fn payload(mut self, n: usize) -> Pkt {
        self.payload = (0..n).map(|i| (i * 7 + 3) as u8).collect();
        self
    }

    pub fn vlan(mut self, tci: u16) -> Pkt {
        self.vlans.push((0x8100, tci));
        self
    }

    pub fn qinq(mut self, outer: u16, inner: u16) -> Pkt {
        self.vlans.push((0x88a8, outer));
        self.vlans.push((0x8100, inner));
        self
    }

    pub fn src_port(mut self, sport: u16) -> Pkt {
        self.sport = sport;
        self
    }

    pub fn source(mut self, src: &str) -> Pkt {
        self.src = src.parse().expect("src");
        self
    }

    pub fn is_v4(&self) -> bool {
        self.src.is_ipv4()
    }

    fn l4_proto(&self) -> u8 {
        match self.l4 {
            L4::Tcp { .. } => 6,
            L4::Udp { .. } => 17,
        }
    }

    /// The TCP/UDP segment with its checksum.
    pub fn segment(&self) -> Vec<u8> {
        let mut seg = match self.l4 {
            L4::Tcp { flags } => {
                let mut h = vec![0u8; 20];
                h[0..2].copy_from_slice(&self.sport.to_be_bytes());
                h[2..4].copy_from_slice(&self.dport.to_be_bytes());
                h[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes()); // seq
                if flags & TCP_ACK != 0 {
                    h[8..12].copy_from_slice(&0x0bad_cafeu32.to_be_bytes());
                }
                h[12] = 5 << 4;
                h[13] = flags;
                h[14..16].copy_from_slice(&64240u16.to_be_bytes());
                h
            }
            L4::Udp { .. } => {
                let mut h = vec![0u8; 8];
                h[0..2].copy_from_slice(&self.sport.to_be_bytes());
                h[2..4].copy_from_slice(&self.dport.to_be_bytes());
                h[4..6].copy_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                h
            }
        };
        seg.extend_from_slice(&self.payload);
        let sum = pseudo_sum(self.src, self.dst, self.l4_proto(), seg.len());
        let c = csum(sum, &seg);
        match self.l4 {
            L4::Tcp { .. } => seg[16..18].copy_from_slice(&c.to_be_bytes()),
            L4::Udp { zero_checksum: true } => {}
            L4::Udp { .. } => {
                let c = if c == 0 { 0xffff } else { c };
                seg[6..8].copy_from_slice(&c.to_be_bytes());
            }
        }
        seg
    }

    /// The IP packet (what the backend must receive inside the tunnel).
    pub fn ip_packet(&self) -> Vec<u8> {
        let seg = self.segment();
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                assert!(self.options.len().is_multiple_of(4) && self.options.len() <= 40);
                let hlen = 20 + self.options.len();
                let mut h = vec![0u8; hlen];
                h[0] = 0x40 | (hlen / 4) as u8;
                h[1] = self.tos;
                h[2..4].copy_from_slice(&((hlen + seg.len()) as u16).to_be_bytes());
                h[4..6].copy_from_slice(&0x4242u16.to_be_bytes());
                let mut frag = if self.df { 0x4000u16 } else { 0 };
                if let Some(f) = self.frag {
                    frag |= f.offset & 0x1fff;
                    if f.more {
                        frag |= 0x2000;
                    }
                }
                h[6..8].copy_from_slice(&frag.to_be_bytes());
                h[8] = self.ttl;
                h[9] = self.l4_proto();
                h[12..16].copy_from_slice(&s.octets());
                h[16..20].copy_from_slice(&d.octets());
                h[20..].copy_from_slice(&self.options);
                let c = csum(0, &h);
                h[10..12].copy_from_slice(&c.to_be_bytes());
                h.extend_from_slice(&seg);
                h
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut ext = vec![];
                let mut nh = self.l4_proto();
                if let Some(f) = self.frag {
                    ext = vec![nh, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef];
                    let off = (f.offset << 3) | f.more as u16;
                    ext[2..4].copy_from_slice(&off.to_be_bytes());
                    nh = 44;
                }
                let mut h = vec![0u8; 40];
                let first = (6u32 << 28) | ((self.tos as u32) << 20) | 0x12345;
                h[0..4].copy_from_slice(&first.to_be_bytes());
                h[4..6].copy_from_slice(&((ext.len() + seg.len()) as u16).to_be_bytes());
                h[6] = nh;
                h[7] = self.ttl;
                h[8..24].copy_from_slice(&s.octets());
                h[24..40].copy_from_slice(&d.octets());
                h.extend_from_slice(&ext);
                h.extend_from_slice(&seg);
                h
            }
            _ => panic!("mixed families"),
        }
    }

    /// The Ethernet frame as received.
    pub fn frame(&self) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        for (tpid, tci) in &self.vlans {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&tci.to_be_bytes());
        }
        f.extend_from_slice(&(if self.is_v4() { 0x0800u16 } else { 0x86dd }).to_be_bytes());
        f.extend_from_slice(&self.ip_packet());
        f.extend_from_slice(&self.trailer);
        f
    }

    /// The connection-table key the datapath builds for this packet.
    pub fn flow_key(&self) -> FlowKey {
        let (src, family) = gatewayd_common::maps::addr_bytes(self.src);
        let (dst, _) = gatewayd_common::maps::addr_bytes(self.dst);
        FlowKey {
            src,
            dst,
            sport: self.sport.to_be(),
            dport: self.dport.to_be(),
            proto: self.l4_proto(),
            family,
            pad: 0,
        }
    }

    /// The service this packet is addressed to.
    pub fn service_key(&self) -> ServiceKey {
        ServiceKey {
            vip: self.dst,
            port: self.dport,
            protocol: match self.l4 {
                L4::Tcp { .. } => Protocol::Tcp,
                L4::Udp { .. } => Protocol::Udp,
            },
        }
    }
}

/// An Ethernet header as found in an output frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EthView {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub tags: Vec<(u16, u16)>,
    pub ethertype: u16,
    /// Offset of the L3 header.
    pub l3: usize,
}

pub fn parse_eth(f: &[u8]) -> EthView {
    let mut off = 12;
    let mut tags = vec![];
    let mut et = u16::from_be_bytes([f[off], f[off + 1]]);
    while et == 0x8100 || et == 0x88a8 {
        tags.push((et, u16::from_be_bytes([f[off + 2], f[off + 3]])));
        off += 4;
        et = u16::from_be_bytes([f[off], f[off + 1]]);
    }
    EthView {
        dst: f[0..6].try_into().unwrap(),
        src: f[6..12].try_into().unwrap(),
        tags,
        ethertype: et,
        l3: off + 2,
    }
}

pub fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

pub fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

pub fn ipv4_at(b: &[u8], off: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(b[off], b[off + 1], b[off + 2], b[off + 3]))
}

pub fn ipv6_at(b: &[u8], off: usize) -> IpAddr {
    let a: [u8; 16] = b[off..off + 16].try_into().unwrap();
    IpAddr::V6(Ipv6Addr::from(a))
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
            } else if let L4::Udp { zero_checksum: true } = pkt.l4 {
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
            assert_eq!(eth.src, UPLINK_MAC, "source MAC of the egress interface");
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
