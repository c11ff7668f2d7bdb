//! The TOML file as serde sees it. Addresses, CIDRs and enums stay strings here so that one bad
//! value does not hide the others: `validate` turns this into the model and reports every error.
//! Unknown keys are not denied here (serde would stop at the first): the parse collects them all
//! in one pass (see `super::deserialize_reporting_unknown_keys`).

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
pub struct RawConfig {
    #[serde(default)]
    pub daemon: RawDaemon,
    #[serde(default)]
    pub logging: RawLogging,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub interfaces: Vec<RawInterface>,
    #[serde(default)]
    pub lb: RawLb,
    #[serde(default)]
    pub services: Vec<RawService>,
    #[serde(default)]
    pub egress: RawEgress,
    #[serde(default)]
    pub egress_policies: Vec<RawEgressPolicy>,
    #[serde(default)]
    pub peers: Vec<RawPeer>,
    #[serde(default)]
    pub clusters: Vec<RawCluster>,
    #[serde(default)]
    pub encryption: RawEncryption,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawDaemon {
    pub bpffs: Option<String>,
    pub control_socket: Option<String>,
    pub state_dir: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawLogging {
    pub level: Option<String>,
    pub format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawMetrics {
    pub listen: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawInterface {
    pub name: String,
    pub xdp_mode: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawLb {
    pub maglev_table_size: Option<u32>,
    pub maglev_seed: Option<u64>,
    pub flow_table_size: Option<u32>,
    pub max_services: Option<u32>,
    pub max_backends: Option<u32>,
    pub encap_source_v4: Option<String>,
    pub encap_source_v6: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawService {
    pub name: String,
    pub vip: String,
    pub port: u16,
    pub protocol: Option<String>,
    #[serde(default)]
    pub source_ranges: Vec<String>,
    pub session_affinity_timeout: Option<u32>,
    pub encapsulation: Option<String>,
    pub gue_port: Option<u16>,
    #[serde(default)]
    pub backends: Vec<RawBackend>,
}

#[derive(Debug, Deserialize)]
pub struct RawBackend {
    pub address: String,
    pub weight: Option<u32>,
    pub state: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawEgress {
    pub interface: Option<String>,
    pub port_min: Option<u16>,
    pub port_max: Option<u16>,
    pub nat_table_size: Option<u32>,
    pub tcp_established_timeout: Option<u32>,
    pub tcp_closing_timeout: Option<u32>,
    pub tcp_syn_timeout: Option<u32>,
    pub udp_timeout: Option<u32>,
    pub icmp_timeout: Option<u32>,
}

#[derive(Debug, Deserialize)]
pub struct RawEgressPolicy {
    pub name: String,
    #[serde(default)]
    pub source_cidrs: Vec<String>,
    #[serde(default)]
    pub destination_cidrs: Vec<String>,
    #[serde(default)]
    pub excluded_cidrs: Vec<String>,
    pub egress_ip: Option<String>,
    pub egress_interface: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawPeer {
    pub name: String,
    pub public_key: Option<String>,
    pub endpoint: Option<String>,
    #[serde(default)]
    pub allowed_ips: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawCluster {
    pub id: u32,
    pub name: String,
    pub kubeconfig: Option<String>,
    pub context: Option<String>,
    pub server: Option<String>,
    pub token_file: Option<String>,
    pub ca_file: Option<String>,
    pub load_balancer_class: Option<String>,
    pub identity_ignore_labels: Option<Vec<String>>,
    pub wireguard_port: Option<u16>,
    #[serde(default)]
    pub address_pools: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawEncryption {
    pub mode: Option<String>,
    #[serde(default)]
    pub wireguard: RawWireGuard,
    #[serde(default)]
    pub ipsec: RawIpsec,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawWireGuard {
    pub interface: Option<String>,
    pub listen_port: Option<u16>,
    pub implementation: Option<String>,
    pub private_key_file: Option<String>,
    pub address: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawIpsec {
    pub key_file: Option<String>,
    pub key_secret: Option<String>,
    pub local_address: Option<String>,
    pub rotation_overlap: Option<u32>,
}
