//! The one packet builder of the program tests and benchmarks: Ethernet frames with VLAN tags,
//! IPv4 (options, fragments) or IPv6 (Fragment header), and TCP, UDP, ICMP echo or any other
//! protocol, every length and checksum right; ICMP errors quoting a packet; and the checks of
//! what the programs leave (header views, checksums verified from scratch).

use gatewayd::model::{Protocol, ServiceKey};
use gatewayd_common::maps::{addr_bytes, FlowKey};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// The gateway's interface: frames arrive addressed to it.
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Whatever is on the other end of the wire (the upstream router).
pub const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

/// Bytes of payload a packet carries unless told otherwise: enough that the checksums cover
/// data, and that a quote of IP header + 8 bytes is shorter than the whole packet.
pub const DEFAULT_PAYLOAD: usize = 23;

pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("an IP address")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    /// TCP with these flags (byte 13).
    Tcp(u8),
    Udp,
    /// UDP sent without a checksum (legal over IPv4).
    UdpNoChecksum,
    /// ICMP / ICMPv6 echo request (reply = false) or reply; the identifier is `sport`.
    Echo {
        reply: bool,
    },
    /// Any other IP protocol, payload only.
    Raw(u8),
}

/// Fragment offset (8-byte units) and more-fragments flag: IPv4 header fields, or an IPv6
/// Fragment header. A later fragment (offset > 0) carries payload only, no L4 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frag {
    pub offset: u16,
    pub more: bool,
}

/// A packet, built with correct lengths and checksums.
#[derive(Debug, Clone)]
pub struct Pkt {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// (TPID, TCI) per tag, outermost first.
    pub vlans: Vec<(u16, u16)>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub l4: L4,
    pub payload: Vec<u8>,
    pub ttl: u8,
    /// IPv4 TOS / IPv6 traffic class.
    pub tos: u8,
    /// IPv4 DF (cleared by [`Pkt::fragment`]).
    pub df: bool,
    /// IPv4 options (a multiple of 4 bytes, at most 40).
    pub options: Vec<u8>,
    pub frag: Option<Frag>,
    /// Bytes after the IP packet (Ethernet padding of short frames).
    pub trailer: Vec<u8>,
}

impl Pkt {
    pub fn new(src: &str, sport: u16, dst: &str, dport: u16, l4: L4) -> Pkt {
        Pkt {
            dst_mac: GATEWAY_MAC,
            src_mac: ROUTER_MAC,
            vlans: vec![],
            src: ip(src),
            dst: ip(dst),
            sport,
            dport,
            l4,
            payload: vec![],
            ttl: 63,
            tos: 0x28,
            df: true,
            options: vec![],
            frag: None,
            trailer: vec![],
        }
        .payload(DEFAULT_PAYLOAD)
    }

