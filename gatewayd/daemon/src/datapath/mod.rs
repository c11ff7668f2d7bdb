//! Loading, attaching and pinning the eBPF programs, so that a restarted (or upgraded) daemon
//! takes over the running datapath instead of rebuilding it.
//!
//! Pins under the bpffs directory (`/sys/fs/bpf/gatewayd` by default):
//! - `maps/<map>`: every map, pinned by name, shared by all programs; adopted on restart.
//! - `progs/<program>@<object hash>`: the loaded program. A restart of the same build adopts it
//!   (same program id); a new build loads its program and swaps it into the existing links.
//! - `links/<interface>/<hook>`: the bpf_link attaching a program to an interface, e.g.
//!   `links/eth0/xdp-native`. It keeps the program attached while no daemon runs.

pub mod addresses;
pub mod egress_maps;
pub mod lb_maps;
pub mod neighbours;

use crate::config::XdpMode;
use anyhow::{anyhow, bail, Context, Result};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{ProgramError, SchedClassifier, Xdp, XdpMode as AyaXdpMode};
use aya::{Ebpf, EbpfLoader};
use gatewayd_common::api::AttachedProgram;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use tracing::{debug, info, warn};

/// The compiled programs of `xdp/`, embedded by build.rs.
pub mod objects {
    include!(concat!(env!("OUT_DIR"), "/bpf_objects.rs"));
}

/// The XDP load balancer's program name in `xdp/lb.c`.
pub const LB_PROGRAM: &str = "gatewayd_lb";
/// Egress SNAT at tcx egress of the egress interface (`xdp/egress.c`).
pub const SNAT_PROGRAM: &str = "gatewayd_snat";
/// Reverse NAT of egress replies at tcx ingress of the same interface.
pub const RNAT_PROGRAM: &str = "gatewayd_rnat";
/// The backend-side decapsulation program in `xdp/decap.c`.
pub const DECAP_PROGRAM: &str = "gatewayd_decap";

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

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
            ("gd_services", self.max_services),
            ("gd_maglev", self.max_services),
            ("gd_svc_stats", self.max_services),
            ("gd_backends", self.max_backends),
            ("gd_be_stats", self.max_backends),
            ("gd_lb_flows", self.flow_table_size),
            ("gd_nat", self.nat_table_size),
        ]
    }
}

/// Paths of everything gatewayd pins.
#[derive(Debug, Clone)]
pub struct Pins {
    root: PathBuf,
}

impl Pins {
    pub fn new(root: &Path) -> Self {
        Pins {
            root: root.to_owned(),
        }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }
    fn progs(&self) -> PathBuf {
        self.root.join("progs")
    }
    fn links(&self) -> PathBuf {
        self.root.join("links")
    }
    fn link(&self, interface: &str, hook: &str) -> PathBuf {
        self.links().join(interface).join(hook)
    }
}

/// Whether a program was taken over from a previous daemon or loaded by this one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Adopted,
    Loaded,
}

/// Where on an interface a program runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    Xdp(XdpMode),
    TcxIngress,
    TcxEgress,
}

impl Hook {
    /// The link's pin name. An interface has one XDP program whatever its mode, so every XDP
    /// pin shares the `xdp-` prefix and a mode change replaces the link.
    fn pin_name(&self, program: &str) -> String {
        match self {
            Hook::Xdp(mode) => format!("xdp-{mode}"),
            Hook::TcxIngress => format!("tcx-ingress-{program}"),
            Hook::TcxEgress => format!("tcx-egress-{program}"),
        }
    }

    fn describe(&self) -> String {
        match self {
            Hook::Xdp(mode) => format!("xdp/{mode}"),
            Hook::TcxIngress => "tcx/ingress".into(),
            Hook::TcxEgress => "tcx/egress".into(),
        }
    }
}

/// One program on one interface, as the daemon wants it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attachment {
    pub interface: String,
    pub hook: Hook,
    pub program: &'static str,
}

enum Handle {
    Xdp(Xdp),
    Tc(SchedClassifier),
}

