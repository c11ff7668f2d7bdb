//! Each cluster's last state, kept in `state_dir` so that a restarted daemon starts from it:
//! the services a previous daemon programmed from a cluster stay programmed (no flush) until
//! the cluster is reachable again and says otherwise.

use super::convert::ClusterState;
use crate::model::{DesiredState, EgressPolicy, Identity, Peer, Service, ServiceKey};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `ClusterState` without what is recomputed anyway (problems, verdicts), in a JSON-friendly
/// shape (no struct map keys).
#[derive(Serialize, Deserialize)]
struct Saved {
    /// The cluster's name when saved: a state is only restored into the same cluster.
    cluster: String,
    services: Vec<Service>,
    global_services: Vec<ServiceKey>,
    egress_policies: Vec<EgressPolicy>,
    peers: Vec<Peer>,
    identities: Vec<(IpAddr, Identity)>,
}

pub fn path(state_dir: &Path, cluster_id: u32) -> PathBuf {
    state_dir.join(format!("cluster-{cluster_id}.json"))
}

/// Writes atomically (temporary file, then rename): a crash leaves the old state or the new.
pub fn save(path: &Path, cluster: &str, state: &ClusterState) -> Result<()> {
    let d = &state.desired;
    let saved = Saved {
        cluster: cluster.to_owned(),
        services: d.services.values().map(|s| Service::clone(s)).collect(),
        global_services: state.global_services.iter().copied().collect(),
        egress_policies: d.egress_policies.clone(),
        peers: d.peers.clone(),
        identities: d.identities.iter().map(|(ip, i)| (*ip, i.clone())).collect(),
    };
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(&saved)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {}", tmp.display()))?;
    Ok(())
}

/// The saved state of `cluster`, if any (a state saved under another name is ignored).
pub fn load(path: &Path, cluster: &str) -> Result<Option<ClusterState>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let saved: Saved =
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?;
    if saved.cluster != cluster {
        return Ok(None);
    }
    Ok(Some(ClusterState {
        desired: DesiredState {
            services: saved.services.into_iter().map(|s| (s.key, Arc::new(s))).collect(),
            egress_policies: saved.egress_policies,
            peers: saved.peers,
            identities: saved.identities.into_iter().collect(),
            // Key material is never written to the state dir: after a restart the installed
            // IPsec states stay until the key Secret is read again.
            ipsec_keys: None,
        },
        global_services: saved.global_services.into_iter().collect(),
        ..Default::default()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;

    #[test]
    fn a_saved_state_loads_back_for_the_same_cluster_only() {
        let key = ServiceKey {
            vip: "10.0.0.1".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let mut state = ClusterState::default();
        state.desired.services.insert(
            key,
            Arc::new(Service {
                name: "c/ns/web:80".into(),
                key,
                source_ranges: vec!["192.0.2.0/24".parse().unwrap()],
                affinity_timeout: Some(60),
                encapsulation: Encapsulation::Gue { port: 6080 },
                backends: vec![Backend {
                    address: "10.1.0.1".parse().unwrap(),
                    weight: 7,
                    state: BackendState::Terminating,
                }],
            }),
        );
        state.global_services.insert(key);
        state.desired.identities.insert(
            "10.244.0.5".parse().unwrap(),
            Identity {
                id: 1 << 24 | 300,
                cluster: "c".into(),
                namespace: "ns".into(),
                pod: "web-0".into(),
            },
        );
        let dir = std::env::temp_dir().join(format!("gd-saved-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = path(&dir, 3);
        save(&file, "c", &state).unwrap();
        assert_eq!(load(&file, "c").unwrap(), Some(state));
        assert_eq!(load(&file, "renamed").unwrap(), None);
        assert_eq!(load(&path(&dir, 4), "c").unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
