//! The egress gateway: policies compiled into the datapath's lookup tries (pure, [`plan`]),
//! written by [`maps`], and run as a component ([`gateway`]).

pub mod gateway;
pub mod maps;
pub mod plan;
