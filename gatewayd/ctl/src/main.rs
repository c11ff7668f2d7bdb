//! gatewayctl: operate a running gatewayd over its control socket.
//!
//! Exit codes: 0 success, 1 the daemon answered with an error, 2 the daemon is unreachable.

use anyhow::{anyhow, Context, Result};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use gatewayd_common::api::{self, Request, Response, DEFAULT_CONTROL_SOCKET};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "gatewayctl",
    version,
    about = "Inspect and operate a running gatewayd"
)]
struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, default_value = DEFAULT_CONTROL_SOCKET, env = "GATEWAYD_SOCKET")]
    socket: PathBuf,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Version, uptime, attached programs, config generation and last reload.
    Status,
    /// Load balancer services, backends and traffic.
    Lb {
        #[command(subcommand)]
        command: LbCommand,
    },
    /// Egress gateway policies.
    Egress {
        #[command(subcommand)]
        command: EgressCommand,
    },
    /// Egress NAT translations.
    Nat {
        #[command(subcommand)]
        command: NatCommand,
    },
    /// Pod addresses of the Kubernetes clusters and their security identities.
    Identities,
    /// Node encryption (WireGuard or IPsec).
    Encryption {
        #[command(subcommand)]
        command: EncryptionCommand,
    },
    /// Stream datapath events (new flows, drops with their reason) as they happen.
    Observe(ObserveArgs),
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
}

