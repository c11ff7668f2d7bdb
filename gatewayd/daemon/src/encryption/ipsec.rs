//! IPsec: tunnel-mode ESP with AES-GCM (`rfc4106(gcm(aes))`), programmed as XFRM states and
//! policies over netlink.
//!
//! Keys: a file of pre-shared keys by id (1..255); the last line is the current key. Each
//! direction of each node pair gets its own key, derived with HKDF-SHA256 from the pre-shared
//! key, the key id and the (sender, receiver) addresses: no two pairs share a key, and the two
//! directions of one pair never use the same key and nonce sequence (GCM forbids it). Both ends
//! derive the same keys from the same file, with no key exchange. The SPI is the key id.
//!
//! Rotation: a new current key gets its states installed next to the old ones; the kernel sends
//! with the newest outbound state, and receives on both, until `rotation_overlap` seconds later
//! the old states are removed.
//!
//! Everything gatewayd installs carries the request id [`REQID`]: that is how teardown (and a
//! restarted daemon) finds its states and policies, and leaves anyone else's alone.

use anyhow::{anyhow, bail, Context, Result};
use futures_util::TryStreamExt;
use gatewayd_common::api;
use hkdf::Hkdf;
use ipnet::IpNet;
use netlink_packet_xfrm::{
    Address, UserTemplate, IPPROTO_ESP, XFRM_MODE_TUNNEL, XFRM_POLICY_ALLOW, XFRM_POLICY_FWD, XFRM_POLICY_IN,
    XFRM_POLICY_OUT,
};
use sha2::Sha256;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;
use tracing::{error, info, warn};

use crate::config::IpsecSettings;
use crate::model::{parse_key_file, IpsecKeys, KeyFile, Peer, MIN_PSK_LEN};

/// Marks gatewayd's XFRM states and policy templates ("gd" and 1).
pub const REQID: u32 = 0x6764_0001;
/// The AEAD: AES-256-GCM with a 4-byte salt after the key (RFC 4106), 128-bit ICV.
pub const AEAD: &str = "rfc4106(gcm(aes))";
const AEAD_KEY_LEN: usize = 32 + 4;
const ICV_BITS: u32 = 128;
/// An SPI no key id can have, for the start-up probe.
const PROBE_SPI: u32 = 0x6764_ffff;

/// The key file (`encryption.ipsec.key_file`), read and parsed.
pub fn read_key_file(path: &Path) -> Result<KeyFile> {
    let text = crate::secret_file::read(path, "IPsec key file")?;
    parse_key_file(&text).with_context(|| format!("{}", path.display()))
}

/// The AEAD key (32 bytes AES key, 4 bytes salt) of traffic from `sender` to `receiver`
/// under key `id`.
pub fn derive_key(psk: &[u8], id: u8, sender: IpAddr, receiver: IpAddr) -> [u8; AEAD_KEY_LEN] {
    let mut info = b"gatewayd ipsec v1".to_vec();
    info.push(id);
    for a in [sender, receiver] {
        match a {
            IpAddr::V4(v4) => info.extend_from_slice(&v4.to_ipv6_mapped().octets()),
            IpAddr::V6(v6) => info.extend_from_slice(&v6.octets()),
        }
    }
    let mut out = [0u8; AEAD_KEY_LEN];
    Hkdf::<Sha256>::new(None, psk)
        .expand(&info, &mut out)
        .expect("36 bytes is a valid HKDF-SHA256 output length");
    out
}

/// A key whose states are installed, and when it stops being accepted. Debug leaves the key
/// out.
#[derive(Clone, PartialEq, Eq)]
pub struct InstalledKey {
    pub psk: Vec<u8>,
    /// Unix seconds after which its states go; None while it is the current key.
    pub retire_at: Option<u64>,
}

impl std::fmt::Debug for InstalledKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstalledKey")
            .field("retire_at", &self.retire_at)
            .finish_non_exhaustive()
    }
}

/// The keys after a plan, and which ids gain or lose their states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPlan {
    pub keys: BTreeMap<u8, InstalledKey>,
    pub current: u8,
    pub install: Vec<u8>,
    pub remove: Vec<u8>,
}

