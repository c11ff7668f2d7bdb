//! The names of the maps the objects of `xdp/` define, each written once on the Rust side. The
//! daemon pins maps by these names and opens them by these names; its tests check that [`ALL`]
//! is exactly the set of maps in the compiled objects, so a map renamed or added in C fails a
//! test, not a production start.

/// VIP -> service (`gd_vip_key` -> `gd_service`).
pub const SERVICES: &str = "gd_services";
/// Service id -> its Maglev table (an inner array map).
pub const MAGLEV: &str = "gd_maglev";
/// Backend id -> backend.
pub const BACKENDS: &str = "gd_backends";
/// Per-CPU traffic counters by service id.
pub const SERVICE_STATS: &str = "gd_svc_stats";
/// Per-CPU traffic counters by backend id.
pub const BACKEND_STATS: &str = "gd_be_stats";
/// The load balancer's connection table (LRU).
pub const LB_FLOWS: &str = "gd_lb_flows";
/// ClientIP session affinity (LRU).
pub const LB_AFFINITY: &str = "gd_lb_affinity";
/// Allowed client ranges per service (LPM trie).
pub const SOURCE_RANGES: &str = "gd_src_ranges";
/// The load balancer's settings (outer source addresses, flags), one entry.
pub const LB_SETTINGS: &str = "gd_lb_settings";
/// Per-CPU cache of next hops the datapath resolved through the FIB (not pinned).
pub const NEXTHOPS: &str = "gd_nexthops";
/// Per-CPU counters by datapath reason, shared by every program.
pub const REASONS: &str = "gd_reasons";
/// Flow events for `gatewayctl observe` (ring buffer).
pub const EVENTS: &str = "gd_events";
/// Whether anyone observes: the datapath writes events only while it is set.
pub const OBSERVE: &str = "gd_observe";
/// Egress destination prefixes -> candidate policies (LPM trie).
pub const EGRESS_DESTINATIONS: &str = "gd_egress_dst";
/// Egress (policy, source prefix) pairs (LPM trie).
pub const EGRESS_SOURCES: &str = "gd_egress_src";
/// Egress policy id -> egress address.
pub const EGRESS_POLICIES: &str = "gd_egress_pols";
/// Every egress address in use.
pub const EGRESS_ADDRESSES: &str = "gd_egress_addrs";
/// The egress NAT settings (timeouts, port range), one entry.
pub const EGRESS_SETTINGS: &str = "gd_egress_cfg";
/// Per-CPU counters by egress policy id.
pub const EGRESS_STATS: &str = "gd_egress_stats";
/// The egress NAT table (LRU), both directions of every flow.
pub const NAT: &str = "gd_nat";

/// Every map of the objects, in no particular order.
pub const ALL: [&str; 20] = [
    SERVICES,
    MAGLEV,
    BACKENDS,
    SERVICE_STATS,
    BACKEND_STATS,
    LB_FLOWS,
    LB_AFFINITY,
    SOURCE_RANGES,
    LB_SETTINGS,
    NEXTHOPS,
    REASONS,
    EVENTS,
    OBSERVE,
    EGRESS_DESTINATIONS,
    EGRESS_SOURCES,
    EGRESS_POLICIES,
    EGRESS_ADDRESSES,
    EGRESS_SETTINGS,
    EGRESS_STATS,
    NAT,
];

/// Not a map of the objects: the name the daemon gives each Maglev table it creates (the
/// inner maps of [`MAGLEV`]), as `bpftool map` lists them.
pub const MAGLEV_TABLE: &str = "gd_maglev_tbl";
