//! The Prometheus endpoint (`/metrics` on `metrics.listen`).
//!
//! A scrape never waits for the daemon's main loop: the main loop publishes a snapshot of the
//! labels (which id is which service and backend) after each reconcile, and the scrape reads the
//! per-CPU counters itself, on a blocking thread, through its own handles on the pinned maps.

use crate::datapath::pins::open_pinned_map;
use crate::lb::maps::LbCounters;
use anyhow::{Context, Result};
use aya::maps::{MapData, PerCpuArray};
use gatewayd_common::api;
use gatewayd_common::map_names;
use gatewayd_common::maps::EgressCounters;
use gatewayd_common::maps::REASON_NAMES;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{info, warn};

/// How the sources of desired state besides the file (the Kubernetes clusters) are followed:
/// implemented by their sync, read at each scrape. The metrics know nothing else of them.
pub trait SyncStatus: Send + Sync {
    /// Every state a source can be in: one series each, 1 for a source's current state.
    fn states(&self) -> Vec<&'static str>;
    /// Every source, as it is now.
    fn sources(&self) -> Vec<SourceStatus>;
}

/// One source of desired state (a cluster), as a scrape shows it.
#[derive(Debug, Clone)]
pub struct SourceStatus {
    pub name: String,
    /// One of [`SyncStatus::states`].
    pub state: &'static str,
    /// Since the source last delivered something; `None` before the first time.
    pub last_event_age: Option<Duration>,
}

/// What a scrape needs to label the counters, as of the last reconcile.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub config_generation: u64,
    /// By service id.
    pub services: BTreeMap<u32, ServiceView>,
    /// By egress policy id.
    pub egress_policies: BTreeMap<u32, PolicyLabels>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub policy: String,
    pub egress_ip: String,
}

