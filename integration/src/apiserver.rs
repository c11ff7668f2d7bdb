//! A test Kubernetes API server, faithful enough for kube-rs' own watchers and reflectors.
//!
//! No current kube-apiserver can be installed on the test machines (see docs/kubernetes.md), so
//! this copies the behaviour gatewayd relies on, as measured against kube 5:
//! - lists carry `metadata.resourceVersion`, and page with `limit` / `continue`;
//! - watches are NDJSON streams of `{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object"}`
//!   starting after the requested resourceVersion; they end after `timeoutSeconds`;
//! - a resourceVersion older than the (compactable) history gets an in-stream `ERROR` event
//!   whose Status has `code: 410` on an HTTP 200 response, as the real server sends;
//! - bookmarks (`allowWatchBookmarks`) carry apiVersion, kind and metadata.resourceVersion;
//! - every stored object gets a non-empty resourceVersion, a uid and a creationTimestamp;
//! - `PATCH` (merge patch) and `PUT` of the `status` subresource.
//!
//! Objects are plain JSON: the server knows a resource by its group and plural only, so any
//! kind in [`KINDS`] (and any new one added there) is served the same way. Field selectors on
//! `metadata.name` and `metadata.namespace` are served (gatewayd watches its IPsec key Secret
//! by name, see [`FieldSelector`]); label selectors are not: gatewayd watches whole collections.
//!
//! Like a real server with RBAC and authentication it can also refuse: [`ApiServer::require_token`]
//! (401 without the bearer token), [`ApiServer::unserve`] (404 for a resource of an API version
//! the server does not have, e.g. `discovery.k8s.io/v1` on Kubernetes 1.20),
//! [`ApiServer::forbid_status_writes`] (403 on a status subresource until granted); and it
//! counts the requests it answers ([`ApiServer::requests`]) for tests of retries.
//!
//! The server runs on its own runtime and thread: [`ApiServer::stop`] kills every connection at
//! once (like a crashed API server), [`ApiServer::start`] serves the same store again on a given
//! listener, e.g. the same port; [`ApiServer::compact`] forgets the event history so watchers
//! that come back with an old resourceVersion get 410 and must relist.

use anyhow::{anyhow, bail, Context, Result};
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// kind -> (plural, namespaced) for the kinds gatewayd watches.
pub const KINDS: &[(&str, &str, bool)] = &[
    ("Service", "services", true),
    ("EndpointSlice", "endpointslices", true),
    ("Pod", "pods", true),
    ("Namespace", "namespaces", false),
    ("Node", "nodes", false),
    ("EgressGatewayPolicy", "egressgatewaypolicies", false),
    ("Secret", "secrets", true),
];

/// How often an idle watch gets a bookmark.
const BOOKMARK_PERIOD: Duration = Duration::from_secs(1);

/// A resource collection: API group ("" for core) and plural.
type ResourceKey = (String, String);
/// (namespace or "", name)
type ObjectKey = (String, String);

