//! The daemon's lifecycle as systemd and an operator see it: READY only once attached, a broken
//! reload that changes nothing, SIGKILL that leaves traffic flowing, a restart that adopts the
//! running program and maps, and a teardown that leaves nothing behind.

use anyhow::Result;
use gatewayd_integration::*;
use std::time::Duration;

const READY_TIMEOUT: Duration = Duration::from_secs(60);

fn config(scratch: &Scratch, ifname: &str) -> String {
    format!(
        r#"{daemon}
[[interfaces]]
name = "{ifname}"
xdp_mode = "native"

[[services]]
name = "web"
vip = "10.200.0.10"
port = 80
backends = [{{ address = "10.201.0.2" }}, {{ address = "10.201.0.3" }}]
"#,
        daemon = scratch.daemon_table()
    )
}

#[test]
fn ready_reload_kill_restart_adopt_teardown() -> Result<()> {
    if !require_root("ready_reload_kill_restart_adopt_teardown") {
        return Ok(());
    }
    let gw = Netns::new("gdlg")?;
    let peer = Netns::new("gdlp")?;
    let ifname = unique("lgw");
    veth(
        &gw,
        &ifname,
        &["10.201.0.1/24"],
        &peer,
        &unique("lpe"),
        &["10.201.0.2/24"],
    )?;
    let scratch = Scratch::new()?;
    let good = config(&scratch, &ifname);
    let path = scratch.write("gatewayd.toml", &good)?;

    // READY=1 arrives only once the program is attached and the service is in its map.
    let mut daemon = Daemon::spawn(&gw, &scratch, &path)?;
    assert_eq!(
        xdp_program_id(&gw, &ifname)?,
        None,
        "nothing attached before the daemon starts"
    );
    daemon.wait_notify("READY=1", READY_TIMEOUT)?;
    let attached = xdp_program_id(&gw, &ifname)?.expect("XDP attached at READY=1");
    let services_pin = scratch.bpffs.join("maps/gd_services");
    assert_eq!(
        map_dump(&services_pin)?.len(),
        1,
        "the service is programmed at READY=1"
    );
    let status = gatewayctl(&scratch, &["status"])?;
    assert_eq!(status["programs"][0]["program_id"], attached);
    assert_eq!(status["programs"][0]["attach"], "xdp/native");
    assert_eq!(status["config_generation"], 1);

    // A broken file on SIGHUP: RELOADING=1, then READY=1 again, and nothing changed.
    scratch.write("gatewayd.toml", &good.replace("10.201.0.3", "10.201.0.300"))?;
    daemon.signal(libc::SIGHUP)?;
    let messages = daemon.wait_notify("READY=1", READY_TIMEOUT)?;
    assert!(messages.iter().any(|m| m.contains("RELOADING=1")), "{messages:?}");
    let status = gatewayctl(&scratch, &["status"])?;
    assert_eq!(status["last_reload"]["ok"], false);
    assert!(
        status["last_reload"]["message"]
            .as_str()
            .unwrap()
            .contains("10.201.0.300"),
        "{status}"
    );
    assert_eq!(status["config_generation"], 1);
    let services = gatewayctl(&scratch, &["lb", "list"])?;
    assert_eq!(services[0]["backends"].as_array().unwrap().len(), 2, "{services}");
    assert_eq!(xdp_program_id(&gw, &ifname)?, Some(attached));

    // SIGKILL: the program stays attached and the maps keep their entries.
    daemon.signal(libc::SIGKILL)?;
    assert_eq!(daemon.wait()?, None);
    assert_eq!(xdp_program_id(&gw, &ifname)?, Some(attached));
    assert_eq!(map_dump(&services_pin)?.len(), 1);

    // A restart adopts the same program (same id) and the same maps.
    scratch.write("gatewayd.toml", &good)?;
    let mut daemon = Daemon::spawn(&gw, &scratch, &path)?;
    daemon.wait_notify("READY=1", READY_TIMEOUT)?;
    let status = gatewayctl(&scratch, &["status"])?;
    assert_eq!(status["programs"][0]["program_id"], attached);
    assert_eq!(status["programs"][0]["origin"], "adopted");
    assert_eq!(xdp_program_id(&gw, &ifname)?, Some(attached));
    assert!(
        daemon.log_text().contains("adopted the pinned XDP program"),
        "{}",
        daemon.log_text()
    );

    // SIGTERM leaves the datapath in place; teardown removes everything.
    daemon.signal(libc::SIGTERM)?;
    assert_eq!(daemon.wait()?, Some(0));
    assert_eq!(xdp_program_id(&gw, &ifname)?, Some(attached));
    run(
        &binary("gatewayd").display().to_string(),
        &["teardown", "--config", &path.display().to_string()],
    )?;
    assert_eq!(xdp_program_id(&gw, &ifname)?, None);
    assert!(!scratch.bpffs.exists(), "pins left behind");
    Ok(())
}

#[test]
fn unsupported_offload_mode_is_a_clear_error() -> Result<()> {
    if !require_root("unsupported_offload_mode_is_a_clear_error") {
        return Ok(());
    }
    let gw = Netns::new("gdog")?;
    let peer = Netns::new("gdop")?;
    let ifname = unique("ogw");
    veth(
        &gw,
        &ifname,
        &["10.202.0.1/24"],
        &peer,
        &unique("ope"),
        &["10.202.0.2/24"],
    )?;
    let scratch = Scratch::new()?;
    let text = format!(
        "{}[[interfaces]]\nname = \"{ifname}\"\nxdp_mode = \"offload\"\n",
        scratch.daemon_table()
    );
    let path = scratch.write("gatewayd.toml", &text)?;
    let mut daemon = Daemon::spawn(&gw, &scratch, &path)?;
    assert!(daemon.wait_notify("READY=1", READY_TIMEOUT).is_err());
    assert_eq!(daemon.wait()?, Some(1));
    let log = daemon.log_text();
    assert!(log.contains("offload mode is not supported"), "{log}");
    assert_eq!(xdp_program_id(&gw, &ifname)?, None);
    Ok(())
}
