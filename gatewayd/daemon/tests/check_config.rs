//! `gatewayd check-config` as an operator runs it: every problem of a file reported at once,
//! each with its line, and a non-zero exit.

use std::process::Command;

fn check(text: &str) -> (bool, String, String) {
    let dir = std::env::temp_dir().join(format!("gatewayd-check-{}-{}", std::process::id(), text.len()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("gatewayd.toml");
    std::fs::write(&file, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gatewayd"))
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn four_problems_four_errors_and_a_failing_exit() {
    let (ok, _, stderr) = check(
        r#"[daemon]
bpffs = "/sys/fs/bpf/gatewayd"
colour = "blue"

[[interfaces]]
name = "no-such-if0"

[[services]]
name = "web"
vip = "10.0.0.1"
port = 80
source_ranges = ["10.1.0.0/33"]
backends = [{ address = "10.2.0.1" }]

[[services]]
name = "web-again"
vip = "10.0.0.1"
port = 80
backends = [{ address = "10.2.0.2" }]
"#,
    );
    assert!(!ok);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains(": line ")).collect();
    assert_eq!(errors.len(), 4, "{stderr}");
    assert!(errors[0].contains("line 3: unknown field `colour`"), "{stderr}");
    assert!(
        errors[1].contains("line 6: interfaces[0].name: no such network interface")
            && errors[1].contains("no-such-if0")
    );
    assert!(errors[2].contains("line 12: services[0].source_ranges[0]") && errors[2].contains("10.1.0.0/33"));
    assert!(errors[3].contains("line 17: services[1].vip: duplicate VIP") && errors[3].contains("10.0.0.1"));
    assert!(stderr.contains("4 error(s)"), "{stderr}");
}

#[test]
fn the_example_config_passes() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../config/gatewayd.example.toml"
    ))
    .unwrap();
    let (ok, stdout, stderr) = check(&text);
    assert!(ok, "{stderr}");
    assert!(stdout.ends_with(": OK\n"), "{stdout}");
}
