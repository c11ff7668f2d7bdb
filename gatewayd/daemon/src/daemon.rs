//! The long-running daemon, as composition and order of operations: it builds the components
//! ([`crate::reconcile`]), the sources (the file, the clusters) and the views (control socket,
//! metrics), programs the configuration, then serves reloads (SIGHUP), cluster updates,
//! periodic work, the control socket and the systemd watchdog from one loop.

use crate::config::{self, Config, Settings, SystemHost};
use crate::control::{self, Lifecycle, Views};
use crate::datapath::{AttachmentPlan, Capacities, Datapath};
use crate::egress::gateway::EgressGateway;
use crate::encryption::Encryption;
use crate::events::EventHub;
use crate::host::addresses::EgressAddresses;
use crate::host::neighbours::Neighbours;
use crate::k8s::clusters::Clusters;
use crate::k8s::sync::ClusterUpdate;
use crate::lb::balancer::LoadBalancer;
use crate::metrics::{self, Metrics, Snapshot};
use crate::model::DesiredState;
use crate::reconcile::{Components, Reconcile};
use anyhow::{Context, Result};
use gatewayd_common::api;
use sd_notify::NotifyState;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

/// The daemon's parts: the configuration in force, the components it programs, the clusters
/// it follows, and its metrics.
struct Daemon {
    config: Config,
    lifecycle: Lifecycle,
    components: Components,
    clusters: Clusters,
    metrics: Arc<Metrics>,
}

fn notify(states: &[NotifyState]) {
    // Outside systemd there is no NOTIFY_SOCKET and this is a no-op.
    if let Err(e) = sd_notify::notify(states) {
        warn!("sd_notify failed: {e}");
    }
}

pub fn run(config_path: PathBuf, config: Config) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_async(config_path, config))
}

async fn run_async(config_path: PathBuf, config: Config) -> Result<()> {
    let s = &config.settings;
    notify(&[NotifyState::Status("loading eBPF programs")]);
    let mut datapath = Datapath::open(
        &s.bpffs,
        &Capacities {
            max_services: s.lb.max_services,
            max_backends: s.lb.max_backends,
            flow_table_size: s.lb.flow_table_size,
            nat_table_size: s.egress.nat_table_size,
        },
    )?;
    let maps_dir = datapath.pins().maps();
    let lb = LoadBalancer::open(&mut datapath)?;
    let egress = EgressGateway::open(&mut datapath, s)?;
    let (connection, netlink, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    tokio::spawn(connection);
    let components = Components::new(
        lb,
        egress,
        datapath,
        Encryption::new(netlink.clone()),
        Neighbours::new(netlink.clone()),
        EgressAddresses::new(netlink, &s.state_dir)?,
    );
    let (queries_tx, mut queries) = tokio::sync::mpsc::channel::<control::Query>(16);
    let metrics = Metrics::new(maps_dir.clone());
    metrics::serve(s.metrics_listen, metrics.clone()).await?;
    let events = EventHub::start(&maps_dir, metrics.clone())?;
    let _socket = control::serve(&s.control_socket, queries_tx, events)?;

    let mut daemon = Daemon {
        config: config.clone(),
        lifecycle: Lifecycle {
            config_path,
            started: Instant::now(),
            generation: 0,
            last_reload: None,
        },
        components,
        clusters: Clusters::restore(&config.settings),
        metrics,
    };
    daemon
        .program(&config)
        .await
        .context("applying the configuration")?;
    daemon.lifecycle.generation = 1;
    daemon.publish_metrics();
    // After the TOML's state is programmed: an unreachable cluster must not delay READY.
    let (cluster_updates, mut cluster_states) = tokio::sync::mpsc::channel::<ClusterUpdate>(16);
    daemon.clusters.follow(&config.settings, cluster_updates).await;
    daemon.metrics.set_clusters(daemon.clusters.sync_status());
    daemon.publish_encryption().await;
    let status = daemon.status_line();
    info!("{status}");
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);

    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let watchdog = sd_notify::watchdog_enabled();
    // Ping at half the timeout; a loop that stops turning stops pinging, and systemd restarts us.
    let period = watchdog.map(|t| t / 2).unwrap_or(Duration::from_secs(3600));
    let mut tick = tokio::time::interval(period.max(Duration::from_millis(100)));
    // Expired NAT entries are invisible to the datapath already; collecting them keeps the
    // table's occupancy honest and leaves room before LRU eviction would start.
    let mut collect = tokio::time::interval(Duration::from_secs(5));

    loop {
        tokio::select! {
            _ = hangup.recv() => daemon.reload().await,
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = tick.tick() => if watchdog.is_some() { notify(&[NotifyState::Watchdog]) },
            _ = collect.tick() => {
                let egress = &mut daemon.components.egress;
                let live = egress.collect_garbage();
                daemon.metrics.set_nat_entries(live, egress.nat_capacity());
                daemon.components.encryption.tick().await;
                daemon.publish_encryption().await;
            }
            Some((request, reply)) = queries.recv() => {
                let _ = reply.send(control::answer(request, daemon.views()).await);
            }
            Some(update) = cluster_states.recv() => daemon.cluster_update(update).await,
        }
    }
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping; the datapath stays attached"),
    ]);
    info!("stopping; programs, links and maps stay pinned so traffic keeps flowing (gatewayd teardown removes them)");
    Ok(())
}

