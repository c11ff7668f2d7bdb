//! Loading, attaching and pinning the eBPF programs, so that a restarted (or upgraded) daemon
//! takes over the running datapath instead of rebuilding it.
//!
//! Pins under the bpffs directory (`/sys/fs/bpf/gatewayd` by default):
//! - `maps/<map>`: every map, pinned by name, shared by all programs; adopted on restart.
//! - `progs/<program>@<object hash>`: the loaded program. A restart of the same build adopts it
//!   (same program id); a new build loads its program and swaps it into the existing links.
//! - `links/<interface>/<hook>`: the bpf_link attaching a program to an interface, e.g.
//!   `links/eth0/xdp-native`. It keeps the program attached while no daemon runs.

pub mod lb_maps;
pub mod neighbours;

use crate::config::{Interface, XdpMode};
use anyhow::{anyhow, bail, Context, Result};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{ProgramError, Xdp, XdpMode as AyaXdpMode};
use aya::{Ebpf, EbpfLoader};
use gatewayd_common::api::AttachedProgram;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tracing::{info, warn};

/// The compiled programs of `xdp/`, embedded by build.rs.
pub mod objects {
    include!(concat!(env!("OUT_DIR"), "/bpf_objects.rs"));
}

/// The XDP load balancer's program name in `xdp/lb.c`.
pub const LB_PROGRAM: &str = "gatewayd_lb";
/// The backend-side decapsulation program in `xdp/decap.c`.
pub const DECAP_PROGRAM: &str = "gatewayd_decap";

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Map sizes that come from the config instead of the object's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capacities {
    pub max_services: u32,
    pub max_backends: u32,
    pub flow_table_size: u32,
}

