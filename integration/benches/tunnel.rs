//! TCP throughput through a WireGuard tunnel between two network namespaces on this machine:
//! gatewayd's boringtun device talking to a wireguard-go peer, beside a pair of wireguard-go
//! devices (the reference), both directions, printed side by side. Figures, not assertions:
//! targets and recorded results are in docs/performance.md.
//!
//! Run as root, against release binaries:
//!
//! ```text
//! cargo build --release -p gatewayd -p gatewayctl
//! cargo bench -p gatewayd-integration --bench tunnel
//! ```
//!
//! Each measurement sends for `GATEWAYD_BENCH_SECONDS` (default 5) or 4 GiB, whichever ends
//! first, over 10.x addresses inside namespaces created here.

use anyhow::{anyhow, Context, Result};
use gatewayd_integration::*;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::time::{Duration, Instant};

const PORT: u16 = 51820;
const MAX_BYTES: u64 = 4 << 30;

/// Two namespaces joined by an underlay veth (10.90.0.1 / 10.90.0.2), the tunnel on
/// 10.99.0.1 / 10.99.0.2.
fn pair(prefix: &str) -> Result<(Netns, Netns)> {
    let a = Netns::new(prefix)?;
    let b = Netns::new(prefix)?;
    veth(
        &a,
        &unique("bua"),
        &["10.90.0.1/24"],
        &b,
        &unique("bub"),
        &["10.90.0.2/24"],
    )?;
    Ok((a, b))
}

/// Sends for `seconds` (or MAX_BYTES) from `sender` to a sink at `to` in `receiver`; Mbit/s
/// received.
fn throughput(sender: &Netns, receiver: &Netns, to: SocketAddr, seconds: u64) -> Result<f64> {
    let listener = receiver.run_in(move || Ok(TcpListener::bind(to)?))?;
    let sink = std::thread::spawn(move || -> Result<u64> {
        let (mut conn, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 17];
        let mut total = 0u64;
        loop {
            match conn.read(&mut buf)? {
                0 => return Ok(total),
                n => total += n as u64,
            }
        }
    });
    let mut conn = sender.tcp_connect(to, Duration::from_secs(10))?;
    let chunk = vec![0x5au8; 1 << 17];
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < Duration::from_secs(seconds) && sent < MAX_BYTES {
        conn.write_all(&chunk)?;
        sent += chunk.len() as u64;
    }
    conn.shutdown(Shutdown::Write)?;
    let received = sink.join().map_err(|_| anyhow!("sink thread panicked"))??;
    let elapsed = start.elapsed().as_secs_f64();
    Ok(received as f64 * 8.0 / elapsed / 1e6)
}

/// Waits for the first handshake: pings until one is answered.
fn handshake(from: &Netns, to: &str) -> Result<()> {
    wait_for("the first handshake", Duration::from_secs(30), || {
        Ok(ping(from, to, 1).is_ok().then_some(()))
    })
}

/// gatewayd (boringtun, release build) on 10.99.0.1, wireguard-go on 10.99.0.2.
fn gatewayd_pair(seconds: u64) -> Result<(f64, f64)> {
    let (gw, peer) = pair("gdbg")?;
    let scratch = Scratch::new()?;
    let (private, public) = wg_keypair()?;
    let _wg = WireGuardGo::start(&peer, &scratch, &unique("bwg"), &private, PORT, "10.99.0.2/24")?;
    let wg_if = unique("bgw");
    let config = format!(
        r#"{daemon}
[encryption]
mode = "wireguard"

[encryption.wireguard]
interface = "{wg_if}"
listen_port = {PORT}
implementation = "userspace"
address = "10.99.0.1/24"

[[peers]]
name = "peer"
public_key = "{public}"
endpoint = "10.90.0.2:{PORT}"
allowed_ips = ["10.99.0.2/32"]
"#,
        daemon = scratch.daemon_table()
    );
    let path = scratch.write("gatewayd.toml", &config)?;
    let mut daemon = Daemon::spawn(&gw, &scratch, &path)?;
    daemon.wait_notify("READY=1", Duration::from_secs(60))?;
    let status = gatewayctl(&scratch, &["encryption", "status"])?;
    let gateway_key = status["wireguard"]["public_key"]
        .as_str()
        .ok_or_else(|| anyhow!("no public key: {status}"))?;
    peer.exec(&[
        "wg",
        "set",
        &_wg.ifname,
        "peer",
        gateway_key,
        "endpoint",
        &format!("10.90.0.1:{PORT}"),
        "allowed-ips",
        "10.99.0.1/32",
    ])?;
    handshake(&gw, "10.99.0.2")?;
    let out = throughput(&gw, &peer, "10.99.0.2:5201".parse()?, seconds)?;
    let back = throughput(&peer, &gw, "10.99.0.1:5202".parse()?, seconds)?;
    Ok((out, back))
}

/// wireguard-go on both ends.
fn wireguard_go_pair(seconds: u64) -> Result<(f64, f64)> {
    let (a, b) = pair("gdbw")?;
    let scratch = Scratch::new()?;
    let (a_private, a_public) = wg_keypair()?;
    let (b_private, b_public) = wg_keypair()?;
    let wa = WireGuardGo::start(&a, &scratch, &unique("bwa"), &a_private, PORT, "10.99.0.1/24")?;
    let wb = WireGuardGo::start(&b, &scratch, &unique("bwb"), &b_private, PORT, "10.99.0.2/24")?;
    a.exec(&[
        "wg",
        "set",
        &wa.ifname,
        "peer",
        &b_public,
        "endpoint",
        &format!("10.90.0.2:{PORT}"),
        "allowed-ips",
        "10.99.0.2/32",
    ])?;
    b.exec(&[
        "wg",
        "set",
        &wb.ifname,
        "peer",
        &a_public,
        "endpoint",
        &format!("10.90.0.1:{PORT}"),
        "allowed-ips",
        "10.99.0.1/32",
    ])?;
    handshake(&a, "10.99.0.2")?;
    let out = throughput(&a, &b, "10.99.0.2:5201".parse()?, seconds)?;
    let back = throughput(&b, &a, "10.99.0.1:5202".parse()?, seconds)?;
    Ok((out, back))
}

fn main() -> Result<()> {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary without it,
    // and half a minute of benchmark is not a test.
    if !std::env::args().any(|a| a == "--bench") {
        println!("tunnel benchmark: run it with `cargo bench -p gatewayd-integration --bench tunnel`");
        return Ok(());
    }
    if !require_root("the tunnel benchmark") {
        return Ok(());
    }
    let seconds: u64 = std::env::var("GATEWAYD_BENCH_SECONDS")
        .ok()
        .map(|s| s.parse())
        .transpose()
        .context("GATEWAYD_BENCH_SECONDS")?
        .unwrap_or(5);
    let bin = binary("gatewayd");
    println!("gatewayd binary: {} ({seconds} s per direction)", bin.display());
    let (gd_out, gd_back) = gatewayd_pair(seconds)?;
    let (go_out, go_back) = wireguard_go_pair(seconds)?;
    println!();
    println!(
        "TCP through WireGuard, Mbit/s         {:>22} {:>22}",
        "A -> B", "B -> A"
    );
    println!("gatewayd (boringtun) A, wireguard-go B {gd_out:>22.0} {gd_back:>22.0}");
    println!("wireguard-go A, wireguard-go B         {go_out:>22.0} {go_back:>22.0}");
    Ok(())
}
