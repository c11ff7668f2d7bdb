//! Compiles egress policies into the two LPM tries the datapath consults for a new flow, and
//! diffs them against what is programmed.
//!
//! Selection semantics (documented in docs/egress-gateway.md):
//! 1. The destination trie gives the most specific prefix that any policy names (in its
//!    destination or excluded CIDRs) and, for it, the ordered candidate policies: those with a
//!    destination CIDR containing the prefix and no excluded CIDR containing it, most specific
//!    matching destination first, then by policy name.
//! 2. The first candidate whose source set (source CIDRs, or pod addresses as /32 and /128)
//!    contains the packet's source wins. No candidate: the packet passes untranslated.

use crate::model::EgressPolicy;
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// How many candidate policies one destination prefix can hold (the datapath's bounded loop).
pub const MAX_CANDIDATES: usize = 8;

/// A policy as the datapath sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub policy_id: u32,
    pub egress_ip: IpAddr,
}

/// Everything the egress maps hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compiled {
    /// By policy name.
    pub policies: BTreeMap<String, CompiledPolicy>,
    /// Destination prefix -> candidate policy ids in priority order (empty: excluded).
    pub destinations: BTreeMap<IpNet, Vec<u32>>,
    /// (policy id, source prefix).
    pub sources: BTreeSet<(u32, IpNet)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EgressOp {
    ResetPolicyStats { policy_id: u32 },
    PutPolicy { policy_id: u32, egress_ip: IpAddr },
    PutSource { policy_id: u32, source: IpNet },
    PutDestination { prefix: IpNet, candidates: Vec<u32> },
    DeleteDestination { prefix: IpNet },
    DeleteSource { policy_id: u32, source: IpNet },
    DeletePolicy { policy_id: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("egress policy {policy:?}: no egress_ip, and interface {interface:?} has no address")]
    NoEgressAddress { policy: String, interface: String },
    #[error("destination {prefix} is claimed by {count} policies; at most {MAX_CANDIDATES} may overlap")]
    TooManyCandidates { prefix: IpNet, count: usize },
}

/// Compiles `policies` (egress targets already resolved to addresses by `egress_ip`), keeping
/// the ids of policies that `previous` already programmed.
pub fn compile(
    policies: &[EgressPolicy],
    egress_ip: impl Fn(&EgressPolicy) -> Option<IpAddr>,
    previous: &Compiled,
) -> Result<Compiled, CompileError> {
    let mut used: BTreeSet<u32> = previous.policies.values().map(|p| p.policy_id).collect();
    let mut next_id = 1;
    let mut out = Compiled::default();
    for policy in policies {
        let ip = egress_ip(policy).ok_or_else(|| CompileError::NoEgressAddress {
            policy: policy.name.clone(),
            interface: policy.interface.clone(),
        })?;
        let policy_id = match previous.policies.get(&policy.name) {
            Some(p) => p.policy_id,
            None => {
                while used.contains(&next_id) {
                    next_id += 1;
                }
                used.insert(next_id);
                next_id
            }
        };
        out.policies.insert(
            policy.name.clone(),
            CompiledPolicy {
                policy_id,
                egress_ip: ip,
            },
        );
        for source in &policy.source_cidrs {
            out.sources.insert((policy_id, *source));
        }
    }

    let prefixes: BTreeSet<IpNet> = policies
        .iter()
        .flat_map(|p| p.destination_cidrs.iter().chain(&p.excluded_cidrs))
        .copied()
        .collect();
    for prefix in prefixes {
        let mut candidates: Vec<(u8, &str, u32)> = policies
            .iter()
            .filter(|p| !p.excluded_cidrs.iter().any(|e| e.contains(&prefix)))
            .filter_map(|p| {
                let best = p
                    .destination_cidrs
                    .iter()
                    .filter(|d| d.contains(&prefix))
                    .map(|d| d.prefix_len())
                    .max()?;
                Some((best, p.name.as_str(), out.policies[&p.name].policy_id))
            })
            .collect();
        // Most specific destination first; the name breaks ties the same way on every gateway.
        candidates.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
        if candidates.len() > MAX_CANDIDATES {
            return Err(CompileError::TooManyCandidates {
                prefix,
                count: candidates.len(),
            });
        }
        out.destinations
            .insert(prefix, candidates.into_iter().map(|c| c.2).collect());
    }
    Ok(out)
}

