//! A cluster's bearer token, set on every request by a layer of the kube client.
//!
//! kube sends a token file's content as it is: `echo "$TOKEN" > file` leaves a newline that no
//! header can carry, and every request fails with "invalid bearer token: failed to parse header
//! value". client-go trims the token, and so does this. A token file is re-read each minute
//! (projected tokens rotate), through [`crate::secret_file`] like every secret; when a re-read
//! fails, the last good token stays (what client-go and kube do, for files removed after start).

use anyhow::{bail, Result};
use http::header::{HeaderValue, AUTHORIZATION};
use http::Request;
use kube::config::AuthInfo;
use secrecy::ExposeSecret;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tracing::warn;

const REREAD: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct BearerToken(Arc<Source>);

enum Source {
    Inline(HeaderValue),
    File {
        path: PathBuf,
        /// The header, and when the file was read.
        current: Mutex<(HeaderValue, Instant)>,
    },
}

impl BearerToken {
    /// Takes the token (inline, or from `tokenFile`) out of `auth`, so kube's own auth layer
    /// does not send it untrimmed; `None` where `auth` has no token.
    pub fn take_from(auth: &mut AuthInfo) -> Result<Option<BearerToken>> {
        let inline = auth.token.take();
        let file = auth.token_file.take();
        // kube's precedence: an inline token wins over a file.
        let source = match (inline, file) {
            (Some(token), _) => Source::Inline(header(token.expose_secret(), "the kubeconfig's token")?),
            (None, Some(path)) => {
                let path = PathBuf::from(path);
                let value = read(&path)?;
                Source::File {
                    path,
                    current: Mutex::new((value, Instant::now())),
                }
            }
            (None, None) => return Ok(None),
        };
        Ok(Some(BearerToken(Arc::new(source))))
    }

    fn header(&self) -> HeaderValue {
        match &*self.0 {
            Source::Inline(value) => value.clone(),
            Source::File { path, current } => {
                let mut current = current.lock().expect("token");
                if current.1.elapsed() >= REREAD {
                    current.1 = Instant::now();
                    match read(path) {
                        Ok(value) => current.0 = value,
                        Err(e) => warn!("{e:#}; the last token read stays in use"),
                    }
                }
                current.0.clone()
            }
        }
    }
}

fn read(path: &std::path::Path) -> Result<HeaderValue> {
    let text = crate::secret_file::read(path, "token file")?;
    header(&text, &format!("the token file {}", path.display()))
}

/// `Bearer <token>`, trimmed; an error names where the token came from, never the token.
fn header(token: &str, origin: &str) -> Result<HeaderValue> {
    let token = token.trim();
    if token.is_empty() {
        bail!("{origin} is empty");
    }
    match HeaderValue::from_str(&format!("Bearer {token}")) {
        Ok(mut value) => {
            value.set_sensitive(true);
            Ok(value)
        }
        Err(_) => bail!(
            "{origin} holds characters an HTTP header cannot carry (a line break or a control character inside the token?)"
        ),
    }
}

impl<S> tower::Layer<S> for BearerToken {
    type Service = WithBearer<S>;

    fn layer(&self, inner: S) -> WithBearer<S> {
        WithBearer {
            inner,
            token: self.clone(),
        }
    }
}

pub struct WithBearer<S> {
    inner: S,
    token: BearerToken,
}

impl<S, B> tower::Service<Request<B>> for WithBearer<S>
where
    S: tower::Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> S::Future {
        request.headers_mut().insert(AUTHORIZATION, self.token.header());
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_trimmed_and_never_quoted() {
        assert_eq!(header("abc.def\n", "t").unwrap(), "Bearer abc.def");
        assert_eq!(header("  abc\r\n", "t").unwrap(), "Bearer abc");
        let e = header("secret-part\nsecond-line", "the token file /x")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("the token file /x holds characters") && !e.contains("secret"),
            "{e}"
        );
        assert!(header("\n", "t").unwrap_err().to_string().contains("t is empty"));
    }
}
