//! Semantic validation: raw strings to typed settings and model, every error collected.

use super::raw::*;
use super::*;
use crate::lb::maglev;
use crate::model::checks;
use crate::model::*;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

/// What validation needs to know about the machine it runs on.
pub trait Host {
    fn interface_exists(&self, name: &str) -> bool;

    /// Whether the interface's driver can run XDP programs on the NIC (`xdp_mode = "offload"`).
    fn can_offload_xdp(&self, _interface: &str) -> bool {
        false
    }

    /// Where bpf file systems are mounted (besides /sys/fs/bpf, where gatewayd mounts one).
    fn bpf_mount_points(&self) -> Vec<PathBuf> {
        Vec::new()
    }
}

/// The real machine (the current network namespace).
pub struct SystemHost;

/// Drivers that take XDP programs onto the NIC (XDP_SETUP_PROG_HW): Netronome's, and the
/// kernel's test device.
const XDP_OFFLOAD_DRIVERS: [&str; 2] = ["nfp", "netdevsim"];

impl Host for SystemHost {
    fn interface_exists(&self, name: &str) -> bool {
        nix::net::if_::if_nametoindex(name).is_ok()
    }

    fn can_offload_xdp(&self, interface: &str) -> bool {
        std::fs::read_link(format!("/sys/class/net/{interface}/device/driver"))
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .is_some_and(|driver| XDP_OFFLOAD_DRIVERS.contains(&driver.as_str()))
    }

    fn bpf_mount_points(&self) -> Vec<PathBuf> {
        // Field 5 is the mount point (octal-escaped), the field after " - " the type.
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        info.lines()
            .filter_map(|l| {
                let (mount, fs) = l.split_once(" - ")?;
                (fs.split(' ').next() == Some("bpf")).then(|| {
                    let point = mount.split(' ').nth(4)?;
                    Some(PathBuf::from(point.replace("\\040", " ")))
                })?
            })
            .collect()
    }
}

/// A host on which every interface exists: for commands that read the file but act on pins,
/// not interfaces (teardown).
pub struct AnyHost;

impl Host for AnyHost {
    fn interface_exists(&self, _: &str) -> bool {
        true
    }

    fn can_offload_xdp(&self, _: &str) -> bool {
        true
    }

    fn bpf_mount_points(&self) -> Vec<PathBuf> {
        SystemHost.bpf_mount_points()
    }
}

/// Collects errors while converting, so one bad value never hides the next.
#[derive(Default)]
struct Checker {
    errors: Vec<ConfigError>,
    warnings: Vec<ConfigError>,
}

impl Checker {
    fn error(&mut self, path: String, value: Option<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            path,
            line: None,
            value,
            message: message.into(),
        });
    }

    /// A finding of the model's checks (shared with the Kubernetes sync), at `path`.
    fn finding<F>(&mut self, path: String, f: checks::Finding<F>) {
        let e = ConfigError {
            path,
            line: None,
            value: Some(format!("{:?}", f.value)),
            message: f.message,
        };
        match f.severity {
            checks::Severity::Error => self.errors.push(e),
            checks::Severity::Warning => self.warnings.push(e),
        }
    }

    /// The model's address checks for a value the file gives on its own (not inside an object);
    /// false if it is an error.
    fn address(&mut self, path: String, role: checks::Role, ip: IpAddr) -> bool {
        let finding = |message, severity| checks::Finding {
            field: (),
            value: ip.to_string(),
            message,
            severity,
        };
        if let Some(why) = checks::unusable(role, ip) {
            self.finding(path, finding(why, checks::Severity::Error));
            return false;
        }
        if let Some(why) = checks::doubtful(role, ip) {
            self.finding(path, finding(why, checks::Severity::Warning));
        }
        true
    }

    /// A map size: at least `min`, and at most `max` (the kernel allocates, or fails to, at
    /// creation: a typo must not ask for terabytes).
    fn capacity(&mut self, path: String, value: u32, min: u32, max: u32) {
        if value < min || value > max {
            self.error(path, Some(value.to_string()), format!("must be {min}-{max}"));
        }
    }

    fn parse<T: FromStr>(&mut self, path: String, value: &str, what: &str) -> Option<T> {
        match value.parse() {
            Ok(v) => Some(v),
            Err(_) => {
                self.error(path, Some(format!("{value:?}")), format!("not {what}"));
                None
            }
        }
    }

    /// Parses a CIDR and insists it is a network address (no host bits set), the way routers
    /// and Kubernetes do: `10.0.0.1/8` is almost always a typo.
    fn cidr(&mut self, path: String, value: &str) -> Option<IpNet> {
        let net: IpNet = self.parse(path.clone(), value, "a CIDR (address/prefix-length)")?;
        if net.trunc() != net {
            self.error(
                path,
                Some(format!("{value:?}")),
                format!("host bits set; the network is {}", net.trunc()),
            );
            return None;
        }
        Some(net)
    }

    fn cidrs(&mut self, path: &str, values: &[String]) -> Vec<IpNet> {
        values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| self.cidr(format!("{path}[{i}]"), v))
            .collect()
    }

    fn one_of<T: Copy>(&mut self, path: String, value: Option<&str>, default: T, choices: &[(&str, T)]) -> T {
        let Some(value) = value else { return default };
        match choices.iter().find(|(name, _)| *name == value) {
            Some((_, v)) => *v,
            None => {
                let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
                self.error(
                    path,
                    Some(format!("{value:?}")),
                    format!("must be one of {}", names.join(", ")),
                );
                default
            }
        }
    }
}

