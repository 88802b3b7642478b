//! The hardened systemd unit (packaging/systemd/runner-monitor.service): systemd accepts it, its
//! exposure score stays low, it grants exactly the capabilities the agent checks for, and the
//! agent really loads and attaches every probe inside its sandbox: a real systemd boots as the
//! init of a private PID and mount namespace (this machine's PID 1 is not systemd) and starts the
//! unit, seccomp filter, capabilities, read-only file system, ProtectProc and all.

use std::{
    collections::BTreeSet,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{
    CANARY, TestEnv,
    live::{repo_root, target_dir},
    output_of, spawn_with_parent_death,
};
use runner_monitor::privilege::{REQUIREMENTS, When};

/// The exposure `systemd-analyze security` gave the unit when it was written (2.7 on systemd
/// 252): a change that makes it worse fails.
const MAX_EXPOSURE: f64 = 2.7;

fn unit_text() -> String {
    std::fs::read_to_string(repo_root().join("packaging/systemd/runner-monitor.service")).unwrap()
}

/// The unit with ExecStart pointing at the binary the tests built (verify checks that it is
/// executable); nothing else changes.
fn unit_for_this_build(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let unit = dir.join("runner-monitor.service");
    let binary = target_dir().join("runner-monitor");
    let text = unit_text().replace("/usr/bin/runner-monitor", &binary.display().to_string());
    assert_ne!(text, unit_text(), "ExecStart names /usr/bin/runner-monitor");
    std::fs::write(&unit, text).unwrap();
    unit
}

fn systemd_analyze(args: &[&str]) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .args(args)
        .output()
        .expect("systemd-analyze (Debian package systemd, installed by `cargo xtask setup`)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn systemd_accepts_the_unit_and_its_exposure_stays_low() {
    let dir = std::env::temp_dir().join(format!("rm-unit-{}", std::process::id()));
    let unit = unit_for_this_build(&dir);
    let unit = unit.to_str().unwrap();
    let (ok, text) = systemd_analyze(&["verify", unit]);
    assert!(ok && !text.contains("runner-monitor"), "verify: {text}");

    let (ok, text) = systemd_analyze(&["security", "--offline=true", "--no-pager", unit]);
    assert!(ok, "security: {text}");
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for runner-monitor.service:")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {text}"));
    eprintln!("systemd-analyze security: exposure {score} (at most {MAX_EXPOSURE})");
    for line in text.lines().filter(|l| l.starts_with('✗')) {
        eprintln!("  {}", line.trim_end());
    }
    assert!(score <= MAX_EXPOSURE, "exposure {score}: {text}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_unit_grants_exactly_the_capabilities_the_agent_checks_for() {
    let text = unit_text();
    let setting = |name: &str| -> BTreeSet<String> {
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name}="));
        line.split_whitespace().map(str::to_owned).collect()
    };
    // Everything but CAP_SYS_ADMIN, which only mounts tracefs: the unit requires
    // sys-kernel-tracing.mount instead.
    let expected: BTreeSet<String> = REQUIREMENTS
        .iter()
        .filter(|r| r.when != When::TracefsUnmounted)
        .map(|r| r.capability.to_string())
        .collect();
    assert_eq!(setting("CapabilityBoundingSet"), expected);
    assert_eq!(setting("AmbientCapabilities"), expected);
    assert!(text.contains("\nRequires=sys-kernel-tracing.mount\n"));
}

/// A systemd booted as the init of a private PID and mount namespace; killed (with everything
/// it started) on drop.
struct Systemd {
    unshare: Child,
    init: u32,
    /// cgroups it created, to remove afterwards.
    cgroups: Vec<PathBuf>,
}

impl Systemd {
    fn in_namespace(&self, program: &str, args: &[&str]) -> std::process::Output {
        Command::new("nsenter")
            .args(["-t", &self.init.to_string(), "-m", "-p", program])
            .args(args)
            .output()
            .expect("nsenter")
    }

    fn read(&self, path: &str) -> String {
        String::from_utf8_lossy(&self.in_namespace("cat", &[path]).stdout).into_owned()
    }

