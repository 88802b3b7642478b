//! Podman for the tests (Debian's `podman` 4.3 with runc, installed by `cargo xtask setup`):
//! daemonless, with each test's own storage and run roots in a fresh directory, the cgroupfs
//! manager (this host runs no systemd), the vfs storage driver (no overlay mounts to undo), and
//! the Docker tests' busybox image (`podman import`: nothing is pulled). Dropping it removes its
//! containers, files and the cgroups podman made (`libpod_parent`); one test holds podman at a
//! time, so that one's clean-up cannot pull a parent cgroup from under another's start.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use crate::docker::{IMAGE, busybox_rootfs};

pub struct Podman {
    pub dir: PathBuf,
    /// `podman system service`, when started: its Docker-compatible API.
    service: Option<Child>,
    _one_at_a_time: MutexGuard<'static, ()>,
}

static PODMAN: Mutex<()> = Mutex::new(());

impl Podman {
    /// Podman's files in a fresh directory named after `name`, with `IMAGE` imported.
    pub fn new(name: &str) -> Self {
        // A test that failed while holding it leaves nothing behind: its Drop ran.
        let serial = PODMAN.lock().unwrap_or_else(|e| e.into_inner());
        let dir = std::env::temp_dir().join(format!("rm-podman-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // Podman asks runc for 1,048,576 open files and as many processes in a root container;
        // raising a hard limit above the host's is refused on this VM. The tests lower them.
        std::fs::write(
            dir.join("containers.conf"),
            "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n",
        )
        .unwrap();
        let podman = Self {
            dir,
            service: None,
            _one_at_a_time: serial,
        };
        let tar = busybox_rootfs(&podman.dir);
        podman.run(&["import", &tar.display().to_string(), IMAGE]);
        podman
    }

    /// podman's options for this test's roots and this host.
    fn options(&self) -> Vec<String> {
        let d = self.dir.display();
        [
            format!("--root={d}/root"),
            format!("--runroot={d}/run"),
            format!("--tmpdir={d}/tmp"),
            "--storage-driver=vfs".into(),
            "--cgroup-manager=cgroupfs".into(),
            "--events-backend=file".into(),
            "--log-level=error".into(),
        ]
        .into()
    }

    fn conf(&self) -> PathBuf {
        self.dir.join("containers.conf")
    }

    /// `podman` with this test's roots.
    pub fn cli(&self) -> Command {
        let mut command = Command::new("podman");
        command
            .env("CONTAINERS_CONF", self.conf())
            .args(self.options())
            .stdin(Stdio::null());
        command
    }

    /// The same, as a shell command line for a job's step.
    pub fn shell_cli(&self) -> String {
        format!(
            "CONTAINERS_CONF={} podman {}",
            self.conf().display(),
            self.options().join(" ")
        )
    }

    /// Starts `podman system service` on `<dir>/podman/podman.sock` (a path the built-in policy
    /// lists as a Docker API socket, like rootless podman's `$XDG_RUNTIME_DIR/podman/podman.sock`)
    /// and returns that path once it answers.
    pub fn serve(&mut self) -> PathBuf {
        let socket = self.dir.join("podman/podman.sock");
        std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
        let log = std::fs::File::create(self.dir.join("service.log")).unwrap();
        let child = crate::spawn_with_parent_death(
            self.cli()
                .args(["system", "service", "--time=0"])
                .arg(format!("unix://{}", socket.display()))
                .stdout(Stdio::null())
                .stderr(log),
            libc::SIGTERM,
        )
        .expect("podman system service");
        self.service = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "podman system service did not listen: {}",
                std::fs::read_to_string(self.dir.join("service.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        socket
    }

    /// `podman <args>`, which must succeed; its stdout.
    pub fn run(&self, args: &[&str]) -> String {
        let out = self
            .cli()
            .args(args)
            .output()
            .expect("podman (Debian's; `cargo xtask setup` installs it)");
        assert!(
            out.status.success(),
            "podman {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        if let Some(mut service) = self.service.take() {
            // SAFETY: a signal to the service this test started.
            unsafe { libc::kill(service.id() as i32, libc::SIGTERM) };
            let _ = service.wait();
        }
        let _ = self
            .cli()
            .args(["rm", "--all", "--force", "--time", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
        // The cgroupfs manager's parent in every hierarchy (v1 and v2), and conmon's own below.
        for hierarchy in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let parent = hierarchy.path().join("libpod_parent");
            let _ = std::fs::remove_dir(parent.join("conmon"));
            let _ = std::fs::remove_dir(parent);
        }
    }
}
