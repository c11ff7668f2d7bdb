//! The Kubernetes sync of one cluster against the test API server on loopback (no root): the
//! kube client from a kubeconfig, reflectors, debouncing, staleness when the server dies, and a
//! clean relist after it comes back with a compacted history (410 Gone).

use gatewayd::config::{Cluster, ClusterAccess, Host, SecretRef, DEFAULT_LOAD_BALANCER_CLASS};
use gatewayd::encryption::ipsec::{plan_keys, InstalledKey};
use gatewayd::k8s::convert::ClusterState;
use gatewayd::k8s::sync::{self, ClusterUpdate, KindState, SharedStatus, SyncState};
use gatewayd::model::parse_key_file;
use gatewayd_integration::apiserver::ApiServer;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Generous: reflectors back off up to 10 s between reconnects.
const WAIT: Duration = Duration::from_secs(60);

struct AnyInterface;
impl Host for AnyInterface {
    fn interface_exists(&self, _: &str) -> bool {
        true
    }
}

fn service(name: &str, vip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {
            "type": "LoadBalancer", "loadBalancerClass": DEFAULT_LOAD_BALANCER_CLASS,
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 80}],
        },
        "status": {"loadBalancer": {"ingress": [{"ip": vip}]}},
    })
}

fn slice(name: &str, service: &str, ready: &[&str]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": name, "namespace": "shop", "labels": {"kubernetes.io/service-name": service}},
        "endpoints": ready.iter().map(|a| json!({"addresses": [a], "conditions": {"ready": true}})).collect::<Vec<_>>(),
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
    })
}

fn loopback() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("bind loopback")
}

/// The backends of every service, as "vip:port -> [addresses]".
fn backends(state: &ClusterState) -> Vec<(String, Vec<String>)> {
    state
        .desired
        .services
        .iter()
        .map(|(k, s)| {
            (
                k.to_string(),
                s.backends.iter().map(|b| b.address.to_string()).collect(),
            )
        })
        .collect()
}

async fn next_update(updates: &mut mpsc::Receiver<ClusterUpdate>) -> Arc<ClusterState> {
    tokio::time::timeout(WAIT, updates.recv())
        .await
        .expect("a cluster update in time")
        .expect("sync running")
        .state
}