    /// A TCP SYN from `src:sport` to `dst:dport` (other flags: [`Pkt::flags`]).
    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16) -> Pkt {
        Pkt::new(src, sport, dst, dport, L4::Tcp(TCP_SYN))
    }

    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Pkt {
        Pkt::new(src, sport, dst, dport, L4::Udp)
    }

    /// An echo request (or reply) with identifier `id`.
    pub fn echo(src: &str, dst: &str, id: u16, reply: bool) -> Pkt {
        Pkt::new(src, id, dst, id, L4::Echo { reply })
    }

    /// The packet with other TCP flags.
    pub fn flags(mut self, flags: u8) -> Pkt {
        self.l4 = L4::Tcp(flags);
        self
    }

    /// `n` bytes of recognisable payload.
    pub fn payload(mut self, n: usize) -> Pkt {
        self.payload = (0..n).map(|i| (i * 7 + 3) as u8).collect();
        self
    }

    pub fn vlan(mut self, tci: u16) -> Pkt {
        self.vlans.push((0x8100, tci));
        self
    }

    pub fn qinq(mut self, outer: u16, inner: u16) -> Pkt {
        self.vlans.push((0x88a8, outer));
        self.vlans.push((0x8100, inner));
        self
    }

    /// A fragment of the datagram (a fragmented IPv4 datagram has no DF).
    pub fn fragment(mut self, offset: u16, more: bool) -> Pkt {
        self.frag = Some(Frag { offset, more });
        self.df = false;
        self
    }

    pub fn src_port(mut self, sport: u16) -> Pkt {
        self.sport = sport;
        self
    }

    pub fn source(mut self, src: &str) -> Pkt {
        self.src = ip(src);
        self
    }

    /// The same packet with other addresses and ports (what a translation must produce).
    pub fn with(&self, src: &str, sport: u16, dst: &str, dport: u16) -> Pkt {
        Pkt {
            src: ip(src),
            dst: ip(dst),
            sport,
            dport,
            ..self.clone()
        }
    }

    /// The answer from the destination: addresses and ports swapped.
    pub fn reply(&self, l4: L4) -> Pkt {
        Pkt {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            l4,
            ..self.clone()
        }
    }

    pub fn is_v4(&self) -> bool {
        self.src.is_ipv4()
    }

    pub fn proto(&self) -> u8 {
        match self.l4 {
            L4::Tcp(_) => IPPROTO_TCP,
            L4::Udp | L4::UdpNoChecksum => IPPROTO_UDP,
            L4::Echo { .. } if self.is_v4() => IPPROTO_ICMP,
            L4::Echo { .. } => IPPROTO_ICMPV6,
            L4::Raw(p) => p,
        }
    }

    fn later_fragment(&self) -> bool {
        self.frag.is_some_and(|f| f.offset != 0)
    }

    /// The L4 segment with its checksum (a later fragment: its payload only).
    pub fn segment(&self) -> Vec<u8> {
        if self.later_fragment() {
            return self.payload.clone();
        }
        let mut seg = match self.l4 {
            L4::Tcp(flags) => {
                let mut h = vec![0u8; 20];
                h[0..2].copy_from_slice(&self.sport.to_be_bytes());
                h[2..4].copy_from_slice(&self.dport.to_be_bytes());
                h[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes()); // seq
                if flags & TCP_ACK != 0 {
                    h[8..12].copy_from_slice(&0x0bad_cafeu32.to_be_bytes());
                }
                h[12] = 5 << 4;
                h[13] = flags;
                h[14..16].copy_from_slice(&64240u16.to_be_bytes());
                h
            }
            L4::Udp | L4::UdpNoChecksum => {
                let mut h = vec![0u8; 8];
                h[0..2].copy_from_slice(&self.sport.to_be_bytes());
                h[2..4].copy_from_slice(&self.dport.to_be_bytes());
                h[4..6].copy_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                h
            }
            L4::Echo { reply } => {
                let t = match (self.is_v4(), reply) {
                    (true, false) => 8,
                    (true, true) => 0,
                    (false, false) => 128,
                    (false, true) => 129,
                };
                let mut h = vec![t, 0, 0, 0];
                h.extend_from_slice(&self.sport.to_be_bytes());
                h.extend_from_slice(&7u16.to_be_bytes()); // sequence
                h
            }
            L4::Raw(_) => vec![],
        };
        seg.extend_from_slice(&self.payload);
        // ICMP (v4) has no pseudo-header.
        let seed = if self.proto() == IPPROTO_ICMP {
            0
        } else {
            pseudo_sum(self.src, self.dst, self.proto(), seg.len())
        };
        let c = csum(seed, &seg);
        match self.l4 {
            L4::Tcp(_) => seg[16..18].copy_from_slice(&c.to_be_bytes()),
            L4::Udp => {
                let c = if c == 0 { 0xffff } else { c };
                seg[6..8].copy_from_slice(&c.to_be_bytes());
            }
            L4::Echo { .. } => seg[2..4].copy_from_slice(&c.to_be_bytes()),
            L4::UdpNoChecksum | L4::Raw(_) => {}
        }
        seg
    }

    /// The IP packet (for the balancer: what the backend must receive inside the tunnel).
    pub fn ip_packet(&self) -> Vec<u8> {
        let seg = self.segment();
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                assert!(self.options.len().is_multiple_of(4) && self.options.len() <= 40);
                let hlen = 20 + self.options.len();
                let mut h = vec![0u8; hlen];
                h[0] = 0x40 | (hlen / 4) as u8;
                h[1] = self.tos;
                h[2..4].copy_from_slice(&((hlen + seg.len()) as u16).to_be_bytes());
                h[4..6].copy_from_slice(&0x4242u16.to_be_bytes());
                let mut frag = if self.df { 0x4000u16 } else { 0 };
                if let Some(f) = self.frag {
                    frag |= f.offset & 0x1fff;
                    if f.more {
                        frag |= 0x2000;
                    }
                }
                h[6..8].copy_from_slice(&frag.to_be_bytes());
                h[8] = self.ttl;
                h[9] = self.proto();
                h[12..16].copy_from_slice(&s.octets());
                h[16..20].copy_from_slice(&d.octets());
                h[20..].copy_from_slice(&self.options);
                let c = csum(0, &h);
                h[10..12].copy_from_slice(&c.to_be_bytes());
                h.extend_from_slice(&seg);
                h
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut ext = vec![];
                let mut nh = self.proto();
                if let Some(f) = self.frag {
                    ext = vec![nh, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef];
                    ext[2..4].copy_from_slice(&((f.offset << 3) | u16::from(f.more)).to_be_bytes());
                    nh = 44;
                }
                let mut h = vec![0u8; 40];
                let first = (6u32 << 28) | ((self.tos as u32) << 20) | 0x12345;
                h[0..4].copy_from_slice(&first.to_be_bytes());
                h[4..6].copy_from_slice(&((ext.len() + seg.len()) as u16).to_be_bytes());
                h[6] = nh;
                h[7] = self.ttl;
                h[8..24].copy_from_slice(&s.octets());
                h[24..40].copy_from_slice(&d.octets());
                h.extend_from_slice(&ext);
                h.extend_from_slice(&seg);
                h
            }
            _ => panic!("mixed families"),
        }
    }

    /// The Ethernet frame.
    pub fn frame(&self) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        for (tpid, tci) in &self.vlans {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&tci.to_be_bytes());
        }
        f.extend_from_slice(&(if self.is_v4() { 0x0800u16 } else { 0x86dd }).to_be_bytes());
        f.extend_from_slice(&self.ip_packet());
        f.extend_from_slice(&self.trailer);
        f
    }

    /// The key the datapath builds for this packet (connection table, NAT table): as on the
    /// wire, ICMP echo with the identifier as both ports.
    pub fn flow_key(&self) -> FlowKey {
        let (src, family) = addr_bytes(self.src);
        let (dst, _) = addr_bytes(self.dst);
        FlowKey {
            src,
            dst,
            sport: self.sport.to_be(),
            dport: self.dport.to_be(),
            proto: self.proto(),
            family,
            pad: 0,
        }
    }

    /// The load-balancer service this packet is addressed to.
    pub fn service_key(&self) -> ServiceKey {
        ServiceKey {
            vip: self.dst,
            port: self.dport,
            protocol: match self.l4 {
                L4::Tcp(_) => Protocol::Tcp,
                L4::Udp | L4::UdpNoChecksum => Protocol::Udp,
                other => panic!("no service for {other:?}"),
            },
        }
    }
}

