//! WireGuard: one interface gatewayd owns, a kernel device where the kernel has the module and
//! a boringtun device inside the daemon otherwise, both configured through wireguard-control
//! (generic netlink for the kernel, the UAPI socket for boringtun). Peers come from the model;
//! each peer's allowed IPs are routed into the interface, and the routes follow the peers.
//!
//! Peer churn leaves other peers alone: the plan touches only peers whose key, endpoint or
//! allowed IPs changed, so their sessions (handshakes, counters) carry on.
//!
//! Restarts: a kernel device outlives the daemon and is adopted by the next start (peers and
//! sessions untouched when the config is unchanged). A boringtun device lives in the daemon's
//! process: it and its routes vanish when the daemon stops, and peers handshake again when the
//! next daemon creates it.

use super::uapi::{self, UapiSocket};
use crate::config::{WireGuardImplementation, WireGuardSettings};
use crate::model::Peer;
use anyhow::{anyhow, bail, Context, Result};
use futures_util::TryStreamExt;
use gatewayd_common::api;
use ipnet::IpNet;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo};
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage, RouteProtocol};
use rtnetlink::{Handle, LinkUnspec, LinkWireguard, RouteMessageBuilder};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::IntoRawFd;
use std::path::Path;
use std::time::{Duration, SystemTime};
use tracing::{info, warn};
use wireguard_control::{Backend, DeviceUpdate, InterfaceName, Key, PeerConfigBuilder};

/// WireGuard's overhead over IPv6 (80 bytes) below a 1500-byte underlay, as wg-quick does.
const MTU: u32 = 1420;

/// A peer as the device holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub name: String,
    pub public_key: String,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: BTreeSet<IpNet>,
}

/// What one apply changes, computed before any of it is done.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PeerPlan {
    pub add: Vec<PeerSpec>,
    /// Same key, different endpoint or allowed IPs.
    pub change: Vec<PeerSpec>,
    /// Public keys.
    pub remove: Vec<String>,
    pub routes_add: Vec<IpNet>,
    pub routes_remove: Vec<IpNet>,
    /// The peers after the plan, by public key.
    pub peers: BTreeMap<String, PeerSpec>,
}

impl PeerPlan {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty()
            && self.change.is_empty()
            && self.remove.is_empty()
            && self.routes_add.is_empty()
            && self.routes_remove.is_empty()
    }
}

/// Diffs the programmed peers and routes against the desired peers. Pure; rejects a peer set
/// the device could not hold faithfully (a key twice, an allowed IP claimed twice: the device
/// would silently give it to the last peer). A peer without a key (from a source that also
/// feeds IPsec, such as a Node without a key annotation) cannot be a WireGuard peer: it is
/// left out with a warning, the others are programmed.
pub fn plan(
    programmed: &BTreeMap<String, PeerSpec>,
    routes: &BTreeSet<IpNet>,
    desired: &[Peer],
) -> Result<PeerPlan> {
    let mut peers = BTreeMap::new();
    let mut owner: BTreeMap<IpNet, &str> = BTreeMap::new();
    let mut wanted_routes = BTreeSet::new();
    for p in desired {
        if p.public_key.is_empty() {
            warn!(peer = p.name, "peer has no WireGuard public key: left out");
            continue;
        }
        if Key::from_base64(&p.public_key).is_err() {
            warn!(
                peer = p.name,
                key = p.public_key,
                "not a WireGuard public key: peer left out"
            );
            continue;
        }
        for net in &p.allowed_ips {
            if let Some(other) = owner.insert(*net, &p.name) {
                bail!("allowed IP {net} is claimed by peers {other:?} and {:?}", p.name);
            }
            // The tunnel's own packets go to the endpoint: routing it into the tunnel would
            // loop them. Packets from it are still accepted through the tunnel.
            if !p.endpoint.is_some_and(|e| net.contains(&e.ip())) {
                wanted_routes.insert(*net);
            }
        }
        let spec = PeerSpec {
            name: p.name.clone(),
            public_key: p.public_key.clone(),
            endpoint: p.endpoint,
            allowed_ips: p.allowed_ips.iter().copied().collect(),
        };
        if peers.insert(p.public_key.clone(), spec).is_some() {
            bail!(
                "two peers have the public key {} (the second is {:?})",
                p.public_key,
                p.name
            );
        }
    }
    let mut plan = PeerPlan::default();
    for (key, want) in &peers {
        match programmed.get(key) {
            None => plan.add.push(want.clone()),
            Some(have) if have.endpoint != want.endpoint || have.allowed_ips != want.allowed_ips => {
                plan.change.push(want.clone())
            }
            Some(_) => {}
        }
    }
    plan.remove = programmed
        .keys()
        .filter(|k| !peers.contains_key(*k))
        .cloned()
        .collect();
    plan.routes_add = wanted_routes.difference(routes).copied().collect();
    plan.routes_remove = routes.difference(&wanted_routes).copied().collect();
    plan.peers = peers;
    Ok(plan)
}

