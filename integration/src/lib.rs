//! Building blocks for gatewayd's end-to-end tests: network namespaces joined by veth pairs,
//! the real `gatewayd` binary started inside one with a `NOTIFY_SOCKET` the test listens on,
//! and cleanup that runs even when a test fails (everything is removed on drop).
//!
//! Tests need root. Without it they print `SKIP: ...` and return, so a non-root `cargo test`
//! says what it did not run instead of passing silently.

use anyhow::{anyhow, bail, Context, Result};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// True when the test may run; otherwise prints why it is skipped.
pub fn require_root(test: &str) -> bool {
    if nix_geteuid() == 0 {
        return true;
    }
    eprintln!("SKIP: {test} needs root (network namespaces, XDP, bpffs); run the tests with sudo");
    false
}

fn nix_geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// A short name unique to this process and call, for namespaces and interfaces (<= 15 chars).
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}{n}", std::process::id() % 10000)
}

/// Runs a command and fails with its output when it fails.
pub fn run(program: &str, args: &[&str]) -> Result<Output> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace, deleted (with its interfaces) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Result<Self> {
        let name = unique(prefix);
        run("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs a command inside the namespace (network only; the mount namespace is the host's, so
    /// bpffs pins are visible).
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        let netns = format!("--net=/run/netns/{}", self.name);
        let mut full = vec![netns.as_str()];
        full.extend_from_slice(args);
        run("nsenter", &full)
    }

    /// A command to spawn inside the namespace.
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.name)).arg(program);
        cmd
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec(&["sysctl", "-qw", &format!("{key}={value}")])
            .map(|_| ())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Joins two namespaces with a veth pair named `a_if`/`b_if`, addresses given as CIDRs.
pub fn veth(a: &Netns, a_if: &str, a_addrs: &[&str], b: &Netns, b_if: &str, b_addrs: &[&str]) -> Result<()> {
    run(
        "ip",
        &[
            "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns", &b.name,
        ],
    )?;
    for (ns, ifname, addrs) in [(a, a_if, a_addrs), (b, b_if, b_addrs)] {
        for addr in addrs {
            let nodad = if addr.contains(':') { vec!["nodad"] } else { vec![] };
            let mut args = vec!["ip", "addr", "add", addr, "dev", ifname];
            args.extend(nodad);
            ns.exec(&args)?;
        }
        ns.exec(&["ip", "link", "set", ifname, "up"])?;
    }
    Ok(())
}

/// The workspace's built binaries (`cargo build` puts them next to the test's deps dir).
pub fn binary(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("GATEWAYD_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join(name)
}

/// A scratch directory for one test: config file, control socket; removed on drop.
pub struct Scratch {
    pub dir: PathBuf,
    /// A bpffs directory of this test's own, so tests never touch a real install's pins.
    pub bpffs: PathBuf,
}

impl Scratch {
    pub fn new() -> Result<Self> {
        let name = unique("gdt");
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir)?;
        Ok(Scratch {
            dir,
            bpffs: PathBuf::from("/sys/fs/bpf").join(name),
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn socket(&self) -> PathBuf {
        self.path("gatewayd.sock")
    }

    /// The `[daemon]` table pointing at this scratch area; tests prepend it to their configs.
    pub fn daemon_table(&self) -> String {
        format!(
            "[daemon]\nbpffs = {:?}\ncontrol_socket = {:?}\nstate_dir = {:?}\n\n",
            self.bpffs.display().to_string(),
            self.socket().display().to_string(),
            self.dir.display().to_string()
        )
    }

    pub fn write(&self, name: &str, contents: &str) -> Result<PathBuf> {
        let path = self.path(name);
        std::fs::write(&path, contents)?;
        Ok(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.bpffs.exists() {
            let _ = Command::new(binary("gatewayd"))
                .args(["teardown", "--config"])
                .arg(self.path("gatewayd.toml"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = std::fs::remove_dir_all(&self.bpffs);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running `gatewayd` inside a namespace, with the systemd notify socket it reports to.
pub struct Daemon {
    child: Option<Child>,
    notify: UnixDatagram,
    _notify_dir: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts gatewayd with `config` in `ns`; returns once it is spawned (not yet ready).
    pub fn spawn(ns: &Netns, scratch: &Scratch, config: &Path) -> Result<Self> {
        let notify_path = scratch.path(&format!("notify-{}", unique("n")));
        let notify = UnixDatagram::bind(&notify_path)?;
        let log = scratch.path("gatewayd.log");
        let logfile = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let child = ns
            .command(&binary("gatewayd"))
            .arg("--config")
            .arg(config)
            .env("NOTIFY_SOCKET", &notify_path)
            .env_remove("JOURNAL_STREAM")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(logfile.try_clone()?)
            .stderr(logfile)
            .spawn()
            .context("spawning gatewayd")?;
        Ok(Daemon {
            child: Some(child),
            notify,
            _notify_dir: notify_path,
            log,
        })
    }

    /// Waits for a notify message containing `wanted` (e.g. "READY=1"); returns every message
    /// received up to and including it. Fails if the daemon exits first.
    pub fn wait_notify(&mut self, wanted: &str, timeout: Duration) -> Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 4096];
        self.notify.set_read_timeout(Some(Duration::from_millis(200)))?;
        while Instant::now() < deadline {
            match self.notify.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let done = msg.lines().any(|l| l == wanted);
                    seen.push(msg);
                    if done {
                        return Ok(seen);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                        bail!(
                            "gatewayd exited ({status}) before {wanted}; log:\n{}",
                            self.log_text()
                        );
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(anyhow!(
            "no {wanted} within {timeout:?} (got {seen:?}); log:\n{}",
            self.log_text()
        ))
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// nsenter execs gatewayd in place, so the child's pid is the daemon's.
    pub fn signal(&self, signal: i32) -> Result<()> {
        // SAFETY: kill has no memory-safety preconditions.
        if unsafe { libc::kill(self.pid(), signal) } != 0 {
            bail!(
                "kill({}, {signal}): {}",
                self.pid(),
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// Waits for the daemon to exit and returns its status code (None if killed by a signal).
    pub fn wait(&mut self) -> Result<Option<i32>> {
        let mut child = self.child.take().ok_or_else(|| anyhow!("already waited"))?;
        Ok(child.wait()?.code())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `gatewayctl --output json ...` against a scratch socket and parses the answer.
pub fn gatewayctl(scratch: &Scratch, args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new(binary("gatewayctl"))
        .arg("--socket")
        .arg(scratch.socket())
        .args(["--output", "json"])
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "gatewayctl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The XDP program id attached to `ifname` in `ns`, if any (from `ip -d link`).
pub fn xdp_program_id(ns: &Netns, ifname: &str) -> Result<Option<u32>> {
    let out = stdout(&ns.exec(&["ip", "-d", "-j", "link", "show", "dev", ifname])?);
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v[0]["xdp"]["prog"]["id"].as_u64().map(|id| id as u32))
}

/// Entries of a pinned map, as bpftool prints them (JSON).
pub fn map_dump(pin: &Path) -> Result<Vec<serde_json::Value>> {
    let out = run(
        "bpftool",
        &["-j", "map", "dump", "pinned", &pin.display().to_string()],
    )?;
    Ok(serde_json::from_slice(&out.stdout)?)
}
