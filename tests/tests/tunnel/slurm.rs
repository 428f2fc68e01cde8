//! The batch-job story with a real scheduler: `examples/slurm/job.sh` submitted with
//! `sbatch --wait` to a single-node Slurm (Debian's slurm-wlm, munge for its
//! authentication), all started and stopped here; the job reaches a name that only the
//! gateway's site resolves. Needs root (slurmd runs jobs as their user).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tunnel_tests::*;

const LIMIT: Duration = Duration::from_secs(90);

/// The scheduler's daemons and files; the daemons stop when dropped (munged last).
struct Slurm {
    conf: PathBuf,
    slurmd: Daemon,
    slurmctld: Daemon,
    _munged: Daemon,
}

impl Drop for Slurm {
    fn drop(&mut self) {
        // Asked to stop, so that each reaps its own helpers (slurmctld's slurmscriptd)
        // before it goes; killed only if it does not.
        for daemon in [&mut self.slurmd, &mut self.slurmctld] {
            daemon.signal(nix::sys::signal::Signal::SIGTERM);
            let _ = daemon.wait_exit(Duration::from_secs(10));
        }
    }
}

fn chown_munge(path: &Path, mode: u32) {
    run_ok(Command::new("chown").arg("munge:munge").arg(path));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("mode");
}

fn slurm(dir: &Path) -> Slurm {
    std::fs::create_dir_all(dir).expect("slurm dir");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("mode");
    // munge: its key, and a socket directory every user can pass through.
    let keys = dir.join("munge");
    let sockets = dir.join("munge-socket");
    for d in [&keys, &sockets] {
        std::fs::create_dir_all(d).expect("munge dir");
    }
    let key = keys.join("munge.key");
    let mut material = vec![0u8; 128];
    Pattern::new(free_port().into()).fill(&mut material);
    std::fs::write(&key, &material).expect("munge key");
    chown_munge(&key, 0o400);
    chown_munge(&keys, 0o711);
    chown_munge(&sockets, 0o755);
    let socket = sockets.join("munge.sock");
    // setpriv execs munged itself (runuser would stay its parent, and a kill of it
    // would leave munged behind).
    let mut munged = Command::new("setpriv");
    munged
        .args([
            "--reuid=munge",
            "--regid=munge",
            "--init-groups",
            "/usr/sbin/munged",
            "-F",
        ])
        .arg(format!("--socket={}", socket.display()))
        .arg(format!("--key-file={}", key.display()))
        .arg(format!("--pid-file={}", keys.join("munged.pid").display()))
        .arg(format!("--log-file={}", keys.join("munged.log").display()))
        .arg(format!(
            "--seed-file={}",
            keys.join("munged.seed").display()
        ));
    let mut munged = Daemon::spawn("munged", munged, dir.join("munged.out")).expect("munged");
    munged
        .wait_log("Created socket", Duration::from_secs(20))
        .expect("munged up");

    let host = run_ok(Command::new("hostname").arg("-s"))
        .trim()
        .to_string();
    for d in ["state", "spool"] {
        std::fs::create_dir_all(dir.join(d)).expect("slurm state");
    }
    let at = |f: &str| dir.join(f).display().to_string();
    let conf = dir.join("slurm.conf");
    std::fs::write(
        &conf,
        format!(
            "ClusterName=tunneltest\nSlurmctldHost={host}(127.0.0.1)\nSlurmctldPort={}\nSlurmdPort={}\n\
             SlurmUser=root\nSlurmdUser=root\nAuthType=auth/munge\nAuthInfo=socket={}\nCredType=cred/munge\n\
             StateSaveLocation={}\nSlurmdSpoolDir={}\nSlurmctldPidFile={}\nSlurmdPidFile={}\n\
             ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nJobAcctGatherType=jobacct_gather/none\n\
             AccountingStorageType=accounting_storage/none\nSchedulerType=sched/builtin\nSelectType=select/linear\n\
             ReturnToService=2\nMpiDefault=none\nSwitchType=switch/none\nMailProg=/bin/true\n\
             NodeName=tnode NodeAddr=127.0.0.1 CPUs=1 State=UNKNOWN\n\
             PartitionName=debug Nodes=tnode Default=YES MaxTime=INFINITE State=UP\n",
            free_port(),
            free_port(),
            socket.display(),
            at("state"),
            at("spool"),
            at("slurmctld.pid"),
            at("slurmd.pid"),
        ),
    )
    .expect("slurm.conf");
    let mut ctld = Command::new("/usr/sbin/slurmctld");
    ctld.args(["-D", "-i", "-f"]).arg(&conf);
    let slurmctld = Daemon::spawn("slurmctld", ctld, dir.join("slurmctld.out")).expect("slurmctld");
    let mut d = Command::new("/usr/sbin/slurmd");
    d.args(["-D", "-N", "tnode", "-f"]).arg(&conf);
    let slurmd = Daemon::spawn("slurmd", d, dir.join("slurmd.out")).expect("slurmd");
    wait_for(LIMIT, "the node to be idle", || {
        let out = Command::new("sinfo")
            .args(["-h", "-o", "%t"])
            .env("SLURM_CONF", &conf)
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .eq("idle")
            .then_some(())
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}\n{}\n{}",
            std::fs::read_to_string(dir.join("slurmctld.out")).unwrap_or_default(),
            std::fs::read_to_string(dir.join("slurmd.out")).unwrap_or_default()
        )
    });
    Slurm {
        conf,
        slurmd,
        slurmctld,
        _munged: munged,
    }
}

