//! The Kubernetes sync end to end: the real `gatewayd` follows the test API server
//! ([`gatewayd_integration::apiserver`]) and serves what it says, in network namespaces:
//!
//! ```text
//!                        lan (bridge br0, 10.71.0.0/24)
//!   client  .101 ──┐
//!   gateway .1   ──┤  gatewayd (XDP native on eth0) + the test API server on its 127.0.0.1
//!   b1      .11  ──┤  VIP on lo, `gatewayd decap`, echo server
//!   b2      .12  ──┘
//! ```
//!
//! The API server listens inside the gateway's namespace, so the daemon reaches it on its own
//! loopback; the test drives the server directly (create/update/delete objects, stop it,
//! compact its history, start it again on the same port).

use anyhow::{anyhow, bail, Context, Result};
use gatewayd_integration::apiserver::ApiServer;
use gatewayd_integration::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Generous: reflectors back off up to 10 s between reconnects, and CI machines are shared.
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);
/// Connecting to the VIP and its answer, each.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
const GW: &str = "10.71.0.1";
const VIP: &str = "10.101.0.1";
const CLUSTER: &str = "lab";

struct Backend {
    _ns: Netns,
    ip: String,
}

/// Field order is drop order: daemon, API server, servers and decap programs, pins, namespaces.
struct Lab {
    daemon: Option<Daemon>,
    api: ApiServer,
    api_addr: SocketAddr,
    kubeconfig: std::path::PathBuf,
    _servers: Vec<BackendServer>,
    _decaps: Vec<Decap>,
    scratch: Scratch,
    gw: Netns,
    client: Netns,
    backends: Vec<Backend>,
    _lan: Lan,
}

impl Lab {
    fn new() -> Result<Self> {
        let mut lan = Lan::new("gdklan")?;
        let gw = Netns::new("gdkgw")?;
        let gw_port = lan.attach(&gw, "eth0", &[&format!("{GW}/24")])?;
        lan.accept_xdp_frames(&gw_port)?;
        for (key, value) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.send_redirects", "0"),
            ("net.ipv4.conf.eth0.send_redirects", "0"),
        ] {
            gw.sysctl(key, value)?;
        }
        let client = Netns::new("gdkcl")?;
        lan.attach(&client, "eth0", &["10.71.0.101/24"])?;
        client.exec(&["ip", "route", "add", "10.101.0.0/24", "via", GW])?;
        // See lb_dsr.rs: XDP_TX loses CHECKSUM_PARTIAL, so the client computes checksums.
        client
            .exec(&["ethtool", "-K", "eth0", "tx", "off"])
            .context("ethtool is needed (apt-get install ethtool)")?;

