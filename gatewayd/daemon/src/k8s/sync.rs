//! Following one cluster: a kube client, one reflector per kind, and a loop that converts the
//! stores into a [`ClusterState`] after each quiet moment and hands it to the daemon.
//!
//! - The state is always computed from the full stores, never from events: a relist (after a
//!   410 Gone, or a reconnect) swaps in a fresh store without Delete events for objects that
//!   vanished meanwhile, and recomputing from the store sweeps them (mark and sweep).
//! - Nothing is sent before every kind has listed once, nor while a kind is in the middle of a
//!   relist, so a half-synced cluster never programs a partial state; an unreachable API
//!   server sends nothing, so the last state stays programmed (no flush) while the status says
//!   the cluster is stale. A watch that resumes delivers nothing until the next change, so a
//!   probe of the API's version tells when a stale cluster is reachable again.
//! - Bursts are debounced: the state is computed once the events have been quiet for
//!   [`QUIET`] (at most every [`MAX_DELAY`] under a steady stream).

use super::convert::{self, ClusterObjects, ClusterState, Context};
use super::crd;
use super::ipam::{self, ServiceName};
use super::secret::KeySecret;
use super::token::BearerToken;
use crate::config::{Cluster, ClusterAccess, Host, SecretRef, Settings, SystemHost};
use anyhow::{Context as _, Result};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::{self, store::Writer, Store};
use kube::runtime::watcher::{self, ExponentialBackoff};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};
use tracing::{debug, error, info, warn};

/// Long enough that the events of one burst (they arrive within a few ms of each other) make
/// one state; short because every state waits for it. A state of 10,000 services costs
/// ~40 ms of CPU (conversion with the service cache, merge, plan), so a window of this size
/// keeps a steady trickle of events from costing more than a fraction of a core.
pub const QUIET: Duration = Duration::from_millis(50);
pub const MAX_DELAY: Duration = Duration::from_secs(1);
/// Reconnect quickly at first: a gateway serving stale state wants it fresh soon.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

const KINDS: [&str; 6] = ["Service", "EndpointSlice", "Node", "Pod", "Namespace", crd::KIND];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncState {
    /// Not every kind has listed yet.
    Connecting,
    /// Every kind listed and is watching.
    Synced,
    /// Listed once, but some watch fails now: the last state stays programmed.
    Stale,
}

