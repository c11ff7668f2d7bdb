//! IPsec keys from a Kubernetes Secret (`[encryption.ipsec] key_secret`): the cluster it names
//! runs one more reflector, on that Secret alone (a `metadata.name` field selector in its
//! namespace, which RBAC can grant by `resourceNames`). Its data key
//! [`KEY_SECRET_DATA_KEY`] holds the same text as a key file; the sync parses it and puts the
//! keys into the cluster's desired state, and the encryption rotates them like the file's.
//!
//! A missing or invalid Secret is logged (once per problem, naming the Secret) and contributes
//! no keys: the keys in force stay, nothing is flushed.

use super::sync::WatchBackoff;
use crate::config::{SecretRef, KEY_SECRET_DATA_KEY};
use crate::model::{parse_key_file, IpsecKeys, KeyFile};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::{self, store::Writer, Store};
use kube::runtime::watcher;
use kube::{Api, Client};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tracing::error;

/// The text of `secret`'s keys data key, or what is wrong with it.
pub fn key_data(secret: &Secret) -> Result<&str, String> {
    let data = secret
        .data
        .as_ref()
        .and_then(|d| d.get(KEY_SECRET_DATA_KEY))
        .ok_or_else(|| format!("has no data key {KEY_SECRET_DATA_KEY:?}"))?;
    std::str::from_utf8(&data.0).map_err(|_| format!("data key {KEY_SECRET_DATA_KEY:?} is not text"))
}

/// The keys of `secret`, parsed here, where the Secret is known, so a bad edit is reported
/// naming it; messages never quote key material.
pub fn keys(secret: &Secret) -> Result<KeyFile, String> {
    parse_key_file(key_data(secret)?).map_err(|e| format!("data key {KEY_SECRET_DATA_KEY:?}: {e:#}"))
}

/// The reflector on the key Secret, and what it last reported.
pub(super) struct KeySecret {
    reference: SecretRef,
    store: Store<Secret>,
    /// Listed once: from then on an empty store means the Secret does not exist.
    listed: Arc<AtomicBool>,
    /// The problem last logged, so each is logged once.
    logged: Option<String>,
}

impl KeySecret {
    /// Starts the reflector; `wake` is called on each of its events.
    pub(super) fn follow(client: Client, reference: SecretRef, wake: impl Fn() + Send + 'static) -> Self {
        let api: Api<Secret> = Api::namespaced(client, &reference.namespace);
        let config = watcher::Config::default().fields(&format!("metadata.name={}", reference.name));
        let writer = Writer::default();
        let store = writer.as_reader();
        let stream = reflector::reflector(writer, watcher::watcher(api, config));
        let listed = Arc::new(AtomicBool::new(false));
        let (flag, name) = (listed.clone(), reference.to_string());
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            let mut backoff = WatchBackoff::new();
            let mut failing = false;
            while let Some(event) = stream.next().await {
                match event {
                    // A relist starting is no recovery yet.
                    Ok(watcher::Event::Init) => {}
                    Ok(event) => {
                        failing = false;
                        if matches!(event, watcher::Event::InitDone) {
                            flag.store(true, Ordering::Relaxed);
                            backoff.synced();
                        }
                    }
                    Err(e) => {
                        if !failing {
                            error!(secret = %name, "cannot read the IPsec key Secret, retrying: {e}");
                        }
                        failing = true;
                        wake();
                        tokio::time::sleep(backoff.next_delay()).await;
                        continue;
                    }
                }
                wake();
            }
        });
        KeySecret {
            reference,
            store,
            listed,
            logged: None,
        }
    }

    /// The Secret's keys as they are now; `None` before the first list, or (logged) when the
    /// Secret is missing or invalid.
    pub(super) fn keys(&mut self) -> Option<IpsecKeys> {
        if !self.listed.load(Ordering::Relaxed) {
            return None;
        }
        let keys = match self.store.state().first() {
            None => Err("not found".to_string()),
            Some(secret) => keys(secret),
        };
        match keys {
            Ok(keys) => {
                self.logged = None;
                Some(IpsecKeys {
                    origin: format!("secret {}", self.reference),
                    keys,
                })
            }
            Err(problem) => {
                if self.logged.as_ref() != Some(&problem) {
                    error!(
                        "IPsec key Secret {}: {problem}; the keys in force stay",
                        self.reference
                    );
                    self.logged = Some(problem);
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const PSK1: &str = "00112233445566778899aabbccddeeff";
    const PSK2: &str = "ffeeddccbbaa99887766554433221100";

    /// A Secret as `kubectl get secret -o json` shows it: data base64-encoded.
    fn secret(data: serde_json::Value) -> Secret {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": "gatewayd-ipsec", "namespace": "gatewayd", "resourceVersion": "7"},
            "data": data,
        }))
        .unwrap()
    }

    fn b64(bytes: impl AsRef<[u8]>) -> serde_json::Value {
        serde_json::to_value(k8s_openapi::ByteString(bytes.as_ref().to_vec())).unwrap()
    }

    /// What the operator wrote in the Secret, checked the way the sync reads it.
    fn key_text(secret: &Secret) -> Result<String, String> {
        keys(secret)?;
        Ok(key_data(secret)?.to_owned())
    }

    #[test]
    fn a_secrets_keys_data_becomes_key_file_text() {
        // `kubectl create secret generic gatewayd-ipsec --from-file=keys=ipsec.keys`
        let s = secret(json!({
            "keys": "IyByb3RhdGVkCjEgMDAxMTIyMzM0NDU1NjY3Nzg4OTlhYWJiY2NkZGVlZmYKMiBmZmVlZGRjY2JiYWE5OTg4Nzc2NjU1NDQzMzIyMTEwMAo=",
            "other": "aWdub3JlZA==",
        }));
        let got = key_text(&s).unwrap();
        assert_eq!(got, format!("# rotated\n1 {PSK1}\n2 {PSK2}\n"));
        assert_eq!(parse_key_file(&got).unwrap().current(), 2);
    }

    #[test]
    fn bad_secrets_say_what_is_wrong_without_quoting_keys() {
        for (data, wanted) in [
            (json!({}), "has no data key \"keys\""),
            (
                json!({"key": b64(format!("1 {PSK1}"))}),
                "has no data key \"keys\"",
            ),
            (
                json!({"keys": b64([0xffu8, 0xfe])}),
                "data key \"keys\" is not text",
            ),
            (
                json!({"keys": b64(format!("1 {PSK1}\n1 {PSK2}\n"))}),
                "data key \"keys\": line 2: key id 1 appears twice",
            ),
            (json!({"keys": b64("1 0011\n")}), "line 1: key 1 has 2 bytes"),
        ] {
            let e = key_text(&secret(data)).unwrap_err();
            assert!(e.contains(wanted), "{e}");
            assert!(!e.contains(PSK1) && !e.contains(PSK2), "{e}");
        }
        let no_data: Secret = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": "n"},
        }))
        .unwrap();
        assert!(key_text(&no_data).unwrap_err().contains("has no data key"));
    }

    #[test]
    fn debug_output_leaves_the_keys_out() {
        let keys = IpsecKeys {
            origin: "secret c/gatewayd/gatewayd-ipsec".into(),
            keys: parse_key_file(&format!("1 {PSK1}\n")).unwrap(),
        };
        let shown = format!("{keys:?}");
        assert!(
            shown.contains("c/gatewayd/gatewayd-ipsec") && !shown.contains(PSK1),
            "{shown}"
        );
    }
}
