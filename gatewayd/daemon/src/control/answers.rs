//! Answers to `gatewayctl`'s requests. Each comes from the component that owns what it asks
//! about: the load balancer's services and counters, the egress gateway's policies and
//! translations, the node encryption's status, the clusters' sync; this module only
//! dispatches and adds what the daemon knows of itself ([`Lifecycle`]).

use crate::k8s::clusters::Clusters;
use crate::model::DesiredState;
use crate::reconcile::Components;
use gatewayd_common::api::{self, Request, Response};
use std::path::PathBuf;
use std::time::Instant;

/// What the daemon reports of itself in `gatewayctl status`.
pub struct Lifecycle {
    pub config_path: PathBuf,
    pub started: Instant,
    /// Incremented by every configuration applied (1: the one read at start).
    pub generation: u64,
    pub last_reload: Option<api::ReloadResult>,
}

/// Everything a request can ask about.
pub struct Views<'a> {
    pub lifecycle: &'a Lifecycle,
    pub components: &'a Components,
    pub clusters: &'a Clusters,
}

/// The answer to `request`; an error becomes [`Response::Error`].
pub async fn answer(request: Request, views: Views<'_>) -> Response {
    let Views {
        lifecycle,
        components,
        clusters,
    } = views;
    let result = match request {
        Request::Status => Ok(Response::Status(status(lifecycle, components, clusters))),
        Request::LbList => components.lb.list().map(Response::LbList),
        Request::LbStats => components.lb.stats().map(Response::LbStats),
        Request::EgressList => Ok(Response::EgressList(
            components.egress.list(&components.in_force().egress_policies),
        )),
        Request::NatList => Ok(Response::NatList(components.egress.translations())),
        Request::Identities => Ok(Response::Identities(identities(components.in_force()))),
        Request::EncryptionStatus => components
            .encryption
            .status()
            .await
            .map(Response::EncryptionStatus),
        Request::Observe => unreachable!("the control socket streams events itself"),
    };
    result.unwrap_or_else(|e: anyhow::Error| Response::Error(format!("{e:#}")))
}

fn status(lifecycle: &Lifecycle, components: &Components, clusters: &Clusters) -> api::Status {
    let datapath = &components.attachments;
    api::Status {
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        uptime_seconds: lifecycle.started.elapsed().as_secs(),
        config_path: lifecycle.config_path.display().to_string(),
        config_generation: lifecycle.generation,
        last_reload: lifecycle.last_reload.clone(),
        bpffs: datapath.pins().root().display().to_string(),
        programs: datapath.attached(),
        services: components.lb.services(),
        backends: components.lb.backends(),
        clusters: clusters.views(),
    }
}

/// Pod addresses and their identities, as the clusters in force define them.
fn identities(desired: &DesiredState) -> Vec<api::PodIdentity> {
    desired
        .identities
        .iter()
        .map(|(ip, i)| api::PodIdentity {
            address: ip.to_string(),
            identity: i.id,
            cluster: i.cluster.clone(),
            namespace: i.namespace.clone(),
            pod: i.pod.clone(),
        })
        .collect()
}
