//! The load balancer's maps: executing reconcile operations, recovering the programmed state
//! from maps a previous daemon left pinned, and reading counters.

use super::{ignore_missing, open_pinned_map, take_map, update_batch};
use crate::lb::reconcile::{LbOp, Programmed, ProgrammedBackend, ProgrammedService};
use crate::model::{BackendState, ServiceKey};
use anyhow::{Context, Result};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, HashOfMaps, MapData, PerCpuArray, PerCpuValues};
use aya::Ebpf;
use gatewayd_common::maps::*;
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

/// BPF_F_INNER_MAP: lets Maglev tables of any prime size replace each other in `gd_maglev`.
const BPF_F_INNER_MAP: u32 = 1 << 12;

pub struct LbMaps {
    services: HashMap<MapData, VipKey, Service>,
    maglev: HashOfMaps<MapData, u32, Array<MapData, u32>>,
    /// A second handle on `gd_maglev` for batched swaps (the typed one exposes no fd).
    maglev_swap: MapData,
    backends: Array<MapData, Backend>,
    source_ranges: LpmTrie<MapData, SourceRangeData, u8>,
    settings: Array<MapData, LbSettings>,
    service_stats: PerCpuArray<MapData, TrafficCounters>,
    backend_stats: PerCpuArray<MapData, TrafficCounters>,
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
    /// Takes the maps the reconciler writes from the loaded object; counters are opened from
    /// the pins under `maps_dir`.
    pub fn new(ebpf: &mut Ebpf, maps_dir: &Path) -> Result<Self> {
        Ok(LbMaps {
            services: take_map(ebpf, "gd_services")?,
            maglev: take_map(ebpf, "gd_maglev")?,
            maglev_swap: MapData::from_pin(maps_dir.join("gd_maglev"))?,
            backends: take_map(ebpf, "gd_backends")?,
            source_ranges: take_map(ebpf, "gd_src_ranges")?,
            settings: take_map(ebpf, "gd_lb_settings")?,
            service_stats: take_map(ebpf, "gd_svc_stats")?,
            backend_stats: take_map(ebpf, "gd_be_stats")?,
            counters: LbCounters::open(maps_dir)?,
        })
    }

    pub fn counters(&self) -> &LbCounters {
        &self.counters
    }

    pub fn apply(&mut self, ops: &[LbOp]) -> Result<()> {
        let mut rest = ops;
        while let Some(op) = rest.first() {
            // The planner puts all Maglev swaps of a plan next to each other: write them as
            // batches, since every single swap waits for an RCU grace period.
            let run = rest
                .iter()
                .take_while(|o| matches!(o, LbOp::PutMaglev { .. }))
                .count();
            if run > 0 {
                for chunk in rest[..run].chunks(1024) {
                    self.put_tables(chunk)
                        .with_context(|| format!("swapping {} Maglev tables", chunk.len()))?;
                }
                rest = &rest[run..];
                continue;
            }
            self.apply_one(op).with_context(|| format!("applying {op:?}"))?;
            rest = &rest[1..];
        }
        Ok(())
    }

    /// Fills one fresh inner map per table, then swaps them all into `gd_maglev` at once.
    fn put_tables(&mut self, ops: &[LbOp]) -> Result<()> {
        use std::os::fd::{AsFd, AsRawFd};
        // The new tables stay open until the outer map holds them.
        let mut tables = Vec::with_capacity(ops.len());
        let mut service_ids = Vec::with_capacity(ops.len());
        for op in ops {
            let LbOp::PutMaglev { service_id, table } = op else {
                unreachable!("a run of PutMaglev")
            };
            tables.push(new_table(table)?);
            service_ids.push(*service_id);
        }
        let fds: Vec<u32> = tables.iter().map(|t| t.fd().as_fd().as_raw_fd() as u32).collect();
        update_batch(self.maglev_swap.fd().as_fd(), &service_ids, &fds)
    }