pub(super) fn validate(raw: RawConfig, host: &dyn Host) -> Result<Config, Vec<ConfigError>> {
    let mut c = Checker::default();

    let settings = settings(&mut c, &raw, host);
    let services = services(&mut c, &raw.services);
    let egress_policies = egress_policies(
        &mut c,
        &raw.egress_policies,
        settings.egress.interface.as_deref(),
        host,
    );
    let peers = peers(&mut c, &raw.peers, settings.encryption.mode);
    if settings.encryption.mode == EncryptionMode::Ipsec {
        if let Some(ip) = settings.encryption.ipsec.local_address {
            c.address("encryption.ipsec.local_address".into(), checks::Role::Source, ip);
        }
    }

    if c.errors.is_empty() {
        Ok(Config {
            settings,
            desired: DesiredState {
                services,
                egress_policies,
                peers,
                ..DesiredState::default()
            },
            warnings: c.warnings,
        })
    } else {
        Err(c.errors)
    }
}

fn settings(c: &mut Checker, raw: &RawConfig, host: &dyn Host) -> Settings {
    let metrics_listen = raw.metrics.listen.as_deref().unwrap_or(DEFAULT_METRICS_LISTEN);
    let metrics_listen = c
        .parse("metrics.listen".into(), metrics_listen, "an address:port")
        .unwrap_or_else(|| DEFAULT_METRICS_LISTEN.parse().expect("valid default"));

    let log_level = raw.logging.level.clone().unwrap_or_else(|| "info".into());
    c.one_of(
        "logging.level".into(),
        Some(log_level.as_str()),
        (),
        &[
            ("error", ()),
            ("warn", ()),
            ("info", ()),
            ("debug", ()),
            ("trace", ()),
        ],
    );
    let log_format = c.one_of(
        "logging.format".into(),
        raw.logging.format.as_deref(),
        LogFormat::Text,
        &[("text", LogFormat::Text), ("json", LogFormat::Json)],
    );

    let mut seen = HashSet::new();
    let mut interfaces = Vec::new();
    for (i, iface) in raw.interfaces.iter().enumerate() {
        let path = format!("interfaces[{i}].name");
        if !seen.insert(iface.name.as_str()) {
            c.error(path, Some(format!("{:?}", iface.name)), "interface listed twice");
            continue;
        }
        if !host.interface_exists(&iface.name) {
            c.error(
                path,
                Some(format!("{:?}", iface.name)),
                "no such network interface on this host",
            );
        }
        let xdp_mode = c.one_of(
            format!("interfaces[{i}].xdp_mode"),
            iface.xdp_mode.as_deref(),
            XdpMode::Native,
            &[
                ("native", XdpMode::Native),
                ("generic", XdpMode::Generic),
                ("offload", XdpMode::Offload),
            ],
        );
        if xdp_mode == XdpMode::Offload
            && host.interface_exists(&iface.name)
            && !host.can_offload_xdp(&iface.name)
        {
            c.error(
                format!("interfaces[{i}].xdp_mode"),
                Some("\"offload\"".into()),
                format!(
                    "XDP offload mode is not supported by {}'s driver (it needs a NIC that runs BPF programs: {}); use \"native\" or \"generic\"",
                    iface.name,
                    XDP_OFFLOAD_DRIVERS.join(", ")
                ),
            );
        }
        interfaces.push(Interface {
            name: iface.name.clone(),
            xdp_mode,
        });
    }

    let lb = lb_settings(c, &raw.lb);
    let egress = egress_settings(c, &raw.egress, host);
    let clusters = clusters(c, &raw.clusters);

    let path = |v: &Option<String>, default: &str| PathBuf::from(v.as_deref().unwrap_or(default));
    let state_dir = path(&raw.daemon.state_dir, DEFAULT_STATE_DIR);
    let encryption = encryption_settings(c, &raw.encryption, &state_dir, &clusters);
    let settings = Settings {
        bpffs: path(&raw.daemon.bpffs, DEFAULT_BPFFS),
        control_socket: path(
            &raw.daemon.control_socket,
            gatewayd_common::api::DEFAULT_CONTROL_SOCKET,
        ),
        state_dir,
        log_level,
        log_format,
        metrics_listen,
        interfaces,
        lb,
        egress,
        clusters,
        encryption,
    };
    for (key, p) in [
        ("daemon.bpffs", &settings.bpffs),
        ("daemon.control_socket", &settings.control_socket),
        ("daemon.state_dir", &settings.state_dir),
    ] {
        if !p.is_absolute() {
            c.error(
                key.into(),
                Some(format!("{:?}", p.display().to_string())),
                "must be an absolute path",
            );
        } else if p.components().any(|c| c == std::path::Component::ParentDir) {
            c.error(
                key.into(),
                Some(format!("{:?}", p.display().to_string())),
                "must not contain '..'",
            );
        }
    }
    if settings.bpffs.is_absolute() {
        bpffs(c, &settings.bpffs, host);
    }
    settings
}