/// A loaded (or adopted) program, pinned as `progs/<name>@<object hash>`.
struct Program {
    name: &'static str,
    pin_prefix: String,
    handle: Handle,
    origin: Origin,
}

impl Program {
    /// Adopts the program this build pinned earlier, or loads and pins it.
    fn open(ebpf: &mut Ebpf, name: &'static str, object: &[u8], pins: &Pins) -> Result<Self> {
        let pin_prefix = format!("{name}@");
        let pin = pins
            .progs()
            .join(format!("{pin_prefix}{:016x}", object_hash(object)));
        let origin = if pin.exists() {
            Origin::Adopted
        } else {
            let prog = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the object"))?;
            match prog {
                aya::programs::Program::Xdp(p) => p.load(),
                aya::programs::Program::SchedClassifier(p) => p.load(),
                _ => bail!("program {name}: unexpected program type"),
            }
            .map_err(|e| anyhow!("the kernel rejected program {name}: {e}"))?;
            prog.pin(&pin)
                .with_context(|| format!("pinning {}", pin.display()))?;
            Origin::Loaded
        };
        let adopt = || format!("opening pinned program {}", pin.display());
        let handle = match ebpf.program(name) {
            Some(aya::programs::Program::Xdp(_)) => Handle::Xdp(
                Xdp::from_pin(&pin, aya_obj::programs::XdpAttachType::Interface).with_context(adopt)?,
            ),
            _ => Handle::Tc(SchedClassifier::from_pin(&pin).with_context(adopt)?),
        };
        let program = Program {
            name,
            pin_prefix,
            handle,
            origin,
        };
        let id = program.id()?;
        match (origin, &program.handle) {
            (Origin::Adopted, Handle::Xdp(_)) => {
                info!(program = name, program_id = id, "adopted the pinned XDP program")
            }
            (Origin::Adopted, Handle::Tc(_)) => {
                info!(program = name, program_id = id, "adopted the pinned TC program")
            }
            (Origin::Loaded, _) => info!(program = name, program_id = id, "loaded the program"),
        }
        Ok(program)
    }

    fn id(&self) -> Result<u32> {
        Ok(match &self.handle {
            Handle::Xdp(p) => p.info()?.id(),
            Handle::Tc(p) => p.info()?.id(),
        })
    }

    /// A new link on `interface`, as a pinnable fd link.
    fn attach(&mut self, interface: &str, ifindex: u32, hook: Hook) -> Result<FdLink> {
        use aya::programs::{tc::TcAttachOptions, LinkOrder, TcAttachType};
        let not_pinnable = || {
            anyhow!("interface {interface}: the kernel attached through netlink, not a bpf_link, so it cannot be pinned for hitless restarts (kernel older than 6.6?)")
        };
        match (&mut self.handle, hook) {
            (Handle::Xdp(p), Hook::Xdp(mode)) => {
                let id = p
                    .attach_to_if_index(ifindex, aya_mode(mode))
                    .map_err(|e| attach_error(e, interface, mode))?;
                FdLink::try_from(p.take_link(id)?).map_err(|_| not_pinnable())
            }
            (Handle::Tc(p), Hook::TcxIngress | Hook::TcxEgress) => {
                let direction = if hook == Hook::TcxIngress {
                    TcAttachType::Ingress
                } else {
                    TcAttachType::Egress
                };
                let id = p
                    .attach_with_options(
                        interface,
                        direction,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .with_context(|| {
                        format!("attaching {} at {} of {interface}", self.name, hook.describe())
                    })?;
                FdLink::try_from(p.take_link(id)?).map_err(|_| not_pinnable())
            }
            _ => bail!("program {} cannot run at {}", self.name, hook.describe()),
        }
    }

    /// Swaps this program into an existing link (bpf_link_update: no packet sees no program).
    fn replace(&mut self, link: FdLink) -> Result<()> {
        match &mut self.handle {
            Handle::Xdp(p) => {
                let id = p.attach_to_link(aya::programs::xdp::XdpLink::try_from(link)?)?;
                // The program keeps the link fd; the pin keeps the link itself.
                drop(p.take_link(id)?);
            }
            Handle::Tc(p) => {
                let id = p.attach_to_link(aya::programs::tc::SchedClassifierLink::try_from(link)?)?;
                drop(p.take_link(id)?);
            }
        }
        Ok(())
    }
}

/// The running datapath: the load-balancer and egress objects, their maps and programs, and
/// their attachments.
pub struct Datapath {
    pins: Pins,
    lb: Ebpf,
    egress: Ebpf,
    programs: BTreeMap<&'static str, Program>,
    attached: Vec<AttachedProgram>,
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

