//! Diffs the desired services against what is programmed and emits the map operations that
//! get from one to the other, in an order that never exposes a half-made service:
//! backends before the Maglev table that names them, the table before the VIP entry that uses
//! it, and on removal the VIP entry first. Pure: the map writer ([`super::maps`]) executes the
//! operations.

use super::maglev;
use crate::model::{BackendState, Encapsulation, Service, ServiceKey};
use gatewayd_common::maps;
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

/// Parameters of the balancing that are the same for every service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LbParams {
    pub table_size: u32,
    pub seed: u64,
    pub max_services: u32,
    pub max_backends: u32,
}

/// One change to the LB maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LbOp {
    ResetServiceStats {
        service_id: u32,
    },
    ResetBackendStats {
        backend_id: u32,
    },
    PutBackend {
        backend_id: u32,
        value: maps::BackendEntry,
    },
    /// Replace the service's Maglev table with a fresh inner map (one atomic swap). The
    /// operation carries what the table is built from, not the table: the map writer builds
    /// tables just before writing them, in parallel and a batch at a time, so a plan for
    /// thousands of services never holds all their tables at once.
    PutMaglev {
        service_id: u32,
        table: TableInput,
    },
    PutSourceRange {
        service_id: u32,
        range: IpNet,
    },
    PutService {
        key: maps::VipKey,
        value: maps::ServiceEntry,
    },
    DeleteService {
        key: maps::VipKey,
    },
    DeleteSourceRange {
        service_id: u32,
        range: IpNet,
    },
    DeleteMaglev {
        service_id: u32,
    },
    DeleteBackend {
        backend_id: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgrammedBackend {
    pub backend_id: u32,
    pub weight: u32,
    pub state: BackendState,
}

/// What the Maglev table of a service is built from; equal inputs give equal tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableInput {
    pub table_size: u32,
    pub seed: u64,
    /// The active backends: address, weight and backend id.
    pub members: Vec<(IpAddr, u32, u32)>,
}

impl TableInput {
    /// The Maglev table as backend ids; empty when no backend is active.
    pub fn build(&self) -> Vec<u32> {
        self.with_backends(|backends| {
            maglev::build_table(backends, self.table_size, self.seed)
                .into_iter()
                .map(|i| self.members[i as usize].2)
                .collect()
        })
    }

    /// Slots per backend id in the table [`build`](Self::build) makes, without building it.
    pub fn slots(&self) -> BTreeMap<u32, u32> {
        self.with_backends(|backends| {
            let counts = maglev::slot_counts(backends, self.table_size);
            self.members
                .iter()
                .zip(counts)
                .filter(|(_, n)| *n > 0)
                .map(|((_, _, id), n)| (*id, n))
                .collect()
        })
    }

