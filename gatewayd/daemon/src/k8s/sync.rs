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
use kube::runtime::watcher;
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
/// A watch that worked this long starts its backoff afresh after the next failure.
const HEALTHY: Duration = Duration::from_secs(60);
/// A kind's WARN is repeated while it fails, first after this, then at doubling intervals.
const REMINDER_FIRST: Duration = Duration::from_secs(60);
const REMINDER_MAX: Duration = Duration::from_secs(3600);
/// Status writes the API refused (403: RBAC) are tried again after this, doubling.
const REFUSED_RETRY_MIN: Duration = Duration::from_secs(10);
const REFUSED_RETRY_MAX: Duration = Duration::from_secs(300);

/// The kinds followed, and what the gateway lacks while one is not served.
const KINDS: [(&str, &str); 6] = [
    ("Service", "no Services of this cluster are load balanced"),
    (
        "EndpointSlice",
        "Services have no backends (EndpointSlice discovery.k8s.io/v1 needs Kubernetes 1.21 or later)",
    ),
    ("Node", "no WireGuard or IPsec peers from this cluster's Nodes"),
    (
        "Pod",
        "no pod identities, and egress policy selectors match no pod",
    ),
    ("Namespace", "egress policy namespace selectors match nothing"),
    (
        crd::KIND,
        "no egress policies from this cluster (install config/crds/egressgatewaypolicy.yaml)",
    ),
];

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
    /// The error of a kind that fails now; `None` once every kind works again.
    pub last_error: Option<String>,
    /// States handed to the daemon.
    pub updates: u64,
    /// Each kind's own state, in [`KINDS`] order (filled as the reflectors start).
    pub kinds: Vec<KindStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindStatus {
    pub kind: &'static str,
    pub api_version: String,
    pub state: KindState,
    /// Why it is not served or fails, and what that means for the gateway.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KindState {
    /// Not listed completely yet.
    Listing,
    Synced,
    /// The API server does not serve it (404): taken as empty.
    NotServed,
    /// Its watch fails now.
    Failing,
}

impl KindState {
    pub fn as_str(self) -> &'static str {
        match self {
            KindState::Listing => "listing",
            KindState::Synced => "synced",
            KindState::NotServed => "not-served",
            KindState::Failing => "failing",
        }
    }
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
            kinds: Vec::new(),
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

struct KindHealth {
    api_version: String,
    /// Listed completely at least once.
    listed: bool,
    /// Between the start and the end of a relist: its store is about to be replaced.
    relisting: bool,
    problem: Option<KindProblem>,
    /// Failed attempts since the kind last worked.
    attempts: u32,
    /// The kind of problem last logged (not served, failing), until the kind works again.
    reported: Option<std::mem::Discriminant<KindProblem>>,
    /// When the WARN about the current problem is due again.
    reminder: Reminder,
}

#[derive(Clone, PartialEq)]
enum KindProblem {
    NotServed(String),
    Failing {
        error: String,
        /// The API server answered (403, 500, ...): its being reachable proves nothing.
        answered: bool,
    },
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
    Failed {
        error: String,
        answered: bool,
    },
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
            Err(e) => Observed::Failed {
                error: e.to_string(),
                answered: matches!(
                    e,
                    watcher::Error::InitialListFailed(kube::Error::Api(_))
                        | watcher::Error::WatchStartFailed(kube::Error::Api(_))
                        | watcher::Error::WatchFailed(kube::Error::Api(_))
                        | watcher::Error::WatchError(_)
                ),
            },
        }
    }
}

/// When to say again that something still fails: not at every retry (a 30 s outage made
/// hundreds of WARN lines), but after [`REMINDER_FIRST`], then at doubling intervals.
#[derive(Default)]
struct Reminder {
    due: Option<tokio::time::Instant>,
    interval: Duration,
}

impl Reminder {
    /// Whether to log now; the first call after [`Reminder::reset`] always does.
    fn due(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        if self.due.is_some_and(|due| now < due) {
            return false;
        }
        self.interval = match self.due {
            None => REMINDER_FIRST,
            Some(_) => (self.interval * 2).min(REMINDER_MAX),
        };
        self.due = Some(now + self.interval);
        true
    }