/// Reads the private key, or creates it (mode 0600) on first start. Its content is never logged.
pub fn load_or_create_private_key(path: &Path) -> Result<Key> {
    if path.exists() {
        let text = crate::secret_file::read(path, "WireGuard private key file")?;
        return Key::from_base64(text.trim())
            .map_err(|_| anyhow!("{}: not a base64 WireGuard private key", path.display()));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let key = Key::generate_private();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(file, "{}", key.to_base64())?;
    file.sync_all()?;
    info!(path = %path.display(), "generated a WireGuard private key");
    Ok(key)
}

/// boringtun running inside the daemon, with the UAPI socket in front of it.
struct Userspace {
    // Dropped first: closing boringtun's UAPI pair makes its threads exit.
    _uapi: UapiSocket,
    _device: boringtun::device::DeviceHandle,
}

enum Device {
    Kernel,
    Userspace(Userspace),
}

pub struct WireGuard {
    settings: WireGuardSettings,
    iface: InterfaceName,
    device: Device,
    ifindex: u32,
    public_key: Key,
    peers: BTreeMap<String, PeerSpec>,
    routes: BTreeSet<IpNet>,
    netlink: Handle,
}

impl WireGuard {
    /// Creates (or adopts) the device, sets its key and port, brings it up. Peers come with
    /// [`WireGuard::apply`].
    pub async fn start(settings: &WireGuardSettings, netlink: Handle) -> Result<Self> {
        let private_key = load_or_create_private_key(&settings.private_key_file)?;
        let iface: InterfaceName = settings
            .interface
            .parse()
            .map_err(|e| anyhow!("interface {:?}: {e}", settings.interface))?;
        let (device, created) = create_device(settings, &netlink).await?;
        let ifindex = nix::net::if_::if_nametoindex(settings.interface.as_str())
            .with_context(|| format!("the WireGuard interface {} vanished", settings.interface))?;
        let mut wg = WireGuard {
            settings: settings.clone(),
            iface,
            device,
            ifindex,
            public_key: private_key.get_public(),
            peers: BTreeMap::new(),
            routes: BTreeSet::new(),
            netlink,
        };
        if let Err(e) = wg.configure(private_key).await {
            // Nothing half-made stays: a kernel device this start created goes (a boringtun
            // device goes when `wg` is dropped).
            if created && matches!(wg.device, Device::Kernel) {
                let _ = wg.netlink.link().del(wg.ifindex).execute().await;
            }
            return Err(e);
        }
        info!(
            interface = settings.interface,
            implementation = wg.implementation(),
            public_key = wg.public_key.to_base64(),
            port = settings.listen_port,
            "WireGuard device ready"
        );
        Ok(wg)
    }

    /// Key and port, link up, and the peers and routes already there.
    async fn configure(&mut self, private_key: Key) -> Result<()> {
        DeviceUpdate::new()
            .set_private_key(private_key)
            .set_listen_port(self.settings.listen_port)
            .apply(&self.iface, self.backend())
            .with_context(|| format!("configuring {}", self.settings.interface))?;
        self.configure_link().await?;
        self.adopt().await
    }

    fn backend(&self) -> Backend {
        match self.device {
            Device::Kernel => Backend::Kernel,
            Device::Userspace(_) => Backend::Userspace,
        }
    }

    pub fn implementation(&self) -> &'static str {
        match self.device {
            Device::Kernel => "kernel",
            Device::Userspace(_) => "userspace",
        }
    }

    /// MTU, up, and the configured address.
    async fn configure_link(&self) -> Result<()> {
        self.netlink
            .link()
            .set(LinkUnspec::new_with_index(self.ifindex).mtu(MTU).up().build())
            .execute()
            .await
            .context("bringing the WireGuard interface up")?;
        if let Some(address) = self.settings.address {
            let mut add = self
                .netlink
                .address()
                .add(self.ifindex, address.addr(), address.prefix_len())
                .replace();
            if address.addr().is_ipv6() {
                add.message_mut().header.flags = rtnetlink::packet_route::address::AddressHeaderFlags::Nodad;
            }
            add.execute()
                .await
                .with_context(|| format!("assigning {address} to {}", self.settings.interface))?;
        }
        Ok(())
    }

    /// Takes over the peers and routes a kernel device kept from a previous daemon, so the
    /// first plan changes only what differs.
    async fn adopt(&mut self) -> Result<()> {
        let device = wireguard_control::Device::get(&self.iface, self.backend())
            .with_context(|| format!("reading {}", self.settings.interface))?;
        for p in device.peers {
            let key = p.config.public_key.to_base64();
            self.peers.insert(
                key.clone(),
                PeerSpec {
                    name: String::new(),
                    public_key: key,
                    endpoint: p.config.endpoint,
                    allowed_ips: p
                        .config
                        .allowed_ips
                        .iter()
                        .filter_map(|a| IpNet::new(a.address, a.cidr).ok())
                        .collect(),
                },
            );
        }
        for v6 in [false, true] {
            let request = if v6 {
                RouteMessageBuilder::<std::net::Ipv6Addr>::new().build()
            } else {
                RouteMessageBuilder::<std::net::Ipv4Addr>::new().build()
            };
            let mut routes = self.netlink.route().get(request).execute();
            while let Some(route) = routes.try_next().await? {
                if route.header.protocol == RouteProtocol::Static && route_oif(&route) == Some(self.ifindex) {
                    if let Some(dst) = route_destination(&route) {
                        self.routes.insert(dst);
                    }
                }
            }
        }
        if !self.peers.is_empty() {
            info!(
                peers = self.peers.len(),
                routes = self.routes.len(),
                "adopted the peers of the existing WireGuard device"
            );
        }
        Ok(())
    }

    pub fn plan(&self, desired: &[Peer]) -> Result<PeerPlan> {
        plan(&self.peers, &self.routes, desired)
    }

    /// Executes a plan made by [`WireGuard::plan`]: the device first, then the routes.
    pub async fn apply(&mut self, plan: PeerPlan) -> Result<()> {
        let key = |k: &str| Key::from_base64(k).map_err(|_| anyhow!("invalid key {k}"));
        let peer_config = |p: &PeerSpec| -> Result<PeerConfigBuilder> {
            let mut b = PeerConfigBuilder::new(&key(&p.public_key)?).replace_allowed_ips();
            if let Some(endpoint) = p.endpoint {
                b = b.set_endpoint(endpoint);
            }
            for net in &p.allowed_ips {
                b = b.add_allowed_ip(net.addr(), net.prefix_len());
            }
            Ok(b)
        };
        let set = |update: DeviceUpdate| {
            update
                .apply(&self.iface, self.backend())
                .with_context(|| format!("configuring the peers of {}", self.settings.interface))
        };
        match self.device {
            Device::Kernel => {
                // One batch; a changed peer is updated in place, its session kept.
                let mut update = DeviceUpdate::new();
                for k in &plan.remove {
                    update = update.remove_peer_by_key(&key(k)?);
                }
                for p in plan.change.iter().chain(&plan.add) {
                    update = update.add_peer(peer_config(p)?);
                }
                if !(plan.add.is_empty() && plan.change.is_empty() && plan.remove.is_empty()) {
                    set(update)?;
                }
            }
            Device::Userspace(_) => {
                // boringtun 0.7 carries a peer section's settings (remove, endpoint, ...) over
                // into the next section of the same request, and panics (killing a worker
                // thread) when asked to modify a peer: one request per peer, and a changed
                // peer is removed and added again (its session restarts, no other's does). A
                // new peer is removed first as well, a no-op unless someone added it behind
                // gatewayd's back with `wg set`, so an add is never a modification.
                for k in plan
                    .remove
                    .iter()
                    .chain(plan.change.iter().chain(&plan.add).map(|p| &p.public_key))
                {
                    set(DeviceUpdate::new().remove_peer_by_key(&key(k)?))?;
                }
                for p in plan.change.iter().chain(&plan.add) {
                    set(DeviceUpdate::new().add_peer(peer_config(p)?))?;
                }
            }
        }
        if !(plan.add.is_empty() && plan.change.is_empty() && plan.remove.is_empty()) {
            info!(
                added = plan.add.len(),
                changed = plan.change.len(),
                removed = plan.remove.len(),
                "WireGuard peers updated"
            );
        }
        self.peers = plan.peers;
        for net in plan.routes_add {
            match self.add_route(net).await {
                Ok(()) => {
                    self.routes.insert(net);
                }
                Err(e) => warn!(%net, "cannot route into the WireGuard interface: {e:#}"),
            }
        }
        for net in plan.routes_remove {
            if let Err(e) = self.delete_route(net).await {
                warn!(%net, "cannot remove the route into the WireGuard interface: {e:#}");
            }
            self.routes.remove(&net);
        }
        Ok(())
    }

    fn route_message(&self, net: IpNet) -> Result<RouteMessage> {
        Ok(RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(net.addr(), net.prefix_len())?
            .output_interface(self.ifindex)
            .protocol(RouteProtocol::Static)
            .build())
    }

    async fn add_route(&self, net: IpNet) -> Result<()> {
        self.netlink
            .route()
            .add(self.route_message(net)?)
            .replace()
            .execute()
            .await?;
        Ok(())
    }

    async fn delete_route(&self, net: IpNet) -> Result<()> {
        match self.netlink.route().del(self.route_message(net)?).execute().await {
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => Ok(()),
            r => Ok(r?),
        }
    }

    /// Removes the routes and the device (a reload that leaves WireGuard mode). The daemon's
    /// ordinary stop keeps a kernel device instead, like the eBPF pins.
    pub async fn shutdown(mut self) {
        for net in std::mem::take(&mut self.routes) {
            let _ = self.delete_route(net).await;
        }
        match std::mem::replace(&mut self.device, Device::Kernel) {
            Device::Kernel => {
                if let Err(e) = self.netlink.link().del(self.ifindex).execute().await {
                    warn!(
                        interface = self.settings.interface,
                        "cannot delete the WireGuard interface: {e}"
                    );
                }
            }
            // Dropping it ends boringtun, and the TUN interface goes with it.
            Device::Userspace(u) => drop(u),
        }
        info!(interface = self.settings.interface, "WireGuard device removed");
    }

    pub fn status(&self) -> Result<api::WireGuardStatus> {
        let device = wireguard_control::Device::get(&self.iface, self.backend())
            .with_context(|| format!("reading {}", self.settings.interface))?;
        let now = SystemTime::now();
        let userspace_ages = match self.device {
            Device::Kernel => BTreeMap::new(),
            Device::Userspace(_) => uapi::handshake_ages(&self.settings.interface)?,
        };
        let peers = device
            .peers
            .iter()
            .map(|p| {
                let key = p.config.public_key.to_base64();
                let handshake_age_seconds = match self.device {
                    Device::Kernel => p
                        .stats
                        .last_handshake_time
                        .map(|t| now.duration_since(t).unwrap_or_default().as_secs()),
                    Device::Userspace(_) => userspace_ages
                        .get(&hex::encode(p.config.public_key.as_bytes()))
                        .copied(),
                };
                api::WireGuardPeerStatus {
                    name: self.peers.get(&key).map(|s| s.name.clone()).unwrap_or_default(),
                    public_key: key,
                    endpoint: p.config.endpoint.map(|e| e.to_string()),
                    allowed_ips: p
                        .config
                        .allowed_ips
                        .iter()
                        .map(|a| format!("{}/{}", a.address, a.cidr))
                        .collect(),
                    handshake_age_seconds,
                    rx_bytes: p.stats.rx_bytes,
                    tx_bytes: p.stats.tx_bytes,
                }
            })
            .collect();
        Ok(api::WireGuardStatus {
            interface: self.settings.interface.clone(),
            implementation: self.implementation().into(),
            public_key: self.public_key.to_base64(),
            listen_port: device.listen_port.unwrap_or(self.settings.listen_port),
            peers,
        })
    }
}