#[derive(clap::Args)]
struct ObserveArgs {
    /// Only events with this verdict.
    #[arg(long, value_enum)]
    verdict: Option<Verdict>,
    /// Only flows to this VIP.
    #[arg(long)]
    vip: Option<std::net::IpAddr>,
    /// Only flows sent to this backend.
    #[arg(long)]
    backend: Option<std::net::IpAddr>,
    /// Only flows from this client CIDR.
    #[arg(long)]
    source: Option<ipnet::IpNet>,
    /// Only flows to this destination CIDR.
    #[arg(long)]
    destination: Option<ipnet::IpNet>,
    #[arg(long, value_enum)]
    protocol: Option<Protocol>,
    /// Only drops for this reason (see `gatewayctl lb stats`).
    #[arg(long)]
    reason: Option<String>,
    /// Exit after this many matching events.
    #[arg(long)]
    count: Option<u64>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Verdict {
    Forwarded,
    Dropped,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Protocol {
    Tcp,
    Udp,
}

impl ObserveArgs {
    fn matches(&self, e: &api::FlowEvent) -> bool {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().ok();
        let verdict = match self.verdict {
            Some(Verdict::Forwarded) => "forwarded",
            Some(Verdict::Dropped) => "dropped",
            None => "",
        };
        let protocol = match self.protocol {
            Some(Protocol::Tcp) => "tcp",
            Some(Protocol::Udp) => "udp",
            None => "",
        };
        (verdict.is_empty() || e.verdict == verdict)
            && (protocol.is_empty() || e.protocol == protocol)
            && self.vip.is_none_or(|v| ip(&e.destination) == Some(v))
            && self.backend.is_none_or(|b| ip(&e.backend) == Some(b))
            && self
                .source
                .is_none_or(|n| ip(&e.source).is_some_and(|a| n.contains(&a)))
            && self
                .destination
                .is_none_or(|n| ip(&e.destination).is_some_and(|a| n.contains(&a)))
            && self.reason.as_ref().is_none_or(|r| &e.reason == r)
    }
}

#[derive(Subcommand)]
enum LbCommand {
    /// Services with their backends, Maglev shares and counters.
    List,
    /// Datapath verdict counters by reason and connection-table occupancy.
    Stats,
}

#[derive(Subcommand)]
enum EgressCommand {
    /// Policies with their egress address, selectors and counters.
    List,
}

#[derive(Subcommand)]
enum NatCommand {
    /// Live translations: pod address and port, destination, egress address and port.
    List,
}

#[derive(Subcommand)]
enum EncryptionCommand {
    /// Mode, device, public key, and per peer: endpoint, handshake age, bytes; IPsec counts.
    Status,
}

/// Failures that map to distinct exit codes.
enum Failure {
    Unreachable(anyhow::Error),
    Daemon(String),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let request = match &cli.command {
        Command::Observe(args) => return observe(&cli.socket, args, cli.output),
        Command::Status => Request::Status,
        Command::Identities => Request::Identities,
        Command::Lb {
            command: LbCommand::List,
        } => Request::LbList,
        Command::Lb {
            command: LbCommand::Stats,
        } => Request::LbStats,
        Command::Egress {
            command: EgressCommand::List,
        } => Request::EgressList,
        Command::Nat {
            command: NatCommand::List,
        } => Request::NatList,
        Command::Encryption {
            command: EncryptionCommand::Status,
        } => Request::EncryptionStatus,
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "gatewayctl", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
    };
    match ask(&cli.socket, &request) {
        Ok(response) => {
            if cli.output == Output::Json {
                // The protocol tags each response with its kind; scripts want just the payload.
                let tagged = serde_json::to_value(&response).expect("serializable");
                let payload = match tagged {
                    serde_json::Value::Object(map) if map.len() == 1 => {
                        map.into_iter().next().expect("one entry").1
                    }
                    other => other,
                };
                println!(
                    "{}",
                    serde_json::to_string_pretty(&payload).expect("serializable")
                );
            } else {
                print_text(&response);
            }
            ExitCode::SUCCESS
        }
        Err(Failure::Daemon(message)) => {
            eprintln!("gatewayctl: the daemon answered: {message}");
            ExitCode::from(1)
        }
        Err(Failure::Unreachable(e)) => {
            eprintln!("gatewayctl: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn ask(socket: &PathBuf, request: &Request) -> Result<Response, Failure> {
    let exchange = || -> Result<Response> {
        let mut stream = UnixStream::connect(socket).with_context(|| {
            format!(
                "cannot connect to {} (is gatewayd running? are you root?)",
                socket.display()
            )
        })?;
        let mut line = serde_json::to_vec(request)?;
        line.push(b'\n');
        stream.write_all(&line)?;
        let mut answer = String::new();
        BufReader::new(stream).read_line(&mut answer)?;
        if answer.is_empty() {
            return Err(anyhow!("the daemon closed the connection without answering"));
        }
        Ok(serde_json::from_str(&answer)?)
    };
    match exchange().map_err(Failure::Unreachable)? {
        Response::Error(message) => Err(Failure::Daemon(message)),
        response => Ok(response),
    }
}

/// Streams events until interrupted, or until `--count` matched.
fn observe(socket: &PathBuf, args: &ObserveArgs, output: Output) -> ExitCode {
    let run = || -> Result<()> {
        let mut stream = UnixStream::connect(socket).with_context(|| {
            format!(
                "cannot connect to {} (is gatewayd running? are you root?)",
                socket.display()
            )
        })?;
        let mut line = serde_json::to_vec(&Request::Observe)?;
        line.push(b'\n');
        stream.write_all(&line)?;
        let mut seen = 0;
        for line in BufReader::new(stream).lines() {
            let line = line?;
            let Ok(event) = serde_json::from_str::<api::FlowEvent>(&line) else {
                eprintln!("gatewayctl: {line}");
                continue;
            };
            if !args.matches(&event) {
                continue;
            }
            match output {
                Output::Json => println!("{}", serde_json::to_string(&event)?),
                Output::Text => println!("{}", event_line(&event)),
            }
            seen += 1;
            if args.count.is_some_and(|n| seen >= n) {
                return Ok(());
            }
        }
        Err(anyhow!("the daemon closed the stream"))
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gatewayctl: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// `01:02:03.456  dropped    tcp  10.0.0.3:4000 -> 10.0.0.100:80  web  source_range_drop`
fn event_line(e: &api::FlowEvent) -> String {
    let ms = e.time_ns / 1_000_000;
    let day = (ms / 1000) % 86400;
    let time = format!(
        "{:02}:{:02}:{:02}.{:03}",
        day / 3600,
        (day / 60) % 60,
        day % 60,
        ms % 1000
    );
    let endpoint = |ip: &str, port: u16| {
        if ip.contains(':') {
            format!("[{ip}]:{port}")
        } else {
            format!("{ip}:{port}")
        }
    };
    let what = if e.verdict == "dropped" {
        e.reason.clone()
    } else {
        format!("-> backend {}", e.backend)
    };
    format!(
        "{time}  {:<9}  {:<3}  {} -> {}  {}  {}",
        e.verdict,
        e.protocol,
        endpoint(&e.source, e.source_port),
        endpoint(&e.destination, e.destination_port),
        if e.service.is_empty() { "-" } else { &e.service },
        what
    )
}

fn print_text(response: &Response) {
    match response {
        Response::Status(s) => print_status(s),
        Response::LbList(services) => print_lb_list(services),
        Response::LbStats(stats) => print_lb_stats(stats),
        Response::EgressList(policies) => print_egress_list(policies),
        Response::NatList(translations) => print_nat_list(translations),
        Response::Identities(identities) => print_identities(identities),
        Response::EncryptionStatus(status) => print_encryption_status(status),
        Response::Error(message) => println!("error: {message}"),
    }
}

fn print_status(s: &api::Status) {
    println!(
        "gatewayd {} (pid {}), up {}",
        s.version,
        s.pid,
        duration(s.uptime_seconds)
    );
    println!(
        "config:      {} (generation {})",
        s.config_path, s.config_generation
    );
    match &s.last_reload {
        None => println!("last reload: none"),
        Some(r) => println!(
            "last reload: {} at unix {}: {}",
            if r.ok { "ok" } else { "FAILED" },
            r.unix_time,
            r.message.lines().next().unwrap_or("")
        ),
    }
    println!("bpffs:       {}", s.bpffs);
    println!("services:    {} ({} backends)", s.services, s.backends);
    println!("programs:");
    if s.programs.is_empty() {
        println!("  (none attached)");
    }
    for p in &s.programs {
        println!(
            "  {:<12} {:<14} {:<16} id {:<6} {}",
            p.interface, p.attach, p.program, p.program_id, p.origin
        );
    }
    if !s.clusters.is_empty() {
        println!("clusters:");
    }
    for c in &s.clusters {
        let age = c
            .last_event_age_seconds
            .map(|a| format!("last event {} ago", duration(a)))
            .unwrap_or_else(|| "no event yet".into());
        println!(
            "  {:<12} id {:<4} {:<11} {age}; {} services, {} egress policies, {} peers, {} identities",
            c.name, c.id, c.state, c.services, c.egress_policies, c.peers, c.identities
        );
        // Kinds that are not synced, each with what it means; the rest would be noise.
        for k in c.kinds.iter().filter(|k| k.state != "synced") {
            let error = k.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default();
            println!("    {} {}: {}{error}", k.kind, k.api_version, k.state);
        }
        if c.kinds.is_empty() {
            if let Some(e) = &c.last_error {
                println!("    error: {e}");
            }
        }
    }
}

fn print_lb_list(services: &[api::LbService]) {
    if services.is_empty() {
        println!("no services");
    }
    for s in services {
        let vip = if s.vip.contains(':') {
            format!("[{}]", s.vip)
        } else {
            s.vip.clone()
        };
        println!(
            "{} {}:{}/{}  id {}  encap {}  maglev {}  pkts {} bytes {} flows {}",
            if s.name.is_empty() { "-" } else { &s.name },
            vip,
            s.port,
            s.protocol,
            s.service_id,
            s.encapsulation,
            s.maglev_table_size,
            s.traffic.packets,
            s.traffic.bytes,
            s.traffic.new_flows
        );
        if !s.source_ranges.is_empty() {
            println!("  source ranges: {}", s.source_ranges.join(", "));
        }
        if let Some(t) = s.affinity_timeout_seconds {
            println!("  session affinity: ClientIP, {t}s");
        }
        for b in &s.backends {
            println!(
                "  -> {:<40} {:<12} weight {:<5} slots {:<6} pkts {} bytes {} flows {}",
                b.address,
                b.state,
                b.weight,
                b.maglev_slots,
                b.traffic.packets,
                b.traffic.bytes,
                b.traffic.new_flows
            );
        }
    }
}

fn print_lb_stats(stats: &api::LbStats) {
    println!(
        "connection table: {} / {} entries",
        stats.flow_table_entries, stats.flow_table_capacity
    );
    println!("{:<22} {:>14} {:>16}", "reason", "packets", "bytes");
    for r in &stats.reasons {
        println!("{:<22} {:>14} {:>16}", r.reason, r.packets, r.bytes);
    }
}

fn print_egress_list(policies: &[api::EgressPolicyStatus]) {
    if policies.is_empty() {
        println!("no egress policies");
    }
    for p in policies {
        println!(
            "{}  id {}  egress {} on {}  out {} pkts {} bytes  in {} pkts {} bytes  flows {}  nat failures {}",
            p.name, p.policy_id, p.egress_ip, p.interface, p.packets_out, p.bytes_out, p.packets_in, p.bytes_in,
            p.new_flows, p.nat_failures
        );
        println!("  sources:      {}", p.source_cidrs.join(", "));
        println!("  destinations: {}", p.destination_cidrs.join(", "));
        if !p.excluded_cidrs.is_empty() {
            println!("  excluded:     {}", p.excluded_cidrs.join(", "));
        }
    }
}

fn print_nat_list(translations: &[api::NatTranslation]) {
    let endpoint = |ip: &str, port: u16| {
        if ip.contains(':') {
            format!("[{ip}]:{port}")
        } else {
            format!("{ip}:{port}")
        }
    };
    println!(
        "{:<5} {:<45} {:<45} {:<45} {:<12} {:>6} {:>8}  policy",
        "proto", "source", "destination", "translated to", "state", "age", "expires"
    );
    for t in translations {
        println!(
            "{:<5} {:<45} {:<45} {:<45} {:<12} {:>6} {:>8}  {}",
            t.protocol,
            endpoint(&t.source, t.source_port),
            endpoint(&t.destination, t.destination_port),
            endpoint(&t.egress_ip, t.egress_port),
            t.state,
            duration(t.age_seconds),
            duration(t.expires_in_seconds),
            t.policy
        );
    }
    println!("{} translations", translations.len());
}

fn print_identities(identities: &[api::PodIdentity]) {
    println!("{:<40} {:>10}  {:<12} pod", "address", "identity", "cluster");
    for i in identities {
        println!(
            "{:<40} {:>10}  {:<12} {}/{}",
            i.address, i.identity, i.cluster, i.namespace, i.pod
        );
    }
    println!("{} addresses", identities.len());
}

fn print_encryption_status(s: &api::EncryptionStatus) {
    println!("mode: {}", s.mode);
    if let Some(wg) = &s.wireguard {
        println!(
            "interface {} ({}), listening on port {}",
            wg.interface, wg.implementation, wg.listen_port
        );
        println!("public key: {}", wg.public_key);
        println!(
            "{:<16} {:<44} {:<28} {:>10} {:>14} {:>14}  allowed ips",
            "peer", "public key", "endpoint", "handshake", "rx bytes", "tx bytes"
        );
        for p in &wg.peers {
            println!(
                "{:<16} {:<44} {:<28} {:>10} {:>14} {:>14}  {}",
                if p.name.is_empty() { "-" } else { &p.name },
                p.public_key,
                p.endpoint.as_deref().unwrap_or("-"),
                p.handshake_age_seconds
                    .map(|a| format!("{} ago", duration(a)))
                    .unwrap_or_else(|| "never".into()),
                p.rx_bytes,
                p.tx_bytes,
                p.allowed_ips.join(", ")
            );
        }
    }
    if let Some(ipsec) = &s.ipsec {
        println!("local address: {}", ipsec.local_address);
        println!(
            "current key id: {}  installed key ids: {:?}",
            ipsec.current_key_id, ipsec.installed_key_ids
        );
        println!("XFRM states: {}  policies: {}", ipsec.states, ipsec.policies);
        println!("peers: {}", ipsec.peers.join(", "));
    }
}

fn duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}
