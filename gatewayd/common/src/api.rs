//! The control-socket protocol: one JSON [`Request`] line in, one JSON [`Response`] line out.

use serde::{Deserialize, Serialize};

/// Default path of the daemon's control socket.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/gatewayd/gatewayd.sock";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    Status,
    LbList,
    LbStats,
    EgressList,
    NatList,
    /// Pod addresses and their security identities (Kubernetes).
    Identities,
    EncryptionStatus,
    /// Switches the connection to a stream of [`FlowEvent`] lines until the client hangs up.
    Observe,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Status(Status),
    LbList(Vec<LbService>),
    LbStats(LbStats),
    EgressList(Vec<EgressPolicyStatus>),
    NatList(Vec<NatTranslation>),
    Identities(Vec<PodIdentity>),
    EncryptionStatus(EncryptionStatus),
    Error(String),
}

/// Node encryption as the daemon runs it. Never carries a private key.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EncryptionStatus {
    /// `none`, `wireguard` or `ipsec`.
    pub mode: String,
    pub wireguard: Option<WireGuardStatus>,
    pub ipsec: Option<IpsecStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireGuardStatus {
    pub interface: String,
    /// `kernel` or `userspace` (boringtun inside the daemon).
    pub implementation: String,
    pub public_key: String,
    pub listen_port: u16,
    pub peers: Vec<WireGuardPeerStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireGuardPeerStatus {
    pub name: String,
    pub public_key: String,
    /// Configured, or learned from the peer's packets.
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
    /// Seconds since the last completed handshake; None before the first.
    pub handshake_age_seconds: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IpsecStatus {
    pub local_address: String,
    /// The key id new traffic is sent with (the SPI of the outbound states).
    pub current_key_id: u8,
    /// Every key id with installed states, oldest first.
    pub installed_key_ids: Vec<u8>,
    /// XFRM states and policies gatewayd installed (counted in the kernel).
    pub states: usize,
    pub policies: usize,
    pub peers: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub uptime_seconds: u64,
    pub config_path: String,
    /// Incremented on every successfully applied configuration.
    pub config_generation: u64,
    pub last_reload: Option<ReloadResult>,
    pub bpffs: String,
    pub programs: Vec<AttachedProgram>,
    pub services: usize,
    pub backends: usize,
    /// Kubernetes clusters followed (absent from daemons without the sync).
    #[serde(default)]
    pub clusters: Vec<ClusterSync>,
}

/// A pod address and its security identity (docs/kubernetes.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodIdentity {
    pub address: String,
    pub identity: u32,
    pub cluster: String,
    pub namespace: String,
    pub pod: String,
}

/// How one Kubernetes cluster is followed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterSync {
    pub id: u32,
    pub name: String,
    /// `connecting` (not listed yet), `synced`, or `stale` (a watch fails; the last state
    /// stays programmed).
    pub state: String,
    /// Seconds since a watch last delivered an event; `None` before the first.
    pub last_event_age_seconds: Option<u64>,
    /// The error of a kind that fails now; `None` once every kind works again.
    pub last_error: Option<String>,
    /// Each kind followed: a kind the server does not serve leaves the cluster `synced` but
    /// its part of the state empty, and says what that means.
    #[serde(default)]
    pub kinds: Vec<KindSync>,
    /// What the cluster contributes, as last merged.
    pub services: usize,
    pub egress_policies: usize,
    pub peers: usize,
    pub identities: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KindSync {
    pub kind: String,
    pub api_version: String,
    /// `listing`, `synced`, `not-served` or `failing`.
    pub state: String,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReloadResult {
    pub unix_time: u64,
    pub ok: bool,
    /// The applied generation, or the errors that made the reload fail.
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttachedProgram {
    pub program: String,
    pub interface: String,
    /// `xdp/native`, `xdp/generic`, `xdp/offload` or `tcx/ingress`.
    pub attach: String,
    pub program_id: u32,
    /// `adopted` when a restarted daemon took over the pinned program, `loaded` otherwise.
    pub origin: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LbService {
    pub name: String,
    pub vip: String,
    pub port: u16,
    pub protocol: String,
    pub service_id: u32,
    pub source_ranges: Vec<String>,
    pub affinity_timeout_seconds: Option<u32>,
    pub encapsulation: String,
    pub maglev_table_size: u32,
    pub traffic: Traffic,
    pub backends: Vec<LbBackend>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LbBackend {
    pub address: String,
    pub weight: u32,
    pub state: String,
    pub backend_id: u32,
    /// Share of the Maglev table this backend owns, in slots.
    pub maglev_slots: u32,
    pub traffic: Traffic,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LbStats {
    pub reasons: Vec<ReasonCount>,
    pub flow_table_entries: u64,
    pub flow_table_capacity: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReasonCount {
    pub reason: String,
    pub packets: u64,
    pub bytes: u64,
}

/// One datapath event, as `gatewayctl observe` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FlowEvent {
    /// Wall-clock time, nanoseconds since the Unix epoch.
    pub time_ns: u64,
    /// `new-flow` or `dropped`.
    pub event: String,
    /// `forwarded` or `dropped`.
    pub verdict: String,
    /// Why it was dropped (a `gatewayctl lb stats` reason); empty for forwarded flows.
    pub reason: String,
    pub protocol: String,
    pub source: String,
    pub source_port: u16,
    pub destination: String,
    pub destination_port: u16,
    pub service: String,
    pub backend: String,
    pub bytes: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EgressPolicyStatus {
    pub name: String,
    pub policy_id: u32,
    pub egress_ip: String,
    pub interface: String,
    pub source_cidrs: Vec<String>,
    pub destination_cidrs: Vec<String>,
    pub excluded_cidrs: Vec<String>,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    pub new_flows: u64,
    /// New flows dropped because no NAT port was free.
    pub nat_failures: u64,
}

/// One live egress translation: `source:source_port -> destination:destination_port` leaves as
/// `egress_ip:egress_port`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NatTranslation {
    pub protocol: String,
    pub source: String,
    pub source_port: u16,
    pub destination: String,
    pub destination_port: u16,
    pub egress_ip: String,
    pub egress_port: u16,
    pub state: String,
    pub policy: String,
    pub age_seconds: u64,
    pub expires_in_seconds: u64,
}
