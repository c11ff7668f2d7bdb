//! Kubernetes objects to the model: pure functions of one cluster's objects, so a snapshot of
//! the reflectors' stores always converts to the same state (and unit tests need no server).

use super::crd::{EgressGatewayPolicySpec, KIND as EGRESS_KIND};
use super::identity::{self, LabelSet};
use super::selector;
use crate::config::{Cluster, Host};
use crate::model::checks;
use crate::model::*;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service as K8sService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::DynamicObject;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// Serve a LoadBalancer Service whatever its class.
pub const ANNOTATION_SERVE: &str = "gatewayd.io/serve";
/// Merge this Service's backends with the same VIP:port from other clusters.
pub const ANNOTATION_GLOBAL: &str = "gatewayd.io/global";
/// `ipip` (default) or `gue`, with `gatewayd.io/gue-port`.
pub const ANNOTATION_ENCAPSULATION: &str = "gatewayd.io/encapsulation";
pub const ANNOTATION_GUE_PORT: &str = "gatewayd.io/gue-port";
/// On an EndpointSlice: the Maglev weight of its endpoints (1-65535, default 100).
pub const ANNOTATION_WEIGHT: &str = "gatewayd.io/weight";
/// On a Node: its WireGuard public key (gatewayd's own, then Cilium's).
pub const ANNOTATION_WG_KEYS: [&str; 2] = ["gatewayd.io/wg-pub-key", "network.cilium.io/wg-pub-key"];
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const DEFAULT_WEIGHT: u32 = 100;
/// Kubernetes' default ClientIP affinity timeout.
const DEFAULT_AFFINITY_SECONDS: u32 = 10800;

/// One cluster's objects, as its reflectors hold them.
#[derive(Debug, Default, Clone)]
pub struct ClusterObjects {
    pub services: Vec<Arc<K8sService>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    pub nodes: Vec<Arc<Node>>,
    pub pods: Vec<Arc<Pod>>,
    pub namespaces: Vec<Arc<Namespace>>,
    pub egress_policies: Vec<Arc<DynamicObject>>,
}

/// An object gatewayd skipped (wholly or partly), and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    pub kind: &'static str,
    pub namespace: Option<String>,
    pub name: String,
    pub message: String,
}

/// What one cluster contributes to the desired state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterState {
    pub desired: DesiredState,
    /// Services annotated global: their backends merge with other clusters'.
    pub global_services: BTreeSet<ServiceKey>,
    /// Every EgressGatewayPolicy seen, by name: `None` if valid, or why it was skipped.
    pub egress_verdicts: BTreeMap<String, Option<String>>,
    pub problems: Vec<Problem>,
}

/// What conversion needs besides the objects.
pub struct Context<'a> {
    pub cluster: &'a Cluster,
    /// `[egress] interface`: for policies that name none.
    pub egress_interface: Option<&'a str>,
    pub host: &'a dyn Host,
}

/// `cache` holds the previous call's Service conversions (empty at first): the result is the
/// same with any cache, only faster with the last one.
pub fn convert(cx: &Context, objects: &ClusterObjects, cache: &mut ServiceCache) -> ClusterState {
    let mut problems = Vec::new();
    let (services, global_services) = services(
        cx.cluster,
        &objects.services,
        &objects.endpoint_slices,
        cache,
        &mut problems,
    );
    let pods = PodView::new(&objects.pods, &objects.namespaces);
    let identities = identities(cx.cluster, &pods);
    let (egress_policies, egress_verdicts) =
        egress_policies(cx, &objects.egress_policies, &pods, &mut problems);
    problems.sort();
    ClusterState {
        desired: DesiredState {
            services,
            egress_policies,
            peers: peers(cx.cluster, &objects.nodes, &mut problems),
            identities,
            // Filled by the sync from its Secret reflector (k8s::secret), when it has one.
            ipsec_keys: None,
        },
        global_services,
        egress_verdicts,
        problems,
    }
}

fn annotation<'a>(meta: &'a kube::api::ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations.as_ref()?.get(key).map(String::as_str)
}

fn problem(kind: &'static str, meta: &kube::api::ObjectMeta, message: String) -> Problem {
    Problem {
        kind,
        namespace: meta.namespace.clone(),
        name: meta.name.clone().unwrap_or_default(),
        message,
    }
}

/// A LoadBalancer Service of the cluster's class, or opted in by annotation.
pub fn is_served(cluster: &Cluster, svc: &K8sService) -> bool {
    let Some(spec) = &svc.spec else { return false };
    spec.type_.as_deref() == Some("LoadBalancer")
        && (spec.load_balancer_class.as_deref() == Some(cluster.load_balancer_class.as_str())
            || annotation(&svc.metadata, ANNOTATION_SERVE) == Some("true"))
}

fn endpoint_state(
    conditions: Option<&k8s_openapi::api::discovery::v1::EndpointConditions>,
) -> Option<BackendState> {
    // The API's rule: a nil `ready` means ready, nil `serving` follows ready.
    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
    let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
    match (ready, serving, terminating) {
        (true, _, false) => Some(BackendState::Active),
        (_, true, true) => Some(BackendState::Terminating),
        _ => None,
    }
}