#[test]
fn a_slurm_job_reaches_a_far_site_name_through_the_tunnel() {
    if needs_root("a_slurm_job_reaches_a_far_site_name_through_the_tunnel") {
        return;
    }
    for (program, package) in [
        ("sbatch", "slurm-wlm"),
        ("/usr/sbin/munged", "munge"),
        ("curl", "curl"),
    ] {
        require(program, package);
    }
    let site = Site::new();
    let www = site.path("www");
    std::fs::create_dir_all(&www).expect("www");
    std::fs::write(www.join("hello.txt"), "hello from the far site\n").expect("file");
    let (_web, web) = http_server("127.0.0.1", &www);
    // The name exists only in the gateway's [hosts]: this machine cannot resolve it.
    let name = "web.site-b.internal";
    let rules = format!(
        "{}\n[hosts]\n\"{name}\" = [\"127.0.0.1\"]\n",
        allow_alice(&[&web.to_string()])
    );
    let tunnel = Tunnel::start_with(&rules, &route_table(&["*.site-b.internal"])).expect("tunnel");

    // The job's directory: the scheduler's jobs run there and write their output.
    let dir = std::env::temp_dir().join(format!("tunnel-slurm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let slurm = slurm(&dir.join("slurm"));
    let job = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/slurm/job.sh");
    let output = dir.join("job.out");
    let path = format!(
        "{}:{}",
        bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = stdout_within(
        Command::new("sbatch")
            .args(["--wait", "--chdir"])
            .arg(&dir)
            .arg(format!("--output={}", output.display()))
            .arg(&job)
            .env("SLURM_CONF", &slurm.conf)
            .env("PATH", path)
            .env("TUNNEL_CONFIG", &tunnel.agent.config)
            .env(
                "TUNNEL_EXAMPLE_URL",
                format!("http://{name}:{}/hello.txt", web.port()),
            ),
        LIMIT,
    );
    let job_output = std::fs::read_to_string(&output).unwrap_or_default();
    assert!(out.starts_with("Submitted batch job"), "{out}");
    assert_eq!(job_output, "hello from the far site\n", "{job_output}");
    // The name went to the gateway: the agent's stream names it.
    let recent = tunnel.agent.recent_outcomes();
    assert!(!recent.is_empty(), "no stream went through the agent");
    drop(slurm);
    let _ = std::fs::remove_dir_all(&dir);
}
