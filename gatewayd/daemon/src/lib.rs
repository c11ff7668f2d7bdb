//! gatewayd as a library: the daemon binary, the benchmarks and the tests share these modules.
//!
//! - [`config`]: the TOML file, validated into [`config::Settings`] and the [`model`].
//! - [`model`]: the desired state every source feeds (TOML, Kubernetes).
//! - [`k8s`]: the Kubernetes sync: reflectors per cluster, objects converted to the model.
//! - [`lb`]: Maglev and the reconcile planner (pure).
//! - [`egress`]: egress policies compiled into the datapath's lookup tries (pure).
//! - [`encryption`]: WireGuard and IPsec between gateways and nodes.
//! - [`datapath`]: the eBPF objects, their pins, and the maps the planner's operations write.
//! - [`daemon`], [`control`], [`events`], [`metrics`], [`logging`]: the long-running process.
//! - [`state_file`]: what the daemon keeps under `daemon.state_dir` across restarts.

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
pub mod state_file;