/// An ARP request (neither IPv4 nor IPv6) as broadcast by the router.
pub fn arp_request() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&ROUTER_MAC);
    f.extend_from_slice(&[0x08, 0x06]);
    f.extend_from_slice(&[0u8; 28]);
    f
}

/// An ICMP error from `from` to `to` quoting `quote` (bytes of the offending IP packet):
/// IPv4 "fragmentation needed" with MTU 1400, or ICMPv6 "packet too big" with MTU 1280.
pub fn icmp_error(from: &str, to: &str, quote: &[u8]) -> Vec<u8> {
    let (src, dst) = (ip(from), ip(to));
    let mut msg = if src.is_ipv4() {
        vec![3, 4, 0, 0, 0, 0, 0x05, 0x78]
    } else {
        vec![2, 0, 0, 0, 0, 0, 0x05, 0x00]
    };
    msg.extend_from_slice(quote);
    let proto = if src.is_ipv4() {
        IPPROTO_ICMP
    } else {
        IPPROTO_ICMPV6
    };
    let seed = if src.is_ipv4() {
        0
    } else {
        pseudo_sum(src, dst, proto, msg.len())
    };
    let c = csum(seed, &msg);
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    Pkt {
        payload: msg,
        ..Pkt::new(from, 0, to, 0, L4::Raw(proto))
    }
    .frame()
}

// ---------------------------------------------------------------------------------------------
// Checksums.
// ---------------------------------------------------------------------------------------------

/// One's complement sum of `data` (16-bit big-endian words) added to `sum`, not folded.
pub fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_be_bytes([c[0], c[1]]) as u32;
        if sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
    }
    if let [last] = chunks.remainder() {
        sum += (*last as u32) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum
}

/// The checksum field value for `data` with its checksum field zeroed.
pub fn csum(sum: u32, data: &[u8]) -> u16 {
    !(csum_add(sum, data) as u16)
}

