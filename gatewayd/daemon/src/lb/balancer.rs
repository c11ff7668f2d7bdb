//! The load balancer at run time: its maps and what is programmed in them, changes planned and
//! applied under the reconcile contract, and what `gatewayctl lb list` / `lb stats` and the
//! metrics show of it.

use super::maps::{lb_settings, LbMaps};
use super::plan::{LbParams, Programmed, ServicePlan};
use crate::config::{EncryptionMode, Interface, Settings};
use crate::datapath::objects::LB_PROGRAM;
use crate::datapath::{Attachment, Datapath, Hook};
use crate::metrics::{BackendLabels, ServiceLabels, ServiceView};
use crate::model::DesiredState;
use crate::reconcile::Reconcile;
use anyhow::{Context, Result};
use gatewayd_common::api;
use gatewayd_common::maps::{
    LbSettingsEntry, TrafficCounters, ENCAP_GUE, LB_F_KERNEL_ROUTE, REASON_NAMES, SVC_F_AFFINITY,
};
use ipnet::IpNet;
use std::collections::BTreeMap;
use tracing::info;

/// The load balancer component: its maps, and what is programmed in them.
pub struct LoadBalancer {
    maps: LbMaps,
    programmed: Programmed,
}

/// What [`LoadBalancer`] writes for a change: the services' operations (in the planner's phase
/// order) and the settings entry.
#[derive(Debug)]
pub struct LbPlan {
    services: ServicePlan,
    settings: LbSettingsEntry,
}

impl LoadBalancer {
    /// Takes the load balancer's maps from the loaded datapath, and what a previous daemon
    /// programmed in them: ids stay as it allocated them, so established flows keep their
    /// backends.
    pub fn open(datapath: &mut Datapath) -> Result<Self> {
        let maps_dir = datapath.pins().maps();
        let maps = LbMaps::new(datapath.ebpf_mut(), &maps_dir)?;
        let programmed = maps
            .recover()
            .context("reading the state left by a previous daemon")?;
        if !programmed.services.is_empty() {
            info!(
                services = programmed.services.len(),
                "adopted services programmed by a previous daemon"
            );
        }
        Ok(LoadBalancer { maps, programmed })
    }

    /// The XDP program on every configured interface.
    pub fn attachments(interfaces: &[Interface]) -> Vec<Attachment> {
        interfaces
            .iter()
            .map(|i| Attachment {
                interface: i.name.clone(),
                hook: Hook::Xdp(i.xdp_mode),
                program: LB_PROGRAM,
            })
            .collect()
    }

    /// Services programmed.
    pub fn services(&self) -> usize {
        self.programmed.services.len()
    }

    /// Backends programmed, over every service.
    pub fn backends(&self) -> usize {
        self.programmed.services.values().map(|s| s.backends.len()).sum()
    }

    /// `gatewayctl lb list`: every service as programmed, with its traffic.
    pub fn list(&self) -> Result<Vec<api::LbService>> {
        let traffic = |t: TrafficCounters| api::Traffic {
            packets: t.packets,
            bytes: t.bytes,
            new_flows: t.new_flows,
        };
        let counters = self.maps.counters();
        let mut out = Vec::new();
        for (key, svc) in &self.programmed.services {
            let slots = svc.table.as_ref().map(|t| t.slots()).unwrap_or_default();
            let mut backends = Vec::new();
            for (addr, b) in &svc.backends {
                backends.push(api::LbBackend {
                    address: addr.to_string(),
                    weight: b.weight,
                    state: b.state.to_string(),
                    backend_id: b.backend_id,
                    maglev_slots: slots.get(&b.backend_id).copied().unwrap_or(0),
                    traffic: traffic(counters.backend_traffic(b.backend_id)?),
                });
            }
            // The map entry says what the datapath does, also for a service a previous
            // daemon programmed.
            let value = &svc.value;
            out.push(api::LbService {
                name: svc.name.clone(),
                vip: key.vip.to_string(),
                port: key.port,
                protocol: key.protocol.to_string(),
                service_id: svc.service_id,
                source_ranges: svc.source_ranges.iter().map(|r| r.to_string()).collect(),
                affinity_timeout_seconds: (value.flags & SVC_F_AFFINITY != 0)
                    .then_some(value.affinity_timeout_s),
                encapsulation: if value.encap == ENCAP_GUE {
                    format!("gue:{}", u16::from_be(value.gue_port))
                } else {
                    "ipip".into()
                },
                maglev_table_size: svc.table.as_ref().map(|t| t.table_size).unwrap_or(0),
                traffic: traffic(counters.service_traffic(svc.service_id)?),
                backends,
            });
        }
        Ok(out)
    }

