//! Every raw syscall gatewayd makes on BPF objects where aya has no API: batched map
//! operations, the ifindex of a pinned link, and filling an array map through a mapping of it.
//! The only `unsafe` code of the datapath is here.

use anyhow::{bail, Context, Result};
use std::os::fd::BorrowedFd;
use std::path::Path;

/// The ifindex a pinned XDP or tcx link is attached to; 0 once its interface is gone.
///
/// aya exposes neither the link fd nor the XDP part of `bpf_link_info`, so this asks the kernel
/// directly: BPF_OBJ_GET on the pin, then BPF_OBJ_GET_INFO_BY_FD.
pub(super) fn pinned_link_ifindex(pin: &Path) -> Result<u32> {
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

/// BPF_MAP_UPDATE_BATCH (aya has no batch operations): `values` holds one value of the map's
/// value size per key (for per-CPU maps, one 8-byte-aligned value per possible CPU). One call
/// costs one syscall and waits for at most one RCU grace period, where an update per element
/// costs a syscall each and, on a map-in-map, a grace period each (~10 ms).
pub(crate) fn update_batch<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
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
pub(crate) fn delete_batch<K: aya::Pod>(map: BorrowedFd<'_>, keys: &[K]) -> Result<()> {
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
    map: BorrowedFd<'_>,
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

/// Writes `values` (at most `entries`) into the array map `map` of `entries` u32 elements,
/// through one shared mapping of it: the map must be mmapable (BPF_F_MMAPABLE) and not yet in
/// use. One copy, where a batched update costs the kernel an element at a time.
pub(crate) fn fill_u32_array(
    map: BorrowedFd<'_>,
    entries: usize,
    values: impl Iterator<Item = u32>,
) -> Result<()> {
    use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
    use std::num::NonZeroUsize;
    // The kernel stores array values 8-byte aligned: element i's u32 starts at byte 8 * i.
    const STRIDE: usize = 2;
    let bytes = NonZeroUsize::new(entries * STRIDE * 4).context("an array of no element")?;
    // SAFETY: a fresh shared mapping of the whole array (the kernel rounds it up to pages),
    // written within its `entries` elements and unmapped before anything else sees it.
    unsafe {
        let base = mmap(
            None,
            bytes,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
            map,
            0,
        )
        .context("mapping the array")?;
        let words = std::slice::from_raw_parts_mut(base.as_ptr().cast::<u32>(), entries * STRIDE);
        for (element, value) in words.chunks_exact_mut(STRIDE).zip(values) {
            element[0] = value;
        }
        munmap(base, bytes.get()).context("unmapping the array")?;
    }
    Ok(())
}
