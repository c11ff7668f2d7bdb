//! The Kubernetes sync of one cluster against the test API server on loopback (no root): the
//! kube client from a kubeconfig, reflectors, debouncing, staleness when the server dies, and a
//! clean relist after it comes back with a compacted history (410 Gone).

use gatewayd::config::{Cluster, ClusterAccess, Host, SecretRef, DEFAULT_LOAD_BALANCER_CLASS};
use gatewayd::encryption::ipsec::{plan_keys, InstalledKey};
use gatewayd::k8s::convert::ClusterState;
use gatewayd::k8s::sync::{self, ClusterUpdate, SharedStatus, SyncState};
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
