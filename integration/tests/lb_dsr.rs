//! The load balancer end to end, in network namespaces, with the real `gatewayd`:
//!
//! ```text
//!                        lan (bridge br0, 10.70.0.0/24, fd00:70::/64)
//!   client  .101 ──┐
//!   client2 .102 ──┤
//!   gateway .1   ──┤  gatewayd, XDP native on eth0 (one-armed: XDP_TX back out of eth0)
//!   b1      .11  ──┤  VIPs on lo, `gatewayd decap` at tcx ingress of eth0, echo servers
//!   b2      .12  ──┤
//!   b3      .13  ──┘
//! ```
//!
//! Clients route the VIPs (10.100.0.0/24, fd00:100::/64) via the gateway; backends answer the
//! clients directly over the bridge (direct server return). Each test builds its own lab, so
//! the tests may run in parallel; everything is removed on drop, failure included.
//!
//! Two properties of the lab are not gatewayd's but veth's, and are set up here:
//! - a veth only receives XDP_TX frames from its peer when it runs NAPI; the bridge port facing
//!   the gateway gets an XDP_PASS program for that ([`Lan::accept_xdp_frames`]);
//! - a veth hands locally generated packets to its peer with only a partial checksum
//!   (CHECKSUM_PARTIAL); XDP_TX loses that mark and the backend would see a bad checksum, so
//!   clients compute checksums themselves (`ethtool -K eth0 tx off`). Packets from a real NIC
//!   always carry complete checksums.

use anyhow::{anyhow, bail, ensure, Context, Result};
use gatewayd_integration::*;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Generous: the first packet toward a backend waits for ARP/ND on the gateway.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// For connections that must fail: the SYN and one retransmission.
const DENIED_TIMEOUT: Duration = Duration::from_secs(2);

const VIP4: &str = "10.100.0.1";
const VIP4_OPEN: &str = "10.100.0.2";
const VIP6: &str = "fd00:100::1";
const GW4: &str = "10.70.0.1";
const GW6: &str = "fd00:70::1";
const BACKEND_NAMES: [&str; 3] = ["b1", "b2", "b3"];
/// The backends' decap programs also strip GUE on this port.
const GUE_PORT: u16 = 6080;

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("address"), port)
}

struct Host {
    ns: Netns,
    ip4: String,
    ip6: String,
    mac: String,
}

/// One lab. Field order is drop order: the daemon stops first, then the servers and decap
/// programs, then the gateway's pins (Scratch runs `gatewayd teardown`), then the namespaces.
struct Lab {
    daemon: Option<Daemon>,
    servers: Vec<BackendServer>,
    decaps: Vec<Decap>,
    scratch: Scratch,
    /// The bridge port the gateway is plugged into: every frame to or from the gateway.
    gw_port: String,
    gw: Host,
    clients: Vec<Host>,
    backends: Vec<Host>,
    lan: Lan,
}

impl Lab {
    /// The topology with `clients` client hosts; the daemon is not started yet.
    fn new(clients: usize) -> Result<Self> {
        let mut lan = Lan::new("gdlan")?;

        let gw_ns = Netns::new("gdgw")?;
        let gw_port = lan.attach(&gw_ns, "eth0", &[&format!("{GW4}/24"), &format!("{GW6}/64")])?;
        lan.accept_xdp_frames(&gw_port)?;
        for (key, value) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            // Before a backend's MAC is known the XDP program hands the encapsulated packet to
            // the stack, which sends it out the interface it came in on: no ICMP redirects.
            // (accept_local stays 0: gatewayd keeps the backends' neighbours resolved itself.)
            ("net.ipv4.conf.all.send_redirects", "0"),
            ("net.ipv4.conf.eth0.send_redirects", "0"),
        ] {
            gw_ns.sysctl(key, value)?;
        }
        let gw = Host {
            mac: gw_ns.mac("eth0")?,
            ns: gw_ns,
            ip4: GW4.into(),
            ip6: GW6.into(),
        };

        let mut client_hosts = Vec::new();
        for i in 0..clients {
            let ns = Netns::new("gdcl")?;
            let (ip4, ip6) = (format!("10.70.0.{}", 101 + i), format!("fd00:70::{}", 101 + i));
            lan.attach(&ns, "eth0", &[&format!("{ip4}/24"), &format!("{ip6}/64")])?;
            ns.exec(&["ip", "route", "add", "10.100.0.0/24", "via", GW4])?;
            ns.exec(&["ip", "-6", "route", "add", "fd00:100::/64", "via", GW6])?;
            ns.exec(&["ethtool", "-K", "eth0", "tx", "off"])
                .context("ethtool is needed (apt-get install ethtool)")?;
            client_hosts.push(Host {
                mac: ns.mac("eth0")?,
                ns,
                ip4,
                ip6,
            });
        }

