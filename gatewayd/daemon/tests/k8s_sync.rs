//! The Kubernetes sync of one cluster against the test API server on loopback (no root): the
//! kube client from a kubeconfig, reflectors, debouncing, staleness when the server dies, and a
//! clean relist after it comes back with a compacted history (410 Gone).

use gatewayd::config::{Cluster, ClusterAccess, Host, DEFAULT_LOAD_BALANCER_CLASS};
use gatewayd::k8s::convert::ClusterState;
use gatewayd::k8s::sync::{self, ClusterUpdate, SharedStatus, SyncState};
use gatewayd_integration::apiserver::ApiServer;
use serde_json::{json, Value};
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
        id: 3,
        name: "test".into(),
        access: ClusterAccess::Kubeconfig {
            path: kubeconfig,
            context: None,
        },
        load_balancer_class: DEFAULT_LOAD_BALANCER_CLASS.into(),
        identity_ignore_labels: vec![],
        wireguard_port: 51820,
        address_pools: vec!["10.100.5.0/30".parse().unwrap()],
    };
    let client = sync::client(&cluster).await.unwrap();
    let (tx, mut updates) = mpsc::channel(16);
    let status = sync::spawn(cluster, client, Some("eth0".into()), AnyInterface, tx);

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
