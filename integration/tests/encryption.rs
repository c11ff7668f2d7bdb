//! Node encryption end to end: the real gatewayd running its boringtun WireGuard device in one
//! namespace, Debian's wireguard-go peers (configured with wg) in others. Traffic must pass the
//! tunnel and be encrypted on the wire; peers follow the config on reload without disturbing
//! each other. And IPsec on a kernel without ESP must fail clearly with nothing installed.
//!
//! Needs: wireguard-go, wireguard-tools, tcpdump, iputils-ping, iproute2.

use anyhow::{anyhow, ensure, Context, Result};
use gatewayd_integration::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const WG_PORT: u16 = 51820;
const GW_TUNNEL: &str = "10.99.0.1";

/// A peer node: a namespace joined to the gateway by its own underlay veth, running
/// wireguard-go, with a "pod network" address on its loopback.
struct Node {
    ns: Netns,
    wg: WireGuardGo,
    public_key: String,
    /// The gateway's address on this node's underlay link.
    gateway_underlay: String,
    /// This node's underlay address.
    underlay: String,
    tunnel: String,
    pod: String,
    pod_cidr: String,
}

impl Node {
    /// Node `n` (1, 2, ...): underlay 10.7n.0.0/24, tunnel 10.99.0.(n+1), pods 10.8n.0.0/24.
    fn new(gw: &Netns, scratch: &Scratch, n: u8, gw_underlay_if: &str) -> Result<Self> {
        let ns = Netns::new("gden")?;
        let gateway_underlay = format!("10.7{n}.0.1");
        let underlay = format!("10.7{n}.0.2");
        veth(
            gw,
            gw_underlay_if,
            &[&format!("{gateway_underlay}/24")],
            &ns,
            &unique("une"),
            &[&format!("{underlay}/24")],
        )?;
        let pod = format!("10.8{n}.0.1");
        ns.exec(&["ip", "addr", "add", &format!("{pod}/32"), "dev", "lo"])?;
        let (private, public_key) = wg_keypair()?;
        let tunnel = format!("10.99.0.{}", n + 1);
        let wg = WireGuardGo::start(
            &ns,
            scratch,
            &unique("wgn"),
            &private,
            WG_PORT,
            &format!("{tunnel}/24"),
        )?;
        Ok(Node {
            ns,
            wg,
            public_key,
            gateway_underlay,
            underlay,
            tunnel,
            pod,
            pod_cidr: format!("10.8{n}.0.0/24"),
        })
    }

    /// The `[[peers]]` entry the gateway needs for this node.
    fn peer_toml(&self, name: &str) -> String {
        format!(
            "[[peers]]\nname = \"{name}\"\npublic_key = \"{}\"\nendpoint = \"{}:{WG_PORT}\"\nallowed_ips = [\"{}/32\", \"{}\"]\n\n",
            self.public_key, self.underlay, self.tunnel, self.pod_cidr
        )
    }

    /// Tells wireguard-go about the gateway.
    fn accept_gateway(&self, gateway_key: &str) -> Result<()> {
        self.ns.exec(&[
            "wg",
            "set",
            &self.wg.ifname,
            "peer",
            gateway_key,
            "endpoint",
            &format!("{}:{WG_PORT}", self.gateway_underlay),
            "allowed-ips",
            "10.99.0.0/24",
        ])?;
        Ok(())
    }
}

fn gateway_config(scratch: &Scratch, wg_if: &str, peers: &str) -> String {
    format!(
        r#"{daemon}
[encryption]
mode = "wireguard"

[encryption.wireguard]
interface = "{wg_if}"
listen_port = {WG_PORT}
implementation = "userspace"
address = "{GW_TUNNEL}/24"

{peers}"#,
        daemon = scratch.daemon_table()
    )
}

fn reload(daemon: &mut Daemon, scratch: &Scratch, config: &str) -> Result<()> {
    scratch.write("gatewayd.toml", config)?;
    daemon.signal(libc::SIGHUP)?;
    daemon.wait_notify("READY=1", READY_TIMEOUT)?;
    let status = gatewayctl(scratch, &["status"])?;
    ensure!(status["last_reload"]["ok"] == true, "reload failed: {status}");
    Ok(())
}

