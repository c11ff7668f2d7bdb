//! Egress gateway logic that needs no kernel: compiling policies into the datapath's tries.

pub mod plan;