/// Rotation: the file's current key is installed; a key that stops being current stays for
/// `overlap` seconds from `now`; keys past their time are removed. Pure.
pub fn plan_keys(
    installed: &BTreeMap<u8, InstalledKey>,
    file: &KeyFile,
    now: u64,
    overlap: u32,
) -> Result<KeyPlan> {
    let current = file.current();
    let psk = file.get(current).expect("current key is in the file");
    let mut keys = installed.clone();
    let mut install = Vec::new();
    match keys.get_mut(&current) {
        Some(k) if k.psk != psk => {
            bail!("key id {current} now has a different key: a new key needs a new id (the id is the SPI)")
        }
        Some(k) => k.retire_at = None,
        None => {
            keys.insert(
                current,
                InstalledKey {
                    psk: psk.to_vec(),
                    retire_at: None,
                },
            );
            install.push(current);
        }
    }
    let mut remove = Vec::new();
    for (id, k) in keys.iter_mut().filter(|(id, _)| **id != current) {
        let deadline = *k.retire_at.get_or_insert(now + u64::from(overlap));
        if deadline <= now {
            remove.push(*id);
        }
    }
    for id in &remove {
        keys.remove(id);
    }
    Ok(KeyPlan {
        keys,
        current,
        install,
        remove,
    })
}

/// One XFRM state: traffic from `src` to `dst` under key `spi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct StateId {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub spi: u32,
}

/// One XFRM policy: traffic matching the selector goes through the tunnel `local`<->`remote`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PolicyId {
    pub direction: u8,
    pub src: IpNet,
    pub dst: IpNet,
    /// The tunnel's outer source and destination.
    pub tunnel_src: IpAddr,
    pub tunnel_dst: IpAddr,
}

/// Everything the peers need: states for each installed key both ways, and out/in/fwd policies
/// for each allowed network. A peer of the other address family than `local` has no tunnel.
pub fn desired_xfrm(
    local: IpAddr,
    peers: &[Peer],
    key_ids: impl IntoIterator<Item = u8> + Clone,
) -> (BTreeSet<StateId>, BTreeSet<PolicyId>) {
    let mut states = BTreeSet::new();
    let mut policies = BTreeSet::new();
    let any = IpNet::new(
        if local.is_ipv4() {
            IpAddr::from([0u8; 4])
        } else {
            IpAddr::from([0u16; 8])
        },
        0,
    )
    .expect("prefix 0 is valid");
    for peer in peers {
        let Some(remote) = peer.endpoint.map(|e| e.ip()) else {
            continue;
        };
        if remote.is_ipv4() != local.is_ipv4() || remote == local {
            continue;
        }
        for id in key_ids.clone() {
            states.insert(StateId {
                src: local,
                dst: remote,
                spi: id.into(),
            });
            states.insert(StateId {
                src: remote,
                dst: local,
                spi: id.into(),
            });
        }
        for net in &peer.allowed_ips {
            // The tunnel endpoint itself stays outside the tunnel (as with WireGuard): a network
            // holding it would select the tunnel's own packets.
            if net.addr().is_ipv4() != local.is_ipv4() || net.contains(&remote) {
                continue;
            }
            policies.insert(PolicyId {
                direction: XFRM_POLICY_OUT,
                src: any,
                dst: *net,
                tunnel_src: local,
                tunnel_dst: remote,
            });
            for direction in [XFRM_POLICY_IN, XFRM_POLICY_FWD] {
                policies.insert(PolicyId {
                    direction,
                    src: *net,
                    dst: any,
                    tunnel_src: remote,
                    tunnel_dst: local,
                });
            }
        }
    }
    (states, policies)
}

/// The kernel feature behind an XFRM state failure, for an error that says what to load.
fn missing_feature(code: i32) -> Option<&'static str> {
    match -code {
        libc::EPROTONOSUPPORT => Some(
            "the kernel has no ESP support: XFRM states fail with \"Requested type not found\"; \
             load the esp4/esp6 modules (CONFIG_INET_ESP, CONFIG_INET6_ESP)",
        ),
        libc::ENOSYS => Some(
            "the kernel cannot do ESP with rfc4106(gcm(aes)): XFRM states fail with \"Requested AEAD algorithm not found\"; \
             it needs ESP (esp4/esp6 modules, CONFIG_INET_ESP, CONFIG_INET6_ESP) and AES-GCM (CONFIG_CRYPTO_GCM)",
        ),
        _ => None,
    }
}

fn netlink_code(e: &xfrmnetlink::Error) -> Option<i32> {
    match e {
        xfrmnetlink::Error::NetlinkError(m) => m.code.map(|c| c.get()),
        _ => None,
    }
}

/// gatewayd's XFRM states and policies in the current network namespace, over netlink.
pub struct Xfrm {
    handle: xfrmnetlink::Handle,
}