    fn with_backends<T>(&self, f: impl FnOnce(&[maglev::MaglevBackend<'_>]) -> T) -> T {
        // The hash input is the backend's address as text: the same on every gateway,
        // whatever local ids they allocated.
        let keys: Vec<String> = self.members.iter().map(|(addr, _, _)| addr.to_string()).collect();
        let backends: Vec<maglev::MaglevBackend<'_>> = keys
            .iter()
            .zip(&self.members)
            .map(|(k, (_, weight, _))| maglev::MaglevBackend {
                key: k.as_bytes(),
                weight: *weight,
            })
            .collect();
        f(&backends)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgrammedService {
    pub name: String,
    pub service_id: u32,
    pub value: maps::ServiceEntry,
    pub backends: BTreeMap<IpAddr, ProgrammedBackend>,
    pub source_ranges: BTreeSet<IpNet>,
    /// `None` when recovered from the maps of a previous daemon: rebuilt on the first apply
    /// (the rebuild is deterministic, so established flows keep their backends).
    pub table: Option<TableInput>,
    /// The desired service this entry was planned from (`None` when recovered): an equal
    /// one, with the same parameters, is kept as it is without looking further.
    pub planned_from: Option<Arc<Service>>,
}

impl ProgrammedService {
    fn serves(&self, service: &Arc<Service>, params: &LbParams) -> bool {
        // `Arc`'s equality compares pointers first: a service shared from the source costs
        // no deeper look.
        self.planned_from.as_ref() == Some(service)
            && self
                .table
                .as_ref()
                .is_some_and(|t| t.table_size == params.table_size && t.seed == params.seed)
    }
}

/// The LB state as programmed in the maps. Entries are shared with the next plan's state
/// when their service did not change: with thousands of services, a change to a few must not
/// cost a copy of all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Programmed {
    pub services: BTreeMap<ServiceKey, Arc<ProgrammedService>>,
}

/// What [`Programmed::plan`] decided: the operations, in the order they must run, and the state
/// the maps hold once they ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePlan {
    pub ops: Vec<LbOp>,
    pub next: Programmed,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("{needed} services exceed lb.max_services = {max}")]
    TooManyServices { needed: usize, max: u32 },
    #[error("{needed} backends exceed lb.max_backends = {max}")]
    TooManyBackends { needed: usize, max: u32 },
}

pub fn vip_key(key: &ServiceKey) -> maps::VipKey {
    let (addr, family) = maps::addr_bytes(key.vip);
    maps::VipKey {
        addr,
        port: key.port.to_be(),
        proto: key.protocol.number(),
        family,
    }
}

fn service_value(service: &Service, service_id: u32) -> maps::ServiceEntry {
    let mut flags = 0;
    if !service.source_ranges.is_empty() {
        flags |= maps::SVC_F_SOURCE_RANGES;
    }
    if service.affinity_timeout.is_some() {
        flags |= maps::SVC_F_AFFINITY;
    }
    let (encap, gue_port) = match service.encapsulation {
        Encapsulation::Ipip => (maps::ENCAP_IPIP, 0),
        Encapsulation::Gue { port } => (maps::ENCAP_GUE, port.to_be()),
    };
    maps::ServiceEntry {
        service_id,
        flags,
        affinity_timeout_s: service.affinity_timeout.unwrap_or(0),
        encap,
        pad: 0,
        gue_port,
    }
}

fn state_code(state: BackendState) -> u8 {
    match state {
        BackendState::Active => maps::BACKEND_ACTIVE,
        BackendState::Terminating => maps::BACKEND_TERMINATING,
        BackendState::Maintenance => maps::BACKEND_MAINTENANCE,
    }
}

/// Lowest ids from 1 that are not in use, marking each one used as it is handed out. An id
/// of `max` or more means the space is full.
struct IdAllocator {
    /// One bit per id below `max`.
    used: Vec<u64>,
    next: u32,
}

impl IdAllocator {
    fn new(used: impl Iterator<Item = u32>, max: u32) -> Self {
        let mut bits = vec![0u64; (max as usize).div_ceil(64)];
        for id in used.filter(|id| *id < max) {
            bits[id as usize / 64] |= 1 << (id % 64);
        }
        IdAllocator { used: bits, next: 1 }
    }

