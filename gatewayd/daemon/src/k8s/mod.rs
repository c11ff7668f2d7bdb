//! Kubernetes sync: each `[[clusters]]` entry is followed by reflectors (Services,
//! EndpointSlices, Nodes, Pods, Namespaces, EgressGatewayPolicies); their stores convert into a
//! [`convert::ClusterState`] (pure), and the daemon merges the TOML's desired state with one
//! state per cluster ([`merge`], pure) before the usual reconcile. The datapath never learns
//! where state came from. Design and identities: docs/kubernetes.md.

pub mod convert;
pub mod crd;
pub mod identity;
pub mod ipam;
pub mod saved;
pub mod selector;
pub mod sync;

use crate::model::{DesiredState, ServiceKey};
use convert::ClusterState;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

/// The TOML's state plus every cluster's, and the conflicts met on the way (each once, stable
/// text, so the caller can log only new ones). The TOML wins over clusters, a lower cluster id
/// over a higher one, except for services every claimant marked global, whose backends merge.
pub fn merge(
    base: &DesiredState,
    clusters: &BTreeMap<u32, Arc<ClusterState>>,
) -> (DesiredState, Vec<String>) {
    let mut merged = base.clone();
    let mut conflicts = Vec::new();
    let mut global: BTreeSet<ServiceKey> = BTreeSet::new();
    let mut policy_names: HashSet<String> = merged.egress_policies.iter().map(|p| p.name.clone()).collect();
    let mut peer_names: HashSet<String> = merged.peers.iter().map(|p| p.name.clone()).collect();
    for state in clusters.values() {
        let d = &state.desired;
        for (key, svc) in &d.services {
            let is_global = state.global_services.contains(key);
            match merged.services.get_mut(key) {
                None => {
                    merged.services.insert(*key, svc.clone());
                    if is_global {
                        global.insert(*key);
                    }
                }
                Some(existing) if is_global && global.contains(key) => {
                    for b in &svc.backends {
                        if !existing.backends.iter().any(|e| e.address == b.address) {
                            existing.backends.push(b.clone());
                        }
                    }
                }
                Some(existing) => conflicts.push(format!(
                    "{key}: {} is ignored, {} serves it (mark both gatewayd.io/global to merge)",
                    svc.name, existing.name
                )),
            }
        }
        for p in &d.egress_policies {
            if policy_names.insert(p.name.clone()) {
                merged.egress_policies.push(p.clone());
            } else {
                conflicts.push(format!(
                    "egress policy {} is defined twice; the first one stays",
                    p.name
                ));
            }
        }
        for p in &d.peers {
            if peer_names.insert(p.name.clone()) {
                merged.peers.push(p.clone());
            } else {
                conflicts.push(format!("peer {} is defined twice; the first one stays", p.name));
            }
        }
        for (ip, id) in &d.identities {
            if let Some(first) = merged.identities.get(ip) {
                conflicts.push(format!(
                    "pod address {ip} is in cluster {} ({}/{}) and {} ({}/{}); the first one stays",
                    first.cluster, first.namespace, first.pod, id.cluster, id.namespace, id.pod
                ));
            } else {
                merged.identities.insert(*ip, id.clone());
            }
        }
    }
    (merged, conflicts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;

    fn service(name: &str, key: ServiceKey, backends: &[&str]) -> Service {
        Service {
            name: name.into(),
            key,
            source_ranges: vec![],
            affinity_timeout: None,
            encapsulation: Encapsulation::Ipip,
            backends: backends
                .iter()
                .map(|a| Backend {
                    address: a.parse().unwrap(),
                    weight: 100,
                    state: BackendState::Active,
                })
                .collect(),
        }
    }

    fn cluster(services: Vec<Service>, global: bool) -> Arc<ClusterState> {
        Arc::new(ClusterState {
            global_services: if global {
                services.iter().map(|s| s.key).collect()
            } else {
                BTreeSet::new()
            },
            desired: DesiredState {
                services: services.into_iter().map(|s| (s.key, s)).collect(),
                ..Default::default()
            },
            ..Default::default()
        })
    }

    #[test]
    fn toml_wins_clusters_merge_only_global_services() {
        let key = |vip: &str| ServiceKey {
            vip: vip.parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let base = DesiredState {
            services: [(key("10.0.0.1"), service("toml", key("10.0.0.1"), &["10.1.0.1"]))].into(),
            ..Default::default()
        };
        let clusters = BTreeMap::from([
            (
                1,
                cluster(
                    vec![
                        service("a/x", key("10.0.0.1"), &["10.2.0.1"]),
                        service("a/g", key("10.0.0.2"), &["10.2.0.2"]),
                    ],
                    true,
                ),
            ),
            (
                2,
                cluster(
                    vec![
                        service("b/g", key("10.0.0.2"), &["10.3.0.2", "10.2.0.2"]),
                        service("b/own", key("10.0.0.3"), &["10.3.0.3"]),
                    ],
                    true,
                ),
            ),
            (
                3,
                cluster(vec![service("c/g", key("10.0.0.2"), &["10.4.0.2"])], false),
            ),
        ]);
        let (merged, conflicts) = merge(&base, &clusters);
        assert_eq!(merged.services[&key("10.0.0.1")].name, "toml");
        let g: Vec<String> = merged.services[&key("10.0.0.2")]
            .backends
            .iter()
            .map(|b| b.address.to_string())
            .collect();
        assert_eq!(g, ["10.2.0.2", "10.3.0.2"], "global backends merge, once each");
        assert_eq!(merged.services[&key("10.0.0.3")].name, "b/own");
        assert_eq!(conflicts.len(), 2, "{conflicts:?}");
        assert!(
            conflicts[0].contains("a/x") && conflicts[1].contains("c/g"),
            "{conflicts:?}"
        );
    }
}
