//! The Debian package (`cargo xtask package`), installed for real: `dpkg --root` into a throwaway
//! root (a copy-on-write overlay of this machine's own file system, in a private mount namespace,
//! so the maintainer scripts run chrooted with the real dpkg, adduser, systemd-sysusers and
//! deb-systemd-helper, and the machine itself is never changed), every file checked with its
//! owner and mode, the installed binary run, the installed unit booted by a real systemd in that
//! root, then purged; and lintian finds no error in it.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader},
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use integration_tests::{
    live::repo_root,
    pin_dir_of, spawn_with_parent_death,
    systemd::{Root, Systemd, test_agent_args, test_dropin},
};

/// The package: `RM_PACKAGE` (`cargo xtask test` builds it first and names it there), else
/// built now with `cargo xtask package` (a release build: minutes the first time).
fn package() -> &'static Path {
    static PACKAGE: OnceLock<PathBuf> = OnceLock::new();
    PACKAGE.get_or_init(|| {
        if let Some(path) = std::env::var_os("RM_PACKAGE") {
            return PathBuf::from(path);
        }
        eprintln!("package: RM_PACKAGE not set, running `cargo xtask package`");
        let out = Command::new("cargo")
            .args(["xtask", "package"])
            .current_dir(repo_root())
            .stderr(Stdio::inherit())
            .output()
            .expect("cargo xtask package");
        assert!(out.status.success(), "cargo xtask package failed");
        let stdout = String::from_utf8_lossy(&out.stdout);
        PathBuf::from(stdout.lines().last().expect("the package's path").trim())
    })
}

/// A throwaway root: this machine's `/` as the lower layer of an overlay whose upper layer is a
/// tmpfs, mounted in a private mount namespace held by a sleeping process. Everything written in
/// it (by dpkg, the maintainer scripts, systemd, the agent) goes to the tmpfs and is gone when
/// the holder is killed (on drop, or with the test process).
struct ThrowawayRoot {
    holder: Child,
    /// Where the root is mounted, in the holder's mount namespace.
    root: PathBuf,
}

impl ThrowawayRoot {
    fn new(dir: &Path) -> Self {
        let layers = dir.join("layers");
        let root = dir.join("root");
        std::fs::create_dir_all(&layers).unwrap();
        std::fs::create_dir_all(&root).unwrap();
        // /proc and /dev as on a real machine (the scripts write to /dev/null); a fresh /run
        // without /run/systemd/system: systemd is not the running init, as on this machine.
        // Not /sys: nothing the package does may reach the host's bpffs. What an agent run on
        // this machine left (its default state directory) is removed in the root (whiteouts in
        // the upper layer): the root is a machine that never had runner-monitor.
        let script = format!(
            "set -e\n\
             mount -t tmpfs -o mode=0755 tmpfs {layers}\n\
             mkdir {layers}/upper {layers}/work\n\
             mount -t overlay overlay -o lowerdir=/,upperdir={layers}/upper,workdir={layers}/work {root}\n\
             rm -rf {root}/var/lib/runner-monitor {root}/var/log/runner-monitor \
             {root}/etc/runner-monitor {root}/etc/default/runner-monitor\n\
             mount -t proc proc {root}/proc\n\
             mount --rbind /dev {root}/dev\n\
             mount -t tmpfs -o mode=0755 tmpfs {root}/run\n\
             echo ready\n\
             exec sleep infinity\n",
            layers = layers.display(),
            root = root.display()
        );
        let mut command = Command::new("unshare");
        command
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut holder = spawn_with_parent_death(&mut command, libc::SIGKILL).expect("unshare");
        let mut line = String::new();
        BufReader::new(holder.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "the throwaway root was not mounted");
        Self { holder, root }
    }

