//! The desired state from every source merged into one: the TOML file's, then each
//! Kubernetes cluster's. Pure; the daemon programs the result.

use super::{DesiredState, Peer, ServiceKey};
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

/// What one source besides the file (a Kubernetes cluster) contributes to the merge.
pub trait Contribution {
    fn desired(&self) -> &DesiredState;
    /// Services whose backends merge with those of other sources that mark the same service
    /// global.
    fn global_services(&self) -> &BTreeSet<ServiceKey>;
}

/// The TOML's state plus every cluster's, and the conflicts met on the way (each once, stable
/// text, so the caller can log only new ones). The TOML wins over clusters, a lower cluster id
/// over a higher one, except for services every claimant marked global, whose backends merge.
pub fn merge<C: Contribution>(
    base: &DesiredState,
    clusters: &BTreeMap<u32, Arc<C>>,
) -> (DesiredState, Vec<String>) {
    let mut merged = base.clone();
    let mut conflicts = Vec::new();
    let mut global: BTreeSet<ServiceKey> = BTreeSet::new();
    let mut policy_names: HashSet<String> = merged.egress_policies.iter().map(|p| p.name.clone()).collect();
    let mut peers = PeerClaims::default();
    for p in &merged.peers {
        peers.claim(p);
    }
    for state in clusters.values() {
        let d = state.desired();
        for (key, svc) in &d.services {
            let is_global = state.global_services().contains(key);
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
                            Arc::make_mut(existing).backends.push(b.clone());
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
            match peers.clash(p) {
                None => {
                    peers.claim(p);
                    merged.peers.push(p.clone());
                }
                Some(clash) => conflicts.push(format!("peer {}: {clash}; the first one stays", p.name)),
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
        // Only the cluster named by encryption.ipsec.key_secret follows a key Secret.
        if merged.ipsec_keys.is_none() {
            merged.ipsec_keys.clone_from(&d.ipsec_keys);
        }
    }
    (merged, conflicts)
}

/// What merged peers already hold. A peer that repeats a name, a WireGuard key or an allowed
/// network is left out: the tunnel could not hold both (one key, one owner per network), and
/// one bad Node must not make the whole merged state unprogrammable.
#[derive(Default)]
struct PeerClaims {
    names: HashSet<String>,
    keys: HashMap<String, String>,
    networks: HashMap<IpNet, String>,
}

impl PeerClaims {
    fn clash(&self, p: &Peer) -> Option<String> {
        if self.names.contains(&p.name) {
            return Some("defined twice".into());
        }
        if let Some(other) = self.keys.get(&p.public_key) {
            return Some(format!("has the public key of peer {other}"));
        }
        p.allowed_ips.iter().find_map(|net| {
            self.networks
                .get(net)
                .map(|other| format!("allowed IP {net} is already peer {other}'s"))
        })
    }

    fn claim(&mut self, p: &Peer) {
        self.names.insert(p.name.clone());
        if !p.public_key.is_empty() {
            self.keys.insert(p.public_key.clone(), p.name.clone());
        }
        for net in &p.allowed_ips {
            self.networks.insert(*net, p.name.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::convert::ClusterState;
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
                services: services.into_iter().map(|s| (s.key, Arc::new(s))).collect(),
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
            services: [(
                key("10.0.0.1"),
                Arc::new(service("toml", key("10.0.0.1"), &["10.1.0.1"])),
            )]
            .into(),
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

    #[test]
    fn peers_that_repeat_a_name_key_or_network_are_left_out() {
        let peer = |name: &str, key: &str, nets: &[&str]| Peer {
            name: name.into(),
            public_key: key.into(),
            endpoint: None,
            allowed_ips: nets.iter().map(|n| n.parse().unwrap()).collect(),
        };
        let base = DesiredState {
            peers: vec![peer("static", "K1", &["10.244.1.0/24"])],
            ..Default::default()
        };
        let nodes = |peers: Vec<Peer>| {
            Arc::new(ClusterState {
                desired: DesiredState {
                    peers,
                    ..Default::default()
                },
                ..Default::default()
            })
        };
        let clusters = BTreeMap::from([(
            1,
            nodes(vec![
                peer("a/n1", "K1", &["10.244.9.0/24"]),
                peer("a/n2", "K2", &["10.244.1.0/24"]),
                peer("static", "K3", &["10.244.3.0/24"]),
                peer("a/n4", "K4", &["10.244.4.0/24", "10.0.0.4/32"]),
                peer("a/n5", "", &["10.244.5.0/24"]),
                peer("a/n6", "", &["10.244.6.0/24"]),
            ]),
        )]);
        let (merged, conflicts) = merge(&base, &clusters);
        let names: Vec<&str> = merged.peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            ["static", "a/n4", "a/n5", "a/n6"],
            "keyless peers do not clash"
        );
        assert_eq!(conflicts.len(), 3, "{conflicts:?}");
        assert!(conflicts[0].contains("a/n1") && conflicts[0].contains("public key of peer static"));
        assert!(conflicts[1].contains("a/n2") && conflicts[1].contains("10.244.1.0/24"));
        assert!(conflicts[2].contains("peer static: defined twice"));
    }
}