impl Capacities {
    fn overrides(&self) -> [(&'static str, u32); 6] {
        [
            ("gd_services", self.max_services),
            ("gd_maglev", self.max_services),
            ("gd_svc_stats", self.max_services),
            ("gd_backends", self.max_backends),
            ("gd_be_stats", self.max_backends),
            ("gd_lb_flows", self.flow_table_size),
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

/// The running load-balancer datapath: its maps, its program and its attachments.
pub struct Datapath {
    pins: Pins,
    ebpf: Ebpf,
    program: Xdp,
    origin: Origin,
    attached: BTreeMap<String, AttachedProgram>,
}

impl Datapath {
    /// Mounts bpffs if needed, adopts or creates the pinned maps (recreating any whose layout
    /// changed), and adopts or loads the XDP program. Attaches nothing yet.
    pub fn open(bpffs: &Path, capacities: &Capacities) -> Result<Self> {
        let pins = Pins::new(bpffs);
        ensure_bpffs(bpffs)?;
        std::fs::create_dir_all(pins.maps())?;
        std::fs::create_dir_all(pins.progs())?;

        let object = objects::LB;
        let overrides = capacities.overrides();
        drop_incompatible_maps(&pins.maps(), object, &overrides)?;

        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(pins.maps());
        for (name, size) in overrides {
            loader.map_max_entries(name, size);
        }
        let mut ebpf = loader.load(object).context("loading the load-balancer object")?;

        let pin = pins
            .progs()
            .join(format!("{LB_PROGRAM}@{:016x}", object_hash(object)));
        let (program, origin) = if pin.exists() {
            let program = Xdp::from_pin(&pin, aya_obj::programs::XdpAttachType::Interface)
                .with_context(|| format!("adopting pinned program {}", pin.display()))?;
            (program, Origin::Adopted)
        } else {
            let prog: &mut Xdp = ebpf
                .program_mut(LB_PROGRAM)
                .ok_or_else(|| anyhow!("program {LB_PROGRAM} missing from the object"))?
                .try_into()?;
            prog.load().map_err(verifier_error)?;
            prog.pin(&pin)
                .with_context(|| format!("pinning {}", pin.display()))?;
            let program = Xdp::from_pin(&pin, aya_obj::programs::XdpAttachType::Interface)?;
            (program, Origin::Loaded)
        };
        let id = program.info()?.id();
        match origin {
            Origin::Adopted => info!(program_id = id, "adopted the pinned XDP program"),
            Origin::Loaded => info!(program_id = id, "loaded the XDP program"),
        }
        Ok(Datapath {
            pins,
            ebpf,
            program,
            origin,
            attached: BTreeMap::new(),
        })
    }

    pub fn pins(&self) -> &Pins {
        &self.pins
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// The XDP program, e.g. for BPF_PROG_TEST_RUN in tests and benchmarks.
    pub fn program(&self) -> &Xdp {
        &self.program
    }

    pub fn program_id(&self) -> Result<u32> {
        Ok(self.program.info()?.id())
    }

    /// Makes the XDP attachments match `interfaces`: adopts links that already run this program,
    /// swaps the program atomically into links that run an older build, attaches new interfaces
    /// and detaches interfaces no longer configured.
    pub fn sync_attachments(&mut self, interfaces: &[Interface]) -> Result<Vec<AttachedProgram>> {
        let program_id = self.program_id()?;
        let mut attached = BTreeMap::new();
        for iface in interfaces {
            let hook = format!("xdp-{}", iface.xdp_mode);
            let pin = self.pins.link(&iface.name, &hook);
            remove_other_hooks(&self.pins.links().join(&iface.name), &hook, "xdp-")?;
            let origin = self.attach_interface(iface, &pin, program_id)?;
            attached.insert(
                iface.name.clone(),
                AttachedProgram {
                    program: LB_PROGRAM.into(),
                    interface: iface.name.clone(),
                    attach: format!("xdp/{}", iface.xdp_mode),
                    program_id,
                    origin: origin.to_string(),
                },
            );
        }
        // Interfaces dropped from the config: unpinning the link detaches the program.
        if let Ok(dirs) = std::fs::read_dir(self.pins.links()) {
            for dir in dirs.flatten() {
                let name = dir.file_name().to_string_lossy().into_owned();
                if !attached.contains_key(&name) && is_ours_xdp(&dir.path()) {
                    info!(interface = name, "detaching XDP: interface no longer configured");
                    remove_other_hooks(&dir.path(), "", "xdp-")?;
                    let _ = std::fs::remove_dir(dir.path());
                }
            }
        }
        self.remove_stale_program_pins()?;
        self.attached = attached;
        Ok(self.attached.values().cloned().collect())
    }

    pub fn attached(&self) -> Vec<AttachedProgram> {
        self.attached.values().cloned().collect()
    }

    fn attach_interface(&mut self, iface: &Interface, pin: &Path, program_id: u32) -> Result<Origin> {
        let ifindex = nix::net::if_::if_nametoindex(iface.name.as_str())
            .with_context(|| format!("interface {}", iface.name))?;
        if pin.exists() {
            let live = pinned_xdp_link_ifindex(pin)? == ifindex;
            let link = PinnedLink::from_pin(pin).with_context(|| format!("opening {}", pin.display()))?;
            let link = FdLink::from(link);
            let info = link.info()?;
            if live && info.program_id() == program_id {
                info!(interface = iface.name, program_id, "adopted the pinned XDP link");
                return Ok(self.origin);
            }
            if live {
                let xdp_link = aya::programs::xdp::XdpLink::try_from(link)?;
                let id = self
                    .program
                    .attach_to_link(xdp_link)
                    .context("replacing the program in the link")?;
                // The program keeps the link fd; the pin keeps the link itself.
                let _ = self.program.take_link(id)?;
                info!(
                    interface = iface.name,
                    old = info.program_id(),
                    new = program_id,
                    "upgraded the program in the pinned XDP link"
                );
                return Ok(Origin::Loaded);
            }
            warn!(
                interface = iface.name,
                "pinned XDP link belongs to a vanished interface; re-attaching"
            );
            std::fs::remove_file(pin)?;
        }
        let id = self
            .program
            .attach_to_if_index(ifindex, aya_mode(iface.xdp_mode))
            .map_err(|e| attach_error(e, &iface.name, iface.xdp_mode))?;
        let link = self.program.take_link(id)?;
        let fd_link = FdLink::try_from(link).map_err(|_| {
            anyhow!("interface {}: the kernel attached XDP through netlink, not a bpf_link, so it cannot be pinned for hitless restarts (kernel older than 5.9?)", iface.name)
        })?;
        std::fs::create_dir_all(pin.parent().expect("link pin has a parent"))?;
        fd_link
            .pin(pin)
            .with_context(|| format!("pinning {}", pin.display()))?;
        info!(interface = iface.name, mode = %iface.xdp_mode, program_id, "attached XDP program");
        Ok(Origin::Loaded)
    }

    /// Program pins of other builds: once no link uses them, unpinning frees them.
    fn remove_stale_program_pins(&self) -> Result<()> {
        let current = format!("{LB_PROGRAM}@{:016x}", object_hash(objects::LB));
        for entry in std::fs::read_dir(self.pins.progs())?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("{LB_PROGRAM}@")) && name != current {
                info!(pin = name, "removing the pin of a previous build's program");
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Origin::Adopted => "adopted",
            Origin::Loaded => "loaded",
        })
    }
}

fn is_ours_xdp(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|it| {
            it.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("xdp-"))
        })
        .unwrap_or(false)
}

/// Unpins (and so detaches) every `prefix*` hook in `dir` except `keep`.
fn remove_other_hooks(dir: &Path, keep: &str, prefix: &str) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix) && name != keep {
            info!(pin = %entry.path().display(), "detaching: attach mode changed or interface removed");
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
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

fn verifier_error(e: ProgramError) -> anyhow::Error {
    anyhow!("the kernel rejected the XDP program: {e}")
}

/// The ifindex a pinned XDP link is attached to; 0 once its interface is gone.
///
/// aya exposes neither the link fd nor the XDP part of `bpf_link_info`, so this asks the kernel
/// directly: BPF_OBJ_GET on the pin, then BPF_OBJ_GET_INFO_BY_FD.
fn pinned_xdp_link_ifindex(pin: &Path) -> Result<u32> {
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
    /// `struct bpf_link_info`: type, id, prog_id, then a union whose XDP member is the ifindex.
    #[repr(C)]
    #[derive(Default)]
    struct LinkInfo {
        link_type: u32,
        id: u32,
        prog_id: u32,
        _pad: u32,
        xdp_ifindex: u32,
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
    Ok(info.xdp_ifindex)
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
        remove_other_hooks(&dir, "", "tcx-ingress-decap")?;
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
        for (name, object) in [("lb.o", objects::LB), ("decap.o", objects::DECAP)] {
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