/// The conversions of the last state's Services, reused while a Service object and its
/// EndpointSlices are the same objects (the same `Arc`s: a reflector stores a changed object
/// as a new `Arc`, and a relist replaces every one). With 10,000 services, converting them
/// all costs ~50 ms, and a burst of endpoint changes touches a few.
#[derive(Default)]
pub struct ServiceCache {
    by_name: HashMap<(String, String), ServiceConversion>,
}

/// One Service object and its slices (by name), converted.
struct ServiceConversion {
    object: Arc<K8sService>,
    slices: Vec<Arc<EndpointSlice>>,
    /// One per VIP and port.
    services: Vec<Arc<Service>>,
    problems: Vec<Problem>,
}

impl ServiceConversion {
    fn is_of(&self, object: &Arc<K8sService>, slices: &[&Arc<EndpointSlice>]) -> bool {
        Arc::ptr_eq(&self.object, object)
            && self.slices.len() == slices.len()
            && self.slices.iter().zip(slices).all(|(a, b)| Arc::ptr_eq(a, b))
    }
}

fn services(
    cluster: &Cluster,
    services: &[Arc<K8sService>],
    slices: &[Arc<EndpointSlice>],
    cache: &mut ServiceCache,
    problems: &mut Vec<Problem>,
) -> (BTreeMap<ServiceKey, Arc<Service>>, BTreeSet<ServiceKey>) {
    let mut by_service: HashMap<(&str, &str), Vec<&Arc<EndpointSlice>>> = HashMap::new();
    for slice in slices {
        let ns = slice.metadata.namespace.as_deref().unwrap_or_default();
        if let Some(svc) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        {
            by_service.entry((ns, svc)).or_default().push(slice);
        }
    }
    // Store order is arbitrary; conflicts must resolve the same way on every gateway.
    let mut served: Vec<&Arc<K8sService>> = services.iter().filter(|s| is_served(cluster, s)).collect();
    served.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });

    let mut out = BTreeMap::new();
    let mut global = BTreeSet::new();
    let mut converted = HashMap::with_capacity(served.len());
    for svc in served {
        let meta = &svc.metadata;
        let (ns, name) = (
            meta.namespace.as_deref().unwrap_or_default(),
            meta.name.as_deref().unwrap_or_default(),
        );
        let mut slices = by_service.remove(&(ns, name)).unwrap_or_default();
        // By name: the same order on every gateway, whatever the store's.
        slices.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        let name_key = (ns.to_owned(), name.to_owned());
        let conversion = match cache.by_name.remove(&name_key) {
            Some(previous) if previous.is_of(svc, &slices) => previous,
            _ => convert_service(cluster, svc, &slices),
        };
        problems.extend(conversion.problems.iter().cloned());
        let is_global = annotation(meta, ANNOTATION_GLOBAL) == Some("true");
        for service in &conversion.services {
            let key = service.key;
            if let Some(first) = out.get(&key).map(|s: &Arc<Service>| s.name.clone()) {
                problems.push(problem(
                    "Service",
                    meta,
                    format!("{key} is already served by {first}; skipped"),
                ));
                continue;
            }
            if is_global {
                global.insert(key);
            }
            out.insert(key, service.clone());
        }
        converted.insert(name_key, conversion);
    }
    cache.by_name = converted;
    (out, global)
}

/// One Service object with its EndpointSlices: a model service per VIP and port.
fn convert_service(
    cluster: &Cluster,
    svc: &Arc<K8sService>,
    slices: &[&Arc<EndpointSlice>],
) -> ServiceConversion {
    let meta = &svc.metadata;
    let (ns, name) = (
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default(),
    );
    let mut problems = Vec::new();
    let mut report = |message: String| problems.push(problem("Service", meta, message));
    let spec = svc.spec.as_ref().expect("is_served checked the spec");
    let mut vips = Vec::new();
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    for ip in ingress.into_iter().flatten().filter_map(|i| i.ip.as_deref()) {
        match ip.parse::<IpAddr>() {
            Ok(ip) => vips.push(ip),
            Err(_) => report(format!(
                "status.loadBalancer.ingress ip {ip:?} is not an IP address"
            )),
        }
    }
    let mut source_ranges = Vec::new();
    for r in spec.load_balancer_source_ranges.iter().flatten() {
        match r.trim().parse::<IpNet>() {
            Ok(net) => source_ranges.push(net.trunc()),
            Err(_) => report(format!("loadBalancerSourceRanges entry {r:?} is not a CIDR")),
        }
    }
    let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .filter(|t| *t > 0)
            .unwrap_or(DEFAULT_AFFINITY_SECONDS)
    });
    let encapsulation = match (
        annotation(meta, ANNOTATION_ENCAPSULATION),
        annotation(meta, ANNOTATION_GUE_PORT).map(str::parse::<u16>),
    ) {
        (None | Some("ipip"), _) => Encapsulation::Ipip,
        (Some("gue"), Some(Ok(port))) if port != 0 => Encapsulation::Gue { port },
        (other, _) => {
            report(format!(
                "annotation {ANNOTATION_ENCAPSULATION}={other:?} needs \"ipip\", or \"gue\" with {ANNOTATION_GUE_PORT} 1-65535; using ipip"
            ));
            Encapsulation::Ipip
        }
    };
    let mut services = Vec::new();
    for port in spec.ports.iter().flatten() {
        let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            other => {
                report(format!(
                    "port {}: protocol {other} is not load balanced",
                    port.port
                ));
                continue;
            }
        };
        let Ok(number) = u16::try_from(port.port) else {
            continue;
        };
        for &vip in &vips {
            let service = Service {
                name: format!("{}/{ns}/{name}:{number}", cluster.name),
                key: ServiceKey {
                    vip,
                    port: number,
                    protocol,
                },
                source_ranges: source_ranges
                    .iter()
                    .copied()
                    .filter(|r| r.addr().is_ipv6() == vip.is_ipv6())
                    .collect(),
                affinity_timeout,
                encapsulation,
                backends: backends(port, vip.is_ipv6(), slices, &mut report),
            };
            if let Some(service) = checked(service, &mut report) {
                services.push(Arc::new(service));
            }
        }
    }
    problems.sort();
    problems.dedup();
    ServiceConversion {
        object: svc.clone(),
        slices: slices.iter().map(|s| Arc::clone(s)).collect(),
        services,
        problems,
    }
}

