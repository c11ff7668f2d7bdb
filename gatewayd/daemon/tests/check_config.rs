//! `gatewayd check-config` as an operator runs it: every problem of a file reported at once,
//! each with its line, and a non-zero exit.

use std::process::Command;

/// Runs check-config on `text`: (success, stdout, stderr, exit code).
fn check(text: &str) -> (bool, String, String, Option<i32>) {
    static RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("gatewayd-check-{}-{run}", std::process::id()));
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
        out.status.code(),
    )
}

#[test]
fn four_problems_four_errors_and_a_failing_exit() {
    let (ok, _, stderr, _) = check(
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
    let (ok, stdout, stderr, _) = check(&text);
    assert!(ok, "{stderr}");
    assert!(stdout.ends_with(": OK\n"), "{stdout}");
}

/// Mutations of a valid file: values (addresses that can never work, out-of-range and wrongly
/// typed numbers), key names, types, duplicated and dropped lines, and a truncated end.
mod mutated {
    use super::check;
    use proptest::prelude::*;

    const VALUES: &[&str] = &[
        "\"0.0.0.0\"",
        "\"::\"",
        "\"224.0.0.1\"",
        "\"255.255.255.255\"",
        "\"127.0.0.1\"",
        "\"10.0.0.1/33\"",
        "\"/\"",
        "\"\"",
        "\"x\"",
        "0",
        "-1",
        "4294967295",
        "99999999999999999999",
        "1.5",
        "true",
        "[]",
        "[1, \"a\"]",
        "{}",
        "{ address = \"10.0.0.1\" }",
        "\"a\\u0000b\"",
    ];

    #[derive(Debug, Clone)]
    enum Mutation {
        /// The value of the n-th `key = value` line.
        Value(usize, usize),
        RenameKey(usize),
        /// Wraps the value in an array, or in quotes.
        Retype(usize, bool),
        DuplicateLine(usize),
        DropLine(usize),
        /// Cuts the text at this fraction (per mille) of its length.
        Truncate(u16),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            4 => (any::<usize>(), 0..VALUES.len()).prop_map(|(l, v)| Mutation::Value(l, v)),
            2 => any::<usize>().prop_map(Mutation::RenameKey),
            2 => (any::<usize>(), any::<bool>()).prop_map(|(l, q)| Mutation::Retype(l, q)),
            1 => any::<usize>().prop_map(Mutation::DuplicateLine),
            1 => any::<usize>().prop_map(Mutation::DropLine),
            1 => (0..1000u16).prop_map(Mutation::Truncate),
        ]
    }

    fn apply(text: &str, mutations: &[Mutation]) -> String {
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        for m in mutations {
            let assignments: Vec<usize> = (0..lines.len())
                .filter(|&i| !lines[i].trim_start().starts_with('#') && lines[i].contains(" = "))
                .collect();
            let pick = |n: usize| assignments.get(n % assignments.len().max(1)).copied();
            match *m {
                Mutation::Value(n, v) => {
                    if let Some(i) = pick(n) {
                        let key = lines[i].split(" = ").next().unwrap_or("").to_owned();
                        lines[i] = format!("{key} = {}", VALUES[v]);
                    }
                }
                Mutation::RenameKey(n) => {
                    if let Some(i) = pick(n) {
                        lines[i] = format!("x{}", lines[i].trim_start());
                    }
                }
                Mutation::Retype(n, quotes) => {
                    if let Some(i) = pick(n) {
                        let (key, value) = lines[i].split_once(" = ").unwrap();
                        lines[i] = if quotes {
                            format!("{key} = {:?}", value)
                        } else {
                            format!("{key} = [{value}]")
                        };
                    }
                }
                Mutation::DuplicateLine(n) if !lines.is_empty() => {
                    let i = n % lines.len();
                    lines.insert(i, lines[i].clone());
                }
                Mutation::DropLine(n) if !lines.is_empty() => {
                    lines.remove(n % lines.len());
                }
                Mutation::Truncate(per_mille) => {
                    let text = lines.join("\n");
                    let mut cut = text.len() * per_mille as usize / 1000;
                    while !text.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    lines = text[..cut].lines().map(str::to_owned).collect();
                }
                _ => {}
            }
        }
        lines.join("\n")
    }

    /// A rejection names what is wrong: a field path (`services[0].vip: ...`), an unknown
    /// field by name, or the line of a syntax error.
    fn names_a_field(error: &str) -> bool {
        let rest = error.split_once(": line ").map_or(error, |(_, r)| r);
        let rest = rest.split_once(": ").map_or("", |(_, r)| r);
        let path_like = rest.split_once(": ").is_some_and(|(path, _)| {
            !path.is_empty()
                && path
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.[]".contains(c))
        });
        path_like || rest.starts_with("unknown field `") || rest.starts_with("invalid TOML")
    }

    fn check_mutated(source: &str, mutations: &[Mutation]) -> Result<(), TestCaseError> {
        let text = apply(source, mutations);
        let (ok, _, stderr, code) = check(&text);
        prop_assert!(
            code == Some(0) || code == Some(1),
            "exit {code:?} (a panic?)\n{text}\n{stderr}"
        );
        if !ok {
            let errors: Vec<&str> = stderr
                .lines()
                .filter(|l| !l.ends_with(" error(s)") && !l.contains(": warning: "))
                .collect();
            prop_assert!(!errors.is_empty(), "rejected without an error\n{stderr}");
            for e in errors {
                prop_assert!(names_a_field(e), "names no field: {e}\n--- file:\n{text}");
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn the_example_config_mutated(mutations in prop::collection::vec(mutation(), 1..4)) {
            check_mutated(include_str!("../../../config/gatewayd.example.toml"), &mutations)?;
        }

        #[test]
        fn the_demo_config_mutated(mutations in prop::collection::vec(mutation(), 1..4)) {
            check_mutated(include_str!("../../../config/demo.toml"), &mutations)?;
        }
    }
}