        let scratch = Scratch::new()?;
        let mut lab = Lab {
            daemon: None,
            servers: Vec::new(),
            decaps: Vec::new(),
            scratch,
            gw_port,
            gw,
            clients: client_hosts,
            backends: Vec::new(),
            lan,
        };
        for (i, name) in BACKEND_NAMES.iter().enumerate() {
            let ns = Netns::new("gdbe")?;
            let (ip4, ip6) = (format!("10.70.0.{}", 11 + i), format!("fd00:70::{}", 11 + i));
            lab.lan
                .attach(&ns, "eth0", &[&format!("{ip4}/24"), &format!("{ip6}/64")])?;
            // The VIPs are local, but only the gateway may answer ARP for them.
            for vip in [format!("{VIP4}/32"), format!("{VIP4_OPEN}/32")] {
                ns.exec(&["ip", "addr", "add", &vip, "dev", "lo"])?;
            }
            ns.exec(&["ip", "addr", "add", &format!("{VIP6}/128"), "dev", "lo", "nodad"])?;
            for (key, value) in [
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.eth0.rp_filter", "0"),
                ("net.ipv4.conf.all.arp_ignore", "1"),
                ("net.ipv4.conf.all.arp_announce", "2"),
            ] {
                ns.sysctl(key, value)?;
            }
            lab.decaps.push(Decap::attach(&ns, "eth0", Some(GUE_PORT))?);
            lab.servers.push(BackendServer::start(
                &ns,
                name,
                &[sa(VIP4, 80), sa(VIP4_OPEN, 80), sa(VIP6, 80)],
                &[sa(VIP4, 53), sa(VIP6, 53)],
            )?);
            lab.backends.push(Host {
                mac: ns.mac("eth0")?,
                ns,
                ip4,
                ip6,
            });
        }
        Ok(lab)
    }

    /// A gatewayd config for this lab: the daemon table, eth0 in native mode, then `services`
    /// (TOML), where `{b1}`..`{b3}` / `{b1_6}`..`{b3_6}` stand for the backends' addresses.
    fn config(&self, services: &str) -> String {
        let mut services = services.to_owned();
        for (i, b) in self.backends.iter().enumerate() {
            services = services
                .replace(&format!("{{b{}_6}}", i + 1), &b.ip6)
                .replace(&format!("{{b{}}}", i + 1), &b.ip4);
        }
        format!(
            "{}[[interfaces]]\nname = \"eth0\"\nxdp_mode = \"native\"\n\n{services}",
            self.scratch.daemon_table()
        )
    }

    fn start(&mut self, config: &str) -> Result<()> {
        let path = self.scratch.write("gatewayd.toml", config)?;
        let mut daemon = Daemon::spawn(&self.gw.ns, &self.scratch, &path)?;
        daemon.wait_notify("READY=1", READY_TIMEOUT)?;
        self.daemon = Some(daemon);
        Ok(())
    }

    fn daemon(&mut self) -> &mut Daemon {
        self.daemon.as_mut().expect("daemon started")
    }

    /// Writes `config` and reloads it with SIGHUP; fails unless it was applied.
    fn reload(&mut self, config: &str) -> Result<()> {
        self.scratch.write("gatewayd.toml", config)?;
        let before = self.ctl(&["status"])?["config_generation"].as_u64();
        self.daemon().signal(libc::SIGHUP)?;
        self.daemon().wait_notify("READY=1", READY_TIMEOUT)?;
        let status = self.ctl(&["status"])?;
        ensure!(
            status["last_reload"]["ok"] == true && status["config_generation"].as_u64() > before,
            "reload not applied: {status}"
        );
        Ok(())
    }

    fn kill_daemon(&mut self) -> Result<()> {
        let mut daemon = self.daemon.take().expect("daemon started");
        daemon.signal(libc::SIGKILL)?;
        daemon.wait()?;
        Ok(())
    }

    fn ctl(&self, args: &[&str]) -> Result<serde_json::Value> {
        gatewayctl(&self.scratch, args)
    }

    /// Waits until some `gatewayctl observe` has switched the datapath's events on.
    fn wait_observed(&self) -> Result<()> {
        let pin = self.scratch.bpffs.join("maps/gd_observe");
        let deadline = std::time::Instant::now() + READY_TIMEOUT;
        while std::time::Instant::now() < deadline {
            let entries = map_dump(&pin)?;
            if entries
                .first()
                .and_then(|e| e["formatted"]["value"]["enabled"].as_u64())
                == Some(1)
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("no observer subscribed within {READY_TIMEOUT:?}")
    }

    /// A datapath reason counter from `gatewayctl lb stats`.
    fn reason(&self, name: &str) -> Result<u64> {
        let stats = self.ctl(&["lb", "stats"])?;
        stats["reasons"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["reason"] == name))
            .and_then(|r| r["packets"].as_u64())
            .ok_or_else(|| anyhow!("no reason {name} in {stats}"))
    }

    /// `lb list`'s service `name`: backend name -> (state, new_flows).
    fn backend_flows(&self, service: &str) -> Result<BTreeMap<String, (String, u64)>> {
        let list = self.ctl(&["lb", "list"])?;
        let svc = list
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == service))
            .ok_or_else(|| anyhow!("no service {service} in {list}"))?;
        let mut out = BTreeMap::new();
        for b in svc["backends"].as_array().into_iter().flatten() {
            let address = b["address"].as_str().unwrap_or_default();
            let name = self.backend_name(address)?;
            out.insert(
                name,
                (
                    b["state"].as_str().unwrap_or_default().to_owned(),
                    b["traffic"]["new_flows"].as_u64().unwrap_or_default(),
                ),
            );
        }
        Ok(out)
    }

    fn backend_name(&self, address: &str) -> Result<String> {
        let ip: IpAddr = address.parse()?;
        self.backends
            .iter()
            .position(|b| {
                b.ip4.parse::<IpAddr>().ok() == Some(ip) || b.ip6.parse::<IpAddr>().ok() == Some(ip)
            })
            .map(|i| BACKEND_NAMES[i].to_owned())
            .ok_or_else(|| anyhow!("{address} is not a backend"))
    }

    fn connect(&self, client: usize, to: SocketAddr) -> Result<TcpStream> {
        self.clients[client].ns.tcp_connect(to, CONNECT_TIMEOUT)
    }

    /// `n` short TCP connections from `client` (one request each, all from distinct source
    /// ports); returns how many each backend served.
    fn connections(&self, client: usize, to: SocketAddr, n: usize) -> Result<BTreeMap<String, usize>> {
        self.clients[client].ns.tcp_requests(to, n, REPLY_TIMEOUT)
    }

    /// `n` UDP requests from `client`, each from its own socket (so its own flow); the sockets
    /// stay open until all are answered, so no two share a source port.
    fn udp_requests(&self, client: usize, to: SocketAddr, n: usize) -> Result<BTreeMap<String, usize>> {
        let mut sockets = Vec::new();
        for _ in 0..n {
            sockets.push(self.clients[client].ns.udp_connect(to)?);
        }
        let mut served = BTreeMap::new();
        for (i, sock) in sockets.iter().enumerate() {
            // A connected socket only accepts datagrams from `to`: an answer proves its source
            // was the VIP and port.
            let name = udp_exchange(sock, &format!("query-{i}"), Duration::from_secs(2), 5)
                .with_context(|| format!("udp request {i} to {to}"))?;
            *served.entry(name).or_insert(0) += 1;
        }
        Ok(served)
    }

    fn capture(&self, ns: &Netns, ifname: &str, filter: &str, name: &str) -> Result<Capture> {
        Capture::start(ns, ifname, filter, self.scratch.path(name))
    }

    /// Stops captures that include `client`'s packets to `vip` once they hold everything sent
    /// so far: a marker datagram (to port 9, no service there) must have reached each.
    fn stop_captures(
        &self,
        client: usize,
        vip: &str,
        captures: Vec<Capture>,
    ) -> Result<Vec<std::path::PathBuf>> {
        let marker = self.clients[client].ns.udp_connect(sa(vip, 9))?;
        let filter = format!("dst host {vip} and udp dst port 9");
        let mut files = Vec::new();
        for capture in captures {
            capture.sync(&filter, || {
                let _ = marker.send(b"end of capture");
                Ok(())
            })?;
            files.push(capture.stop()?);
        }
        Ok(files)
    }
}