fn peer_status<'a>(status: &'a Value, public_key: &str) -> Option<&'a Value> {
    status["wireguard"]["peers"]
        .as_array()?
        .iter()
        .find(|p| p["public_key"] == public_key)
}

/// A TCP echo server on `addr` inside `ns`, serving connections until the test ends.
fn echo_server(ns: &Netns, addr: SocketAddr) -> Result<()> {
    let listener = ns.run_in(move || Ok(TcpListener::bind(addr)?))?;
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(())
}

/// Sends `bytes` of a pattern through an echo connection and checks every byte comes back.
fn echo_transfer(conn: &mut TcpStream, bytes: usize) -> Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let chunk: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut back = vec![0u8; chunk.len()];
    for _ in 0..bytes / chunk.len() {
        conn.write_all(&chunk)?;
        conn.read_exact(&mut back).context("reading the echo")?;
        ensure!(back == chunk, "the echo differs from what was sent");
    }
    Ok(())
}

/// Routes the kernel has on `dev` in `ns`, as `ip route` prints their destinations.
fn routes(ns: &Netns, dev: &str) -> Result<Vec<String>> {
    let out = stdout(&ns.exec(&["ip", "-j", "route", "show", "dev", dev])?);
    let v: Value = serde_json::from_str(&out)?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["dst"].as_str().map(str::to_owned))
        .collect())
}