/// A region whose checksum field is filled checks out when it sums to 0xffff.
pub fn csum_ok(sum: u32, data: &[u8]) -> bool {
    csum_add(sum, data) == 0xffff
}

/// The pseudo-header sum for an L4 checksum.
pub fn pseudo_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut s = 0;
    match (src, dst) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            s = csum_add(s, &a.octets());
            s = csum_add(s, &b.octets());
            s = csum_add(s, &[0, proto]);
            csum_add(s, &(len as u16).to_be_bytes())
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            s = csum_add(s, &a.octets());
            s = csum_add(s, &b.octets());
            s = csum_add(s, &(len as u32).to_be_bytes());
            csum_add(s, &[0, 0, 0, proto])
        }
        _ => panic!("mixed families in a pseudo-header"),
    }
}

// ---------------------------------------------------------------------------------------------
// Reading what a program left.
// ---------------------------------------------------------------------------------------------

/// An Ethernet header as found in an output frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EthView {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub tags: Vec<(u16, u16)>,
    pub ethertype: u16,
    /// Offset of the L3 header.
    pub l3: usize,
}

pub fn parse_eth(f: &[u8]) -> EthView {
    let mut off = 12;
    let mut tags = vec![];
    let mut et = be16(f, off);
    while et == 0x8100 || et == 0x88a8 {
        tags.push((et, be16(f, off + 2)));
        off += 4;
        et = be16(f, off);
    }
    EthView {
        dst: f[0..6].try_into().unwrap(),
        src: f[6..12].try_into().unwrap(),
        tags,
        ethertype: et,
        l3: off + 2,
    }
}

pub fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

pub fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

pub fn ipv4_at(b: &[u8], off: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(b[off], b[off + 1], b[off + 2], b[off + 3]))
}

pub fn ipv6_at(b: &[u8], off: usize) -> IpAddr {
    let a: [u8; 16] = b[off..off + 16].try_into().unwrap();
    IpAddr::V6(Ipv6Addr::from(a))
}

/// What an IP packet carries, after every checksum it holds was verified from scratch.
#[derive(Debug)]
pub struct View {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    /// The L4 bytes (for a later fragment: the fragment's payload).
    pub l4: Vec<u8>,
}

impl View {
    pub fn port(&self, off: usize) -> u16 {
        be16(&self.l4, off)
    }
    pub fn sport(&self) -> u16 {
        self.port(0)
    }
    pub fn dport(&self) -> u16 {
        self.port(2)
    }
    pub fn echo_id(&self) -> u16 {
        self.port(4)
    }
}

/// Parses an IP packet and asserts its IPv4 header checksum and (unless it is a later
/// fragment, or `l4_complete` is false) its L4 checksum; a zero UDP checksum over IPv4 is
/// accepted as "none".
pub fn check_ip(ip: &[u8], l4_complete: bool) -> View {
    let (src, dst, proto, l4, later_fragment) = if ip[0] >> 4 == 4 {
        let hlen = usize::from(ip[0] & 0xf) * 4;
        assert!(csum_ok(0, &ip[..hlen]), "IPv4 header checksum of {ip:02x?}");
        let tot = usize::from(be16(ip, 2)).min(ip.len());
        let later = be16(ip, 6) & 0x1fff != 0;
        (
            ipv4_at(ip, 12),
            ipv4_at(ip, 16),
            ip[9],
            ip[hlen..tot].to_vec(),
            later,
        )
    } else {
        let (mut nh, mut off, mut later) = (ip[6], 40, false);
        if nh == 44 {
            later = be16(ip, 42) & 0xfff8 != 0;
            nh = ip[40];
            off = 48;
        }
        (ipv6_at(ip, 8), ipv6_at(ip, 24), nh, ip[off..].to_vec(), later)
    };
    if l4_complete && !later_fragment {
        let seed = if proto == IPPROTO_ICMP {
            0
        } else {
            pseudo_sum(src, dst, proto, l4.len())
        };
        let zero_udp = proto == IPPROTO_UDP && src.is_ipv4() && l4[6..8] == [0, 0];
        if matches!(proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMP | IPPROTO_ICMPV6) && !zero_udp {
            assert!(csum_ok(seed, &l4), "L4 checksum (protocol {proto}) of {ip:02x?}");
        }
    }
    View { src, dst, proto, l4 }
}

/// [`check_ip`] of an untagged Ethernet frame's packet, L4 checksum included.
pub fn check_frame(frame: &[u8]) -> View {
    check_ip(&frame[14..], true)
}