fn web_service(name: &str, vip: &str, extra: &str, backends: &str) -> String {
    format!(
        "[[services]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = 80\nprotocol = \"tcp\"\n{extra}backends = [{backends}]\n\n"
    )
}

/// Asserts that every reply the client captured (source `vip`) came from a backend's MAC,
/// never the gateway's; returns how many there were.
fn replies_came_from_backends(lab: &Lab, pcap: &std::path::Path, vip: &str) -> Result<usize> {
    let backend_macs: Vec<&str> = lab.backends.iter().map(|b| b.mac.as_str()).collect();
    let replies = pcap_read(pcap, &format!("src host {vip}"))?;
    for line in &replies {
        let src_mac = line.split_whitespace().nth(1).unwrap_or_default();
        ensure!(
            src_mac != lab.gw.mac && backend_macs.contains(&src_mac),
            "a reply from the VIP did not come from a backend's MAC ({backend_macs:?}; gateway {}): {line}",
            lab.gw.mac
        );
    }
    Ok(replies.len())
}

#[test]
fn tcp_and_udp_reach_backends_directly_and_spread_by_weight() -> Result<()> {
    if !require_root("tcp_and_udp_reach_backends_directly_and_spread_by_weight") {
        return Ok(());
    }
    let mut lab = Lab::new(1)?;
    let config = lab.config(&format!(
        "{}[[services]]\nname = \"dns\"\nvip = \"{VIP4}\"\nport = 53\nprotocol = \"udp\"\n\
         backends = [{{ address = \"{{b1}}\" }}, {{ address = \"{{b2}}\" }}, {{ address = \"{{b3}}\" }}]\n",
        web_service(
            "web",
            VIP4,
            "",
            r#"{ address = "{b1}", weight = 100 }, { address = "{b2}", weight = 200 }, { address = "{b3}", weight = 100 }"#
        )
    ));
    lab.start(&config)?;

    // Everything the gateway sends or receives, as the bridge sees it; and the client's side.
    let at_gateway = lab.capture(
        &lab.lan.ns,
        &lab.gw_port,
        &format!("host {VIP4} or ip proto 4"),
        "gateway.pcap",
    )?;
    let at_client = lab.capture(&lab.clients[0].ns, "eth0", &format!("host {VIP4}"), "client.pcap")?;

    // 400 new connections. Maglev gives b1:b2:b3 4095:8191:4095 of the 16381 slots, i.e.
    // 25/50/25 % of the hash space; which slot a connection hits depends on its (random)
    // source port, so each backend's count is binomial(400, p): its share has a standard
    // deviation of at most sqrt(0.5 * 0.5 / 400) = 2.5 points. ±10 points is 4 standard
    // deviations: a correct balancer fails this check with probability < 1e-4.
    const N: usize = 400;
    let served = lab.connections(0, sa(VIP4, 80), N)?;
    eprintln!("{N} TCP connections served by {served:?}");
    let expected = [("b1", 0.25), ("b2", 0.50), ("b3", 0.25)];
    for (name, share) in expected {
        let got = *served.get(name).unwrap_or(&0) as f64 / N as f64;
        ensure!(
            (got - share).abs() <= 0.10,
            "{name} served {:.1} % of the connections, its weight share is {:.0} %: {served:?}",
            got * 100.0,
            share * 100.0
        );
    }

    // UDP: every request answered, by more than one backend.
    let udp_served = lab.udp_requests(0, sa(VIP4, 53), 30)?;
    eprintln!("30 UDP requests served by {udp_served:?}");
    ensure!(
        udp_served.len() >= 2,
        "all UDP flows on one backend: {udp_served:?}"
    );

    // The gateway saw the clients' packets to the VIP and sent them on encapsulated; not one
    // packet from the VIP passed it: the replies went straight from the backends to the client.
    let files = lab.stop_captures(0, VIP4, vec![at_gateway, at_client])?;
    let (gateway_pcap, client_pcap) = (&files[0], &files[1]);
    let to_vip = pcap_read(gateway_pcap, &format!("dst host {VIP4} and tcp"))?.len();
    let encapsulated = pcap_read(gateway_pcap, &format!("ip proto 4 and src host {GW4}"))?.len();
    let from_vip = pcap_read(gateway_pcap, &format!("src host {VIP4}"))?;
    eprintln!(
        "at the gateway: {to_vip} packets client->VIP, {encapsulated} IPIP packets out, {} from the VIP",
        from_vip.len()
    );
    ensure!(
        to_vip >= 3 * N + 30,
        "too few client->VIP packets at the gateway: {to_vip}"
    );
    ensure!(
        encapsulated >= 3 * N,
        "too few encapsulated packets: {encapsulated}"
    );
    ensure!(
        from_vip.is_empty(),
        "replies passed through the gateway: {from_vip:#?}"
    );
    let replies = replies_came_from_backends(&lab, client_pcap, VIP4)?;
    eprintln!("the client received {replies} packets from the VIP, all from backend MACs");
    ensure!(
        replies >= 2 * N + 30,
        "too few replies captured at the client: {replies}"
    );

    // Each backend decapsulated traffic, and gatewayd made the kernel resolve and keep every
    // backend's neighbour entry (managed), so XDP had their MACs without accept_local.
    for (decap, name) in lab.decaps.iter().zip(BACKEND_NAMES) {
        let n = decap.decapsulated()?;
        eprintln!("{name} decapsulated {n} packets");
        ensure!(n > 0, "{name} decapsulated nothing");
    }
    let neighbours = stdout(&lab.gw.ns.exec(&["ip", "neigh", "show", "dev", "eth0"])?);
    for backend in &lab.backends {
        ensure!(
            neighbours
                .lines()
                .any(|l| l.starts_with(&format!("{} ", backend.ip4)) && l.contains("managed")),
            "no managed neighbour entry for {}:\n{neighbours}",
            backend.ip4
        );
    }
    ensure!(
        lab.reason("lru_miss_non_syn")? == 0,
        "established packets missed the flow table"
    );

    // gatewayctl's per-backend new flows are exactly what the clients saw.
    let flows = lab.backend_flows("web")?;
    eprintln!("gatewayctl lb list, web: {flows:?}");
    for name in BACKEND_NAMES {
        ensure!(
            flows[name].1 == *served.get(name).unwrap_or(&0) as u64,
            "{name}: gatewayctl counts {} new flows, the client saw {:?}",
            flows[name].1,
            served.get(name)
        );
    }
    // The Maglev slots it reports are the weights' shares of the 16381-slot table.
    let list = lab.ctl(&["lb", "list"])?;
    let web = list
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "web"))
        .ok_or_else(|| anyhow!("no service web in {list}"))?;
    let mut slots = BTreeMap::new();
    for b in web["backends"].as_array().into_iter().flatten() {
        let name = lab.backend_name(b["address"].as_str().unwrap_or_default())?;
        slots.insert(name, b["maglev_slots"].as_u64().unwrap_or_default());
    }
    let expected_slots = BTreeMap::from([
        ("b1".to_owned(), 4095),
        ("b2".to_owned(), 8191),
        ("b3".to_owned(), 4095),
    ]);
    ensure!(slots == expected_slots, "gatewayctl lb list slots: {slots:?}");
    let dns_flows = lab.backend_flows("dns")?;
    for name in BACKEND_NAMES {
        ensure!(
            dns_flows[name].1 == *udp_served.get(name).unwrap_or(&0) as u64,
            "{dns_flows:?} vs {udp_served:?}"
        );
    }

    // Prometheus, scraped over HTTP inside the gateway's namespace, says the same per label.
    let metrics = lab.gw.ns.run_in(|| {
        let mut response = ureq::get("http://127.0.0.1:9469/metrics").call()?;
        Ok(response.body_mut().read_to_string()?)
    })?;
    let metric = |name: &str, labels: &str| -> Result<u64> {
        let prefix = format!("{name}{{{labels}");
        let line = metrics
            .lines()
            .find(|l| l.starts_with(&prefix))
            .ok_or_else(|| anyhow!("no {prefix}... in /metrics:\n{metrics}"))?;
        Ok(line.rsplit(' ').next().unwrap_or_default().parse()?)
    };
    for (name, backend) in BACKEND_NAMES.iter().zip(&lab.backends) {
        let labels = format!(
            r#"service="web",vip="{VIP4}",port="80",protocol="tcp",backend="{}",state="active"}}"#,
            backend.ip4
        );
        ensure!(
            metric("gatewayd_lb_backend_flows_total", &labels)? == flows[*name].1,
            "{name}: {metrics}"
        );
    }
    let web = format!(r#"service="web",vip="{VIP4}",port="80",protocol="tcp"}}"#);
    let total: u64 = flows.values().map(|(_, n)| n).sum();
    ensure!(metric("gatewayd_lb_service_flows_total", &web)? == total);
    ensure!(metric("gatewayd_lb_service_packets_total", &web)? >= 3 * N as u64);
    ensure!(metric("gatewayd_datapath_packets_total", r#"reason="lru_miss_non_syn"}"#)? == 0);
    Ok(())
}

#[test]
fn established_connection_survives_backend_removal_reload_and_restart() -> Result<()> {
    if !require_root("established_connection_survives_backend_removal_reload_and_restart") {
        return Ok(());
    }
    let mut lab = Lab::new(1)?;
    let all = r#"{ address = "{b1}" }, { address = "{b2}" }, { address = "{b3}" }"#;
    lab.start(&lab.config(&web_service("web", VIP4, "", all)))?;

    let mut conn = lab.connect(0, sa(VIP4, 80))?;
    let owner = tcp_exchange(&mut conn, "hello", REPLY_TIMEOUT)?;
    let idx = BACKEND_NAMES.iter().position(|n| *n == owner).expect("a backend");
    eprintln!("the long-lived connection is served by {owner}");

    // The other two backends leave the config; SIGHUP.
    let only_owner = format!(r#"{{ address = "{{b{}}}" }}"#, idx + 1);
    lab.reload(&lab.config(&web_service("web", VIP4, "", &only_owner)))?;
    let flows = lab.backend_flows("web")?;
    ensure!(flows.keys().eq([&owner]), "backends after the reload: {flows:?}");
    ensure!(tcp_exchange(&mut conn, "after the reload", REPLY_TIMEOUT)? == owner);

    // SIGKILL: the datapath keeps forwarding without the daemon ...
    lab.kill_daemon()?;
    ensure!(tcp_exchange(&mut conn, "while the daemon is down", REPLY_TIMEOUT)? == owner);
    // ... and a new daemon adopts the program and the connection table.
    let path = lab.scratch.path("gatewayd.toml");
    let mut daemon = Daemon::spawn(&lab.gw.ns, &lab.scratch, &path)?;
    daemon.wait_notify("READY=1", READY_TIMEOUT)?;
    lab.daemon = Some(daemon);
    let status = lab.ctl(&["status"])?;
    ensure!(status["programs"][0]["origin"] == "adopted", "{status}");
    for i in 0..5 {
        ensure!(tcp_exchange(&mut conn, &format!("after the restart {i}"), REPLY_TIMEOUT)? == owner);
    }

    // Every packet of the connection found its entry in the connection table: none was
    // re-balanced through Maglev.
    ensure!(
        lab.reason("lru_miss_non_syn")? == 0,
        "{}",
        lab.ctl(&["lb", "stats"])?
    );
    drop(conn);
    Ok(())
}

#[test]
fn terminating_backend_keeps_its_connection_and_gets_no_new_ones() -> Result<()> {
    if !require_root("terminating_backend_keeps_its_connection_and_gets_no_new_ones") {
        return Ok(());
    }
    let mut lab = Lab::new(1)?;
    let backends = |terminating: Option<usize>| {
        (1..=3)
            .map(|i| {
                let state = if terminating == Some(i) {
                    r#", state = "terminating""#
                } else {
                    ""
                };
                format!(r#"{{ address = "{{b{i}}}"{state} }}"#)
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    lab.start(&lab.config(&web_service("web", VIP4, "", &backends(None))))?;

    let mut conn = lab.connect(0, sa(VIP4, 80))?;
    let owner = tcp_exchange(&mut conn, "hello", REPLY_TIMEOUT)?;
    let idx = BACKEND_NAMES.iter().position(|n| *n == owner).expect("a backend");
    eprintln!("the open connection is served by {owner}; {owner} becomes terminating");

    lab.reload(&lab.config(&web_service("web", VIP4, "", &backends(Some(idx + 1)))))?;
    let before = lab.backend_flows("web")?;
    ensure!(before[&owner].0 == "terminating", "{before:?}");

    // Its connection goes on (without the connection table, Maglev would now send it to
    // another backend, which would reset it) ...
    for i in 0..5 {
        ensure!(tcp_exchange(&mut conn, &format!("still here {i}"), REPLY_TIMEOUT)? == owner);
    }
    // ... and new connections all go to the others.
    let served = lab.connections(0, sa(VIP4, 80), 100)?;
    eprintln!("100 new connections served by {served:?}");
    ensure!(
        !served.contains_key(&owner),
        "{owner} is terminating but got new connections: {served:?}"
    );
    ensure!(served.len() == 2, "{served:?}");
    ensure!(tcp_exchange(&mut conn, "still here at the end", REPLY_TIMEOUT)? == owner);

    let after = lab.backend_flows("web")?;
    ensure!(
        after[&owner].1 == before[&owner].1,
        "new flows counted on {owner}: {before:?} -> {after:?}"
    );
    ensure!(lab.reason("lru_miss_non_syn")? == 0);
    Ok(())
}

#[test]
fn clients_outside_source_ranges_get_nothing() -> Result<()> {
    if !require_root("clients_outside_source_ranges_get_nothing") {
        return Ok(());
    }
    let mut lab = Lab::new(2)?;
    let all = r#"{ address = "{b1}" }, { address = "{b2}" }, { address = "{b3}" }"#;
    let allowed = format!("source_ranges = [\"{}/32\"]\n", lab.clients[0].ip4);
    let config = lab.config(&format!(
        "{}{}",
        web_service("restricted", VIP4, &allowed, all),
        web_service("open", VIP4_OPEN, "", all)
    ));
    lab.start(&config)?;

    // The allowed client gets through.
    let mut conn = lab.connect(0, sa(VIP4, 80))?;
    tcp_exchange(&mut conn, "allowed", REPLY_TIMEOUT)?;

    // The other one gets nothing: its SYNs are dropped at the gateway, and an operator
    // watching drops sees why.
    let observe = std::process::Command::new(binary("gatewayctl"))
        .arg("--socket")
        .arg(lab.scratch.socket())
        .args([
            "observe",
            "--verdict",
            "dropped",
            "--count",
            "1",
            "--output",
            "json",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    // The observer is subscribed once the datapath reports events: poll until it does.
    lab.wait_observed()?;
    match lab.clients[1].ns.tcp_connect(sa(VIP4, 80), DENIED_TIMEOUT) {
        Ok(_) => bail!("{} is outside source_ranges but connected", lab.clients[1].ip4),
        Err(e) => eprintln!("client2 -> restricted VIP: {e:#}"),
    }
    let drops = lab.reason("source_range_drop")?;
    eprintln!("source_range_drop: {drops} packets");
    ensure!(drops > 0);
    let observed = observe.wait_with_output()?;
    let event: serde_json::Value = serde_json::from_slice(&observed.stdout)?;
    eprintln!("gatewayctl observe --verdict dropped: {event}");
    ensure!(event["reason"] == "source_range_drop", "{event}");
    ensure!(
        event["source"] == lab.clients[1].ip4.as_str() && event["destination"] == VIP4,
        "{event}"
    );
    ensure!(
        event["service"] == "restricted" && event["destination_port"] == 80,
        "{event}"
    );

    // Not a broken client: it reaches a service without source ranges.
    let mut open = lab.clients[1]
        .ns
        .tcp_connect(sa(VIP4_OPEN, 80), CONNECT_TIMEOUT)?;
    tcp_exchange(&mut open, "open to all", REPLY_TIMEOUT)?;
    // And the restricted service's backends never saw a new flow from it.
    let flows: u64 = lab.backend_flows("restricted")?.values().map(|(_, n)| n).sum();
    ensure!(
        flows == 1,
        "restricted service: {flows} new flows, expected the allowed client's one"
    );
    Ok(())
}

#[test]
fn ipv6_vip_end_to_end() -> Result<()> {
    if !require_root("ipv6_vip_end_to_end") {
        return Ok(());
    }
    let mut lab = Lab::new(1)?;
    let all6 = r#"{ address = "{b1_6}" }, { address = "{b2_6}" }, { address = "{b3_6}" }"#;
    let config = lab.config(&format!(
        "{}[[services]]\nname = \"dns6\"\nvip = \"{VIP6}\"\nport = 53\nprotocol = \"udp\"\nbackends = [{all6}]\n",
        web_service("web6", VIP6, "", all6),
    ));
    lab.start(&config)?;
    let at_gateway = lab.capture(
        &lab.lan.ns,
        &lab.gw_port,
        &format!("host {VIP6} or ip6 proto 41"),
        "gateway.pcap",
    )?;
    let at_client = lab.capture(&lab.clients[0].ns, "eth0", &format!("host {VIP6}"), "client.pcap")?;

    const N: usize = 60;
    let served = lab.connections(0, sa(VIP6, 80), N)?;
    eprintln!("{N} TCP connections to [{VIP6}]:80 served by {served:?}");
    ensure!(served.len() >= 2, "{served:?}");
    let mut conn = lab.connect(0, sa(VIP6, 80))?;
    let owner = tcp_exchange(&mut conn, "long-lived", REPLY_TIMEOUT)?;
    for i in 0..3 {
        ensure!(tcp_exchange(&mut conn, &format!("again {i}"), REPLY_TIMEOUT)? == owner);
    }
    let udp = lab.udp_requests(0, sa(VIP6, 53), 20)?;
    eprintln!("20 UDP requests to [{VIP6}]:53 served by {udp:?}");

    let files = lab.stop_captures(0, VIP6, vec![at_gateway, at_client])?;
    let (gateway_pcap, client_pcap) = (&files[0], &files[1]);
    let to_vip = pcap_read(gateway_pcap, &format!("dst host {VIP6} and tcp"))?.len();
    let encapsulated = pcap_read(gateway_pcap, &format!("ip6 proto 41 and src host {GW6}"))?.len();
    let from_vip = pcap_read(gateway_pcap, &format!("src host {VIP6}"))?;
    ensure!(
        from_vip.is_empty(),
        "replies passed through the gateway: {from_vip:#?}"
    );
    ensure!(
        to_vip >= 3 * N && encapsulated >= 3 * N,
        "{to_vip} to the VIP, {encapsulated} IP6IP6"
    );
    let replies = replies_came_from_backends(&lab, client_pcap, VIP6)?;
    eprintln!(
        "at the gateway: {to_vip} packets client->[{VIP6}], {encapsulated} IP6IP6 packets out, \
         none from the VIP; the client got {replies} from backend MACs"
    );

    let flows = lab.backend_flows("web6")?;
    let total: u64 = flows.values().map(|(_, n)| n).sum();
    ensure!(
        total == N as u64 + 1,
        "web6 new flows {flows:?}, expected {}",
        N + 1
    );
    ensure!(lab.reason("lru_miss_non_syn")? == 0);
    Ok(())
}

#[test]
fn mixed_families_and_gue_end_to_end() -> Result<()> {
    if !require_root("mixed_families_and_gue_end_to_end") {
        return Ok(());
    }
    let mut lab = Lab::new(1)?;
    let all4 = r#"{ address = "{b1}" }, { address = "{b2}" }, { address = "{b3}" }"#;
    let all6 = r#"{ address = "{b1_6}" }, { address = "{b2_6}" }, { address = "{b3_6}" }"#;
    let gue = format!("encapsulation = \"gue\"\ngue_port = {GUE_PORT}\n");
    let config = lab.config(&format!(
        "{}{}{}",
        web_service("v4-over-v6", VIP4, "", all6),
        web_service("v6-over-v4", VIP6, "", all4),
        web_service("gue", VIP4_OPEN, &gue, all4),
    ));
    lab.start(&config)?;
    let at_gateway = lab.capture(
        &lab.lan.ns,
        &lab.gw_port,
        &format!("host {VIP4_OPEN} or udp port {GUE_PORT}"),
        "gateway.pcap",
    )?;

    for (service, to) in [
        ("v4-over-v6", sa(VIP4, 80)),
        ("v6-over-v4", sa(VIP6, 80)),
        ("gue", sa(VIP4_OPEN, 80)),
    ] {
        let served = lab.connections(0, to, 20)?;
        eprintln!("{service}: 20 connections to {to} served by {served:?}");
        ensure!(served.len() >= 2, "{service}: {served:?}");
        let total: u64 = lab.backend_flows(service)?.values().map(|(_, n)| n).sum();
        ensure!(total == 20, "{service}: {total} new flows counted");
    }
    let files = lab.stop_captures(0, VIP4_OPEN, vec![at_gateway])?;
    let gue_packets = pcap_read(&files[0], &format!("src host {GW4} and udp dst port {GUE_PORT}"))?.len();
    let from_vip = pcap_read(&files[0], &format!("src host {VIP4_OPEN}"))?;
    ensure!(
        from_vip.is_empty(),
        "replies passed through the gateway: {from_vip:#?}"
    );
    eprintln!("{gue_packets} GUE packets (UDP to port {GUE_PORT}) left the gateway");
    ensure!(gue_packets >= 60, "{gue_packets}");
    Ok(())
}
