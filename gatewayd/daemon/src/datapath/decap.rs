//! `gatewayd decap`: the decapsulation program of backend hosts, attached at tcx ingress and
//! pinned, so it stays after the command exits.

use super::attach::remove_pins;
use super::bpffs::ensure_bpffs;
use super::objects::{self, DECAP_PROGRAM};
use super::pins::Pins;
use anyhow::{anyhow, Context, Result};
use aya::programs::links::FdLink;
use aya::EbpfLoader;
use std::path::{Path, PathBuf};
use tracing::info;

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