fn route_oif(route: &RouteMessage) -> Option<u32> {
    route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

fn route_destination(route: &RouteMessage) -> Option<IpNet> {
    use rtnetlink::packet_route::route::RouteAddress;
    route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(v4)) => {
            IpNet::new(IpAddr::V4(*v4), route.header.destination_prefix_length).ok()
        }
        RouteAttribute::Destination(RouteAddress::Inet6(v6)) => {
            IpNet::new(IpAddr::V6(*v6), route.header.destination_prefix_length).ok()
        }
        _ => None,
    })
}

/// The kind of an existing link of that name (`Some("wireguard")`, `Some("tun")`...), None when
/// there is no such link.
async fn link_kind(netlink: &Handle, name: &str) -> Result<Option<String>> {
    let mut links = netlink.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(Some(
            link.attributes
                .iter()
                .find_map(|a| match a {
                    LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                        LinkInfo::Kind(InfoKind::Wireguard) => Some("wireguard".to_owned()),
                        LinkInfo::Kind(k) => Some(k.to_string()),
                        _ => None,
                    }),
                    _ => None,
                })
                .unwrap_or_default(),
        )),
        Ok(None) => Ok(None),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The device, and whether this call created it (false: a kernel device adopted).
async fn create_device(settings: &WireGuardSettings, netlink: &Handle) -> Result<(Device, bool)> {
    let name = settings.interface.as_str();
    match link_kind(netlink, name).await? {
        Some(kind) if kind == "wireguard" => {
            if settings.implementation == WireGuardImplementation::Userspace {
                bail!("{name} exists as a kernel WireGuard device; delete it (ip link del {name}) or set implementation = \"kernel\"");
            }
            info!(interface = name, "adopting the existing kernel WireGuard device");
            return Ok((Device::Kernel, false));
        }
        Some(kind) => {
            bail!("interface {name} already exists and is not gatewayd's WireGuard device (kind {kind:?})")
        }
        None => {}
    }
    if settings.implementation != WireGuardImplementation::Userspace {
        match netlink
            .link()
            .add(LinkWireguard::new(name).build())
            .execute()
            .await
        {
            Ok(()) => return Ok((Device::Kernel, true)),
            Err(e) if settings.implementation == WireGuardImplementation::Kernel => {
                bail!("cannot create a kernel WireGuard device {name} (is the wireguard module available? CONFIG_WIREGUARD): {e}")
            }
            Err(e) => info!(
                interface = name,
                "no kernel WireGuard ({e}): running boringtun in the daemon"
            ),
        }
    }
    Ok((Device::Userspace(start_boringtun(name)?), true))
}