#[derive(Clone)]
struct WatchEvent {
    resource_version: u64,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Collection {
    objects: BTreeMap<ObjectKey, Value>,
    history: Vec<WatchEvent>,
}

struct Store {
    resource_version: u64,
    /// Events at or below this resourceVersion are forgotten: watching from before it is 410.
    compacted: u64,
    collections: HashMap<ResourceKey, Collection>,
    uid: u64,
}

/// What the server refuses, like a real one's authentication and RBAC.
#[derive(Default)]
struct Refusals {
    /// Requests without `Authorization: Bearer <this>` get 401.
    token: Option<String>,
    /// (apiVersion, plural) the server does not serve: 404.
    unserved: HashSet<(String, String)>,
    /// Plurals whose status subresource may not be written: 403.
    forbidden_status: HashSet<String>,
}

struct Shared {
    store: Mutex<Store>,
    refusals: Mutex<Refusals>,
    /// Requests answered, by method and path.
    requests: Mutex<HashMap<(String, String), usize>>,
    /// The newest resourceVersion: wakes every watch.
    changed: watch::Sender<u64>,
    /// Bumped to end every open watch (a dropped connection, seen from the client).
    epoch: watch::Sender<u64>,
}

/// The API server: its objects survive [`ApiServer::stop`] / [`ApiServer::start`].
pub struct ApiServer {
    shared: Arc<Shared>,
    running: Option<(tokio::runtime::Runtime, SocketAddr)>,
}

fn resource_key(api_version: &str, plural: &str) -> ResourceKey {
    let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
    (group.to_owned(), plural.to_owned())
}

fn kind_info(kind: &str) -> Result<(&'static str, &'static str, bool)> {
    KINDS
        .iter()
        .find(|(k, _, _)| *k == kind)
        .copied()
        .ok_or_else(|| anyhow!("the test API server does not serve kind {kind}"))
}

impl Default for ApiServer {
    fn default() -> Self {
        Self::new()
    }
}

impl ApiServer {
    /// An empty store, not serving yet.
    pub fn new() -> Self {
        ApiServer {
            shared: Arc::new(Shared {
                store: Mutex::new(Store {
                    resource_version: 1,
                    compacted: 0,
                    collections: HashMap::new(),
                    uid: 0,
                }),
                refusals: Mutex::default(),
                requests: Mutex::default(),
                changed: watch::channel(1).0,
                epoch: watch::channel(0).0,
            }),
            running: None,
        }
    }

    /// The server as a tower service, for in-process clients (`kube::Client::new`).
    pub fn router(&self) -> axum::Router {
        axum::Router::new()
            .fallback(handle)
            .with_state(self.shared.clone())
    }