/// gatewayd owns its bpffs directory: teardown removes it whole. So it must be a directory of
/// its own inside a bpf file system, never the file system's root (every other program's pins
/// would go) nor a directory elsewhere (gatewayd would mount a bpffs on it, making it a root).
fn bpffs(c: &mut Checker, dir: &Path, host: &dyn Host) {
    let mut roots = host.bpf_mount_points();
    roots.push(PathBuf::from("/sys/fs/bpf"));
    let value = Some(format!("{:?}", dir.display().to_string()));
    let dir = dir.components().collect::<PathBuf>();
    if dir == Path::new("/") || roots.contains(&dir) {
        c.error(
            "daemon.bpffs".into(),
            value,
            "is the root of a file system: teardown removes this directory with everything in it, \
             other programs' pins too; use a directory of gatewayd's own below it, e.g. /sys/fs/bpf/gatewayd",
        );
    } else if !roots.iter().any(|root| dir.starts_with(root)) {
        c.error(
            "daemon.bpffs".into(),
            value,
            "must be a directory inside a bpf file system: below /sys/fs/bpf (or another bpffs mount)",
        );
    }
}

/// Flows are 48 bytes of key and value plus the kernel's per-entry overhead: 64 Mi entries are
/// several GB of kernel memory already.
const MAX_FLOW_TABLE_SIZE: u32 = 1 << 26;

fn lb_settings(c: &mut Checker, raw: &RawLb) -> LbSettings {
    let maglev_table_size = raw.maglev_table_size.unwrap_or(maglev::DEFAULT_TABLE_SIZE);
    if let Err(why) = maglev::validate_table_size(maglev_table_size) {
        c.error(
            "lb.maglev_table_size".into(),
            Some(maglev_table_size.to_string()),
            why,
        );
    }
    let mut capacity = |key: &str, value: Option<u32>, default: u32, min: u32, max: u32| {
        let v = value.unwrap_or(default);
        c.capacity(format!("lb.{key}"), v, min, max);
        v
    };
    let flow_table_size = capacity(
        "flow_table_size",
        raw.flow_table_size,
        gatewayd_common::maps::MAX_LB_FLOWS,
        1024,
        MAX_FLOW_TABLE_SIZE,
    );
    // Each service has a Maglev table of its own (64 KB at the default size).
    let max_services = capacity(
        "max_services",
        raw.max_services,
        gatewayd_common::maps::MAX_SERVICES,
        16,
        1 << 20,
    );
    let max_backends = capacity(
        "max_backends",
        raw.max_backends,
        gatewayd_common::maps::MAX_BACKENDS,
        16,
        1 << 24,
    );

    let mut source = |key: &str, value: &Option<String>, v6: bool| {
        let value = value.as_deref()?;
        let path = format!("lb.{key}");
        // A bare address means a fixed source; a prefix lets the flow hash pick the host bits.
        let net = if value.contains('/') {
            c.cidr(path.clone(), value)?
        } else {
            IpNet::from(c.parse::<IpAddr>(path.clone(), value, "an IP address or CIDR")?)
        };
        if net.addr().is_ipv6() != v6 {
            c.error(
                path,
                Some(format!("{value:?}")),
                format!("must be an IPv{} address", if v6 { 6 } else { 4 }),
            );
            return None;
        }
        // The flow hash picks any address of a prefix: its first and last must be usable too.
        let mut ends = vec![net.network(), net.broadcast()];
        ends.dedup();
        ends.into_iter()
            .all(|ip| c.address(path.clone(), checks::Role::Source, ip))
            .then_some(net)
    };
    let encap_source_v4 = source("encap_source_v4", &raw.encap_source_v4, false);
    let encap_source_v6 = source("encap_source_v6", &raw.encap_source_v6, true);

    LbSettings {
        maglev_table_size,
        maglev_seed: raw.maglev_seed.unwrap_or(0),
        flow_table_size,
        max_services,
        max_backends,
        encap_source_v4,
        encap_source_v6,
    }
}

