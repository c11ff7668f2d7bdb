//! Building blocks for gatewayd's end-to-end tests: network namespaces joined by veth pairs,
//! the real `gatewayd` binary started inside one with a `NOTIFY_SOCKET` the test listens on,
//! and cleanup that runs even when a test fails (everything is removed on drop).
//!
//! Tests need root. Without it they print `SKIP: ...` and return, so a non-root `cargo test`
//! says what it did not run instead of passing silently.

pub mod apiserver;

use anyhow::{anyhow, bail, Context, Result};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// True when the test (or benchmark) may run; otherwise prints why it is skipped.
pub fn require_root(test: &str) -> bool {
    if nix_geteuid() == 0 {
        return true;
    }
    eprintln!("SKIP: {test} needs root (network namespaces, XDP, bpffs): run it with sudo");
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
    run_with_input(program, args, None)
}

/// [`run`], with `input` on the command's standard input.
pub fn run_with_input(program: &str, args: &[&str], input: Option<&str>) -> Result<Output> {
    use std::io::Write as _;
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program}"))?;
    if let Some(text) = input {
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
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

    /// Runs `ip` commands in the namespace, one per line, in one `ip -batch` call.
    pub fn ip_batch(&self, commands: &str) -> Result<()> {
        run_with_input("ip", &["-n", &self.name, "-batch", "-"], Some(commands)).map(|_| ())
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
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
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

// ---------------------------------------------------------------------------------------------
// Sockets inside namespaces, a LAN bridge, backend servers, captures: the pieces of the
// load-balancer end-to-end tests (tests/lb_dsr.rs).
// ---------------------------------------------------------------------------------------------

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;

impl Netns {
    /// Runs `f` on a new thread that has joined this namespace (network only). Sockets created
    /// there stay in the namespace for their whole life, whichever thread uses them later.
    pub fn enter_thread<T, F>(&self, f: F) -> JoinHandle<Result<T>>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            enter_netns(&path)?;
            f()
        })
    }

    /// Runs `f` on a thread that has joined this namespace and waits for its result; `f` may
    /// borrow from the caller. Sockets, `bpf_fib_lookup` and the ingress interface of a
    /// BPF_PROG_TEST_RUN are resolved in the namespace of the calling thread.
    pub fn run_in<T, F>(&self, f: F) -> Result<T>
    where
        T: Send,
        F: FnOnce() -> Result<T> + Send,
    {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                enter_netns(&path)?;
                f()
            })
            .join()
            .map_err(|_| anyhow!("thread in namespace {} panicked", self.name))?
        })
    }

    /// A TCP connection made from inside the namespace.
    pub fn tcp_connect(&self, to: SocketAddr, timeout: Duration) -> Result<TcpStream> {
        self.run_in(move || {
            TcpStream::connect_timeout(&to, timeout).with_context(|| format!("connecting to {to}"))
        })
    }

    /// `n` short TCP connections from the namespace to `to`, one request to a [`BackendServer`]
    /// each (all from distinct source ports); returns how many each server answered.
    pub fn tcp_requests(
        &self,
        to: SocketAddr,
        n: usize,
        timeout: Duration,
    ) -> Result<std::collections::BTreeMap<String, usize>> {
        self.run_in(move || {
            let mut served = std::collections::BTreeMap::new();
            for i in 0..n {
                let mut conn = TcpStream::connect_timeout(&to, timeout)
                    .with_context(|| format!("connection {i} to {to}"))?;
                let name = tcp_exchange(&mut conn, &format!("request-{i}"), timeout)
                    .with_context(|| format!("connection {i} to {to}"))?;
                *served.entry(name).or_insert(0) += 1;
            }
            Ok(served)
        })
    }

    /// A UDP socket of the namespace, connected to `to` (so only `to` can answer it).
    pub fn udp_connect(&self, to: SocketAddr) -> Result<UdpSocket> {
        self.run_in(move || {
            let any: SocketAddr = if to.is_ipv4() {
                "0.0.0.0:0".parse()?
            } else {
                "[::]:0".parse()?
            };
            let sock = UdpSocket::bind(any)?;
            sock.connect(to)?;
            Ok(sock)
        })
    }

    /// The MAC address of an interface of the namespace.
    pub fn mac(&self, ifname: &str) -> Result<String> {
        let out = stdout(&self.exec(&["ip", "-j", "link", "show", "dev", ifname])?);
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v[0]["address"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("no MAC address for {ifname} in {}", self.name))
    }
}