    /// `gatewayctl lb stats`: the datapath's reasons and the connection table's occupancy.
    pub fn stats(&self) -> Result<api::LbStats> {
        let counters = self.maps.counters();
        let reasons = counters
            .reasons()?
            .into_iter()
            .zip(REASON_NAMES)
            .map(|(c, name)| api::ReasonCount {
                reason: name.into(),
                packets: c.packets,
                bytes: c.bytes,
            })
            .collect();
        Ok(api::LbStats {
            reasons,
            flow_table_entries: counters.flow_count(),
            flow_table_capacity: counters.flow_capacity(),
        })
    }

    /// Which counter slot belongs to which service and backend, for the metrics.
    pub fn metric_labels(&self) -> BTreeMap<u32, ServiceView> {
        self.programmed
            .services
            .iter()
            .map(|(key, svc)| {
                let labels = ServiceLabels {
                    service: svc.name.clone(),
                    vip: key.vip.to_string(),
                    port: key.port,
                    protocol: key.protocol.to_string(),
                };
                let backends = svc
                    .backends
                    .iter()
                    .map(|(addr, b)| {
                        let labels = BackendLabels {
                            service: labels.service.clone(),
                            vip: labels.vip.clone(),
                            port: labels.port,
                            protocol: labels.protocol.clone(),
                            backend: addr.to_string(),
                            state: b.state.to_string(),
                        };
                        (b.backend_id, labels)
                    })
                    .collect();
                (svc.service_id, ServiceView { labels, backends })
            })
            .collect()
    }
}

/// With no configured encapsulation source, packets leave from the first interface's address.
fn default_source(interfaces: &[Interface], v6: bool) -> Option<IpNet> {
    interfaces
        .iter()
        .find_map(|i| crate::host::interface_address(&i.name, v6))
        .map(IpNet::from)
}

impl Reconcile for LoadBalancer {
    type Plan = LbPlan;

    /// The planner's operations (capacity checked first) and the settings entry.
    async fn plan(&self, desired: &DesiredState, settings: &Settings) -> Result<LbPlan> {
        let s = &settings.lb;
        let params = LbParams {
            table_size: s.maglev_table_size,
            seed: s.maglev_seed,
            max_services: s.max_services,
            max_backends: s.max_backends,
        };
        let services = self.programmed.plan(&desired.services, &params)?;
        let mut entry = lb_settings(
            s.encap_source_v4
                .or_else(|| default_source(&settings.interfaces, false)),
            s.encap_source_v6
                .or_else(|| default_source(&settings.interfaces, true)),
        );
        if settings.encryption.mode == EncryptionMode::Ipsec {
            // XDP transmission would bypass the XFRM policies: the kernel routes (and encrypts).
            entry.flags |= LB_F_KERNEL_ROUTE;
        }
        Ok(LbPlan {
            services,
            settings: entry,
        })
    }

    async fn apply(&mut self, plan: LbPlan) -> Result<()> {
        let ServicePlan { ops, next } = plan.services;
        if let Err(e) = self
            .maps
            .set_settings(&plan.settings)
            .and_then(|_| self.maps.apply(&ops))
        {
            // The maps are what the datapath uses: re-read them so the next plan starts from the
            // truth, then report.
            self.programmed = self.maps.recover().unwrap_or_default();
            return Err(e);
        }
        self.programmed = next;
        if !ops.is_empty() {
            info!(
                operations = ops.len(),
                services = self.programmed.services.len(),
                "load balancer maps updated"
            );
        }
        Ok(())
    }
}
