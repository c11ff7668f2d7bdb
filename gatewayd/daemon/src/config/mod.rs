//! Loading and validating `gatewayd.toml`.
//!
//! The file is read in three passes so that `check-config` can name every problem at once:
//! 1. serde with `deny_unknown_fields`; an unknown key is recorded and commented out, and the
//!    parse is retried, so one stray key does not hide the rest of the file;
//! 2. semantic validation of every value (addresses, CIDRs, names, duplicates, interfaces);
//! 3. each error's path (`services[1].vip`) is mapped back to its line with toml_edit's spans.

mod raw;
mod validate;

use crate::model::{DesiredState, XdpMode};
use ipnet::IpNet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use validate::{is_wireguard_key, AnyHost, Host, SystemHost};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/gatewayd/gatewayd.toml";
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/gatewayd";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/gatewayd";
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9469";
pub const DEFAULT_WIREGUARD_INTERFACE: &str = "gwd-wg0";
pub const DEFAULT_WIREGUARD_PORT: u16 = 51820;
pub const DEFAULT_ROTATION_OVERLAP: u32 = 60;

/// A validated configuration: daemon settings plus the desired dataplane state.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub settings: Settings,
    pub desired: DesiredState,
    /// Values that are legal but almost surely wrong (a link-local VIP): applied all the same,
    /// and shown by `check-config` and in the log, located like errors.
    pub warnings: Vec<ConfigError>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub bpffs: PathBuf,
    pub control_socket: PathBuf,
    pub state_dir: PathBuf,
    pub log_level: String,
    pub log_format: LogFormat,
    pub metrics_listen: SocketAddr,
    pub interfaces: Vec<Interface>,
    pub lb: LbSettings,
    pub egress: EgressSettings,
    pub clusters: Vec<Cluster>,
    pub encryption: EncryptionSettings,
}

/// Node encryption: which mode runs, and the settings of each (the unused one keeps its
/// defaults, so teardown knows the WireGuard interface name whatever the mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptionSettings {
    pub mode: EncryptionMode,
    pub wireguard: WireGuardSettings,
    pub ipsec: IpsecSettings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncryptionMode {
    None,
    WireGuard,
    Ipsec,
}

impl fmt::Display for EncryptionMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EncryptionMode::None => "none",
            EncryptionMode::WireGuard => "wireguard",
            EncryptionMode::Ipsec => "ipsec",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireGuardSettings {
    /// The interface gatewayd owns.
    pub interface: String,
    pub listen_port: u16,
    pub implementation: WireGuardImplementation,
    /// Created (mode 0600) on first start when missing.
    pub private_key_file: PathBuf,
    /// Address (with prefix) assigned to the interface, if any.
    pub address: Option<IpNet>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireGuardImplementation {
    /// The kernel module where the kernel has it, boringtun otherwise.
    Auto,
    Kernel,
    /// boringtun inside the daemon.
    Userspace,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpsecSettings {
    /// Lines `<key id 1..255> <hex pre-shared key>`; the last line is the current key.
    /// In ipsec mode exactly one of `key_file` and `key_secret` is set.
    pub key_file: Option<PathBuf>,
    /// The same text in the data key [`KEY_SECRET_DATA_KEY`] of a Secret of a followed cluster.
    pub key_secret: Option<SecretRef>,
    /// This gateway's underlay address: the local tunnel endpoint.
    pub local_address: Option<std::net::IpAddr>,
    /// Seconds the previous key's states stay installed after a rotation.
    pub rotation_overlap: u32,
}

/// The data key of `encryption.ipsec.key_secret` that holds the keys.
pub const KEY_SECRET_DATA_KEY: &str = "keys";

/// A Secret of a followed cluster, written `<cluster name>/<namespace>/<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    pub cluster: String,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.cluster, self.namespace, self.name)
    }
}

/// NAT behaviour shared by every egress policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressSettings {
    /// Egress interface of policies that name none.
    pub interface: Option<String>,
    /// NAT ports (and ICMP identifiers), inclusive. Keep the range outside the gateway's own
    /// `net.ipv4.ip_local_port_range`, or its own connections from an egress IP may collide.
    pub port_min: u16,
    pub port_max: u16,
    /// Capacity of the NAT table (two entries per flow); applied at restart.
    pub nat_table_size: u32,
    /// Idle timeouts in seconds.
    pub tcp_established_timeout: u32,
    pub tcp_closing_timeout: u32,
    pub tcp_syn_timeout: u32,
    pub udp_timeout: u32,
    pub icmp_timeout: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub xdp_mode: XdpMode,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbSettings {
    pub maglev_table_size: u32,
    pub maglev_seed: u64,
    pub flow_table_size: u32,
    pub max_services: u32,
    pub max_backends: u32,
    /// Outer source of encapsulated IPv4 packets; `None`: the primary address of the interface.
    pub encap_source_v4: Option<IpNet>,
    pub encap_source_v6: Option<IpNet>,
}