/// Operations that turn `old` into `new`: policies and sources before the destinations that
/// make them reachable, and on removal destinations first.
pub fn diff(old: &Compiled, new: &Compiled) -> Vec<EgressOp> {
    let mut ops = Vec::new();
    for (name, p) in &new.policies {
        match old.policies.get(name) {
            Some(o) if o == p => {}
            Some(_) => ops.push(EgressOp::PutPolicy {
                policy_id: p.policy_id,
                egress_ip: p.egress_ip,
            }),
            None => {
                ops.push(EgressOp::ResetPolicyStats {
                    policy_id: p.policy_id,
                });
                ops.push(EgressOp::PutPolicy {
                    policy_id: p.policy_id,
                    egress_ip: p.egress_ip,
                });
            }
        }
    }
    for (policy_id, source) in new.sources.difference(&old.sources) {
        ops.push(EgressOp::PutSource {
            policy_id: *policy_id,
            source: *source,
        });
    }
    for (prefix, candidates) in &new.destinations {
        if old.destinations.get(prefix) != Some(candidates) {
            ops.push(EgressOp::PutDestination {
                prefix: *prefix,
                candidates: candidates.clone(),
            });
        }
    }
    for prefix in old
        .destinations
        .keys()
        .filter(|p| !new.destinations.contains_key(p))
    {
        ops.push(EgressOp::DeleteDestination { prefix: *prefix });
    }
    for (policy_id, source) in old.sources.difference(&new.sources) {
        ops.push(EgressOp::DeleteSource {
            policy_id: *policy_id,
            source: *source,
        });
    }
    let live: BTreeSet<u32> = new.policies.values().map(|p| p.policy_id).collect();
    for p in old.policies.values().filter(|p| !live.contains(&p.policy_id)) {
        ops.push(EgressOp::DeletePolicy {
            policy_id: p.policy_id,
        });
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(name: &str, sources: &[&str], dsts: &[&str], excluded: &[&str], ip: &str) -> EgressPolicy {
        let nets = |v: &[&str]| v.iter().map(|s| s.parse().unwrap()).collect();
        EgressPolicy {
            name: name.into(),
            source_cidrs: nets(sources),
            destination_cidrs: nets(dsts),
            excluded_cidrs: nets(excluded),
            interface: "eth1".into(),
            egress_ip: Some(ip.parse().unwrap()),
        }
    }

    fn resolve(p: &EgressPolicy) -> Option<IpAddr> {
        p.egress_ip
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn most_specific_destination_first_then_name() {
        let policies = [
            policy("wide", &["10.244.0.0/16"], &["203.0.113.0/24"], &[], "192.0.2.1"),
            policy(
                "narrow",
                &["10.244.1.0/24"],
                &["203.0.113.128/25"],
                &[],
                "192.0.2.2",
            ),
            policy(
                "also-wide",
                &["10.244.2.0/24"],
                &["203.0.113.0/24"],
                &[],
                "192.0.2.3",
            ),
        ];
        let c = compile(&policies, resolve, &Compiled::default()).unwrap();
        let id = |n: &str| c.policies[n].policy_id;
        assert_eq!(
            c.destinations[&net("203.0.113.0/24")],
            vec![id("also-wide"), id("wide")]
        );
        assert_eq!(
            c.destinations[&net("203.0.113.128/25")],
            vec![id("narrow"), id("also-wide"), id("wide")]
        );
    }

    #[test]
    fn excluded_prefix_gets_an_entry_without_the_policy() {
        let policies = [policy(
            "p",
            &["10.244.0.0/16"],
            &["0.0.0.0/0"],
            &["10.0.0.0/8"],
            "192.0.2.1",
        )];
        let c = compile(&policies, resolve, &Compiled::default()).unwrap();
        assert_eq!(c.destinations[&net("10.0.0.0/8")], Vec::<u32>::new());
        assert_eq!(c.destinations[&net("0.0.0.0/0")], vec![1]);
    }

    #[test]
    fn ids_survive_recompilation_and_removal_goes_destinations_first() {
        let a = policy("a", &["10.244.0.0/16"], &["203.0.113.0/24"], &[], "192.0.2.1");
        let b = policy("b", &["10.245.0.0/16"], &["198.51.100.0/24"], &[], "192.0.2.2");
        let first = compile(&[a.clone(), b.clone()], resolve, &Compiled::default()).unwrap();
        let second = compile(std::slice::from_ref(&b), resolve, &first).unwrap();
        assert_eq!(second.policies["b"].policy_id, first.policies["b"].policy_id);
        let ops = diff(&first, &second);
        assert_eq!(
            ops,
            vec![
                EgressOp::DeleteDestination {
                    prefix: net("203.0.113.0/24")
                },
                EgressOp::DeleteSource {
                    policy_id: 1,
                    source: net("10.244.0.0/16")
                },
                EgressOp::DeletePolicy { policy_id: 1 },
            ]
        );
        // A new policy does not reuse the id that was just freed in the same compile.
        let third = compile(
            &[b, policy("c", &[], &["192.0.2.0/24"], &[], "192.0.2.9")],
            resolve,
            &first,
        )
        .unwrap();
        assert_eq!(third.policies["c"].policy_id, 3);
    }

    #[test]
    fn unchanged_policies_need_no_operations() {
        let p = [policy(
            "a",
            &["10.244.0.0/16"],
            &["203.0.113.0/24"],
            &[],
            "192.0.2.1",
        )];
        let c = compile(&p, resolve, &Compiled::default()).unwrap();
        assert!(diff(&c, &compile(&p, resolve, &c).unwrap()).is_empty());
        let ops = diff(&Compiled::default(), &c);
        assert!(matches!(ops[0], EgressOp::ResetPolicyStats { .. }));
        assert!(matches!(ops.last(), Some(EgressOp::PutDestination { .. })));
    }

    #[test]
    fn too_many_overlapping_policies_is_an_error() {
        let policies: Vec<_> = (0..9)
            .map(|i| policy(&format!("p{i}"), &[], &["203.0.113.0/24"], &[], "192.0.2.1"))
            .collect();
        assert!(matches!(
            compile(&policies, resolve, &Compiled::default()),
            Err(CompileError::TooManyCandidates { .. })
        ));
    }
}