fn enter_netns(path: &str) -> Result<()> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {path}"))?;
    // SAFETY: setns on a valid fd; it only changes the calling thread's network namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns({path}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// A layer-2 segment: a namespace holding bridge `br0`, to which hosts are attached by veth
/// pairs. Ports are named `p<host interface>-<n>` on the bridge side.
pub struct Lan {
    /// XDP links on bridge ports (dropped, hence detached, before the namespace goes).
    xdp_links: Vec<OwnedFd>,
    pub ns: Netns,
    ports: u32,
}

impl Lan {
    pub fn new(prefix: &str) -> Result<Self> {
        let ns = Netns::new(prefix)?;
        ns.exec(&["ip", "link", "add", "br0", "type", "bridge"])?;
        ns.exec(&["ip", "link", "set", "br0", "up"])?;
        Ok(Lan {
            xdp_links: Vec::new(),
            ns,
            ports: 0,
        })
    }

    /// Plugs `host` into the bridge: its interface `ifname` gets `addrs` (CIDRs). Returns the
    /// name of the bridge port (in [`Lan::ns`]).
    pub fn attach(&mut self, host: &Netns, ifname: &str, addrs: &[&str]) -> Result<String> {
        self.ports += 1;
        let port = format!("port{}", self.ports);
        veth(host, ifname, addrs, &self.ns, &port, &[])?;
        self.ns.exec(&["ip", "link", "set", &port, "master", "br0"])?;
        Ok(port)
    }

    /// Lets `port` receive the frames its peer sends with XDP_TX/XDP_REDIRECT. A veth only
    /// takes XDP frames from its peer when it runs NAPI itself, i.e. when it has an XDP program
    /// (on this kernel, enabling GRO is not enough): attach one that passes everything.
    pub fn accept_xdp_frames(&mut self, port: &str) -> Result<()> {
        let port = port.to_owned();
        let link = self.ns.run_in(move || xdp_pass_link(&port))?;
        self.xdp_links.push(link);
        Ok(())
    }
}

/// Loads `r0 = XDP_PASS; exit` and attaches it (driver mode, bpf_link) to `ifname` of the
/// calling thread's namespace; detached when the returned fd is closed.
fn xdp_pass_link(ifname: &str) -> Result<OwnedFd> {
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_PROG_TYPE_XDP: u32 = 6;
    const BPF_XDP: u32 = 37;
    const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
    const XDP_PASS: u64 = 2;
    // struct bpf_insn: code, dst_reg:4|src_reg:4, off (i16), imm (i32), little-endian.
    let insns: [u64; 2] = [
        0xb7 | (XDP_PASS << 32), // BPF_ALU64 | BPF_MOV | BPF_K: r0 = imm
        0x95,                    // BPF_JMP | BPF_EXIT
    ];
    let license = b"GPL\0";
    let bpf = |cmd: libc::c_long, attr: &mut [u8; 128]| -> std::io::Result<OwnedFd> {
        // SAFETY: attr is a zero-padded union bpf_attr of the size passed.
        let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the kernel returned a new fd that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    };

    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&BPF_PROG_TYPE_XDP.to_ne_bytes());
    attr[4..8].copy_from_slice(&(insns.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    attr[48..56].copy_from_slice(b"gdt_pass");
    attr[68..72].copy_from_slice(&BPF_XDP.to_ne_bytes()); // expected_attach_type
    let prog = bpf(BPF_PROG_LOAD, &mut attr).context("loading an XDP_PASS program")?;

    let name = std::ffi::CString::new(ifname)?;
    // SAFETY: a valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        bail!("no interface {ifname}");
    }
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    attr[8..12].copy_from_slice(&BPF_XDP.to_ne_bytes());
    attr[12..16].copy_from_slice(&XDP_FLAGS_DRV_MODE.to_ne_bytes());
    bpf(BPF_LINK_CREATE, &mut attr).with_context(|| format!("attaching XDP_PASS to {ifname}"))
}

