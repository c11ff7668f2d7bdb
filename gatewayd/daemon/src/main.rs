//! gatewayd: XDP load balancer, egress gateway and node encryption for Kubernetes gateway hosts.

use anyhow::Result;
use clap::{Parser, Subcommand};
use gatewayd::config::{self, SystemHost};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "gatewayd", version, about)]
struct Cli {
    /// Configuration file.
    #[arg(long, short, global = true, default_value = config::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Remove every pinned program, link and map (same as the `teardown` command), then exit.
    #[arg(long)]
    teardown: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (the default).
    Run,
    /// Validate a configuration file, print every error with its line, exit non-zero on errors.
    CheckConfig { file: PathBuf },
    /// Detach and remove everything gatewayd pinned under the configured bpffs directory.
    Teardown,
    /// Backend hosts: strip the DSR encapsulation at tcx ingress (for hosts without ipip).
    Decap {
        #[command(subcommand)]
        action: DecapAction,
    },
}

#[derive(Subcommand)]
enum DecapAction {
    /// Attach the decap program to an interface; it stays attached (pinned) after exit.
    Attach {
        #[arg(long)]
        interface: String,
        /// Also decapsulate GUE arriving on this UDP port.
        #[arg(long)]
        gue_port: Option<u16>,
        #[arg(long, default_value = "/sys/fs/bpf/gatewayd-decap")]
        bpffs: PathBuf,
    },
    /// Detach the decap program from one interface, or from all.
    Detach {
        #[arg(long)]
        interface: Option<String>,
        #[arg(long, default_value = "/sys/fs/bpf/gatewayd-decap")]
        bpffs: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("gatewayd: {e:#}");
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let command = match (cli.teardown, cli.command) {
        (true, _) => Command::Teardown,
        (false, command) => command.unwrap_or(Command::Run),
    };
    match command {
        Command::CheckConfig { file } => Ok(match config::load_file(&file, &SystemHost) {
            Ok(config) => {
                for w in &config.warnings {
                    eprintln!("{}: warning: {w}", file.display());
                }
                println!("{}: OK", file.display());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                eprintln!("{}: {} error(s)", file.display(), errors.errors.len());
                ExitCode::FAILURE
            }
        }),
        Command::Run => {
            let config = config::load_file(&cli.config, &SystemHost)?;
            gatewayd::logging::init(&config.settings.log_level, config.settings.log_format);
            for w in &config.warnings {
                tracing::warn!("{}: {w}", cli.config.display());
            }
            gatewayd::daemon::run(cli.config, config)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Teardown => {
            init_cli_logging();
            // Teardown must work where the configured interfaces are gone (or live in another
            // network namespace): only the file's own validity matters here.
            let settings = match config::load_file(&cli.config, &config::AnyHost) {
                Ok(c) => c.settings,
                Err(e) => {
                    tracing::warn!(
                        "{e}; tearing down the defaults ({}, WireGuard interface {})",
                        config::DEFAULT_BPFFS,
                        config::DEFAULT_WIREGUARD_INTERFACE
                    );
                    config::parse("", &config::AnyHost)
                        .expect("the empty config is valid")
                        .settings
                }
            };
            gatewayd::datapath::teardown(&settings.bpffs)?;
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(gatewayd::encryption::teardown(&settings.encryption))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Decap { action } => {
            init_cli_logging();
            match action {
                DecapAction::Attach {
                    interface,
                    gue_port,
                    bpffs,
                } => {
                    let id = gatewayd::datapath::attach_decap(&bpffs, &interface, gue_port)?;
                    println!("decap program {id} attached at tcx ingress of {interface}");
                }
                DecapAction::Detach { interface, bpffs } => {
                    gatewayd::datapath::detach_decap(&bpffs, interface.as_deref())?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn init_cli_logging() {
    gatewayd::logging::init("info", config::LogFormat::Text);
}
