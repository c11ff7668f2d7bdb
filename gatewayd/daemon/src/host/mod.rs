//! The host's own kernel networking, over netlink and getifaddrs rather than BPF: the
//! neighbour entries of the backends' next hops ([`neighbours`]), the egress addresses
//! gatewayd assigns ([`addresses`]), and the addresses interfaces already have.

pub mod addresses;
pub mod neighbours;

use std::net::IpAddr;

/// The first address of an interface in one family (IPv6: not link-local): the load balancer's
/// default outer source, an egress policy's default SNAT address.
pub fn interface_address(interface: &str, v6: bool) -> Option<IpAddr> {
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    addrs
        .filter(|a| a.interface_name == interface)
        .filter_map(|a| a.address)
        .find_map(|sa| {
            if v6 {
                sa.as_sockaddr_in6()
                    .map(|s| IpAddr::V6(s.ip()))
                    .filter(|ip| matches!(ip, IpAddr::V6(v) if (v.segments()[0] & 0xffc0) != 0xfe80))
            } else {
                sa.as_sockaddr_in().map(|s| IpAddr::V4(s.ip()))
            }
        })
}
