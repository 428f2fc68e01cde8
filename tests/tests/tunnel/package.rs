//! The Debian packages (`scripts/package`, from the release build that `scripts/test`
//! makes first): `apt-get install` on this machine, the installed units pass
//! `systemd-analyze verify`, the gateway the package set up starts as its system user
//! the way its unit runs it, the demo passes with the installed programs, and a purge
//! takes everything away again.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tunnel_tests::*;

const PACKAGES: [&str; 2] = ["tunnel-agent", "tunnel-gateway"];
const LIMIT: Duration = Duration::from_secs(300);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn installed(package: &str) -> bool {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${db:Status-Status}", package])
        .output()
        .expect("dpkg-query");
    String::from_utf8_lossy(&out.stdout).trim() == "installed"
}

fn user_exists(name: &str) -> bool {
    Command::new("getent")
        .args(["passwd", name])
        .output()
        .expect("getent")
        .status
        .success()
}

fn apt_get(args: &[&str], dir: &Path) -> String {
    stdout_within(
        Command::new("apt-get")
            .args(args)
            .current_dir(dir)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        LIMIT,
    )
}

/// Purges the packages and removes what this test made (the system user, the runtime
/// directory), whether the test passed or not.
struct Installed {
    user_was_there: bool,
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("apt-get")
            .args(["purge", "-y"])
            .args(PACKAGES)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output();
        let _ = std::fs::remove_dir_all("/run/tunnel-gateway");
        // It was not there when the test began (checked first).
        let _ = std::fs::remove_dir_all("/etc/tunnel");
        if !self.user_was_there && user_exists("tunnel-gateway") {
            let _ = Command::new("userdel").arg("tunnel-gateway").output();
            let _ = Command::new("groupdel").arg("tunnel-gateway").output();
        }
    }
}