/// The service as the model's checks (the same as the TOML's) leave it: `None` if its VIP can
/// never work, else without the backends that cannot.
fn checked(mut service: Service, report: &mut impl FnMut(String)) -> Option<Service> {
    let mut left_out = Vec::new();
    for f in checks::service(&service) {
        let what = match f.field {
            checks::ServiceField::Vip => "status.loadBalancer.ingress ip",
            checks::ServiceField::Backend(_) => "endpoint address",
        };
        if f.severity == checks::Severity::Warning {
            report(format!("{what} {}: {}", f.value, f.message));
            continue;
        }
        match f.field {
            checks::ServiceField::Vip => {
                report(format!("{what} {}: {}; not served", f.value, f.message));
                return None;
            }
            checks::ServiceField::Backend(i) => {
                report(format!("{what} {}: {}; left out", f.value, f.message));
                left_out.push(i);
            }
        }
    }
    let mut index = 0..;
    service
        .backends
        .retain(|_| !left_out.contains(&index.next().expect("endless")));
    Some(service)
}

/// The backends of one service port for one address family, from its EndpointSlices. The
/// slice's port is found by the service port's name (how Kubernetes resolves named target
/// ports per endpoint); with DSR the packet keeps the VIP's port, so a backend must accept it.
fn backends(
    port: &k8s_openapi::api::core::v1::ServicePort,
    v6: bool,
    slices: &[&Arc<EndpointSlice>],
    report: &mut impl FnMut(String),
) -> Vec<Backend> {
    let family = if v6 { "IPv6" } else { "IPv4" };
    let wanted_name = port.name.as_deref().unwrap_or_default();
    let mut best: BTreeMap<IpAddr, Backend> = BTreeMap::new();
    for slice in slices.iter().filter(|s| s.address_type == family) {
        let Some(slice_port) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref().unwrap_or_default() == wanted_name)
        else {
            continue;
        };
        if slice_port.port.is_some_and(|p| p != port.port) {
            report(format!(
                "port {}: endpoints listen on {} but DSR delivers to the service port; backends must accept {}",
                port.port,
                slice_port.port.unwrap_or_default(),
                port.port
            ));
        }
        let weight = match annotation(&slice.metadata, ANNOTATION_WEIGHT).map(str::parse::<u32>) {
            None => DEFAULT_WEIGHT,
            Some(Ok(w)) if (1..=65535).contains(&w) => w,
            Some(_) => {
                report(format!(
                    "EndpointSlice {}: annotation {ANNOTATION_WEIGHT} must be 1-65535; using {DEFAULT_WEIGHT}",
                    slice.metadata.name.as_deref().unwrap_or_default()
                ));
                DEFAULT_WEIGHT
            }
        };
        for endpoint in &slice.endpoints {
            let Some(state) = endpoint_state(endpoint.conditions.as_ref()) else {
                continue;
            };
            // An address in two slices (during a slice rebalance) counts once, at its best state.
            for address in endpoint.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()) {
                let candidate = Backend {
                    address,
                    weight,
                    state,
                };
                best.entry(address)
                    .and_modify(|b| {
                        if state < b.state {
                            *b = candidate.clone();
                        }
                    })
                    .or_insert(candidate);
            }
        }
    }
    best.into_values().collect()
}