impl Xfrm {
    /// Opens the XFRM netlink socket; its connection runs on the current tokio runtime.
    pub fn open() -> Result<Self> {
        let (connection, handle, _) =
            xfrmnetlink::new_connection().context("opening the XFRM netlink socket")?;
        tokio::spawn(connection);
        Ok(Xfrm { handle })
    }

    /// Installs the state of `s`, keyed from `psk`. A kernel without ESP (or AES-GCM) fails
    /// with the missing feature named.
    pub async fn add_state(&self, s: StateId, psk: &[u8]) -> Result<()> {
        let key = derive_key(psk, s.spi as u8, s.src, s.dst).to_vec();
        self.handle
            .state()
            .add(s.src, s.dst)
            .protocol(IPPROTO_ESP)
            .spi(s.spi)
            .mode(XFRM_MODE_TUNNEL)
            .reqid(REQID)
            .replay_window(32, 0, 0, 0, 0)
            .encryption_aead(AEAD, &key, ICV_BITS)?
            .execute()
            .await
            .map_err(|e| {
                let why = netlink_code(&e)
                    .and_then(missing_feature)
                    .map_or_else(|| e.to_string(), str::to_owned);
                anyhow!(
                    "installing the ESP state {} -> {} spi {}: {why}",
                    s.src,
                    s.dst,
                    s.spi
                )
            })
    }

    /// Adds and removes a state with CBC/HMAC instead of the AEAD; the netlink error code if
    /// the kernel refuses it.
    async fn probe_esp_without_aead(&self, s: StateId) -> Option<i32> {
        let request = self
            .handle
            .state()
            .add(s.src, s.dst)
            .protocol(IPPROTO_ESP)
            .spi(s.spi)
            .mode(XFRM_MODE_TUNNEL)
            .reqid(REQID)
            .encryption("cbc(aes)", &vec![0u8; 16])
            .ok()?
            .authentication("hmac(sha256)", &vec![0u8; 32])
            .ok()?;
        match request.execute().await {
            Ok(()) => {
                let _ = self.delete_state(s).await;
                None
            }
            Err(e) => netlink_code(&e),
        }
    }

    pub async fn delete_state(&self, s: StateId) -> Result<()> {
        match self
            .handle
            .state()
            .delete(s.src, s.dst)
            .protocol(IPPROTO_ESP)
            .spi(s.spi)
            .execute()
            .await
        {
            Err(e) if netlink_code(&e) == Some(-libc::ESRCH) => Ok(()),
            r => r.with_context(|| format!("removing the ESP state {} -> {} spi {}", s.src, s.dst, s.spi)),
        }
    }

    pub async fn add_policy(&self, p: &PolicyId) -> Result<()> {
        let template = UserTemplate {
            id: netlink_packet_xfrm::Id {
                daddr: Address::from_ip(&p.tunnel_dst),
                spi: 0,
                proto: IPPROTO_ESP,
            },
            family: if p.tunnel_dst.is_ipv4() {
                libc::AF_INET as u16
            } else {
                libc::AF_INET6 as u16
            },
            saddr: Address::from_ip(&p.tunnel_src),
            reqid: REQID,
            mode: XFRM_MODE_TUNNEL,
            ..Default::default()
        };
        self.handle
            .policy()
            .add(p.src.addr(), p.src.prefix_len(), p.dst.addr(), p.dst.prefix_len())
            .direction(p.direction)
            .action(XFRM_POLICY_ALLOW)
            .add_template(template)
            .execute()
            .await
            .with_context(|| {
                format!(
                    "installing the XFRM policy {} -> {} (direction {})",
                    p.src, p.dst, p.direction
                )
            })
    }

    pub async fn delete_policy(&self, p: &PolicyId) -> Result<()> {
        match self
            .handle
            .policy()
            .delete(p.src.addr(), p.src.prefix_len(), p.dst.addr(), p.dst.prefix_len())
            .direction(p.direction)
            .execute()
            .await
        {
            Err(e) if netlink_code(&e) == Some(-libc::ENOENT) => Ok(()),
            r => r.with_context(|| format!("removing the XFRM policy {} -> {}", p.src, p.dst)),
        }
    }

