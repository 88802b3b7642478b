//! A real systemd booted as the init of a private PID and mount namespace (this machine's PID 1
//! is not systemd), to start runner-monitor.service in its real sandbox: seccomp filter,
//! capabilities, read-only file system, ProtectProc and all. `tests/tests/systemd_unit.rs` boots
//! it on the host's file system with the unit from the repository, `tests/tests/package.rs` in
//! the throwaway root the Debian package was installed into.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{CANARY, TestEnv, output_of, spawn_with_parent_death};

/// Where the booted systemd's root file system comes from.
pub enum Root {
    /// The host's, with fresh tmpfs on /run, /var/lib and /var/log.
    Host,
    /// A complete root at `dir` as the mount namespace of process `holder` sees it: systemd
    /// boots with it as `/` (pivot_root), with the host's /sys and /dev and a fresh /run.
    Prepared { holder: u32, dir: PathBuf },
}

/// A systemd booted as the init of a private PID and mount namespace; killed (with everything
/// it started) on drop.
pub struct Systemd {
    unshare: Child,
    init: u32,
    /// cgroups it created, to remove afterwards.
    cgroups: Vec<PathBuf>,
}

impl Systemd {
    /// Boots systemd with `units` (path under /run/systemd/system, text) added, starting only
    /// `rm-test.target`, which wants runner-monitor.service. Its log is `boot.log` in `dir`;
    /// the agent's output should go to `/run/rm-agent.log` (see `test_dropin`).
    pub fn boot(dir: &Path, root: &Root, units: &[(&str, String)]) -> Systemd {
        let unit_dir = dir.join("units");
        for (path, text) in units {
            let path = unit_dir.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        std::fs::write(
            unit_dir.join("rm-test.target"),
            "[Unit]\nDefaultDependencies=no\nWants=runner-monitor.service\n",
        )
        .unwrap();
        let systemd = "exec env container=runner-monitor-test /lib/systemd/systemd --system \
                       --unit=rm-test.target --log-target=null";
        let script = match root {
            Root::Host => format!(
                "set -e\n\
                 mount -t proc proc /proc\n\
                 mount -t tmpfs tmpfs /run\n\
                 mount -t tmpfs tmpfs /var/lib\n\
                 mount -t tmpfs tmpfs /var/log\n\
                 mkdir -p /run/systemd/system\n\
                 cp -r {units}/. /run/systemd/system/\n\
                 {systemd}\n",
                units = unit_dir.display()
            ),
            Root::Prepared { dir: root, .. } => format!(
                "set -e\n\
                 root={root}\n\
                 mount --make-rprivate /\n\
                 mount -t proc proc \"$root/proc\"\n\
                 mount --rbind /sys \"$root/sys\"\n\
                 mount --rbind /dev \"$root/dev\"\n\
                 mount -t tmpfs tmpfs \"$root/run\"\n\
                 mkdir -p \"$root/run/systemd/system\" \"$root/.old-root\"\n\
                 cp -r {units}/. \"$root/run/systemd/system/\"\n\
                 cd \"$root\"\n\
                 pivot_root . .old-root\n\
                 exec chroot . sh -c 'umount -l /.old-root && rmdir /.old-root && {systemd}'\n",
                root = root.display(),
                units = unit_dir.display()
            ),
        };
        let boot = dir.join("boot.sh");
        std::fs::write(&boot, script).unwrap();
        std::fs::set_permissions(&boot, std::fs::Permissions::from_mode(0o755)).unwrap();
        let cgroups = cgroups_systemd_will_create();
        let mut command = match root {
            Root::Host => Command::new("unshare"),
            Root::Prepared { holder, .. } => {
                // nsenter with only -m execs unshare in place: the child is unshare itself.
                let mut c = Command::new("nsenter");
                c.args(["-t", &holder.to_string(), "-m", "unshare"]);
                c
            }
        };
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

    pub fn in_namespace(&self, program: &str, args: &[&str]) -> std::process::Output {
        Command::new("nsenter")
            .args(["-t", &self.init.to_string(), "-m", "-p", program])
            .args(args)
            .output()
            .expect("nsenter")
    }

    pub fn read(&self, path: &str) -> String {
        String::from_utf8_lossy(&self.in_namespace("cat", &[path]).stdout).into_owned()
    }

    pub fn status(&self) -> String {
        let out = self.in_namespace(
            "systemctl",
            &["status", "--no-pager", "runner-monitor.service"],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until the agent's control socket is ready, then checks that every probe attached,
    /// that no capability was missing and that the job maps were pinned; returns its log.
    pub fn wait_agent_ready(&self) -> String {
        let started = Instant::now();
        let deadline = started + Duration::from_secs(60);
        while !self
            .read("/run/rm-agent.log")
            .contains("control socket ready")
        {
            assert!(
                Instant::now() < deadline,
                "the agent did not start under systemd:\n{}\n{}",
                self.read("/run/rm-agent.log"),
                self.status()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!("systemd: agent ready in {:?}", started.elapsed());
        let log = self.read("/run/rm-agent.log");
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
        // Its job maps and its probes are pinned, in the unit's writable pin directory, with
        // only the unit's capabilities.
        assert!(!log.contains("not pinned"), "{log}");
        assert!(!log.contains("refused to pin"), "{log}");
        log
    }

    /// A job on the host whose survivor reads a credential after the job ended raises
    /// `credential-after-job-end` in the agent's alert stream, without the canary. (The agent's
    /// /proc is its namespace's, so it cannot read the job's environment or working directory
    /// here: the job stays unnamed and the path is absolute.)
    pub fn expect_survivor_alert(&self, name: &str) {
        let env = TestEnv::new(name);
        let worker = env.dir.join("Runner.Worker");
        std::fs::copy("/bin/sh", &worker).unwrap();
        let out = output_of(
            Command::new(&worker)
                .arg("-c")
                .arg(
                    "(setsid sh -c 'sleep 2; cat \"$HOME/.aws/credentials\" > /dev/null' &); \
                     sleep 1",
                )
                .env("HOME", &env.home)
                .env("GITHUB_TOKEN", CANARY),
        );
        assert!(out.status.success(), "{out:?}");
        let path = env.path(".aws/credentials");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let alerts = self.read("/var/log/runner-monitor/alerts.jsonl");
            assert!(!alerts.contains(CANARY), "the canary leaked: {alerts}");
            let found = alerts.lines().any(|l| {
                serde_json::from_str::<serde_json::Value>(l).is_ok_and(|a| {
                    a["rule"] == "credential-after-job-end"
                        && a["credential"]["path"] == path.as_str()
                })
            });
            if found {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no alert under systemd: {alerts}\n{}",
                self.read("/run/rm-agent.log")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
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

/// The drop-in both tests add to runner-monitor.service; only what a test needs changes: no
/// boot dependencies (nothing else is started), output to a log file instead of the journal (no
/// journald here), and the pins in a directory of the test's (the host's bpffs is shared), made
/// for `user` the way the unit makes its own. `extra` adds [Service] lines.
pub fn test_dropin(pins: &Path, user: &str, group: &str, extra: &str) -> String {
    format!(
        "[Unit]\nDefaultDependencies=no\nRequires=\nAfter=\nWants=\n\
         [Service]\n\
         ExecStartPre=\n\
         ExecStartPre=+/usr/bin/install -d -o {user} -g {group} -m 0700 {pins}\n\
         ReadWritePaths=-{pins}\n\
         StandardOutput=append:/run/rm-agent.log\nStandardError=append:/run/rm-agent.log\n\
         {extra}",
        pins = pins.display()
    )
}

/// The agent options both tests use: frequent status lines, `daemon` as the runner user (the
/// control socket's group), a free port, the test's pin directory.
pub fn test_agent_args(pins: &Path) -> String {
    format!(
        "--status-interval=2 --runner-user daemon --listen 127.0.0.1:0 --pin-dir {}",
        pins.display()
    )
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