impl LbSettings {
    /// Settings that size maps: changing them needs the maps recreated, so only a restart
    /// applies them.
    pub fn capacities(&self) -> (u32, u32, u32) {
        (self.flow_table_size, self.max_services, self.max_backends)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// 1-255: the top byte of every security identity from this cluster.
    pub id: u32,
    pub name: String,
    pub access: ClusterAccess,
    /// Services of type LoadBalancer with this `spec.loadBalancerClass` are served.
    pub load_balancer_class: String,
    /// Label keys (exact, or prefixes ending in `/` or `*`) that do not make an identity.
    pub identity_ignore_labels: Vec<String>,
    /// UDP port of the WireGuard endpoint of this cluster's nodes.
    pub wireguard_port: u16,
    /// LB-IPAM: VIPs for served Services that have none, written to their status. Empty: off.
    pub address_pools: Vec<IpNet>,
}

impl Cluster {
    /// A cluster as a `[[clusters]]` entry naming only its id, name and access gets it: every
    /// other setting at its default.
    pub fn new(id: u32, name: &str, access: ClusterAccess) -> Cluster {
        Cluster {
            id,
            name: name.into(),
            access,
            load_balancer_class: DEFAULT_LOAD_BALANCER_CLASS.into(),
            identity_ignore_labels: DEFAULT_IDENTITY_IGNORE_LABELS
                .iter()
                .map(|l| l.to_string())
                .collect(),
            wireguard_port: DEFAULT_WIREGUARD_PORT,
            address_pools: vec![],
        }
    }
}

pub const DEFAULT_LOAD_BALANCER_CLASS: &str = "gatewayd.io/dsr";
/// Labels that change with every rollout or pod and say nothing about what a pod may do.
pub const DEFAULT_IDENTITY_IGNORE_LABELS: &[&str] = &[
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "batch.kubernetes.io/controller-uid",
    "batch.kubernetes.io/job-name",
    "controller-uid",
    "job-name",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterAccess {
    Kubeconfig {
        path: PathBuf,
        context: Option<String>,
    },
    Token {
        server: String,
        token_file: PathBuf,
        ca_file: Option<PathBuf>,
    },
}

/// One problem in the file (an error, or a warning), located as precisely as the file allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the offending key, e.g. `services[1].vip`.
    pub path: String,
    pub line: Option<usize>,
    pub value: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)?;
        if let Some(value) = &self.value {
            write!(f, " (value: {value})")?;
        }
        Ok(())
    }
}

/// All the errors of one file.
#[derive(Debug, Clone)]
pub struct ConfigErrors {
    pub source: String,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {e}", self.source)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads and validates a config file.
pub fn load_file(path: &Path, host: &dyn Host) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        source: path.display().to_string(),
        errors: vec![ConfigError {
            path: String::new(),
            line: None,
            value: None,
            message: format!("cannot read the file: {e}"),
        }],
    })?;
    parse(&text, host).map_err(|errors| ConfigErrors {
        source: path.display().to_string(),
        errors,
    })
}

/// Parses and validates config text; `Err` holds every error found, in file order.
pub fn parse(text: &str, host: &dyn Host) -> Result<Config, Vec<ConfigError>> {
    let doc = match toml_edit::Document::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            return Err(vec![ConfigError {
                path: String::new(),
                line: e.span().map(|s| Lines::of(text).line(s.start)),
                value: None,
                message: format!("invalid TOML: {}", e.message()),
            }])
        }
    };
    let lines = Lines::of(text);
    let locate = |mut e: ConfigError| {
        e.line = span_of_path(&doc, &e.path).map(|s| lines.line(s.start));
        e
    };
    let mut errors = Vec::new();
    let raw = deserialize_reporting_unknown_keys(text, &doc, &lines, &mut errors);
    if let Some(raw) = raw {
        match validate::validate(raw, host) {
            Ok(mut config) if errors.is_empty() => {
                config.warnings = config.warnings.into_iter().map(locate).collect();
                config.warnings.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
                return Ok(config);
            }
            Ok(_) => {}
            Err(semantic) => errors.extend(semantic.into_iter().map(locate)),
        }
    }
    errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
    Err(errors)
}

