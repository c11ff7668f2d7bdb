//! The egress gateway's maps: executing policy operations, recovering what a previous daemon
//! programmed, expiring NAT entries, and reading counters and translations.

use super::plan::{Compiled, CompiledPolicy, EgressOp};
use crate::config::EgressSettings;
use crate::datapath::ignore_missing;
use crate::datapath::loader::take_map;
use anyhow::{Context, Result};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues};
use aya::Ebpf;
use gatewayd_common::map_names;
use gatewayd_common::maps::*;
use ipnet::IpNet;
use std::collections::BTreeMap;

pub struct EgressMaps {
    destinations: LpmTrie<MapData, EgressDstData, EgressDst>,
    sources: LpmTrie<MapData, EgressSrcData, u8>,
    policies: Array<MapData, EgressPolicyEntry>,
    addresses: HashMap<MapData, EgressAddrKey, u8>,
    settings: Array<MapData, EgressSettingsEntry>,
    stats: PerCpuArray<MapData, EgressCounters>,
    nat: HashMap<MapData, FlowKey, NatEntry>,
    nat_capacity: u32,
}

/// One live translation, for `gatewayctl nat list`.
#[derive(Debug, Clone)]
pub struct Translation {
    pub key: FlowKey,
    pub entry: NatEntry,
}

impl EgressMaps {
    pub fn new(ebpf: &mut Ebpf, nat_capacity: u32) -> Result<Self> {
        Ok(EgressMaps {
            destinations: take_map(ebpf, map_names::EGRESS_DESTINATIONS)?,
            sources: take_map(ebpf, map_names::EGRESS_SOURCES)?,
            policies: take_map(ebpf, map_names::EGRESS_POLICIES)?,
            addresses: take_map(ebpf, map_names::EGRESS_ADDRESSES)?,
            settings: take_map(ebpf, map_names::EGRESS_SETTINGS)?,
            stats: take_map(ebpf, map_names::EGRESS_STATS)?,
            nat: take_map(ebpf, map_names::NAT)?,
            nat_capacity,
        })
    }

    pub fn set_settings(&mut self, s: &EgressSettings) -> Result<()> {
        let value = EgressSettingsEntry {
            tcp_established_s: s.tcp_established_timeout,
            tcp_closing_s: s.tcp_closing_timeout,
            tcp_syn_s: s.tcp_syn_timeout,
            udp_s: s.udp_timeout,
            icmp_s: s.icmp_timeout,
            port_min: s.port_min,
            port_max: s.port_max,
        };
        self.settings.set(0, value, 0)?;
        Ok(())
    }

    pub fn apply(&mut self, ops: &[EgressOp]) -> Result<()> {
        for op in ops {
            self.apply_one(op).with_context(|| format!("applying {op:?}"))?;
        }
        Ok(())
    }

    fn apply_one(&mut self, op: &EgressOp) -> Result<()> {
        match op {
            EgressOp::ResetPolicyStats { policy_id } => {
                let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
                self.stats.set(
                    *policy_id,
                    PerCpuValues::try_from(vec![EgressCounters::default(); cpus])?,
                    0,
                )?;
            }
            EgressOp::PutPolicy { policy_id, egress_ip } => {
                let (egress_addr, family) = addr_bytes(*egress_ip);
                self.policies.set(
                    *policy_id,
                    EgressPolicyEntry {
                        egress_addr,
                        family,
                        pad: [0; 3],
                    },
                    0,
                )?;
                self.addresses.insert(
                    EgressAddrKey {
                        addr: egress_addr,
                        family,
                        pad: [0; 3],
                    },
                    1,
                    0,
                )?;
            }
            EgressOp::PutSource { policy_id, source } => {
                self.sources.insert(&source_key(*policy_id, source), 1, 0)?
            }
            EgressOp::PutDestination { prefix, candidates } => {
                let mut value = EgressDst {
                    count: candidates.len() as u32,
                    ..Default::default()
                };
                value.policy_ids[..candidates.len()].copy_from_slice(candidates);
                self.destinations.insert(&destination_key(prefix), value, 0)?;
            }
            EgressOp::DeleteDestination { prefix } => {
                ignore_missing(self.destinations.remove(&destination_key(prefix)))?
            }
            EgressOp::DeleteSource { policy_id, source } => {
                ignore_missing(self.sources.remove(&source_key(*policy_id, source)))?
            }
            EgressOp::DeletePolicy { policy_id } => {
                let old = self.policies.get(policy_id, 0)?;
                self.policies.set(*policy_id, EgressPolicyEntry::default(), 0)?;
                let still_used = (1..self.policies.len())
                    .filter_map(|id| self.policies.get(&id, 0).ok())
                    .any(|p| p.family == old.family && p.egress_addr == old.egress_addr);
                if !still_used {
                    let key = EgressAddrKey {
                        addr: old.egress_addr,
                        family: old.family,
                        pad: [0; 3],
                    };
                    ignore_missing(self.addresses.remove(&key))?;
                }
            }
        }
        Ok(())
    }