fn services(c: &mut Checker, raw: &[RawService]) -> BTreeMap<ServiceKey, Arc<Service>> {
    let mut out = BTreeMap::new();
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut keys: HashMap<ServiceKey, usize> = HashMap::new();
    for (i, s) in raw.iter().enumerate() {
        let p = |field: &str| format!("services[{i}].{field}");
        if s.name.is_empty() {
            c.error(p("name"), Some("\"\"".into()), "must not be empty");
        } else if let Some(first) = names.insert(&s.name, i) {
            c.error(
                p("name"),
                Some(format!("{:?}", s.name)),
                format!("duplicate service name (also services[{first}])"),
            );
        }
        let vip: Option<IpAddr> = c.parse(p("vip"), &s.vip, "an IP address");
        let protocol = c.one_of(
            p("protocol"),
            s.protocol.as_deref(),
            Protocol::Tcp,
            &[("tcp", Protocol::Tcp), ("udp", Protocol::Udp)],
        );
        if s.port == 0 {
            c.error(p("port"), Some("0".into()), "must be 1-65535");
        }
        let source_ranges = c.cidrs(&p("source_ranges"), &s.source_ranges);
        let encapsulation = match (s.encapsulation.as_deref(), s.gue_port) {
            (None | Some("ipip"), None) => Encapsulation::Ipip,
            (Some("gue"), Some(port)) if port != 0 => Encapsulation::Gue { port },
            (Some("gue"), _) => {
                c.error(
                    p("gue_port"),
                    s.gue_port.map(|v| v.to_string()),
                    "encapsulation \"gue\" needs a gue_port of 1-65535",
                );
                Encapsulation::Ipip
            }
            (None | Some("ipip"), Some(port)) => {
                c.error(
                    p("gue_port"),
                    Some(port.to_string()),
                    "only valid with encapsulation = \"gue\"",
                );
                Encapsulation::Ipip
            }
            (Some(other), _) => {
                c.error(
                    p("encapsulation"),
                    Some(format!("{other:?}")),
                    "must be one of ipip, gue",
                );
                Encapsulation::Ipip
            }
        };
        if s.session_affinity_timeout == Some(0) {
            c.error(
                p("session_affinity_timeout"),
                Some("0".into()),
                "must be at least 1 second (omit it for no affinity)",
            );
        }

        let mut backends = Vec::new();
        // The index in the file of each backend kept (a bad one is left out).
        let mut backend_index = Vec::new();
        let mut seen = HashSet::new();
        for (j, b) in s.backends.iter().enumerate() {
            let bp = |field: &str| format!("services[{i}].backends[{j}].{field}");
            let Some(address) = c.parse::<IpAddr>(bp("address"), &b.address, "an IP address") else {
                continue;
            };
            if !seen.insert(address) {
                c.error(
                    bp("address"),
                    Some(format!("{:?}", b.address)),
                    "backend listed twice in this service",
                );
                continue;
            }
            let weight = b.weight.unwrap_or(100);
            if weight == 0 || weight > 65535 {
                c.error(
                    bp("weight"),
                    Some(weight.to_string()),
                    "must be 1-65535 (set state = \"maintenance\" to take a backend out)",
                );
            }
            let state = c.one_of(
                bp("state"),
                b.state.as_deref(),
                BackendState::Active,
                &[
                    ("active", BackendState::Active),
                    ("terminating", BackendState::Terminating),
                    ("maintenance", BackendState::Maintenance),
                ],
            );
            backends.push(Backend {
                address,
                weight,
                state,
            });
            backend_index.push(j);
        }

        let Some(vip) = vip else { continue };
        let key = ServiceKey {
            vip,
            port: s.port,
            protocol,
        };
        if let Some(first) = keys.insert(key, i) {
            c.error(
                p("vip"),
                Some(format!("{:?}", s.vip)),
                format!("duplicate VIP: {key} is already services[{first}]"),
            );
            continue;
        }
        if let Some(bad) = source_ranges.iter().find(|n| n.addr().is_ipv6() != vip.is_ipv6()) {
            c.error(
                p("source_ranges"),
                Some(bad.to_string()),
                "address family differs from the VIP's",
            );
        }
        let service = Service {
            name: s.name.clone(),
            key,
            source_ranges,
            affinity_timeout: s.session_affinity_timeout,
            encapsulation,
            backends,
        };
        for f in checks::service(&service) {
            let path = match f.field {
                checks::ServiceField::Vip => p("vip"),
                checks::ServiceField::Backend(j) => {
                    format!("services[{i}].backends[{}].address", backend_index[j])
                }
            };
            c.finding(path, f);
        }
        out.insert(key, Arc::new(service));
    }
    out
}

