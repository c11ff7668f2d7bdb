//! Types shared by the `gatewayd` daemon and the `gatewayctl` CLI.
//!
//! - [`maps`]: `#[repr(C)]` mirrors of the eBPF map layouts in `xdp/include/gatewayd_maps.h`.
//! - [`map_names`]: the name of every map of those objects, written once.
//! - [`api`]: the JSON protocol spoken over the daemon's unix control socket.

pub mod api;
pub mod map_names;
pub mod maps;

#[cfg(feature = "aya")]
mod pod {
    use crate::maps::*;
    // SAFETY: every type is #[repr(C)], made only of integers and byte arrays, with no padding
    // the kernel could leave uninitialised (sizes are asserted in maps.rs).
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for ServiceEntry {}
    unsafe impl aya::Pod for BackendEntry {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for LbFlow {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for Affinity {}
    unsafe impl aya::Pod for SourceRangeData {}
    unsafe impl aya::Pod for LbSettingsEntry {}
    unsafe impl aya::Pod for TrafficCounters {}
    unsafe impl aya::Pod for ReasonCounters {}
    unsafe impl aya::Pod for FlowEventRecord {}
    unsafe impl aya::Pod for Observe {}
    unsafe impl aya::Pod for EgressDstData {}
    unsafe impl aya::Pod for EgressDst {}
    unsafe impl aya::Pod for EgressSrcData {}
    unsafe impl aya::Pod for EgressPolicyEntry {}
    unsafe impl aya::Pod for EgressAddrKey {}
    unsafe impl aya::Pod for EgressSettingsEntry {}
    unsafe impl aya::Pod for NatEntry {}
    unsafe impl aya::Pod for EgressCounters {}

    // lpm_key_layout! in maps.rs describes an LPM key as aya writes it: the u32 prefix length
    // right before the data, nothing in between or after.
    const _: () = {
        use aya::maps::lpm_trie::Key;
        use std::mem::size_of;
        assert!(size_of::<Key<SourceRangeData>>() == 4 + size_of::<SourceRangeData>());
        assert!(size_of::<Key<EgressDstData>>() == 4 + size_of::<EgressDstData>());
        assert!(size_of::<Key<EgressSrcData>>() == 4 + size_of::<EgressSrcData>());
    };
}