#[test]
fn boringtun_gateway_and_wireguard_go_nodes_encrypt_and_follow_peer_changes() -> Result<()> {
    if !require_root("boringtun_gateway_and_wireguard_go_nodes_encrypt_and_follow_peer_changes") {
        return Ok(());
    }
    let gw = Netns::new("gdeg")?;
    let scratch = Scratch::new()?;
    let underlay_a = unique("uga");
    let a = Node::new(&gw, &scratch, 1, &underlay_a)?;
    let b = Node::new(&gw, &scratch, 2, &unique("ugb"))?;
    let wg_if = unique("gwg");
    let config_a = gateway_config(&scratch, &wg_if, &a.peer_toml("node-a"));
    let path = scratch.write("gatewayd.toml", &config_a)?;
    let mut daemon = Daemon::spawn(&gw, &scratch, &path)?;
    daemon.wait_notify("READY=1", READY_TIMEOUT)?;

    // The device is boringtun's; the public key is shown, the private key never.
    let status = gatewayctl(&scratch, &["encryption", "status"])?;
    assert_eq!(status["mode"], "wireguard");
    assert_eq!(status["wireguard"]["implementation"], "userspace");
    let gateway_key = status["wireguard"]["public_key"]
        .as_str()
        .ok_or_else(|| anyhow!("no public key in {status}"))?
        .to_owned();
    let key_file = scratch.path("wireguard.key");
    let private = std::fs::read_to_string(&key_file)?;
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key_file)?.permissions());
    assert_eq!(mode & 0o777, 0o600, "the private key file is 0600");
    assert!(
        !status.to_string().contains(private.trim()),
        "status leaks the private key"
    );
    assert!(
        !daemon.log_text().contains(private.trim()),
        "the log leaks the private key"
    );
    // wg(8) reads the device through the UAPI socket the daemon serves.
    let wg_show = stdout(&gw.exec(&["wg", "show", &wg_if, "peers"])?);
    assert!(wg_show.contains(&a.public_key), "wg show: {wg_show}");
    assert!(
        routes(&gw, &wg_if)?.contains(&a.pod_cidr),
        "route to node a's pods"
    );

    a.accept_gateway(&gateway_key)?;
    let capture = Capture::start(&gw, &underlay_a, "", scratch.path("underlay-a.pcap"))?;
    wait_for("a first ping through the tunnel", Duration::from_secs(30), || {
        Ok(ping(&gw, &a.pod, 1).is_ok().then_some(()))
    })?;
    ping(&gw, &a.pod, 3)?;
    let echo: SocketAddr = format!("{}:5001", a.pod).parse()?;
    echo_server(&a.ns, echo)?;
    let mut conn = gw.tcp_connect(echo, Duration::from_secs(10))?;
    echo_transfer(&mut conn, 4 << 20)?;
    let file = capture.stop()?;
    let wire = pcap_read(&file, &format!("udp port {WG_PORT}"))?;
    assert!(!wire.is_empty(), "the tunnel's UDP crossed the underlay");
    let plain = pcap_read(&file, &format!("ip and not udp port {WG_PORT}"))?;
    assert!(
        plain.is_empty(),
        "only WireGuard UDP on the underlay, saw:\n{}",
        plain.join("\n")
    );

    let status = gatewayctl(&scratch, &["encryption", "status"])?;
    let peer_a = peer_status(&status, &a.public_key).ok_or_else(|| anyhow!("no peer a in {status}"))?;
    assert_eq!(peer_a["name"], "node-a");
    assert!(
        peer_a["handshake_age_seconds"].is_u64(),
        "handshake done: {peer_a}"
    );
    let tx_before = peer_a["tx_bytes"].as_u64().unwrap_or(0);
    assert!(tx_before > 4 << 20, "tx counted: {peer_a}");

    // A second peer joins: the first one's session (and its TCP connection) carries on.
    let config_ab = gateway_config(
        &scratch,
        &wg_if,
        &format!("{}{}", a.peer_toml("node-a"), b.peer_toml("node-b")),
    );
    reload(&mut daemon, &scratch, &config_ab)?;
    b.accept_gateway(&gateway_key)?;
    wait_for("a first ping to node b", Duration::from_secs(30), || {
        Ok(ping(&gw, &b.pod, 1).is_ok().then_some(()))
    })?;
    echo_transfer(&mut conn, 1 << 20)?;
    let status = gatewayctl(&scratch, &["encryption", "status"])?;
    let peer_a = peer_status(&status, &a.public_key).ok_or_else(|| anyhow!("no peer a in {status}"))?;
    assert!(
        peer_a["tx_bytes"].as_u64().unwrap_or(0) > tx_before,
        "node a's counters kept running (a re-added peer starts from 0): {peer_a}"
    );

    // Node b gains a network: b is updated (boringtun re-adds it), a is not touched.
    let tx_before = peer_a["tx_bytes"].as_u64().unwrap_or(0);
    let b_grown = b.peer_toml("node-b").replace("\"]\n", "\", \"10.92.0.0/24\"]\n");
    reload(
        &mut daemon,
        &scratch,
        &gateway_config(&scratch, &wg_if, &format!("{}{b_grown}", a.peer_toml("node-a"))),
    )?;
    let allowed = stdout(&gw.exec(&["wg", "show", &wg_if, "allowed-ips"])?);
    let b_line = allowed
        .lines()
        .find(|l| l.starts_with(&b.public_key))
        .ok_or_else(|| anyhow!("no node b in {allowed}"))?;
    assert!(
        b_line.contains("10.92.0.0/24") && b_line.contains(&b.pod_cidr),
        "{allowed}"
    );
    let a_line = allowed
        .lines()
        .find(|l| l.starts_with(&a.public_key))
        .unwrap_or_default();
    assert!(
        a_line.contains(&a.pod_cidr) && !a_line.contains("10.92."),
        "{allowed}"
    );
    assert!(routes(&gw, &wg_if)?.contains(&"10.92.0.0/24".to_owned()));
    wait_for(
        "a ping to node b after its update",
        Duration::from_secs(30),
        || Ok(ping(&gw, &b.pod, 1).is_ok().then_some(())),
    )?;
    echo_transfer(&mut conn, 1 << 20)?;
    let status = gatewayctl(&scratch, &["encryption", "status"])?;
    let peer_a = peer_status(&status, &a.public_key).ok_or_else(|| anyhow!("no peer a in {status}"))?;
    assert!(
        peer_a["tx_bytes"].as_u64().unwrap_or(0) > tx_before,
        "node a untouched by node b's update: {peer_a}"
    );

    // Node a leaves the config: its route and its peer (session) go, node b stays.
    let config_b = gateway_config(&scratch, &wg_if, &b.peer_toml("node-b"));
    reload(&mut daemon, &scratch, &config_b)?;
    let left = routes(&gw, &wg_if)?;
    assert!(
        !left.contains(&a.pod_cidr) && !left.contains(&a.tunnel),
        "routes: {left:?}"
    );
    assert!(left.contains(&b.pod_cidr), "routes: {left:?}");
    let wg_show = stdout(&gw.exec(&["wg", "show", &wg_if, "peers"])?);
    assert!(
        !wg_show.contains(&a.public_key) && wg_show.contains(&b.public_key),
        "wg show: {wg_show}"
    );
    let status = gatewayctl(&scratch, &["encryption", "status"])?;
    assert!(peer_status(&status, &a.public_key).is_none(), "{status}");
    assert!(
        gw.exec(&["ping", "-c", "1", "-W", "1", &a.pod]).is_err(),
        "node a is no longer reachable"
    );
    ping(&gw, &b.pod, 3)?;

    // Per-peer metrics (published every few seconds).
    let metric = |name: &str| -> Result<Option<f64>> {
        let text = scrape_metrics(&gw, "http://127.0.0.1:9469/metrics")?;
        Ok(metric_value(&text, name, &[("peer", "node-b")]))
    };
    wait_for(
        "node b's tx bytes in the metrics",
        Duration::from_secs(30),
        || Ok(metric("gatewayd_wireguard_peer_tx_bytes_total")?.filter(|v| *v > 0.0)),
    )?;
    assert!(metric("gatewayd_wireguard_peer_handshake_age_seconds")?.is_some());

    // The userspace tunnel lives in the daemon: it goes when the daemon stops.
    daemon.signal(libc::SIGTERM)?;
    assert_eq!(daemon.wait()?, Some(0));
    assert!(
        gw.exec(&["ip", "link", "show", &wg_if]).is_err(),
        "the boringtun interface went with the daemon"
    );
    Ok(())
}