#[test]
fn the_debian_packages_install_verify_run_the_demo_and_purge() {
    if needs_root("the_debian_packages_install_verify_run_the_demo_and_purge") {
        return;
    }
    require("dpkg-deb", "dpkg");
    require("apt-get", "apt");
    require("systemd-analyze", "systemd");
    require("strip", "binutils");
    for package in PACKAGES {
        assert!(
            !installed(package),
            "{package} is installed on this machine: this test installs and purges its own build; remove it first (apt-get purge {package})"
        );
    }
    assert!(
        !Path::new("/etc/tunnel/gateway").exists(),
        "/etc/tunnel/gateway exists: this test would make and purge a gateway there"
    );

    let site = Site::new();
    let out = site.path("debs");
    let built = stdout_within(
        Command::new(root().join("scripts/package"))
            .arg("--no-build")
            .arg("--out")
            .arg(&out),
        LIMIT,
    );
    let debs: Vec<&str> = built.lines().filter(|l| l.ends_with(".deb")).collect();
    assert_eq!(debs.len(), 2, "scripts/package printed {built}");

    // What the gateway's package holds, before it is installed.
    let contents = stdout_within(
        Command::new("dpkg-deb").arg("--contents").arg(debs[1]),
        LIMIT,
    );
    assert!(contents.contains("./usr/bin/tunnel-gateway"), "{contents}");
    let conffiles = stdout_within(
        Command::new("dpkg-deb")
            .args(["--info"])
            .arg(debs[1])
            .arg("conffiles"),
        LIMIT,
    );
    assert_eq!(conffiles.trim(), "/etc/default/tunnel-gateway");

    let guard = Installed {
        user_was_there: user_exists("tunnel-gateway"),
    };
    let mut install = vec!["install", "-y"];
    install.extend(debs.iter().copied());
    apt_get(&install, &out);
    for package in PACKAGES {
        assert!(
            installed(package),
            "{package} is not installed after apt-get install"
        );
    }
    for file in [
        "/usr/bin/tunnel-agent",
        "/usr/bin/tunnel-run",
        "/usr/bin/tunnel-gateway",
        "/usr/lib/tunnel/libtunnel_preload.so",
        "/usr/lib/systemd/user/tunnel-agent.service",
        "/usr/lib/systemd/system/tunnel-gateway.service",
        "/etc/default/tunnel-agent",
        "/etc/default/tunnel-gateway",
        "/etc/tunnel/gateway/gateway.toml",
    ] {
        assert!(Path::new(file).exists(), "{file} is not installed");
    }
    assert!(
        user_exists("tunnel-gateway"),
        "the system user was not made"
    );

    // The installed units name the installed programs and pass verification.
    let (code, verify_out, verify_err) = output_within(
        Command::new("systemd-analyze").args([
            "verify",
            "/usr/lib/systemd/system/tunnel-gateway.service",
            "/usr/lib/systemd/user/tunnel-agent.service",
        ]),
        LIMIT,
    );
    assert_eq!(code, Some(0), "{verify_out}{verify_err}");
    assert_eq!(
        format!("{verify_out}{verify_err}").trim(),
        "",
        "systemd-analyze verify complained about the installed units"
    );
    let unit = std::fs::read_to_string("/usr/lib/systemd/system/tunnel-gateway.service")
        .expect("gateway unit");
    assert!(unit.contains(
        "ExecStart=/usr/bin/tunnel-gateway run --config /etc/tunnel/gateway/gateway.toml"
    ));
    assert!(unit.contains("EnvironmentFile=-/etc/default/tunnel-gateway"));

    // The gateway the package made runs as the unit runs it: its user, its runtime and
    // state directories (made here as systemd makes them), /etc only read. In a network
    // namespace of its own, where its port 7443 on every address is free.
    for (dir, mode) in [
        ("/run/tunnel-gateway", "0750"),
        ("/var/lib/tunnel-gateway", "0700"),
    ] {
        run_ok(Command::new("install").args([
            "-d",
            "-o",
            "tunnel-gateway",
            "-g",
            "tunnel-gateway",
            "-m",
            mode,
            dir,
        ]));
    }
    let mut gateway = Daemon::spawn(
        "packaged gateway",
        {
            let mut c = Command::new("unshare");
            c.args([
                "-n",
                "setpriv",
                "--reuid=tunnel-gateway",
                "--regid=tunnel-gateway",
                "--init-groups",
                "/usr/bin/tunnel-gateway",
                "run",
                "--config",
                "/etc/tunnel/gateway/gateway.toml",
            ]);
            c
        },
        site.path("packaged-gateway.log"),
    )
    .expect("gateway");
    gateway
        .wait_log("listening on 0.0.0.0:7443", Duration::from_secs(20))
        .expect("the packaged gateway did not start as tunnel-gateway");
    let status = stdout_within(
        Command::new("/usr/bin/tunnel-gateway").args([
            "status",
            "--config",
            "/etc/tunnel/gateway/gateway.toml",
        ]),
        LIMIT,
    );
    assert!(
        status.contains("gateway listening on 0.0.0.0:7443"),
        "{status}"
    );
    // The service's user cannot make root's commands write or chown through a link in
    // the state directory: run as root there, they go on as the service's user.
    let victim = site.path("victim");
    std::fs::write(&victim, "root's\n").expect("victim");
    run_ok(
        Command::new("setpriv")
            .args([
                "--reuid=tunnel-gateway",
                "--regid=tunnel-gateway",
                "--init-groups",
                "ln",
                "-s",
            ])
            .arg(&victim)
            .arg("/var/lib/tunnel-gateway/.lock"),
    );
    let (_, _, _) = output_within(
        Command::new("/usr/bin/tunnel-gateway").args([
            "token",
            "--identity",
            "packaged",
            "--address",
            "127.0.0.1:7443",
        ]),
        LIMIT,
    );
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&victim).expect("victim");
        assert_eq!(meta.uid(), 0, "root's file was given to the service's user");
        assert_eq!(
            std::fs::read_to_string(&victim).expect("victim"),
            "root's\n"
        );
    }
    std::fs::remove_file("/var/lib/tunnel-gateway/.lock").expect("remove the link");
    // A token written by root lands in the service's state directory, as the service's
    // user; `token` finds the system gateway without --dir when root has none of its own.
    stdout_within(
        Command::new("/usr/bin/tunnel-gateway")
            .env("HOME", site.path("home"))
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("TUNNEL_GATEWAY_CONFIG")
            .args([
                "token",
                "--identity",
                "packaged",
                "--address",
                "127.0.0.1:7443",
            ]),
        LIMIT,
    );
    let identities = stdout_within(
        Command::new("/usr/bin/tunnel-gateway").args([
            "identities",
            "--dir",
            "/etc/tunnel/gateway",
        ]),
        LIMIT,
    );
    assert!(identities.contains("packaged"), "{identities}");
    let tokens = std::fs::read_dir("/var/lib/tunnel-gateway/tokens").expect("tokens");
    for token in tokens {
        use std::os::unix::fs::MetadataExt;
        let token = token.expect("token");
        let uid = std::fs::metadata(token.path()).expect("token").uid();
        assert_ne!(
            uid,
            0,
            "{} is root's, not the service's",
            token.path().display()
        );
    }
    gateway.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(
        gateway.wait_exit(Duration::from_secs(20)).expect("exit"),
        Some(0)
    );

    // The demo, with the installed programs (tunnel-run finds /usr/lib/libtunnel_preload.so).
    let (code, demo_out, demo_err) = output_within(
        Command::new(root().join("scripts/demo"))
            .env("TUNNEL_DEMO_BIN", "/usr/bin")
            .env("TUNNEL_DEMO_MIB", "4"),
        LIMIT,
    );
    assert_eq!(code, Some(0), "the demo failed:\n{demo_out}\n{demo_err}");
    assert!(
        demo_out.contains("using the installed programs in /usr/bin"),
        "{demo_out}"
    );
    assert!(demo_out.contains("PASS:"), "{demo_out}");

    // Purge: programs, units, conffiles, the gateway the package made and its state go.
    let mut purge = vec!["purge", "-y"];
    purge.extend(PACKAGES);
    apt_get(&purge, &out);
    for package in PACKAGES {
        assert!(
            !installed(package),
            "{package} is still installed after purge"
        );
    }
    for file in [
        "/usr/bin/tunnel-agent",
        "/usr/bin/tunnel-run",
        "/usr/bin/tunnel-gateway",
        "/usr/lib/tunnel/libtunnel_preload.so",
        "/usr/lib/systemd/system/tunnel-gateway.service",
        "/etc/default/tunnel-gateway",
        "/etc/tunnel",
        "/var/lib/tunnel-gateway",
    ] {
        assert!(
            !Path::new(file).exists(),
            "{file} is still there after purge"
        );
    }

    // A gateway the administrator made before installing is left alone, by install and
    // by purge.
    run_ok(Command::new(bin("tunnel-gateway")).args([
        "init",
        "--dir",
        "/etc/tunnel/gateway",
        "--name",
        "own.example.org",
    ]));
    let own_ca = std::fs::read("/etc/tunnel/gateway/ca-key.pem").expect("own CA");
    let said = apt_get(&install, &out);
    assert!(said.contains("was not made by this package"), "{said}");
    apt_get(&purge, &out);
    assert_eq!(
        std::fs::read("/etc/tunnel/gateway/ca-key.pem")
            .expect("the administrator's CA after purge"),
        own_ca
    );
    std::fs::remove_dir_all("/etc/tunnel").expect("remove the administrator's gateway");
    drop(guard);
}