fn egress_settings(c: &mut Checker, raw: &RawEgress, host: &dyn Host) -> EgressSettings {
    if let Some(name) = &raw.interface {
        if !host.interface_exists(name) {
            c.error(
                "egress.interface".into(),
                Some(format!("{name:?}")),
                "no such network interface on this host",
            );
        }
    }
    let port_min = raw.port_min.unwrap_or(20000);
    let port_max = raw.port_max.unwrap_or(32767);
    if port_min == 0 || port_min > port_max {
        c.error(
            "egress.port_min".into(),
            Some(format!("{port_min}..{port_max}")),
            "the NAT port range must be 1-65535 with port_min <= port_max",
        );
    }
    let nat_table_size = raw
        .nat_table_size
        .unwrap_or(gatewayd_common::maps::MAX_NAT_ENTRIES);
    c.capacity(
        "egress.nat_table_size".into(),
        nat_table_size,
        1024,
        MAX_FLOW_TABLE_SIZE,
    );
    let mut timeout = |key: &str, value: Option<u32>, default: u32| {
        let v = value.unwrap_or(default);
        if v == 0 {
            c.error(
                format!("egress.{key}"),
                Some("0".into()),
                "must be at least 1 second",
            );
        }
        v
    };
    EgressSettings {
        interface: raw.interface.clone(),
        port_min,
        port_max,
        nat_table_size,
        // Like Cilium's conntrack: long-lived TCP survives idle hours; the rest is short.
        tcp_established_timeout: timeout("tcp_established_timeout", raw.tcp_established_timeout, 21600),
        tcp_closing_timeout: timeout("tcp_closing_timeout", raw.tcp_closing_timeout, 10),
        tcp_syn_timeout: timeout("tcp_syn_timeout", raw.tcp_syn_timeout, 60),
        udp_timeout: timeout("udp_timeout", raw.udp_timeout, 60),
        icmp_timeout: timeout("icmp_timeout", raw.icmp_timeout, 30),
    }
}