#[test]
fn ipsec_without_kernel_esp_fails_clearly_and_installs_nothing() -> Result<()> {
    if !require_root("ipsec_without_kernel_esp_fails_clearly_and_installs_nothing") {
        return Ok(());
    }
    let gw = Netns::new("gdei")?;
    let node = Netns::new("gdein")?;
    veth(
        &gw,
        &unique("ui"),
        &["10.73.0.1/24"],
        &node,
        &unique("uin"),
        &["10.73.0.2/24"],
    )?;
    let scratch = Scratch::new()?;
    let keys = scratch.write("ipsec.keys", "1 00112233445566778899aabbccddeeff00112233\n")?;
    let config = format!(
        r#"{daemon}
[encryption]
mode = "ipsec"

[encryption.ipsec]
key_file = "{keys}"
local_address = "10.73.0.1"

[[peers]]
name = "node"
endpoint = "10.73.0.2:0"
allowed_ips = ["10.83.0.0/24"]
"#,
        daemon = scratch.daemon_table(),
        keys = keys.display()
    );
    let path = scratch.write("gatewayd.toml", &config)?;
    let mut daemon = Daemon::spawn(&gw, &scratch, &path)?;
    let xfrm = |what: &str| -> Result<String> { Ok(stdout(&gw.exec(&["ip", "xfrm", what])?)) };
    match daemon.wait_notify("READY=1", READY_TIMEOUT) {
        Err(e) => {
            // This kernel: no ESP. The error names what to load, and nothing is left behind.
            let e = format!("{e:#}");
            assert!(
                e.contains("esp4/esp6") && e.contains("CONFIG_INET_ESP"),
                "the error names the missing kernel feature: {e}"
            );
            assert_ne!(daemon.wait()?, Some(0));
            assert_eq!(xfrm("state")?, "", "no XFRM state left");
            assert_eq!(xfrm("policy")?, "", "no XFRM policy left");
        }
        Ok(_) => {
            // A kernel with ESP: two states (one per direction) and out/in/fwd policies.
            let states = xfrm("state")?;
            assert_eq!(states.matches("proto esp spi 0x00000001").count(), 2, "{states}");
            let policies = xfrm("policy")?;
            for dir in ["dir out", "dir in", "dir fwd"] {
                assert!(policies.contains(dir), "{policies}");
            }
            let status = gatewayctl(&scratch, &["encryption", "status"])?;
            assert_eq!(
                (
                    status["ipsec"]["states"].as_u64(),
                    status["ipsec"]["policies"].as_u64()
                ),
                (Some(2), Some(3))
            );
            daemon.signal(libc::SIGTERM)?;
            daemon.wait()?;
            let teardown = gw
                .command(&binary("gatewayd"))
                .args(["teardown", "--config"])
                .arg(&path)
                .status()?;
            assert!(teardown.success());
            assert_eq!(xfrm("state")?, "", "teardown removed the states");
            assert_eq!(xfrm("policy")?, "", "teardown removed the policies");
        }
    }
    Ok(())
}