/// One pass of serde over the text: every unknown key is reported (with the keys its table
/// does know), and the rest deserializes as if it were not there. Returns `None` when another
/// kind of serde error (a wrong type, a missing key) stops it. (Reparsing once per unknown key
/// made a file with thousands of them take minutes.)
fn deserialize_reporting_unknown_keys(
    text: &str,
    doc: &toml_edit::Document<&str>,
    lines: &Lines,
    errors: &mut Vec<ConfigError>,
) -> Option<raw::RawConfig> {
    let mut unknown = Vec::new();
    let result = toml::Deserializer::parse(text)
        .and_then(|de| serde_ignored::deserialize(de, |path| unknown.push(KeyPath::of(&path))));
    for key_path in unknown {
        let Some((Segment::Key(key), table)) = key_path.0.split_last() else {
            continue;
        };
        let expected = known_keys(table);
        let within = if table.is_empty() {
            String::new()
        } else {
            format!(" in {}", KeyPath(table.to_vec()))
        };
        let message = <serde::de::value::Error as serde::de::Error>::unknown_field(key, expected)
            .to_string()
            .replacen(", expected", &format!("{within}; expected"), 1);
        errors.push(ConfigError {
            path: String::new(),
            line: span_of_path(doc, &key_path.to_string()).map(|s| lines.line(s.start)),
            value: None,
            message,
        });
    }
    match result {
        Ok(raw) => Some(raw),
        Err(err) => {
            let offset = err.span().map(|s| s.start);
            errors.push(ConfigError {
                path: offset.map(|o| path_at(doc, o)).unwrap_or_default(),
                line: offset.map(|o| lines.line(o)),
                value: None,
                message: err.message().to_owned(),
            });
            None
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

/// A key's place in the file, shown as `services[1].backends[0].address`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KeyPath(Vec<Segment>);

impl KeyPath {
    fn of(path: &serde_ignored::Path) -> KeyPath {
        use serde_ignored::Path;
        let mut segments = Vec::new();
        let mut at = path;
        loop {
            at = match at {
                Path::Root => break,
                Path::Map { parent, key } => {
                    segments.push(Segment::Key(key.clone()));
                    parent
                }
                Path::Seq { parent, index } => {
                    segments.push(Segment::Index(*index));
                    parent
                }
                Path::Some { parent } | Path::NewtypeStruct { parent } | Path::NewtypeVariant { parent } => {
                    parent
                }
            };
        }
        segments.reverse();
        KeyPath(segments)
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Key(key) if i == 0 => f.write_str(key)?,
                Segment::Key(key) => write!(f, ".{key}")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// The keys the table at `table` knows, as serde's derive lists them: a deserializer that walks
/// down `table` and, at its end, catches the field list the derived code hands over.
fn known_keys(table: &[Segment]) -> &'static [&'static str] {
    use serde::de::value::{Error, StrDeserializer};
    use serde::de::{self, DeserializeSeed, Error as _, IntoDeserializer, MapAccess, SeqAccess, Visitor};
    use serde::Deserialize;

    struct Probe<'a> {
        rest: &'a [Segment],
        found: &'a std::cell::Cell<&'static [&'static str]>,
    }
    impl<'de> de::Deserializer<'de> for Probe<'_> {
        type Error = Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Error> {
            Err(Error::custom("not a table"))
        }
        fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            visitor.visit_some(self)
        }
        fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            match self.rest.split_first() {
                Some((Segment::Index(_), rest)) => visitor.visit_seq(One(Some(Probe { rest, ..self }))),
                _ => Err(Error::custom("not an array")),
            }
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, Error> {
            match self.rest.split_first() {
                None => {
                    self.found.set(fields);
                    Err(Error::custom("found"))
                }
                Some((Segment::Key(key), rest)) => visitor.visit_map(Entry {
                    key: Some(key),
                    value: Some(Probe { rest, ..self }),
                }),
                Some(_) => Err(Error::custom("not an array")),
            }
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            unit unit_struct newtype_struct tuple tuple_struct map enum identifier ignored_any
        }
    }
    struct One<'a>(Option<Probe<'a>>);
    impl<'de> SeqAccess<'de> for One<'_> {
        type Error = Error;
        fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, Error> {
            self.0.take().map(|probe| seed.deserialize(probe)).transpose()
        }
    }
    struct Entry<'a> {
        key: Option<&'a str>,
        value: Option<Probe<'a>>,
    }
    impl<'de> MapAccess<'de> for Entry<'_> {
        type Error = Error;
        fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Error> {
            let key = self
                .key
                .take()
                .map(|k| -> StrDeserializer<Error> { k.into_deserializer() });
            key.map(|k| seed.deserialize(k)).transpose()
        }
        fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
            seed.deserialize(self.value.take().ok_or_else(|| Error::custom("no value"))?)
        }
    }

    let found = std::cell::Cell::new(&[][..]);
    let _ = raw::RawConfig::deserialize(Probe {
        rest: table,
        found: &found,
    });
    found.get()
}

/// Line numbers of byte offsets: the newlines are found once, so locating thousands of errors
/// stays linear in the file.
struct Lines(Vec<usize>);

impl Lines {
    fn of(text: &str) -> Lines {
        Lines(
            text.bytes()
                .enumerate()
                .filter(|(_, b)| *b == b'\n')
                .map(|(i, _)| i)
                .collect(),
        )
    }

    /// The 1-based line of `offset`.
    fn line(&self, offset: usize) -> usize {
        self.0.partition_point(|&newline| newline < offset) + 1
    }
}

