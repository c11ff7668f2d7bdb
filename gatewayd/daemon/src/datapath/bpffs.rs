//! Making sure the pin directory is on a bpffs, mounting one where none is.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use tracing::info;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

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