    fn reset(&mut self) {
        *self = Reminder::default();
    }
}

/// What the reflector tasks tell the converting loop.
struct Shared {
    kinds: Mutex<Vec<KindHealth>>,
    status: SharedStatus,
    wake: Notify,
}

impl Shared {
    /// Registers the next kind of [`KINDS`]; returns its index.
    fn add_kind(&self, api_version: String) -> usize {
        let mut kinds = self.kinds.lock().expect("kinds");
        kinds.push(KindHealth {
            api_version,
            listed: false,
            relisting: false,
            problem: None,
            attempts: 0,
            reported: None,
            reminder: Reminder::default(),
        });
        let mut status = self.status.lock().expect("status");
        Self::update_state(&kinds, &mut status);
        kinds.len() - 1
    }

    fn observe(&self, kind: usize, event: Observed) {
        let event_is_init = matches!(event, Observed::Init);
        let mut kinds = self.kinds.lock().expect("kinds");
        let mut status = self.status.lock().expect("status");
        let (name, without) = KINDS[kind];
        let k = &mut kinds[kind];
        let problem = match event {
            Observed::Init | Observed::InitDone | Observed::Change => {
                match event {
                    Observed::Init => k.relisting = true,
                    Observed::InitDone => {
                        k.relisting = false;
                        k.listed = true;
                    }
                    _ => {}
                }
                status.last_event = Some(Instant::now());
                // A relist starting proves nothing yet: only its end or an event does.
                if event_is_init {
                    k.problem.clone()
                } else {
                    None
                }
            }
            Observed::NotServed(message) => {
                k.listed = true;
                k.relisting = false;
                Some(KindProblem::NotServed(message))
            }
            Observed::Failed { error, answered } => {
                k.relisting = false;
                Some(KindProblem::Failing { error, answered })
            }
        };
        let cluster = &status.name;
        // A relist starting is neither an attempt that failed nor a recovery.
        let attempt = !event_is_init;
        match &problem {
            None if attempt => {
                if k.reported.take().is_some() {
                    info!(cluster = %cluster, kind = name, "works again after {} failed attempts", k.attempts);
                }
                k.attempts = 0;
            }
            Some(p) if attempt => {
                let kind = std::mem::discriminant(p);
                if k.reported != Some(kind) {
                    // A new problem: said now; the same one only at growing intervals (also
                    // across the probe's optimistic resets, see `reachable`).
                    k.reminder.reset();
                    k.reported = Some(kind);
                }
                k.attempts += 1;
                if k.reminder.due() {
                    let attempts = k.attempts;
                    match p {
                        KindProblem::NotServed(message) => warn!(
                            cluster = %cluster, kind = name,
                            "{name} {} is not served by this cluster ({message}), taken as empty: {without}; \
                             retrying with backoff up to {}s ({attempts} attempts so far)",
                            k.api_version, BACKOFF_MAX.as_secs()
                        ),
                        KindProblem::Failing { error, .. } => warn!(
                            cluster = %cluster, kind = name,
                            "watch failed: {error}; the last state stays programmed; retrying with \
                             backoff up to {}s ({attempts} attempts so far)",
                            BACKOFF_MAX.as_secs()
                        ),
                    }
                }
            }
            _ => {}
        }
        k.problem = problem;
        Self::update_state(&kinds, &mut status);
        drop((kinds, status));
        self.wake.notify_one();
    }

    /// The API answered: watches that failed to reach it are reconnecting now (a watch that
    /// resumes from its resourceVersion delivers nothing until the next change, so this is how
    /// a recovery is seen); any that still fails says so again. A kind the server itself
    /// refuses stays failing.
    fn reachable(&self) {
        let mut kinds = self.kinds.lock().expect("kinds");
        let unreachable =
            |k: &KindHealth| matches!(k.problem, Some(KindProblem::Failing { answered: false, .. }));
        if !kinds.iter().any(unreachable) {
            return;
        }
        for k in kinds.iter_mut().filter(|k| unreachable(k)) {
            k.problem = None;
        }
        let mut status = self.status.lock().expect("status");
        Self::update_state(&kinds, &mut status);
    }