impl Daemon {
    /// Programs `config`, merged with every cluster's last state, into every component. Every
    /// plan is made and every capacity checked before the first change, so a rejected state
    /// leaves the running one exactly as it was.
    async fn program(&mut self, config: &Config) -> Result<()> {
        let started = Instant::now();
        let desired = self.clusters.merge(&config.desired);
        let result = self.components.program(desired, &config.settings).await;
        self.metrics.observe_reconcile(started.elapsed().as_secs_f64());
        result
    }

    async fn reload(&mut self) {
        let now = SystemTime::now();
        notify(&[NotifyState::Reloading, monotonic_now()]);
        info!(path = %self.lifecycle.config_path.display(), "reloading configuration");
        let result = self.load_and_apply().await;
        let (ok, message) = match result {
            Ok(new) => {
                self.config = new;
                self.lifecycle.generation += 1;
                self.publish_metrics();
                self.publish_encryption().await;
                info!(generation = self.lifecycle.generation, "configuration reloaded");
                (true, format!("generation {} applied", self.lifecycle.generation))
            }
            Err(e) => {
                let message = format!("{e:#}");
                error!("reload rejected, the previous configuration stays in force:\n{message}");
                (false, message)
            }
        };
        self.metrics.count_reload(ok);
        self.lifecycle.last_reload = Some(api::ReloadResult {
            unix_time: now.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            ok,
            message,
        });
        let status = if ok {
            self.status_line()
        } else {
            format!("{}; last reload FAILED", self.status_line())
        };
        notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
    }

    /// A cluster's new state: merged and programmed like a reload. If the datapath refuses it
    /// (e.g. capacity), the cluster's previous state stays in force.
    async fn cluster_update(&mut self, update: ClusterUpdate) {
        let id = update.cluster_id;
        let previous = self.clusters.update(update);
        let config = self.config.clone();
        match self.program(&config).await {
            Ok(()) => {
                self.publish_metrics();
                self.publish_encryption().await;
                self.clusters.save(id, &self.config.settings);
            }
            Err(e) => {
                error!(
                    cluster = id,
                    "cluster state rejected, its previous state stays in force: {e:#}"
                );
                self.clusters.reject(id, previous);
            }
        }
    }

    /// Reads the file and programs it.
    async fn load_and_apply(&mut self) -> Result<Config> {
        let new = config::load_file(&self.lifecycle.config_path, &SystemHost)?;
        for w in &new.warnings {
            warn!("{}: {w}", self.lifecycle.config_path.display());
        }
        self.warn_restart_only_changes(&new);
        self.program(&new).await?;
        Ok(new)
    }

    /// Hands the encryption status (per-peer handshakes and bytes, IPsec counts) to the
    /// metrics endpoint.
    async fn publish_encryption(&self) {
        match self.components.encryption.status().await {
            Ok(status) => self.metrics.publish_encryption(status),
            Err(e) => warn!("reading the encryption status: {e:#}"),
        }
    }

    fn warn_restart_only_changes(&self, new: &Config) {
        let (old, new) = (&self.config.settings, &new.settings);
        for (key, changed) in [
            ("clusters", old.clusters != new.clusters),
            // Which cluster follows which Secret is set when the clusters start.
            (
                "encryption.ipsec.key_secret",
                old.encryption.ipsec.key_secret != new.encryption.ipsec.key_secret,
            ),
            ("daemon.bpffs", old.bpffs != new.bpffs),
            ("daemon.control_socket", old.control_socket != new.control_socket),
            (
                "lb capacities (flow_table_size, max_services, max_backends)",
                old.lb.capacities() != new.lb.capacities(),
            ),
            (
                "logging",
                old.log_level != new.log_level || old.log_format != new.log_format,
            ),
        ] {
            if changed {
                warn!("{key} changed: takes effect at the next restart");
            }
        }
    }

    /// Tells the metrics endpoint which counter slot belongs to which service, backend and
    /// egress policy.
    fn publish_metrics(&self) {
        self.metrics.publish(Snapshot {
            config_generation: self.lifecycle.generation,
            services: self.components.lb.metric_labels(),
            egress_policies: self.components.egress.metric_labels(),
        });
    }

    fn status_line(&self) -> String {
        format!(
            "generation {}: {} services on {} interfaces",
            self.lifecycle.generation,
            self.components.lb.services(),
            self.config.settings.interfaces.len()
        )
    }

    fn views(&self) -> Views<'_> {
        Views {
            lifecycle: &self.lifecycle,
            components: &self.components,
            clusters: &self.clusters,
        }
    }
}

/// The attachments: the load balancer's XDP program on every configured interface, the egress
/// NAT programs on every interface a policy leaves by.
impl Reconcile for Datapath {
    type Plan = AttachmentPlan;

    async fn plan(&self, desired: &DesiredState, settings: &Settings) -> Result<AttachmentPlan> {
        let mut wanted = LoadBalancer::attachments(&settings.interfaces);
        wanted.extend(EgressGateway::attachments(&desired.egress_policies));
        self.plan_attachments(wanted)
    }

    async fn apply(&mut self, plan: AttachmentPlan) -> Result<()> {
        self.apply_attachments(plan)
    }
}

fn monotonic_now() -> NotifyState<'static> {
    NotifyState::monotonic_usec_now().unwrap_or(NotifyState::Custom("MONOTONIC_USEC=0"))
}
