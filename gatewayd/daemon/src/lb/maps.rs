//! The load balancer's maps: executing reconcile operations, recovering the programmed state
//! from maps a previous daemon left pinned, and reading counters.

use super::plan::{LbOp, Programmed, ProgrammedBackend, ProgrammedService, TableInput};
use crate::datapath::ignore_missing;
use crate::datapath::loader::take_map;
use crate::datapath::pins::open_pinned_map;
use crate::datapath::sys::{delete_batch, fill_u32_array, update_batch};
use crate::model::{BackendState, ServiceKey};
use anyhow::{Context, Result};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::Ebpf;
use gatewayd_common::map_names;
use gatewayd_common::maps::*;
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// BPF_F_INNER_MAP (lets Maglev tables of any prime size replace each other in `gd_maglev`)
/// and BPF_F_MMAPABLE (lets the daemon fill them with one copy): the flags of the template in
/// xdp/lb.c, which the kernel requires of every inner map.
pub const MAGLEV_TABLE_FLAGS: u32 = (1 << 12) | (1 << 10);

pub struct LbMaps {
    maps_dir: PathBuf,
    /// Opened from their pins for batched writes: aya's typed maps expose neither their fd
    /// nor batch operations.
    services: MapData,
    maglev: MapData,
    backends: MapData,
    service_stats: MapData,
    backend_stats: MapData,
    source_ranges: LpmTrie<MapData, SourceRangeData, u8>,
    settings: Array<MapData, LbSettingsEntry>,
    counters: LbCounters,
}

/// Read-only handles on the counters and the connection table, opened from their pins: the
/// control socket and each metrics scrape read through one of these without touching the
/// handles the reconciler writes with.
pub struct LbCounters {
    service_stats: PerCpuArray<MapData, TrafficCounters>,
    backend_stats: PerCpuArray<MapData, TrafficCounters>,
    reasons: PerCpuArray<MapData, ReasonCounters>,
    flows: HashMap<MapData, FlowKey, LbFlow>,
    flow_capacity: u32,
}