#[derive(Debug, Clone)]
pub struct ServiceView {
    pub labels: ServiceLabels,
    /// By backend id.
    pub backends: BTreeMap<u32, BackendLabels>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
    pub vip: String,
    pub port: u16,
    pub protocol: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub service: String,
    pub vip: String,
    pub port: u16,
    pub protocol: String,
    pub backend: String,
    pub state: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

/// Name, help and field of one per-policy egress counter family.
type EgressFamily = (&'static str, &'static str, fn(&EgressCounters) -> u64);

/// Metrics the daemon itself updates (they live across scrapes), plus the snapshot.
pub struct Metrics {
    snapshot: Mutex<Arc<Snapshot>>,
    reconcile_seconds: Histogram,
    reloads: Family<ResultLabels, Counter>,
    maps_dir: PathBuf,
    /// Opened on first scrape; one scrape at a time reads through them.
    counters: Mutex<Option<(LbCounters, PerCpuArray<MapData, EgressCounters>)>>,
    /// Live NAT entries as of the last garbage collection, and the table's capacity.
    nat_entries: AtomicI64,
    nat_capacity: AtomicI64,
    /// The Kubernetes clusters followed, once they are.
    clusters: Mutex<Option<Arc<dyn SyncStatus>>>,
    /// As of the daemon's last look (every few seconds, and after each reload).
    encryption: Mutex<Option<api::EncryptionStatus>>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabels {
    cluster: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterStateLabels {
    cluster: String,
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    interface: String,
    peer: String,
    public_key: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct XfrmErrorLabels {
    error: String,
}

impl Metrics {
    pub fn new(maps_dir: PathBuf) -> Arc<Self> {
        Arc::new(Metrics {
            snapshot: Mutex::new(Arc::default()),
            // 100 µs .. ~3 s
            reconcile_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            reloads: Family::default(),
            maps_dir,
            counters: Mutex::new(None),
            nat_entries: AtomicI64::new(0),
            nat_capacity: AtomicI64::new(0),
            clusters: Mutex::default(),
            encryption: Mutex::new(None),
        })
    }

    pub fn set_clusters(&self, clusters: Arc<dyn SyncStatus>) {
        *self.clusters.lock().expect("clusters lock") = Some(clusters);
    }

    /// Per-cluster sync state (one series per state, 1 for the current one) and staleness.
    fn register_clusters(&self, registry: &mut Registry) {
        let states = Family::<ClusterStateLabels, Gauge>::default();
        let ages = Family::<ClusterLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        if let Some(clusters) = self.clusters.lock().expect("clusters lock").as_ref() {
            let all = clusters.states();
            for s in clusters.sources() {
                for &state in &all {
                    states
                        .get_or_create(&ClusterStateLabels {
                            cluster: s.name.clone(),
                            state,
                        })
                        .set(i64::from(s.state == state));
                }
                if let Some(age) = s.last_event_age {
                    ages.get_or_create(&ClusterLabels { cluster: s.name })
                        .set(age.as_secs_f64());
                }
            }
        }
        registry.register(
            "k8s_cluster_state",
            "Kubernetes sync state per cluster: 1 for the current state (connecting, synced, stale)",
            states,
        );
        registry.register(
            "k8s_cluster_last_event_age_seconds",
            "Seconds since a cluster's watches last delivered an event",
            ages,
        );
    }

    pub fn set_nat_entries(&self, live: usize, capacity: u32) {
        self.nat_entries.store(live as i64, Ordering::Relaxed);
        self.nat_capacity.store(i64::from(capacity), Ordering::Relaxed);
    }

    pub fn publish_encryption(&self, status: api::EncryptionStatus) {
        *self.encryption.lock().expect("encryption lock") = Some(status);
    }

    pub fn publish(&self, snapshot: Snapshot) {
        *self.snapshot.lock().expect("snapshot lock") = Arc::new(snapshot);
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.lock().expect("snapshot lock").clone()
    }

    pub fn observe_reconcile(&self, seconds: f64) {
        self.reconcile_seconds.observe(seconds);
    }

    pub fn count_reload(&self, ok: bool) {
        self.reloads
            .get_or_create(&ResultLabels {
                result: if ok { "ok" } else { "failed" },
            })
            .inc();
    }

    /// Renders the exposition text. Blocking: reads the maps.
    pub fn render(&self) -> Result<String> {
        let snapshot = self.snapshot();
        let mut guard = self.counters.lock().expect("counters lock");
        if guard.is_none() {
            let egress = open_pinned_map(&self.maps_dir, map_names::EGRESS_STATS)?;
            *guard = Some((LbCounters::open(&self.maps_dir)?, egress));
        }
        let (counters, egress_stats) = guard.as_ref().expect("opened above");

        let mut registry = Registry::with_prefix("gatewayd");
        let build = Family::<VersionLabels, Gauge>::default();
        build
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "gatewayd build", build);
        let generation = Gauge::<i64>::default();
        generation.set(snapshot.config_generation as i64);
        registry.register(
            "config_generation",
            "Configuration generation in force",
            generation,
        );
        registry.register(
            "config_reloads",
            "Configuration reloads by result",
            self.reloads.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time to apply a desired state to the datapath",
            self.reconcile_seconds.clone(),
        );

        let svc_packets = Family::<ServiceLabels, Counter>::default();
        let svc_bytes = Family::<ServiceLabels, Counter>::default();
        let svc_flows = Family::<ServiceLabels, Counter>::default();
        let be_packets = Family::<BackendLabels, Counter>::default();
        let be_bytes = Family::<BackendLabels, Counter>::default();
        let be_flows = Family::<BackendLabels, Counter>::default();
        for (service_id, s) in &snapshot.services {
            let t = counters.service_traffic(*service_id)?;
            svc_packets.get_or_create(&s.labels).inc_by(t.packets);
            svc_bytes.get_or_create(&s.labels).inc_by(t.bytes);
            svc_flows.get_or_create(&s.labels).inc_by(t.new_flows);
            for (backend_id, labels) in &s.backends {
                let t = counters.backend_traffic(*backend_id)?;
                be_packets.get_or_create(labels).inc_by(t.packets);
                be_bytes.get_or_create(labels).inc_by(t.bytes);
                be_flows.get_or_create(labels).inc_by(t.new_flows);
            }
        }
        registry.register("lb_service_packets", "Packets balanced per VIP", svc_packets);
        registry.register(
            "lb_service_bytes",
            "Bytes balanced per VIP (as received)",
            svc_bytes,
        );
        registry.register("lb_service_flows", "New flows per VIP", svc_flows);
        registry.register("lb_backend_packets", "Packets sent to each backend", be_packets);
        registry.register(
            "lb_backend_bytes",
            "Bytes sent to each backend (as received)",
            be_bytes,
        );
        registry.register("lb_backend_flows", "New flows assigned to each backend", be_flows);

        let reason_packets = Family::<ReasonLabels, Counter>::default();
        let reason_bytes = Family::<ReasonLabels, Counter>::default();
        for (c, reason) in counters.reasons()?.into_iter().zip(REASON_NAMES) {
            reason_packets
                .get_or_create(&ReasonLabels { reason })
                .inc_by(c.packets);
            reason_bytes
                .get_or_create(&ReasonLabels { reason })
                .inc_by(c.bytes);
        }
        registry.register(
            "datapath_packets",
            "Packets the datapath passed, dropped or answered other than by forwarding, by reason",
            reason_packets,
        );
        registry.register("datapath_bytes", "Bytes by datapath reason", reason_bytes);

        let entries = Gauge::<i64>::default();
        entries.set(counters.flow_count() as i64);
        registry.register(
            "lb_flow_table_entries",
            "Live entries in the LB connection table",
            entries,
        );
        let capacity = Gauge::<i64>::default();
        capacity.set(i64::from(counters.flow_capacity()));
        registry.register(
            "lb_flow_table_capacity",
            "Capacity of the LB connection table",
            capacity,
        );

        let families: [EgressFamily; 6] = [
            (
                "egress_packets_out",
                "Packets SNATed by each egress policy",
                |c| c.packets_out,
            ),
            ("egress_bytes_out", "Bytes SNATed by each egress policy", |c| {
                c.bytes_out
            }),
            (
                "egress_packets_in",
                "Reply packets translated back for each egress policy",
                |c| c.packets_in,
            ),
            (
                "egress_bytes_in",
                "Reply bytes translated back for each egress policy",
                |c| c.bytes_in,
            ),
            (
                "egress_flows",
                "NAT mappings created by each egress policy",
                |c| c.new_flows,
            ),
            (
                "egress_nat_failures",
                "New flows dropped for lack of a free NAT port",
                |c| c.nat_failures,
            ),
        ];
        let mut totals = Vec::new();
        for (id, labels) in &snapshot.egress_policies {
            let per_cpu = egress_stats.get(id, 0)?;
            let sum = per_cpu.iter().fold([0u64; 6], |mut acc, c| {
                for (slot, (_, _, field)) in acc.iter_mut().zip(&families) {
                    *slot += field(c);
                }
                acc
            });
            totals.push((labels, sum));
        }
        for (i, (name, help, _)) in families.iter().enumerate() {
            let family = Family::<PolicyLabels, Counter>::default();
            for (labels, sum) in &totals {
                family.get_or_create(labels).inc_by(sum[i]);
            }
            registry.register(*name, *help, family);
        }
        let nat_entries = Gauge::<i64>::default();
        nat_entries.set(self.nat_entries.load(Ordering::Relaxed));
        registry.register(
            "egress_nat_entries",
            "Live egress NAT entries (two per flow), as of the last collection",
            nat_entries,
        );
        let nat_capacity = Gauge::<i64>::default();
        nat_capacity.set(self.nat_capacity.load(Ordering::Relaxed));
        registry.register(
            "egress_nat_capacity",
            "Capacity of the egress NAT table",
            nat_capacity,
        );

        self.register_clusters(&mut registry);
        self.register_encryption(&mut registry);

        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry)?;
        Ok(text)
    }
}

impl Metrics {
    fn register_encryption(&self, registry: &mut Registry) {
        let Some(status) = self.encryption.lock().expect("encryption lock").clone() else {
            return;
        };
        if let Some(wg) = &status.wireguard {
            let age = Family::<PeerLabels, Gauge>::default();
            let rx = Family::<PeerLabels, Counter>::default();
            let tx = Family::<PeerLabels, Counter>::default();
            for p in &wg.peers {
                let labels = PeerLabels {
                    interface: wg.interface.clone(),
                    peer: p.name.clone(),
                    public_key: p.public_key.clone(),
                };
                // No handshake yet: no sample, rather than a misleading age of 0.
                if let Some(a) = p.handshake_age_seconds {
                    age.get_or_create(&labels).set(a as i64);
                }
                rx.get_or_create(&labels).inc_by(p.rx_bytes);
                tx.get_or_create(&labels).inc_by(p.tx_bytes);
            }
            registry.register(
                "wireguard_peer_handshake_age_seconds",
                "Seconds since the last WireGuard handshake with each peer",
                age,
            );
            registry.register(
                "wireguard_peer_rx_bytes",
                "Bytes received from each WireGuard peer",
                rx,
            );
            registry.register("wireguard_peer_tx_bytes", "Bytes sent to each WireGuard peer", tx);
        }
        if let Some(ipsec) = &status.ipsec {
            let states = Gauge::<i64>::default();
            states.set(ipsec.states as i64);
            registry.register("ipsec_states", "XFRM states gatewayd installed", states);
            let policies = Gauge::<i64>::default();
            policies.set(ipsec.policies as i64);
            registry.register("ipsec_policies", "XFRM policies gatewayd installed", policies);
            let key = Gauge::<i64>::default();
            key.set(i64::from(ipsec.current_key_id));
            registry.register(
                "ipsec_current_key_id",
                "Key id (SPI) of outbound IPsec traffic",
                key,
            );
            // The kernel's XFRM error counters (CONFIG_XFRM_STATISTICS): the network
            // namespace's, not only gatewayd's states'.
            if let Ok(text) = std::fs::read_to_string("/proc/self/net/xfrm_stat") {
                let errors = Family::<XfrmErrorLabels, Counter>::default();
                for (name, value) in text.lines().filter_map(|l| {
                    let mut f = l.split_whitespace();
                    Some((f.next()?, f.next()?.parse::<u64>().ok()?))
                }) {
                    errors
                        .get_or_create(&XfrmErrorLabels {
                            error: name.to_owned(),
                        })
                        .inc_by(value);
                }
                registry.register(
                    "ipsec_xfrm_errors",
                    "XFRM error counters of the kernel, by name",
                    errors,
                );
            }
        }
    }
}

/// Serves `/metrics` until the runtime stops.
pub async fn serve(listen: SocketAddr, metrics: Arc<Metrics>) -> Result<()> {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("metrics.listen {listen}"))?;
    info!(%listen, "serving Prometheus metrics on /metrics");
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                match tokio::task::spawn_blocking(move || metrics.render()).await {
                    Ok(Ok(text)) => {
                        ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
                    }
                    Ok(Err(e)) => {
                        warn!("metrics scrape failed: {e:#}");
                        (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response()
                    }
                    Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
                }
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!("metrics server stopped: {e}");
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render_encryption(status: api::EncryptionStatus) -> String {
        let metrics = Metrics::new(PathBuf::new());
        metrics.publish_encryption(status);
        let mut registry = Registry::with_prefix("gatewayd");
        metrics.register_encryption(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    #[test]
    fn wireguard_peers_are_labelled_and_a_peer_without_handshake_has_no_age() {
        let peer = |name: &str, age: Option<u64>| api::WireGuardPeerStatus {
            name: name.into(),
            public_key: format!("{name}-key"),
            endpoint: None,
            allowed_ips: vec![],
            handshake_age_seconds: age,
            rx_bytes: 10,
            tx_bytes: 20,
        };
        let text = render_encryption(api::EncryptionStatus {
            mode: "wireguard".into(),
            wireguard: Some(api::WireGuardStatus {
                interface: "gwd-wg0".into(),
                implementation: "userspace".into(),
                public_key: "pub".into(),
                listen_port: 51820,
                peers: vec![peer("a", Some(7)), peer("b", None)],
            }),
            ipsec: None,
        });
        let labels = |p: &str| format!("{{interface=\"gwd-wg0\",peer=\"{p}\",public_key=\"{p}-key\"}}");
        assert!(
            text.contains(&format!(
                "gatewayd_wireguard_peer_handshake_age_seconds{} 7",
                labels("a")
            )),
            "{text}"
        );
        assert!(!text.contains(&format!(
            "gatewayd_wireguard_peer_handshake_age_seconds{}",
            labels("b")
        )));
        assert!(text.contains(&format!(
            "gatewayd_wireguard_peer_rx_bytes_total{} 10",
            labels("b")
        )));
        assert!(text.contains(&format!(
            "gatewayd_wireguard_peer_tx_bytes_total{} 20",
            labels("a")
        )));
        assert!(!text.contains("ipsec"));
    }

    #[test]
    fn each_followed_source_has_a_series_per_state_and_its_last_event_age() {
        struct Sources;
        impl SyncStatus for Sources {
            fn states(&self) -> Vec<&'static str> {
                vec!["listing", "watching"]
            }
            fn sources(&self) -> Vec<SourceStatus> {
                vec![
                    SourceStatus {
                        name: "east".into(),
                        state: "watching",
                        last_event_age: Some(Duration::from_secs(3)),
                    },
                    SourceStatus {
                        name: "west".into(),
                        state: "listing",
                        last_event_age: None,
                    },
                ]
            }
        }
        let metrics = Metrics::new(PathBuf::new());
        metrics.set_clusters(Arc::new(Sources));
        let mut registry = Registry::with_prefix("gatewayd");
        metrics.register_clusters(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "gatewayd_k8s_cluster_state{cluster=\"east\",state=\"listing\"} 0",
            "gatewayd_k8s_cluster_state{cluster=\"east\",state=\"watching\"} 1",
            "gatewayd_k8s_cluster_state{cluster=\"west\",state=\"listing\"} 1",
            "gatewayd_k8s_cluster_last_event_age_seconds{cluster=\"east\"} 3.0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in {text}");
        }
        assert!(
            !text.contains("last_event_age_seconds{cluster=\"west\"}"),
            "{text}"
        );
    }

    #[test]
    fn ipsec_counts_and_current_key_are_exported() {
        let text = render_encryption(api::EncryptionStatus {
            mode: "ipsec".into(),
            wireguard: None,
            ipsec: Some(api::IpsecStatus {
                local_address: "192.0.2.1".into(),
                current_key_id: 4,
                installed_key_ids: vec![3, 4],
                states: 8,
                policies: 6,
                peers: vec!["a".into()],
            }),
        });
        for line in [
            "gatewayd_ipsec_states 8",
            "gatewayd_ipsec_policies 6",
            "gatewayd_ipsec_current_key_id 4",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in {text}");
        }
        assert!(!text.contains("wireguard"));
    }
}
