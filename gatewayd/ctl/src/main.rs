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
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand)]
enum LbCommand {
    /// Services with their backends, Maglev shares and counters.
    List,
    /// Datapath verdict counters by reason and connection-table occupancy.
    Stats,
}

/// Failures that map to distinct exit codes.
enum Failure {
    Unreachable(anyhow::Error),
    Daemon(String),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let request = match &cli.command {
        Command::Status => Request::Status,
        Command::Lb {
            command: LbCommand::List,
        } => Request::LbList,
        Command::Lb {
            command: LbCommand::Stats,
        } => Request::LbStats,
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

fn print_text(response: &Response) {
    match response {
        Response::Status(s) => print_status(s),
        Response::LbList(services) => print_lb_list(services),
        Response::LbStats(stats) => print_lb_stats(stats),
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

fn duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}
