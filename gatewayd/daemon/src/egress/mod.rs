//! The egress gateway: policies compiled into the datapath's lookup tries (pure, `plan`) and
//! run against the maps, addresses and NAT table (`gateway`).

pub mod gateway;
pub mod plan;