    /// States and policies carrying [`REQID`], as the kernel has them.
    pub async fn installed(&self) -> Result<(Vec<StateId>, Vec<PolicyId>)> {
        let mut states = Vec::new();
        let mut dump = self.handle.state().get_dump().execute();
        while let Some(s) = dump.try_next().await? {
            let info = &s.user_sa_info;
            if info.reqid == REQID {
                let v4 = info.family == libc::AF_INET as u16;
                states.push(StateId {
                    src: address(&info.saddr, v4),
                    dst: address(&info.id.daddr, v4),
                    spi: info.id.spi,
                });
            }
        }
        let mut policies = Vec::new();
        let mut dump = self.handle.policy().get_dump().execute();
        while let Some(p) = dump.try_next().await? {
            let template = p.nlas.iter().find_map(|a| match a {
                netlink_packet_xfrm::XfrmAttrs::Template(t) => t.iter().find(|t| t.reqid == REQID),
                _ => None,
            });
            let Some(t) = template else { continue };
            let sel = &p.user_policy_info.selector;
            let v4 = sel.family == libc::AF_INET as u16;
            let tunnel_v4 = t.family == libc::AF_INET as u16;
            let (Ok(src), Ok(dst)) = (
                IpNet::new(address(&sel.saddr, v4), sel.prefixlen_s),
                IpNet::new(address(&sel.daddr, v4), sel.prefixlen_d),
            ) else {
                continue;
            };
            policies.push(PolicyId {
                direction: p.user_policy_info.direction,
                src,
                dst,
                tunnel_src: address(&t.saddr, tunnel_v4),
                tunnel_dst: address(&t.id.daddr, tunnel_v4),
            });
        }
        Ok((states, policies))
    }

    /// Removes every policy, then every state, carrying [`REQID`]: whatever gatewayd
    /// installed, by this daemon or an earlier one.
    pub async fn remove_installed(&self) -> Result<()> {
        let (states, policies) = self.installed().await?;
        for p in &policies {
            self.delete_policy(p).await?;
        }
        for s in &states {
            self.delete_state(*s).await?;
        }
        if !states.is_empty() || !policies.is_empty() {
            info!(
                states = states.len(),
                policies = policies.len(),
                "removed gatewayd's IPsec states and policies"
            );
        }
        Ok(())
    }
}

fn address(a: &Address, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(a.to_ipv4())
    } else {
        IpAddr::V6(a.to_ipv6())
    }
}

pub struct Ipsec {
    settings: IpsecSettings,
    local: IpAddr,
    /// The key file in force (read at start and on each reload).
    file: Option<KeyFile>,
    keys: BTreeMap<u8, InstalledKey>,
    current: u8,
    states: BTreeSet<StateId>,
    policies: BTreeSet<PolicyId>,
    /// Key ids of states a previous daemon left, until the first plan knows their keys.
    adopted_key_ids: BTreeSet<u8>,
    peers: Vec<Peer>,
    xfrm: Xfrm,
}

/// What [`Ipsec::plan`] decided, executed by [`Ipsec::apply`].
pub struct IpsecPlan {
    file: KeyFile,
    keys: KeyPlan,
    peers: Vec<Peer>,
    states: BTreeSet<StateId>,
    policies: BTreeSet<PolicyId>,
}

impl Ipsec {
    /// Checks that the kernel can install ESP states before anything is installed; fails with
    /// the missing kernel feature named, leaving no state or policy behind.
    pub async fn start(settings: &IpsecSettings) -> Result<Self> {
        let local = settings
            .local_address
            .context("encryption.ipsec.local_address is not set")?;
        let xfrm = Xfrm::open()?;
        // What a previous daemon left stays in force (removing it first would let traffic out
        // in the clear until the new states are in): the first plan keeps what it still wants
        // and removes the rest, after installing what is missing.
        let (states, policies) = xfrm.installed().await?;
        let ipsec = Ipsec {
            settings: settings.clone(),
            local,
            file: None,
            keys: BTreeMap::new(),
            current: 0,
            adopted_key_ids: states.iter().filter_map(|s| u8::try_from(s.spi).ok()).collect(),
            states: states.into_iter().collect(),
            policies: policies.into_iter().collect(),
            peers: Vec::new(),
            xfrm,
        };
        if !ipsec.states.is_empty() || !ipsec.policies.is_empty() {
            info!(
                states = ipsec.states.len(),
                policies = ipsec.policies.len(),
                "adopted the IPsec states and policies of a previous daemon"
            );
        }
        ipsec.probe_esp().await?;
        Ok(ipsec)
    }

