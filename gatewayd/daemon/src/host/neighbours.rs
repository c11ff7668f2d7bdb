//! Keeps the next hop of every backend resolved, with kernel-managed neighbour entries.
//!
//! XDP cannot send ARP or ND: when a backend's next hop has no neighbour entry the program
//! hands the encapsulated packet to the stack, and for IPv4 the stack drops it as a martian
//! (its source is the gateway's own address) unless `accept_local` is set, so the entry would
//! never be resolved. A *managed* entry (`ip neigh replace ADDR dev DEV managed extern_learn`,
//! Linux 5.16+) is resolved and refreshed by the kernel on its own, so the datapath finds the
//! MAC from the first packet on.

use crate::config::Settings;
use crate::model::DesiredState;
use crate::reconcile::Reconcile;
use anyhow::Result;
use futures_util::TryStreamExt;
use rtnetlink::packet_route::neighbour::{
    NeighbourAttribute, NeighbourExtFlags, NeighbourFlags, NeighbourState,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteType};
use rtnetlink::{Handle, RouteMessageBuilder};
use std::collections::BTreeSet;
use std::net::IpAddr;
use tracing::{debug, info, warn};

/// A next hop gatewayd manages: where the kernel sends packets toward some backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct NextHop {
    ifindex: u32,
    address: IpAddr,
}

pub struct Neighbours {
    handle: Handle,
    managed: BTreeSet<NextHop>,
}

/// The backends whose next hops must have managed entries.
#[derive(Debug)]
pub struct NeighbourPlan {
    backends: BTreeSet<IpAddr>,
}

impl Neighbours {
    pub fn new(handle: Handle) -> Self {
        Neighbours {
            handle,
            managed: BTreeSet::new(),
        }
    }

    /// The gateway (or the backend itself when on-link) and the interface toward `backend`.
    async fn next_hop(&self, backend: IpAddr) -> Result<Option<NextHop>> {
        let request = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(backend, if backend.is_ipv4() { 32 } else { 128 })?
            .build();
        let mut routes = self.handle.route().get(request).execute();
        let Some(route) = routes.try_next().await? else {
            return Ok(None);
        };
        if route.header.kind != RouteType::Unicast {
            return Ok(None);
        }
        let mut ifindex = None;
        let mut address = backend;
        for attr in &route.attributes {
            match attr {
                RouteAttribute::Oif(i) => ifindex = Some(*i),
                RouteAttribute::Gateway(RouteAddress::Inet(a)) => address = IpAddr::V4(*a),
                RouteAttribute::Gateway(RouteAddress::Inet6(a)) => address = IpAddr::V6(*a),
                _ => {}
            }
        }
        Ok(ifindex.map(|ifindex| NextHop { ifindex, address }))
    }

    async fn add(&self, hop: &NextHop) -> Result<()> {
        let mut request = self
            .handle
            .neighbours()
            .add(hop.ifindex, hop.address)
            .state(NeighbourState::None)
            .flags(NeighbourFlags::ExtLearned)
            .replace();
        request
            .message_mut()
            .attributes
            .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
        request.execute().await?;
        Ok(())
    }

    async fn delete(&self, hop: &NextHop) -> Result<()> {
        let mut neighbours = self.handle.neighbours().get().execute();
        while let Some(n) = neighbours.try_next().await? {
            let matches = n.header.ifindex == hop.ifindex
                && n.attributes.iter().any(|a| match a {
                    NeighbourAttribute::Destination(d) => neighbour_ip(d) == Some(hop.address),
                    _ => false,
                });
            if matches {
                self.handle.neighbours().del(n).execute().await?;
                return Ok(());
            }
        }
        Ok(())
    }
}

impl Reconcile for Neighbours {
    type Plan = NeighbourPlan;

    async fn plan(&self, desired: &DesiredState, _: &Settings) -> Result<NeighbourPlan> {
        let backends = desired
            .services
            .values()
            .flat_map(|s| s.backends.iter().map(|b| b.address))
            .collect();
        Ok(NeighbourPlan { backends })
    }

    /// Adds a managed entry for the next hop toward each backend and removes those no backend
    /// needs any more. The routes are looked up here, not in the plan: the components applied
    /// before (the encryption's WireGuard routes) can change them. Failures are logged, not
    /// fatal: the datapath still works through the stack, only slower to start.
    async fn apply(&mut self, plan: NeighbourPlan) -> Result<()> {
        let mut wanted = BTreeSet::new();
        for backend in plan.backends {
            match self.next_hop(backend).await {
                Ok(Some(hop)) => {
                    wanted.insert(hop);
                }
                Ok(None) => debug!(%backend, "no route toward backend: nothing to resolve"),
                Err(e) => warn!(%backend, "cannot find the next hop toward backend: {e:#}"),
            }
        }
        for hop in wanted.difference(&self.managed.clone()) {
            match self.add(hop).await {
                Ok(()) => {
                    info!(next_hop = %hop.address, ifindex = hop.ifindex, "managing neighbour entry");
                    self.managed.insert(*hop);
                }
                Err(e) => warn!(next_hop = %hop.address, "cannot add a managed neighbour entry: {e:#}"),
            }
        }
        for hop in self.managed.difference(&wanted).copied().collect::<Vec<_>>() {
            if let Err(e) = self.delete(&hop).await {
                debug!(next_hop = %hop.address, "removing managed neighbour entry: {e:#}");
            }
            self.managed.remove(&hop);
        }
        Ok(())
    }
}

fn neighbour_ip(d: &rtnetlink::packet_route::neighbour::NeighbourAddress) -> Option<IpAddr> {
    use rtnetlink::packet_route::neighbour::NeighbourAddress;
    match d {
        NeighbourAddress::Inet(a) => Some(IpAddr::V4(*a)),
        NeighbourAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}
