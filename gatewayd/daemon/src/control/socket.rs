//! The unix control socket `gatewayctl` talks to: one JSON request line, one JSON response
//! line. Requests are answered by the daemon's main loop, so no state is shared across tasks.

use crate::events::EventHub;
use anyhow::{Context, Result};
use gatewayd_common::api::{Request, Response};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

pub type Query = (Request, oneshot::Sender<Response>);

/// Owns the socket file; removes it when dropped.
pub struct ControlSocket {
    path: PathBuf,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds the socket (mode 0600: only root may drive the daemon) and forwards each request to
/// `queries`.
pub fn serve(path: &Path, queries: mpsc::Sender<Query>, events: Arc<EventHub>) -> Result<ControlSocket> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A socket left by a daemon that was killed: nobody is listening on it any more.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let queries = queries.clone();
            let events = events.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let response = match serde_json::from_str::<Request>(&line) {
                        Ok(Request::Observe) => {
                            stream_events(&events, &mut write).await;
                            return;
                        }
                        Ok(request) => {
                            let (tx, rx) = oneshot::channel();
                            if queries.send((request, tx)).await.is_err() {
                                return;
                            }
                            rx.await
                                .unwrap_or_else(|_| Response::Error("daemon is shutting down".into()))
                        }
                        Err(e) => Response::Error(format!("bad request: {e}")),
                    };
                    let mut out = serde_json::to_vec(&response).expect("responses serialize");
                    out.push(b'\n');
                    if write.write_all(&out).await.is_err() {
                        debug!("control client went away");
                        return;
                    }
                }
            });
        }
    });
    Ok(ControlSocket {
        path: path.to_owned(),
    })
}

/// Writes flow events as JSON lines until the observer hangs up.
async fn stream_events(events: &Arc<EventHub>, write: &mut tokio::net::unix::OwnedWriteHalf) {
    let mut subscription = events.subscribe();
    loop {
        let line = match subscription.events.recv().await {
            Ok(event) => serde_json::to_vec(&event).expect("events serialize"),
            // A slow observer misses events rather than slowing the datapath or the daemon.
            Err(RecvError::Lagged(n)) => format!("{{\"lost\":{n}}}").into_bytes(),
            Err(RecvError::Closed) => return,
        };
        if write.write_all(&line).await.is_err() || write.write_all(b"\n").await.is_err() {
            return;
        }
    }
}