impl SyncState {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncState::Connecting => "connecting",
            SyncState::Synced => "synced",
            SyncState::Stale => "stale",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ClusterStatus {
    pub id: u32,
    pub name: String,
    pub state: SyncState,
    /// When a watch last delivered something.
    pub last_event: Option<Instant>,
    pub last_error: Option<String>,
    /// States handed to the daemon.
    pub updates: u64,
}

pub type SharedStatus = Arc<Mutex<ClusterStatus>>;

impl ClusterStatus {
    fn new(cluster: &Cluster) -> SharedStatus {
        Arc::new(Mutex::new(ClusterStatus {
            id: cluster.id,
            name: cluster.name.clone(),
            state: SyncState::Connecting,
            last_event: None,
            last_error: None,
            updates: 0,
        }))
    }
}

/// Starts following every configured cluster. A cluster whose client cannot be made (a bad
/// kubeconfig) is logged and shown as connecting with the error; the others go on.
pub async fn start_all(settings: &Settings, updates: mpsc::Sender<ClusterUpdate>) -> Vec<SharedStatus> {
    let mut statuses = Vec::new();
    for cluster in &settings.clusters {
        match client(cluster).await {
            Ok(client) => {
                info!(cluster = %cluster.name, id = cluster.id, "following the cluster");
                let key_secret = settings
                    .encryption
                    .ipsec
                    .key_secret
                    .as_ref()
                    .filter(|s| s.cluster == cluster.name)
                    .cloned();
                statuses.push(spawn(
                    cluster.clone(),
                    client,
                    settings.egress.interface.clone(),
                    key_secret,
                    SystemHost,
                    updates.clone(),
                ));
            }
            Err(e) => {
                error!(cluster = %cluster.name, "cannot follow the cluster: {e:#}");
                let status = ClusterStatus::new(cluster);
                status.lock().expect("status").last_error = Some(format!("{e:#}"));
                statuses.push(status);
            }
        }
    }
    statuses
}

/// A new state of one cluster, for the daemon's main loop.
#[derive(Debug)]
pub struct ClusterUpdate {
    pub cluster_id: u32,
    /// Shared with the sync loop, which compares the next state with it: no deep copies.
    pub state: Arc<ClusterState>,
}

/// A kube client for `cluster`, from its kubeconfig or from server + token file (+ CA file).
pub async fn client(cluster: &Cluster) -> Result<Client> {
    let (kubeconfig, context) = match &cluster.access {
        ClusterAccess::Kubeconfig { path, context } => (
            Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?,
            context.clone(),
        ),
        ClusterAccess::Token {
            server,
            token_file,
            ca_file,
        } => {
            // The same access as a kubeconfig would give: the CA is handled the same way, and
            // the token file by the same layer (super::token).
            let doc = serde_json::json!({
                "apiVersion": "v1", "kind": "Config", "current-context": "gatewayd",
                "clusters": [{"name": "c", "cluster": {
                    "server": server,
                    "certificate-authority": ca_file.as_ref().map(|p| p.display().to_string()),
                }}],
                "users": [{"name": "u", "user": {"tokenFile": token_file.display().to_string()}}],
                "contexts": [{"name": "gatewayd", "context": {"cluster": "c", "user": "u"}}],
            });
            (serde_json::from_value(doc)?, None)
        }
    };
    let options = KubeConfigOptions {
        context,
        ..Default::default()
    };
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .with_context(|| format!("cluster {}: kubeconfig", cluster.name))?;
    let token =
        BearerToken::take_from(&mut config.auth_info).with_context(|| format!("cluster {}", cluster.name))?;
    let builder = kube::client::ClientBuilder::try_from(config)
        .with_context(|| format!("cluster {}: client", cluster.name))?;
    Ok(match token {
        Some(token) => builder.with_layer(&token).build(),
        None => builder.build(),
    })
}

#[derive(Default, Clone, Copy)]
struct KindHealth {
    /// Listed completely at least once.
    listed: bool,
    /// Between the start and the end of a relist: its store is about to be replaced.
    relisting: bool,
    failing: bool,
}

/// What one reflector reported.
enum Observed {
    /// A relist started.
    Init,
    /// A relist completed.
    InitDone,
    /// An object event.
    Change,
    /// The API does not serve the kind (e.g. the CRD is not installed): as good as empty.
    NotServed(String),
    Failed(String),
}

impl Observed {
    fn of<K>(event: &watcher::Result<watcher::Event<K>>) -> Self {
        match event {
            Ok(watcher::Event::Init) => Observed::Init,
            Ok(watcher::Event::InitDone) => Observed::InitDone,
            Ok(_) => Observed::Change,
            Err(watcher::Error::InitialListFailed(kube::Error::Api(e))) if e.code == 404 => {
                Observed::NotServed(e.message.clone())
            }
            Err(e) => Observed::Failed(e.to_string()),
        }
    }
}

/// What the reflector tasks tell the converting loop.
struct Shared {
    kinds: Mutex<[KindHealth; KINDS.len()]>,
    status: SharedStatus,
    wake: Notify,
}

impl Shared {
    fn observe(&self, kind: usize, event: Observed) {
        let mut kinds = self.kinds.lock().expect("kinds");
        let mut status = self.status.lock().expect("status");
        let k = &mut kinds[kind];
        match event {
            Observed::Init | Observed::InitDone | Observed::Change => {
                k.failing = false;
                match event {
                    Observed::Init => k.relisting = true,
                    Observed::InitDone => {
                        k.relisting = false;
                        k.listed = true;
                    }
                    _ => {}
                }
                status.last_event = Some(Instant::now());
            }
            Observed::NotServed(message) => {
                if !k.listed {
                    warn!(cluster = %status.name, kind = KINDS[kind], "not served by this cluster, taken as empty: {message}");
                }
                k.listed = true;
                k.relisting = false;
                k.failing = false;
            }
            Observed::Failed(e) => {
                if !k.failing {
                    warn!(cluster = %status.name, kind = KINDS[kind], "watch failed, retrying: {e}");
                }
                k.failing = true;
                k.relisting = false;
                status.last_error = Some(format!("{}: {e}", KINDS[kind]));
            }
        }
        Self::update_state(&kinds[..], &mut status);
        drop((kinds, status));
        self.wake.notify_one();
    }

    /// The API answered: watches that failed are reconnecting now (a watch that resumes from
    /// its resourceVersion delivers nothing until the next change, so this is how a recovery
    /// is seen); any that still fails says so again.
    fn reachable(&self) {
        let mut kinds = self.kinds.lock().expect("kinds");
        if !kinds.iter().any(|k| k.failing) {
            return;
        }
        for k in kinds.iter_mut() {
            k.failing = false;
        }
        let mut status = self.status.lock().expect("status");
        Self::update_state(&kinds[..], &mut status);
    }

    fn failing(&self) -> bool {
        self.kinds.lock().expect("kinds").iter().any(|k| k.failing)
    }

    fn update_state(kinds: &[KindHealth], status: &mut ClusterStatus) {
        let listed = kinds.iter().all(|k| k.listed);
        let failing = kinds.iter().any(|k| k.failing);
        status.state = match (status.state, listed, failing) {
            (_, true, false) => SyncState::Synced,
            (SyncState::Connecting, _, _) => SyncState::Connecting,
            _ => SyncState::Stale,
        };
    }

