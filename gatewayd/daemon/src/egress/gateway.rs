//! The egress gateway at run time: policies compiled and written to the maps under the
//! reconcile contract, NAT entries expired, and what `gatewayctl egress list` / `nat list` and
//! the metrics show. (The egress addresses themselves are assigned by `host::addresses`.)

use super::maps::EgressMaps;
use super::plan::{self, Compiled, EgressOp};
use crate::config::{EgressSettings, Settings};
use crate::datapath::objects::{RNAT_PROGRAM, SNAT_PROGRAM};
use crate::datapath::{monotonic_ns, Attachment, Datapath, Hook};
use crate::host::interface_address;
use crate::metrics::PolicyLabels;
use crate::model::{DesiredState, EgressPolicy};
use crate::reconcile::Reconcile;
use crate::state_file;
use anyhow::Result;
use gatewayd_common::api;
use gatewayd_common::maps::{addr_from_bytes, FlowKey, NatEntry, IPPROTO_TCP, IPPROTO_UDP};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use tracing::{info, warn};

/// The egress gateway component: its maps, what is programmed in them, and the policies whose
/// NAT entries must go.
pub struct EgressGateway {
    maps: EgressMaps,
    programmed: Compiled,
    /// Policy name -> id, so a restarted daemon keeps ids (NAT entries and counters refer to
    /// them). The maps cannot hold names.
    state_file: PathBuf,
    /// Policies whose NAT entries the next collection deletes (removed, or new egress address).
    dead: Vec<u32>,
}

/// The SNAT address of a policy: its egress_ip, or its interface's first address of the
/// family its destinations have.
fn egress_ip(p: &EgressPolicy) -> Option<IpAddr> {
    let v6 = p.destination_cidrs.first().is_some_and(|d| d.addr().is_ipv6());
    p.egress_ip.or_else(|| interface_address(&p.interface, v6))
}

/// What [`EgressGateway`] writes for a change: the settings, the compiled policies and the
/// operations that get the maps there.
#[derive(Debug)]
pub struct EgressPlan {
    settings: EgressSettings,
    compiled: Compiled,
    ops: Vec<EgressOp>,
}

impl EgressGateway {
    /// Takes the egress maps from the loaded datapath, and what a previous daemon programmed
    /// (policy ids from the state file).
    pub fn open(datapath: &mut Datapath, settings: &Settings) -> Result<Self> {
        let maps = EgressMaps::new(datapath.egress_ebpf_mut(), settings.egress.nat_table_size)?;
        let state_file = settings.state_dir.join("egress-policy-ids.json");
        let names: BTreeMap<String, u32> = state_file::load(&state_file)?;
        let programmed = maps.recover(&names)?;
        if !programmed.policies.is_empty() {
            info!(
                policies = programmed.policies.len(),
                "adopted egress policies programmed by a previous daemon"
            );
        }
        Ok(EgressGateway {
            maps,
            programmed,
            state_file,
            dead: Vec::new(),
        })
    }

    /// SNAT at egress and reverse NAT at ingress of every interface a policy leaves by.
    pub fn attachments(policies: &[EgressPolicy]) -> Vec<Attachment> {
        let interfaces: BTreeSet<&String> = policies.iter().map(|p| &p.interface).collect();
        interfaces
            .into_iter()
            .flat_map(|i| {
                [
                    Attachment {
                        interface: i.clone(),
                        hook: Hook::TcxEgress,
                        program: SNAT_PROGRAM,
                    },
                    Attachment {
                        interface: i.clone(),
                        hook: Hook::TcxIngress,
                        program: RNAT_PROGRAM,
                    },
                ]
            })
            .collect()
    }

    /// Deletes expired NAT entries and those of dead policies; returns the live entries left.
    pub fn collect_garbage(&mut self) -> usize {
        let dead = std::mem::take(&mut self.dead);
        let (deleted, live) = self.maps.collect_garbage(monotonic_ns(), &dead);
        if !dead.is_empty() || deleted > 0 {
            tracing::debug!(deleted, live, "NAT garbage collection");
        }
        live
    }

    /// Metric labels of every programmed policy, by id.
    pub fn metric_labels(&self) -> BTreeMap<u32, PolicyLabels> {
        self.programmed
            .policies
            .iter()
            .map(|(name, p)| {
                (
                    p.policy_id,
                    PolicyLabels {
                        policy: name.clone(),
                        egress_ip: p.egress_ip.to_string(),
                    },
                )
            })
            .collect()
    }

    pub fn nat_capacity(&self) -> u32 {
        self.maps.nat_capacity()
    }

