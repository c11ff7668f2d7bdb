//! gatewayd as a library: the daemon binary, the benchmarks and the tests share these modules.
//! docs/architecture.md draws them and says which one owns each feature.
//!
//! Sources and their model:
//! - [`config`]: the TOML file, validated into [`config::Settings`] and the [`model`].
//! - [`k8s`]: the Kubernetes sync: reflectors per cluster, objects converted to the model, each
//!   cluster's last state kept and saved ([`k8s::clusters`]).
//! - [`model`]: the desired state every source feeds, and their merge ([`model::merge`]).
//!
//! Components, each programming its part under one contract ([`reconcile`]):
//! - [`lb`]: the load balancer (Maglev, the pure planner, its maps, [`lb::balancer`]).
//! - [`egress`]: the egress gateway (the pure compiler, its maps, [`egress::gateway`]).
//! - [`encryption`]: WireGuard and IPsec between gateways and nodes.
//! - [`host`]: the host's own networking: neighbour entries, egress addresses.
//! - [`datapath`]: generic BPF plumbing: objects, pins, attachments, raw syscalls.
//!
//! The long-running process: [`daemon`] (composition and order of operations), [`control`]
//! (`gatewayctl`), [`events`] (flow events), [`metrics`], [`logging`], [`state_file`] (what
//! the daemon keeps under `daemon.state_dir` across restarts), and [`secret_file`] (key and
//! token files, read with one check of their mode).

pub mod config;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod egress;
pub mod encryption;
pub mod events;
pub mod host;
pub mod k8s;
pub mod lb;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod reconcile;
pub mod secret_file;
pub mod state_file;
