//! `gatewayctl`'s side of the daemon: the unix socket ([`socket`]) and the answers
//! ([`answers`]), each taken from the component that owns what a request asks about.

pub mod answers;
pub mod socket;

pub use answers::{answer, Lifecycle, Views};
pub use socket::{serve, ControlSocket, Query};