/// `gatewayd decap attach` on a backend host, with its own bpffs directory; detached and
/// removed on drop.
pub struct Decap {
    pub bpffs: PathBuf,
}

impl Decap {
    /// Attaches to `ifname` of `ns`; with `gue_port`, GUE on that UDP port is stripped too.
    pub fn attach(ns: &Netns, ifname: &str, gue_port: Option<u16>) -> Result<Self> {
        let bpffs = PathBuf::from("/sys/fs/bpf").join(unique("gdd"));
        let decap = Decap { bpffs };
        // nsenter --net only: `ip netns exec` would also give the command a mount namespace of
        // its own, with a fresh /sys, and the pins would vanish with it (detaching the program).
        let mut cmd = ns.command(&binary("gatewayd"));
        cmd.args(["decap", "attach", "--interface", ifname, "--bpffs"])
            .arg(&decap.bpffs);
        if let Some(port) = gue_port {
            cmd.args(["--gue-port", &port.to_string()]);
        }
        let out = cmd.output()?;
        if !out.status.success() {
            bail!(
                "gatewayd decap attach in {} failed: {}",
                ns.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(decap)
    }

    /// Packets this host decapsulated so far (the `decap` reason counter).
    pub fn decapsulated(&self) -> Result<u64> {
        /// GD_REASON_DECAP in xdp/include/gatewayd_maps.h.
        const GD_REASON_DECAP: u32 = 14;
        reason_packets(&self.bpffs.join("maps/gd_reasons"), GD_REASON_DECAP)
    }
}

impl Drop for Decap {
    fn drop(&mut self) {
        let _ = Command::new(binary("gatewayd"))
            .args(["decap", "detach", "--bpffs"])
            .arg(&self.bpffs)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.bpffs);
    }
}

/// Sum over CPUs of the packets of one entry of a pinned per-CPU reason-counter map
/// (`struct gd_reason_counters`: packets first).
pub fn reason_packets(pin: &Path, reason: u32) -> Result<u64> {
    let entries = map_dump(pin)?;
    // bpftool -j prints raw bytes, plus a "formatted" copy when the map has BTF.
    // Little-endian integer of the first `len` (<= 8) raw bytes.
    let raw = |v: &serde_json::Value, len: usize| -> Option<u64> {
        let bytes = v.as_array()?.get(..len)?;
        let mut le = [0u8; 8];
        for (i, b) in bytes.iter().enumerate() {
            le[i] = u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok()?;
        }
        Some(u64::from_le_bytes(le))
    };
    let entry = entries
        .iter()
        .find(|e| {
            e["formatted"]["key"].as_u64() == Some(reason.into()) || raw(&e["key"], 4) == Some(reason.into())
        })
        .ok_or_else(|| anyhow!("no entry {reason} in {}", pin.display()))?;
    Ok(entry["values"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|cpu| raw(&cpu["value"], 8))
        .sum())
}

/// A backend's service, as threads inside the backend's namespace. TCP: every line received
/// is answered with `<name> <line>`; UDP: every datagram with `<name> <datagram>`. Stopped on
/// drop.
pub struct BackendServer {
    pub name: String,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<()>>>,
}

impl BackendServer {
    /// Listens on every address of `tcp` and `udp` (normally the VIPs bound on the loopback).
    pub fn start(ns: &Netns, name: &str, tcp: &[SocketAddr], udp: &[SocketAddr]) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        for &addr in tcp {
            let (name, stop, ready) = (name.to_owned(), stop.clone(), ready_tx.clone());
            threads.push(ns.enter_thread(move || {
                let listener = match TcpListener::bind(addr) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready.send(Err(anyhow!("{name}: binding tcp {addr}: {e}")));
                        return Ok(());
                    }
                };
                let _ = ready.send(Ok(()));
                serve_tcp(listener, name, stop)
            }));
        }
        for &addr in udp {
            let (name, stop, ready) = (name.to_owned(), stop.clone(), ready_tx.clone());
            threads.push(ns.enter_thread(move || {
                let sock = match UdpSocket::bind(addr) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready.send(Err(anyhow!("{name}: binding udp {addr}: {e}")));
                        return Ok(());
                    }
                };
                let _ = ready.send(Ok(()));
                serve_udp(sock, name, stop)
            }));
        }
        let server = BackendServer {
            name: name.to_owned(),
            stop,
            threads,
        };
        for _ in 0..tcp.len() + udp.len() {
            ready_rx
                .recv_timeout(Duration::from_secs(10))
                .map_err(|_| anyhow!("backend {name} did not start"))??;
        }
        Ok(server)
    }
}

