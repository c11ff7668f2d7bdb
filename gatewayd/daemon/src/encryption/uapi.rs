//! The WireGuard UAPI socket of the boringtun device.
//!
//! boringtun can listen on `/var/run/wireguard/<interface>.sock` itself, but then it also blocks
//! SIGINT and SIGTERM in the calling thread and reads them from a signalfd, racing the daemon's
//! own handlers for them (a `systemctl stop` could end the tunnel and leave the daemon running).
//! So boringtun gets one end of a socket pair (`uapi_fd`), and this module serves the usual
//! socket path in front of it, one request at a time: `wg show`, `wg set` and
//! wireguard-control's userspace backend work unchanged.

use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use tracing::debug;

/// Where wg(8) and wireguard-go look for userspace devices.
pub const SOCKET_DIR: &str = "/var/run/wireguard";

pub fn socket_path(interface: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{interface}.sock"))
}

/// The listening socket and the thread relaying its requests to the device.
pub struct UapiSocket {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UapiSocket {
    /// Serves `socket_path(interface)`, relaying every request to `device` (boringtun's end of
    /// the pair). Closing `device` (dropping this) makes boringtun shut the tunnel down.
    pub fn serve(interface: &str, device: UnixStream) -> Result<Self> {
        std::fs::create_dir_all(SOCKET_DIR).with_context(|| format!("creating {SOCKET_DIR}"))?;
        let path = socket_path(interface);
        // A socket left by a daemon that died: nothing listens on it any more.
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("wg-uapi".into())
                .spawn(move || relay(listener, device, &stop))?
        };
        Ok(UapiSocket {
            path,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for UapiSocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the blocking accept so the thread sees `stop`.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn relay(listener: UnixListener, device: UnixStream, stop: &AtomicBool) {
    // A device that stopped answering must not hang the relay (and the daemon's stop with it).
    let _ = device.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    let Ok(mut device_writer) = device.try_clone() else {
        return;
    };
    let mut device_reader = BufReader::new(device);
    for client in listener.incoming() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(client) = client else { continue };
        if let Err(e) = exchange(&client, &mut device_writer, &mut device_reader) {
            debug!("UAPI request: {e:#}");
        }
    }
}

/// One request: lines up to an empty line (`get=1` or `set=1` and its keys), then the device's
/// answer, which also ends with an empty line (after `errno=N`).
fn exchange(client: &UnixStream, device: &mut UnixStream, answers: &mut BufReader<UnixStream>) -> Result<()> {
    client.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    let request = read_block(&mut BufReader::new(client)).context("reading the request")?;
    if request.is_empty() {
        return Ok(());
    }
    device.write_all(request.as_bytes())?;
    let answer = read_block(answers).context("reading the device's answer")?;
    // boringtun adds `own_public_key`, which is not in the protocol: wireguard-control prints
    // "got unsupported info" to stdout for it on every read. Clients derive the public key
    // from the private one anyway.
    let answer: String = answer
        .split_inclusive('\n')
        .filter(|line| !line.starts_with("own_public_key="))
        .collect();
    (&*client).write_all(answer.as_bytes())?;
    Ok(())
}

/// Seconds since each peer's last handshake (by hex public key), read from the device's UAPI.
/// boringtun reports the age where the protocol (and wireguard-control) expect a time; and
/// wireguard-control drops a 0, which is what a handshake made this second reads as.
pub fn handshake_ages(interface: &str) -> Result<BTreeMap<String, u64>> {
    let mut socket = UnixStream::connect(socket_path(interface))?;
    socket.write_all(b"get=1\n\n")?;
    let answer = read_block(&mut BufReader::new(socket))?;
    let mut ages = BTreeMap::new();
    let mut peer = None;
    for line in answer.lines() {
        match line.split_once('=') {
            Some(("public_key", key)) => peer = Some(key.to_owned()),
            Some(("last_handshake_time_sec", secs)) => {
                if let (Some(key), Ok(secs)) = (&peer, secs.parse()) {
                    ages.insert(key.clone(), secs);
                }
            }
            _ => {}
        }
    }
    Ok(ages)
}

/// Lines up to and including the first empty one; empty if the stream ends first.
fn read_block(reader: &mut impl BufRead) -> Result<String> {
    let mut block = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(String::new());
        }
        block.push_str(&line);
        if line == "\n" {
            return Ok(block);
        }
    }
}