    fn failing(&self) -> bool {
        let kinds = self.kinds.lock().expect("kinds");
        kinds
            .iter()
            .any(|k| matches!(k.problem, Some(KindProblem::Failing { .. })))
    }

    fn update_state(kinds: &[KindHealth], status: &mut ClusterStatus) {
        let listed = kinds.len() == KINDS.len() && kinds.iter().all(|k| k.listed);
        let failing = kinds
            .iter()
            .any(|k| matches!(k.problem, Some(KindProblem::Failing { .. })));
        status.state = match (status.state, listed, failing) {
            (_, true, false) => SyncState::Synced,
            (SyncState::Connecting, _, _) => SyncState::Connecting,
            _ => SyncState::Stale,
        };
        status.kinds = kinds
            .iter()
            .zip(KINDS)
            .map(|(k, (kind, without))| {
                let (state, error) = match &k.problem {
                    Some(KindProblem::NotServed(message)) => (
                        KindState::NotServed,
                        Some(format!("not served ({message}): {without}")),
                    ),
                    Some(KindProblem::Failing { error, .. }) => (KindState::Failing, Some(error.clone())),
                    None if k.listed => (KindState::Synced, None),
                    None => (KindState::Listing, None),
                };
                KindStatus {
                    kind,
                    api_version: k.api_version.clone(),
                    state,
                    error,
                }
            })
            .collect();
        // Only what fails now: an error of the past says nothing about the present.
        let current = status.kinds.iter().rev().find(|k| k.state == KindState::Failing);
        status.last_error =
            current.map(|k| format!("{}: {}", k.kind, k.error.as_deref().unwrap_or_default()));
    }