    fn apply_one(&mut self, op: &LbOp) -> Result<()> {
        match op {
            LbOp::ResetServiceStats { service_id } => zero(&mut self.service_stats, *service_id)?,
            LbOp::ResetBackendStats { backend_id } => zero(&mut self.backend_stats, *backend_id)?,
            LbOp::PutBackend { backend_id, value } => self.backends.set(*backend_id, value, 0)?,
            LbOp::PutMaglev { .. } => self.put_tables(std::slice::from_ref(op))?,
            LbOp::PutSourceRange { service_id, range } => {
                self.source_ranges.insert(&range_key(*service_id, range), 1, 0)?
            }
            LbOp::PutService { key, value } => self.services.insert(key, value, 0)?,
            LbOp::DeleteService { key } => ignore_missing(self.services.remove(key))?,
            LbOp::DeleteSourceRange { service_id, range } => {
                ignore_missing(self.source_ranges.remove(&range_key(*service_id, range)))?
            }
            LbOp::DeleteMaglev { service_id } => ignore_missing(self.maglev.remove(service_id))?,
            LbOp::DeleteBackend { backend_id } => self.backends.set(*backend_id, Backend::default(), 0)?,
        }
        Ok(())
    }

    pub fn set_settings(&mut self, settings: &LbSettings) -> Result<()> {
        self.settings.set(0, settings, 0)?;
        Ok(())
    }

    /// Rebuilds the programmed state from the maps, e.g. after a restart: ids stay as the
    /// previous daemon allocated them, so established flows keep pointing at the right backends.
    pub fn recover(&self) -> Result<Programmed> {
        let mut by_id: BTreeMap<u32, (ServiceKey, ProgrammedService)> = BTreeMap::new();
        for entry in self.services.iter() {
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
                        slots: BTreeMap::new(),
                    },
                ),
            );
        }
        for backend_id in 1..self.backends.len() {
            let b = self.backends.get(&backend_id, 0)?;
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
            services: by_id.into_values().collect(),
        })
    }
}

impl LbCounters {
    pub fn open(maps_dir: &Path) -> Result<Self> {
        let flows_pin = maps_dir.join("gd_lb_flows");
        let flow_capacity = aya::maps::MapInfo::from_pin(&flows_pin)
            .with_context(|| format!("opening {}", flows_pin.display()))?
            .max_entries();
        Ok(LbCounters {
            service_stats: open_pinned_map(maps_dir, "gd_svc_stats")?,
            backend_stats: open_pinned_map(maps_dir, "gd_be_stats")?,
            reasons: open_pinned_map(maps_dir, "gd_reasons")?,
            flows: open_pinned_map(maps_dir, "gd_lb_flows")?,
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

/// A Maglev table as an inner map: slot 0 holds the table size, slots 1..=size the backend ids
/// (xdp/README.md).
fn new_table(table: &[u32]) -> Result<MapData> {
    use std::os::fd::AsFd;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let size = table.len().max(1) as u32;
    let inner = MapData::create(
        aya_obj::Map::new_from_params(BPF_MAP_TYPE_ARRAY, 4, 4, size + 1, BPF_F_INNER_MAP),
        "gd_maglev_tbl",
        None,
    )?;
    let values: Vec<u32> = std::iter::once(table.len() as u32)
        .chain(table.iter().copied())
        .collect();
    let slots: Vec<u32> = (0..values.len() as u32).collect();
    update_batch(inner.fd().as_fd(), &slots, &values)?;
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

fn zero<T: aya::Pod + Default + Clone>(map: &mut PerCpuArray<MapData, T>, index: u32) -> Result<()> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    map.set(index, PerCpuValues::try_from(vec![T::default(); cpus])?, 0)?;
    Ok(())
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
pub fn lb_settings(source_v4: Option<IpNet>, source_v6: Option<IpNet>) -> LbSettings {
    let mut s = LbSettings::default();
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

/// The first global address of `family` on an interface: the default outer source.
pub fn interface_address(interface: &str, v6: bool) -> Option<IpAddr> {
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    addrs
        .filter(|a| a.interface_name == interface)
        .filter_map(|a| a.address)
        .find_map(|sa| {
            if v6 {
                sa.as_sockaddr_in6()
                    .map(|s| IpAddr::V6(s.ip()))
                    .filter(|ip| matches!(ip, IpAddr::V6(v) if (v.segments()[0] & 0xffc0) != 0xfe80))
            } else {
                sa.as_sockaddr_in().map(|s| IpAddr::V4(s.ip()))
            }
        })
}