fn egress_policies(
    c: &mut Checker,
    raw: &[RawEgressPolicy],
    default_interface: Option<&str>,
    host: &dyn Host,
) -> Vec<EgressPolicy> {
    let mut names = HashSet::new();
    raw.iter()
        .enumerate()
        .filter_map(|(i, e)| {
            let p = |field: &str| format!("egress_policies[{i}].{field}");
            if !names.insert(e.name.as_str()) {
                c.error(p("name"), Some(format!("{:?}", e.name)), "duplicate policy name");
            }
            let source_cidrs = c.cidrs(&p("source_cidrs"), &e.source_cidrs);
            let destination_cidrs = c.cidrs(&p("destination_cidrs"), &e.destination_cidrs);
            let excluded_cidrs = c.cidrs(&p("excluded_cidrs"), &e.excluded_cidrs);
            if e.source_cidrs.is_empty() {
                c.error(
                    p("source_cidrs"),
                    None,
                    "at least one source CIDR is required (pods as /32 or /128)",
                );
            }
            if e.destination_cidrs.is_empty() {
                c.error(
                    p("destination_cidrs"),
                    None,
                    "at least one destination CIDR is required",
                );
            }
            let egress_ip = match &e.egress_ip {
                Some(ip) => Some(c.parse::<IpAddr>(p("egress_ip"), ip, "an IP address")?),
                None => None,
            };
            let interface = match (&e.egress_interface, default_interface) {
                (Some(name), _) => {
                    if !host.interface_exists(name) {
                        c.error(
                            p("egress_interface"),
                            Some(format!("{name:?}")),
                            "no such network interface on this host",
                        );
                    }
                    name.clone()
                }
                (None, Some(default)) => default.to_owned(),
                (None, None) => {
                    c.error(
                        p("egress_interface"),
                        None,
                        "set egress_interface here or [egress] interface",
                    );
                    return None;
                }
            };
            if let (Some(ip), Some(bad)) = (
                egress_ip,
                destination_cidrs
                    .iter()
                    .find(|d| d.addr().is_ipv6() != egress_ip.is_some_and(|e| e.is_ipv6())),
            ) {
                c.error(
                    p("destination_cidrs"),
                    Some(bad.to_string()),
                    format!("address family differs from egress_ip {ip}"),
                );
            }
            let policy = EgressPolicy {
                name: e.name.clone(),
                source_cidrs,
                destination_cidrs,
                excluded_cidrs,
                interface,
                egress_ip,
            };
            // Indexes are the file's while every source CIDR parsed (a bad one is reported).
            if policy.source_cidrs.len() == e.source_cidrs.len() {
                for f in checks::egress_policy(&policy) {
                    let path = match f.field {
                        checks::EgressPolicyField::EgressIp => p("egress_ip"),
                        checks::EgressPolicyField::SourceCidr(k) => format!("{}[{k}]", p("source_cidrs")),
                    };
                    c.finding(path, f);
                }
            }
            Some(policy)
        })
        .collect()
}

fn encryption_settings(
    c: &mut Checker,
    raw: &RawEncryption,
    state_dir: &Path,
    clusters: &[Cluster],
) -> EncryptionSettings {
    let mode = c.one_of(
        "encryption.mode".into(),
        raw.mode.as_deref(),
        EncryptionMode::None,
        &[
            ("none", EncryptionMode::None),
            ("wireguard", EncryptionMode::WireGuard),
            ("ipsec", EncryptionMode::Ipsec),
        ],
    );
    let w = &raw.wireguard;
    let interface = w
        .interface
        .clone()
        .unwrap_or_else(|| DEFAULT_WIREGUARD_INTERFACE.into());
    // The kernel's limit (IFNAMSIZ - 1), and no characters `ip` or sysfs cannot take.
    if interface.is_empty()
        || interface.len() > 15
        || interface.contains(['/', ' ', ':'])
        || interface == "."
        || interface == ".."
    {
        c.error(
            "encryption.wireguard.interface".into(),
            Some(format!("{interface:?}")),
            "not a valid interface name (1-15 characters, no '/', ':' or space)",
        );
    }
    let listen_port = w.listen_port.unwrap_or(DEFAULT_WIREGUARD_PORT);
    if listen_port == 0 {
        c.error(
            "encryption.wireguard.listen_port".into(),
            Some("0".into()),
            "must be 1-65535 (peers need a fixed port to reach)",
        );
    }
    let implementation = c.one_of(
        "encryption.wireguard.implementation".into(),
        w.implementation.as_deref(),
        WireGuardImplementation::Auto,
        &[
            ("auto", WireGuardImplementation::Auto),
            ("kernel", WireGuardImplementation::Kernel),
            ("userspace", WireGuardImplementation::Userspace),
        ],
    );
    let private_key_file = w
        .private_key_file
        .as_ref()
        .map(PathBuf::from)
        .unwrap_or_else(|| state_dir.join("wireguard.key"));
    if !private_key_file.is_absolute() {
        c.error(
            "encryption.wireguard.private_key_file".into(),
            Some(format!("{:?}", private_key_file.display().to_string())),
            "must be an absolute path",
        );
    }
    // An interface address keeps its host bits (`10.99.0.1/24`), unlike the CIDRs elsewhere.
    let address = w.address.as_deref().and_then(|a| {
        c.parse(
            "encryption.wireguard.address".into(),
            a,
            "an address with prefix length (e.g. 10.99.0.1/24)",
        )
    });

    let i = &raw.ipsec;
    let key_file = i.key_file.as_ref().map(PathBuf::from);
    if let Some(k) = key_file.as_ref().filter(|k| !k.is_absolute()) {
        c.error(
            "encryption.ipsec.key_file".into(),
            Some(format!("{:?}", k.display().to_string())),
            "must be an absolute path",
        );
    }
    let key_secret = i.key_secret.as_deref().and_then(|s| key_secret(c, s, clusters));
    if key_file.is_some() && i.key_secret.is_some() {
        c.error(
            "encryption.ipsec.key_secret".into(),
            i.key_secret.as_ref().map(|s| format!("{s:?}")),
            "set either key_file or key_secret, not both",
        );
    }
    let local_address = i
        .local_address
        .as_deref()
        .and_then(|a| c.parse("encryption.ipsec.local_address".into(), a, "an IP address"));
    if mode == EncryptionMode::Ipsec {
        if key_file.is_none() && i.key_secret.is_none() {
            c.error(
                "encryption.ipsec.key_file".into(),
                None,
                "required when encryption.mode is \"ipsec\" (or key_secret)",
            );
        }
        if i.local_address.is_none() {
            c.error(
                "encryption.ipsec.local_address".into(),
                None,
                "required when encryption.mode is \"ipsec\" (this gateway's tunnel endpoint)",
            );
        }
    }
    let rotation_overlap = i.rotation_overlap.unwrap_or(DEFAULT_ROTATION_OVERLAP);
    if rotation_overlap == 0 {
        c.error(
            "encryption.ipsec.rotation_overlap".into(),
            Some("0".into()),
            "must be at least 1 second, or peers still on the old key lose traffic at once",
        );
    }
    EncryptionSettings {
        mode,
        wireguard: WireGuardSettings {
            interface,
            listen_port,
            implementation,
            private_key_file,
            address,
        },
        ipsec: IpsecSettings {
            key_file,
            key_secret,
            local_address,
            rotation_overlap,
        },
    }
}