        let mut servers = Vec::new();
        let mut decaps = Vec::new();
        let mut backends = Vec::new();
        for (i, name) in ["b1", "b2"].iter().enumerate() {
            let ns = Netns::new("gdkbe")?;
            let ip = format!("10.71.0.{}", 11 + i);
            lan.attach(&ns, "eth0", &[&format!("{ip}/24")])?;
            ns.exec(&["ip", "addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
            for (key, value) in [
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.eth0.rp_filter", "0"),
                ("net.ipv4.conf.all.arp_ignore", "1"),
                ("net.ipv4.conf.all.arp_announce", "2"),
            ] {
                ns.sysctl(key, value)?;
            }
            decaps.push(Decap::attach(&ns, "eth0", None)?);
            servers.push(BackendServer::start(&ns, name, &[sa(VIP, 80)], &[])?);
            backends.push(Backend { _ns: ns, ip });
        }

        let mut api = ApiServer::new();
        let listener = gw.run_in(|| Ok(TcpListener::bind("127.0.0.1:0")?))?;
        let api_addr = api.start(listener)?;
        let scratch = Scratch::new()?;
        let kubeconfig = scratch.write("kubeconfig", &api.kubeconfig()?)?;
        Ok(Lab {
            daemon: None,
            api,
            api_addr,
            kubeconfig,
            _servers: servers,
            _decaps: decaps,
            scratch,
            gw,
            client,
            backends,
            _lan: lan,
        })
    }

    fn start_daemon(&mut self) -> Result<()> {
        let config = format!(
            "{}[[interfaces]]\nname = \"eth0\"\nxdp_mode = \"native\"\n\n[egress]\ninterface = \"eth0\"\n\n\
             [[clusters]]\nid = 1\nname = \"{CLUSTER}\"\nkubeconfig = {:?}\n",
            self.scratch.daemon_table(),
            self.kubeconfig.display().to_string()
        );
        let path = self.scratch.write("gatewayd.toml", &config)?;
        let mut daemon = Daemon::spawn(&self.gw, &self.scratch, &path)?;
        daemon.wait_notify("READY=1", READY_TIMEOUT)?;
        self.daemon = Some(daemon);
        Ok(())
    }

    fn ctl(&self, args: &[&str]) -> Result<Value> {
        gatewayctl(&self.scratch, args)
    }

    fn log(&self) -> String {
        self.daemon.as_ref().map(|d| d.log_text()).unwrap_or_default()
    }

    /// Polls `check` (which says what it saw when not yet satisfied) until it passes.
    fn wait_for<T>(&self, what: &str, mut check: impl FnMut(&Lab) -> Result<Option<T>>) -> Result<T> {
        let deadline = Instant::now() + SYNC_TIMEOUT;
        loop {
            if let Some(v) = check(self)? {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!("{what}: not within {SYNC_TIMEOUT:?}; daemon log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `lb list`'s service on VIP:80 as (service id, backend address -> state), if present.
    fn service(&self) -> Result<Option<(u64, BTreeMap<String, String>)>> {
        let list = self.ctl(&["lb", "list"])?;
        let Some(svc) = list.as_array().and_then(|l| l.iter().find(|s| s["vip"] == VIP)) else {
            return Ok(None);
        };
        let backends = svc["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| {
                (
                    b["address"].as_str().unwrap_or_default().to_owned(),
                    b["state"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        Ok(Some((svc["service_id"].as_u64().unwrap_or_default(), backends)))
    }

    /// Waits until VIP:80 has exactly the backends `names` (active); returns its service id.
    fn wait_backends(&self, names: &[&str]) -> Result<u64> {
        let wanted: BTreeMap<String, String> = names
            .iter()
            .map(|n| (self.ip_of(n), "active".to_owned()))
            .collect();
        self.wait_for(&format!("backends {names:?}"), |lab| {
            Ok(lab.service()?.filter(|(_, b)| *b == wanted).map(|(id, _)| id))
        })
    }

    fn ip_of(&self, name: &str) -> String {
        let i: usize = name[1..].parse::<usize>().expect("bN") - 1;
        self.backends[i].ip.clone()
    }

    fn cluster_status(&self) -> Result<Value> {
        let status = self.ctl(&["status"])?;
        status["clusters"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == CLUSTER))
            .cloned()
            .ok_or_else(|| anyhow!("no cluster {CLUSTER} in {status}"))
    }

    fn wait_cluster_state(&self, state: &str) -> Result<Value> {
        self.wait_for(&format!("cluster {state}"), |lab| {
            let c = lab.cluster_status()?;
            Ok((c["state"] == state).then_some(c))
        })
    }

    /// `n` short connections to VIP:80 from the client: how many each backend served.
    fn connections(&self, n: usize) -> Result<BTreeMap<String, usize>> {
        self.client.tcp_requests(sa(VIP, 80), n, REPLY_TIMEOUT)
    }

    /// `egress list`'s source CIDRs of policy `name`.
    fn policy_sources(&self, name: &str) -> Result<Value> {
        let list = self.ctl(&["egress", "list"])?;
        list.as_array()
            .and_then(|l| l.iter().find(|p| p["name"] == name))
            .map(|p| p["source_cidrs"].clone())
            .ok_or_else(|| anyhow!("no policy {name} in {list}"))
    }

    fn wait_policy_sources(&self, name: &str, wanted: Value) -> Result<()> {
        self.wait_for(&format!("{name} sources {wanted}"), |lab| {
            Ok((lab.policy_sources(name)? == wanted).then_some(()))
        })
    }

    fn wait_identities(&self, n: usize) -> Result<()> {
        self.wait_for(&format!("{n} identities"), |lab| {
            Ok((lab.ctl(&["identities"])?.as_array().map(Vec::len) == Some(n)).then_some(()))
        })
    }

    fn slice(&self, ready: &[&str]) -> Result<()> {
        let endpoints: Vec<Value> = ready
            .iter()
            .map(|n| json!({"addresses": [self.ip_of(n)], "conditions": {"ready": true, "serving": true, "terminating": false}}))
            .collect();
        self.api.apply(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": "web-abcde", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "endpoints": endpoints,
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
        }))?;
        Ok(())
    }
}

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("address"), port)
}

fn web_service() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {
            "type": "LoadBalancer", "loadBalancerClass": "gatewayd.io/dsr",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"}],
            "selector": {"app": "web"},
        },
        "status": {"loadBalancer": {"ingress": [{"ip": VIP}]}},
    })
}