impl Drop for BackendServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Waits up to `ms` for `fd` to be readable (false on timeout).
fn readable(fd: i32, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

fn serve_tcp(listener: TcpListener, name: String, stop: Arc<AtomicBool>) -> Result<()> {
    let mut conns = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if !readable(listener.as_raw_fd(), 100) {
            continue;
        }
        let Ok((stream, _)) = listener.accept() else {
            continue;
        };
        let (name, stop) = (name.clone(), stop.clone());
        conns.push(std::thread::spawn(move || serve_conn(stream, &name, &stop)));
        conns.retain(|c| !c.is_finished());
    }
    for c in conns {
        let _ = c.join();
    }
    Ok(())
}

fn serve_conn(stream: TcpStream, name: &str, stop: &AtomicBool) {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) if line.ends_with('\n') => {
                if writer.write_all(format!("{name} {}", line).as_bytes()).is_err() {
                    return;
                }
                line.clear();
            }
            Ok(_) => {}
            // A timeout keeps what was read so far in `line`: go on and check `stop`.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

fn serve_udp(sock: UdpSocket, name: String, stop: Arc<AtomicBool>) -> Result<()> {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        if !readable(sock.as_raw_fd(), 100) {
            continue;
        }
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            let mut reply = format!("{name} ").into_bytes();
            reply.extend_from_slice(&buf[..n]);
            let _ = sock.send_to(&reply, from);
        }
    }
    Ok(())
}

/// Sends one line on a connection to a [`BackendServer`] and returns the name of the backend
/// that answered (the echo is checked).
pub fn tcp_exchange(stream: &mut TcpStream, message: &str, timeout: Duration) -> Result<String> {
    stream
        .write_all(format!("{message}\n").as_bytes())
        .context("sending a request")?;
    tcp_answer(stream, message, timeout)
}