impl LbMaps {
    /// Opens the maps the reconciler writes (the object has pinned them under `maps_dir`).
    pub fn new(ebpf: &mut Ebpf, maps_dir: &Path) -> Result<Self> {
        let pinned = |name: &str| {
            let pin = maps_dir.join(name);
            MapData::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))
        };
        Ok(LbMaps {
            maps_dir: maps_dir.to_owned(),
            services: pinned(map_names::SERVICES)?,
            maglev: pinned(map_names::MAGLEV)?,
            backends: pinned(map_names::BACKENDS)?,
            service_stats: pinned(map_names::SERVICE_STATS)?,
            backend_stats: pinned(map_names::BACKEND_STATS)?,
            source_ranges: take_map(ebpf, map_names::SOURCE_RANGES)?,
            settings: take_map(ebpf, map_names::LB_SETTINGS)?,
            counters: LbCounters::open(maps_dir)?,
        })
    }

    pub fn counters(&self) -> &LbCounters {
        &self.counters
    }

    /// Executes a plan. The planner puts operations of one kind next to each other, and each
    /// such run is written with batched calls.
    pub fn apply(&mut self, ops: &[LbOp]) -> Result<()> {
        for run in ops.chunk_by(|a, b| std::mem::discriminant(a) == std::mem::discriminant(b)) {
            self.apply_run(run)
                .with_context(|| format!("applying {} x {:?}", run.len(), run[0]))?;
        }
        Ok(())
    }

    /// Applies operations that are all of the kind of `run[0]`.
    fn apply_run(&mut self, run: &[LbOp]) -> Result<()> {
        // The fields of every operation of the run, by the pattern of its kind.
        macro_rules! fields {
            ($pattern:pat => $out:expr) => {
                run.iter()
                    .map(|op| match op {
                        $pattern => $out,
                        other => unreachable!("{other:?} in a run of {:?}", run[0]),
                    })
                    .collect::<Vec<_>>()
            };
        }
        match &run[0] {
            LbOp::ResetServiceStats { .. } => reset(
                &self.service_stats,
                &fields!(LbOp::ResetServiceStats { service_id } => *service_id),
            )?,
            LbOp::ResetBackendStats { .. } => reset(
                &self.backend_stats,
                &fields!(LbOp::ResetBackendStats { backend_id } => *backend_id),
            )?,
            LbOp::PutBackend { .. } => {
                let (ids, values): (Vec<u32>, Vec<BackendEntry>) =
                    fields!(LbOp::PutBackend { backend_id, value } => (*backend_id, *value))
                        .into_iter()
                        .unzip();
                update_batch(self.backends.fd().as_fd(), &ids, &values)?
            }
            LbOp::DeleteBackend { .. } => {
                let ids = fields!(LbOp::DeleteBackend { backend_id } => *backend_id);
                update_batch(
                    self.backends.fd().as_fd(),
                    &ids,
                    &vec![BackendEntry::default(); ids.len()],
                )?
            }
            LbOp::PutMaglev { .. } => {
                let tables = fields!(LbOp::PutMaglev { service_id, table } => (*service_id, table));
                for batch in tables.chunks(TABLES_PER_SWAP) {
                    self.put_tables(batch)?;
                }
            }
            LbOp::DeleteMaglev { .. } => delete_batch(
                self.maglev.fd().as_fd(),
                &fields!(LbOp::DeleteMaglev { service_id } => *service_id),
            )?,
            LbOp::PutService { .. } => {
                let (keys, values): (Vec<VipKey>, Vec<ServiceEntry>) =
                    fields!(LbOp::PutService { key, value } => (*key, *value))
                        .into_iter()
                        .unzip();
                update_batch(self.services.fd().as_fd(), &keys, &values)?
            }
            LbOp::DeleteService { .. } => delete_batch(
                self.services.fd().as_fd(),
                &fields!(LbOp::DeleteService { key } => *key),
            )?,
            // Source ranges are few and change rarely: one call each.
            LbOp::PutSourceRange { .. } => {
                for (service_id, range) in
                    fields!(LbOp::PutSourceRange { service_id, range } => (*service_id, range))
                {
                    self.source_ranges.insert(&range_key(service_id, range), 1, 0)?;
                }
            }
            LbOp::DeleteSourceRange { .. } => {
                for (service_id, range) in
                    fields!(LbOp::DeleteSourceRange { service_id, range } => (*service_id, range))
                {
                    ignore_missing(self.source_ranges.remove(&range_key(service_id, range)))?;
                }
            }
        }
        Ok(())
    }

    /// Builds and fills one fresh inner map per table, then swaps them all into `gd_maglev`
    /// at once.
    fn put_tables(&mut self, tables: &[(u32, &TableInput)]) -> Result<()> {
        use std::os::fd::AsRawFd;
        let (service_ids, inputs): (Vec<u32>, Vec<&TableInput>) = tables.iter().copied().unzip();
        // The new tables stay open until the outer map holds them.
        let maps = new_tables(&inputs)?;
        let fds: Vec<u32> = maps.iter().map(|t| t.fd().as_fd().as_raw_fd() as u32).collect();
        update_batch(self.maglev.fd().as_fd(), &service_ids, &fds)
    }

    pub fn set_settings(&mut self, settings: &LbSettingsEntry) -> Result<()> {
        self.settings.set(0, settings, 0)?;
        Ok(())
    }

    /// Rebuilds the programmed state from the maps, e.g. after a restart: ids stay as the
    /// previous daemon allocated them, so established flows keep pointing at the right backends.
    pub fn recover(&self) -> Result<Programmed> {
        let services: HashMap<MapData, VipKey, ServiceEntry> =
            open_pinned_map(&self.maps_dir, map_names::SERVICES)?;
        let backends: Array<MapData, BackendEntry> = open_pinned_map(&self.maps_dir, map_names::BACKENDS)?;
        let mut by_id: BTreeMap<u32, (ServiceKey, ProgrammedService)> = BTreeMap::new();
        for entry in services.iter() {
            let (key, value) = entry?;
            let Some(service_key) = service_key(&key) else {
                continue;
            };
            by_id.insert(
                value.service_id,
                (
                    service_key,
                    ProgrammedService {
                        name: String::new(),
                        service_id: value.service_id,
                        value,
                        backends: BTreeMap::new(),
                        source_ranges: Default::default(),
                        table: None,
                        planned_from: None,
                    },
                ),
            );
        }
        for backend_id in 1..backends.len() {
            let b = backends.get(&backend_id, 0)?;
            let state = match b.state {
                BACKEND_ACTIVE => BackendState::Active,
                BACKEND_TERMINATING => BackendState::Terminating,
                BACKEND_MAINTENANCE => BackendState::Maintenance,
                _ => continue,
            };
            let (Some((_, s)), Some(addr)) =
                (by_id.get_mut(&b.service_id), addr_from_bytes(&b.addr, b.family))
            else {
                continue;
            };
            s.backends.insert(
                addr,
                ProgrammedBackend {
                    backend_id,
                    weight: 0,
                    state,
                },
            );
        }
        for key in self.source_ranges.keys() {
            let key = key?;
            let data = key.data();
            let Some((_, s)) = by_id.get_mut(&data.service_id) else {
                continue;
            };
            if let Some(addr) = addr_from_bytes(&data.addr, data.family) {
                let len = key.prefix_len() - SOURCE_RANGE_PREFIX_BITS;
                if let Ok(net) = IpNet::new(addr, len as u8) {
                    s.source_ranges.insert(net);
                }
            }
        }
        Ok(Programmed {
            services: by_id.into_values().map(|(key, s)| (key, Arc::new(s))).collect(),
        })
    }
}