    /// Whether the stores make a state worth converting: every kind listed once, none in the
    /// middle of a relist (its store is about to change wholesale).
    fn ready(&self) -> bool {
        let kinds = self.kinds.lock().expect("kinds");
        kinds.iter().all(|k| k.listed && !k.relisting)
    }
}

/// What no conversion reads and can be large: managed fields, and the copy of the whole object
/// `kubectl apply` keeps in an annotation.
pub(crate) fn trim<K: Resource>(object: &mut K) {
    object.managed_fields_mut().clear();
    object
        .annotations_mut()
        .remove("kubectl.kubernetes.io/last-applied-configuration");
}

/// Pods are the bulk of a cluster: keep only what identities and selectors read.
pub(crate) fn trim_pod(pod: &mut Pod) {
    trim(pod);
    pod.spec = pod.spec.as_ref().map(|s| k8s_openapi::api::core::v1::PodSpec {
        host_network: s.host_network,
        ..Default::default()
    });
    pod.status = pod
        .status
        .as_ref()
        .map(|s| k8s_openapi::api::core::v1::PodStatus {
            phase: s.phase.clone(),
            pod_ips: s.pod_ips.clone(),
            ..Default::default()
        });
}

/// Runs one reflector until the runtime stops; returns its store.
fn reflect<K>(
    api: Api<K>,
    dyntype: K::DynamicType,
    kind: usize,
    shared: Arc<Shared>,
    trim: fn(&mut K),
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    let writer = Writer::new(dyntype);
    let store = writer.as_reader();
    let backoff = backon::ExponentialBuilder::default()
        .with_min_delay(BACKOFF_MIN)
        .with_max_delay(BACKOFF_MAX)
        .with_jitter()
        .without_max_times();
    // Bookmarks are on by default: a reconnect resumes from a recent version, not a relist.
    let stream = watcher::watcher(api, watcher::Config::default())
        .modify(trim)
        .backoff(ExponentialBackoff::from(backoff));
    let stream = reflector::reflector(writer, stream);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            shared.observe(kind, Observed::of(&event));
        }
    });
    store
}

struct Stores {
    services: Store<Service>,
    endpoint_slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    egress_policies: Store<DynamicObject>,
}

impl Stores {
    fn snapshot(&self) -> ClusterObjects {
        ClusterObjects {
            services: self.services.state(),
            endpoint_slices: self.endpoint_slices.state(),
            nodes: self.nodes.state(),
            pods: self.pods.state(),
            namespaces: self.namespaces.state(),
            egress_policies: self.egress_policies.state(),
        }
    }
}

/// Starts following `cluster` with `client`; states go to `updates`. `egress_interface` is
/// `[egress] interface`, for policies naming none; `key_secret` the IPsec key Secret, when it
/// is in this cluster.
pub fn spawn<H: Host + Send + Sync + 'static>(
    cluster: Cluster,
    client: Client,
    egress_interface: Option<String>,
    key_secret: Option<SecretRef>,
    host: H,
    updates: mpsc::Sender<ClusterUpdate>,
) -> SharedStatus {
    let status = ClusterStatus::new(&cluster);
    let shared = Arc::new(Shared {
        kinds: Mutex::default(),
        status: status.clone(),
        wake: Notify::new(),
    });
    let mut key_secret = key_secret.map(|secret| {
        let shared = shared.clone();
        KeySecret::follow(client.clone(), secret, move || shared.wake.notify_one())
    });
    let egress_resource = crd::api_resource();
    let stores = Stores {
        services: reflect(Api::all(client.clone()), (), 0, shared.clone(), trim),
        endpoint_slices: reflect(Api::all(client.clone()), (), 1, shared.clone(), trim),
        nodes: reflect(Api::all(client.clone()), (), 2, shared.clone(), trim),
        pods: reflect(Api::all(client.clone()), (), 3, shared.clone(), trim_pod),
        namespaces: reflect(Api::all(client.clone()), (), 4, shared.clone(), trim),
        egress_policies: reflect(
            Api::all_with(client.clone(), &egress_resource),
            egress_resource.clone(),
            5,
            shared.clone(),
            trim,
        ),
    };
    let policies: Api<DynamicObject> = Api::all_with(client.clone(), &egress_resource);
    tokio::spawn(probe(client.clone(), shared.clone()));
    tokio::spawn(async move {
        let mut last: Option<Arc<ClusterState>> = None;
        let mut conditions = PolicyConditions::default();
        let mut addresses = IpamWrites::default();
        let mut converted = convert::ServiceCache::default();
        loop {
            shared.wake.notified().await;
            let first = tokio::time::Instant::now();
            // Debounce: a burst of events makes one state.
            while first.elapsed() < MAX_DELAY {
                if tokio::time::timeout(QUIET, shared.wake.notified()).await.is_err() {
                    break;
                }
            }
            if !shared.ready() {
                continue;
            }
            let objects = stores.snapshot();
            let mut state = convert::convert(
                &Context {
                    cluster: &cluster,
                    egress_interface: egress_interface.as_deref(),
                    host: &host,
                },
                &objects,
                &mut converted,
            );
            if let Some(secret) = &mut key_secret {
                state.desired.ipsec_keys = secret.keys();
            }
            let (allocations, ipam_problems) = ipam::allocate(&cluster, &objects.services);
            addresses.write(&client, &allocations).await;
            state.problems.extend(ipam_problems);
            state.problems.sort();
            if last.as_deref() == Some(&state) {
                continue;
            }
            let old_problems = last.as_ref().map(|s| s.problems.as_slice()).unwrap_or_default();
            for p in state.problems.iter().filter(|p| !old_problems.contains(p)) {
                warn!(
                    cluster = %cluster.name,
                    "{} {}{}: {}",
                    p.kind,
                    p.namespace.as_deref().map(|n| format!("{n}/")).unwrap_or_default(),
                    p.name,
                    p.message
                );
            }
            conditions.write(&policies, &state.egress_verdicts).await;
            debug!(cluster = %cluster.name, services = state.desired.services.len(), "cluster state changed");
            let state = Arc::new(state);
            last = Some(state.clone());
            shared.status.lock().expect("status").updates += 1;
            if updates
                .send(ClusterUpdate {
                    cluster_id: cluster.id,
                    state,
                })
                .await
                .is_err()
            {
                return;
            }
        }
    });
    status
}