fn peers(cluster: &Cluster, nodes: &[Arc<Node>], problems: &mut Vec<Problem>) -> Vec<Peer> {
    let mut peers: Vec<Peer> = nodes
        .iter()
        .filter_map(|node| {
            let meta = &node.metadata;
            let key = ANNOTATION_WG_KEYS.iter().find_map(|k| annotation(meta, k))?;
            if !crate::config::is_wireguard_key(key) {
                problems.push(problem(
                    "Node",
                    meta,
                    format!("WireGuard key {key:?} is not a base64 key of 32 bytes"),
                ));
                return None;
            }
            let internal: Vec<IpAddr> = node
                .status
                .as_ref()
                .and_then(|s| s.addresses.as_ref())
                .into_iter()
                .flatten()
                .filter(|a| a.type_ == "InternalIP")
                .filter_map(|a| a.address.parse().ok())
                .collect();
            let spec = node.spec.as_ref();
            let pod_cidrs = spec
                .and_then(|s| s.pod_cidrs.clone())
                .or_else(|| spec.and_then(|s| s.pod_cidr.clone()).map(|c| vec![c]));
            let mut allowed_ips: Vec<IpNet> = pod_cidrs
                .into_iter()
                .flatten()
                .filter_map(|c| c.parse::<IpNet>().ok())
                .map(|n| n.trunc())
                .collect();
            allowed_ips.extend(internal.iter().map(|ip| IpNet::from(*ip)));
            let peer = Peer {
                name: format!("{}/{}", cluster.name, meta.name.as_deref().unwrap_or_default()),
                public_key: key.to_owned(),
                endpoint: internal
                    .first()
                    .map(|ip| SocketAddr::new(*ip, cluster.wireguard_port)),
                allowed_ips,
            };
            let mut usable = true;
            for f in checks::peer(&peer, true) {
                let checks::PeerField::Endpoint = f.field;
                let error = f.severity == checks::Severity::Error;
                usable &= !error;
                problems.push(problem(
                    "Node",
                    meta,
                    format!(
                        "InternalIP endpoint {}: {}{}",
                        f.value,
                        f.message,
                        if error { "; not a peer" } else { "" }
                    ),
                ));
            }
            usable.then_some(peer)
        })
        .collect();
    peers.sort_by(|a, b| a.name.cmp(&b.name));
    peers
}

/// Pods with addresses of their own (not host-network, not finished), with their namespace's
/// labels at hand.
struct PodView<'a> {
    pods: Vec<(&'a Pod, Vec<IpAddr>)>,
    namespace_labels: HashMap<&'a str, &'a BTreeMap<String, String>>,
}

static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

impl<'a> PodView<'a> {
    fn new(pods: &'a [Arc<Pod>], namespaces: &'a [Arc<Namespace>]) -> Self {
        let namespace_labels = namespaces
            .iter()
            .filter_map(|n| {
                Some((
                    n.metadata.name.as_deref()?,
                    n.metadata.labels.as_ref().unwrap_or(&NO_LABELS),
                ))
            })
            .collect();
        let pods = pods
            .iter()
            .filter(|p| !p.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false))
            .filter_map(|p| {
                let status = p.status.as_ref()?;
                if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
                    return None;
                }
                let ips: Vec<IpAddr> = status
                    .pod_ips
                    .iter()
                    .flatten()
                    .filter_map(|i| i.ip.parse().ok())
                    .collect();
                (!ips.is_empty()).then_some((&**p, ips))
            })
            .collect();
        PodView {
            pods,
            namespace_labels,
        }
    }

    fn namespace(pod: &Pod) -> &str {
        pod.metadata.namespace.as_deref().unwrap_or_default()
    }

    fn labels_of_namespace(&self, pod: &Pod) -> &BTreeMap<String, String> {
        self.namespace_labels
            .get(Self::namespace(pod))
            .copied()
            .unwrap_or(&NO_LABELS)
    }
}

fn identities(cluster: &Cluster, view: &PodView) -> BTreeMap<IpAddr, Identity> {
    let sets: Vec<LabelSet> = view
        .pods
        .iter()
        .map(|(pod, _)| {
            identity::label_set(
                PodView::namespace(pod),
                view.labels_of_namespace(pod),
                pod.metadata.labels.as_ref().unwrap_or(&NO_LABELS),
                &cluster.identity_ignore_labels,
            )
        })
        .collect();
    let ids = identity::allocate(cluster.id, &sets.iter().cloned().collect());
    let mut out = BTreeMap::new();
    for ((pod, ips), set) in view.pods.iter().zip(&sets) {
        for ip in ips {
            out.insert(
                *ip,
                Identity {
                    id: ids[set],
                    cluster: cluster.name.clone(),
                    namespace: PodView::namespace(pod).to_owned(),
                    pod: pod.metadata.name.clone().unwrap_or_default(),
                },
            );
        }
    }
    out
}

fn egress_policies(
    cx: &Context,
    objects: &[Arc<DynamicObject>],
    pods: &PodView,
    problems: &mut Vec<Problem>,
) -> (Vec<EgressPolicy>, BTreeMap<String, Option<String>>) {
    let mut policies = Vec::new();
    let mut verdicts = BTreeMap::new();
    for object in objects {
        let name = object.metadata.name.clone().unwrap_or_default();
        let mut warnings = Vec::new();
        let result = egress_policy(cx, object, pods, &mut warnings);
        problems.extend(
            warnings
                .into_iter()
                .map(|w| problem(EGRESS_KIND, &object.metadata, w)),
        );
        match result {
            Ok(policy) => {
                verdicts.insert(name, None);
                policies.push(policy);
            }
            Err(why) => {
                problems.push(problem(EGRESS_KIND, &object.metadata, why.clone()));
                verdicts.insert(name, Some(why));
            }
        }
    }
    policies.sort_by(|a, b| a.name.cmp(&b.name));
    (policies, verdicts)
}

