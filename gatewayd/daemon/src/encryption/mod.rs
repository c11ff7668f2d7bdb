//! Node encryption between gateways and cluster nodes: WireGuard ([`wireguard`]) or IPsec
//! ([`ipsec`]), from the peers of the model.
//!
//! A change is made in two steps so that a rejected configuration changes nothing:
//! [`Encryption::prepare`] plans (and, when the mode changes, starts the new mode's device or
//! checks the kernel can run it) before the daemon touches anything else;
//! [`Encryption::commit`] then executes the plan and stops the old mode.

pub mod ipsec;
mod uapi;
pub mod wireguard;

use crate::config::{EncryptionMode, EncryptionSettings};
use crate::model::Peer;
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

enum Plan {
    None,
    WireGuard(PeerPlan),
    Ipsec(IpsecPlan),
}

/// A change computed by [`Encryption::prepare`]: the plan, and a newly started mode when the
/// mode changes.
pub struct Prepared {
    started: Option<Active>,
    plan: Plan,
}

pub struct Encryption {
    active: Active,
    settings: Option<EncryptionSettings>,
    netlink: Handle,
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
        }
    }

    /// Plans `peers` under `settings`. Starts the device of a new mode (or probes the kernel
    /// for IPsec), so a mode the machine cannot run fails here, before anything else changes.
    pub async fn prepare(&self, settings: &EncryptionSettings, peers: &[Peer]) -> Result<Prepared> {
        let same_mode = self.settings.as_ref().map(|s| s.mode) == Some(settings.mode);
        if let (true, Some(old)) = (same_mode, &self.settings) {
            if old.wireguard != settings.wireguard && settings.mode == EncryptionMode::WireGuard {
                warn!("encryption.wireguard changed: takes effect at the next restart");
            }
            if old.ipsec.local_address != settings.ipsec.local_address
                && settings.mode == EncryptionMode::Ipsec
            {
                warn!("encryption.ipsec.local_address changed: takes effect at the next restart");
            }
            return Ok(Prepared {
                started: None,
                plan: self.plan(&self.active, peers)?,
            });
        }
        let started = match settings.mode {
            EncryptionMode::None => Active::None,
            EncryptionMode::WireGuard => Active::WireGuard(Box::new(
                WireGuard::start(&settings.wireguard, self.netlink.clone()).await?,
            )),
            EncryptionMode::Ipsec => Active::Ipsec(Box::new(Ipsec::start(&settings.ipsec).await?)),
        };
        let plan = self.plan(&started, peers)?;
        Ok(Prepared {
            started: Some(started),
            plan,
        })
    }

    fn plan(&self, active: &Active, peers: &[Peer]) -> Result<Plan> {
        Ok(match active {
            Active::None => Plan::None,
            Active::WireGuard(wg) => Plan::WireGuard(wg.plan(peers)?),
            Active::Ipsec(ipsec) => Plan::Ipsec(ipsec.plan(peers, now())?),
        })
    }

    /// Executes a prepared change. A new mode's settings become the ones in force; within a
    /// mode, the device settings stay those of the start (they apply at restart).
    pub async fn commit(&mut self, prepared: Prepared, settings: &EncryptionSettings) -> Result<()> {
        if let Some(started) = prepared.started {
            match std::mem::replace(&mut self.active, started) {
                Active::None => {}
                Active::WireGuard(wg) => wg.shutdown().await,
                Active::Ipsec(ipsec) => ipsec.shutdown().await,
            }
            self.settings = Some(settings.clone());
        }
        match (&mut self.active, prepared.plan) {
            (Active::WireGuard(wg), Plan::WireGuard(plan)) => wg.apply(plan).await?,
            (Active::Ipsec(ipsec), Plan::Ipsec(plan)) => ipsec.apply(plan).await?,
            _ => {}
        }
        Ok(())
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

/// `gatewayd teardown`: the WireGuard interface and every XFRM state and policy gatewayd
/// installed, whatever mode the file names now.
pub async fn teardown(settings: &EncryptionSettings) -> Result<()> {
    let (connection, netlink, _) = rtnetlink::new_connection()?;
    tokio::spawn(connection);
    wireguard::teardown(&settings.wireguard.interface, &netlink).await?;
    ipsec::teardown().await
}