impl LbCounters {
    pub fn open(maps_dir: &Path) -> Result<Self> {
        let flows_pin = maps_dir.join(map_names::LB_FLOWS);
        let flow_capacity = aya::maps::MapInfo::from_pin(&flows_pin)
            .with_context(|| format!("opening {}", flows_pin.display()))?
            .max_entries();
        Ok(LbCounters {
            service_stats: open_pinned_map(maps_dir, map_names::SERVICE_STATS)?,
            backend_stats: open_pinned_map(maps_dir, map_names::BACKEND_STATS)?,
            reasons: open_pinned_map(maps_dir, map_names::REASONS)?,
            flows: open_pinned_map(maps_dir, map_names::LB_FLOWS)?,
            flow_capacity,
        })
    }

    pub fn service_traffic(&self, service_id: u32) -> Result<TrafficCounters> {
        sum_traffic(&self.service_stats, service_id)
    }

    pub fn backend_traffic(&self, backend_id: u32) -> Result<TrafficCounters> {
        sum_traffic(&self.backend_stats, backend_id)
    }

    /// Per-reason totals over all CPUs, in `GD_REASON_*` order.
    pub fn reasons(&self) -> Result<Vec<ReasonCounters>> {
        (0..REASON_MAX)
            .map(|i| {
                let per_cpu = self.reasons.get(&i, 0)?;
                Ok(per_cpu
                    .iter()
                    .fold(ReasonCounters::default(), |acc, c| ReasonCounters {
                        packets: acc.packets + c.packets,
                        bytes: acc.bytes + c.bytes,
                    }))
            })
            .collect()
    }

    /// Live entries in the connection table (walks the table: for the CLI, not the hot path).
    pub fn flow_count(&self) -> u64 {
        self.flows.keys().filter(|k| k.is_ok()).count() as u64
    }

    pub fn flow_capacity(&self) -> u32 {
        self.flow_capacity
    }
}

/// Maglev tables swapped in with one update: each swap waits for an RCU grace period, and a
/// batch holds this many inner maps open (their memory is the kernel's, not the daemon's).
const TABLES_PER_SWAP: usize = 1024;