/// Reads the answer to a line already sent with `message` (see [`tcp_exchange`]) and returns
/// the first word of it, the name of the server that answered, once the echo is checked.
pub fn tcp_answer(stream: &mut TcpStream, message: &str, timeout: Duration) -> Result<String> {
    stream.set_read_timeout(Some(timeout))?;
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\n") {
        match stream.read(&mut byte) {
            Ok(0) => bail!("connection closed after {:?}", String::from_utf8_lossy(&answer)),
            Ok(_) => answer.push(byte[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("waiting for the backend's answer"),
        }
    }
    let answer = String::from_utf8(answer)?;
    match answer.trim_end().split_once(' ') {
        Some((name, echo)) if echo == message => Ok(name.to_owned()),
        _ => bail!("unexpected answer {answer:?} to {message:?}"),
    }
}

/// One UDP request on a connected socket, retried `tries` times (each waiting `timeout`);
/// returns the name of the backend that answered.
pub fn udp_exchange(sock: &UdpSocket, message: &str, timeout: Duration, tries: u32) -> Result<String> {
    sock.set_read_timeout(Some(timeout))?;
    let mut buf = [0u8; 2048];
    for _ in 0..tries {
        sock.send(message.as_bytes()).context("sending a datagram")?;
        match sock.recv(&mut buf) {
            Ok(n) => {
                let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
                return match answer.split_once(' ') {
                    Some((name, echo)) if echo == message => Ok(name.to_owned()),
                    _ => bail!("unexpected answer {answer:?} to {message:?}"),
                };
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e).context("waiting for the answer"),
        }
    }
    bail!("no answer to {message:?} after {tries} tries")
}

/// A tcpdump capture to a pcap file, running inside a namespace until [`Capture::stop`] (or
/// drop).
pub struct Capture {
    child: Option<Child>,
    pub file: PathBuf,
}

impl Capture {
    /// Starts capturing on `ifname` of `ns`; returns once tcpdump is listening.
    pub fn start(ns: &Netns, ifname: &str, filter: &str, file: PathBuf) -> Result<Self> {
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", ns.name))
            // Immediate mode: packets are written as they come, not a ring block at a time.
            // Immediate mode also means a TPACKET_V2 ring whose slots are as large as the
            // snapshot length: with the default (262144) the default 2 MiB buffer holds 8
            // packets, and a burst while tcpdump is not scheduled is silently lost. Headers are
            // all the tests read: a short snapshot and a larger buffer hold thousands.
            .args([
                "tcpdump",
                "-i",
                ifname,
                "-nn",
                "-s",
                "512",
                "-B",
                "8192",
                "-U",
                "--immediate-mode",
                "-w",
            ])
            .arg(&file)
            .arg(filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning tcpdump (apt-get install tcpdump)")?;
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut said = String::new();
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                said.push_str(&line);
                said.push('\n');
                if line.contains("listening on") {
                    let _ = tx.send(Ok(()));
                }
            }
            let _ = tx.send(Err(said));
        });
        let capture = Capture {
            child: Some(child),
            file,
        };
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Ok(())) => Ok(capture),
            Ok(Err(said)) => bail!("tcpdump on {ifname} in {} failed: {said}", ns.name),
            Err(_) => bail!("tcpdump on {ifname} in {} did not start", ns.name),
        }
    }

    /// Waits until a packet matching `filter` is in the file, calling `poke` (which should send
    /// one) every 100 ms. Packets are written in order, so once a marker sent after some
    /// traffic is there, all of that traffic is too.
    pub fn sync(&self, filter: &str, mut poke: impl FnMut() -> Result<()>) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            poke()?;
            std::thread::sleep(Duration::from_millis(100));
            // The last record may be half-written: ignore tcpdump's complaint, keep its output.
            let out = Command::new("tcpdump")
                .args(["-r"])
                .arg(&self.file)
                .args(["-nn", filter])
                .stderr(Stdio::null())
                .output()?;
            if !out.stdout.is_empty() {
                return Ok(());
            }
        }
        bail!("no packet matching {filter:?} reached {}", self.file.display())
    }

    /// Stops the capture (SIGINT, so the file is complete) and returns the pcap file.
    pub fn stop(mut self) -> Result<PathBuf> {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            child.wait()?;
        }
        Ok(self.file.clone())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The packets of a pcap file that match `filter`, one line each as `tcpdump -e -nn` prints
/// them (the link-level header first: `<time> <src MAC> > <dst MAC>, ...`).
pub fn pcap_read(file: &Path, filter: &str) -> Result<Vec<String>> {
    let out = run(
        "tcpdump",
        &["-r", &file.display().to_string(), "-e", "-nn", filter],
    )?;
    Ok(stdout(&out).lines().map(str::to_owned).collect())
}

// ---------------------------------------------------------------------------------------------
// The egress gateway's end-to-end tests (tests/egress.rs): a server outside the cluster that
// reports the address each client arrives from, many connections at once, Prometheus scrapes.
// ---------------------------------------------------------------------------------------------

/// A server on a host outside the cluster that tells every client the source address and port
/// it sees: TCP, every line is answered with `<peer IP:port> <line>`; UDP, every datagram with
/// `<peer IP:port> <datagram>`. The answers have the shape [`tcp_exchange`] and
/// [`udp_exchange`] check, which then return the peer as the server's "name". One thread per
/// listening socket multiplexes all its connections with poll(2), so thousands of concurrent
/// connections cost file descriptors, not threads. Stopped on drop.
pub struct PeerServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<()>>>,
}

