//! Flow events from the datapath's ring buffer to `gatewayctl observe`.
//!
//! The datapath writes events only while `gd_observe[0].enabled` is set; the hub sets it when
//! the first observer subscribes and clears it when the last one leaves, so an unobserved
//! gateway pays nothing for the feature.

use crate::datapath::pins::open_pinned_map;
use crate::metrics::Metrics;
use anyhow::Result;
use aya::maps::{Array, MapData, RingBuf};
use gatewayd_common::api;
use gatewayd_common::map_names;
use gatewayd_common::maps::{self as m, addr_from_bytes, REASON_NAMES};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::io::unix::AsyncFd;
use tokio::sync::broadcast;
use tracing::warn;

pub struct EventHub {
    events: broadcast::Sender<api::FlowEvent>,
    observe: Mutex<(usize, Array<MapData, m::Observe>)>,
}

/// Keeps an observer subscribed; dropping it unsubscribes (and may switch events off).
pub struct Subscription {
    hub: Arc<EventHub>,
    pub events: broadcast::Receiver<api::FlowEvent>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.observers_changed(-1);
    }
}

impl EventHub {
    /// Starts reading `gd_events`; `metrics` supplies the names of service and backend ids.
    pub fn start(maps_dir: &Path, metrics: Arc<Metrics>) -> Result<Arc<Self>> {
        let mut observe: Array<MapData, m::Observe> = open_pinned_map(maps_dir, map_names::OBSERVE)?;
        // A daemon killed while observed leaves the flag on: nobody is observing now.
        observe.set(0, m::Observe::default(), 0)?;
        let ring: RingBuf<MapData> = open_pinned_map(maps_dir, map_names::EVENTS)?;
        let (events, _) = broadcast::channel(4096);
        let hub = Arc::new(EventHub {
            events,
            observe: Mutex::new((0, observe)),
        });
        let sender = hub.events.clone();
        // SAFETY: the AsyncFd owns the RingBuf, which owns its map fd for as long as it lives.
        let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("watching the flow event ring buffer: {e}"))?;
        tokio::spawn(async move {
            // The datapath wakes us once a batch of events waits (waking per event would cost
            // more than the flow itself); the timer picks up the rest within 100 ms.
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
            loop {
                tokio::select! {
                    r = ring.readable_mut() => match r {
                        Ok(mut guard) => guard.clear_ready(),
                        Err(e) => {
                            warn!("flow event ring buffer unreadable: {e}");
                            return;
                        }
                    },
                    _ = tick.tick() => {}
                }
                let snapshot = metrics.snapshot();
                let clock = Clock::now();
                while let Some(item) = ring.get_mut().next() {
                    if item.len() < std::mem::size_of::<m::FlowEventRecord>() {
                        continue;
                    }
                    // SAFETY: the datapath writes whole gd_flow_event records (size checked);
                    // read_unaligned copes with the ring's 8-byte alignment either way.
                    let raw: m::FlowEventRecord = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                    // No receivers is normal between observers.
                    let _ = sender.send(describe(&raw, &snapshot, &clock));
                }
            }
        });
        Ok(hub)
    }

    pub fn subscribe(self: &Arc<Self>) -> Subscription {
        let events = self.events.subscribe();
        self.observers_changed(1);
        Subscription {
            hub: self.clone(),
            events,
        }
    }

    fn observers_changed(&self, delta: isize) {
        let mut guard = self.observe.lock().expect("observe lock");
        let (count, map) = &mut *guard;
        *count = count.saturating_add_signed(delta);
        let enabled = u32::from(*count > 0);
        if let Err(e) = map.set(0, m::Observe { enabled, pad: 0 }, 0) {
            warn!(
                "cannot switch flow events {}: {e}",
                if enabled == 1 { "on" } else { "off" }
            );
        }
    }
}

/// Converts CLOCK_MONOTONIC (what bpf_ktime_get_ns reads) to wall-clock time.
struct Clock {
    wall_ns: u64,
    mono_ns: u64,
}

impl Clock {
    fn now() -> Self {
        let mono = crate::datapath::monotonic_ns();
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Clock {
            wall_ns: wall,
            mono_ns: mono,
        }
    }

    fn wall(&self, mono: u64) -> u64 {
        self.wall_ns.saturating_sub(self.mono_ns.saturating_sub(mono))
    }
}

fn describe(raw: &m::FlowEventRecord, snapshot: &crate::metrics::Snapshot, clock: &Clock) -> api::FlowEvent {
    let k = &raw.key;
    let ip = |a: &[u8; 16]| {
        addr_from_bytes(a, k.family)
            .map(|ip| ip.to_string())
            .unwrap_or_default()
    };
    let service = snapshot.services.get(&raw.service_id);
    let dropped = raw.kind == m::EVENT_DROP;
    api::FlowEvent {
        time_ns: clock.wall(raw.ts_ns),
        event: if dropped { "dropped" } else { "new-flow" }.into(),
        verdict: if dropped { "dropped" } else { "forwarded" }.into(),
        reason: if dropped {
            REASON_NAMES
                .get(raw.reason as usize)
                .copied()
                .unwrap_or("unknown")
                .into()
        } else {
            String::new()
        },
        protocol: match k.proto {
            m::IPPROTO_TCP => "tcp".into(),
            m::IPPROTO_UDP => "udp".into(),
            p => p.to_string(),
        },
        source: ip(&k.src),
        source_port: u16::from_be(k.sport),
        destination: ip(&k.dst),
        destination_port: u16::from_be(k.dport),
        service: service.map(|s| s.labels.service.clone()).unwrap_or_default(),
        backend: service
            .and_then(|s| s.backends.get(&raw.backend_id))
            .map(|b| b.backend.clone())
            .unwrap_or_default(),
        bytes: raw.bytes,
    }
}