    /// What a previous daemon programmed, with policy names from `names` (the state file).
    pub fn recover(&self, names: &BTreeMap<String, u32>) -> Result<Compiled> {
        let mut out = Compiled::default();
        for (name, id) in names {
            let p = self.policies.get(id, 0)?;
            if let Some(egress_ip) = addr_from_bytes(&p.egress_addr, p.family) {
                out.policies.insert(
                    name.clone(),
                    CompiledPolicy {
                        policy_id: *id,
                        egress_ip,
                    },
                );
            }
        }
        for key in self.sources.keys() {
            let key = key?;
            let d = key.data();
            if let Some(addr) = addr_from_bytes(&d.addr, d.family) {
                if let Ok(net) = IpNet::new(addr, (key.prefix_len() - EGRESS_SRC_PREFIX_BITS) as u8) {
                    out.sources.insert((d.policy_id, net));
                }
            }
        }
        for entry in self.destinations.iter() {
            let (key, value) = entry?;
            let d = key.data();
            if let Some(addr) = addr_from_bytes(&d.addr, d.family) {
                if let Ok(net) = IpNet::new(addr, (key.prefix_len() - EGRESS_DST_PREFIX_BITS) as u8) {
                    let count = (value.count as usize).min(EGRESS_MAX_CANDIDATES);
                    out.destinations.insert(net, value.policy_ids[..count].to_vec());
                }
            }
        }
        Ok(out)
    }

    /// Deletes expired NAT entries, and every entry of the given policies (removed, or moved to
    /// another egress address). Returns (deleted, live).
    pub fn collect_garbage(&mut self, now_ns: u64, dead_policies: &[u32]) -> (usize, usize) {
        let mut doomed = Vec::new();
        let mut live = 0;
        for entry in self.nat.iter() {
            let Ok((key, e)) = entry else { continue };
            // 1 marks an entry a CPU is replacing right now: not ours to delete.
            let expired = e.expires_ns != 1 && e.expires_ns < now_ns;
            if expired || dead_policies.contains(&e.policy_id) {
                doomed.push(key);
            } else {
                live += 1;
            }
        }
        let deleted = doomed.iter().filter(|k| self.nat.remove(k).is_ok()).count();
        (deleted, live)
    }

    /// Live translations in the original direction (one per flow).
    pub fn translations(&self, now_ns: u64) -> Vec<Translation> {
        self.nat
            .iter()
            .filter_map(|e| e.ok())
            .filter(|(_, e)| e.dir == NAT_DIR_ORIGINAL && (e.expires_ns == 1 || e.expires_ns >= now_ns))
            .map(|(key, entry)| Translation { key, entry })
            .collect()
    }

    pub fn counters(&self, policy_id: u32) -> Result<EgressCounters> {
        let per_cpu = self.stats.get(&policy_id, 0)?;
        Ok(per_cpu
            .iter()
            .fold(EgressCounters::default(), |a, c| EgressCounters {
                packets_out: a.packets_out + c.packets_out,
                bytes_out: a.bytes_out + c.bytes_out,
                packets_in: a.packets_in + c.packets_in,
                bytes_in: a.bytes_in + c.bytes_in,
                new_flows: a.new_flows + c.new_flows,
                nat_failures: a.nat_failures + c.nat_failures,
            }))
    }

    pub fn nat_capacity(&self) -> u32 {
        self.nat_capacity
    }
}

fn destination_key(prefix: &IpNet) -> Key<EgressDstData> {
    let (addr, family) = addr_bytes(prefix.network());
    Key::new(
        EGRESS_DST_PREFIX_BITS + u32::from(prefix.prefix_len()),
        EgressDstData {
            family,
            pad: [0; 3],
            addr,
        },
    )
}

fn source_key(policy_id: u32, source: &IpNet) -> Key<EgressSrcData> {
    let (addr, family) = addr_bytes(source.network());
    Key::new(
        EGRESS_SRC_PREFIX_BITS + u32::from(source.prefix_len()),
        EgressSrcData {
            policy_id,
            family,
            pad: [0; 3],
            addr,
        },
    )
}