    /// A path inside the root, as this process can reach it (through the holder's /proc root).
    fn path(&self, path: &str) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/root{}{path}",
            self.holder.id(),
            self.root.display()
        ))
    }

    /// Runs a program of the host in the holder's mount namespace (dpkg --root).
    fn host(&self, program: &str, args: &[&str]) -> Output {
        Command::new("nsenter")
            .args(["-t", &self.holder.id().to_string(), "-m", program])
            .args(args)
            .output()
            .expect("nsenter")
    }

    /// Runs a program chrooted into the root.
    fn chroot(&self, args: &[&str]) -> Output {
        let root = self.root.display().to_string();
        let mut all = vec![root.as_str()];
        all.extend(args);
        self.host("chroot", &all)
    }

    fn dpkg(&self, args: &[&str]) -> String {
        let root = format!("--root={}", self.root.display());
        let mut all = vec![root.as_str()];
        all.extend(args);
        let out = self.host("dpkg", &all);
        let text = text_of(&out);
        assert!(out.status.success(), "dpkg {args:?} failed:\n{text}");
        text
    }
}

impl Drop for ThrowawayRoot {
    fn drop(&mut self) {
        // The namespace, its mounts and the tmpfs go with their last process.
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

fn text_of(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// What the package installs besides its documentation: path, owner, mode.
const FILES: &[(&str, &str, u32)] = &[
    ("/usr/bin/runner-monitor", "root", 0o755),
    ("/lib/systemd/system/runner-monitor.service", "root", 0o644),
    ("/usr/lib/sysusers.d/runner-monitor.conf", "root", 0o644),
    (
        "/usr/share/runner-monitor/hooks/github/job-started.sh",
        "root",
        0o755,
    ),
    (
        "/usr/share/runner-monitor/hooks/github/job-completed.sh",
        "root",
        0o755,
    ),
    (
        "/usr/share/runner-monitor/hooks/gitlab/pre-build.sh",
        "root",
        0o644,
    ),
    (
        "/usr/share/runner-monitor/hooks/gitlab/post-build.sh",
        "root",
        0o644,
    ),
    ("/etc/runner-monitor/policy.toml", "root", 0o644),
    ("/etc/default/runner-monitor", "root", 0o644),
    ("/usr/share/doc/runner-monitor/copyright", "root", 0o644),
    (
        "/usr/share/doc/runner-monitor/changelog.Debian.gz",
        "root",
        0o644,
    ),
    ("/usr/share/doc/runner-monitor/README.md", "root", 0o644),
];

/// The directories postinst makes for the agent's user: its state, spool and alert stream.
const AGENT_DIRS: &[&str] = &[
    "/var/lib/runner-monitor",
    "/var/lib/runner-monitor/state",
    "/var/lib/runner-monitor/spool",
    "/var/log/runner-monitor",
];

const CONFFILES: &[&str] = &[
    "/etc/runner-monitor/policy.toml",
    "/etc/default/runner-monitor",
];

const ENABLED: &str = "/etc/systemd/system/multi-user.target.wants/runner-monitor.service";

/// The uid and gid of a name in the root's passwd and group files (so: created by postinst).
fn ids(root: &ThrowawayRoot, name: &str) -> Option<(u32, u32)> {
    let entry = |file: &str| {
        std::fs::read_to_string(root.path(file))
            .unwrap()
            .lines()
            .find(|l| l.split(':').next() == Some(name))
            .map(str::to_owned)
    };
    let passwd = entry("/etc/passwd")?;
    let group = entry("/etc/group")?;
    let field = |line: &str, i: usize| line.split(':').nth(i).unwrap().parse::<u32>().unwrap();
    assert_eq!(field(&passwd, 3), field(&group, 2), "{passwd} / {group}");
    Some((field(&passwd, 2), field(&group, 2)))
}

#[test]
fn the_installed_package_sets_up_the_agent_its_unit_runs_it_and_purge_removes_it() {
    let deb = package();
    runner_monitor::sensor::attach::ensure_tracefs().expect("tracefs (sys-kernel-tracing.mount)");
    let dir = std::env::temp_dir().join(format!("rm-package-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let root = ThrowawayRoot::new(&dir);
    assert!(
        ids(&root, "runner-monitor").is_none(),
        "this machine already has a runner-monitor account: the test would prove nothing"
    );

    // Install: the maintainer scripts run chrooted, with no systemd running.
    let started = Instant::now();
    let out = root.dpkg(&["-i", deb.to_str().unwrap()]);
    eprintln!("package: dpkg -i in {:?}:\n{out}", started.elapsed());

    // The account from the sysusers file: a system user with a group of its own, no login.
    let (uid, gid) = ids(&root, "runner-monitor").expect("postinst created no runner-monitor user");
    assert!(
        uid < 1000 && gid < 1000,
        "not a system account: {uid}:{gid}"
    );
    let passwd = std::fs::read_to_string(root.path("/etc/passwd")).unwrap();
    let entry = passwd
        .lines()
        .find(|l| l.starts_with("runner-monitor:"))
        .unwrap();
    assert!(
        entry.ends_with(":/var/lib/runner-monitor:/usr/sbin/nologin"),
        "{entry}"
    );

    // Every file, with its owner and mode, and nothing else.
    for (path, owner, mode) in FILES {
        let meta = std::fs::symlink_metadata(root.path(path))
            .unwrap_or_else(|e| panic!("{path} is not installed: {e}"));
        assert!(meta.is_file(), "{path} is not a file");
        assert_eq!(*owner, "root");
        assert_eq!((meta.uid(), meta.gid()), (0, 0), "{path} owner");
        assert_eq!(meta.permissions().mode() & 0o7777, *mode, "{path} mode");
    }
    let listed = text_of(&root.chroot(&["dpkg-query", "-L", "runner-monitor"]));
    let listed_files: BTreeSet<&str> = listed
        .lines()
        .filter(|p| std::fs::symlink_metadata(root.path(p)).is_ok_and(|m| m.is_file()))
        .collect();
    let expected: BTreeSet<&str> = FILES.iter().map(|(p, _, _)| *p).collect();
    assert_eq!(listed_files, expected, "dpkg -L:\n{listed}");
    let conffiles =
        text_of(&root.chroot(&["dpkg-query", "-W", "-f=${Conffiles}", "runner-monitor"]));
    let conffiles: BTreeSet<&str> = conffiles
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(conffiles, CONFFILES.iter().copied().collect());
    assert_eq!(
        std::fs::read_to_string(root.path("/etc/runner-monitor/policy.toml")).unwrap(),
        runner_monitor::policy::DEFAULT_POLICY,
        "the installed policy is not the built-in one"
    );
    for dir in AGENT_DIRS {
        let meta = std::fs::metadata(root.path(dir)).unwrap_or_else(|e| panic!("{dir}: {e}"));
        assert!(meta.is_dir(), "{dir}");
        assert_eq!((meta.uid(), meta.gid()), (uid, gid), "{dir} owner");
        assert_eq!(meta.permissions().mode() & 0o7777, 0o700, "{dir} mode");
    }
    // Enabled (for the next boot under systemd), not started: no systemd runs here.
    let link = std::fs::read_link(root.path(ENABLED)).expect("the unit is not enabled");
    assert_eq!(
        link,
        Path::new("/lib/systemd/system/runner-monitor.service")
    );
    assert!(
        !root.path("/run/runner-monitor").exists(),
        "something started the agent"
    );

    // The installed binary runs and accepts the installed policy, also as its own user.
    let version = root.chroot(&["/usr/bin/runner-monitor", "--version"]);
    assert_eq!(
        text_of(&version).trim(),
        format!("runner-monitor {}", env!("CARGO_PKG_VERSION")),
        "{version:?}"
    );
    let check = root.host(
        "chroot",
        &[
            &format!("--userspec={uid}:{gid}"),
            root.root.to_str().unwrap(),
            "/usr/bin/runner-monitor",
            "policy",
            "check",
            "/etc/runner-monitor/policy.toml",
        ],
    );
    assert!(check.status.success(), "policy check: {}", text_of(&check));

    // Boot the installed unit as installed: its user, its policy, its directories; the options
    // come from /etc/default/runner-monitor, edited as an administrator would.
    let pins = pin_dir_of(&dir);
    std::fs::write(
        root.path("/etc/default/runner-monitor"),
        format!("RUNNER_MONITOR_ARGS=\"{}\"\n", test_agent_args(&pins)),
    )
    .unwrap();
    let systemd = Systemd::boot(
        &dir,
        &Root::Prepared {
            holder: root.holder.id(),
            dir: root.root.clone(),
        },
        &[(
            "runner-monitor.service.d/test.conf",
            test_dropin(&pins, "runner-monitor", "runner-monitor", ""),
        )],
    );
    systemd.wait_agent_ready();
    assert!(pins.join("PROCESSES").exists() && pins.join("JOBS").exists());
    let main_pid = text_of(&systemd.in_namespace(
        "systemctl",
        &["show", "--value", "-p", "MainPID", "runner-monitor.service"],
    ));
    let status = systemd.read(&format!("/proc/{}/status", main_pid.trim()));
    let uids = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap_or_else(|| panic!("no agent process {main_pid}: {status}"));
    assert!(
        uids.split_whitespace().all(|u| u == uid.to_string()),
        "the agent does not run as runner-monitor ({uid}): Uid:{uids}"
    );
    let socket = systemd.in_namespace("stat", &["-c", "%G %a", "/run/runner-monitor/control.sock"]);
    assert_eq!(text_of(&socket).trim(), "daemon 660");
    systemd.expect_survivor_alert("package");
    // The unit's policy is the installed conffile: a reload rereads it.
    let reload = systemd.in_namespace("systemctl", &["reload", "runner-monitor.service"]);
    assert!(reload.status.success(), "reload: {}", text_of(&reload));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !systemd
        .read("/run/rm-agent.log")
        .contains("policy reloaded; state kept policy=Some(\"/etc/runner-monitor/policy.toml\")")
    {
        assert!(
            Instant::now() < deadline,
            "no reload of /etc/runner-monitor/policy.toml: {}",
            systemd.read("/run/rm-agent.log")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(systemd);
    let _ = std::fs::remove_dir_all(&pins);

    // Purge: the files, conffiles, enablement, state, spool and alert stream go; the account
    // stays (Debian practice: a later account must not inherit files it owned).
    let out = root.dpkg(&["--purge", "runner-monitor"]);
    eprintln!("package: dpkg --purge:\n{out}");
    let left: Vec<&str> = FILES
        .iter()
        .map(|(p, _, _)| *p)
        .chain(AGENT_DIRS.iter().copied())
        .chain([ENABLED, "/etc/runner-monitor"])
        .filter(|p| std::fs::symlink_metadata(root.path(p)).is_ok())
        .collect();
    assert!(left.is_empty(), "left after purge: {left:?}");
    assert!(ids(&root, "runner-monitor").is_some());
    drop(root);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn lintian_finds_no_error_in_the_package() {
    let deb = package();
    let out = Command::new("lintian")
        .args(["--display-level", ">=info", "--tag-display-limit", "0"])
        .arg(deb)
        .output()
        .expect("lintian (Debian package lintian, installed by `cargo xtask setup`)");
    let text = text_of(&out);
    // What it still reports, and why, is in packaging/README.md ("Debian package").
    eprintln!("lintian {}:\n{text}", deb.display());
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("E: ")).collect();
    assert!(errors.is_empty(), "lintian errors:\n{}", errors.join("\n"));
    assert!(out.status.success(), "lintian failed: {text}");
}