fn start_boringtun(name: &str) -> Result<Userspace> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let config = boringtun::device::DeviceConfig {
        // One thread per core of these small appliances; more only contend for the TUN queue.
        n_threads: std::thread::available_parallelism().map_or(2, |n| n.get().min(4)),
        use_connected_socket: true,
        use_multi_queue: true,
        // boringtun owns this end from here on (and closes it).
        uapi_fd: theirs.into_raw_fd(),
    };
    let device = boringtun::device::DeviceHandle::new(name, config)
        .map_err(|e| anyhow!("starting boringtun on {name}: {e:?}"))?;
    let uapi = UapiSocket::serve(name, ours)?;
    // The UAPI answers once boringtun's threads run; a first request waits for them.
    std::thread::sleep(Duration::from_millis(10));
    Ok(Userspace {
        _uapi: uapi,
        _device: device,
    })
}

/// `gatewayd teardown`: the kernel device (and with it its routes), and a UAPI socket left
/// behind. A boringtun device ended with its daemon.
pub async fn teardown(interface: &str, netlink: &Handle) -> Result<()> {
    if let Some(kind) = link_kind(netlink, interface).await? {
        if kind == "wireguard" {
            let index = nix::net::if_::if_nametoindex(interface)?;
            netlink.link().del(index).execute().await?;
            info!(interface, "deleted the WireGuard interface");
        }
    }
    let _ = std::fs::remove_file(uapi::socket_path(interface));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> String {
        Key([n; 32]).to_base64()
    }

    fn peer(name: &str, n: u8, endpoint: Option<&str>, ips: &[&str]) -> Peer {
        Peer {
            name: name.into(),
            public_key: key(n),
            endpoint: endpoint.map(|e| e.parse().unwrap()),
            allowed_ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
        }
    }

    /// Applies a plan to the programmed state, as the executor does.
    fn programmed(desired: &[Peer]) -> (BTreeMap<String, PeerSpec>, BTreeSet<IpNet>) {
        let p = plan(&BTreeMap::new(), &BTreeSet::new(), desired).unwrap();
        (p.peers, p.routes_add.into_iter().collect())
    }

    #[test]
    fn new_peers_are_added_with_their_routes() {
        let desired = [peer(
            "a",
            1,
            Some("10.0.0.2:51820"),
            &["10.244.1.0/24", "10.99.0.2/32"],
        )];
        let p = plan(&BTreeMap::new(), &BTreeSet::new(), &desired).unwrap();
        assert_eq!(p.add.len(), 1);
        assert!(p.change.is_empty() && p.remove.is_empty());
        assert_eq!(
            p.routes_add,
            ["10.99.0.2/32".parse().unwrap(), "10.244.1.0/24".parse().unwrap()]
        );
    }

    #[test]
    fn unchanged_peers_are_not_touched_when_others_come_and_go() {
        let a = peer("a", 1, Some("10.0.0.2:51820"), &["10.244.1.0/24"]);
        let b = peer("b", 2, Some("10.0.0.3:51820"), &["10.244.2.0/24"]);
        let (peers, routes) = programmed(&[a.clone(), b.clone()]);
        let c = peer("c", 3, None, &["10.244.3.0/24"]);
        let p = plan(&peers, &routes, &[a.clone(), c]).unwrap();
        assert_eq!(p.add.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["c"]);
        assert_eq!(p.remove, [key(2)]);
        assert!(p.change.is_empty(), "a must keep its session");
        assert_eq!(p.routes_add, ["10.244.3.0/24".parse().unwrap()]);
        assert_eq!(p.routes_remove, ["10.244.2.0/24".parse().unwrap()]);
        // Same config again: nothing to do.
        let again = plan(
            &p.peers,
            &routes_after(&routes, &p),
            &[a, peer("c", 3, None, &["10.244.3.0/24"])],
        )
        .unwrap();
        assert!(again.is_empty(), "{again:?}");
    }

    fn routes_after(routes: &BTreeSet<IpNet>, p: &PeerPlan) -> BTreeSet<IpNet> {
        let mut r = routes.clone();
        r.extend(p.routes_add.iter().copied());
        for n in &p.routes_remove {
            r.remove(n);
        }
        r
    }

    #[test]
    fn endpoint_or_allowed_ip_changes_change_only_that_peer() {
        let a = peer("a", 1, Some("10.0.0.2:51820"), &["10.244.1.0/24"]);
        let b = peer("b", 2, Some("10.0.0.3:51820"), &["10.244.2.0/24"]);
        let (peers, routes) = programmed(&[a.clone(), b.clone()]);
        let moved = peer(
            "b",
            2,
            Some("10.0.0.9:51820"),
            &["10.244.2.0/24", "10.244.9.0/24"],
        );
        let p = plan(&peers, &routes, &[a, moved]).unwrap();
        assert!(p.add.is_empty() && p.remove.is_empty());
        assert_eq!(p.change.len(), 1);
        assert_eq!(p.change[0].public_key, key(2));
        assert_eq!(p.routes_add, ["10.244.9.0/24".parse().unwrap()]);
        assert!(p.routes_remove.is_empty());
    }

    #[test]
    fn the_endpoint_is_never_routed_into_its_own_tunnel() {
        let desired = [peer(
            "a",
            1,
            Some("10.0.0.2:51820"),
            &["10.244.1.0/24", "10.0.0.2/32", "10.0.0.0/24"],
        )];
        let p = plan(&BTreeMap::new(), &BTreeSet::new(), &desired).unwrap();
        assert_eq!(p.routes_add, ["10.244.1.0/24".parse().unwrap()]);
        assert_eq!(
            p.add[0].allowed_ips.len(),
            3,
            "the device still accepts them from the peer"
        );
    }

    #[test]
    fn a_renamed_peer_is_no_device_change() {
        let (peers, routes) = programmed(&[peer("a", 1, None, &["10.1.0.0/16"])]);
        let p = plan(&peers, &routes, &[peer("node-a", 1, None, &["10.1.0.0/16"])]).unwrap();
        assert!(p.is_empty());
        assert_eq!(p.peers[&key(1)].name, "node-a");
    }

    #[test]
    fn ambiguous_peer_sets_are_rejected_and_keyless_peers_left_out() {
        let none = BTreeMap::new();
        let routes = BTreeSet::new();
        let dup_key = [peer("a", 1, None, &[]), peer("b", 1, None, &[])];
        assert!(plan(&none, &routes, &dup_key)
            .unwrap_err()
            .to_string()
            .contains("two peers"));
        let dup_ip = [
            peer("a", 1, None, &["10.1.0.0/16"]),
            peer("b", 2, None, &["10.1.0.0/16"]),
        ];
        let e = plan(&none, &routes, &dup_ip).unwrap_err().to_string();
        assert!(
            e.contains("10.1.0.0/16") && e.contains("\"a\"") && e.contains("\"b\""),
            "{e}"
        );
        let mut keyless = peer("c", 3, None, &["10.3.0.0/16"]);
        keyless.public_key.clear();
        let p = plan(&none, &routes, &[keyless, peer("d", 4, None, &[])]).unwrap();
        assert_eq!(
            p.add.len(),
            1,
            "the keyless peer is left out, the other programmed"
        );
        assert!(p.routes_add.is_empty());
    }

    #[test]
    fn private_key_is_created_0600_once_and_then_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("gd-wgkey-{}", std::process::id()));
        let path = dir.join("sub/wireguard.key");
        let first = load_or_create_private_key(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let second = load_or_create_private_key(&path).unwrap();
        assert_eq!(first.to_base64(), second.to_base64());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        load_or_create_private_key(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::write(&path, "not a key\n").unwrap();
        let e = load_or_create_private_key(&path).unwrap_err().to_string();
        assert!(
            e.contains("not a base64 WireGuard private key") && !e.contains("not a key"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
