//! Every file under `tests/fixtures/invalid/{agent,gateway}/` is a config that must be
//! refused, and its first lines, `# expect: TEXT` each, are pieces of the message it
//! must produce, in that order. The test fails when it finds no fixtures.

use std::fs;
use std::path::{Path, PathBuf};

use tunnel_proto::config::{AgentConfig, GatewayConfig};

fn fixtures(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/invalid")
        .join(kind);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 5,
        "only {} fixtures in {}: the fixture set is missing",
        files.len(),
        dir.display()
    );
    files
}

fn check(kind: &str, parse: impl Fn(&str, &Path) -> Result<(), String>) {
    for file in fixtures(kind) {
        let text = fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let expected: Vec<&str> = text
            .lines()
            .map_while(|l| l.strip_prefix("# expect: "))
            .map(str::trim)
            .collect();
        assert!(
            !expected.is_empty(),
            "{}: first line must be `# expect: TEXT`",
            file.display()
        );
        match parse(&text, &file) {
            Ok(()) => panic!(
                "{} was accepted; it must fail with `{}`",
                file.display(),
                expected.join("`, then `")
            ),
            Err(message) => {
                let mut from = 0;
                for expect in &expected {
                    let at = message[from..].find(expect).unwrap_or_else(|| {
                        panic!(
                            "{}: message does not contain `{expect}` (after what came before it):\n{message}",
                            file.display()
                        )
                    });
                    from += at + expect.len();
                }
                assert!(
                    message.contains(&file.display().to_string()),
                    "{}: message does not name the file:\n{message}",
                    file.display()
                );
            }
        }
    }
}

#[test]
fn invalid_agent_configs_are_refused_with_their_message() {
    check("agent", |text, file| {
        AgentConfig::parse(text, file)
            .map(drop)
            .map_err(|e| e.to_string())
    });
}

#[test]
fn invalid_gateway_configs_are_refused_with_their_message() {
    check("gateway", |text, file| {
        GatewayConfig::parse(text, file)
            .map(drop)
            .map_err(|e| e.to_string())
    });
}
