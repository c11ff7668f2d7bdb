//! Semantic checks of the desired state, the same for every source: the TOML file rejects an
//! object that fails one (with the field path and line), the Kubernetes sync skips it and
//! reports a problem. Each check says why a value can never work; parsing (is it an address at
//! all?) stays with the source.

use super::{EgressPolicy, Peer, Service};
use std::net::IpAddr;

/// What an address is used for: each role rules out different addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The destination clients connect to.
    Vip,
    /// Where encapsulated packets are sent.
    Backend,
    /// The source address of packets gatewayd sends: the encapsulation's outer source, an
    /// egress IP, an IPsec tunnel endpoint.
    Source,
    /// A peer's address (WireGuard endpoint, IPsec tunnel endpoint).
    Peer,
}

impl Role {
    fn noun(self) -> &'static str {
        match self {
            Role::Vip => "a VIP",
            Role::Backend => "a backend",
            Role::Source => "a packet source",
            Role::Peer => "a peer endpoint",
        }
    }
}

/// Why `ip` can never work in `role`, or `None` if it can.
pub fn unusable(role: Role, ip: IpAddr) -> Option<String> {
    let why = match ip {
        IpAddr::V4(v4) => {
            let first = v4.octets()[0];
            if v4.is_unspecified() || first == 0 {
                "an unspecified address (0.0.0.0/8 names no host)"
            } else if v4.is_broadcast() {
                "the broadcast address"
            } else if v4.is_multicast() {
                "a multicast address (224.0.0.0/4)"
            } else if v4.is_loopback() {
                "a loopback address (127.0.0.0/8 never leaves a host)"
            } else if first >= 240 {
                "a reserved address (240.0.0.0/4, dropped by hosts and routers)"
            } else {
                return None;
            }
        }
        IpAddr::V6(v6) => {
            if v6.is_unspecified() {
                "the unspecified address (::)"
            } else if v6.is_multicast() {
                "a multicast address (ff00::/8)"
            } else if v6.is_loopback() {
                "the loopback address (::1 never leaves a host)"
            } else if let Some(v4) = v6.to_ipv4_mapped() {
                return Some(format!(
                    "{} cannot be an IPv4-mapped IPv6 address (packets carry it as IPv4: write {v4})",
                    role.noun()
                ));
            } else {
                return None;
            }
        }
    };
    Some(format!("{} cannot be {why}", role.noun()))
}

/// Why `ip` in `role` is legal but almost surely a mistake, if it is.
pub fn doubtful(role: Role, ip: IpAddr) -> Option<String> {
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    };
    link_local.then(|| {
        format!(
            "{} with a link-local address works on the gateway's own links only: routers do not forward it",
            role.noun()
        )
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Can never work: the TOML is rejected, a Kubernetes object (or the part) skipped.
    Error,
    /// Legal but surely wrong: reported, and applied all the same.
    Warning,
}

/// What a check found, and where in the object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding<F> {
    pub field: F,
    /// The offending value, as an operator would write it.
    pub value: String,
    pub message: String,
    pub severity: Severity,
}

/// The error or warning `ip` earns in `role`.
fn address<F>(field: F, role: Role, ip: IpAddr) -> Option<Finding<F>> {
    let (message, severity) = match (unusable(role, ip), doubtful(role, ip)) {
        (Some(why), _) => (why, Severity::Error),
        (None, Some(why)) => (why, Severity::Warning),
        (None, None) => return None,
    };
    Some(Finding {
        field,
        value: ip.to_string(),
        message,
        severity,
    })
}

