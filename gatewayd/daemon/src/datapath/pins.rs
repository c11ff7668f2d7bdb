//! Where gatewayd pins its maps, programs and links under the bpffs directory, and removing
//! them all (`gatewayd teardown`).

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use tracing::info;

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
    pub(super) fn progs(&self) -> PathBuf {
        self.root.join("progs")
    }
    pub(super) fn links(&self) -> PathBuf {
        self.root.join("links")
    }
    pub(super) fn link(&self, interface: &str, hook: &str) -> PathBuf {
        self.links().join(interface).join(hook)
    }
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
