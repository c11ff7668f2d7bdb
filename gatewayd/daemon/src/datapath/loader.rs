//! Loading the embedded objects: their pinned maps adopted (or recreated when their layout
//! changed) and their programs adopted or loaded.

use super::attach::{Handle, Program};
use super::bpffs::ensure_bpffs;
use super::compat::drop_incompatible_maps;
use super::objects::{self, LB_PROGRAM, RNAT_PROGRAM, SNAT_PROGRAM};
use super::pins::Pins;
use anyhow::{anyhow, Context, Result};
use aya::programs::Xdp;
use aya::{Ebpf, EbpfLoader};
use gatewayd_common::api::AttachedProgram;
use gatewayd_common::map_names;
use std::collections::BTreeMap;
use std::path::Path;

/// Map sizes that come from the config instead of the object's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capacities {
    pub max_services: u32,
    pub max_backends: u32,
    pub flow_table_size: u32,
    pub nat_table_size: u32,
}

impl Capacities {
    fn overrides(&self) -> [(&'static str, u32); 7] {
        [
            (map_names::SERVICES, self.max_services),
            (map_names::MAGLEV, self.max_services),
            (map_names::SERVICE_STATS, self.max_services),
            (map_names::BACKENDS, self.max_backends),
            (map_names::BACKEND_STATS, self.max_backends),
            (map_names::LB_FLOWS, self.flow_table_size),
            (map_names::NAT, self.nat_table_size),
        ]
    }
}

/// The running datapath: the load-balancer and egress objects, their maps and programs, and
/// their attachments.
pub struct Datapath {
    pub(super) pins: Pins,
    lb: Ebpf,
    egress: Ebpf,
    pub(super) programs: BTreeMap<&'static str, Program>,
    pub(super) attached: Vec<AttachedProgram>,
}

impl Datapath {
    /// Mounts bpffs if needed, adopts or creates the pinned maps (recreating any whose layout
    /// changed), and adopts or loads the programs. Attaches nothing yet.
    pub fn open(bpffs: &Path, capacities: &Capacities) -> Result<Self> {
        let pins = Pins::new(bpffs);
        ensure_bpffs(bpffs)?;
        std::fs::create_dir_all(pins.maps())?;
        std::fs::create_dir_all(pins.progs())?;

        let overrides = capacities.overrides();
        // Both objects share some maps (reasons, events): check them all before loading either.
        for object in [objects::LB, objects::EGRESS] {
            drop_incompatible_maps(&pins.maps(), object, &overrides)?;
        }
        let load = |object: &[u8], what: &str| -> Result<Ebpf> {
            let mut loader = EbpfLoader::new();
            loader.default_map_pin_directory(pins.maps());
            // Sizes of maps an object does not define are ignored.
            for (name, size) in overrides {
                loader.map_max_entries(name, size);
            }
            loader
                .load(object)
                .with_context(|| format!("loading the {what} object"))
        };
        let mut lb = load(objects::LB, "load-balancer")?;
        let mut egress = load(objects::EGRESS, "egress")?;
        let mut programs = BTreeMap::new();
        programs.insert(
            LB_PROGRAM,
            Program::open(&mut lb, LB_PROGRAM, objects::LB, &pins)?,
        );
        for name in [SNAT_PROGRAM, RNAT_PROGRAM] {
            programs.insert(name, Program::open(&mut egress, name, objects::EGRESS, &pins)?);
        }
        Ok(Datapath {
            pins,
            lb,
            egress,
            programs,
            attached: Vec::new(),
        })
    }

    pub fn pins(&self) -> &Pins {
        &self.pins
    }

    /// The load balancer's object, whose maps `LbMaps` takes.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.lb
    }

    /// The egress object, whose maps `EgressMaps` takes.
    pub fn egress_ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.egress
    }

    /// The XDP program, e.g. for BPF_PROG_TEST_RUN in tests and benchmarks.
    pub fn program(&self) -> &Xdp {
        match &self.programs[LB_PROGRAM].handle {
            Handle::Xdp(p) => p,
            Handle::Tc(_) => unreachable!("{LB_PROGRAM} is an XDP program"),
        }
    }
}

/// Takes a typed map out of a loaded object (the components own their maps).
pub(crate) fn take_map<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &str,
) -> Result<T> {
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the object"))?;
    T::try_from(map).with_context(|| format!("map {name}"))
}
