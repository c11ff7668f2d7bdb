//! Kubernetes sync at scale: time and peak RSS from first contact with the API server to
//! programmed maps, for 10,000 LoadBalancer Services x 10 endpoints, then for a burst of
//! 1,000 changed endpoints.
//!
//! `cargo bench -p gatewayd --bench k8s` (root, to load the datapath; without root it stops
//! at the plan and says so). The API server (the test server of `integration/`) runs in a
//! child process, so the peak RSS printed is gatewayd's alone: kube client, reflector stores,
//! conversion, merge, the LB planner and the map writer with its Maglev tables, the path
//! `Daemon::program` takes. Figures: docs/performance.md.
//!
//! `GATEWAYD_BENCH_K8S_SERVICES=<n>` changes the number of services (default 10000);
//! `GATEWAYD_BENCH_K8S_TABLE_SIZE=<prime>` the Maglev table size (default 16381).

#[path = "../tests/common/mod.rs"]
mod common;

use anyhow::{anyhow, bail, Context, Result};
use gatewayd::config::{Cluster, ClusterAccess, Host, DEFAULT_LOAD_BALANCER_CLASS};
use gatewayd::datapath::Capacities;
use gatewayd::k8s::convert::{
    convert, ClusterObjects, ClusterState, Context as ConvertContext, ServiceCache,
};
use gatewayd::k8s::sync::{self, ClusterUpdate};
use gatewayd::lb::maglev::DEFAULT_TABLE_SIZE;
use gatewayd::lb::plan::{LbParams, Programmed, ServicePlan};
use gatewayd::model::DesiredState;
use gatewayd_integration::apiserver::{kubeconfig_for, ApiServer};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ENDPOINTS: usize = 10;
/// Slices changed by the churn burst: 100 slices x 10 endpoints = 1,000 endpoints.
const CHURN_SLICES: usize = 100;

struct AnyInterface;
impl Host for AnyInterface {
    fn interface_exists(&self, _: &str) -> bool {
        true
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("serve") {
        return serve(args.get(2).and_then(|n| n.parse().ok()).unwrap_or(10_000));
    }
    if !args.iter().any(|a| a == "--bench") {
        println!("k8s sync benchmark: run `cargo bench -p gatewayd --bench k8s`");
        return Ok(());
    }
    let services: usize = std::env::var("GATEWAYD_BENCH_K8S_SERVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(measure(services))
}

/// Endpoint `j` of service `i` after `round` churns (10.x.y.z, unique per service and round).
fn endpoint(i: usize, j: usize, round: usize) -> String {
    let n = (i * ENDPOINTS + j) as u32 + (round as u32) * 1_000_000;
    format!("10.{}.{}.{}", 128 + (n >> 16) % 128, (n >> 8) & 255, n & 255)
}

fn slice(i: usize, round: usize) -> Value {
    let endpoints: Vec<Value> = (0..ENDPOINTS)
        .map(|j| json!({"addresses": [endpoint(i, j, round)], "conditions": {"ready": true, "serving": true, "terminating": false}}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": format!("svc-{i}-x7k2p"), "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}"),
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
    })
}

/// The child: an API server holding `services` Services and their slices; on each `churn`
/// line from stdin, re-addresses the endpoints of [`CHURN_SLICES`] slices and answers `ok`.
fn service(i: usize) -> Value {
    // A VIP of its own per service.
    let vip = format!("10.{}.{}.{}", 64 + (i >> 16), (i >> 8) & 255, i & 255);
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{i}"), "namespace": "bench"},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": DEFAULT_LOAD_BALANCER_CLASS,
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 80}]},
        "status": {"loadBalancer": {"ingress": [{"ip": vip}]}},
    })
}

fn serve(services: usize) -> Result<()> {
    let mut api = ApiServer::new();
    for i in 0..services {
        api.apply(service(i))?;
        api.apply(slice(i, 0))?;
    }
    let addr = api.start(std::net::TcpListener::bind("127.0.0.1:0")?)?;
    println!("{addr}");
    std::io::stdout().flush()?;
    let mut round = 0;
    for line in std::io::stdin().lock().lines() {
        if line?.trim() != "churn" {
            continue;
        }
        round += 1;
        for i in 0..CHURN_SLICES {
            api.apply(slice(i * (services / CHURN_SLICES).max(1), round))?;
        }
        println!("ok");
        std::io::stdout().flush()?;
    }
    Ok(())
}

/// Peak resident set size of this process (VmHWM), in MB.
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

async fn next_state(updates: &mut tokio::sync::mpsc::Receiver<ClusterUpdate>) -> Result<Arc<ClusterState>> {
    tokio::time::timeout(Duration::from_secs(300), updates.recv())
        .await
        .context("no cluster state within 5 minutes")?
        .map(|u| u.state)
        .ok_or_else(|| anyhow!("sync stopped"))
}