    /// Makes the attachments match `wanted`: adopts links that already run the right program,
    /// swaps the program atomically into links that run an older build, attaches what is new,
    /// and unpins (so detaches) every link gatewayd pinned that is no longer wanted.
    pub fn sync_attachments(&mut self, wanted: &[Attachment]) -> Result<Vec<AttachedProgram>> {
        let mut attached = Vec::new();
        let mut keep = BTreeSet::new();
        for a in wanted {
            let program = self
                .programs
                .get_mut(a.program)
                .ok_or_else(|| anyhow!("unknown program {}", a.program))?;
            let pin = self.pins.link(&a.interface, &a.hook.pin_name(a.program));
            if let Hook::Xdp(_) = a.hook {
                // Another mode's XDP link on this interface: it must go before ours can attach.
                remove_pins(&self.pins.links().join(&a.interface), |name| {
                    name.starts_with("xdp-")
                        && *name != *pin.file_name().unwrap_or_default().to_string_lossy()
                })?;
            }
            let origin = sync_link(program, &a.interface, a.hook, &pin)?;
            keep.insert(pin);
            attached.push(AttachedProgram {
                program: a.program.into(),
                interface: a.interface.clone(),
                attach: a.hook.describe(),
                program_id: program.id()?,
                origin: origin.to_string(),
            });
        }
        // Links no longer wanted (interface or feature removed): unpinning detaches them.
        if let Ok(dirs) = std::fs::read_dir(self.pins.links()) {
            for dir in dirs.flatten() {
                let unwanted = |name: &str| !keep.contains(&dir.path().join(name));
                if remove_pins(&dir.path(), unwanted)? > 0 {
                    info!(interface = %dir.file_name().to_string_lossy(), "detached programs no longer configured there");
                }
                let _ = std::fs::remove_dir(dir.path());
            }
        }
        self.remove_stale_program_pins()?;
        self.attached = attached;
        Ok(self.attached.clone())
    }

    pub fn attached(&self) -> Vec<AttachedProgram> {
        self.attached.clone()
    }

    /// Program pins of other builds: once no link uses them, unpinning frees them.
    fn remove_stale_program_pins(&self) -> Result<()> {
        let current: Vec<String> = self
            .programs
            .values()
            .map(|p| {
                format!(
                    "{}{:016x}",
                    p.pin_prefix,
                    object_hash(if p.name == LB_PROGRAM {
                        objects::LB
                    } else {
                        objects::EGRESS
                    })
                )
            })
            .collect();
        for entry in std::fs::read_dir(self.pins.progs())?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if self.programs.values().any(|p| name.starts_with(&p.pin_prefix)) && !current.contains(&name) {
                info!(pin = name, "removing the pin of a previous build's program");
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(())
    }
}

/// Brings one pinned link in line with `program`: adopted, upgraded in place, or attached.
fn sync_link(program: &mut Program, interface: &str, hook: Hook, pin: &Path) -> Result<Origin> {
    let ifindex =
        nix::net::if_::if_nametoindex(interface).with_context(|| format!("interface {interface}"))?;
    let program_id = program.id()?;
    if pin.exists() {
        let live = pinned_link_ifindex(pin)? == ifindex;
        let link =
            FdLink::from(PinnedLink::from_pin(pin).with_context(|| format!("opening {}", pin.display()))?);
        let old = link.info()?.program_id();
        if live && old == program_id {
            // Every apply (each reload, each cluster update) re-checks every link: an
            // unchanged one is not news. The program's adoption at start is logged at info.
            debug!(
                interface,
                program = program.name,
                program_id,
                "adopted the pinned link"
            );
            return Ok(program.origin);
        }
        if live {
            program
                .replace(link)
                .context("replacing the program in the link")?;
            info!(
                interface,
                program = program.name,
                old,
                new = program_id,
                "upgraded the program in the pinned link"
            );
            return Ok(Origin::Loaded);
        }
        warn!(
            interface,
            program = program.name,
            "pinned link belongs to a vanished interface; re-attaching"
        );
        std::fs::remove_file(pin)?;
    }
    let link = program.attach(interface, ifindex, hook)?;
    std::fs::create_dir_all(pin.parent().expect("link pin has a parent"))?;
    link.pin(pin)
        .with_context(|| format!("pinning {}", pin.display()))?;
    info!(
        interface,
        program = program.name,
        hook = hook.describe(),
        program_id,
        "attached"
    );
    Ok(Origin::Loaded)
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Origin::Adopted => "adopted",
            Origin::Loaded => "loaded",
        })
    }
}

