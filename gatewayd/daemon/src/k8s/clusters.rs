//! The clusters the daemon follows, as one component: each cluster's last state (restored from
//! `state_dir` at start, saved after each state the daemon accepts), its merge with the file's
//! desired state, and how each cluster's sync goes (for `gatewayctl status` and the metrics).

use super::convert::ClusterState;
use super::saved;
use super::sync::{self, ClusterUpdate, SharedStatus, SyncState};
use crate::config::Settings;
use crate::metrics::{SourceStatus, SyncStatus};
use crate::model::merge::merge;
use crate::model::DesiredState;
use gatewayd_common::api;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// The clusters component: their last states, merge conflicts already logged, saves in
/// flight, and sync statuses.
#[derive(Default)]
pub struct Clusters {
    /// The last state of each cluster, by cluster id.
    states: BTreeMap<u32, Arc<ClusterState>>,
    statuses: Arc<SyncStatuses>,
    /// Merge conflicts as last logged, so each is logged once.
    conflicts: Vec<String>,
    /// Background writes of saved states: a sequence number per save, and per cluster the
    /// newest one written (an older write that runs late must not overwrite a newer one).
    save_sequence: u64,
    saved: Arc<Mutex<BTreeMap<u32, u64>>>,
}

impl Clusters {
    /// Starts from each cluster's last saved state, so what a previous daemon programmed from
    /// the clusters stays programmed until each cluster is reachable and says otherwise.
    pub fn restore(settings: &Settings) -> Self {
        let mut clusters = Clusters::default();
        for cluster in &settings.clusters {
            let path = saved::path(&settings.state_dir, cluster.id);
            match saved::load(&path, &cluster.name) {
                Ok(Some(state)) => {
                    info!(
                        cluster = %cluster.name,
                        services = state.desired.services.len(),
                        "starting from the cluster's last saved state until it syncs"
                    );
                    clusters.states.insert(cluster.id, Arc::new(state));
                }
                Ok(None) => {}
                Err(e) => warn!(cluster = %cluster.name, "ignoring the saved state: {e:#}"),
            }
        }
        clusters
    }

    /// Starts following every configured cluster; new states arrive on `updates`.
    pub async fn follow(&mut self, settings: &Settings, updates: mpsc::Sender<ClusterUpdate>) {
        self.statuses = Arc::new(SyncStatuses(sync::start_all(settings, updates).await));
    }

    /// How each cluster's sync goes, for the metrics.
    pub fn sync_status(&self) -> Arc<SyncStatuses> {
        self.statuses.clone()
    }

    /// `base` (the file's desired state) merged with every cluster's; conflicts are logged
    /// once each.
    pub fn merge(&mut self, base: &DesiredState) -> DesiredState {
        let (desired, conflicts) = merge(base, &self.states);
        for c in conflicts.iter().filter(|c| !self.conflicts.contains(c)) {
            warn!("{c}");
        }
        self.conflicts = conflicts;
        desired
    }

    /// Takes a cluster's new state; returns the one it replaces, for [`Self::reject`].
    pub fn update(&mut self, update: ClusterUpdate) -> Option<Arc<ClusterState>> {
        self.states.insert(update.cluster_id, update.state)
    }

    /// The daemon refused a cluster's new state: its `previous` one stays in force.
    pub fn reject(&mut self, id: u32, previous: Option<Arc<ClusterState>>) {
        match previous {
            Some(p) => self.states.insert(id, p),
            None => self.states.remove(&id),
        };
    }

    /// Saves a cluster's state in the background: a large cluster's file takes a while to
    /// write, and the main loop must not wait for it.
    pub fn save(&mut self, id: u32, settings: &Settings) {
        let (Some(state), Some(cluster)) = (
            self.states.get(&id).cloned(),
            settings.clusters.iter().find(|c| c.id == id),
        ) else {
            return;
        };
        let path = saved::path(&settings.state_dir, id);
        let name = cluster.name.clone();
        self.save_sequence += 1;
        let sequence = self.save_sequence;
        let saved = self.saved.clone();
        tokio::task::spawn_blocking(move || {
            let mut written = saved.lock().expect("saved lock");
            if written.get(&id).is_some_and(|w| *w > sequence) {
                return;
            }
            match saved::save(&path, &name, &state) {
                Ok(()) => {
                    written.insert(id, sequence);
                }
                Err(e) => warn!(cluster = %name, "saving the cluster's state failed: {e:#}"),
            }
        });
    }

    /// `gatewayctl status`: each cluster's sync, and what it contributes.
    pub fn views(&self) -> Vec<api::ClusterSync> {
        self.statuses
            .0
            .iter()
            .map(|status| {
                let s = status.lock().expect("status").clone();
                let d = self.states.get(&s.id).map(|c| &c.desired);
                api::ClusterSync {
                    id: s.id,
                    state: s.state.as_str().into(),
                    last_event_age_seconds: s.last_event.map(|t| t.elapsed().as_secs()),
                    last_error: s.last_error,
                    kinds: s
                        .kinds
                        .into_iter()
                        .map(|k| api::KindSync {
                            kind: k.kind.into(),
                            api_version: k.api_version,
                            state: k.state.as_str().into(),
                            error: k.error,
                        })
                        .collect(),
                    services: d.map_or(0, |d| d.services.len()),
                    egress_policies: d.map_or(0, |d| d.egress_policies.len()),
                    peers: d.map_or(0, |d| d.peers.len()),
                    identities: d.map_or(0, |d| d.identities.len()),
                    name: s.name,
                }
            })
            .collect()
    }
}

/// Every followed cluster's status, which its sync task updates.
#[derive(Default)]
pub struct SyncStatuses(Vec<SharedStatus>);

impl SyncStatus for SyncStatuses {
    fn states(&self) -> Vec<&'static str> {
        [SyncState::Connecting, SyncState::Synced, SyncState::Stale]
            .map(SyncState::as_str)
            .to_vec()
    }

    fn sources(&self) -> Vec<SourceStatus> {
        self.0
            .iter()
            .map(|status| {
                let s = status.lock().expect("status");
                SourceStatus {
                    name: s.name.clone(),
                    state: s.state.as_str(),
                    last_event_age: s.last_event.map(|t| t.elapsed()),
                }
            })
            .collect()
    }
}