    /// Installs and removes one state with the real algorithm, so a kernel without ESP or
    /// AES-GCM is found before any policy steers traffic into a tunnel that cannot exist.
    async fn probe_esp(&self) -> Result<()> {
        let probe = StateId {
            src: self.local,
            dst: self.local,
            spi: PROBE_SPI,
        };
        if let Err(e) = self.xfrm.add_state(probe, &[0u8; MIN_PSK_LEN]).await {
            // The kernel checks the algorithm before the protocol: find which one is missing.
            if self.xfrm.probe_esp_without_aead(probe).await == Some(-libc::EPROTONOSUPPORT) {
                bail!(
                    "IPsec mode cannot run: {}",
                    missing_feature(-libc::EPROTONOSUPPORT).expect("known code")
                );
            }
            return Err(e.context("IPsec mode cannot run"));
        }
        self.xfrm.delete_state(probe).await
    }

    /// What the peers and the keys need. Nothing is changed. The keys are the key file's,
    /// read now (a bad file fails the reload), or else `secret_keys`, those of
    /// `key_secret` as the model has them. `None`: no keys are known yet, nothing to do.
    pub fn plan(
        &self,
        peers: &[Peer],
        secret_keys: Option<&IpsecKeys>,
        now: u64,
    ) -> Result<Option<IpsecPlan>> {
        if let Some(path) = &self.settings.key_file {
            return self.plan_with(read_key_file(path)?, peers, now).map(Some);
        }
        // Keys from a Secret come with the cluster's other changes: bad keys (a missing Secret
        // is logged by the sync) leave the keys in force rather than hold those changes up.
        if let Some(keys) = secret_keys {
            match self.plan_with(keys.keys.clone(), peers, now) {
                Ok(plan) => return Ok(Some(plan)),
                Err(e) => error!("IPsec keys from {}: {e:#}; the keys in force stay", keys.origin),
            }
        }
        match &self.file {
            Some(file) => self.plan_with(file.clone(), peers, now).map(Some),
            None => {
                let secret = self.settings.key_secret.as_ref().map(|s| s.to_string());
                info!(
                    secret = secret.as_deref().unwrap_or_default(),
                    "no IPsec keys yet: no state or policy is installed (or removed) until they arrive"
                );
                Ok(None)
            }
        }
    }

    fn plan_with(&self, file: KeyFile, peers: &[Peer], now: u64) -> Result<IpsecPlan> {
        // Adopted states whose key is still in the file stay (and retire like any old key);
        // the others are removed by the plan.
        let mut installed = self.keys.clone();
        for id in &self.adopted_key_ids {
            if let Some(psk) = file.get(*id) {
                installed.entry(*id).or_insert_with(|| InstalledKey {
                    psk: psk.to_vec(),
                    retire_at: None,
                });
            }
        }
        let keys = plan_keys(&installed, &file, now, self.settings.rotation_overlap)?;
        let (states, policies) = desired_xfrm(self.local, peers, keys.keys.keys().copied());
        Ok(IpsecPlan {
            file,
            keys,
            peers: peers.to_vec(),
            states,
            policies,
        })
    }

    /// Installs new states before the policies that use them, and removes policies before
    /// their states.
    pub async fn apply(&mut self, plan: IpsecPlan) -> Result<()> {
        for state in plan.states.difference(&self.states.clone()) {
            let psk = &plan.keys.keys[&(state.spi as u8)].psk;
            self.xfrm.add_state(*state, psk).await?;
            self.states.insert(*state);
        }
        for policy in plan.policies.difference(&self.policies.clone()) {
            self.xfrm.add_policy(policy).await?;
            self.policies.insert(*policy);
        }
        for policy in self
            .policies
            .difference(&plan.policies)
            .copied()
            .collect::<Vec<_>>()
        {
            self.xfrm.delete_policy(&policy).await?;
            self.policies.remove(&policy);
        }
        for state in self.states.difference(&plan.states).copied().collect::<Vec<_>>() {
            self.xfrm.delete_state(state).await?;
            self.states.remove(&state);
        }
        if !plan.keys.install.is_empty() || !plan.keys.remove.is_empty() {
            info!(
                current = plan.keys.current,
                installed = ?plan.keys.install,
                removed = ?plan.keys.remove,
                "IPsec keys changed"
            );
        }
        self.keep(plan);
        Ok(())
    }

    /// After the kernel has what `plan` wanted: its keys and peers are the ones in force.
    fn keep(&mut self, plan: IpsecPlan) {
        self.file = Some(plan.file);
        self.adopted_key_ids.clear();
        self.keys = plan.keys.keys;
        self.current = plan.keys.current;
        self.peers = plan.peers;
    }

