//! Generic BPF plumbing: loading the embedded objects, pinning, attaching, and the syscalls
//! aya lacks, so that a restarted (or upgraded) daemon takes over the running datapath instead
//! of rebuilding it. It knows nothing of sources or features: the components (`lb`, `egress`)
//! take their maps from the loaded objects and decide what goes into them.
//!
//! Pins under the bpffs directory (`/sys/fs/bpf/gatewayd` by default):
//! - `maps/<map>`: every map, pinned by name, shared by all programs; adopted on restart.
//! - `progs/<program>@<object hash>`: the loaded program. A restart of the same build adopts it
//!   (same program id); a new build loads its program and swaps it into the existing links.
//! - `links/<interface>/<hook>`: the bpf_link attaching a program to an interface, e.g.
//!   `links/eth0/xdp-native`. It keeps the program attached while no daemon runs.
//!
//! - [`objects`]: the embedded objects and their program names;
//! - [`loader`]: [`Datapath`], the objects loaded, their maps and programs adopted;
//! - [`pins`]: where everything is pinned, and `teardown`;
//! - [`compat`]: pinned maps whose layout this build cannot use;
//! - [`attach`]: programs on interfaces, through pinned links;
//! - [`bpffs`]: mounting bpffs where none is;
//! - [`sys`]: every raw `bpf(2)` (and `mmap`) call, the only `unsafe` code here;
//! - [`decap`]: the backend hosts' decapsulation command.

pub mod attach;
pub mod bpffs;
pub mod compat;
pub mod decap;
pub mod loader;
pub mod objects;
pub mod pins;
pub mod sys;

pub use attach::{Attachment, AttachmentPlan, Hook};
pub use bpffs::ensure_bpffs;
pub use decap::{attach_decap, detach_decap};
pub use loader::{Capacities, Datapath};
pub use pins::{teardown, Pins};

use anyhow::Result;

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