/// Unpins (and so detaches) the links in `dir` whose names match; returns how many.
fn remove_pins(dir: &Path, matches: impl Fn(&str) -> bool) -> Result<usize> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(0);
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        if matches(&entry.file_name().to_string_lossy()) {
            info!(pin = %entry.path().display(), "detaching");
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

fn aya_mode(mode: XdpMode) -> AyaXdpMode {
    match mode {
        XdpMode::Native => AyaXdpMode::Driver,
        XdpMode::Generic => AyaXdpMode::Skb,
        XdpMode::Offload => AyaXdpMode::Hardware,
    }
}

fn attach_error(e: ProgramError, iface: &str, mode: XdpMode) -> anyhow::Error {
    let errno = match &e {
        ProgramError::SyscallError(s) => s.io_error.raw_os_error(),
        _ => None,
    };
    match (mode, errno) {
        (XdpMode::Offload, _) => anyhow!(
            "interface {iface}: XDP offload mode is not supported by this NIC/driver ({e}); use xdp_mode = \"native\" or \"generic\""
        ),
        (XdpMode::Native, Some(libc::EOPNOTSUPP)) => anyhow!(
            "interface {iface}: the driver has no native XDP support ({e}); use xdp_mode = \"generic\""
        ),
        (_, Some(libc::EBUSY | libc::EEXIST)) => anyhow!(
            "interface {iface}: another XDP program is already attached ({e}); detach it first (ip link set dev {iface} xdp off)"
        ),
        _ => anyhow!("interface {iface}: attaching XDP in {mode} mode failed: {e}"),
    }
}

/// The ifindex a pinned XDP or tcx link is attached to; 0 once its interface is gone.
///
/// aya exposes neither the link fd nor the XDP part of `bpf_link_info`, so this asks the kernel
/// directly: BPF_OBJ_GET on the pin, then BPF_OBJ_GET_INFO_BY_FD.
fn pinned_link_ifindex(pin: &Path) -> Result<u32> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    /// `struct bpf_link_info`: type, id, prog_id, then a union whose XDP and tcx members both
    /// start with the ifindex.
    #[repr(C)]
    #[derive(Default)]
    struct LinkInfo {
        link_type: u32,
        id: u32,
        prog_id: u32,
        _pad: u32,
        ifindex: u32,
        _rest: [u32; 15],
    }
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes())?;
    let mut get = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: the attr points at a live NUL-terminated path and has the kernel's layout.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &mut get as *mut ObjGetAttr,
            std::mem::size_of::<ObjGetAttr>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("opening {}", pin.display()));
    }
    // SAFETY: the kernel just returned this fd to us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut info = LinkInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
        info_len: std::mem::size_of::<LinkInfo>() as u32,
        info: &mut info as *mut LinkInfo as u64,
    };
    // SAFETY: attr and info outlive the call and have the kernel's layout.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &mut attr as *mut InfoAttr,
            std::mem::size_of::<InfoAttr>(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("reading link info of {}", pin.display()));
    }
    Ok(info.ifindex)
}

/// Takes a typed map out of a loaded object (the reconcilers own their maps).
pub(crate) fn take_map<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &str,
) -> Result<T> {
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the object"))?;
    T::try_from(map).with_context(|| format!("map {name}"))
}