    /// Removes the states of keys whose overlap ended. Called periodically; the key file in
    /// force is the one of the last reload (a rotation itself needs a reload).
    pub async fn retire_keys(&mut self, now: u64) {
        if !self.keys.values().any(|k| k.retire_at.is_some_and(|t| t <= now)) {
            return;
        }
        let Some(file) = self.file.clone() else { return };
        let peers = self.peers.clone();
        let result = match self.plan_with(file, &peers, now) {
            Ok(plan) => self.apply(plan).await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            warn!("retiring old IPsec keys: {e:#}");
        }
    }

    pub async fn shutdown(self) {
        if let Err(e) = self.xfrm.remove_installed().await {
            warn!("removing IPsec states and policies: {e:#}");
        }
    }

    pub async fn status(&self) -> api::IpsecStatus {
        let (states, policies) = match self.xfrm.installed().await {
            Ok((s, p)) => (s.len(), p.len()),
            Err(e) => {
                warn!("counting IPsec states and policies: {e:#}");
                (0, 0)
            }
        };
        api::IpsecStatus {
            local_address: self.local.to_string(),
            current_key_id: self.current,
            installed_key_ids: self.keys.keys().copied().collect(),
            states,
            policies,
            peers: self.peers.iter().map(|p| p.name.clone()).collect(),
        }
    }
}

/// `gatewayd teardown`: every state and policy gatewayd installed, whatever the mode now.
pub async fn teardown() -> Result<()> {
    Xfrm::open()?.remove_installed().await
}

#[cfg(test)]
mod tests {
    use super::*;

