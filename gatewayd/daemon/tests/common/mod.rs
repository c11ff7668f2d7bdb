//! The test kit of the program tests (`tests/lb_program.rs`, `tests/egress_program.rs`) and
//! the benchmarks (`benches/lb.rs`, `benches/egress.rs`), which run the datapath's programs
//! with BPF_PROG_TEST_RUN on crafted packets:
//!
//! - [`packet`]: the one packet builder (every length and checksum right) and the checks of
//!   what a program left;
//! - [`hash`]: a userspace copy of the datapath's flow hash, to predict Maglev picks and NAT
//!   ports;
//! - [`lb`]: the load balancer loaded as the daemon loads it, a namespace `bpf_fib_lookup` can
//!   route backends in, and tables of cases (input packet, expected verdict and output, one
//!   line of description each);
//! - [`egress`]: the egress NAT object with the tests' standard policies;
//! - here: what they share (scratch bpffs pins, benchmark figures, compiling reference
//!   programs).
//!
//! Everything created is removed on drop (pins, namespaces), so a failing test leaves nothing
//! behind. Only 10.x and fd00:: addresses are used inside namespaces created here (the egress
//! tests add documentation ranges, which never leave the test run).

#![allow(dead_code)] // each user (test, bench) uses a different part

pub mod egress;
pub mod hash;
pub mod lb;
pub mod packet;

use anyhow::{bail, Context, Result};
pub use gatewayd_integration::require_root;
use gatewayd_integration::unique;
use std::path::PathBuf;
use std::process::Command;

/// A bpffs directory of our own, torn down (pins removed) on drop.
pub struct ScratchPins {
    pub path: PathBuf,
}

impl ScratchPins {
    pub fn new() -> Self {
        ScratchPins {
            path: PathBuf::from("/sys/fs/bpf").join(unique("gatewayd-test-")),
        }
    }
}

impl Default for ScratchPins {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ScratchPins {
    fn drop(&mut self) {
        if let Err(e) = gatewayd::datapath::teardown(&self.path) {
            eprintln!("warning: teardown of {}: {e:#}", self.path.display());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Benchmark figures (benches/*.rs).
// ---------------------------------------------------------------------------------------------

/// A run longer than this was interrupted or preempted inside the timed region (the slowest
/// path measured takes about 3 us): benchmarks leave it out of their means and count it.
pub const OUTLIER_NS: u64 = 10_000;

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    s[s.len() / 2]
}

/// (min, max) of the rounds' figures.
pub fn spread_of(v: &[f64]) -> (f64, f64) {
    (
        v.iter().cloned().fold(f64::MAX, f64::min),
        v.iter().cloned().fold(0.0, f64::max),
    )
}

/// The 1, 5 and 15 minute load averages: how busy the machine was while a benchmark ran.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Pins the calling thread to one CPU (the second if there is one): per-CPU maps and caches
/// stay warm, and figures do not mix two CPUs.
pub fn pin_to_one_cpu() -> Result<()> {
    let mut cpu = nix::sched::CpuSet::new();
    cpu.set(1).or_else(|_| cpu.set(0))?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpu)?;
    Ok(())
}

/// Compiles a BPF C program (reference programs of the benchmarks, kept out of xdp/ because
/// build.rs embeds every xdp/*.c into the daemon) and returns the object. `BPF_CLANG`
/// overrides the compiler (default clang-19).
pub fn compile_bpf(source: &str) -> Result<Vec<u8>> {
    let dir = std::env::temp_dir().join(unique("gatewayd-bpf-"));
    std::fs::create_dir_all(&dir)?;
    let (src, obj) = (dir.join("program.c"), dir.join("program.o"));
    std::fs::write(&src, source)?;
    let clang = std::env::var("BPF_CLANG").unwrap_or_else(|_| "clang-19".into());
    let out = Command::new(&clang)
        .args(["-O2", "-g", "-target", "bpf", "-c"])
        .arg(format!("-I/usr/include/{}-linux-gnu", std::env::consts::ARCH))
        .arg(&src)
        .arg("-o")
        .arg(&obj)
        .output()
        .with_context(|| format!("running {clang}"));
    let bytes = std::fs::read(&obj);
    std::fs::remove_dir_all(&dir)?;
    let out = out?;
    if !out.status.success() {
        bail!("{clang}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(bytes?)
}