/// `<cluster name>/<namespace>/<secret name>`, the cluster one of `[[clusters]]`.
fn key_secret(c: &mut Checker, value: &str, clusters: &[Cluster]) -> Option<SecretRef> {
    let path = "encryption.ipsec.key_secret";
    let parts: Vec<&str> = value.split('/').collect();
    let [cluster, namespace, name] = parts[..] else {
        c.error(
            path.into(),
            Some(format!("{value:?}")),
            "must be \"<cluster name>/<namespace>/<secret name>\"",
        );
        return None;
    };
    // Namespaces are DNS labels, Secret names DNS subdomains: lowercase, digits, '-' ('.').
    let dns = |s: &str, dots: bool| {
        !s.is_empty()
            && s.len() <= if dots { 253 } else { 63 }
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (dots && b == b'.'))
    };
    if !dns(namespace, false) || !dns(name, true) {
        c.error(
            path.into(),
            Some(format!("{value:?}")),
            "not a valid namespace and Secret name (lowercase letters, digits, '-')",
        );
        return None;
    }
    if !clusters.iter().any(|cl| cl.name == cluster) {
        c.error(
            path.into(),
            Some(format!("{value:?}")),
            format!("no [[clusters]] entry is named {cluster:?}"),
        );
        return None;
    }
    Some(SecretRef {
        cluster: cluster.into(),
        namespace: namespace.into(),
        name: name.into(),
    })
}