    const PSK1: &str = "00112233445566778899aabbccddeeff";
    const PSK2: &str = "ffeeddccbbaa99887766554433221100";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Like the WireGuard key: a key file others may read is made 0600 (issue #15).
    #[test]
    fn a_key_file_readable_by_others_is_made_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("gd-ipsec-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ipsec.keys");
        std::fs::write(&path, format!("1 {PSK1}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(read_key_file(&path).unwrap().current(), 1);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::write(&path, format!("1 {PSK1}x\n")).unwrap();
        let e = format!("{:#}", read_key_file(&path).unwrap_err());
        assert!(
            e.contains("line 1: key 1 is not hexadecimal") && !e.contains(PSK1),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn key_file_is_parsed_and_the_last_line_is_current() {
        let f = parse_key_file(&format!("# keys\n3 {PSK1}\n\n4 0x{PSK2}  # rotated\n")).unwrap();
        assert_eq!(f.keys.len(), 2);
        assert_eq!(f.current(), 4);
        // Ids wrap around: the newest line wins, not the largest id.
        assert_eq!(
            parse_key_file(&format!("255 {PSK1}\n1 {PSK2}\n"))
                .unwrap()
                .current(),
            1
        );
    }

    #[test]
    fn bad_key_files_name_the_line_and_never_the_key() {
        for (text, wanted) in [
            (format!("0 {PSK1}"), "line 1: key id \"0\" is not 1-255"),
            (format!("256 {PSK1}"), "is not 1-255"),
            ("1 0011".to_string(), "line 1: key 1 has 2 bytes"),
            ("1 zz112233445566778899aabbccddeeff".into(), "not hexadecimal"),
            (format!("1 {PSK1}\n1 {PSK2}"), "line 2: key id 1 appears twice"),
            (format!("1 {PSK1} extra"), "expected"),
            ("# nothing\n".into(), "no key"),
        ] {
            let e = parse_key_file(&text).unwrap_err().to_string();
            assert!(e.contains(wanted), "{text:?}: {e}");
            assert!(!e.contains("zz1122") && !e.contains(PSK2), "{e}");
        }
    }

    #[test]
    fn derived_keys_differ_per_pair_direction_and_id_and_agree_across_nodes() {
        let psk = hex::decode(PSK1).unwrap();
        let (a, b, c) = (ip("192.0.2.1"), ip("192.0.2.2"), ip("192.0.2.3"));
        let ab = derive_key(&psk, 1, a, b);
        // Node b derives the key of a's traffic to it from the same inputs: the same key.
        assert_eq!(ab, derive_key(&psk, 1, a, b));
        assert_ne!(ab, derive_key(&psk, 1, b, a), "each direction has its own key");
        assert_ne!(ab, derive_key(&psk, 1, a, c), "each pair has its own key");
        assert_ne!(ab, derive_key(&psk, 2, a, b), "each key id has its own key");
        assert_ne!(ab, derive_key(&hex::decode(PSK2).unwrap(), 1, a, b));
        assert_ne!(derive_key(&psk, 1, ip("fd00::1"), ip("fd00::2")), ab);
    }

    #[test]
    fn derive_key_is_hkdf_sha256_over_the_documented_info() {
        // Pinned so that a change of derivation (which would split a cluster running two
        // versions) fails here first.
        let k = derive_key(&hex::decode(PSK1).unwrap(), 1, ip("10.0.0.1"), ip("10.0.0.2"));
        let mut info = b"gatewayd ipsec v1".to_vec();
        info.push(1);
        info.extend_from_slice(&"::ffff:10.0.0.1".parse::<std::net::Ipv6Addr>().unwrap().octets());
        info.extend_from_slice(&"::ffff:10.0.0.2".parse::<std::net::Ipv6Addr>().unwrap().octets());
        let mut expected = [0u8; 36];
        Hkdf::<Sha256>::new(None, &hex::decode(PSK1).unwrap())
            .expand(&info, &mut expected)
            .unwrap();
        assert_eq!(k, expected);
    }

    fn file(lines: &[(u8, &str)]) -> KeyFile {
        KeyFile {
            keys: lines
                .iter()
                .map(|(id, k)| (*id, hex::decode(k).unwrap()))
                .collect(),
        }
    }

    #[test]
    fn rotation_keeps_the_old_key_for_the_overlap_then_removes_it() {
        let first = plan_keys(&BTreeMap::new(), &file(&[(1, PSK1)]), 1000, 60).unwrap();
        assert_eq!(
            (first.current, first.install.clone(), first.remove.clone()),
            (1, vec![1], vec![])
        );

        // Key 2 arrives (the file may drop key 1 at once): both are installed.
        let rotated = plan_keys(&first.keys, &file(&[(2, PSK2)]), 1010, 60).unwrap();
        assert_eq!(
            (rotated.current, rotated.install.clone(), rotated.remove.clone()),
            (2, vec![2], vec![])
        );
        assert_eq!(rotated.keys[&1].retire_at, Some(1070));
        assert_eq!(rotated.keys[&2].retire_at, None);

        // During the overlap nothing changes, and a reload does not extend it.
        let during = plan_keys(&rotated.keys, &file(&[(1, PSK1), (2, PSK2)]), 1069, 60).unwrap();
        assert!(during.install.is_empty() && during.remove.is_empty());
        assert_eq!(during.keys[&1].retire_at, Some(1070));

        let after = plan_keys(&during.keys, &file(&[(2, PSK2)]), 1070, 60).unwrap();
        assert_eq!(after.remove, vec![1]);
        assert_eq!(after.keys.keys().copied().collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn rolling_back_to_an_installed_key_makes_it_current_again() {
        let one = plan_keys(&BTreeMap::new(), &file(&[(1, PSK1)]), 0, 60).unwrap();
        let two = plan_keys(&one.keys, &file(&[(1, PSK1), (2, PSK2)]), 10, 60).unwrap();
        let back = plan_keys(&two.keys, &file(&[(1, PSK1)]), 20, 60).unwrap();
        assert_eq!(back.current, 1);
        assert!(back.install.is_empty(), "key 1 never left");
        assert_eq!(back.keys[&1].retire_at, None);
        assert_eq!(back.keys[&2].retire_at, Some(80));
    }

    #[test]
    fn reusing_an_id_for_a_new_key_is_refused() {
        let one = plan_keys(&BTreeMap::new(), &file(&[(1, PSK1)]), 0, 60).unwrap();
        let e = plan_keys(&one.keys, &file(&[(1, PSK2)]), 10, 60)
            .unwrap_err()
            .to_string();
        assert!(e.contains("key id 1 now has a different key"), "{e}");
    }

    fn peer(name: &str, endpoint: &str, ips: &[&str]) -> Peer {
        Peer {
            name: name.into(),
            public_key: String::new(),
            endpoint: Some(endpoint.parse().unwrap()),
            allowed_ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn each_peer_gets_states_per_key_and_policies_per_network() {
        let local = ip("192.0.2.1");
        let peers = [
            peer(
                "a",
                "192.0.2.2:0",
                &["10.244.1.0/24", "192.0.2.2/32", "192.0.2.0/24"],
            ),
            peer("v6", "[fd00::2]:0", &["fd00:244::/64"]),
        ];
        let (states, policies) = desired_xfrm(local, &peers, [1u8, 2]);
        assert_eq!(states.len(), 4, "two keys, both directions: {states:?}");
        assert!(states.contains(&StateId {
            src: local,
            dst: ip("192.0.2.2"),
            spi: 2
        }));
        assert!(states.contains(&StateId {
            src: ip("192.0.2.2"),
            dst: local,
            spi: 1
        }));
        // out, in, fwd for the pod network; networks holding the endpoint, and the other
        // family: none.
        assert_eq!(policies.len(), 3, "{policies:?}");
        let out = policies.iter().find(|p| p.direction == XFRM_POLICY_OUT).unwrap();
        assert_eq!(
            (out.dst, out.tunnel_src, out.tunnel_dst),
            ("10.244.1.0/24".parse().unwrap(), local, ip("192.0.2.2"))
        );
        let inbound = policies.iter().find(|p| p.direction == XFRM_POLICY_IN).unwrap();
        assert_eq!(
            (inbound.src, inbound.tunnel_src),
            ("10.244.1.0/24".parse().unwrap(), ip("192.0.2.2"))
        );
    }

    #[tokio::test]
    async fn keys_from_a_secret_rotate_and_a_bad_or_missing_secret_leaves_the_keys_in_force() {
        // Planning reads no kernel state: the socket is only opened, as at start.
        let local = ip("192.0.2.1");
        let mut ipsec = Ipsec {
            settings: IpsecSettings {
                key_file: None,
                key_secret: Some(crate::config::SecretRef {
                    cluster: "c".into(),
                    namespace: "gatewayd".into(),
                    name: "gatewayd-ipsec".into(),
                }),
                local_address: Some(local),
                rotation_overlap: 60,
            },
            local,
            file: None,
            keys: BTreeMap::new(),
            current: 0,
            states: BTreeSet::new(),
            policies: BTreeSet::new(),
            adopted_key_ids: BTreeSet::new(),
            peers: Vec::new(),
            xfrm: Xfrm::open().unwrap(),
        };
        let peers = [peer("a", "192.0.2.2:0", &["10.244.1.0/24"])];
        let secret = |text: String| IpsecKeys {
            origin: "secret c/gatewayd/gatewayd-ipsec".into(),
            keys: parse_key_file(&text).unwrap(),
        };
        let ids = |plan: &IpsecPlan| {
            let ids: BTreeSet<u32> = plan.states.iter().map(|s| s.spi).collect();
            (plan.keys.current, ids.into_iter().collect::<Vec<_>>())
        };

        // Before the Secret is seen: nothing to install, and nothing to remove either.
        assert!(ipsec.plan(&peers, None, 0).unwrap().is_none());

        let first = ipsec
            .plan(&peers, Some(&secret(format!("1 {PSK1}\n"))), 0)
            .unwrap()
            .unwrap();
        assert_eq!(ids(&first), (1, vec![1]));
        ipsec.keep(first);

        // The Secret gains key 2: it becomes current, key 1 stays for the overlap.
        let rotated = ipsec
            .plan(&peers, Some(&secret(format!("1 {PSK1}\n2 {PSK2}\n"))), 10)
            .unwrap()
            .unwrap();
        assert_eq!(ids(&rotated), (2, vec![1, 2]));
        assert_eq!(rotated.keys.keys[&1].retire_at, Some(70));
        ipsec.keep(rotated);

        // A Secret that reuses an id for another key, and a missing one: the keys in force.
        for keys in [Some(secret(format!("2 {PSK1}\n"))), None] {
            let plan = ipsec.plan(&peers, keys.as_ref(), 20).unwrap().unwrap();
            assert_eq!(ids(&plan), (2, vec![1, 2]));
            assert!(plan.keys.install.is_empty() && plan.keys.remove.is_empty());
        }
    }

    #[test]
    fn missing_esp_errors_name_the_kernel_feature() {
        let e = missing_feature(-libc::EPROTONOSUPPORT).unwrap();
        assert!(e.contains("esp4/esp6") && e.contains("CONFIG_INET_ESP"), "{e}");
        let e = missing_feature(-libc::ENOSYS).unwrap();
        assert!(
            e.contains("CONFIG_INET_ESP") && e.contains("CONFIG_CRYPTO_GCM"),
            "{e}"
        );
        assert!(missing_feature(-libc::EPERM).is_none());
    }
}