impl PeerServer {
    /// Listens on every address of `tcp` and `udp` (e.g. `0.0.0.0:port`) inside `ns`.
    pub fn start(ns: &Netns, tcp: &[SocketAddr], udp: &[SocketAddr]) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        for &addr in tcp {
            let (stop, ready) = (stop.clone(), ready_tx.clone());
            threads.push(ns.enter_thread(move || {
                let listener = match TcpListener::bind(addr).and_then(|l| {
                    l.set_nonblocking(true)?;
                    Ok(l)
                }) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready.send(Err(anyhow!("binding tcp {addr}: {e}")));
                        return Ok(());
                    }
                };
                let _ = ready.send(Ok(()));
                serve_tcp_peers(listener, &stop)
            }));
        }
        for &addr in udp {
            let (stop, ready) = (stop.clone(), ready_tx.clone());
            threads.push(ns.enter_thread(move || {
                let sock = match UdpSocket::bind(addr) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready.send(Err(anyhow!("binding udp {addr}: {e}")));
                        return Ok(());
                    }
                };
                let _ = ready.send(Ok(()));
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if !readable(sock.as_raw_fd(), 100) {
                        continue;
                    }
                    if let Ok((n, from)) = sock.recv_from(&mut buf) {
                        let mut reply = format!("{from} ").into_bytes();
                        reply.extend_from_slice(&buf[..n]);
                        let _ = sock.send_to(&reply, from);
                    }
                }
                Ok(())
            }));
        }
        let server = PeerServer { stop, threads };
        for _ in 0..tcp.len() + udp.len() {
            ready_rx
                .recv_timeout(Duration::from_secs(10))
                .map_err(|_| anyhow!("the peer server in {} did not start", ns.name))??;
        }
        Ok(server)
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The TCP side of [`PeerServer`]: a non-blocking listener and blocking connections, read only
/// when poll says they are readable (so a read never waits), answered line by line.
fn serve_tcp_peers(listener: TcpListener, stop: &AtomicBool) -> Result<()> {
    struct Conn {
        stream: TcpStream,
        peer: SocketAddr,
        pending: Vec<u8>,
    }
    let mut conns: Vec<Conn> = Vec::new();
    let mut chunk = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        let mut fds: Vec<libc::pollfd> = std::iter::once(listener.as_raw_fd())
            .chain(conns.iter().map(|c| c.stream.as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of fds.len() pollfds.
        if unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) } <= 0 {
            continue;
        }
        let mut closed = Vec::new();
        for (i, pfd) in fds[1..].iter().enumerate() {
            if pfd.revents == 0 {
                continue;
            }
            let conn = &mut conns[i];
            match conn.stream.read(&mut chunk) {
                Ok(0) => closed.push(i),
                Ok(n) => {
                    conn.pending.extend_from_slice(&chunk[..n]);
                    while let Some(end) = conn.pending.iter().position(|&b| b == b'\n') {
                        let mut reply = format!("{} ", conn.peer).into_bytes();
                        reply.extend(conn.pending.drain(..=end));
                        if conn.stream.write_all(&reply).is_err() {
                            closed.push(i);
                            break;
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => closed.push(i),
            }
        }
        // Dropping a connection closes it (FIN): the client sees its end of the conversation.
        for i in closed.into_iter().rev() {
            conns.swap_remove(i);
        }
        if fds[0].revents != 0 {
            loop {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        // Accepted sockets do not inherit O_NONBLOCK on Linux; make sure.
                        stream.set_nonblocking(false)?;
                        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
                        conns.push(Conn {
                            stream,
                            peer,
                            pending: Vec::new(),
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break, // WouldBlock: all accepted
                }
            }
        }
    }
    Ok(())
}

/// Raises this process's soft limit of open files to at least `wanted` (up to the hard limit,
/// which root may raise too). Tests holding thousands of sockets call it first.
pub fn raise_fd_limit(wanted: u64) -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid rlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        bail!("getrlimit: {}", std::io::Error::last_os_error());
    }
    if lim.rlim_cur >= wanted {
        return Ok(());
    }
    lim.rlim_cur = wanted;
    lim.rlim_max = lim.rlim_max.max(wanted);
    // SAFETY: a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        bail!(
            "setrlimit(RLIMIT_NOFILE, {wanted}): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// The Prometheus text exposition of a gatewayd running in `ns`, fetched over HTTP from
/// inside the namespace (the endpoint listens on the namespace's loopback).
pub fn scrape_metrics(ns: &Netns, url: &str) -> Result<String> {
    let url = url.to_owned();
    ns.run_in(move || {
        let mut response = ureq::get(&url).call().with_context(|| format!("GET {url}"))?;
        Ok(response.body_mut().read_to_string()?)
    })
}

/// The value of the sample `name{labels}` in a Prometheus text exposition, where `labels` must
/// all be present (in any order, other labels allowed); None if there is no such sample.
pub fn metric_value(exposition: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    exposition.lines().find_map(|line| {
        if line.starts_with('#') {
            return None;
        }
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, label_text) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.strip_suffix('}')?),
            None => (series, ""),
        };
        if metric != name {
            return None;
        }
        let all = labels
            .iter()
            .all(|(k, v)| label_text.split(',').any(|pair| pair == format!("{k}=\"{v}\"")));
        if !all {
            return None;
        }
        value.parse().ok()
    })
}

