//! Egress addresses: each policy's `egress_ip` is assigned to its egress interface (as a /32 or
//! /128), so the upstream router's ARP/ND finds this gateway for the replies. Only addresses
//! gatewayd added are removed when no policy needs them any more; an address the operator
//! configured stays. What gatewayd added is kept in a state file, so a restarted daemon still
//! knows which addresses are its own to remove.

use crate::config::Settings;
use crate::model::DesiredState;
use crate::reconcile::Reconcile;
use crate::state_file;
use anyhow::{Context, Result};
use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressHeaderFlags};
use rtnetlink::Handle;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use tracing::{info, warn};

pub struct EgressAddresses {
    handle: Handle,
    /// (interface, address) pairs gatewayd assigned, by this daemon or an earlier one.
    added: BTreeSet<(String, IpAddr)>,
    /// Where `added` is kept.
    state_file: PathBuf,
}

/// The (interface, address) pairs the egress policies name explicitly.
#[derive(Debug)]
pub struct AddressPlan {
    wanted: BTreeSet<(String, IpAddr)>,
}

impl EgressAddresses {
    pub fn new(handle: Handle, state_dir: &std::path::Path) -> Result<Self> {
        let state_file = state_dir.join("egress-addresses.json");
        Ok(EgressAddresses {
            handle,
            added: state_file::load(&state_file)?,
            state_file,
        })
    }

    /// Assigns every wanted address that is missing and removes the ones gatewayd added that are
    /// no longer wanted. Failures are logged: the policy is programmed either way.
    async fn sync(&mut self, wanted: BTreeSet<(String, IpAddr)>) {
        for (interface, ip) in &wanted {
            match self.ensure(interface, *ip).await {
                Ok(true) => {
                    info!(%ip, interface, "assigned egress address");
                    self.added.insert((interface.clone(), *ip));
                }
                Ok(false) => {}
                Err(e) => warn!(%ip, interface, "cannot assign egress address: {e:#}"),
            }
        }
        for (interface, ip) in self.added.difference(&wanted).cloned().collect::<Vec<_>>() {
            if let Err(e) = self.remove(&interface, ip).await {
                warn!(%ip, interface, "cannot remove egress address: {e:#}");
            } else {
                info!(%ip, interface, "removed egress address no policy uses");
            }
            self.added.remove(&(interface, ip));
        }
        if let Err(e) = state_file::save(&self.state_file, &self.added) {
            warn!("egress addresses assigned may outlive their policies after a restart: {e:#}");
        }
    }

    /// Adds `ip` to `interface` unless it is there; true when gatewayd added it.
    async fn ensure(&self, interface: &str, ip: IpAddr) -> Result<bool> {
        let index =
            nix::net::if_::if_nametoindex(interface).with_context(|| format!("interface {interface}"))?;
        let mut existing = self.handle.address().get().set_link_index_filter(index).execute();
        while let Some(msg) = existing.try_next().await? {
            if msg
                .attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Address(a) if *a == ip))
            {
                return Ok(false);
            }
        }
        let prefix = if ip.is_ipv4() { 32 } else { 128 };
        let mut add = self.handle.address().add(index, ip, prefix);
        if ip.is_ipv6() {
            // No duplicate address detection: the address must answer ND at once.
            add.message_mut().header.flags = AddressHeaderFlags::Nodad;
        }
        add.execute().await?;
        Ok(true)
    }

    async fn remove(&self, interface: &str, ip: IpAddr) -> Result<()> {
        let index = nix::net::if_::if_nametoindex(interface)?;
        let mut existing = self.handle.address().get().set_link_index_filter(index).execute();
        while let Some(msg) = existing.try_next().await? {
            if msg
                .attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Address(a) if *a == ip))
            {
                self.handle.address().del(msg).execute().await?;
            }
        }
        Ok(())
    }
}

impl Reconcile for EgressAddresses {
    type Plan = AddressPlan;

    /// A policy without an explicit `egress_ip` translates to an address its interface already
    /// has: nothing to assign.
    async fn plan(&self, desired: &DesiredState, _: &Settings) -> Result<AddressPlan> {
        let wanted = desired
            .egress_policies
            .iter()
            .filter_map(|p| Some((p.interface.clone(), p.egress_ip?)))
            .collect();
        Ok(AddressPlan { wanted })
    }

    async fn apply(&mut self, plan: AddressPlan) -> Result<()> {
        self.sync(plan.wanted).await;
        Ok(())
    }
}