fn error<F>(field: F, value: impl ToString, message: String) -> Finding<F> {
    Finding {
        field,
        value: value.to_string(),
        message,
        severity: Severity::Error,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceField {
    Vip,
    /// The backend at this index of `Service::backends`.
    Backend(usize),
}

/// A service whose VIP fails cannot be served at all; a failing backend can be left out.
pub fn service(s: &Service) -> Vec<Finding<ServiceField>> {
    let vip = s.key.vip;
    let mut out: Vec<_> = address(ServiceField::Vip, Role::Vip, vip).into_iter().collect();
    for (i, b) in s.backends.iter().enumerate() {
        let field = ServiceField::Backend(i);
        if b.address == vip {
            // The packet would come back to the gateway, encapsulated to its own VIP.
            out.push(error(
                field,
                vip,
                "a backend cannot be the service's own VIP".into(),
            ));
        } else {
            out.extend(address(field, Role::Backend, b.address));
        }
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EgressPolicyField {
    EgressIp,
    /// The entry at this index of `EgressPolicy::source_cidrs`.
    SourceCidr(usize),
}

/// Sources of a family no destination (or egress IP) has can never match: the datapath looks a
/// packet up by its own family.
pub fn egress_policy(p: &EgressPolicy) -> Vec<Finding<EgressPolicyField>> {
    let mut out: Vec<_> = p
        .egress_ip
        .and_then(|ip| address(EgressPolicyField::EgressIp, Role::Source, ip))
        .into_iter()
        .collect();
    for (i, net) in p.source_cidrs.iter().enumerate() {
        if let Some(why) = unmatchable_source(p, net.addr().is_ipv6()) {
            out.push(error(EgressPolicyField::SourceCidr(i), net, why));
        }
    }
    out
}

/// Why a source of this family never matches the policy, if it does not.
fn unmatchable_source(p: &EgressPolicy, v6: bool) -> Option<String> {
    let family = if v6 { "IPv6" } else { "IPv4" };
    let why = match p.egress_ip {
        Some(ip) if ip.is_ipv6() != v6 => format!("egress IP {ip} is of the other family"),
        _ if !p.destination_cidrs.iter().any(|d| d.addr().is_ipv6() == v6) => {
            format!("the policy has no {family} destination")
        }
        _ => return None,
    };
    Some(format!("an {family} source never matches: {why}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerField {
    Endpoint,
}

/// `port_matters`: WireGuard sends to the endpoint's port; IPsec uses its address only.
pub fn peer(p: &Peer, port_matters: bool) -> Vec<Finding<PeerField>> {
    let Some(e) = p.endpoint else { return vec![] };
    if port_matters && e.port() == 0 {
        return vec![error(
            PeerField::Endpoint,
            e,
            "a peer endpoint needs a port (1-65535)".into(),
        )];
    }
    address(PeerField::Endpoint, Role::Peer, e.ip())
        .map(|f| Finding {
            value: e.to_string(),
            ..f
        })
        .into_iter()
        .collect()
}

/// The VIPs issue #15 found accepted: each source's tests check that it rejects them.
#[cfg(test)]
pub(crate) const UNUSABLE_VIPS: [&str; 8] = [
    "0.0.0.0",
    "::",
    "224.0.0.1",
    "ff02::1",
    "255.255.255.255",
    "127.0.0.1",
    "::1",
    "240.0.0.1",
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Backend, BackendState, Encapsulation, Protocol, ServiceKey};

    #[test]
    fn addresses_that_can_never_work_are_named_by_role() {
        for bad in UNUSABLE_VIPS.into_iter().chain(["0.1.2.3", "::ffff:10.0.0.1"]) {
            let why = unusable(Role::Vip, bad.parse().unwrap());
            assert!(
                why.as_deref().is_some_and(|w| w.starts_with("a VIP cannot be")),
                "{bad}: {why:?}"
            );
        }
        for good in ["10.0.0.1", "192.0.2.1", "2001:db8::1", "fd00::1", "169.254.1.1"] {
            assert_eq!(unusable(Role::Backend, good.parse().unwrap()), None, "{good}");
        }
    }

    #[test]
    fn a_backend_equal_to_its_vip_is_found_with_its_index() {
        let vip: IpAddr = "10.0.0.1".parse().unwrap();
        let backend = |a: &str| Backend {
            address: a.parse().unwrap(),
            weight: 100,
            state: BackendState::Active,
        };
        let s = Service {
            name: "s".into(),
            key: ServiceKey {
                vip,
                port: 80,
                protocol: Protocol::Tcp,
            },
            source_ranges: vec![],
            affinity_timeout: None,
            encapsulation: Encapsulation::Ipip,
            backends: vec![backend("10.1.0.1"), backend("10.0.0.1"), backend("127.0.0.1")],
        };
        let fields: Vec<ServiceField> = service(&s).into_iter().map(|f| f.field).collect();
        assert_eq!(fields, [ServiceField::Backend(1), ServiceField::Backend(2)]);
    }

    #[test]
    fn egress_sources_of_a_family_without_destinations_never_match() {
        let p = EgressPolicy {
            name: "p".into(),
            source_cidrs: vec!["10.244.0.0/16".parse().unwrap(), "fd00:244::/64".parse().unwrap()],
            destination_cidrs: vec!["203.0.113.0/24".parse().unwrap()],
            excluded_cidrs: vec![],
            interface: "eth0".into(),
            egress_ip: Some("0.0.0.0".parse().unwrap()),
        };
        let fields: Vec<EgressPolicyField> = egress_policy(&p).into_iter().map(|f| f.field).collect();
        assert_eq!(
            fields,
            [EgressPolicyField::EgressIp, EgressPolicyField::SourceCidr(1)]
        );
    }

    #[test]
    fn peer_endpoints_need_a_port_and_a_unicast_address() {
        let peer = |e: &str| Peer {
            name: "n".into(),
            public_key: String::new(),
            endpoint: Some(e.parse().unwrap()),
            allowed_ips: vec![],
        };
        assert_eq!(self::peer(&peer("192.0.2.2:51820"), true), []);
        assert_eq!(
            self::peer(&peer("192.0.2.2:0"), false),
            [],
            "IPsec ignores the port"
        );
        for bad in ["192.0.2.2:0", "0.0.0.0:51820", "[ff02::1]:51820", "224.0.0.1:500"] {
            let found = self::peer(&peer(bad), true);
            assert_eq!(found.len(), 1, "{bad}");
            assert_eq!(
                (found[0].value.as_str(), found[0].severity),
                (bad, Severity::Error)
            );
        }
    }
}