/// `count` pings from `ns` to `to`; fails unless every one is answered.
pub fn ping(ns: &Netns, to: &str, count: u32) -> Result<()> {
    let count = count.to_string();
    let out = ns
        .exec(&["ping", "-n", "-c", &count, "-i", "0.2", "-W", "5", to])
        .context("ping (apt-get install iputils-ping)")?;
    let text = stdout(&out);
    if !text.contains(&format!("{count} received")) {
        bail!("not every ping to {to} was answered:\n{text}");
    }
    Ok(())
}

/// Polls `check` every 250 ms until it returns Some, for at most `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

// ---------------------------------------------------------------------------------------------
// WireGuard peers for the encryption tests and the tunnel benchmark: Debian's wireguard-go,
// configured with wg(8) (apt-get install wireguard-go wireguard-tools).
// ---------------------------------------------------------------------------------------------

/// A WireGuard key pair made by `wg genkey` / `wg pubkey`: (private, public), base64.
pub fn wg_keypair() -> Result<(String, String)> {
    let private = stdout(&run("wg", &["genkey"]).context("wg genkey (apt-get install wireguard-tools)")?)
        .trim()
        .to_owned();
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(format!("{private}\n").as_bytes())?;
    let out = child.wait_with_output()?;
    Ok((private, String::from_utf8(out.stdout)?.trim().to_owned()))
}

/// A wireguard-go device in a namespace, running in the foreground until dropped. Interface
/// names must be unique on the machine: the UAPI socket directory is shared by all namespaces.
pub struct WireGuardGo {
    pub ifname: String,
    child: Option<Child>,
}

impl WireGuardGo {
    /// Starts `wireguard-go -f ifname` in `ns` with `private_key`, listening on `port`, with
    /// `address` (a CIDR) on the interface, up.
    pub fn start(
        ns: &Netns,
        scratch: &Scratch,
        ifname: &str,
        private_key: &str,
        port: u16,
        address: &str,
    ) -> Result<Self> {
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", ns.name))
            .args(["wireguard-go", "-f", ifname])
            // wireguard-go refuses to run on Linux unless told the kernel module is not wanted.
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning wireguard-go (apt-get install wireguard-go)")?;
        let wg = WireGuardGo {
            ifname: ifname.to_owned(),
            child: Some(child),
        };
        let socket = PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"));
        wait_for("the wireguard-go UAPI socket", Duration::from_secs(20), || {
            Ok(socket.exists().then_some(()))
        })?;
        let key = scratch.write(&format!("{ifname}.key"), private_key)?;
        ns.exec(&[
            "wg",
            "set",
            ifname,
            "private-key",
            &key.display().to_string(),
            "listen-port",
            &port.to_string(),
        ])?;
        ns.exec(&["ip", "addr", "add", address, "dev", ifname])?;
        ns.exec(&["ip", "link", "set", ifname, "up"])?;
        Ok(wg)
    }
}

impl Drop for WireGuardGo {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", self.ifname));
    }
}