async fn measure(services: usize) -> Result<()> {
    println!("starting the API server with {services} services x {ENDPOINTS} endpoints (child process)");
    let mut child = Command::new(std::env::current_exe()?)
        .args(["serve", &services.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut child_out = BufReader::new(child.stdout.take().expect("piped"));
    let mut child_in = child.stdin.take().expect("piped");
    let mut line = String::new();
    child_out.read_line(&mut line)?;
    let addr = line.trim().to_owned();
    if addr.is_empty() {
        bail!("the API server child did not start");
    }
    let dir = std::env::temp_dir().join(format!("gd-bench-k8s-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, kubeconfig_for(addr.parse()?))?;
    let cluster = Cluster::new(
        1,
        "bench",
        ClusterAccess::Kubeconfig {
            path: kubeconfig,
            context: None,
        },
    );
    let table_size = std::env::var("GATEWAYD_BENCH_K8S_TABLE_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_TABLE_SIZE);
    let params = LbParams {
        table_size,
        seed: 0,
        // The defaults hold 65,536 backends: 100,000 need lb.max_backends raised.
        max_services: (services as u32 + 1).next_power_of_two(),
        max_backends: (services as u32 * ENDPOINTS as u32 + 1).next_power_of_two(),
    };
    // The datapath, loaded as the daemon loads it (root only).
    let mut maps = if common::require_root("writing the maps") {
        let capacities = Capacities {
            max_services: params.max_services,
            max_backends: params.max_backends,
            ..common::lb::test_capacities()
        };
        Some(common::lb::Balancer::new(&capacities, params)?)
    } else {
        println!("(the figures stop at the plan: no Maglev table is built)");
        None
    };
    let base = DesiredState::default();
    let rss_before = peak_rss_mb();

    let started = Instant::now();
    let client = sync::client(&cluster).await?;
    let (tx, mut updates) = tokio::sync::mpsc::channel(4);
    sync::spawn(cluster, client, None, None, AnyInterface, tx);
    let state = next_state(&mut updates).await?;
    let synced = started.elapsed();
    let rss_synced = peak_rss_mb();
    let mut clusters = BTreeMap::from([(1, state)]);
    let (desired, _) = gatewayd::model::merge::merge(&base, &clusters);
    let ServicePlan {
        ops,
        next: programmed,
    } = Programmed::default().plan(&desired.services, &params)?;
    let planned = started.elapsed();
    let rss_planned = peak_rss_mb();
    if let Some(maps) = &mut maps {
        maps.lb.apply(&ops)?;
    }
    let programmed_at = started.elapsed();
    let rss_programmed = peak_rss_mb();
    let backends: usize = desired.services.values().map(|s| s.backends.len()).sum();
    if desired.services.len() != services || backends != services * ENDPOINTS {
        bail!("synced {} services, {backends} backends", desired.services.len());
    }
    println!("\nfirst contact -> {services} services, {backends} backends");
    println!(
        "  model (listed, converted, debounced):  {:>8}   peak RSS {rss_synced:.0} MB",
        ms(synced)
    );
    println!(
        "  + merged and planned ({} map ops):  {:>8}   peak RSS {rss_planned:.0} MB",
        ops.len(),
        ms(planned)
    );
    if maps.is_some() {
        println!(
            "  + maps written ({table_size}-slot tables):   {:>8}   peak RSS {rss_programmed:.0} MB",
            ms(programmed_at)
        );
    }
    println!("  (RSS before the first contact: {rss_before:.0} MB)");
    drop(ops);

    let mut programmed = programmed;
    for round in 1..=3 {
        let burst = Instant::now();
        writeln!(child_in, "churn")?;
        child_in.flush()?;
        line.clear();
        child_out.read_line(&mut line)?;
        let applied = burst.elapsed();
        let state = next_state(&mut updates).await?;
        let modelled = burst.elapsed();
        clusters.insert(1, state);
        let (desired, _) = gatewayd::model::merge::merge(&base, &clusters);
        let merged = burst.elapsed();
        let ServicePlan { ops, next } = programmed.plan(&desired.services, &params)?;
        programmed = next;
        let planned = burst.elapsed();
        if let Some(maps) = &mut maps {
            maps.lb.apply(&ops)?;
        }
        let total = burst.elapsed();
        println!(
            "churn {round}: {} endpoints changed (server took {}): model {}, merged {}, planned ({} ops) {}, {} {}",
            CHURN_SLICES * ENDPOINTS,
            ms(applied),
            ms(modelled),
            ms(merged),
            ops.len(),
            ms(planned),
            if maps.is_some() { "written" } else { "not written" },
            ms(total)
        );
    }
    println!(
        "(model includes the {} ms quiet period that debounces bursts)",
        sync::QUIET.as_millis()
    );
    // The conversion alone (what every state change costs, on the same objects).
    let objects = ClusterObjects {
        services: (0..services)
            .map(|i| Ok(Arc::new(serde_json::from_value(service(i))?)))
            .collect::<Result<_>>()?,
        endpoint_slices: (0..services)
            .map(|i| Ok(Arc::new(serde_json::from_value(slice(i, 0))?)))
            .collect::<Result<_>>()?,
        ..Default::default()
    };
    let cluster = Cluster::new(
        1,
        "bench",
        ClusterAccess::Kubeconfig {
            path: "/dev/null".into(),
            context: None,
        },
    );
    let cx = ConvertContext {
        cluster: &cluster,
        egress_interface: None,
        host: &AnyInterface,
    };
    // Cold: every service converted; warm: the previous call's cache, nothing changed.
    let mut warm = ServiceCache::default();
    for what in ["cold", "warm"] {
        let mut times = Vec::new();
        for _ in 0..5 {
            let mut fresh = ServiceCache::default();
            let cache = if what == "warm" { &mut warm } else { &mut fresh };
            let t = Instant::now();
            std::hint::black_box(convert(&cx, &objects, cache));
            times.push(t.elapsed());
        }
        times.sort();
        println!(
            "conversion alone, {what} ({services} services, median of 5): {}",
            ms(times[2])
        );
    }
    drop(child_in);
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
