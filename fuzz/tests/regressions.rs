//! Replays every input saved under `regressions/TARGET/` (crashes once found, and
//! seeds) through the same checks the fuzz targets run.

use std::path::Path;

/// A fuzz target's checks, as the fuzzer runs them.
type Check = fn(&[u8]);

#[test]
fn saved_inputs_pass_their_checks() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions");
    let targets: [(&str, Check); 7] = [
        ("local_protocol", tunnel_fuzz::local_protocol),
        ("routes", tunnel_fuzz::routes),
        ("configs", tunnel_fuzz::configs),
        ("sock_diag", tunnel_fuzz::sock_diag),
        ("elf", tunnel_fuzz::elf),
        ("tokens", tunnel_fuzz::tokens),
        ("dns", tunnel_fuzz::dns),
    ];
    let mut replayed = 0;
    for (name, check) in targets {
        let dir = root.join(name);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("entry").path();
            let data = std::fs::read(&path).expect("input");
            check(&data);
            replayed += 1;
        }
    }
    // Seeds are committed for every target: finding none means the directory moved.
    assert!(
        replayed >= 8,
        "only {replayed} saved inputs found under {}",
        root.display()
    );
}