/// Opens a typed handle on a pinned map: readers (counters, events, scrapes) get their own.
pub(crate) fn open_pinned_map<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    maps_dir: &Path,
    name: &str,
) -> Result<T> {
    let path = maps_dir.join(name);
    let data = aya::maps::MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    T::try_from(aya::maps::Map::from_map_data(data)?).with_context(|| format!("map {name}"))
}

/// BPF_MAP_UPDATE_BATCH (aya has no batch operations): `values` holds one value of the map's
/// value size per key (for per-CPU maps, one 8-byte-aligned value per possible CPU). One call
/// costs one syscall and waits for at most one RCU grace period, where an update per element
/// costs a syscall each and, on a map-in-map, a grace period each (~10 ms).
pub(crate) fn update_batch<K: aya::Pod, V: aya::Pod>(
    map: std::os::fd::BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<()> {
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    if keys.is_empty() {
        return Ok(());
    }
    let done = map_batch(BPF_MAP_UPDATE_BATCH, map, keys, Some(values))
        .map_err(|(_, e)| e)
        .context("BPF_MAP_UPDATE_BATCH")?;
    if done != keys.len() {
        bail!("BPF_MAP_UPDATE_BATCH wrote {done} of {} elements", keys.len());
    }
    Ok(())
}

/// BPF_MAP_DELETE_BATCH; keys already gone are skipped (the state is what was wanted).
pub(crate) fn delete_batch<K: aya::Pod>(map: std::os::fd::BorrowedFd<'_>, keys: &[K]) -> Result<()> {
    const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
    let mut rest = keys;
    while !rest.is_empty() {
        match map_batch::<K, K>(BPF_MAP_DELETE_BATCH, map, rest, None) {
            Ok(_) => break,
            // The kernel stops at the first missing key and reports how many it deleted.
            Err((done, e)) if e.raw_os_error() == Some(libc::ENOENT) => rest = &rest[done + 1..],
            Err((_, e)) => return Err(e).context("BPF_MAP_DELETE_BATCH"),
        }
    }
    Ok(())
}

/// One batch command over `keys` (and `values`): the number of elements done, also on error.
fn map_batch<K: aya::Pod, V: aya::Pod>(
    cmd: libc::c_long,
    map: std::os::fd::BorrowedFd<'_>,
    keys: &[K],
    values: Option<&[V]>,
) -> Result<usize, (usize, std::io::Error)> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    if let Some(values) = values {
        assert!(
            values.len().is_multiple_of(keys.len()),
            "a whole number of values per key"
        );
    }
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.map_or(0, |v| v.as_ptr() as u64),
        count: keys.len() as u32,
        map_fd: map.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: attr has the kernel's layout and points at live arrays of `count` keys and
    // values of the map's key and value sizes (the callers' types mirror the map's).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if rc != 0 {
        return Err((attr.count as usize, std::io::Error::last_os_error()));
    }
    Ok(attr.count as usize)
}