    /// Whether the stores make a state worth converting: every kind listed once, none in the
    /// middle of a relist (its store is about to change wholesale).
    fn ready(&self) -> bool {
        let kinds = self.kinds.lock().expect("kinds");
        kinds.len() == KINDS.len() && kinds.iter().all(|k| k.listed && !k.relisting)
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

/// The delays between a watch's attempts: doubling from [`BACKOFF_MIN`] to [`BACKOFF_MAX`],
/// with jitter. kube's stream backoff resets on every event, and every relist starts with one
/// (`Init`): a kind whose list always fails (a resource the server does not serve) was listed
/// again every ~0.4 s forever. This one starts afresh only once a sync has lasted [`HEALTHY`].
pub(super) struct WatchBackoff {
    delays: backon::ExponentialBackoff,
    synced_at: Option<tokio::time::Instant>,
}

impl WatchBackoff {
    pub(super) fn new() -> Self {
        WatchBackoff {
            delays: Self::fresh(),
            synced_at: None,
        }
    }

    fn fresh() -> backon::ExponentialBackoff {
        use backon::BackoffBuilder;
        backon::ExponentialBuilder::default()
            .with_min_delay(BACKOFF_MIN)
            .with_max_delay(BACKOFF_MAX)
            .with_jitter()
            .without_max_times()
            .build()
    }

    pub(super) fn synced(&mut self) {
        self.synced_at = Some(tokio::time::Instant::now());
    }

    /// The wait after a failure.
    pub(super) fn next_delay(&mut self) -> Duration {
        if self.synced_at.take().is_some_and(|t| t.elapsed() >= HEALTHY) {
            self.delays = Self::fresh();
        }
        // Jitter adds up to the delay again: the maximum stays the maximum.
        self.delays.next().unwrap_or(BACKOFF_MAX).min(BACKOFF_MAX)
    }
}

/// Runs one reflector until the runtime stops; returns its store.
fn reflect<K>(api: Api<K>, dyntype: K::DynamicType, shared: Arc<Shared>, trim: fn(&mut K)) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    let kind = shared.add_kind(K::api_version(&dyntype).into_owned());
    let writer = Writer::new(dyntype);
    let store = writer.as_reader();
    // Bookmarks are on by default: a reconnect resumes from a recent version, not a relist.
    let stream = watcher::watcher(api, watcher::Config::default()).modify(trim);
    let stream = reflector::reflector(writer, stream);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut backoff = WatchBackoff::new();
        while let Some(event) = stream.next().await {
            if matches!(event, Ok(watcher::Event::InitDone)) {
                backoff.synced();
            }
            let failed = event.is_err();
            shared.observe(kind, Observed::of(&event));
            // The watcher retries when polled again: waiting here is the backoff.
            if failed {
                tokio::time::sleep(backoff.next_delay()).await;
            }
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
    // In the order of KINDS.
    let stores = Stores {
        services: reflect(Api::all(client.clone()), (), shared.clone(), trim),
        endpoint_slices: reflect(Api::all(client.clone()), (), shared.clone(), trim),
        nodes: reflect(Api::all(client.clone()), (), shared.clone(), trim),
        pods: reflect(Api::all(client.clone()), (), shared.clone(), trim_pod),
        namespaces: reflect(Api::all(client.clone()), (), shared.clone(), trim),
        egress_policies: reflect(
            Api::all_with(client.clone(), &egress_resource),
            egress_resource.clone(),
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
            // A refused status write is tried again when its backoff ends, event or not.
            let retry = [addresses.refusals.retry_at(), conditions.refusals.retry_at()]
                .into_iter()
                .flatten()
                .min();
            tokio::select! {
                _ = shared.wake.notified() => {}
                _ = tokio::time::sleep_until(retry.unwrap_or_else(tokio::time::Instant::now)), if retry.is_some() => {}
            }
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
            // Writes only what differs from the objects (and what was refused before).
            conditions
                .write(&policies, &state.egress_verdicts, &objects.egress_policies)
                .await;
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

/// Status writes the API refused with 403 (RBAC without the grant): tried again after a
/// doubling delay, so granting the permission later takes effect without a restart. Logged
/// once per refusal streak, and once when writes are allowed again.
#[derive(Default)]
struct Refusals {
    /// When writes may be tried again, while refused.
    until: Option<tokio::time::Instant>,
    delay: Duration,
}

impl Refusals {
    fn blocked(&self) -> bool {
        self.retry_at().is_some()
    }

    /// When to try again, while that is still ahead.
    fn retry_at(&self) -> Option<tokio::time::Instant> {
        self.until.filter(|t| tokio::time::Instant::now() < *t)
    }

    /// A 403: returns whether this starts a streak (log it then).
    fn refused(&mut self) -> bool {
        let first = self.until.is_none();
        self.delay = if first {
            REFUSED_RETRY_MIN
        } else {
            (self.delay * 2).min(REFUSED_RETRY_MAX)
        };
        self.until = Some(tokio::time::Instant::now() + self.delay);
        first
    }

    /// A write went through: returns whether it ends a streak.
    fn allowed(&mut self) -> bool {
        std::mem::take(self).until.is_some()
    }
}

/// LB-IPAM's status writes: each allocation written once (the Service's watch event then
/// brings the address back as its ingress); where RBAC does not allow them, tried again later.
#[derive(Default)]
struct IpamWrites {
    written: BTreeMap<ServiceName, IpAddr>,
    refusals: Refusals,
}

impl IpamWrites {
    async fn write(&mut self, client: &Client, allocations: &BTreeMap<ServiceName, IpAddr>) {
        self.written.retain(|name, _| allocations.contains_key(name));
        if self.refusals.blocked() {
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
                    if self.refusals.allowed() {
                        info!("writing services/status is allowed now: LB-IPAM addresses are written");
                    }
                    info!(service = %format!("{namespace}/{name}"), %ip, "allocated a VIP from address_pools");
                    self.written.insert(key, *ip);
                }
                Err(kube::Error::Api(e)) if e.code == 403 => {
                    if self.refusals.refused() {
                        warn!("address_pools is set but RBAC does not allow writing services/status (config/rbac/gatewayd-ipam.yaml): {}; trying again with backoff up to {}s", e.message, REFUSED_RETRY_MAX.as_secs());
                    }
                    return;
                }
                Err(e) => debug!(service = %format!("{namespace}/{name}"), "writing the VIP failed: {e}"),
            }
        }
    }
}

/// The `Valid` condition gatewayd writes on each EgressGatewayPolicy: written when the verdict
/// differs from the object's own condition only (so a restart rewrites nothing), its
/// `lastTransitionTime` changed only with its status; where RBAC does not allow the write,
/// tried again later.
#[derive(Default)]
struct PolicyConditions {
    written: BTreeMap<String, Option<String>>,
    refusals: Refusals,
}

/// The condition for a verdict: `None` valid, or why not.
fn valid_condition(verdict: &Option<String>) -> (&'static str, &'static str, &str) {
    match verdict {
        None => ("True", "Accepted", "programmed by gatewayd"),
        Some(why) => ("False", "Invalid", why.as_str()),
    }
}

impl PolicyConditions {
    async fn write(
        &mut self,
        api: &Api<DynamicObject>,
        verdicts: &BTreeMap<String, Option<String>>,
        objects: &[Arc<DynamicObject>],
    ) {
        self.written.retain(|name, _| verdicts.contains_key(name));
        if self.refusals.blocked() {
            return;
        }
        for (name, verdict) in verdicts {
            if self.written.get(name) == Some(verdict) {
                continue;
            }
            let (status, reason, message) = valid_condition(verdict);
            let current = objects
                .iter()
                .find(|o| o.metadata.name.as_deref() == Some(name.as_str()))
                .and_then(|o| {
                    o.data["status"]["conditions"]
                        .as_array()?
                        .iter()
                        .find(|c| c["type"] == "Valid")
                        .cloned()
                });
            let current_field = |field: &str| {
                current
                    .as_ref()
                    .and_then(|c| c[field].as_str().map(str::to_owned))
            };
            if current_field("status").as_deref() == Some(status)
                && current_field("reason").as_deref() == Some(reason)
                && current_field("message").as_deref() == Some(message)
            {
                self.written.insert(name.clone(), verdict.clone());
                continue;
            }
            // Kubernetes' convention: the time the status last changed, not the message.
            let last_transition = match current_field("lastTransitionTime") {
                Some(time) if current_field("status").as_deref() == Some(status) => time,
                _ => k8s_openapi::jiff::Timestamp::now().to_string(),
            };
            let patch = serde_json::json!({"status": {"conditions": [{
                "type": "Valid",
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": last_transition,
            }]}});
            match api
                .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    if self.refusals.allowed() {
                        info!("writing EgressGatewayPolicy status is allowed now: verdicts are written");
                    }
                    self.written.insert(name.clone(), verdict.clone());
                }
                Err(kube::Error::Api(e)) if e.code == 403 => {
                    if self.refusals.refused() {
                        info!("not allowed to write EgressGatewayPolicy status (RBAC): verdicts are logged only; trying again with backoff up to {}s", REFUSED_RETRY_MAX.as_secs());
                    }
                    return;
                }
                Err(e) => debug!(policy = %name, "writing the status failed: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 30 s outage logged hundreds of WARN lines, one per retry (issue #15): a problem is
    /// said at once, then after a minute, then at doubling intervals.
    #[tokio::test(start_paused = true)]
    async fn a_lasting_problem_is_logged_at_growing_intervals() {
        let mut reminder = Reminder::default();
        let mut logged = Vec::new();
        let start = tokio::time::Instant::now();
        // A retry every second for an hour.
        for _ in 0..3600 {
            if reminder.due() {
                logged.push(start.elapsed().as_secs());
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert_eq!(logged, [0, 60, 180, 420, 900, 1860]);
        reminder.reset();
        assert!(reminder.due(), "a new problem is said at once");
    }
}