async fn wait_state(status: &SharedStatus, wanted: SyncState) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while status.lock().unwrap().state != wanted {
        assert!(
            tokio::time::Instant::now() < deadline,
            "cluster never became {wanted:?}: {:?}",
            status.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn follows_a_cluster_through_outage_and_compaction() {
    let mut server = ApiServer::new();
    let addr = server.start(loopback()).unwrap();
    let dir = std::env::temp_dir().join(format!("gd-k8s-sync-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig().unwrap()).unwrap();

    server.apply(service("web", "10.100.0.1")).unwrap();
    server
        .apply(slice("web-1", "web", &["10.244.0.1", "10.244.0.2"]))
        .unwrap();
    // Enough slices to make the initial list page (kube asks for 500 per page).
    for i in 0..600 {
        server
            .apply(slice(&format!("filler-{i}"), "not-served", &["10.244.9.9"]))
            .unwrap();
    }

    let cluster = Cluster {
        address_pools: vec!["10.100.5.0/30".parse().unwrap()],
        ..Cluster::new(
            3,
            "test",
            ClusterAccess::Kubeconfig {
                path: kubeconfig,
                context: None,
            },
        )
    };
    let client = sync::client(&cluster).await.unwrap();
    let (tx, mut updates) = mpsc::channel(16);
    let status = sync::spawn(cluster, client, Some("eth0".into()), None, AnyInterface, tx);

    let state = next_update(&mut updates).await;
    assert_eq!(
        backends(&state),
        [(
            "10.100.0.1:80/tcp".to_string(),
            vec!["10.244.0.1".to_string(), "10.244.0.2".into()]
        )]
    );
    wait_state(&status, SyncState::Synced).await;

    // A burst of changes is debounced into few states; the last one has all of it.
    server.apply(slice("web-1", "web", &["10.244.0.1"])).unwrap();
    server.apply(service("api", "10.100.0.2")).unwrap();
    server.apply(slice("api-1", "api", &["10.244.0.3"])).unwrap();
    let mut state = next_update(&mut updates).await;
    while state.desired.services.len() < 2 {
        state = next_update(&mut updates).await;
    }
    assert_eq!(
        backends(&state),
        [
            ("10.100.0.1:80/tcp".to_string(), vec!["10.244.0.1".to_string()]),
            ("10.100.0.2:80/tcp".to_string(), vec!["10.244.0.3".to_string()]),
        ]
    );

    // Connections dropped with the server up: the watches resume, nothing is resent.
    server.drop_connections();
    server
        .apply(slice("web-1", "web", &["10.244.0.1", "10.244.0.4"]))
        .unwrap();
    let state = next_update(&mut updates).await;
    assert_eq!(backends(&state)[0].1, ["10.244.0.1", "10.244.0.4"]);

    // LB-IPAM: a served Service without an address gets the pool's first free one, written to
    // its status (where the next watch event brings it back as the VIP).
    let mut auto = service("auto", "");
    auto["status"] = json!({"loadBalancer": {}});
    server.apply(auto).unwrap();
    server.apply(slice("auto-1", "auto", &["10.244.0.5"])).unwrap();
    let mut state = next_update(&mut updates).await;
    while state.desired.services.len() < 3 {
        state = next_update(&mut updates).await;
    }
    assert_eq!(
        backends(&state)[2],
        ("10.100.5.1:80/tcp".to_string(), vec!["10.244.0.5".to_string()])
    );
    let written = server.get("v1", "Service", Some("shop"), "auto").unwrap();
    assert_eq!(
        written["status"]["loadBalancer"]["ingress"][0]["ip"],
        "10.100.5.1"
    );

    // A restart with nothing changed: the watches resume from their versions and deliver
    // nothing, yet the cluster is seen synced again (the API answers), and no state is sent.
    server.stop();
    wait_state(&status, SyncState::Stale).await;
    server
        .start(TcpListener::bind(addr).expect("the same port again"))
        .unwrap();
    wait_state(&status, SyncState::Synced).await;
    assert!(updates.try_recv().is_err(), "nothing changed, no state");

    // The server dies: the cluster goes stale and no state is sent (the last stays in force).
    server.stop();
    wait_state(&status, SyncState::Stale).await;
    assert!(updates.try_recv().is_err(), "no state while the server is down");
    assert!(status.lock().unwrap().last_error.is_some());

    // Meanwhile "api" and "auto" go away and the history is compacted: watchers resuming from
    // their version get 410, relist, and the state loses both though no Delete event was seen.
    server.delete("v1", "Service", Some("shop"), "api").unwrap();
    server
        .delete("discovery.k8s.io/v1", "EndpointSlice", Some("shop"), "api-1")
        .unwrap();
    server.delete("v1", "Service", Some("shop"), "auto").unwrap();
    server.compact();
    let listener = TcpListener::bind(addr).expect("the same port again");
    server.start(listener).unwrap();
    // The kinds relist one by one (each on its own backoff): intermediate states may show one
    // kind fresh and another not yet; they converge.
    let mut state = next_update(&mut updates).await;
    while state.desired.services.len() > 1 {
        state = next_update(&mut updates).await;
    }
    assert_eq!(
        backends(&state),
        [(
            "10.100.0.1:80/tcp".to_string(),
            vec!["10.244.0.1".to_string(), "10.244.0.4".into()]
        )]
    );
    wait_state(&status, SyncState::Synced).await;
    assert_eq!(
        status.lock().unwrap().last_error,
        None,
        "the outage's error is gone with it"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn key_secret(keys: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "gatewayd-ipsec", "namespace": "gatewayd"},
        "data": {"keys": k8s_openapi::ByteString(keys.as_bytes().to_vec())},
    })
}

const PSK1: &str = "00112233445566778899aabbccddeeff";
const PSK2: &str = "ffeeddccbbaa99887766554433221100";

/// The next state whose IPsec keys differ from `keys`; its other changes come along.
async fn next_keys(updates: &mut mpsc::Receiver<ClusterUpdate>, keys: Option<&str>) -> Arc<ClusterState> {
    loop {
        let state = next_update(updates).await;
        let wanted = keys.map(|text| parse_key_file(text).unwrap());
        if state.desired.ipsec_keys.as_ref().map(|k| &k.keys) != wanted.as_ref() {
            return state;
        }
    }
}

#[tokio::test]
async fn ipsec_keys_follow_their_secret_and_rotate() {
    let mut server = ApiServer::new();
    server.start(loopback()).unwrap();
    let dir = std::env::temp_dir().join(format!("gd-k8s-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig().unwrap()).unwrap();
    let first = format!("1 {PSK1}\n");
    server.apply(key_secret(&first)).unwrap();
    // Another Secret in the namespace: the field selector keeps it out.
    let mut other = key_secret(&format!("9 {PSK2}\n"));
    other["metadata"]["name"] = json!("not-the-keys");
    server.apply(other).unwrap();

    let cluster = Cluster::new(
        4,
        "keys",
        ClusterAccess::Kubeconfig {
            path: kubeconfig,
            context: None,
        },
    );
    let secret = SecretRef {
        cluster: "keys".into(),
        namespace: "gatewayd".into(),
        name: "gatewayd-ipsec".into(),
    };
    let client = sync::client(&cluster).await.unwrap();
    let (tx, mut updates) = mpsc::channel(16);
    sync::spawn(cluster, client, None, Some(secret), AnyInterface, tx);

    // What the encryption planner does with the keys of each state (encryption::ipsec).
    let plan = |state: &ClusterState, installed: &BTreeMap<u8, InstalledKey>| {
        let keys = state.desired.ipsec_keys.as_ref().expect("keys from the Secret");
        assert_eq!(keys.origin, "secret keys/gatewayd/gatewayd-ipsec");
        plan_keys(installed, &keys.keys, 1000, 60).unwrap()
    };
    let state = next_keys(&mut updates, None).await;
    let one = plan(&state, &BTreeMap::new());
    assert_eq!((one.current, one.install.clone()), (1, vec![1]));

    // The Secret rotates: key 2 is current, key 1 stays for the overlap.
    let second = format!("{first}2 {PSK2}\n");
    server.apply(key_secret(&second)).unwrap();
    let state = next_keys(&mut updates, Some(&first)).await;
    let two = plan(&state, &one.keys);
    assert_eq!((two.current, two.install.clone()), (2, vec![2]));
    assert_eq!(two.keys[&1].retire_at, Some(1060));

    // A bad edit, then the Secret's deletion: no keys in the state (the encryption keeps the
    // keys in force), and the rest of the cluster's state still flows.
    server.apply(key_secret("2 0011\n")).unwrap();
    server.apply(service("web", "10.100.0.1")).unwrap();
    let state = next_keys(&mut updates, Some(&second)).await;
    assert!(state.desired.ipsec_keys.is_none());
    let mut state = state;
    while state.desired.services.is_empty() {
        state = next_update(&mut updates).await;
    }
    assert!(state.desired.ipsec_keys.is_none());
    server
        .delete("v1", "Secret", Some("gatewayd"), "gatewayd-ipsec")
        .unwrap();
    server.apply(key_secret(&second)).unwrap();
    let state = next_keys(&mut updates, None).await;
    assert_eq!(plan(&state, &two.keys).current, 2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `echo "$TOKEN" > file` leaves a newline (issue #15): the token is sent trimmed, as client-go
/// sends it, and the file is made 0600 like every secret.
#[tokio::test]
async fn a_token_file_ending_in_a_newline_authenticates() {
    use k8s_openapi::api::core::v1::Service;
    use std::os::unix::fs::PermissionsExt;
    let mut server = ApiServer::new();
    let addr = server.start(loopback()).unwrap();
    server.require_token(Some("gatewayd-test-token"));
    server.apply(service("web", "10.100.0.1")).unwrap();
    let dir = std::env::temp_dir().join(format!("gd-k8s-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let list_with = |token: &str| {
        let token_file = dir.join("token");
        std::fs::write(&token_file, token).unwrap();
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let cluster = Cluster::new(
            5,
            "token",
            ClusterAccess::Token {
                server: format!("http://{addr}"),
                token_file,
                ca_file: None,
            },
        );
        async move {
            let client = sync::client(&cluster).await?;
            let services: kube::Api<Service> = kube::Api::all(client);
            anyhow::Ok(services.list(&Default::default()).await?.items.len())
        }
    };
    let listed = list_with("gatewayd-test-token\n").await;
    assert_eq!(listed.unwrap(), 1, "listed with the trimmed token");
    assert_eq!(
        std::fs::metadata(dir.join("token")).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let refused = list_with("another-token\n").await.unwrap_err().to_string();
    assert!(
        refused.contains("Unauthorized"),
        "the server does check: {refused}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A client of `server` in process, no sockets: with tokio's clock paused, backoffs of minutes
/// pass in an instant, and what happens in them is counted, not timed.
fn in_process(server: &ApiServer) -> kube::Client {
    kube::Client::new(server.router(), "default")
}

fn cluster_named(id: u32, name: &str) -> Cluster {
    Cluster::new(
        id,
        name,
        ClusterAccess::Kubeconfig {
            path: "/dev/null".into(),
            context: None,
        },
    )
}

/// EndpointSlice v1 on a Kubernetes 1.20 server (issue #15): it was listed again every ~0.4 s
/// forever (kube's backoff resets on each relist's first event), and the status said `synced`
/// with no word of it. Now the backoff grows to its maximum and the kind's state says what
/// is missing and what that means.
#[tokio::test(start_paused = true)]
async fn an_unserved_kind_is_retried_with_a_growing_backoff_and_shown() {
    let server = ApiServer::new();
    server.unserve("discovery.k8s.io/v1", "endpointslices");
    server.apply(service("web", "10.100.0.1")).unwrap();
    let (tx, mut updates) = mpsc::channel(16);
    let status = sync::spawn(
        cluster_named(6, "old"),
        in_process(&server),
        None,
        None,
        AnyInterface,
        tx,
    );
    let state = next_update(&mut updates).await;
    assert_eq!(backends(&state), [("10.100.0.1:80/tcp".to_string(), vec![])]);

    tokio::time::sleep(Duration::from_secs(60)).await;
    let lists = server.requests("GET", "/apis/discovery.k8s.io/v1/endpointslices");
    // Delays of 0.25, 0.5, 1, 2, 4, 8, then 10 s (plus jitter): at most 12 in a minute.
    println!("EndpointSlice lists in 60 s: {lists}");
    assert!(
        lists <= 12,
        "{lists} lists in a minute: the backoff does not grow"
    );
    let status = status.lock().unwrap().clone();
    assert_eq!(status.state, SyncState::Synced, "{status:?}");
    assert_eq!(
        status.last_error, None,
        "a kind not served is no failure: {status:?}"
    );
    let slices = status.kinds.iter().find(|k| k.kind == "EndpointSlice").unwrap();
    assert_eq!(
        (slices.api_version.as_str(), slices.state),
        ("discovery.k8s.io/v1", KindState::NotServed)
    );
    let error = slices.error.as_deref().unwrap();
    assert!(error.contains("Services have no backends"), "{error}");
    let synced = status
        .kinds
        .iter()
        .filter(|k| k.state == KindState::Synced)
        .count();
    assert_eq!(synced, 5, "{status:?}");
}

/// A 403 on writing a Service's status (RBAC without the LB-IPAM grant) stopped the writes
/// until a restart (issue #15): now they are tried again with backoff, and the grant takes
/// effect by itself.
#[tokio::test(start_paused = true)]
async fn lb_ipam_writes_resume_once_rbac_allows_them() {
    let server = ApiServer::new();
    server.forbid_status_writes("services", true);
    let mut auto = service("auto", "");
    auto["status"] = json!({"loadBalancer": {}});
    server.apply(auto).unwrap();
    server.apply(slice("auto-1", "auto", &["10.244.0.5"])).unwrap();
    let cluster = Cluster {
        address_pools: vec!["10.100.5.0/30".parse().unwrap()],
        ..cluster_named(7, "ipam")
    };
    let (tx, mut updates) = mpsc::channel(16);
    sync::spawn(cluster, in_process(&server), None, None, AnyInterface, tx);
    let state = next_update(&mut updates).await;
    assert!(state.desired.services.is_empty(), "no VIP yet");
    let status_path = "/api/v1/namespaces/shop/services/auto/status";
    let ingress = |server: &ApiServer| {
        server.get("v1", "Service", Some("shop"), "auto").unwrap()["status"]["loadBalancer"]["ingress"][0]
            ["ip"]
            .clone()
    };
    tokio::time::sleep(Duration::from_secs(30)).await;
    let refused = server.requests("PATCH", status_path);
    assert!(refused >= 2, "tried again while refused: {refused}");
    assert_eq!(ingress(&server), Value::Null);

    server.forbid_status_writes("services", false);
    // Within the retry's maximum delay (5 min).
    tokio::time::sleep(Duration::from_secs(301)).await;
    assert_eq!(ingress(&server), "10.100.5.1");
    println!(
        "status writes: {refused} refused in 30 s, {} in all",
        server.requests("PATCH", status_path)
    );
    let mut state = next_update(&mut updates).await;
    while state.desired.services.is_empty() {
        state = next_update(&mut updates).await;
    }
    assert_eq!(
        backends(&state),
        [("10.100.5.1:80/tcp".to_string(), vec!["10.244.0.5".to_string()])]
    );
}

fn policy(name: &str, spec: Value, condition: Option<(&str, &str, &str)>) -> Value {
    let mut object = json!({
        "apiVersion": "gatewayd.io/v1alpha1", "kind": "EgressGatewayPolicy",
        "metadata": {"name": name},
        "spec": spec,
    });
    if let Some((status, reason, message)) = condition {
        object["status"] = json!({"conditions": [{
            "type": "Valid", "status": status, "reason": reason, "message": message,
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        }]});
    }
    object
}

/// A restarted gateway patched every policy's condition with a new lastTransitionTime though
/// nothing had changed (issue #15). Now an unchanged condition is not written, and a changed
/// message keeps the time: it changes with the status only.
#[tokio::test(start_paused = true)]
async fn policy_conditions_keep_their_transition_time() {
    let server = ApiServer::new();
    let valid = json!({"sourceCIDRs": ["10.244.0.0/16"], "destinationCIDRs": ["203.0.113.0/24"]});
    let invalid = json!({"sourceCIDRs": ["10.244.0.0/16"]});
    server
        .apply(policy(
            "unchanged",
            valid.clone(),
            Some(("True", "Accepted", "programmed by gatewayd")),
        ))
        .unwrap();
    server
        .apply(policy(
            "reworded",
            invalid,
            Some(("False", "Invalid", "an older message")),
        ))
        .unwrap();
    server
        .apply(policy(
            "fixed",
            valid.clone(),
            Some(("False", "Invalid", "an older message")),
        ))
        .unwrap();
    server.apply(policy("new", valid, None)).unwrap();
    let (tx, mut updates) = mpsc::channel(16);
    sync::spawn(
        cluster_named(8, "policies"),
        in_process(&server),
        Some("eth0".into()),
        None,
        AnyInterface,
        tx,
    );
    let state = next_update(&mut updates).await;
    assert_eq!(state.desired.egress_policies.len(), 3);
    tokio::time::sleep(Duration::from_secs(5)).await;

    let path = |name: &str| format!("/apis/gatewayd.io/v1alpha1/egressgatewaypolicies/{name}/status");
    assert_eq!(
        server.requests("PATCH", &path("unchanged")),
        0,
        "nothing to write"
    );
    let condition = |name: &str| {
        server
            .get("gatewayd.io/v1alpha1", "EgressGatewayPolicy", None, name)
            .unwrap()["status"]["conditions"][0]
            .clone()
    };
    let reworded = condition("reworded");
    assert_eq!(reworded["status"], "False");
    assert!(
        reworded["message"].as_str().unwrap().contains("destination"),
        "{reworded}"
    );
    assert_eq!(
        reworded["lastTransitionTime"], "2026-01-01T00:00:00Z",
        "same status, same time"
    );
    let fixed = condition("fixed");
    assert_eq!(fixed["status"], "True");
    assert_ne!(
        fixed["lastTransitionTime"], "2026-01-01T00:00:00Z",
        "a new status, a new time"
    );
    assert_eq!(condition("new")["status"], "True");
}