    /// `gatewayctl egress list`: each of `policies` (those in force) as programmed, with its
    /// traffic.
    pub fn list(&self, policies: &[EgressPolicy]) -> Vec<api::EgressPolicyStatus> {
        policies
            .iter()
            .filter_map(|p| {
                let compiled = self.programmed.policies.get(&p.name)?;
                let c = self.maps.counters(compiled.policy_id).unwrap_or_else(|e| {
                    warn!(policy = p.name, "reading egress counters: {e:#}");
                    Default::default()
                });
                Some(api::EgressPolicyStatus {
                    name: p.name.clone(),
                    policy_id: compiled.policy_id,
                    egress_ip: compiled.egress_ip.to_string(),
                    interface: p.interface.clone(),
                    source_cidrs: p.source_cidrs.iter().map(|n| n.to_string()).collect(),
                    destination_cidrs: p.destination_cidrs.iter().map(|n| n.to_string()).collect(),
                    excluded_cidrs: p.excluded_cidrs.iter().map(|n| n.to_string()).collect(),
                    packets_out: c.packets_out,
                    bytes_out: c.bytes_out,
                    packets_in: c.packets_in,
                    bytes_in: c.bytes_in,
                    new_flows: c.new_flows,
                    nat_failures: c.nat_failures,
                })
            })
            .collect()
    }

    /// `gatewayctl nat list`: every live translation, by source.
    pub fn translations(&self) -> Vec<api::NatTranslation> {
        let now = monotonic_ns();
        let names: BTreeMap<u32, &String> = self
            .programmed
            .policies
            .iter()
            .map(|(n, p)| (p.policy_id, n))
            .collect();
        let mut out: Vec<api::NatTranslation> = self
            .maps
            .translations(now)
            .into_iter()
            .map(|t| {
                translation(
                    &t.key,
                    &t.entry,
                    now,
                    names.get(&t.entry.policy_id).map(|s| s.as_str()),
                )
            })
            .collect();
        out.sort_by(|a, b| (&a.source, a.source_port).cmp(&(&b.source, b.source_port)));
        out
    }
}

impl Reconcile for EgressGateway {
    type Plan = EgressPlan;

    /// Compiles the policies (their egress addresses resolved) and diffs them against the
    /// maps: an error here rejects the change.
    async fn plan(&self, desired: &DesiredState, settings: &Settings) -> Result<EgressPlan> {
        let compiled = plan::compile(&desired.egress_policies, egress_ip, &self.programmed)?;
        let ops = plan::diff(&self.programmed, &compiled);
        Ok(EgressPlan {
            settings: settings.egress.clone(),
            compiled,
            ops,
        })
    }

    async fn apply(&mut self, plan: EgressPlan) -> Result<()> {
        let EgressPlan {
            settings,
            compiled,
            ops,
        } = plan;
        self.maps.set_settings(&settings)?;
        if let Err(e) = self.maps.apply(&ops) {
            let names = self
                .programmed
                .policies
                .iter()
                .map(|(n, p)| (n.clone(), p.policy_id))
                .collect();
            self.programmed = self.maps.recover(&names).unwrap_or_default();
            return Err(e);
        }
        // Flows of a removed policy, or of one whose address changed, must not keep translating.
        for (name, old) in &self.programmed.policies {
            if compiled
                .policies
                .get(name)
                .is_none_or(|new| new.egress_ip != old.egress_ip)
            {
                self.dead.push(old.policy_id);
            }
        }
        if !ops.is_empty() {
            info!(
                operations = ops.len(),
                policies = compiled.policies.len(),
                "egress maps updated"
            );
        }
        self.programmed = compiled;
        let names: BTreeMap<&String, u32> = self
            .programmed
            .policies
            .iter()
            .map(|(n, p)| (n, p.policy_id))
            .collect();
        state_file::save(&self.state_file, &names)?;
        Ok(())
    }
}

fn translation(k: &FlowKey, e: &NatEntry, now: u64, policy: Option<&str>) -> api::NatTranslation {
    let ip = |a: &[u8; 16]| {
        addr_from_bytes(a, k.family)
            .map(|ip| ip.to_string())
            .unwrap_or_default()
    };
    let secs = |ns: u64| ns / 1_000_000_000;
    api::NatTranslation {
        protocol: match k.proto {
            IPPROTO_TCP => "tcp".into(),
            IPPROTO_UDP => "udp".into(),
            1 | 58 => "icmp".into(),
            p => p.to_string(),
        },
        source: ip(&k.src),
        source_port: u16::from_be(k.sport),
        destination: ip(&k.dst),
        destination_port: u16::from_be(k.dport),
        egress_ip: ip(&e.addr),
        egress_port: u16::from_be(e.port),
        state: match e.state {
            gatewayd_common::maps::NAT_TCP_SYN_SENT => "syn-sent",
            gatewayd_common::maps::NAT_TCP_ESTABLISHED => "established",
            gatewayd_common::maps::NAT_TCP_CLOSING => "closing",
            _ => "open",
        }
        .into(),
        policy: policy.unwrap_or_default().into(),
        age_seconds: secs(now.saturating_sub(e.created_ns)),
        expires_in_seconds: secs(e.expires_ns.saturating_sub(now)),
    }
}