/// The inner maps of `inputs`, in order. Building a table of the default size takes about
/// half a millisecond, so the tables of a large plan are built on every CPU; each is dropped
/// once its map is filled, so the daemon holds one table per CPU, whatever the plan's size.
fn new_tables(inputs: &[&TableInput]) -> Result<Vec<MapData>> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    if workers == 1 || inputs.len() < 2 {
        return inputs.iter().map(|t| new_table(&t.build())).collect();
    }
    let share = inputs.len().div_ceil(workers);
    std::thread::scope(|scope| {
        let parts: Vec<_> = inputs
            .chunks(share)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|t| new_table(&t.build()))
                        .collect::<Result<Vec<_>>>()
                })
            })
            .collect();
        let mut tables = Vec::with_capacity(inputs.len());
        for part in parts {
            tables.extend(part.join().expect("a Maglev table builder panicked")?);
        }
        Ok(tables)
    })
}

/// A Maglev table as an inner map: slot 0 holds the table size, slots 1..=size the backend ids
/// (xdp/README.md). The map is mmapable and filled through a mapping of it: one copy, where
/// a batched update costs the kernel ~3 ms per table of the default size (one element at a
/// time), and 10,000 services would take half a minute.
fn new_table(table: &[u32]) -> Result<MapData> {
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let entries = table.len() + 1;
    let inner = MapData::create(
        aya_obj::Map::new_from_params(BPF_MAP_TYPE_ARRAY, 4, 4, entries as u32, MAGLEV_TABLE_FLAGS),
        map_names::MAGLEV_TABLE,
        None,
    )?;
    let values = std::iter::once(table.len() as u32).chain(table.iter().copied());
    fill_u32_array(inner.fd().as_fd(), entries, values).context("filling a new Maglev table")?;
    Ok(inner)
}

fn service_key(key: &VipKey) -> Option<ServiceKey> {
    let protocol = match key.proto {
        IPPROTO_TCP => crate::model::Protocol::Tcp,
        IPPROTO_UDP => crate::model::Protocol::Udp,
        _ => return None,
    };
    Some(ServiceKey {
        vip: addr_from_bytes(&key.addr, key.family)?,
        port: u16::from_be(key.port),
        protocol,
    })
}

fn range_key(service_id: u32, range: &IpNet) -> Key<SourceRangeData> {
    let (addr, family) = addr_bytes(range.network());
    Key::new(
        SOURCE_RANGE_PREFIX_BITS + u32::from(range.prefix_len()),
        SourceRangeData {
            service_id,
            family,
            pad: [0; 3],
            addr,
        },
    )
}

/// Zeroes the per-CPU counters at `indexes` of a per-CPU array of [`TrafficCounters`].
fn reset(map: &MapData, indexes: &[u32]) -> Result<()> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    update_batch(
        map.fd().as_fd(),
        indexes,
        &vec![TrafficCounters::default(); cpus * indexes.len()],
    )
}

fn sum_traffic(map: &PerCpuArray<MapData, TrafficCounters>, index: u32) -> Result<TrafficCounters> {
    let per_cpu = map.get(&index, 0)?;
    Ok(per_cpu
        .iter()
        .fold(TrafficCounters::default(), |acc, c| TrafficCounters {
            packets: acc.packets + c.packets,
            bytes: acc.bytes + c.bytes,
            new_flows: acc.new_flows + c.new_flows,
        }))
}

/// The `gd_lb_settings` value for the given outer source networks. A network with host bits
/// (prefix shorter than the address) lets the datapath spread flows over those addresses.
pub fn lb_settings(source_v4: Option<IpNet>, source_v6: Option<IpNet>) -> LbSettingsEntry {
    let mut s = LbSettingsEntry::default();
    if let Some(IpNet::V4(net)) = source_v4 {
        s.src4 = net.addr().octets();
        s.src4_hostmask = net.hostmask().octets();
    }
    if let Some(IpNet::V6(net)) = source_v6 {
        s.src6 = net.addr().octets();
        s.src6_hostmask = net.hostmask().octets();
    }
    s
}