fn cidrs(field: &str, values: &[String]) -> Result<Vec<IpNet>, String> {
    values
        .iter()
        .map(|v| match v.parse::<IpNet>() {
            Ok(net) if net.trunc() == net => Ok(net),
            Ok(net) => Err(format!(
                "spec.{field}: {v:?} has host bits set; the network is {}",
                net.trunc()
            )),
            Err(_) => Err(format!("spec.{field}: {v:?} is not a CIDR")),
        })
        .collect()
}

/// The policy, or why it is skipped; `warnings` gets what is applied but surely wrong.
fn egress_policy(
    cx: &Context,
    object: &DynamicObject,
    pods: &PodView,
    warnings: &mut Vec<String>,
) -> Result<EgressPolicy, String> {
    let spec: EgressGatewayPolicySpec =
        serde_json::from_value(object.data.get("spec").cloned().unwrap_or_default())
            .map_err(|e| format!("spec: {e}"))?;
    let destination_cidrs = cidrs("destinationCIDRs", &spec.destination_cidrs)?;
    if destination_cidrs.is_empty() {
        return Err("spec.destinationCIDRs: at least one destination CIDR is required".into());
    }
    let excluded_cidrs = cidrs("excludedCIDRs", &spec.excluded_cidrs)?;
    let source_cidrs = cidrs("sourceCIDRs", &spec.source_cidrs)?;
    if spec.selectors.is_empty() && source_cidrs.is_empty() {
        return Err("spec: select source pods (selectors) or sourceCIDRs".into());
    }
    for (i, s) in spec.selectors.iter().enumerate() {
        for (field, sel) in [
            ("podSelector", &s.pod_selector),
            ("namespaceSelector", &s.namespace_selector),
        ] {
            if let Some(sel) = sel {
                selector::validate(sel).map_err(|e| format!("spec.selectors[{i}].{field}: {e}"))?;
            }
        }
    }
    let egress_ip = match &spec.egress_ip {
        Some(ip) => Some(
            ip.parse::<IpAddr>()
                .map_err(|_| format!("spec.egressIP: {ip:?} is not an IP address"))?,
        ),
        None => None,
    };
    if let (Some(ip), Some(bad)) = (
        egress_ip,
        destination_cidrs
            .iter()
            .find(|d| Some(d.addr().is_ipv6()) != egress_ip.map(|e| e.is_ipv6())),
    ) {
        return Err(format!(
            "spec.destinationCIDRs: {bad} is not of the family of egressIP {ip}"
        ));
    }
    let interface = match (spec.interface, cx.egress_interface) {
        (Some(i), _) => i,
        (None, Some(default)) => default.to_owned(),
        (None, None) => {
            return Err("spec.interface: none given and gatewayd has no [egress] interface".into())
        }
    };
    if !cx.host.interface_exists(&interface) {
        return Err(format!(
            "spec.interface: {interface:?} is not an interface of this gateway"
        ));
    }
    let mut policy = EgressPolicy {
        name: format!(
            "{}/{}",
            cx.cluster.name,
            object.metadata.name.as_deref().unwrap_or_default()
        ),
        source_cidrs,
        destination_cidrs,
        excluded_cidrs,
        interface,
        egress_ip,
    };
    for f in checks::egress_policy(&policy) {
        let field = match f.field {
            checks::EgressPolicyField::EgressIp => "spec.egressIP".to_string(),
            checks::EgressPolicyField::SourceCidr(i) => format!("spec.sourceCIDRs[{i}]"),
        };
        let message = format!("{field}: {}: {}", f.value, f.message);
        match f.severity {
            checks::Severity::Error => return Err(message),
            checks::Severity::Warning => warnings.push(message),
        }
    }
    let selected = |pod: &Pod| {
        spec.selectors.iter().any(|s| {
            let ok = |sel: &Option<_>, labels: &BTreeMap<String, String>| {
                sel.as_ref()
                    .is_none_or(|sel| selector::matches(sel, labels).unwrap_or(false))
            };
            ok(
                &s.pod_selector,
                pod.metadata.labels.as_ref().unwrap_or(&NO_LABELS),
            ) && ok(&s.namespace_selector, pods.labels_of_namespace(pod))
        })
    };
    // Only the explicit sourceCIDRs are checked: a dual-stack pod's address of the other family
    // is no mistake of the policy's (it just never matches).
    for (pod, ips) in &pods.pods {
        if selected(pod) {
            policy.source_cidrs.extend(ips.iter().map(|ip| IpNet::from(*ip)));
        }
    }
    policy.source_cidrs.sort();
    policy.source_cidrs.dedup();
    Ok(policy)
}