/// While a watch fails, asks the API server for its version every second: an answer ends the
/// stale state (see [`Shared::reachable`]).
async fn probe(client: Client, shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if shared.failing() && client.apiserver_version().await.is_ok() {
            shared.reachable();
        }
    }
}

/// LB-IPAM's status writes: each allocation written once (the Service's watch event then
/// brings the address back as its ingress), given up (logged once) where RBAC does not allow.
#[derive(Default)]
struct IpamWrites {
    written: BTreeMap<ServiceName, IpAddr>,
    forbidden: bool,
}

impl IpamWrites {
    async fn write(&mut self, client: &Client, allocations: &BTreeMap<ServiceName, IpAddr>) {
        self.written.retain(|name, _| allocations.contains_key(name));
        if self.forbidden {
            return;
        }
        for ((namespace, name), ip) in allocations {
            let key = (namespace.clone(), name.clone());
            if self.written.get(&key) == Some(ip) {
                continue;
            }
            let api: Api<Service> = Api::namespaced(client.clone(), namespace);
            let patch = serde_json::json!({"status": {"loadBalancer": {"ingress": [{"ip": ip.to_string(), "ipMode": "VIP"}]}}});
            match api
                .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    info!(service = %format!("{namespace}/{name}"), %ip, "allocated a VIP from address_pools");
                    self.written.insert(key, *ip);
                }
                Err(kube::Error::Api(e)) if e.code == 403 => {
                    warn!("address_pools is set but RBAC does not allow writing services/status (config/rbac/gatewayd-ipam.yaml)");
                    self.forbidden = true;
                    return;
                }
                Err(e) => debug!(service = %format!("{namespace}/{name}"), "writing the VIP failed: {e}"),
            }
        }
    }
}

/// The `Valid` condition gatewayd writes on each EgressGatewayPolicy: written when the verdict
/// changes only, and given up (logged once) where RBAC does not allow it.
#[derive(Default)]
struct PolicyConditions {
    written: BTreeMap<String, Option<String>>,
    forbidden: bool,
}

impl PolicyConditions {
    async fn write(&mut self, api: &Api<DynamicObject>, verdicts: &BTreeMap<String, Option<String>>) {
        self.written.retain(|name, _| verdicts.contains_key(name));
        if self.forbidden {
            return;
        }
        for (name, verdict) in verdicts {
            if self.written.get(name) == Some(verdict) {
                continue;
            }
            let (status, reason, message) = match verdict {
                None => ("True", "Accepted", "programmed by gatewayd"),
                Some(why) => ("False", "Invalid", why.as_str()),
            };
            let patch = serde_json::json!({"status": {"conditions": [{
                "type": "Valid",
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string(),
            }]}});
            match api
                .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    self.written.insert(name.clone(), verdict.clone());
                }
                Err(kube::Error::Api(e)) if e.code == 403 => {
                    info!("not allowed to write EgressGatewayPolicy status (RBAC): verdicts are logged only");
                    self.forbidden = true;
                    return;
                }
                Err(e) => debug!(policy = %name, "writing the status failed: {e}"),
            }
        }
    }
}
