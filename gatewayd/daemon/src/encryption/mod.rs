//! Node encryption between gateways and cluster nodes: WireGuard ([`wireguard`]) or IPsec
//! ([`ipsec`]), from the peers of the model.
//!
//! A change follows the reconcile contract, so that a rejected configuration changes nothing:
//! [`Encryption`]'s plan plans the peers (and, when the mode changes, starts the new mode's
//! device or checks the kernel can run it) before the daemon writes anything; its apply then
//! executes the plan and stops the old mode.

pub mod ipsec;
mod uapi;
pub mod wireguard;

use crate::config::{EncryptionMode, EncryptionSettings, Settings};
use crate::model::{DesiredState, IpsecKeys, Peer};
use crate::reconcile::Reconcile;
use anyhow::Result;
use gatewayd_common::api;
use rtnetlink::Handle;
use std::time::{SystemTime, UNIX_EPOCH};
use tracing::warn;

use ipsec::{Ipsec, IpsecPlan};
use wireguard::{PeerPlan, WireGuard};

enum Active {
    None,
    WireGuard(Box<WireGuard>),
    Ipsec(Box<Ipsec>),
}

/// The peers' changes in the mode that runs.
enum ModePlan {
    None,
    WireGuard(PeerPlan),
    Ipsec(IpsecPlan),
}

/// What [`Encryption`] does for a change: the peers' changes, and, when the mode changes, the
/// new mode (already started by the plan) with its settings.
pub struct EncryptionPlan {
    started: Option<(Active, EncryptionSettings)>,
    peers: ModePlan,
    /// Peers configured while the mode is `none`, when they changed: warned about once.
    unused_peers: Option<Vec<Peer>>,
}

pub struct Encryption {
    active: Active,
    settings: Option<EncryptionSettings>,
    netlink: Handle,
    /// The peers last warned about as unused (mode `none`).
    unused_peers: Vec<Peer>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Encryption {
    pub fn new(netlink: Handle) -> Self {
        Encryption {
            active: Active::None,
            settings: None,
            netlink,
            unused_peers: Vec::new(),
        }
    }

    /// Plans `peers` under `settings`. Starts the device of a new mode (or probes the kernel
    /// for IPsec), so a mode the machine cannot run fails here, before anything else changes.
    /// `ipsec_keys`: the keys of `encryption.ipsec.key_secret`, as the model has them.
    async fn plan_mode(
        &self,
        settings: &EncryptionSettings,
        peers: &[Peer],
        ipsec_keys: Option<&IpsecKeys>,
    ) -> Result<(Option<(Active, EncryptionSettings)>, ModePlan)> {
        let same_mode = self.settings.as_ref().map(|s| s.mode) == Some(settings.mode);
        if let (true, Some(old)) = (same_mode, &self.settings) {
            if old.wireguard != settings.wireguard && settings.mode == EncryptionMode::WireGuard {
                warn!("encryption.wireguard changed: takes effect at the next restart");
            }
            if settings.mode == EncryptionMode::Ipsec {
                for (key, changed) in [
                    (
                        "local_address",
                        old.ipsec.local_address != settings.ipsec.local_address,
                    ),
                    ("key_file", old.ipsec.key_file != settings.ipsec.key_file),
                ] {
                    if changed {
                        warn!("encryption.ipsec.{key} changed: takes effect at the next restart");
                    }
                }
            }
            return Ok((None, self.plan_peers(&self.active, peers, ipsec_keys)?));
        }
        let started = match settings.mode {
            EncryptionMode::None => Active::None,
            EncryptionMode::WireGuard => Active::WireGuard(Box::new(
                WireGuard::start(&settings.wireguard, self.netlink.clone()).await?,
            )),
            EncryptionMode::Ipsec => Active::Ipsec(Box::new(Ipsec::start(&settings.ipsec).await?)),
        };
        let plan = self.plan_peers(&started, peers, ipsec_keys)?;
        Ok((Some((started, settings.clone())), plan))
    }

    fn plan_peers(
        &self,
        active: &Active,
        peers: &[Peer],
        ipsec_keys: Option<&IpsecKeys>,
    ) -> Result<ModePlan> {
        Ok(match active {
            Active::None => ModePlan::None,
            Active::WireGuard(wg) => ModePlan::WireGuard(wg.plan(peers)?),
            // No keys yet: nothing changes (what a previous daemon left stays in force).
            Active::Ipsec(ipsec) => ipsec
                .plan(peers, ipsec_keys, now())?
                .map_or(ModePlan::None, ModePlan::Ipsec),
        })
    }

    /// Periodic work: IPsec keys whose overlap ended are removed.
    pub async fn tick(&mut self) {
        if let Active::Ipsec(ipsec) = &mut self.active {
            ipsec.retire_keys(now()).await;
        }
    }

    pub async fn status(&self) -> Result<api::EncryptionStatus> {
        let mode = self
            .settings
            .as_ref()
            .map_or(EncryptionMode::None, |s| s.mode)
            .to_string();
        Ok(match &self.active {
            Active::None => api::EncryptionStatus {
                mode,
                ..Default::default()
            },
            Active::WireGuard(wg) => api::EncryptionStatus {
                mode,
                wireguard: Some(wg.status()?),
                ipsec: None,
            },
            Active::Ipsec(ipsec) => api::EncryptionStatus {
                mode,
                wireguard: None,
                ipsec: Some(ipsec.status().await),
            },
        })
    }
}

impl Reconcile for Encryption {
    type Plan = EncryptionPlan;

    async fn plan(&self, desired: &DesiredState, settings: &Settings) -> Result<EncryptionPlan> {
        let settings = &settings.encryption;
        let (started, peers) = self
            .plan_mode(settings, &desired.peers, desired.ipsec_keys.as_ref())
            .await?;
        // Once per change: cluster updates come often.
        let unused_peers = (settings.mode == EncryptionMode::None
            && !desired.peers.is_empty()
            && desired.peers != self.unused_peers)
            .then(|| desired.peers.clone());
        if unused_peers.is_some() {
            warn!("peers are configured but encryption.mode is \"none\": they are not used");
        }
        Ok(EncryptionPlan {
            started,
            peers,
            unused_peers,
        })
    }

    /// A new mode's settings become the ones in force; within a mode, the device settings stay
    /// those of the start (they apply at restart).
    async fn apply(&mut self, plan: EncryptionPlan) -> Result<()> {
        if let Some((started, settings)) = plan.started {
            match std::mem::replace(&mut self.active, started) {
                Active::None => {}
                Active::WireGuard(wg) => wg.shutdown().await,
                Active::Ipsec(ipsec) => ipsec.shutdown().await,
            }
            self.settings = Some(settings);
        }
        match (&mut self.active, plan.peers) {
            (Active::WireGuard(wg), ModePlan::WireGuard(plan)) => wg.apply(plan).await?,
            (Active::Ipsec(ipsec), ModePlan::Ipsec(plan)) => ipsec.apply(plan).await?,
            _ => {}
        }
        if let Some(peers) = plan.unused_peers {
            self.unused_peers = peers;
        }
        Ok(())
    }
}

/// `gatewayd teardown`: the WireGuard interface and every XFRM state and policy gatewayd
/// installed, whatever mode the file names now.
pub async fn teardown(settings: &EncryptionSettings) -> Result<()> {
    let (connection, netlink, _) = rtnetlink::new_connection()?;
    tokio::spawn(connection);
    wireguard::teardown(&settings.wireguard.interface, &netlink).await?;
    ipsec::teardown().await
}