#[cfg(test)]
mod tests {
    //! Fixtures are `kubectl get <kind> -o json` output (a `List` with every server-set field).
    use super::*;
    use serde::de::DeserializeOwned;

    fn items<K: DeserializeOwned>(file: &str) -> Vec<Arc<K>> {
        let path = format!("{}/src/k8s/testdata/{file}", env!("CARGO_MANIFEST_DIR"));
        let list: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| Arc::new(serde_json::from_value(i.clone()).unwrap_or_else(|e| panic!("{file}: {e}"))))
            .collect()
    }

    fn objects() -> ClusterObjects {
        ClusterObjects {
            services: items("services.json"),
            endpoint_slices: items("endpointslices.json"),
            nodes: items("nodes.json"),
            pods: items("pods.json"),
            namespaces: items("namespaces.json"),
            egress_policies: items("egressgatewaypolicies.json"),
        }
    }

    fn cluster() -> Cluster {
        Cluster::new(
            1,
            "prod",
            crate::config::ClusterAccess::Kubeconfig {
                path: "/dev/null".into(),
                context: None,
            },
        )
    }

    struct TestHost;
    impl Host for TestHost {
        fn interface_exists(&self, name: &str) -> bool {
            name == "eth0" || name == "eth1"
        }
    }

    fn converted() -> ClusterState {
        convert_objects(&objects())
    }

    fn convert_objects(objects: &ClusterObjects) -> ClusterState {
        let cluster = cluster();
        convert(
            &Context {
                cluster: &cluster,
                egress_interface: Some("eth0"),
                host: &TestHost,
            },
            objects,
            &mut ServiceCache::default(),
        )
    }

    fn key(vip: &str, port: u16, protocol: Protocol) -> ServiceKey {
        ServiceKey {
            vip: vip.parse().unwrap(),
            port,
            protocol,
        }
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn load_balancer_services_of_our_class_with_their_endpoints() {
        let state = converted();
        let services = &state.desired.services;
        let web4 = key("10.100.0.1", 80, Protocol::Tcp);
        let web6 = key("fd00:100::1", 80, Protocol::Tcp);
        let dns4 = key("10.100.0.1", 53, Protocol::Udp);
        let dns6 = key("fd00:100::1", 53, Protocol::Udp);
        let api = key("10.100.0.2", 443, Protocol::Tcp);
        assert_eq!(
            services.keys().copied().collect::<BTreeSet<_>>(),
            BTreeSet::from([web4, web6, dns4, dns6, api]),
            "other classes, ClusterIP and VIP-less services are not served"
        );

        let web = &services[&web4];
        assert_eq!(web.name, "prod/shop/web:80");
        let backends: Vec<(String, BackendState, u32)> = web
            .backends
            .iter()
            .map(|b| (b.address.to_string(), b.state, b.weight))
            .collect();
        assert_eq!(
            backends,
            [
                ("10.244.1.5".into(), BackendState::Active, 100),
                ("10.244.1.6".into(), BackendState::Active, 100),
                ("10.244.2.7".into(), BackendState::Terminating, 100),
            ],
            "ready -> active, serving+terminating -> terminating, others and other namespaces' slices out"
        );
        assert_eq!(web.affinity_timeout, Some(600));
        assert_eq!(web.source_ranges, [net("192.0.2.0/24")]);
        assert_eq!(web.encapsulation, Encapsulation::Ipip);
        let v6 = &services[&web6];
        assert_eq!(v6.source_ranges, [net("2001:db8::/32")]);
        assert_eq!(
            v6.backends,
            [Backend {
                address: "fd00:244:1::5".parse().unwrap(),
                weight: 50,
                state: BackendState::Active
            }]
        );
        assert_eq!(services[&dns4].backends.len(), 3);
        assert_eq!(services[&api].encapsulation, Encapsulation::Gue { port: 6080 });
        assert_eq!(services[&api].affinity_timeout, None);
        assert_eq!(services[&api].backends[0].address.to_string(), "10.244.3.3");
        assert_eq!(state.global_services, BTreeSet::from([web4, web6, dns4, dns6]));

        let messages: Vec<&str> = state
            .problems
            .iter()
            .filter(|p| p.kind == "Service")
            .map(|p| p.message.as_str())
            .collect();
        assert!(
            messages.iter().any(|m| m.contains("protocol SCTP")),
            "{messages:?}"
        );
        assert!(
            messages
                .iter()
                .any(|m| m.contains("port 80: endpoints listen on 8080")),
            "{messages:?}"
        );
    }

    #[test]
    fn nodes_with_a_wireguard_key_become_peers() {
        let state = converted();
        let peers = &state.desired.peers;
        assert_eq!(peers.len(), 2, "{peers:?}");
        assert_eq!(peers[0].name, "prod/node-a");
        assert_eq!(
            peers[0].public_key,
            "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="
        );
        assert_eq!(peers[0].endpoint, Some("10.0.0.21:51820".parse().unwrap()));
        assert_eq!(
            peers[0].allowed_ips,
            [
                net("10.244.1.0/24"),
                net("fd00:244:1::/64"),
                net("10.0.0.21/32"),
                net("fd00::21/128")
            ]
        );
        assert_eq!(peers[1].name, "prod/node-b", "Cilium's annotation is read too");
        assert_eq!(peers[1].allowed_ips, [net("10.244.2.0/24"), net("10.0.0.22/32")]);
        assert!(state
            .problems
            .iter()
            .any(|p| p.kind == "Node" && p.name == "node-d"));
    }

    #[test]
    fn pods_get_identities_from_their_security_labels() {
        let ids = converted().desired.identities;
        let id = |ip: &str| ids[&ip.parse::<IpAddr>().unwrap()].id;
        assert_eq!(
            id("10.244.1.5"),
            id("10.244.2.7"),
            "two rollouts of one app (pod-template-hash differs) share an identity"
        );
        assert_eq!(id("10.244.1.5"), id("fd00:244:1::5"));
        assert_ne!(id("10.244.1.5"), id("10.244.3.3"), "same labels, other namespace");
        assert_ne!(id("10.244.1.5"), id("10.244.1.9"));
        assert!(ids.values().all(|i| i.id >> 24 == 1 && i.cluster == "prod"));
        assert_eq!(ids[&"10.244.1.9".parse::<IpAddr>().unwrap()].pod, "db-0");
        assert_eq!(
            ids.len(),
            5,
            "host-network and finished pods have no identity: {ids:?}"
        );
        // Stable: the same objects in another order give the same identities.
        let mut shuffled = objects();
        shuffled.pods.reverse();
        let cluster = cluster();
        let again = convert(
            &Context {
                cluster: &cluster,
                egress_interface: Some("eth0"),
                host: &TestHost,
            },
            &shuffled,
            &mut ServiceCache::default(),
        );
        assert_eq!(again.desired.identities, ids);
    }

    #[test]
    fn egress_policies_select_pods_and_skip_invalid_objects() {
        let state = converted();
        let policies = &state.desired.egress_policies;
        assert_eq!(
            policies.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["prod/all-db", "prod/shop-web"]
        );
        let web = &policies[1];
        assert_eq!(
            web.source_cidrs,
            [
                net("10.244.1.5/32"),
                net("10.244.2.7/32"),
                net("10.250.0.0/16"),
                net("fd00:244:1::5/128")
            ],
            "web pods of namespaces labelled team=shop (not bank's), plus the sourceCIDRs"
        );
        assert_eq!(web.destination_cidrs, [net("203.0.113.0/24")]);
        assert_eq!(web.excluded_cidrs, [net("203.0.113.128/25")]);
        assert_eq!(web.egress_ip, Some("192.0.2.10".parse().unwrap()));
        assert_eq!(web.interface, "eth1");
        let db = &policies[0];
        assert_eq!(db.source_cidrs, [net("10.244.1.9/32")]);
        assert_eq!(db.interface, "eth0", "[egress] interface by default");
        assert_eq!(db.egress_ip, None);

        let invalid: BTreeMap<&str, &str> = state
            .egress_verdicts
            .iter()
            .filter_map(|(n, v)| Some((n.as_str(), v.as_deref()?)))
            .collect();
        for (name, field) in [
            ("no-destination", "spec.destinationCIDRs"),
            ("host-bits", "spec.destinationCIDRs"),
            ("typo", "destinationCidrs"),
            ("bad-operator", "spec.selectors[0].podSelector"),
            ("wrong-family", "spec.destinationCIDRs"),
            ("no-such-interface", "spec.interface"),
        ] {
            assert!(
                invalid.get(name).is_some_and(|m| m.contains(field)),
                "{name}: {invalid:?}"
            );
        }
        assert_eq!(invalid.len(), 6);
        assert_eq!(state.egress_verdicts["shop-web"], None);
    }

    /// The TOML's checks apply to objects from a cluster (issue #15): what can never work is
    /// skipped with a message naming the object, the field and the value; the rest is served.
    #[test]
    fn addresses_that_can_never_work_are_skipped_with_a_problem() {
        use serde_json::json;
        let service = |name: &str, vips: &[&str]| {
            Arc::new(
                serde_json::from_value::<K8sService>(json!({
                    "metadata": {"name": name, "namespace": "shop"},
                    "spec": {"type": "LoadBalancer", "loadBalancerClass": crate::config::DEFAULT_LOAD_BALANCER_CLASS,
                             "ports": [{"port": 80, "protocol": "TCP"}]},
                    "status": {"loadBalancer": {"ingress": vips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>()}},
                }))
                .unwrap(),
            )
        };
        let slice = Arc::new(
            serde_json::from_value::<EndpointSlice>(json!({
                "metadata": {"name": "web-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["10.244.0.1"]}, {"addresses": ["127.0.0.1"]}, {"addresses": ["10.100.0.1"]}],
                "ports": [{"port": 80}],
            }))
            .unwrap(),
        );
        let node = Arc::new(
            serde_json::from_value::<Node>(json!({
                "metadata": {"name": "n1", "annotations": {ANNOTATION_WG_KEYS[0]: "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="}},
                "status": {"addresses": [{"type": "InternalIP", "address": "0.0.0.0"}]},
            }))
            .unwrap(),
        );
        let policy = Arc::new(
            serde_json::from_value::<DynamicObject>(json!({
                "apiVersion": "gatewayd.io/v1alpha1", "kind": "EgressGatewayPolicy",
                "metadata": {"name": "broadcast"},
                "spec": {"sourceCIDRs": ["10.244.0.0/16"], "destinationCIDRs": ["0.0.0.0/0"], "egressIP": "255.255.255.255"},
            }))
            .unwrap(),
        );
        let objects = ClusterObjects {
            services: vec![
                service("web", &["10.100.0.1", "224.0.0.1"]),
                service("zero", &["0.0.0.0"]),
            ],
            endpoint_slices: vec![slice],
            nodes: vec![node],
            egress_policies: vec![policy],
            ..Default::default()
        };
        let state = convert_objects(&objects);
        let served: Vec<(String, Vec<String>)> = state
            .desired
            .services
            .values()
            .map(|s| {
                (
                    s.key.to_string(),
                    s.backends.iter().map(|b| b.address.to_string()).collect(),
                )
            })
            .collect();
        assert_eq!(
            served,
            [("10.100.0.1:80/tcp".to_string(), vec!["10.244.0.1".to_string()])]
        );
        assert!(state.desired.peers.is_empty());
        assert!(state.desired.egress_policies.is_empty());
        let shown: Vec<String> = state
            .problems
            .iter()
            .map(|p| format!("{} {}: {}", p.kind, p.name, p.message))
            .collect();
        for wanted in [
            "EgressGatewayPolicy broadcast: spec.egressIP: 255.255.255.255: a packet source cannot be the broadcast address",
            "Node n1: InternalIP endpoint 0.0.0.0:51820: a peer endpoint cannot be an unspecified address",
            "Service web: endpoint address 10.100.0.1: a backend cannot be the service's own VIP; left out",
            "Service web: endpoint address 127.0.0.1: a backend cannot be a loopback address",
            "Service web: status.loadBalancer.ingress ip 224.0.0.1: a VIP cannot be a multicast address (224.0.0.0/4); not served",
            "Service zero: status.loadBalancer.ingress ip 0.0.0.0: a VIP cannot be an unspecified address",
        ] {
            assert!(shown.iter().any(|p| p.starts_with(wanted)), "{wanted:?} not in {shown:#?}");
        }
        assert_eq!(shown.len(), 6, "each problem once: {shown:#?}");
    }

    fn trimmed<K: Clone>(objects: &mut [Arc<K>], f: fn(&mut K)) {
        for o in objects {
            f(Arc::make_mut(o));
        }
    }

    #[test]
    fn trimmed_objects_convert_the_same() {
        use crate::k8s::sync::{trim, trim_pod};
        let mut objects = objects();
        let full = converted();
        trimmed(&mut objects.pods, trim_pod);
        trimmed(&mut objects.services, trim);
        trimmed(&mut objects.endpoint_slices, trim);
        trimmed(&mut objects.nodes, trim);
        trimmed(&mut objects.namespaces, trim);
        trimmed(&mut objects.egress_policies, trim);
        assert!(objects
            .pods
            .iter()
            .all(|p| p.spec.as_ref().unwrap().containers.is_empty()));
        let cluster = cluster();
        let cx = Context {
            cluster: &cluster,
            egress_interface: Some("eth0"),
            host: &TestHost,
        };
        assert_eq!(convert(&cx, &objects, &mut ServiceCache::default()), full);
    }

    /// The cache only saves work: after each change, converting with the previous call's
    /// cache gives what a fresh conversion gives.
    #[test]
    fn cached_conversions_follow_changed_objects() {
        let cluster = cluster();
        let cx = Context {
            cluster: &cluster,
            egress_interface: Some("eth0"),
            host: &TestHost,
        };
        let mut cache = ServiceCache::default();
        let mut objects = objects();
        let first = convert(&cx, &objects, &mut cache);
        assert_eq!(convert(&cx, &objects, &mut cache), first);

        // An endpoint changes address: the reflector stores a new object.
        let mut slice = (*objects.endpoint_slices[0]).clone();
        let old: IpAddr = slice.endpoints[0].addresses[0].parse().unwrap();
        slice.endpoints[0].addresses[0] = "10.244.9.99".into();
        objects.endpoint_slices[0] = Arc::new(slice);
        let changed = convert(&cx, &objects, &mut cache);
        assert_ne!(changed, first);
        assert_eq!(changed, convert(&cx, &objects, &mut ServiceCache::default()));
        let addresses: Vec<IpAddr> = changed
            .desired
            .services
            .values()
            .flat_map(|s| s.backends.iter().map(|b| b.address))
            .collect();
        assert!(addresses.contains(&"10.244.9.99".parse().unwrap()) && !addresses.contains(&old));

        // A slice and a service go away.
        objects.endpoint_slices.remove(0);
        objects.services.remove(0);
        let fewer = convert(&cx, &objects, &mut cache);
        assert_eq!(fewer, convert(&cx, &objects, &mut ServiceCache::default()));
    }
}