    /// Serves on `listener` (bound by the caller, e.g. inside a network namespace) from a
    /// runtime of its own.
    pub fn start(&mut self, listener: std::net::TcpListener) -> Result<SocketAddr> {
        self.stop();
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let router = self.router();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            let _ = axum::serve(listener, router).await;
        });
        self.running = Some((runtime, addr));
        Ok(addr)
    }

    /// Stops serving: the listener and every connection close at once.
    pub fn stop(&mut self) {
        if let Some((runtime, _)) = self.running.take() {
            runtime.shutdown_background();
        }
    }

    pub fn addr(&self) -> Option<SocketAddr> {
        self.running.as_ref().map(|(_, a)| *a)
    }

    /// A kubeconfig for this server: see [`kubeconfig_for`].
    pub fn kubeconfig(&self) -> Result<String> {
        let addr = self
            .addr()
            .ok_or_else(|| anyhow!("the API server is not running"))?;
        Ok(kubeconfig_for(addr))
    }

    /// Ends every open watch; clients reconnect (to a running server) from their last version.
    pub fn drop_connections(&self) {
        self.shared.epoch.send_modify(|e| *e += 1);
    }

    /// Forgets the event history: a watch from any older version now gets 410 Gone.
    pub fn compact(&self) {
        let mut store = self.shared.store.lock().expect("store");
        store.compacted = store.resource_version;
        for c in store.collections.values_mut() {
            c.history.clear();
        }
    }

    /// From now on every request but `/version` needs `Authorization: Bearer <token>` (`None`:
    /// none does), or gets 401 as from a real server's token authenticator.
    pub fn require_token(&self, token: Option<&str>) {
        self.shared.refusals.lock().expect("refusals").token = token.map(str::to_owned);
    }

    /// The server does not serve `plural` in `api_version`: every request for it gets 404, as
    /// from a server that lacks the API version.
    pub fn unserve(&self, api_version: &str, plural: &str) {
        let mut refusals = self.shared.refusals.lock().expect("refusals");
        refusals
            .unserved
            .insert((api_version.to_owned(), plural.to_owned()));
    }

    /// Writes of `plural`'s status subresource get 403 (`true`) as while RBAC does not grant
    /// them, or are allowed again (`false`), as after the grant.
    pub fn forbid_status_writes(&self, plural: &str, forbidden: bool) {
        let mut refusals = self.shared.refusals.lock().expect("refusals");
        if forbidden {
            refusals.forbidden_status.insert(plural.to_owned());
        } else {
            refusals.forbidden_status.remove(plural);
        }
    }

    /// How many `method` requests for `path` (without the query) the server answered, refused
    /// ones included.
    pub fn requests(&self, method: &str, path: &str) -> usize {
        let requests = self.shared.requests.lock().expect("requests");
        requests
            .get(&(method.to_owned(), path.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// Creates or replaces an object (`apiVersion`, `kind` and `metadata.name` required);
    /// returns its new resourceVersion.
    pub fn apply(&self, object: Value) -> Result<u64> {
        let kind = object["kind"].as_str().context("object without kind")?;
        let (kind, plural, namespaced) = kind_info(kind)?;
        let api_version = object["apiVersion"]
            .as_str()
            .context("object without apiVersion")?;
        let key = resource_key(api_version, plural);
        let name = object["metadata"]["name"]
            .as_str()
            .context("object without metadata.name")?;
        let namespace = object["metadata"]["namespace"].as_str().unwrap_or("");
        if namespaced == namespace.is_empty() {
            bail!("{kind} {name}: namespaced is {namespaced} but metadata.namespace is {namespace:?}");
        }
        let object_key = (namespace.to_owned(), name.to_owned());
        Ok(self.shared.write(key, object_key, |_| Some(object)))
    }

    /// Deletes an object; returns false if there was none.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: Option<&str>, name: &str) -> Result<bool> {
        let (kind, plural, _) = kind_info(kind)?;
        let key = resource_key(api_version, plural);
        let object_key = (namespace.unwrap_or("").to_owned(), name.to_owned());
        let existed = self.get(api_version, kind, namespace, name).is_some();
        self.shared.write(key, object_key, |_| None);
        Ok(existed)
    }

    /// The stored object, e.g. to read a status the client wrote.
    pub fn get(&self, api_version: &str, kind: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let (_, plural, _) = kind_info(kind).ok()?;
        let store = self.shared.store.lock().expect("store");
        store
            .collections
            .get(&resource_key(api_version, plural))?
            .objects
            .get(&(namespace.unwrap_or("").to_owned(), name.to_owned()))
            .cloned()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Shared {
    /// Replaces (`Some`) or deletes (`None`) one object, stamping metadata and recording the
    /// event; returns the new resourceVersion.
    fn write(
        &self,
        key: ResourceKey,
        object_key: ObjectKey,
        change: impl FnOnce(Option<&Value>) -> Option<Value>,
    ) -> u64 {
        let mut guard = self.store.lock().expect("store");
        let store = &mut *guard;
        store.resource_version += 1;
        let rv = store.resource_version;
        store.uid += 1;
        let uid = store.uid;
        let collection = store.collections.entry(key).or_default();
        let old = collection.objects.get(&object_key).cloned();
        let event = match change(old.as_ref()) {
            Some(mut object) => {
                let meta = &mut object["metadata"];
                meta["resourceVersion"] = json!(rv.to_string());
                let (uid, created) = match &old {
                    Some(o) => (
                        o["metadata"]["uid"].clone(),
                        o["metadata"]["creationTimestamp"].clone(),
                    ),
                    None => (
                        json!(format!("00000000-0000-4000-8000-{uid:012}")),
                        json!("2026-01-01T00:00:00Z"),
                    ),
                };
                meta["uid"] = uid;
                meta["creationTimestamp"] = created;
                collection.objects.insert(object_key, object.clone());
                WatchEvent {
                    resource_version: rv,
                    kind: if old.is_some() { "MODIFIED" } else { "ADDED" },
                    object,
                }
            }
            None => {
                let Some(mut object) = collection.objects.remove(&object_key) else {
                    return rv;
                };
                object["metadata"]["resourceVersion"] = json!(rv.to_string());
                WatchEvent {
                    resource_version: rv,
                    kind: "DELETED",
                    object,
                }
            }
        };
        collection.history.push(event);
        drop(guard);
        self.changed.send_replace(rv);
        rv
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Params {
    watch: Option<String>,
    resource_version: Option<String>,
    timeout_seconds: Option<u64>,
    allow_watch_bookmarks: Option<bool>,
    limit: Option<usize>,
    #[serde(rename = "continue")]
    continue_token: Option<String>,
    field_selector: Option<String>,
}

/// `metadata.name=x,metadata.namespace=y` (`=` or `==`): the fields every kind supports on a
/// real API server. Other fields are refused with 400, as the real server does for a field it
/// does not index.
#[derive(Default)]
struct FieldSelector(Vec<(&'static str, String)>);

impl FieldSelector {
    fn parse(selector: Option<&str>) -> Result<Self, String> {
        let mut terms = Vec::new();
        for term in selector.unwrap_or("").split(',').filter(|t| !t.is_empty()) {
            let (field, value) = term
                .split_once("==")
                .or_else(|| term.split_once('='))
                .ok_or_else(|| format!("invalid field selector term {term:?}"))?;
            let field = match field {
                "metadata.name" => "name",
                "metadata.namespace" => "namespace",
                other => return Err(format!("field label not supported: {other}")),
            };
            terms.push((field, value.to_owned()));
        }
        Ok(FieldSelector(terms))
    }

    fn matches(&self, object: &Value) -> bool {
        self.0
            .iter()
            .all(|(field, value)| object["metadata"][field].as_str().unwrap_or("") == value)
    }
}

/// What a request path names.
struct Target {
    api_version: String,
    key: ResourceKey,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn parse_path(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => (version.to_string(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, rest @ ..] => (Some(ns.to_string()), {
            let mut v = vec![*plural];
            v.extend_from_slice(rest);
            v
        }),
        other => (None, other.to_vec()),
    };
    let (plural, name, status) = match rest.as_slice() {
        [plural] => (*plural, None, false),
        [plural, name] => (*plural, Some(name.to_string()), false),
        [plural, name, "status"] => (*plural, Some(name.to_string()), true),
        _ => return None,
    };
    Some(Target {
        key: resource_key(&api_version, plural),
        api_version,
        namespace,
        name,
        status,
    })
}

impl Shared {
    /// The 404 or 403 a real server gives for what it lacks or RBAC does not grant.
    fn refuse(&self, method: &Method, target: &Target) -> Option<Response> {
        let refusals = self.refusals.lock().expect("refusals");
        let plural = &target.key.1;
        if refusals
            .unserved
            .contains(&(target.api_version.clone(), plural.clone()))
        {
            return Some(status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource".into(),
            ));
        }
        let writes = matches!(*method, Method::PATCH | Method::PUT);
        if writes && target.status && refusals.forbidden_status.contains(plural) {
            let name = target.name.as_deref().unwrap_or_default();
            let namespace = target
                .namespace
                .as_deref()
                .map(|n| format!(" in the namespace \"{n}\""))
                .unwrap_or_default();
            return Some(status(
                StatusCode::FORBIDDEN,
                "Forbidden",
                format!(
                    "{plural} \"{name}\" is forbidden: User \"system:serviceaccount:gatewayd:gatewayd\" cannot {} resource \"{plural}/status\" in API group \"{}\"{namespace}",
                    method.as_str().to_lowercase(),
                    target.key.0
                ),
            ));
        }
        None
    }
}

fn status(code: StatusCode, reason: &str, message: String) -> Response {
    (
        code,
        axum::Json(json!({
            "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code.as_u16(),
        })),
    )
        .into_response()
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(params): Query<Params>,
    body: Bytes,
) -> Response {
    *shared
        .requests
        .lock()
        .expect("requests")
        .entry((method.to_string(), uri.path().to_owned()))
        .or_default() += 1;
    // Anyone may read the version (system:public-info-viewer); the rest needs the token.
    let wanted = shared.refusals.lock().expect("refusals").token.clone();
    if let Some(token) = wanted.filter(|_| uri.path() != "/version") {
        let sent = headers.get("authorization").and_then(|v| v.to_str().ok());
        if sent != Some(format!("Bearer {token}").as_str()) {
            return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized".into());
        }
    }
    if uri.path() == "/version" {
        return axum::Json(json!({
            "major": "1", "minor": "35", "gitVersion": "v1.35.0-gatewayd-test",
            "gitCommit": "", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
            "goVersion": "go1.25", "compiler": "gc", "platform": "linux/amd64",
        }))
        .into_response();
    }
    let Some(target) = parse_path(uri.path()) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no route {}", uri.path()),
        );
    };
    if let Some(refused) = shared.refuse(&method, &target) {
        return refused;
    }
    match (method, &target.name) {
        (Method::GET, None)
            if params.watch.as_deref() == Some("true") || params.watch.as_deref() == Some("1") =>
        {
            watch_collection(shared, target, params)
        }
        (Method::GET, None) => list(&shared, &target, &params),
        (Method::GET, Some(name)) => get_object(&shared, &target, name),
        (Method::PATCH | Method::PUT, Some(name)) => {
            let Ok(update) = serde_json::from_slice::<Value>(&body) else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "body is not JSON".into());
            };
            update_object(&shared, &target, name, update)
        }
        (m, _) => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{m} not served"),
        ),
    }
}

/// PUT replaces the object (or, on `/status`, its status); PATCH merges (RFC 7386).
fn update_object(shared: &Shared, target: &Target, name: &str, update: Value) -> Response {
    let object_key = (target.namespace.clone().unwrap_or_default(), name.to_owned());
    let is_patch = update.get("apiVersion").is_none();
    shared.write(target.key.clone(), object_key, |old| {
        // Gone meanwhile: None deletes nothing, and the read below answers 404.
        let mut object = old?.clone();
        if target.status {
            if is_patch {
                merge_patch(
                    &mut object["status"],
                    update.get("status").unwrap_or(&Value::Null),
                );
            } else {
                object["status"] = update["status"].clone();
            }
        } else if is_patch {
            merge_patch(&mut object, &update);
        } else {
            object = update;
        }
        Some(object)
    });
    // The stored object carries the stamped version: read it back.
    get_object(shared, target, name)
}

/// One object as stored, or 404.
fn get_object(shared: &Shared, target: &Target, name: &str) -> Response {
    let store = shared.store.lock().expect("store");
    let key = (target.namespace.clone().unwrap_or_default(), name.to_owned());
    match store
        .collections
        .get(&target.key)
        .and_then(|c| c.objects.get(&key))
    {
        Some(o) => axum::Json(o.clone()).into_response(),
        None => status(StatusCode::NOT_FOUND, "NotFound", format!("{name} not found")),
    }
}

fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            let map = target.as_object_mut().expect("object");
            for (k, v) in fields {
                if v.is_null() {
                    map.remove(k);
                } else {
                    merge_patch(map.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn list_kind(target: &Target, store: &Store) -> String {
    store
        .collections
        .get(&target.key)
        .and_then(|c| c.objects.values().next())
        .and_then(|o| o["kind"].as_str())
        .map(|k| format!("{k}List"))
        .or_else(|| {
            KINDS
                .iter()
                .find(|(_, plural, _)| *plural == target.key.1)
                .map(|(k, _, _)| format!("{k}List"))
        })
        .unwrap_or_else(|| "List".into())
}

fn list(shared: &Shared, target: &Target, params: &Params) -> Response {
    let store = shared.store.lock().expect("store");
    let empty = Collection::default();
    let collection = store.collections.get(&target.key).unwrap_or(&empty);
    let in_scope = |ns: &str| target.namespace.as_deref().is_none_or(|wanted| wanted == ns);
    // A continue token is "<resourceVersion>/<offset>": later pages show the same snapshot only
    // as far as this store can (it keeps no old versions), which is enough for paging tests.
    let (list_rv, offset) = match params.continue_token.as_deref().and_then(|t| t.split_once('/')) {
        Some((rv, offset)) => (
            rv.parse().unwrap_or(store.resource_version),
            offset.parse().unwrap_or(0),
        ),
        None => (store.resource_version, 0),
    };
    let fields = match FieldSelector::parse(params.field_selector.as_deref()) {
        Ok(f) => f,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e),
    };
    let matching: Vec<&Value> = collection
        .objects
        .iter()
        .filter(|((ns, _), o)| in_scope(ns) && fields.matches(o))
        .map(|(_, o)| o)
        .collect();
    let limit = params.limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
    let page: Vec<Value> = matching
        .iter()
        .skip(offset)
        .take(limit)
        .map(|o| (*o).clone())
        .collect();
    let mut metadata = json!({ "resourceVersion": list_rv.to_string() });
    if offset + page.len() < matching.len() {
        metadata["continue"] = json!(format!("{list_rv}/{}", offset + page.len()));
        metadata["remainingItemCount"] = json!(matching.len() - offset - page.len());
    }
    axum::Json(json!({
        "apiVersion": target.api_version,
        "kind": list_kind(target, &store),
        "metadata": metadata,
        "items": page,
    }))
    .into_response()
}

fn watch_collection(shared: Arc<Shared>, target: Target, params: Params) -> Response {
    let from: u64 = match params.resource_version.as_deref() {
        // "" and "0" mean "from now" (the real server starts with synthetic ADDED events for
        // "0" when no version is given; kube always lists first, so this is not needed).
        None | Some("") | Some("0") => shared.store.lock().expect("store").resource_version,
        Some(v) => match v.parse() {
            Ok(v) => v,
            Err(_) => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    format!("resourceVersion {v:?}"),
                )
            }
        },
    };
    let fields = match FieldSelector::parse(params.field_selector.as_deref()) {
        Ok(f) => f,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e),
    };
    let timeout = Duration::from_secs(params.timeout_seconds.unwrap_or(1800));
    let bookmarks = params.allow_watch_bookmarks.unwrap_or(false);
    let (lines, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    tokio::spawn(stream_events(
        shared, target, fields, from, timeout, bookmarks, lines,
    ));
    let body = Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(body)
        .expect("response")
}

fn line(value: Value) -> Result<Bytes, std::io::Error> {
    let mut out = serde_json::to_vec(&value).expect("json");
    out.push(b'\n');
    Ok(Bytes::from(out))
}

async fn stream_events(
    shared: Arc<Shared>,
    target: Target,
    fields: FieldSelector,
    mut sent: u64,
    timeout: Duration,
    bookmarks: bool,
    lines: mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    let mut changed = shared.changed.subscribe();
    let mut epoch = shared.epoch.subscribe();
    epoch.mark_unchanged();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut bookmark = tokio::time::interval(BOOKMARK_PERIOD);
    loop {
        changed.mark_unchanged();
        let compacted = {
            let store = shared.store.lock().expect("store");
            (sent < store.compacted).then_some(store.compacted)
        };
        if let Some(compacted) = compacted {
            let message = format!("too old resource version: {sent} ({compacted})");
            let _ = lines
                .send(line(json!({
                        "type": "ERROR",
                        "object": {
                            "apiVersion": "v1", "kind": "Status", "metadata": {},
                            "status": "Failure", "message": message, "reason": "Expired", "code": 410,
                        },
                })))
                .await;
            return;
        }
        let (events, current, kind) = {
            let store = shared.store.lock().expect("store");
            let in_scope = |o: &Value| {
                fields.matches(o)
                    && target
                        .namespace
                        .as_deref()
                        .is_none_or(|ns| o["metadata"]["namespace"].as_str() == Some(ns))
            };
            let events: Vec<WatchEvent> = store
                .collections
                .get(&target.key)
                .map(|c| {
                    c.history
                        .iter()
                        .filter(|e| e.resource_version > sent && in_scope(&e.object))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            (events, store.resource_version, list_kind(&target, &store))
        };
        for e in events {
            if lines
                .send(line(json!({ "type": e.kind, "object": e.object })))
                .await
                .is_err()
            {
                return;
            }
        }
        sent = current;
        tokio::select! {
            _ = changed.changed() => {}
            _ = epoch.changed() => return,
            _ = tokio::time::sleep_until(deadline) => return,
            _ = bookmark.tick(), if bookmarks => {
                let bookmark = json!({
                    "type": "BOOKMARK",
                    "object": {
                        "apiVersion": target.api_version,
                        "kind": kind.trim_end_matches("List"),
                        "metadata": { "resourceVersion": sent.to_string() },
                    },
                });
                if lines.send(line(bookmark)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// A kubeconfig for a test API server at `addr` (plain http, no credentials), context `test`.
pub fn kubeconfig_for(addr: SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: test\nclusters:\n- name: test\n  cluster:\n    server: http://{addr}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\nusers:\n- name: test\n  user: {{}}\n"
    )
}