    fn status(&self) -> String {
        let out = self.in_namespace(
            "systemctl",
            &["status", "--no-pager", "runner-monitor.service"],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Systemd {
    fn drop(&mut self) {
        // SIGKILL to a namespace's init kills every process in it.
        // SAFETY: kill(2) on the pid of our own child's child.
        unsafe { libc::kill(self.init as i32, libc::SIGKILL) };
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
        // The cgroups it created empty once their processes are gone; deepest first.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.cgroups.iter().any(|d| d.exists()) && Instant::now() < deadline {
            let mut created: Vec<PathBuf> =
                self.cgroups.iter().flat_map(|d| walk_dirs(d)).collect();
            created.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
            for d in created {
                let _ = std::fs::remove_dir(d);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn walk_dirs(dir: &Path) -> Vec<PathBuf> {
    if !dir.is_dir() {
        return Vec::new();
    }
    let mut out = vec![dir.to_path_buf()];
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(walk_dirs(&entry.path()));
        }
    }
    out
}

/// The cgroups a systemd started from here would create (init.scope, system.slice) that do not
/// exist yet: it takes its name=systemd (or unified) cgroup as its root and uses the same path in
/// every hierarchy mounted under /sys/fs/cgroup.
fn cgroups_systemd_will_create() -> Vec<PathBuf> {
    let table = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let own = |controllers: &str| {
        table.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            parts.next();
            (parts.next()? == controllers).then(|| parts.next().map(str::to_owned))?
        })
    };
    let path = own("name=systemd")
        .or_else(|| own(""))
        .unwrap_or_else(|| "/".into());
    let mut out = Vec::new();
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let base = hierarchy.path().join(path.trim_start_matches('/'));
        for name in ["init.scope", "system.slice"] {
            if base.is_dir() && !base.join(name).exists() {
                out.push(base.join(name));
            }
        }
    }
    out
}

fn boot_systemd(dir: &Path) -> Systemd {
    let units = dir.join("units");
    let binary = target_dir().join("runner-monitor");
    let dropin = units.join("runner-monitor.service.d");
    std::fs::create_dir_all(&dropin).unwrap();
    std::fs::write(
        units.join("runner-monitor.service"),
        unit_text().replace("/usr/bin/runner-monitor", &binary.display().to_string()),
    )
    .unwrap();
    // Only what this test needs changes: no boot dependencies (nothing else is started), an
    // existing user, a log file instead of the journal (no journald here), a free port, and
    // the runner user whose group the control socket gets.
    // The pins go to a directory of this test's (the host's bpffs is shared), made the way the
    // unit makes its own.
    let pins = integration_tests::pin_dir_of(dir);
    std::fs::write(
        dropin.join("test.conf"),
        format!(
            "[Unit]\nDefaultDependencies=no\nRequires=\nAfter=\nWants=\n\
             [Service]\nUser=nobody\nGroup=nogroup\n\
             ExecStartPre=\n\
             ExecStartPre=+/usr/bin/install -d -o nobody -g nogroup -m 0700 {pins}\n\
             ReadWritePaths=-{pins}\n\
             Environment=\"RUNNER_MONITOR_ARGS=--status-interval=2 --runner-user daemon \
             --listen 127.0.0.1:0 --pin-dir {pins}\"\n\
             StandardOutput=append:/run/rm-agent.log\nStandardError=append:/run/rm-agent.log\n",
            pins = pins.display()
        ),
    )
    .unwrap();
    std::fs::write(
        units.join("rm-test.target"),
        "[Unit]\nDefaultDependencies=no\nWants=runner-monitor.service\n",
    )
    .unwrap();
    let boot = dir.join("boot.sh");
    std::fs::write(
        &boot,
        format!(
            "set -e\n\
             mount -t proc proc /proc\n\
             mount -t tmpfs tmpfs /run\n\
             mount -t tmpfs tmpfs /var/lib\n\
             mount -t tmpfs tmpfs /var/log\n\
             mkdir -p /run/systemd/system\n\
             cp -r {units}/. /run/systemd/system/\n\
             exec env container=runner-monitor-test /lib/systemd/systemd --system \
             --unit=rm-test.target --log-target=null\n",
            units = units.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&boot, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cgroups = cgroups_systemd_will_create();
    let mut command = Command::new("unshare");
    command
        .args([
            "--pid",
            "--fork",
            "--kill-child",
            "--mount",
            "--propagation",
            "private",
        ])
        .arg("sh")
        .arg(&boot)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("boot.log")).unwrap());
    let unshare = spawn_with_parent_death(&mut command, libc::SIGKILL).expect("unshare");
    let deadline = Instant::now() + Duration::from_secs(10);
    let init = loop {
        let children =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", unshare.id()))
                .unwrap_or_default();
        let init = children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = init
            && std::fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|exe| exe.ends_with("systemd"))
        {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "systemd did not start: {}",
            std::fs::read_to_string(dir.join("boot.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    Systemd {
        unshare,
        init,
        cgroups,
    }
}

#[test]
fn a_real_systemd_runs_the_agent_in_the_units_sandbox_and_it_raises_alerts() {
    runner_monitor::sensor::attach::ensure_tracefs().expect("tracefs (sys-kernel-tracing.mount)");
    let dir = std::env::temp_dir().join(format!("rm-systemd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let systemd = boot_systemd(&dir);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60);
    while !systemd
        .read("/run/rm-agent.log")
        .contains("control socket ready")
    {
        assert!(
            Instant::now() < deadline,
            "the agent did not start under systemd:\n{}\n{}",
            systemd.read("/run/rm-agent.log"),
            systemd.status()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("systemd: agent ready in {:?}", started.elapsed());
    let log = systemd.read("/run/rm-agent.log");
    let attached: Vec<&str> = log
        .split("probes attached attached=")
        .nth(1)
        .map(|rest| rest.split_whitespace().take(2).collect())
        .unwrap_or_default();
    assert!(
        attached.len() == 2 && attached[1] == format!("total={}", attached[0]),
        "not every probe attached in the sandbox: {log}"
    );
    assert!(!log.contains("missing capabilit"), "{log}");
    // Its job maps are pinned, in the unit's writable pin directory.
    assert!(!log.contains("not pinned"), "{log}");
    let pins = integration_tests::pin_dir_of(&dir);
    assert!(pins.join("PROCESSES").exists() && pins.join("JOBS").exists());
    // The control socket got the runner user's group (CAP_CHOWN and fchownat past seccomp).
    let socket = systemd.in_namespace("stat", &["-c", "%G %a", "/run/runner-monitor/control.sock"]);
    assert_eq!(String::from_utf8_lossy(&socket.stdout).trim(), "daemon 660");

    // A job on the host whose survivor reads a credential after the job ended. (The agent's
    // /proc is its namespace's, so it cannot read the job's environment or working directory
    // here: the job stays unnamed and the path is absolute.)
    let env = TestEnv::new("systemd");
    let worker = env.dir.join("Runner.Worker");
    std::fs::copy("/bin/sh", &worker).unwrap();
    let out = output_of(
        Command::new(&worker)
            .arg("-c")
            .arg("(setsid sh -c 'sleep 2; cat \"$HOME/.aws/credentials\" > /dev/null' &); sleep 1")
            .env("HOME", &env.home)
            .env("GITHUB_TOKEN", CANARY),
    );
    assert!(out.status.success(), "{out:?}");
    let path = env.path(".aws/credentials");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let alerts = systemd.read("/var/log/runner-monitor/alerts.jsonl");
        assert!(!alerts.contains(CANARY), "the canary leaked: {alerts}");
        let found = alerts.lines().any(|l| {
            serde_json::from_str::<serde_json::Value>(l).is_ok_and(|a| {
                a["rule"] == "credential-after-job-end" && a["credential"]["path"] == path.as_str()
            })
        });
        if found {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no alert under systemd: {alerts}\n{}",
            systemd.read("/run/rm-agent.log")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(systemd);
    let _ = std::fs::remove_dir_all(pins);
    let _ = std::fs::remove_dir_all(dir);
}
