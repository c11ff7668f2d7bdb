//! Kubernetes sync: each `[[clusters]]` entry is followed by reflectors (Services,
//! EndpointSlices, Nodes, Pods, Namespaces, EgressGatewayPolicies); their stores convert into a
//! [`convert::ClusterState`] (pure), which [`clusters::Clusters`] keeps (and saves, for the next
//! start) and merges with the TOML's desired state ([`crate::model::merge`], pure) before the
//! usual reconcile. The datapath never learns where state came from. Design and identities:
//! docs/kubernetes.md.

pub mod clusters;
pub mod convert;
pub mod crd;
pub mod identity;
pub mod ipam;
pub mod saved;
pub mod secret;
pub mod selector;
pub mod sync;
pub mod token;

use crate::model::merge::Contribution;
use crate::model::{DesiredState, ServiceKey};
use convert::ClusterState;
use std::collections::BTreeSet;

/// A label map from pairs, for the tests of the sync's parts.
#[cfg(test)]
fn labels(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A cluster contributes its desired state and its services marked global.
impl Contribution for ClusterState {
    fn desired(&self) -> &DesiredState {
        &self.desired
    }

    fn global_services(&self) -> &BTreeSet<ServiceKey> {
        &self.global_services
    }
}
