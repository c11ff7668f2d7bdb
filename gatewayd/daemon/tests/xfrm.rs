//! IPsec's netlink programming against the kernel, in a network namespace of its own: the
//! policies gatewayd derives from its peers are installed with its request id, found again,
//! and removed; states are installed where the kernel has ESP and refused with the missing
//! feature named where it has not (as on the machines these tests were written on).

use anyhow::{bail, Result};
use gatewayd::encryption::ipsec::{desired_xfrm, Xfrm, REQID};
use gatewayd::model::Peer;
use gatewayd_integration::require_root;
use std::process::Command;

/// Runs `f` on a thread moved into a fresh network namespace, with a tokio runtime; commands
/// it spawns inherit the namespace. The namespace goes with the thread.
fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    std::thread::spawn(move || {
        // SAFETY: unshare only changes this thread's namespaces.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            bail!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
        }
        f()
    })
    .join()
    .expect("namespace thread")
}

fn ip_xfrm(what: &str) -> Result<String> {
    let out = Command::new("ip").args(["xfrm", what]).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn policies_and_states_are_installed_found_and_removed_by_request_id() -> Result<()> {
    if !require_root("policies_and_states_are_installed_found_and_removed_by_request_id") {
        return Ok(());
    }
    in_new_netns(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let xfrm = Xfrm::open()?;
            let local = "192.0.2.1".parse()?;
            let peers = [Peer {
                name: "node".into(),
                public_key: String::new(),
                endpoint: Some("192.0.2.2:0".parse()?),
                allowed_ips: vec!["10.244.1.0/24".parse()?, "10.244.2.0/24".parse()?],
            }];
            let (states, policies) = desired_xfrm(local, &peers, [7u8]);
            for p in &policies {
                xfrm.add_policy(p).await?;
            }
            let listed = ip_xfrm("policy")?;
            assert_eq!(listed.matches(&format!("reqid {REQID}")).count(), 6, "{listed}");
            for net in ["10.244.1.0/24", "10.244.2.0/24"] {
                assert!(listed.contains(&format!("src 0.0.0.0/0 dst {net}")), "{listed}");
                assert!(listed.contains(&format!("src {net} dst 0.0.0.0/0")), "{listed}");
            }
            assert!(listed.contains("tmpl src 192.0.2.1 dst 192.0.2.2"), "{listed}");
            let (_, found) = xfrm.installed().await?;
            assert_eq!(
                found.into_iter().collect::<std::collections::BTreeSet<_>>(),
                policies,
                "the dump reads back exactly the policies installed"
            );

            // Someone else's policy: never touched by gatewayd's cleanup.
            let foreign = Command::new("ip")
                .args([
                    "xfrm",
                    "policy",
                    "add",
                    "src",
                    "10.9.0.0/24",
                    "dst",
                    "10.8.0.0/24",
                    "dir",
                    "out",
                ])
                .status()?;
            assert!(foreign.success());

            let psk = [0x42u8; 32];
            let mut installed_states = 0;
            for s in &states {
                match xfrm.add_state(*s, &psk).await {
                    Ok(()) => installed_states += 1,
                    Err(e) => {
                        let e = format!("{e:#}");
                        assert!(e.contains("CONFIG_INET_ESP"), "a missing ESP is named: {e}");
                    }
                }
            }
            let (found, _) = xfrm.installed().await?;
            assert_eq!(found.len(), installed_states);
            assert!(found.iter().all(|s| states.contains(s)), "{found:?}");
            if installed_states > 0 {
                let listed = ip_xfrm("state")?;
                assert!(listed.contains("rfc4106(gcm(aes))"), "{listed}");
                assert!(listed.contains("spi 0x00000007"), "{listed}");
            }

            xfrm.remove_installed().await?;
            let (states_left, policies_left) = xfrm.installed().await?;
            assert!(states_left.is_empty() && policies_left.is_empty());
            let listed = ip_xfrm("policy")?;
            assert!(
                listed.contains("src 10.9.0.0/24 dst 10.8.0.0/24") && !listed.contains("10.244."),
                "only the foreign policy is left: {listed}"
            );
            assert_eq!(ip_xfrm("state")?, "");
            Ok(())
        })
    })
}