    fn take(&mut self) -> u32 {
        loop {
            let id = self.next;
            let Some(word) = self.used.get_mut(id as usize / 64) else {
                return id;
            };
            self.next += 1;
            if *word & (1 << (id % 64)) == 0 {
                *word |= 1 << (id % 64);
                return id;
            }
        }
    }
}

impl Programmed {
    /// Computes the operations that make the maps serve `desired`, and the state after them.
    /// Capacity is checked first, so an oversized change touches nothing.
    pub fn plan(
        &self,
        desired: &BTreeMap<ServiceKey, Arc<Service>>,
        params: &LbParams,
    ) -> Result<ServicePlan, PlanError> {
        // Ids stay taken until the plan is applied, so a freed id is never reused by the same
        // plan (a flow pinned to it could otherwise land on an unrelated backend).
        let mut service_ids =
            IdAllocator::new(self.services.values().map(|s| s.service_id), params.max_services);
        let mut backend_ids = IdAllocator::new(
            self.services
                .values()
                .flat_map(|s| s.backends.values().map(|b| b.backend_id)),
            params.max_backends,
        );
        let backends_needed: usize = desired.values().map(|s| s.backends.len()).sum();
        // Ids run from 1 and index arrays of max entries, so id max-1 is the highest usable.
        let id_limit = |max: u32| max.saturating_sub(1) as usize;
        if desired.len() > id_limit(params.max_services) {
            return Err(PlanError::TooManyServices {
                needed: desired.len(),
                max: params.max_services,
            });
        }
        if backends_needed > id_limit(params.max_backends) {
            return Err(PlanError::TooManyBackends {
                needed: backends_needed,
                max: params.max_backends,
            });
        }

        // Operations by phase, one kind per phase. Every service's own order holds (stats and
        // backends, then its table, then its VIP; stale entries last), and all operations of
        // a kind are adjacent, so the map writer writes each phase with one batched call:
        // a call per entry costs microseconds, and a Maglev swap or delete waits for an RCU
        // grace period each.
        let mut vip_deletes = Vec::new();
        let mut table_deletes = Vec::new();
        let mut service_resets = Vec::new();
        let mut backend_resets = Vec::new();
        let mut backend_puts = Vec::new();
        let mut tables = Vec::new();
        let mut range_puts = Vec::new();
        let mut vips = Vec::new();
        let mut range_deletes = Vec::new();
        let mut backend_deletes = Vec::new();
        let mut next = Programmed::default();

        for (key, old) in &self.services {
            if !desired.contains_key(key) {
                vip_deletes.push(LbOp::DeleteService { key: vip_key(key) });
                table_deletes.push(LbOp::DeleteMaglev {
                    service_id: old.service_id,
                });
                for range in &old.source_ranges {
                    range_deletes.push(LbOp::DeleteSourceRange {
                        service_id: old.service_id,
                        range: *range,
                    });
                }
                for b in old.backends.values() {
                    backend_deletes.push(LbOp::DeleteBackend {
                        backend_id: b.backend_id,
                    });
                }
            }
        }

        for (key, service) in desired {
            let old = self.services.get(key);
            if let Some(unchanged) = old.filter(|o| o.serves(service, params)) {
                next.services.insert(*key, unchanged.clone());
                continue;
            }
            let service_id = match old {
                Some(o) => o.service_id,
                None => {
                    let id = service_ids.take();
                    if id >= params.max_services {
                        return Err(PlanError::TooManyServices {
                            needed: desired.len(),
                            max: params.max_services,
                        });
                    }
                    service_resets.push(LbOp::ResetServiceStats { service_id: id });
                    id
                }
            };
            let mut backends = BTreeMap::new();
            for b in &service.backends {
                let old_b = old.and_then(|o| o.backends.get(&b.address));
                let backend_id = match old_b {
                    Some(ob) => ob.backend_id,
                    None => {
                        let id = backend_ids.take();
                        if id >= params.max_backends {
                            return Err(PlanError::TooManyBackends {
                                needed: backends_needed,
                                max: params.max_backends,
                            });
                        }
                        backend_resets.push(LbOp::ResetBackendStats { backend_id: id });
                        id
                    }
                };
                if old_b.map(|ob| ob.state) != Some(b.state) {
                    let (addr, family) = maps::addr_bytes(b.address);
                    backend_puts.push(LbOp::PutBackend {
                        backend_id,
                        value: maps::BackendEntry {
                            addr,
                            family,
                            state: state_code(b.state),
                            port: key.port.to_be(),
                            service_id,
                        },
                    });
                }
                backends.insert(
                    b.address,
                    ProgrammedBackend {
                        backend_id,
                        weight: b.weight,
                        state: b.state,
                    },
                );
            }
            if let Some(o) = old {
                for (addr, ob) in &o.backends {
                    if !backends.contains_key(addr) {
                        backend_deletes.push(LbOp::DeleteBackend {
                            backend_id: ob.backend_id,
                        });
                    }
                }
            }

            // Only active backends take new flows; the table is rebuilt when that set changes.
            let members: Vec<(IpAddr, u32, u32)> = service
                .backends
                .iter()
                .filter(|b| b.state == BackendState::Active)
                .map(|b| (b.address, b.weight, backends[&b.address].backend_id))
                .collect();
            let input = TableInput {
                table_size: params.table_size,
                seed: params.seed,
                members,
            };
            if old.and_then(|o| o.table.as_ref()) != Some(&input) {
                tables.push(LbOp::PutMaglev {
                    service_id,
                    table: input.clone(),
                });
            }

            let ranges: BTreeSet<IpNet> = service.source_ranges.iter().copied().collect();
            let old_ranges = old.map(|o| o.source_ranges.clone()).unwrap_or_default();
            for range in ranges.difference(&old_ranges) {
                range_puts.push(LbOp::PutSourceRange {
                    service_id,
                    range: *range,
                });
            }
            let value = service_value(service, service_id);
            if old.map(|o| o.value) != Some(value) {
                vips.push(LbOp::PutService {
                    key: vip_key(key),
                    value,
                });
            }
            for range in old_ranges.difference(&ranges) {
                range_deletes.push(LbOp::DeleteSourceRange {
                    service_id,
                    range: *range,
                });
            }

            next.services.insert(
                *key,
                Arc::new(ProgrammedService {
                    name: service.name.clone(),
                    service_id,
                    value,
                    backends,
                    source_ranges: ranges,
                    table: Some(input),
                    planned_from: Some(service.clone()),
                }),
            );
        }
        // Removed services go first: their VIPs stop before anything else changes.
        let ops = [
            vip_deletes,
            table_deletes,
            service_resets,
            backend_resets,
            backend_puts,
            tables,
            range_puts,
            vips,
            range_deletes,
            backend_deletes,
        ];
        Ok(ServicePlan {
            ops: ops.into_iter().flatten().collect(),
            next,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Backend, Protocol};

    const PARAMS: LbParams = LbParams {
        table_size: 251,
        seed: 7,
        max_services: 64,
        max_backends: 64,
    };

    fn service(name: &str, vip: &str, backends: &[(&str, BackendState)]) -> Service {
        Service {
            name: name.into(),
            key: ServiceKey {
                vip: vip.parse().unwrap(),
                port: 80,
                protocol: Protocol::Tcp,
            },
            source_ranges: vec![],
            affinity_timeout: None,
            encapsulation: Encapsulation::Ipip,
            backends: backends
                .iter()
                .map(|(a, s)| Backend {
                    address: a.parse().unwrap(),
                    weight: 100,
                    state: *s,
                })
                .collect(),
        }
    }

    fn desired(services: Vec<Service>) -> BTreeMap<ServiceKey, Arc<Service>> {
        services.into_iter().map(|s| (s.key, Arc::new(s))).collect()
    }

    use BackendState::*;

    #[test]
    fn new_service_is_built_backends_first_vip_last() {
        let d = desired(vec![service(
            "web",
            "10.0.0.1",
            &[("10.1.0.1", Active), ("10.1.0.2", Active)],
        )]);
        let ServicePlan { ops, next } = Programmed::default().plan(&d, &PARAMS).unwrap();
        let kinds: Vec<&str> = ops
            .iter()
            .map(|op| match op {
                LbOp::ResetServiceStats { .. } => "reset-svc",
                LbOp::ResetBackendStats { .. } => "reset-be",
                LbOp::PutBackend { .. } => "backend",
                LbOp::PutMaglev { .. } => "maglev",
                LbOp::PutService { .. } => "service",
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "reset-svc",
                "reset-be",
                "reset-be",
                "backend",
                "backend",
                "maglev",
                "service"
            ]
        );
        let s = next.services.values().next().unwrap();
        assert_eq!(s.service_id, 1);
        let LbOp::PutMaglev { table: input, .. } = &ops[5] else {
            panic!()
        };
        let table = input.build();
        assert_eq!(table.len(), 251);
        assert!(table.iter().all(|id| *id == 1 || *id == 2));
        let slots = input.slots();
        assert_eq!(slots.values().sum::<u32>(), 251);
        for (id, n) in slots {
            assert_eq!(table.iter().filter(|t| **t == id).count() as u32, n);
        }
    }

    #[test]
    fn several_services_keep_their_order_and_tables_are_adjacent() {
        let d = desired(vec![
            service("a", "10.0.0.1", &[("10.1.0.1", Active)]),
            service("b", "10.0.0.2", &[("10.2.0.1", Active)]),
        ]);
        let ServicePlan { ops, .. } = Programmed::default().plan(&d, &PARAMS).unwrap();
        let first = |f: &dyn Fn(&LbOp) -> bool| ops.iter().position(f).unwrap();
        let last = |f: &dyn Fn(&LbOp) -> bool| ops.iter().rposition(f).unwrap();
        let is_table = |o: &LbOp| matches!(o, LbOp::PutMaglev { .. });
        let is_backend = |o: &LbOp| matches!(o, LbOp::PutBackend { .. });
        let is_vip = |o: &LbOp| matches!(o, LbOp::PutService { .. });
        assert_eq!(
            last(&is_table) - first(&is_table),
            1,
            "the two swaps are adjacent: {ops:?}"
        );
        assert!(last(&is_backend) < first(&is_table) && last(&is_table) < first(&is_vip));
    }

    /// The map writer writes each run of one kind with one batched call.
    #[test]
    fn every_kind_of_operation_is_one_run() {
        let mut ranged = service("c", "10.0.0.3", &[("10.3.0.1", Active)]);
        ranged.source_ranges = vec!["192.0.2.0/24".parse().unwrap()];
        let before = desired(vec![
            service("a", "10.0.0.1", &[("10.1.0.1", Active), ("10.1.0.2", Active)]),
            service("b", "10.0.0.2", &[("10.2.0.1", Active)]),
            ranged,
        ]);
        let ServicePlan { next: p, .. } = Programmed::default().plan(&before, &PARAMS).unwrap();
        let after = desired(vec![
            service("a", "10.0.0.1", &[("10.1.0.1", Active), ("10.1.0.3", Active)]),
            service("d", "10.0.0.4", &[("10.4.0.1", Active), ("10.4.0.2", Active)]),
            service("e", "10.0.0.5", &[("10.5.0.1", Active)]),
        ]);
        let ServicePlan { ops, .. } = p.plan(&after, &PARAMS).unwrap();
        let kinds: Vec<_> = ops.iter().map(std::mem::discriminant).collect();
        let mut runs = kinds.clone();
        runs.dedup();
        let distinct: BTreeSet<String> = ops
            .iter()
            .map(|o| format!("{:?}", std::mem::discriminant(o)))
            .collect();
        assert_eq!(runs.len(), distinct.len(), "{ops:#?}");
        assert!(runs.len() >= 8, "the plan exercises most kinds: {ops:#?}");
    }

    #[test]
    fn unchanged_desired_state_plans_nothing() {
        let d = desired(vec![service("web", "10.0.0.1", &[("10.1.0.1", Active)])]);
        let ServicePlan { next: programmed, .. } = Programmed::default().plan(&d, &PARAMS).unwrap();
        let ServicePlan { ops, next: again } = programmed.plan(&d, &PARAMS).unwrap();
        assert!(ops.is_empty(), "{ops:?}");
        assert_eq!(again, programmed);
        let (old, new) = (
            programmed.services.values().next(),
            again.services.values().next(),
        );
        assert!(
            Arc::ptr_eq(old.unwrap(), new.unwrap()),
            "the entry is shared, not copied"
        );
    }

    #[test]
    fn a_new_table_size_or_seed_rebuilds_unchanged_services() {
        let d = desired(vec![service("web", "10.0.0.1", &[("10.1.0.1", Active)])]);
        let ServicePlan { next: programmed, .. } = Programmed::default().plan(&d, &PARAMS).unwrap();
        for params in [
            LbParams {
                table_size: 509,
                ..PARAMS
            },
            LbParams { seed: 8, ..PARAMS },
        ] {
            let ServicePlan { ops, .. } = programmed.plan(&d, &params).unwrap();
            let tables: Vec<_> = ops
                .iter()
                .filter_map(|o| match o {
                    LbOp::PutMaglev { table, .. } => Some((table.table_size, table.seed)),
                    _ => None,
                })
                .collect();
            assert_eq!(tables, [(params.table_size, params.seed)], "{ops:?}");
        }
    }

    #[test]
    fn changing_one_service_leaves_the_other_alone() {
        let a = service("a", "10.0.0.1", &[("10.1.0.1", Active), ("10.1.0.2", Active)]);
        let b = service("b", "10.0.0.2", &[("10.2.0.1", Active)]);
        let ServicePlan { next: programmed, .. } = Programmed::default()
            .plan(&desired(vec![a.clone(), b.clone()]), &PARAMS)
            .unwrap();
        let b_id = programmed.services[&b.key].service_id;
        let a2 = service("a", "10.0.0.1", &[("10.1.0.1", Active)]);
        let ServicePlan { ops, .. } = programmed.plan(&desired(vec![a2, b]), &PARAMS).unwrap();
        for op in &ops {
            if let LbOp::PutMaglev { service_id, .. }
            | LbOp::PutService {
                value: maps::ServiceEntry { service_id, .. },
                ..
            } = op
            {
                assert_ne!(*service_id, b_id, "{op:?}");
            }
        }
        // The removed backend is deleted after the new table stops naming it.
        let maglev = ops
            .iter()
            .position(|o| matches!(o, LbOp::PutMaglev { .. }))
            .unwrap();
        let delete = ops
            .iter()
            .position(|o| matches!(o, LbOp::DeleteBackend { .. }))
            .unwrap();
        assert!(maglev < delete);
    }

    #[test]
    fn terminating_backend_keeps_its_id_and_leaves_the_table() {
        let ServicePlan { next: p, .. } = Programmed::default()
            .plan(
                &desired(vec![service(
                    "a",
                    "10.0.0.1",
                    &[("10.1.0.1", Active), ("10.1.0.2", Active)],
                )]),
                &PARAMS,
            )
            .unwrap();
        let old_id = p.services.values().next().unwrap().backends[&"10.1.0.2".parse().unwrap()].backend_id;
        let ServicePlan { ops, next } = p
            .plan(
                &desired(vec![service(
                    "a",
                    "10.0.0.1",
                    &[("10.1.0.1", Active), ("10.1.0.2", Terminating)],
                )]),
                &PARAMS,
            )
            .unwrap();
        assert!(ops.contains(&LbOp::PutBackend {
            backend_id: old_id,
            value: maps::BackendEntry {
                addr: maps::addr_bytes("10.1.0.2".parse().unwrap()).0,
                family: maps::FAMILY_INET,
                state: maps::BACKEND_TERMINATING,
                port: 80u16.to_be(),
                service_id: 1,
            }
        }));
        let LbOp::PutMaglev { table, .. } = ops.iter().find(|o| matches!(o, LbOp::PutMaglev { .. })).unwrap()
        else {
            unreachable!()
        };
        assert!(!table.build().contains(&old_id));
        assert!(!ops.iter().any(|o| matches!(o, LbOp::DeleteBackend { .. })));
        assert_eq!(next.services.values().next().unwrap().backends.len(), 2);
    }

    #[test]
    fn removed_service_stops_at_the_vip_first_and_ids_are_not_reused_in_the_same_plan() {
        let ServicePlan { next: p, .. } = Programmed::default()
            .plan(
                &desired(vec![service("a", "10.0.0.1", &[("10.1.0.1", Active)])]),
                &PARAMS,
            )
            .unwrap();
        let ServicePlan { ops, next } = p
            .plan(
                &desired(vec![service("b", "10.0.0.2", &[("10.2.0.1", Active)])]),
                &PARAMS,
            )
            .unwrap();
        assert!(matches!(ops[0], LbOp::DeleteService { .. }));
        assert_eq!(next.services.values().next().unwrap().service_id, 2);
        assert_eq!(
            next.services
                .values()
                .next()
                .unwrap()
                .backends
                .values()
                .next()
                .unwrap()
                .backend_id,
            2
        );
    }

    #[test]
    fn source_ranges_are_added_before_the_flag_and_removed_after() {
        let mut s = service("a", "10.0.0.1", &[("10.1.0.1", Active)]);
        let ServicePlan { next: p, .. } = Programmed::default()
            .plan(&desired(vec![s.clone()]), &PARAMS)
            .unwrap();
        s.source_ranges = vec!["192.0.2.0/24".parse().unwrap()];
        let ServicePlan { ops, next: p } = p.plan(&desired(vec![s.clone()]), &PARAMS).unwrap();
        assert!(matches!(ops[0], LbOp::PutSourceRange { .. }));
        assert!(
            matches!(&ops[1], LbOp::PutService { value, .. } if value.flags & maps::SVC_F_SOURCE_RANGES != 0)
        );
        s.source_ranges = vec![];
        let ServicePlan { ops, .. } = p.plan(&desired(vec![s]), &PARAMS).unwrap();
        assert!(matches!(&ops[0], LbOp::PutService { value, .. } if value.flags == 0));
        assert!(matches!(ops[1], LbOp::DeleteSourceRange { .. }));
    }

    #[test]
    fn capacity_is_checked_before_any_operation() {
        let small = LbParams {
            max_backends: 2,
            ..PARAMS
        };
        let d = desired(vec![service(
            "a",
            "10.0.0.1",
            &[("10.1.0.1", Active), ("10.1.0.2", Active)],
        )]);
        assert_eq!(
            Programmed::default().plan(&d, &small),
            Err(PlanError::TooManyBackends { needed: 2, max: 2 })
        );
    }

    #[test]
    fn recovered_state_rebuilds_identical_tables() {
        let d = desired(vec![service(
            "a",
            "10.0.0.1",
            &[("10.1.0.1", Active), ("10.1.0.2", Active)],
        )]);
        let ServicePlan { ops, next: p } = Programmed::default().plan(&d, &PARAMS).unwrap();
        let mut recovered = p.clone();
        for s in recovered.services.values_mut() {
            let s = Arc::make_mut(s);
            s.table = None;
            s.planned_from = None;
        }
        let ServicePlan { ops: again, .. } = recovered.plan(&d, &PARAMS).unwrap();
        let table_of = |ops: &[LbOp]| {
            ops.iter().find_map(|o| match o {
                LbOp::PutMaglev { table, .. } => Some(table.build()),
                _ => None,
            })
        };
        assert_eq!(table_of(&again), table_of(&ops));
    }
}
