//! The desired state of the dataplane: what should be served, independent of where it came from
//! (the TOML file, Kubernetes clusters) and of how it is programmed (BPF maps).

pub mod checks;
pub mod merge;

use anyhow::{anyhow, bail, Result};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => gatewayd_common::maps::IPPROTO_TCP,
            Protocol::Udp => gatewayd_common::maps::IPPROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// What identifies a load-balanced service on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceKey {
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.vip {
            IpAddr::V4(v4) => write!(f, "{v4}:{}/{}", self.port, self.protocol),
            IpAddr::V6(v6) => write!(f, "[{v6}]:{}/{}", self.port, self.protocol),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Encapsulation {
    /// IPIP for IPv4 inside, IP6IP6 (protocol 41) for IPv6 inside; the outer family is the
    /// backend's.
    Ipip,
    /// GUE variant 1 (IP in UDP) to this UDP port, for backends that cannot take IPIP.
    Gue { port: u16 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum BackendState {
    /// Receives new flows.
    Active,
    /// Keeps its established flows, receives no new ones (draining).
    Terminating,
    /// Out of service: no new flows, and its established flows are moved to other backends.
    Maintenance,
}

impl fmt::Display for BackendState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendState::Active => "active",
            BackendState::Terminating => "terminating",
            BackendState::Maintenance => "maintenance",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    pub address: IpAddr,
    pub weight: u32,
    pub state: BackendState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    pub key: ServiceKey,
    /// Client CIDRs allowed to connect; empty means everyone.
    pub source_ranges: Vec<IpNet>,
    /// ClientIP session affinity timeout in seconds.
    pub affinity_timeout: Option<u32>,
    pub encapsulation: Encapsulation,
    pub backends: Vec<Backend>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressPolicy {
    pub name: String,
    /// Pods (as /32 and /128) and CIDRs whose traffic the policy selects.
    pub source_cidrs: Vec<IpNet>,
    pub destination_cidrs: Vec<IpNet>,
    pub excluded_cidrs: Vec<IpNet>,
    /// Where the traffic leaves; the SNAT programs run there.
    pub interface: String,
    /// The SNAT address, which gatewayd assigns to `interface`; `None`: the interface's own
    /// first address.
    pub egress_ip: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub name: String,
    /// Base64 WireGuard public key; empty for a peer reached by IPsec only.
    pub public_key: String,
    /// WireGuard: where the peer's UDP port is. IPsec: its address is the tunnel endpoint.
    pub endpoint: Option<std::net::SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
}

/// The security identity of one pod address (Kubernetes; see docs/kubernetes.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Cluster id in the top 8 bits, a hash of the pod's security-relevant labels below.
    pub id: u32,
    pub cluster: String,
    pub namespace: String,
    pub pod: String,
}

/// IPsec pre-shared keys from a cluster's Secret, parsed where the Secret is read, and where
/// they came from, for messages. Debug leaves the keys out (states are logged at debug level).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpsecKeys {
    pub origin: String,
    pub keys: KeyFile,
}

/// Pre-shared keys shorter than this are refused.
pub const MIN_PSK_LEN: usize = 16;

/// IPsec pre-shared keys, parsed from the key file format (`<key id> <hex key>` lines, see
/// [`parse_key_file`]): `(id, key)` in file order; the last one is current. Debug shows the ids,
/// never the keys.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyFile {
    pub keys: Vec<(u8, Vec<u8>)>,
}

impl fmt::Debug for KeyFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<u8> = self.keys.iter().map(|(id, _)| *id).collect();
        f.debug_struct("KeyFile")
            .field("ids", &ids)
            .finish_non_exhaustive()
    }
}

impl KeyFile {
    pub fn current(&self) -> u8 {
        self.keys.last().expect("a parsed key file has a key").0
    }

    pub fn get(&self, id: u8) -> Option<&[u8]> {
        self.keys
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, k)| k.as_slice())
    }
}

/// Parses `<id> <hex key>` lines (`#` comments and blank lines allowed). Errors name the line
/// and never quote key material.
pub fn parse_key_file(text: &str) -> Result<KeyFile> {
    let mut keys: Vec<(u8, Vec<u8>)> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(id), Some(hex), None) = (fields.next(), fields.next(), fields.next()) else {
            bail!("line {n}: expected \"<key id> <hex key>\"");
        };
        let id: u8 = match id.parse() {
            Ok(id) if id > 0 => id,
            _ => bail!("line {n}: key id {id:?} is not 1-255"),
        };
        let hex = hex.strip_prefix("0x").unwrap_or(hex);
        let key = hex::decode(hex).map_err(|_| anyhow!("line {n}: key {id} is not hexadecimal"))?;
        if key.len() < MIN_PSK_LEN {
            bail!(
                "line {n}: key {id} has {} bytes; at least {MIN_PSK_LEN} are needed",
                key.len()
            );
        }
        if keys.iter().any(|(i, _)| *i == id) {
            bail!("line {n}: key id {id} appears twice");
        }
        keys.push((id, key));
    }
    if keys.is_empty() {
        bail!("no key in the file");
    }
    Ok(KeyFile { keys })
}

/// How an XDP program runs on an interface (`interfaces[].xdp_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum XdpMode {
    Native,
    Generic,
    Offload,
}

impl fmt::Display for XdpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
            XdpMode::Offload => "offload",
        })
    }
}

/// Everything the reconciler programs, from every source merged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// Shared, not copied, from a source through the merge to the planner: with thousands of
    /// services a change to a few must not copy all (and the planner recognises an unchanged
    /// service by its pointer).
    pub services: BTreeMap<ServiceKey, Arc<Service>>,
    pub egress_policies: Vec<EgressPolicy>,
    pub peers: Vec<Peer>,
    /// Pod address -> identity, from the Kubernetes clusters.
    pub identities: BTreeMap<IpAddr, Identity>,
    /// IPsec keys from a cluster's Secret (`encryption.ipsec.key_secret`); `None` where there
    /// are none, or none valid. (A `key_file` is read by the encryption at each reload.)
    pub ipsec_keys: Option<IpsecKeys>,
}
