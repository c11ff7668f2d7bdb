//! `gatewayd check-config` on large files: the time of `config::load_file` (what the command
//! and every reload run) for a file with 4,000 unknown keys, a 1,500-service file with one typo
//! per service, and a 10,000-service file. Before the parse found all unknown keys in one pass
//! it reparsed the file once per key: 24 s for 4,000 keys, 36 s for 1,500 typos.
//!
//! `cargo bench -p gatewayd --bench config` (no root; a few seconds). Figures:
//! docs/performance.md.

use gatewayd::config::{self, SystemHost};
use std::fmt::Write;
use std::time::{Duration, Instant};

const RUNS: usize = 3;

fn service(text: &mut String, i: usize, typo: bool) {
    let (a, b) = (i / 250, i % 250 + 1);
    writeln!(
        text,
        "[[services]]\nname = \"svc-{i}\"\nvip = \"10.{a}.{b}.1\"\nport = 80\n{}backends = [\n  {{ address = \"10.200.{a}.{b}\" }},\n  {{ address = \"10.201.{a}.{b}\", weight = 50 }},\n]\n",
        if typo { "protcol = \"tcp\"\n" } else { "" }
    )
    .unwrap();
}

/// The best of [`RUNS`] loads, and the errors the file has.
fn time(path: &std::path::Path) -> (Duration, usize) {
    let mut best = Duration::MAX;
    let mut errors = 0;
    for _ in 0..RUNS {
        let start = Instant::now();
        let result = config::load_file(path, &SystemHost);
        best = best.min(start.elapsed());
        errors = result.err().map_or(0, |e| e.errors.len());
    }
    (best, errors)
}

fn main() {
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return; // `cargo test --benches` builds and lists benches: nothing to test here.
    }
    let dir = std::env::temp_dir().join(format!("gd-bench-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let mut unknown = String::new();
    for i in 0..4000 {
        writeln!(unknown, "unknown_key_{i} = {i}").unwrap();
    }
    let mut typos = String::new();
    for i in 0..1500 {
        service(&mut typos, i, true);
    }
    let mut large = String::new();
    for i in 0..10_000 {
        service(&mut large, i, false);
    }

    println!("check-config (config::load_file), best of {RUNS}:");
    for (name, text, wanted_errors) in [
        ("4,000 unknown keys", &unknown, 4000),
        ("1,500 services, one typo each", &typos, 1500),
        ("10,000 services", &large, 0),
    ] {
        let path = dir.join("gatewayd.toml");
        std::fs::write(&path, text).unwrap();
        let (took, errors) = time(&path);
        assert_eq!(errors, wanted_errors, "{name}: every error reported");
        println!(
            "  {name:<32} {:>7} lines {:>5} KB  {:>8.1} ms  {errors} errors",
            text.lines().count(),
            text.len() / 1024,
            took.as_secs_f64() * 1000.0
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