/// The DSR leg through the tunnel:
///
/// ```text
///  client 10.74.0.2 ── lan ── gateway (XDP LB on lan, boringtun) ══ WireGuard over underlay ══
///      node (wireguard-go) ── backend 10.81.0.10 (VIP on lo, decap on its veth)
/// ```
///
/// The backend's route leaves the gateway through the WireGuard interface: the LB encapsulates
/// and hands the packet to the kernel, which routes it into the tunnel; the node forwards the
/// decrypted IPIP packet to the backend, whose answer goes straight back to the client.
#[test]
fn dsr_to_a_backend_behind_a_wireguard_peer_goes_through_the_tunnel() -> Result<()> {
    if !require_root("dsr_to_a_backend_behind_a_wireguard_peer_goes_through_the_tunnel") {
        return Ok(());
    }
    const VIP: &str = "10.100.9.1";
    const CLIENT: &str = "10.74.0.2";
    const LB: &str = "10.74.0.1";
    const BACKEND: &str = "10.81.0.10";
    let gw = Netns::new("gdeg")?;
    let scratch = Scratch::new()?;
    let underlay = unique("uga");
    let node = Node::new(&gw, &scratch, 1, &underlay)?;

    let client = Netns::new("gdec")?;
    let lan_if = unique("lan");
    veth(
        &gw,
        &lan_if,
        &[&format!("{LB}/24")],
        &client,
        "eth0",
        &[&format!("{CLIENT}/24")],
    )?;
    client.exec(&["ip", "route", "add", VIP, "via", LB])?;
    client
        .exec(&["ethtool", "-K", "eth0", "tx", "off"])
        .context("ethtool is needed (apt-get install ethtool)")?;
    for (key, value) in [
        ("net.ipv4.ip_forward", "1"),
        // The encapsulated packet the LB passes to the kernel has the gateway's own address as
        // its source: forwarded only with accept_local on the interface it arrived on.
        (&format!("net.ipv4.conf.{lan_if}.accept_local") as &str, "1"),
    ] {
        gw.sysctl(key, value)?;
    }

    let backend = Netns::new("gdeb")?;
    let node_if = unique("nbe");
    veth(
        &node.ns,
        &node_if,
        &["10.81.0.254/24"],
        &backend,
        "eth0",
        &[&format!("{BACKEND}/24")],
    )?;
    backend.exec(&["ip", "route", "add", "default", "via", "10.81.0.254"])?;
    backend.exec(&["ip", "addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
    let _decap = Decap::attach(&backend, "eth0", None)?;
    let _server = BackendServer::start(&backend, "b1", &[format!("{VIP}:80").parse()?], &[])?;
    node.ns.sysctl("net.ipv4.ip_forward", "1")?;
    // Packets from the LB arrive on the tunnel, replies to the client leave by the underlay.
    for conf in ["all", "default", node.wg.ifname.as_str()] {
        node.ns.sysctl(&format!("net.ipv4.conf.{conf}.rp_filter"), "0")?;
    }
    node.ns.exec(&[
        "ip",
        "route",
        "add",
        "10.74.0.0/24",
        "via",
        &node.gateway_underlay,
    ])?;

    let wg_if = unique("gwg");
    let config = format!(
        r#"{daemon}
[[interfaces]]
name = "{lan_if}"
xdp_mode = "native"

[[services]]
name = "web"
vip = "{VIP}"
port = 80
backends = [{{ address = "{BACKEND}" }}]

[encryption]
mode = "wireguard"

[encryption.wireguard]
interface = "{wg_if}"
implementation = "userspace"
address = "{GW_TUNNEL}/24"

{peer}"#,
        daemon = scratch.daemon_table(),
        peer = node.peer_toml("node")
    );
    let path = scratch.write("gatewayd.toml", &config)?;
    let mut daemon = Daemon::spawn(&gw, &scratch, &path)?;
    daemon.wait_notify("READY=1", READY_TIMEOUT)?;
    let status = gatewayctl(&scratch, &["encryption", "status"])?;
    let gateway_key = status["wireguard"]["public_key"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    // The node accepts the LB's encapsulated packets (source: the LB's address) from the tunnel.
    node.ns.exec(&[
        "wg",
        "set",
        &node.wg.ifname,
        "peer",
        &gateway_key,
        "endpoint",
        &format!("{}:{WG_PORT}", node.gateway_underlay),
        "allowed-ips",
        &format!("10.99.0.0/24,{LB}/32"),
    ])?;

    let capture = Capture::start(&gw, &underlay, "", scratch.path("underlay.pcap"))?;
    let vip: SocketAddr = format!("{VIP}:80").parse()?;
    let answered_by = wait_for("a connection to the VIP", Duration::from_secs(30), || {
        let Ok(mut conn) = client.tcp_connect(vip, Duration::from_secs(3)) else {
            return Ok(None);
        };
        Ok(tcp_exchange(&mut conn, "hello", Duration::from_secs(5)).ok())
    })?;
    assert_eq!(answered_by, "b1");
    // Several more connections and lines: the later packets take the route the first one
    // resolved (the tunnel device's neighbour exists by then).
    for i in 0..5 {
        let mut conn = client.tcp_connect(vip, Duration::from_secs(10))?;
        for j in 0..3 {
            assert_eq!(
                tcp_exchange(&mut conn, &format!("m{i}-{j}"), Duration::from_secs(10))?,
                "b1"
            );
        }
    }
    assert!(
        _decap.decapsulated()? > 0,
        "the backend decapsulated the LB's packets"
    );
    let file = capture.stop()?;
    assert!(!pcap_read(&file, &format!("udp port {WG_PORT}"))?.is_empty());
    let plain = pcap_read(&file, &format!("ip and not udp port {WG_PORT}"))?;
    assert!(
        plain.iter().all(|p| !p.contains(&format!("{LB} > {BACKEND}"))),
        "the encapsulated packets crossed the underlay only inside the tunnel:\n{}",
        plain.join("\n")
    );
    let stats = gatewayctl(&scratch, &["lb", "stats"])?;
    let passed = stats["reasons"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["reason"] == "l3_device_pass")
        .and_then(|r| r["packets"].as_u64())
        .unwrap_or(0);
    assert!(
        passed > 0,
        "the LB handed tunnel-bound packets to the kernel: {stats}"
    );
    Ok(())
}

/// A rejected reload leaves the tunnel as it was; leaving WireGuard mode removes the device and
/// its routes; a restarted daemon builds the boringtun device again and traffic resumes.
#[test]
fn rejected_reloads_mode_changes_and_restarts_of_the_userspace_tunnel() -> Result<()> {
    if !require_root("rejected_reloads_mode_changes_and_restarts_of_the_userspace_tunnel") {
        return Ok(());
    }
    let gw = Netns::new("gdeg")?;
    let scratch = Scratch::new()?;
    let a = Node::new(&gw, &scratch, 1, &unique("uga"))?;
    let wg_if = unique("gwg");
    let good = gateway_config(&scratch, &wg_if, &a.peer_toml("node-a"));
    let path = scratch.write("gatewayd.toml", &good)?;
    let mut daemon = Daemon::spawn(&gw, &scratch, &path)?;
    daemon.wait_notify("READY=1", READY_TIMEOUT)?;
    let status = gatewayctl(&scratch, &["encryption", "status"])?;
    let gateway_key = status["wireguard"]["public_key"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    a.accept_gateway(&gateway_key)?;
    wait_for("a ping through the tunnel", Duration::from_secs(30), || {
        Ok(ping(&gw, &a.pod, 1).is_ok().then_some(()))
    })?;

    // Two peers claiming the same network: the device cannot hold that faithfully.
    let mut clash = a.peer_toml("node-a");
    clash.push_str(&format!(
        "[[peers]]\nname = \"clash\"\npublic_key = \"{}\"\nallowed_ips = [\"{}\"]\n",
        wg_keypair()?.1,
        a.pod_cidr
    ));
    scratch.write("gatewayd.toml", &gateway_config(&scratch, &wg_if, &clash))?;
    daemon.signal(libc::SIGHUP)?;
    daemon.wait_notify("READY=1", READY_TIMEOUT)?;
    let status = gatewayctl(&scratch, &["status"])?;
    assert_eq!(status["last_reload"]["ok"], false, "{status}");
    let message = status["last_reload"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&a.pod_cidr) && message.contains("also in peers[0].allowed_ips"),
        "{message}"
    );
    let peers = stdout(&gw.exec(&["wg", "show", &wg_if, "peers"])?);
    assert_eq!(peers.trim(), a.public_key, "the running peers are untouched");
    ping(&gw, &a.pod, 2)?;

    // Encryption off: the device and its routes go.
    reload(
        &mut daemon,
        &scratch,
        &good.replace("mode = \"wireguard\"", "mode = \"none\""),
    )?;
    assert!(
        gw.exec(&["ip", "link", "show", &wg_if]).is_err(),
        "the interface is removed"
    );
    assert_eq!(gatewayctl(&scratch, &["encryption", "status"])?["mode"], "none");
    // And on again, with the same key (the key file stays).
    reload(&mut daemon, &scratch, &good)?;
    let status = gatewayctl(&scratch, &["encryption", "status"])?;
    assert_eq!(status["wireguard"]["public_key"], gateway_key.as_str());
    wait_for(
        "a ping after encryption came back",
        Duration::from_secs(30),
        || Ok(ping(&gw, &a.pod, 1).is_ok().then_some(())),
    )?;

    // A restart: the userspace device goes with the process and comes back with the next one.
    daemon.signal(libc::SIGTERM)?;
    assert_eq!(daemon.wait()?, Some(0));
    assert!(gw.exec(&["ip", "link", "show", &wg_if]).is_err());
    let mut daemon = Daemon::spawn(&gw, &scratch, &path)?;
    daemon.wait_notify("READY=1", READY_TIMEOUT)?;
    wait_for("a ping after the restart", Duration::from_secs(30), || {
        Ok(ping(&gw, &a.pod, 1).is_ok().then_some(()))
    })?;
    let status = gatewayctl(&scratch, &["encryption", "status"])?;
    assert_eq!(status["wireguard"]["public_key"], gateway_key.as_str());
    Ok(())
}

/// `auto` takes the kernel module where the kernel has it and boringtun otherwise; `kernel` on
/// a kernel without the module is a clear error.
#[test]
fn implementation_auto_falls_back_to_boringtun_and_kernel_needs_the_module() -> Result<()> {
    if !require_root("implementation_auto_falls_back_to_boringtun_and_kernel_needs_the_module") {
        return Ok(());
    }
    let gw = Netns::new("gdeg")?;
    let probe = unique("wgp");
    let kernel_has_wireguard = gw
        .exec(&["ip", "link", "add", &probe, "type", "wireguard"])
        .is_ok();
    let _ = gw.exec(&["ip", "link", "del", &probe]);
    let scratch = Scratch::new()?;
    let wg_if = unique("gwg");
    let config = |implementation: &str| {
        gateway_config(&scratch, &wg_if, "").replace(
            "implementation = \"userspace\"",
            &format!("implementation = \"{implementation}\""),
        )
    };

    let path = scratch.write("gatewayd.toml", &config("auto"))?;
    let mut daemon = Daemon::spawn(&gw, &scratch, &path)?;
    daemon.wait_notify("READY=1", READY_TIMEOUT)?;
    let status = gatewayctl(&scratch, &["encryption", "status"])?;
    let expected = if kernel_has_wireguard {
        "kernel"
    } else {
        "userspace"
    };
    assert_eq!(status["wireguard"]["implementation"], expected, "{status}");
    daemon.signal(libc::SIGTERM)?;
    daemon.wait()?;
    let teardown = gw
        .command(&binary("gatewayd"))
        .args(["teardown", "--config"])
        .arg(&path)
        .status()?;
    assert!(teardown.success());
    assert!(
        gw.exec(&["ip", "link", "show", &wg_if]).is_err(),
        "teardown leaves no interface"
    );

    scratch.write("gatewayd.toml", &config("kernel"))?;
    let mut daemon = Daemon::spawn(&gw, &scratch, &path)?;
    let started = daemon.wait_notify("READY=1", READY_TIMEOUT);
    if kernel_has_wireguard {
        started?;
    } else {
        let e = format!(
            "{:#}",
            started
                .err()
                .ok_or_else(|| anyhow!("started without the module"))?
        );
        assert!(
            e.contains("wireguard module") && e.contains("CONFIG_WIREGUARD"),
            "{e}"
        );
        assert!(gw.exec(&["ip", "link", "show", &wg_if]).is_err());
    }
    Ok(())
}

/// Egress through the tunnel: a node routes an outside destination into its tunnel to the
/// gateway; the gateway's egress policy SNATs the decrypted pod traffic out of its egress
/// interface, and the replies go back to the pod through the tunnel.
#[test]
fn egress_traffic_from_a_node_arrives_and_returns_through_the_tunnel() -> Result<()> {
    if !require_root("egress_traffic_from_a_node_arrives_and_returns_through_the_tunnel") {
        return Ok(());
    }
    const EGRESS_IP: &str = "10.75.0.1";
    const OUTSIDE: &str = "10.75.0.2";
    let gw = Netns::new("gdeg")?;
    let scratch = Scratch::new()?;
    let underlay = unique("uga");
    let node = Node::new(&gw, &scratch, 1, &underlay)?;
    let outside = Netns::new("gdeo")?;
    let egress_if = unique("egr");
    veth(
        &gw,
        &egress_if,
        &[&format!("{EGRESS_IP}/24")],
        &outside,
        "eth0",
        &[&format!("{OUTSIDE}/24")],
    )?;
    gw.sysctl("net.ipv4.ip_forward", "1")?;
    let _server = PeerServer::start(&outside, &[format!("{OUTSIDE}:7000").parse()?], &[])?;

    let wg_if = unique("gwg");
    let config = format!(
        r#"{daemon}
[[egress_policies]]
name = "outside"
source_cidrs = ["{pods}"]
destination_cidrs = ["10.75.0.0/24"]
egress_interface = "{egress_if}"
egress_ip = "{EGRESS_IP}"

[encryption]
mode = "wireguard"

[encryption.wireguard]
interface = "{wg_if}"
implementation = "userspace"
address = "{GW_TUNNEL}/24"

{peer}"#,
        daemon = scratch.daemon_table(),
        pods = node.pod_cidr,
        peer = node.peer_toml("node")
    );
    let path = scratch.write("gatewayd.toml", &config)?;
    let mut daemon = Daemon::spawn(&gw, &scratch, &path)?;
    daemon.wait_notify("READY=1", READY_TIMEOUT)?;
    let status = gatewayctl(&scratch, &["encryption", "status"])?;
    let gateway_key = status["wireguard"]["public_key"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    // The node sends the egress destinations to the gateway through its tunnel, from the pod.
    node.ns.exec(&[
        "wg",
        "set",
        &node.wg.ifname,
        "peer",
        &gateway_key,
        "endpoint",
        &format!("{}:{WG_PORT}", node.gateway_underlay),
        "allowed-ips",
        "10.99.0.0/24,10.75.0.0/24",
    ])?;
    node.ns.exec(&[
        "ip",
        "route",
        "add",
        "10.75.0.0/24",
        "dev",
        &node.wg.ifname,
        "src",
        &node.pod,
    ])?;

    let capture = Capture::start(&gw, &underlay, "", scratch.path("underlay.pcap"))?;
    let server: SocketAddr = format!("{OUTSIDE}:7000").parse()?;
    let seen = wait_for(
        "a connection from the pod to the outside",
        Duration::from_secs(30),
        || {
            let Ok(mut conn) = node.ns.tcp_connect(server, Duration::from_secs(3)) else {
                return Ok(None);
            };
            Ok(tcp_exchange(&mut conn, "hello", Duration::from_secs(5)).ok())
        },
    )?;
    let seen: SocketAddr = seen.parse()?;
    assert_eq!(
        seen.ip().to_string(),
        EGRESS_IP,
        "the outside sees the egress address"
    );
    let mut conn = node.ns.tcp_connect(server, Duration::from_secs(10))?;
    for i in 0..20 {
        tcp_exchange(&mut conn, &format!("line {i}"), Duration::from_secs(10))?;
    }
    let file = capture.stop()?;
    assert!(!pcap_read(&file, &format!("udp port {WG_PORT}"))?.is_empty());
    let plain = pcap_read(&file, &format!("ip and not udp port {WG_PORT} and not igmp"))?;
    assert!(
        plain.is_empty(),
        "the pod's traffic crossed the underlay only inside the tunnel:\n{}",
        plain.join("\n")
    );
    let policy = gatewayctl(&scratch, &["egress", "list"])?;
    assert!(policy[0]["packets_out"].as_u64().unwrap_or(0) > 20, "{policy}");
    Ok(())
}
