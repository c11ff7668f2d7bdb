//! LB-IPAM: VIPs for served LoadBalancer Services that have none, from the cluster's
//! `address_pools`, written to `status.loadBalancer.ingress` (where every gateway, and
//! `kubectl get svc`, then reads them).
//!
//! Allocation is a pure function of the cluster's Services, so every gateway following the
//! cluster computes the same addresses and their status writes agree: candidates are taken in
//! (namespace, name) order, each gets the first address of the first pool of its family
//! (`spec.ipFamilies[0]`, IPv4 by default) that no Service of the cluster holds.

use super::convert::{is_served, Problem};
use crate::config::Cluster;
use k8s_openapi::api::core::v1::Service;
use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

/// (namespace, name) of a Service.
pub type ServiceName = (String, String);

fn ingress_ips(svc: &Service) -> impl Iterator<Item = IpAddr> + '_ {
    svc.status
        .iter()
        .flat_map(|s| s.load_balancer.iter())
        .flat_map(|lb| lb.ingress.iter().flatten())
        .filter_map(|i| i.ip.as_deref()?.parse().ok())
}

/// The address each served Service without an ingress address should get.
pub fn allocate(
    cluster: &Cluster,
    services: &[Arc<Service>],
) -> (BTreeMap<ServiceName, IpAddr>, Vec<Problem>) {
    let mut out = BTreeMap::new();
    let mut problems = Vec::new();
    if cluster.address_pools.is_empty() {
        return (out, problems);
    }
    let mut used: HashSet<IpAddr> = services.iter().flat_map(|s| ingress_ips(s)).collect();
    let mut wanting: Vec<&Service> = services
        .iter()
        .map(|s| &**s)
        .filter(|s| is_served(cluster, s) && ingress_ips(s).next().is_none())
        .filter(|s| {
            // A hostname ingress (set by another controller) is an answer too.
            !s.status
                .iter()
                .flat_map(|st| st.load_balancer.iter())
                .flat_map(|lb| lb.ingress.iter().flatten())
                .any(|i| i.hostname.is_some())
        })
        .collect();
    wanting.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    for svc in wanting {
        let v6 = svc
            .spec
            .as_ref()
            .and_then(|s| s.ip_families.as_ref())
            .and_then(|f| f.first())
            .is_some_and(|f| f == "IPv6");
        let free = cluster
            .address_pools
            .iter()
            .filter(|p| p.addr().is_ipv6() == v6)
            .find_map(|p| {
                // Not the network address (IPv6's subnet-router anycast; IPv4 skips it anyway).
                p.hosts().find(|ip| *ip != p.network() && !used.contains(ip))
            });
        let name = (
            svc.metadata.namespace.clone().unwrap_or_default(),
            svc.metadata.name.clone().unwrap_or_default(),
        );
        match free {
            Some(ip) => {
                used.insert(ip);
                out.insert(name, ip);
            }
            None => problems.push(Problem {
                kind: "Service",
                namespace: Some(name.0),
                name: name.1,
                message: format!(
                    "no free IPv{} address in address_pools of cluster {}",
                    if v6 { 6 } else { 4 },
                    cluster.name
                ),
            }),
        }
    }
    (out, problems)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClusterAccess, DEFAULT_LOAD_BALANCER_CLASS};
    use serde_json::json;

    fn service(ns: &str, name: &str, families: &[&str], ingress: Option<&str>) -> Arc<Service> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"type": "LoadBalancer", "loadBalancerClass": DEFAULT_LOAD_BALANCER_CLASS,
                         "ipFamilies": families, "ports": [{"port": 80}]},
                "status": {"loadBalancer": {"ingress": ingress.map(|ip| vec![json!({"ip": ip})]).unwrap_or_default()}},
            }))
            .unwrap(),
        )
    }

    #[test]
    fn first_free_address_of_the_family_in_name_order() {
        let cluster = Cluster {
            address_pools: vec![
                "10.100.0.0/30".parse().unwrap(),
                "fd00:100::/126".parse().unwrap(),
            ],
            ..Cluster::new(
                1,
                "c",
                ClusterAccess::Kubeconfig {
                    path: "/dev/null".into(),
                    context: None,
                },
            )
        };
        let services = vec![
            service("b", "late", &["IPv4"], None),
            service("a", "has-one", &["IPv4"], Some("10.100.0.1")),
            service("a", "early", &[], None),
            service("a", "six", &["IPv6", "IPv4"], None),
            service("c", "no-room", &["IPv4"], None),
        ];
        let (got, problems) = allocate(&cluster, &services);
        let got: Vec<(String, String)> = got
            .into_iter()
            .map(|((ns, n), ip)| (format!("{ns}/{n}"), ip.to_string()))
            .collect();
        assert_eq!(
            got,
            [
                ("a/early".to_string(), "10.100.0.2".to_string()),
                ("a/six".into(), "fd00:100::1".into()),
            ],
            "the /30's hosts are .1 (taken) and .2"
        );
        let names: Vec<&str> = problems.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["late", "no-room"]);
    }
}