/// A delete of a key that is already gone is not an error: the state is what was wanted.
pub(crate) fn ignore_missing(result: Result<(), aya::maps::MapError>) -> Result<()> {
    match result {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        other => Ok(other?),
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of bpf_ktime_get_ns(), which stamps NAT entries
/// and flow events.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// A stable hash of an embedded object: names the program pin, so a restart of the same build
/// adopts the running program while a different build replaces it.
pub fn object_hash(object: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut h = siphasher::sip::SipHasher13::new_with_keys(0x6761_7465_7761_7964, 0);
    h.write(object);
    h.finish()
}

/// Drops pinned maps whose type, key, value, size or flags no longer match what this build
/// expects: reusing them would feed the new program garbage. The map is recreated on load; its
/// state is lost, and the log says so.
fn drop_incompatible_maps(dir: &Path, object: &[u8], overrides: &[(&str, u32)]) -> Result<()> {
    let obj = aya_obj::Object::parse(object).context("parsing the embedded object")?;
    for (name, def) in &obj.maps {
        let pin = dir.join(name);
        if !pin.exists() {
            continue;
        }
        let max_entries = overrides
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
            .unwrap_or(def.max_entries());
        let live = aya::maps::MapInfo::from_pin(&pin)
            .with_context(|| format!("reading pinned map {}", pin.display()))?;
        let live_type = live.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
        let mut changes = Vec::new();
        let mut check = |what: &str, old: u32, new: u32| {
            if old != new {
                changes.push(format!("{what} {old} -> {new}"));
            }
        };
        check("type", live_type, def.map_type());
        check("key size", live.key_size(), def.key_size());
        check("value size", live.value_size(), def.value_size());
        // Per-CPU and ring-buffer sizes are rounded by the kernel; arrays and hashes are exact.
        check("max entries", live.max_entries(), max_entries);
        check("flags", live.map_flags(), def.map_flags());
        const BPF_MAP_TYPE_HASH_OF_MAPS: u32 = 13;
        if let Some(template) = def.inner().filter(|_| live_type == BPF_MAP_TYPE_HASH_OF_MAPS) {
            if let Some(held) = inner_map_flags(&pin)? {
                check("inner map flags", held, template.map_flags());
            }
        }
        if !changes.is_empty() {
            warn!(
                map = name.as_str(),
                changes = changes.join(", "),
                "pinned map layout differs from this build: recreating it (its entries are dropped)"
            );
            std::fs::remove_file(&pin)?;
        }
    }
    Ok(())
}

/// The flags of an inner map that the pinned map-in-map at `pin` holds, `None` when it holds
/// none. The kernel does not report a map-in-map's inner template, and refuses inner maps
/// whose flags differ from it, so a held map stands for the template. (An empty outer map of
/// an older layout is kept, and its first insert fails with an error naming it.)
fn inner_map_flags(pin: &Path) -> Result<Option<u32>> {
    let outer: aya::maps::HashOfMaps<aya::maps::MapData, u32, aya::maps::MapData> =
        aya::maps::Map::from_map_data(aya::maps::MapData::from_pin(pin)?)?.try_into()?;
    let Some(key) = outer.keys().next() else {
        return Ok(None);
    };
    let inner = outer.get(&key?, 0)?;
    Ok(Some(inner.info()?.map_flags()))
}

/// Makes sure `dir` is on a bpffs, mounting one at /sys/fs/bpf (or at `dir`) if needed.
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    let mut probe = dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    if is_bpffs(&probe) {
        std::fs::create_dir_all(dir)?;
        return Ok(());
    }
    let target = if dir.starts_with("/sys/fs/bpf") {
        PathBuf::from("/sys/fs/bpf")
    } else {
        dir.to_owned()
    };
    std::fs::create_dir_all(&target)?;
    nix::mount::mount(
        Some("bpf"),
        &target,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mounting bpffs at {}", target.display()))?;
    info!(path = %target.display(), "mounted bpffs");
    std::fs::create_dir_all(dir)?;
    if !is_bpffs(dir) {
        bail!("{} is not on a bpffs even after mounting one", dir.display());
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// Removes everything gatewayd pinned: links first (detaching the programs), then programs and
/// maps. Safe to run when nothing is there.
pub fn teardown(bpffs: &Path) -> Result<()> {
    if !bpffs.exists() {
        info!(path = %bpffs.display(), "nothing to tear down");
        return Ok(());
    }
    let pins = Pins::new(bpffs);
    for sub in [pins.links(), pins.progs(), pins.maps()] {
        if sub.exists() {
            std::fs::remove_dir_all(&sub).with_context(|| format!("removing {}", sub.display()))?;
        }
    }
    std::fs::remove_dir_all(bpffs).with_context(|| format!("removing {}", bpffs.display()))?;
    info!(path = %bpffs.display(), "removed all pinned links, programs and maps");
    Ok(())
}

/// The decapsulation program for backend hosts: attached at tcx ingress and pinned, so it stays
/// after the command exits.
pub fn attach_decap(bpffs: &Path, interface: &str, gue_port: Option<u16>) -> Result<u32> {
    use aya::programs::{tc::TcAttachOptions, LinkOrder, SchedClassifier, TcAttachType};
    let pins = Pins::new(bpffs);
    ensure_bpffs(bpffs)?;
    std::fs::create_dir_all(pins.maps())?;
    let pin = pins.link(interface, "tcx-ingress-decap");
    if pin.exists() {
        std::fs::remove_file(&pin)?;
    }
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(pins.maps());
    let port_be = gue_port.unwrap_or(0).to_be();
    loader.override_global("gue_port", &port_be, true);
    let mut ebpf = loader.load(objects::DECAP).context("loading the decap object")?;
    let prog: &mut SchedClassifier = ebpf
        .program_mut(DECAP_PROGRAM)
        .ok_or_else(|| anyhow!("program {DECAP_PROGRAM} missing"))?
        .try_into()?;
    prog.load()
        .map_err(|e| anyhow!("the kernel rejected the decap program: {e}"))?;
    let id = prog
        .attach_with_options(
            interface,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .with_context(|| format!("attaching decap at tcx ingress of {interface}"))?;
    let link = prog.take_link(id)?;
    let fd_link =
        FdLink::try_from(link).map_err(|_| anyhow!("tcx link cannot be pinned (kernel older than 6.6?)"))?;
    std::fs::create_dir_all(pin.parent().expect("parent"))?;
    fd_link.pin(&pin)?;
    let program_id = prog.info()?.id();
    info!(interface, program_id, "attached the decap program at tcx ingress");
    Ok(program_id)
}

/// Detaches the decap program from `interface` (or from every interface when `None`).
pub fn detach_decap(bpffs: &Path, interface: Option<&str>) -> Result<()> {
    let pins = Pins::new(bpffs);
    let dirs: Vec<PathBuf> = match interface {
        Some(i) => vec![pins.links().join(i)],
        None => std::fs::read_dir(pins.links())
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default(),
    };
    for dir in dirs {
        remove_pins(&dir, |name| name == "tcx-ingress-decap")?;
        let _ = std::fs::remove_dir(&dir);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Rust mirrors must match the C structs the compiler laid out: compare every size and
    /// field offset with the BTF of the embedded objects (read with bpftool).
    #[test]
    fn rust_map_types_match_the_btf_of_the_objects() {
        let dir = std::env::temp_dir().join(format!("gatewayd-btf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut types = Vec::new();
        for (name, object) in [
            ("lb.o", objects::LB),
            ("decap.o", objects::DECAP),
            ("egress.o", objects::EGRESS),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, object).unwrap();
            let out = std::process::Command::new("bpftool")
                .args(["-j", "btf", "dump", "file"])
                .arg(&path)
                .output()
                .expect("bpftool is needed for this test (apt-get install bpftool)");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            types.extend(json["types"].as_array().unwrap().iter().cloned());
        }
        std::fs::remove_dir_all(&dir).unwrap();

        for layout in gatewayd_common::maps::layouts() {
            let ty = types
                .iter()
                .find(|t| t["kind"] == "STRUCT" && t["name"] == layout.c_name)
                .unwrap_or_else(|| panic!("struct {} not in the objects' BTF", layout.c_name));
            assert_eq!(
                ty["size"].as_u64().unwrap() as usize,
                layout.size,
                "size of {}",
                layout.c_name
            );
            let members = ty["members"].as_array().unwrap();
            assert_eq!(
                members.len(),
                layout.fields.len(),
                "field count of {}",
                layout.c_name
            );
            for (field, offset) in &layout.fields {
                let m = members
                    .iter()
                    .find(|m| m["name"] == *field)
                    .unwrap_or_else(|| panic!("{}.{field} not in C", layout.c_name));
                assert_eq!(
                    m["bits_offset"].as_u64().unwrap() as usize,
                    offset * 8,
                    "{}.{field}",
                    layout.c_name
                );
            }
        }
    }

    #[test]
    fn object_hash_is_stable_and_distinguishes_builds() {
        assert_eq!(object_hash(b"abc"), object_hash(b"abc"));
        assert_ne!(object_hash(objects::LB), object_hash(objects::DECAP));
    }
}