#[test]
fn services_follow_the_cluster_and_survive_its_outage() -> Result<()> {
    if !require_root("services_follow_the_cluster_and_survive_its_outage") {
        return Ok(());
    }
    let mut lab = Lab::new()?;
    lab.api.apply(json!({"apiVersion": "v1", "kind": "Namespace",
                          "metadata": {"name": "shop", "labels": {"team": "shop"}}}))?;
    lab.api.apply(web_service())?;
    lab.slice(&["b1", "b2"])?;
    lab.start_daemon()?;

    // Created: the VIP is programmed and real traffic reaches both backends.
    lab.wait_backends(&["b1", "b2"])?;
    lab.wait_cluster_state("synced")?;
    let served = lab.connections(40)?;
    assert_eq!(served.keys().collect::<Vec<_>>(), ["b1", "b2"], "{served:?}");

    // Updated: b2 leaves the slice; the maps follow and every connection goes to b1.
    lab.slice(&["b1"])?;
    let id = lab.wait_backends(&["b1"])?;
    assert_eq!(lab.connections(10)?, BTreeMap::from([("b1".to_string(), 10)]));

    // The API server dies: the dataplane keeps serving, the cluster shows stale.
    lab.api.stop();
    let stale = lab.wait_cluster_state("stale")?;
    assert!(stale["last_error"].is_string(), "{stale}");
    assert_eq!(lab.connections(10)?, BTreeMap::from([("b1".to_string(), 10)]));
    let metrics = scrape_metrics(&lab.gw, "http://127.0.0.1:9469/metrics")?;
    assert_eq!(
        metric_value(
            &metrics,
            "gatewayd_k8s_cluster_state",
            &[("cluster", CLUSTER), ("state", "stale")]
        ),
        Some(1.0),
        "{metrics}"
    );

    // A daemon restarted while the API is still down starts from the cluster's saved state:
    // the service stays programmed (same id) and keeps serving.
    let mut old = lab.daemon.take().expect("daemon started");
    old.signal(libc::SIGTERM)?;
    old.wait()?;
    lab.start_daemon()?;
    assert_eq!(lab.service()?.map(|(sid, _)| sid), Some(id), "{}", lab.log());
    assert_eq!(lab.cluster_status()?["state"], "connecting");
    assert_eq!(lab.connections(10)?, BTreeMap::from([("b1".to_string(), 10)]));

    // While it is down the slice changes to b2 and the history is compacted: back on the same
    // port, the watchers get 410 Gone and relist; the service is updated in place (same id:
    // it was never flushed) and traffic moves to b2.
    lab.slice(&["b2"])?;
    lab.api.compact();
    let listener = lab.gw.run_in({
        let addr = lab.api_addr;
        move || Ok(TcpListener::bind(addr)?)
    })?;
    lab.api.start(listener)?;
    assert_eq!(
        lab.wait_backends(&["b2"])?,
        id,
        "the service kept its id across the relist"
    );
    lab.wait_cluster_state("synced")?;
    assert_eq!(lab.connections(10)?, BTreeMap::from([("b2".to_string(), 10)]));

    // An egress policy selecting the web pods: programmed with their addresses.
    lab.api.apply(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-0", "namespace": "shop", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "web", "image": "web"}]},
        "status": {"phase": "Running", "podIP": "10.244.0.5", "podIPs": [{"ip": "10.244.0.5"}]},
    }))?;
    lab.api.apply(json!({
        "apiVersion": "gatewayd.io/v1alpha1", "kind": "EgressGatewayPolicy",
        "metadata": {"name": "web-out"},
        "spec": {
            "selectors": [{"podSelector": {"matchLabels": {"app": "web"}},
                           "namespaceSelector": {"matchLabels": {"team": "shop"}}}],
            "destinationCIDRs": ["10.72.0.0/24"],
        },
    }))?;
    let policy = lab.wait_for("egress policy lab/web-out", |lab| {
        let list = lab.ctl(&["egress", "list"])?;
        Ok(list
            .as_array()
            .and_then(|l| l.iter().find(|p| p["name"] == "lab/web-out"))
            .cloned())
    })?;
    assert_eq!(policy["source_cidrs"], json!(["10.244.0.5/32"]), "{policy}");
    assert_eq!(policy["interface"], "eth0");
    let identities = lab.ctl(&["identities"])?;
    let web0 = &identities[0];
    assert_eq!(
        (
            web0["address"].as_str(),
            web0["pod"].as_str(),
            web0["identity"].as_u64().map(|i| i >> 24)
        ),
        (Some("10.244.0.5"), Some("web-0"), Some(1)),
        "{identities}"
    );
    // An invalid one is skipped and told so on its status, the valid one accepted.
    lab.api.apply(json!({
        "apiVersion": "gatewayd.io/v1alpha1", "kind": "EgressGatewayPolicy",
        "metadata": {"name": "broken"},
        "spec": {"selectors": [{"podSelector": {}}], "destinationCIDRs": ["10.72.0.1/24"]},
    }))?;
    let condition = |name: &str| {
        lab.api
            .get("gatewayd.io/v1alpha1", "EgressGatewayPolicy", None, name)
            .map(|p| p["status"]["conditions"][0].clone())
            .filter(|c| c.is_object())
    };
    let broken = lab.wait_for("status of the broken policy", |_| Ok(condition("broken")))?;
    assert_eq!(broken["status"], "False", "{broken}");
    assert!(
        broken["message"]
            .as_str()
            .unwrap_or_default()
            .contains("host bits"),
        "{broken}"
    );
    assert_eq!(
        condition("web-out").map(|c| c["status"].clone()),
        Some(json!("True"))
    );

    // Pods and namespaces move the policy's sources: a pod of an unselected namespace joins
    // when its namespace gets the label, and a deleted pod leaves.
    lab.api
        .apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bank"}}))?;
    lab.api.apply(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-1", "namespace": "bank", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "web", "image": "web"}]},
        "status": {"phase": "Running", "podIP": "10.244.0.6", "podIPs": [{"ip": "10.244.0.6"}]},
    }))?;
    lab.wait_identities(2)?;
    assert_eq!(lab.policy_sources("lab/web-out")?, json!(["10.244.0.5/32"]));
    lab.api.apply(json!({"apiVersion": "v1", "kind": "Namespace",
                          "metadata": {"name": "bank", "labels": {"team": "shop"}}}))?;
    lab.wait_policy_sources("lab/web-out", json!(["10.244.0.5/32", "10.244.0.6/32"]))?;
    lab.api.delete("v1", "Pod", Some("shop"), "web-0")?;
    lab.wait_policy_sources("lab/web-out", json!(["10.244.0.6/32"]))?;

    // Deleted: the VIP goes.
    lab.api.delete("v1", "Service", Some("shop"), "web")?;
    lab.wait_for("service removed", |lab| {
        Ok(lab.service()?.is_none().then_some(()))
    })?;
    let status = lab.cluster_status()?;
    assert_eq!(status["services"], 0, "{status}");
    assert_eq!(status["egress_policies"], 1, "{status}");
    assert_eq!(status["identities"], 1, "{status}");
    Ok(())
}
