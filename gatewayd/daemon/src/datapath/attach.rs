//! Attaching programs to interfaces through pinned bpf_links: adopted when they already run
//! this build's program, upgraded in place (`bpf_link_update`) after an upgrade, attached when
//! new, and detached (unpinned) when no longer wanted.

use super::loader::Datapath;
use super::objects::object_hash;
use super::pins::Pins;
use super::sys::pinned_link_ifindex;
use crate::model::XdpMode;
use anyhow::{anyhow, bail, Context, Result};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{ProgramError, SchedClassifier, Xdp, XdpMode as AyaXdpMode};
use aya::Ebpf;
use gatewayd_common::api::AttachedProgram;
use std::collections::BTreeSet;
use std::path::Path;
use tracing::{debug, info, warn};

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

/// The attachments [`Datapath::apply_attachments`] makes true: these, and no others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentPlan {
    wanted: Vec<Attachment>,
}

pub(super) enum Handle {
    Xdp(Xdp),
    Tc(SchedClassifier),
}

/// A loaded (or adopted) program, pinned as `progs/<name>@<object hash>`.
pub(super) struct Program {
    name: &'static str,
    /// `<name>@`: the pins of every build's program.
    pin_prefix: String,
    /// `<name>@<object hash>`: this build's.
    pin_name: String,
    pub(super) handle: Handle,
    origin: Origin,
}

impl Program {
    /// Adopts the program this build pinned earlier, or loads and pins it.
    pub(super) fn open(ebpf: &mut Ebpf, name: &'static str, object: &[u8], pins: &Pins) -> Result<Self> {
        let pin_prefix = format!("{name}@");
        let pin_name = format!("{pin_prefix}{:016x}", object_hash(object));
        let pin = pins.progs().join(&pin_name);
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
            pin_name,
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

impl Datapath {
    /// Checks `wanted` without attaching anything: every program is one this datapath loaded,
    /// and every interface exists.
    pub fn plan_attachments(&self, wanted: Vec<Attachment>) -> Result<AttachmentPlan> {
        for a in &wanted {
            if !self.programs.contains_key(a.program) {
                bail!("unknown program {}", a.program);
            }
            nix::net::if_::if_nametoindex(a.interface.as_str())
                .with_context(|| format!("interface {}", a.interface))?;
        }
        Ok(AttachmentPlan { wanted })
    }

    /// Makes the attachments match a plan: adopts links that already run the right program,
    /// swaps the program atomically into links that run an older build, attaches what is new,
    /// and unpins (so detaches) every link gatewayd pinned that is no longer wanted.
    pub fn apply_attachments(&mut self, plan: AttachmentPlan) -> Result<()> {
        let mut attached = Vec::new();
        let mut keep = BTreeSet::new();
        for a in &plan.wanted {
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
        Ok(())
    }

    pub fn attached(&self) -> Vec<AttachedProgram> {
        self.attached.clone()
    }

    /// Program pins of other builds: once no link uses them, unpinning frees them.
    fn remove_stale_program_pins(&self) -> Result<()> {
        let current: Vec<&String> = self.programs.values().map(|p| &p.pin_name).collect();
        for entry in std::fs::read_dir(self.pins.progs())?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if self.programs.values().any(|p| name.starts_with(&p.pin_prefix)) && !current.contains(&&name) {
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
pub(super) fn remove_pins(dir: &Path, matches: impl Fn(&str) -> bool) -> Result<usize> {
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