fn peers(c: &mut Checker, raw: &[RawPeer], mode: EncryptionMode) -> Vec<Peer> {
    let mut keys = HashMap::new();
    // A network routed to two peers: WireGuard would give it to the last one, IPsec would
    // install two policies for one selector.
    let mut networks: HashMap<IpNet, usize> = HashMap::new();
    raw.iter()
        .enumerate()
        .map(|(i, r)| {
            let p = |field: &str| format!("peers[{i}].{field}");
            // IPsec peers are known by their endpoint alone; every other mode needs the key.
            match (&r.public_key, mode) {
                (None, EncryptionMode::Ipsec) => {}
                (None, _) => c.error(
                    p("public_key"),
                    None,
                    "required (the peer's WireGuard public key)",
                ),
                (Some(key), _) if !is_wireguard_key(key) => c.error(
                    p("public_key"),
                    Some(format!("{key:?}")),
                    "not a base64 WireGuard key (44 characters)",
                ),
                (Some(key), _) => {
                    if let Some(first) = keys.insert(key.clone(), i) {
                        c.error(
                            p("public_key"),
                            Some(format!("{key:?}")),
                            format!("same key as peers[{first}]"),
                        );
                    }
                }
            }
            if mode == EncryptionMode::Ipsec && r.endpoint.is_none() {
                c.error(
                    p("endpoint"),
                    None,
                    "required in ipsec mode (the peer's tunnel endpoint)",
                );
            }
            let endpoint = r
                .endpoint
                .as_deref()
                .and_then(|e| c.parse(p("endpoint"), e, "an address:port"));
            let allowed_ips = c.cidrs(&p("allowed_ips"), &r.allowed_ips);
            for net in &allowed_ips {
                if let Some(first) = networks.insert(*net, i) {
                    c.error(
                        p("allowed_ips"),
                        Some(net.to_string()),
                        format!("also in peers[{first}].allowed_ips"),
                    );
                }
            }
            let peer = Peer {
                name: r.name.clone(),
                public_key: r.public_key.clone().unwrap_or_default(),
                endpoint,
                allowed_ips,
            };
            for f in checks::peer(&peer, mode != EncryptionMode::Ipsec) {
                let checks::PeerField::Endpoint = f.field;
                c.finding(p("endpoint"), f);
            }
            peer
        })
        .collect()
}

/// A WireGuard key is 32 bytes in standard base64: 43 characters and one `=`.
pub fn is_wireguard_key(key: &str) -> bool {
    key.len() == 44
        && key.ends_with('=')
        && key[..43]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

fn clusters(c: &mut Checker, raw: &[RawCluster]) -> Vec<Cluster> {
    let mut ids = HashSet::new();
    raw.iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let p = |field: &str| format!("clusters[{i}].{field}");
            if !ids.insert(r.id) {
                c.error(p("id"), Some(r.id.to_string()), "duplicate cluster id");
            }
            if r.id == 0 || r.id > 255 {
                c.error(p("id"), Some(r.id.to_string()), "must be 1-255 (it is part of every identity)");
            }
            let access = match (&r.kubeconfig, &r.server, &r.token_file) {
                (Some(path), None, None) => ClusterAccess::Kubeconfig { path: path.into(), context: r.context.clone() },
                (None, Some(server), Some(token)) => ClusterAccess::Token {
                    server: server.clone(),
                    token_file: token.into(),
                    ca_file: r.ca_file.as_ref().map(PathBuf::from),
                },
                _ => {
                    c.error(p("kubeconfig"), None, "set either kubeconfig (and optionally context), or server and token_file (and optionally ca_file)");
                    return None;
                }
            };
            if r.name.is_empty() || r.name.contains('/') {
                c.error(p("name"), Some(format!("{:?}", r.name)), "must be non-empty and without '/' (it prefixes the names of the cluster's services)");
            }
            let load_balancer_class = r
                .load_balancer_class
                .clone()
                .unwrap_or_else(|| DEFAULT_LOAD_BALANCER_CLASS.into());
            if load_balancer_class.is_empty() {
                c.error(p("load_balancer_class"), Some("\"\"".into()), "must not be empty");
            }
            let identity_ignore_labels = match &r.identity_ignore_labels {
                Some(labels) => {
                    for (j, l) in labels.iter().enumerate() {
                        if l.is_empty() || l.contains('=') {
                            c.error(
                                format!("clusters[{i}].identity_ignore_labels[{j}]"),
                                Some(format!("{l:?}")),
                                "must be a label key or a prefix ending in '/' or '*'",
                            );
                        }
                    }
                    labels.clone()
                }
                None => DEFAULT_IDENTITY_IGNORE_LABELS.iter().map(|l| l.to_string()).collect(),
            };
            let wireguard_port = r.wireguard_port.unwrap_or(DEFAULT_WIREGUARD_PORT);
            if wireguard_port == 0 {
                c.error(p("wireguard_port"), Some("0".into()), "must be 1-65535");
            }
            let address_pools = c.cidrs(&p("address_pools"), &r.address_pools);
            if address_pools.len() == r.address_pools.len() {
                for (j, pool) in address_pools.iter().enumerate() {
                    c.address(format!("clusters[{i}].address_pools[{j}]"), checks::Role::Vip, pool.network());
                }
            }
            Some(Cluster {
                id: r.id,
                name: r.name.clone(),
                access,
                load_balancer_class,
                identity_ignore_labels,
                wireguard_port,
                address_pools,
            })
        })
        .collect()
}