/// Finds the span of `a.b[2].c` in the parsed document; where the path runs out (a key that
/// was defaulted), the span of the deepest part that exists.
fn span_of_path(doc: &toml_edit::Document<&str>, path: &str) -> Option<std::ops::Range<usize>> {
    use toml_edit::{Item, Value};
    let segments: Vec<&str> = path.split('.').collect();
    let mut table: &dyn toml_edit::TableLike = doc.as_table();
    let mut span = None;
    for (n, segment) in segments.iter().enumerate() {
        let last = n + 1 == segments.len();
        let (key, index) = match segment.split_once('[') {
            Some((key, rest)) => (key, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (*segment, None),
        };
        let Some((k, v)) = table.get_key_value(key) else {
            return span;
        };
        span = v.span().or_else(|| k.span()).or(span);
        let next: Option<&dyn toml_edit::TableLike> = match (index, v) {
            (None, _) => v.as_table_like(),
            (Some(i), Item::ArrayOfTables(a)) => a.get(i).map(|t| {
                span = t.span().or(span.clone());
                t as &dyn toml_edit::TableLike
            }),
            (Some(i), Item::Value(Value::Array(a))) => a.get(i).and_then(|e| {
                span = e.span().or(span.clone());
                e.as_inline_table().map(|t| t as &dyn toml_edit::TableLike)
            }),
            _ => None,
        };
        match next {
            Some(t) if !last => table = t,
            _ => return span,
        }
    }
    span
}

/// The path of the deepest key whose value holds `offset`, e.g. `lb.maglev_seed`: serde reports
/// a wrong type or a missing key by position only.
fn path_at(doc: &toml_edit::Document<&str>, offset: usize) -> String {
    KeyPath(segments_at(doc.as_table(), offset).unwrap_or_default()).to_string()
}

fn segments_at(table: &dyn toml_edit::TableLike, offset: usize) -> Option<Vec<Segment>> {
    use toml_edit::{Item, Value};
    let holds = |span: Option<std::ops::Range<usize>>| span.is_some_and(|s| s.contains(&offset));
    let within = |key: &str, index: Option<usize>, rest: Option<Vec<Segment>>| {
        let mut path = vec![Segment::Key(key.to_owned())];
        path.extend(index.map(Segment::Index));
        path.extend(rest.unwrap_or_default());
        path
    };
    for (key, item) in table.iter() {
        match item {
            Item::Table(t) => {
                let inner = segments_at(t, offset);
                if inner.is_some() || holds(t.span()) {
                    return Some(within(key, None, inner));
                }
            }
            Item::ArrayOfTables(a) => {
                for (i, t) in a.iter().enumerate() {
                    let inner = segments_at(t, offset);
                    if inner.is_some() || holds(t.span()) {
                        return Some(within(key, Some(i), inner));
                    }
                }
            }
            Item::Value(v) if holds(v.span()) => {
                return Some(match v {
                    Value::InlineTable(t) => within(key, None, segments_at(t, offset)),
                    Value::Array(a) => match a.iter().position(|e| holds(e.span())) {
                        Some(i) => within(
                            key,
                            Some(i),
                            a.get(i)
                                .and_then(|e| e.as_inline_table())
                                .and_then(|t| segments_at(t, offset)),
                        ),
                        None => within(key, None, None),
                    },
                    _ => within(key, None, None),
                });
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BackendState, Encapsulation, Protocol, ServiceKey};

    /// A host with exactly these interfaces.
    struct FakeHost(&'static [&'static str]);
    impl Host for FakeHost {
        fn interface_exists(&self, name: &str) -> bool {
            self.0.contains(&name)
        }
    }
    const HOST: FakeHost = FakeHost(&["eth0", "lo"]);

    fn errors(text: &str) -> Vec<ConfigError> {
        parse(text, &HOST).expect_err("config should be rejected")
    }

    #[test]
    fn example_config_is_valid() {
        let text = include_str!("../../../../config/gatewayd.example.toml");
        let config = parse(text, &HOST).unwrap_or_else(|e| panic!("{e:#?}"));
        assert_eq!(config.desired.services.len(), 2);
        assert_eq!(config.settings.interfaces[0].xdp_mode, XdpMode::Generic);
        let dns = config
            .desired
            .services
            .values()
            .find(|s| s.name == "dns")
            .unwrap();
        assert_eq!(dns.encapsulation, Encapsulation::Gue { port: 6080 });
        assert_eq!(dns.key.protocol, Protocol::Udp);
    }

    #[test]
    fn empty_file_gives_defaults() {
        let config = parse("", &HOST).unwrap();
        assert_eq!(config.settings.bpffs, PathBuf::from(DEFAULT_BPFFS));
        assert_eq!(config.settings.metrics_listen.to_string(), DEFAULT_METRICS_LISTEN);
        assert_eq!(config.settings.lb.maglev_table_size, 16381);
        assert!(config.desired.services.is_empty());
    }

    #[test]
    fn one_error_per_problem_with_lines_and_values() {
        let text = r#"
[daemon]
bpffs = "/sys/fs/bpf/gatewayd"
colour = "blue"

[[interfaces]]
name = "eth9"

[[services]]
name = "a"
vip = "10.0.0.1"
port = 80
source_ranges = ["10.1.0.0/33"]
backends = [{ address = "10.2.0.1" }]

[[services]]
name = "b"
vip = "10.0.0.1"
port = 80
backends = [{ address = "10.2.0.2" }]
"#;
        let errs = errors(text);
        let shown: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert_eq!(errs.len(), 4, "{shown:#?}");
        assert_eq!(errs[0].line, Some(4));
        assert!(shown[0].contains("unknown field `colour`"), "{}", shown[0]);
        assert_eq!(errs[1].line, Some(7));
        assert!(
            shown[1].contains("interfaces[0].name")
                && shown[1].contains("\"eth9\"")
                && shown[1].contains("no such network interface")
        );
        assert_eq!(errs[2].line, Some(13));
        assert!(shown[2].contains("services[0].source_ranges[0]") && shown[2].contains("10.1.0.0/33"));
        assert_eq!(errs[3].line, Some(18));
        assert!(
            shown[3].contains("duplicate VIP") && shown[3].contains("services[0]"),
            "{}",
            shown[3]
        );
    }

    #[test]
    fn unknown_table_is_reported_and_the_rest_still_checked() {
        let errs = errors("[colours]\nred = 1\n\n[lb]\nmaglev_table_size = 16380\n");
        assert_eq!(errs.len(), 2, "{errs:#?}");
        assert!(errs[0].message.contains("unknown field `colours`"));
        assert_eq!(errs[1].path, "lb.maglev_table_size");
        assert_eq!(errs[1].line, Some(5));
    }

    #[test]
    fn syntax_error_names_its_line() {
        let errs = errors("[lb]\nmaglev_seed = = 3\n");
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].line, Some(2));
        assert!(errs[0].message.starts_with("invalid TOML"));
    }

    #[test]
    fn wrong_type_is_reported() {
        let errs = errors("[lb]\nmaglev_seed = \"three\"\n");
        assert_eq!(errs[0].line, Some(2));
        assert!(errs[0].message.contains("invalid type"), "{errs:?}");
    }

    #[test]
    fn values_are_checked_individually() {
        let text = r#"
[metrics]
listen = "localhost"

[lb]
encap_source_v4 = "2001:db8::1"
encap_source_v6 = "2001:db8::/64"

[[services]]
name = "a"
vip = "fd00::1"
port = 0
protocol = "sctp"
source_ranges = ["10.0.0.1/8", "10.0.0.0/8"]
encapsulation = "gue"
backends = [
  { address = "fd00:1::1", weight = 0 },
  { address = "fd00:1::1" },
  { address = "fd00:1::2", state = "drained" },
]
"#;
        let paths: Vec<String> = errors(text).into_iter().map(|e| e.path).collect();
        assert_eq!(
            paths,
            [
                "metrics.listen",
                "lb.encap_source_v4",
                // A missing key is located at its table's header.
                "services[0].gue_port",
                "services[0].port",
                "services[0].protocol",
                "services[0].source_ranges[0]",
                "services[0].source_ranges",
                "services[0].backends[0].weight",
                "services[0].backends[1].address",
                "services[0].backends[2].state",
            ]
        );
    }

    #[test]
    fn services_become_the_model() {
        let config = parse(
            r#"
[[services]]
name = "web"
vip = "10.0.0.1"
port = 80
session_affinity_timeout = 60
backends = [{ address = "10.1.0.1", weight = 5, state = "terminating" }]
"#,
            &HOST,
        )
        .unwrap();
        let key = ServiceKey {
            vip: "10.0.0.1".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let s = &config.desired.services[&key];
        assert_eq!(s.affinity_timeout, Some(60));
        assert_eq!(s.backends[0].weight, 5);
        assert_eq!(s.backends[0].state, BackendState::Terminating);
    }

    #[test]
    fn peers_policies_and_clusters_are_validated() {
        let text = r#"
[[egress_policies]]
name = "p"
source_cidrs = ["10.244.0.0/16"]
destination_cidrs = ["203.0.113.0/24"]
egress_ip = "192.0.2.1"

[[peers]]
name = "n"
public_key = "short"

[[clusters]]
id = 0
name = "c"
"#;
        let paths: Vec<String> = errors(text).into_iter().map(|e| e.path).collect();
        assert_eq!(
            paths,
            [
                "egress_policies[0].egress_interface",
                "peers[0].public_key",
                "clusters[0].kubeconfig",
                "clusters[0].id"
            ]
        );
    }

    #[test]
    fn clusters_have_defaults_and_checked_sync_settings() {
        let config = parse(
            r#"
[[clusters]]
id = 2
name = "prod"
kubeconfig = "/etc/gatewayd/prod.kubeconfig"
"#,
            &HOST,
        )
        .unwrap();
        let c = &config.settings.clusters[0];
        assert_eq!(c.load_balancer_class, DEFAULT_LOAD_BALANCER_CLASS);
        assert_eq!(c.wireguard_port, 51820);
        assert!(c.identity_ignore_labels.iter().any(|l| l == "pod-template-hash"));

        let text = r#"
[[clusters]]
id = 1
name = "a/b"
server = "https://10.0.0.10:6443"
token_file = "/etc/gatewayd/token"
load_balancer_class = ""
identity_ignore_labels = ["app", "x=y"]
wireguard_port = 0
address_pools = ["10.100.0.1/24"]
"#;
        let paths: Vec<String> = errors(text).into_iter().map(|e| e.path).collect();
        assert_eq!(
            paths,
            [
                "clusters[0].name",
                "clusters[0].load_balancer_class",
                "clusters[0].identity_ignore_labels[1]",
                "clusters[0].wireguard_port",
                "clusters[0].address_pools[0]"
            ]
        );
    }

    #[test]
    fn encryption_defaults_follow_the_state_dir() {
        let config = parse("[daemon]\nstate_dir = \"/srv/gd\"\n", &HOST).unwrap();
        let e = &config.settings.encryption;
        assert_eq!(e.mode, EncryptionMode::None);
        assert_eq!(e.wireguard.interface, "gwd-wg0");
        assert_eq!(e.wireguard.listen_port, 51820);
        assert_eq!(e.wireguard.implementation, WireGuardImplementation::Auto);
        assert_eq!(
            e.wireguard.private_key_file,
            PathBuf::from("/srv/gd/wireguard.key")
        );
        assert_eq!(e.ipsec.rotation_overlap, 60);
    }

    #[test]
    fn encryption_settings_are_validated() {
        let text = r#"
[encryption]
mode = "tls"

[encryption.wireguard]
interface = "a-name-far-too-long"
listen_port = 0
implementation = "fast"
private_key_file = "wireguard.key"
address = "10.99.0.1"

[encryption.ipsec]
key_file = "keys"
local_address = "gateway"
rotation_overlap = 0
"#;
        let paths: Vec<String> = errors(text).into_iter().map(|e| e.path).collect();
        assert_eq!(
            paths,
            [
                "encryption.mode",
                "encryption.wireguard.interface",
                "encryption.wireguard.listen_port",
                "encryption.wireguard.implementation",
                "encryption.wireguard.private_key_file",
                "encryption.wireguard.address",
                "encryption.ipsec.key_file",
                "encryption.ipsec.local_address",
                "encryption.ipsec.rotation_overlap",
            ]
        );
    }

    #[test]
    fn ipsec_mode_needs_its_keys_and_endpoints_but_no_wireguard_keys() {
        let errs = errors("[encryption]\nmode = \"ipsec\"\n\n[[peers]]\nname = \"n\"\n");
        let shown: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert_eq!(errs.len(), 3, "{shown:#?}");
        assert!(
            shown[0].contains("encryption.ipsec.key_file: required") && shown[0].contains("or key_secret"),
            "{shown:#?}"
        );
        assert!(shown[1].contains("encryption.ipsec.local_address: required"));
        assert!(shown[2].contains("peers[0].endpoint: required in ipsec mode"));

        let config = parse(
            r#"
[encryption]
mode = "ipsec"
[encryption.ipsec]
key_file = "/etc/gatewayd/ipsec.keys"
local_address = "192.0.2.1"

[[peers]]
name = "n"
endpoint = "192.0.2.2:0"
allowed_ips = ["10.244.0.0/24"]
"#,
            &HOST,
        )
        .unwrap();
        assert_eq!(config.settings.encryption.mode, EncryptionMode::Ipsec);
        assert_eq!(config.desired.peers[0].public_key, "");
    }

    #[test]
    fn ipsec_keys_can_come_from_a_secret_of_a_followed_cluster() {
        let config = parse(
            r#"
[encryption]
mode = "ipsec"
[encryption.ipsec]
key_secret = "prod/gatewayd/gatewayd-ipsec"
local_address = "192.0.2.1"

[[clusters]]
id = 1
name = "prod"
kubeconfig = "/etc/gatewayd/prod.kubeconfig"
"#,
            &HOST,
        )
        .unwrap();
        let ipsec = &config.settings.encryption.ipsec;
        assert_eq!(ipsec.key_file, None);
        assert_eq!(
            ipsec.key_secret,
            Some(SecretRef {
                cluster: "prod".into(),
                namespace: "gatewayd".into(),
                name: "gatewayd-ipsec".into(),
            })
        );
        assert_eq!(
            ipsec.key_secret.as_ref().unwrap().to_string(),
            "prod/gatewayd/gatewayd-ipsec"
        );

        let with = |secret: &str, file: bool| {
            let file = if file {
                "key_file = \"/etc/gatewayd/ipsec.keys\"\n"
            } else {
                ""
            };
            format!(
                "[encryption]\nmode = \"ipsec\"\n[encryption.ipsec]\n{file}key_secret = \"{secret}\"\n\
                 local_address = \"192.0.2.1\"\n\n[[clusters]]\nid = 1\nname = \"prod\"\n\
                 kubeconfig = \"/etc/gatewayd/prod.kubeconfig\"\n"
            )
        };
        for (text, wanted) in [
            (
                with("prod/gatewayd/gatewayd-ipsec", true),
                "set either key_file or key_secret, not both",
            ),
            (
                with("staging/gatewayd/gatewayd-ipsec", false),
                "no [[clusters]] entry is named \"staging\"",
            ),
            (
                with("gatewayd/gatewayd-ipsec", false),
                "must be \"<cluster name>/<namespace>/<secret name>\"",
            ),
            (
                with("prod/gatewayd/", false),
                "not a valid namespace and Secret name",
            ),
            (
                with("prod/Gatewayd/keys", false),
                "not a valid namespace and Secret name",
            ),
        ] {
            let errs = errors(&text);
            let shown: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
            assert_eq!(errs.len(), 1, "{shown:#?}");
            assert_eq!(errs[0].path, "encryption.ipsec.key_secret");
            let line = text.lines().position(|l| l.starts_with("key_secret")).unwrap() + 1;
            assert_eq!(errs[0].line, Some(line), "{shown:#?}");
            assert!(shown[0].contains(wanted), "{shown:#?}");
        }
    }

    #[test]
    fn every_unknown_key_is_reported_with_its_table_and_the_keys_it_knows() {
        let text = "colour = 1\n[daemon]\nsize = 2\n\n[[services]]\nname = \"a\"\nvip = \"10.0.0.1\"\n\
                    port = 80\ntypo = 3\nbackends = [{ address = \"10.1.0.1\", wieght = 3 }]\n\n\
                    [encryption.wireguard]\nkey = \"k\"\n";
        let shown: Vec<String> = errors(text).iter().map(|e| e.to_string()).collect();
        assert_eq!(
            shown,
            [
                "line 1: unknown field `colour`; expected one of `daemon`, `logging`, `metrics`, \
                 `interfaces`, `lb`, `services`, `egress`, `egress_policies`, `peers`, `clusters`, `encryption`",
                "line 3: unknown field `size` in daemon; expected one of `bpffs`, `control_socket`, `state_dir`",
                "line 9: unknown field `typo` in services[0]; expected one of `name`, `vip`, `port`, \
                 `protocol`, `source_ranges`, `session_affinity_timeout`, `encapsulation`, `gue_port`, `backends`",
                "line 10: unknown field `wieght` in services[0].backends[0]; expected one of `address`, \
                 `weight`, `state`",
                "line 13: unknown field `key` in encryption.wireguard; expected one of `interface`, \
                 `listen_port`, `implementation`, `private_key_file`, `address`",
            ]
        );
    }

    #[test]
    fn a_wrong_type_or_a_missing_key_names_its_path() {
        let errs = errors("[[services]]\nname = \"a\"\nport = 80\n");
        assert_eq!(
            (errs[0].path.as_str(), errs[0].line),
            ("services[0]", Some(1)),
            "{errs:?}"
        );
        assert!(errs[0].message.contains("missing field `vip`"));
        let errs = errors("[[services]]\nname = \"a\"\nvip = \"10.0.0.1\"\nport = 80\nbackends = [{ address = \"10.1.0.1\", weight = \"x\" }]\n");
        assert_eq!(errs[0].path, "services[0].backends[0].weight", "{errs:?}");
    }

    /// Values that parse but can never work (issue #15): each rejected with its field, value
    /// and why.
    #[test]
    fn addresses_and_sizes_that_can_never_work_are_rejected() {
        let service = |vip: &str, backend: &str| {
            format!("[[services]]\nname = \"s\"\nvip = \"{vip}\"\nport = 80\nbackends = [{{ address = \"{backend}\" }}]\n")
        };
        let policy = |sources: &str, egress_ip: &str| {
            format!(
                "[[egress_policies]]\nname = \"p\"\nsource_cidrs = [\"{sources}\"]\n\
                 destination_cidrs = [\"203.0.113.0/24\"]\negress_ip = \"{egress_ip}\"\negress_interface = \"eth0\"\n"
            )
        };
        let ipsec = |local: &str, endpoint: &str| {
            format!(
                "[encryption]\nmode = \"ipsec\"\n[encryption.ipsec]\nkey_file = \"/etc/gatewayd/k\"\n\
                 local_address = \"{local}\"\n\n[[peers]]\nname = \"n\"\nendpoint = \"{endpoint}\"\n"
            )
        };
        let wireguard_peer = |endpoint: &str| {
            format!(
                "[encryption]\nmode = \"wireguard\"\n\n[[peers]]\nname = \"n\"\n\
                 public_key = \"xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\"\nendpoint = \"{endpoint}\"\n"
            )
        };
        let mut cases: Vec<(String, &str, &str)> = vec![
            ("[lb]\nencap_source_v4 = \"0.0.0.0\"\n".into(), "lb.encap_source_v4", "unspecified"),
            ("[lb]\nencap_source_v4 = \"224.0.0.1\"\n".into(), "lb.encap_source_v4", "multicast"),
            ("[lb]\nencap_source_v4 = \"10.0.0.0/0\"\n".into(), "lb.encap_source_v4", "host bits"),
            ("[lb]\nencap_source_v6 = \"ff02::/64\"\n".into(), "lb.encap_source_v6", "multicast"),
            ("[lb]\nflow_table_size = 4294967295\n".into(), "lb.flow_table_size", "1024-67108864"),
            ("[egress]\nnat_table_size = 4294967295\n".into(), "egress.nat_table_size", "1024-67108864"),
            ("[daemon]\nbpffs = \"/\"\n".into(), "daemon.bpffs", "root of a file system"),
            ("[daemon]\nbpffs = \"/sys/fs/bpf\"\n".into(), "daemon.bpffs", "root of a file system"),
            ("[daemon]\nbpffs = \"/sys/fs/bpf/\"\n".into(), "daemon.bpffs", "root of a file system"),
            ("[daemon]\nbpffs = \"/srv/pins\"\n".into(), "daemon.bpffs", "inside a bpf file system"),
            ("[daemon]\nbpffs = \"/sys/fs/bpf/../..\"\n".into(), "daemon.bpffs", "'..'"),
            ("[[interfaces]]\nname = \"eth0\"\nxdp_mode = \"offload\"\n".into(), "interfaces[0].xdp_mode", "offload mode is not supported"),
            (service("10.0.0.1", "10.0.0.1"), "services[0].backends[0].address", "own VIP"),
            (service("10.0.0.1", "255.255.255.255"), "services[0].backends[0].address", "broadcast"),
            (service("10.0.0.1", "127.0.0.1"), "services[0].backends[0].address", "loopback"),
            (policy("10.244.0.0/16", "0.0.0.0"), "egress_policies[0].egress_ip", "unspecified"),
            (policy("10.244.0.0/16", "224.0.0.1"), "egress_policies[0].egress_ip", "multicast"),
            (policy("10.244.0.0/16", "255.255.255.255"), "egress_policies[0].egress_ip", "broadcast"),
            (policy("fd00:244::/64", "192.0.2.1"), "egress_policies[0].source_cidrs[0]", "never matches"),
            (ipsec("0.0.0.0", "192.0.2.2:0"), "encryption.ipsec.local_address", "unspecified"),
            (ipsec("192.0.2.1", "0.0.0.0:0"), "peers[0].endpoint", "unspecified"),
            (ipsec("192.0.2.1", "[ff02::1]:0"), "peers[0].endpoint", "multicast"),
            (wireguard_peer("192.0.2.2:0"), "peers[0].endpoint", "needs a port"),
            ("[[clusters]]\nid = 1\nname = \"c\"\nkubeconfig = \"/k\"\naddress_pools = [\"224.1.0.0/24\"]\n".into(), "clusters[0].address_pools[0]", "multicast"),
        ];
        for vip in crate::model::checks::UNUSABLE_VIPS {
            cases.push((service(vip, "10.1.0.1"), "services[0].vip", "a VIP cannot be"));
        }
        for (text, path, wanted) in &cases {
            let errs = errors(text);
            let shown: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
            assert_eq!(errs.len(), 1, "{text}\n{shown:#?}");
            assert_eq!(errs[0].path, *path, "{shown:#?}");
            assert!(errs[0].value.is_some() && errs[0].line.is_some(), "{shown:#?}");
            assert!(shown[0].contains(wanted), "{shown:#?} lacks {wanted:?}");
        }
    }

    #[test]
    fn link_local_addresses_are_legal_with_a_warning() {
        let config = parse(
            "[[services]]\nname = \"s\"\nvip = \"169.254.1.1\"\nport = 80\nbackends = [{ address = \"fe80::1\" }]\n",
            &HOST,
        )
        .unwrap();
        let shown: Vec<String> = config.warnings.iter().map(|w| w.to_string()).collect();
        assert_eq!(shown.len(), 2, "{shown:#?}");
        assert!(
            shown[0].starts_with("line 3: services[0].vip: a VIP with a link-local address"),
            "{shown:#?}"
        );
        assert!(
            shown[1].starts_with("line 5: services[0].backends[0].address"),
            "{shown:#?}"
        );
    }

    #[test]
    fn bpffs_may_be_below_any_bpf_mount_and_offload_needs_a_capable_nic() {
        struct Nfp;
        impl Host for Nfp {
            fn interface_exists(&self, _: &str) -> bool {
                true
            }
            fn can_offload_xdp(&self, name: &str) -> bool {
                name == "nfp0"
            }
            fn bpf_mount_points(&self) -> Vec<PathBuf> {
                vec!["/run/bpf".into()]
            }
        }
        let text = "[daemon]\nbpffs = \"/run/bpf/gatewayd\"\n\n[[interfaces]]\nname = \"nfp0\"\nxdp_mode = \"offload\"\n";
        assert!(parse(text, &Nfp).is_ok());
        let errs = parse("[daemon]\nbpffs = \"/run/bpf\"\n", &Nfp).unwrap_err();
        assert!(errs[0].message.contains("root of a file system"), "{errs:?}");
    }

    #[test]
    fn wireguard_peers_need_distinct_keys_and_networks() {
        let key = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
        let text = format!(
            "[encryption]\nmode = \"wireguard\"\n\n[[peers]]\nname = \"a\"\npublic_key = \"{key}\"\n\n\
             [[peers]]\nname = \"b\"\npublic_key = \"{key}\"\nallowed_ips = [\"10.1.0.0/16\"]\n\n\
             [[peers]]\nname = \"c\"\nallowed_ips = [\"10.1.0.0/16\"]\n"
        );
        let shown: Vec<String> = errors(&text).iter().map(|e| e.to_string()).collect();
        assert_eq!(shown.len(), 3, "{shown:#?}");
        assert!(shown[0].contains("peers[1].public_key") && shown[0].contains("same key as peers[0]"));
        assert!(shown[1].contains("peers[2].public_key: required"));
        assert!(
            shown[2].contains("peers[2].allowed_ips") && shown[2].contains("also in peers[1].allowed_ips"),
            "{shown:#?}"
        );
    }
}
