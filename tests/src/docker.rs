//! A real Docker engine for the container tests: Debian's `docker.io` (dockerd, containerd,
//! runc), started by the test with its own data root, exec root and socket under a directory the
//! test owns, no bridge and no iptables rules, and an image built here (`docker import` of a
//! rootfs holding Debian's static busybox: nothing is pulled). Dropping it removes every
//! container, stops the daemon and removes its files.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Debian's docker CLI (another `docker` may come first on PATH).
pub const DOCKER_CLI: &str = "/usr/bin/docker";
/// The busybox image every test daemon has.
pub const IMAGE: &str = "rm-busybox:test";

pub struct Docker {
    child: Child,
    pub dir: PathBuf,
    /// The API socket: `<dir>/.docker/run/docker.sock`, a path the built-in policy lists as the
    /// Docker secret socket (rootless Docker's place for it).
    pub socket: PathBuf,
}

impl Docker {
    /// Starts dockerd with its files in a fresh directory named after `name`, and imports
    /// `IMAGE`.
    pub fn start(name: &str) -> Self {
        Self::start_at(name, "docker.sock")
    }

    /// The same, its API socket at `<dir>/.docker/run/<socket_name>`.
    pub fn start_at(name: &str, socket_name: &str) -> Self {
        Self::start_with(name, socket_name, &[])
    }

    /// The same, with more of dockerd's options (`--cgroup-parent=...`).
    pub fn start_with(name: &str, socket_name: &str, options: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("rm-docker-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let socket = dir.join(".docker/run").join(socket_name);
        std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
        let log = std::fs::File::create(dir.join("dockerd.log")).unwrap();
        let child = crate::spawn_with_parent_death(
            Command::new("dockerd")
                .arg("--data-root")
                .arg(dir.join("data"))
                .arg("--exec-root")
                .arg(dir.join("exec"))
                .arg("--pidfile")
                .arg(dir.join("dockerd.pid"))
                .arg("-H")
                .arg(format!("unix://{}", socket.display()))
                .args(["--bridge=none", "--iptables=false", "--ip6tables=false"])
                .args(options)
                .stdout(Stdio::null())
                .stderr(log),
            libc::SIGTERM,
        )
        .expect("starting dockerd (Debian's docker.io; `cargo xtask setup` installs it)");
        let docker = Self { child, dir, socket };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !docker
            .cli()
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            assert!(
                Instant::now() < deadline,
                "dockerd did not answer: {}",
                docker.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        docker.import_busybox();
        docker
    }

    /// `docker` talking to this daemon.
    pub fn cli(&self) -> Command {
        let mut command = Command::new(DOCKER_CLI);
        command
            .env("DOCKER_CONFIG", self.dir.join("cli"))
            .arg("-H")
            .arg(self.host());
        command
    }

    /// The same, as a shell command line for a job's step: the CLI's own configuration is not
    /// the job's `~/.docker/config.json` (the tests' home holds a canary there).
    pub fn shell_cli(&self) -> String {
        format!(
            "DOCKER_CONFIG={} {DOCKER_CLI} -H {}",
            self.dir.join("cli").display(),
            self.host()
        )
    }

    /// The `-H` value for this daemon.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }

    /// `docker <args>`, which must succeed; its stdout.
    pub fn run(&self, args: &[&str]) -> String {
        let out = self.cli().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "docker {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// A rootfs of Debian's static busybox (`busybox-static`), imported as `IMAGE`.
    fn import_busybox(&self) {
        let tar = busybox_rootfs(&self.dir);
        self.run(&["import", &tar.display().to_string(), IMAGE]);
    }
}

/// Python for a test script that sent a start request on its Docker socket `s`: reads what the
/// daemon answers until its 204 (or the end, or 20 s) and returns it.
pub const PY_AWAIT_START: &str = r#"
def await_start(s):
    s.settimeout(20)
    answer = b""
    while b"HTTP/1.1 204" not in answer:
        chunk = s.recv(4096)
        if not chunk:
            break
        answer += chunk
    return answer
"#;

/// A tar of a rootfs holding Debian's static busybox and a few applets, made in `dir`, for an
/// engine to import as `IMAGE`.
pub fn busybox_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for sub in ["bin", "proc", "sys", "dev", "etc", "tmp", "h"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    std::fs::copy(busybox(), root.join("bin/busybox")).unwrap();
    for applet in ["sh", "cat", "sleep", "true", "ls", "tail"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    let tar = dir.join("rootfs.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success(), "tar of the busybox rootfs failed");
    tar
}

/// `docker run` from a job step, against the test's daemon, with the job's home mounted at
/// `mount` in the container.
pub fn docker_run(docker: &Docker, env: &crate::TestEnv, mount: &str, args: &str) -> String {
    format!(
        "{cli} run --network none -v {home}:{mount} {args}",
        cli = docker.shell_cli(),
        home = env.home.display(),
    )
}

/// The three kinds of credentials of the test home, read from `mount` in a container.
pub fn read_three_kinds(mount: &str) -> String {
    format!("cat {mount}/.aws/credentials {mount}/.ssh/id_ed25519 {mount}/.docker/config.json")
}

/// The finding names the container: its id, the image the job asked for, its runtime, and its
/// name (`name` when the job gave one).
pub fn assert_container(finding: &serde_json::Value, name: Option<&str>) {
    assert_container_of(finding, "docker", name);
}

/// The same for a container of `runtime`; its image is `IMAGE`, which podman's own records
/// prefix with `localhost/`.
pub fn assert_container_of(finding: &serde_json::Value, runtime: &str, name: Option<&str>) {
    let c = &finding["container"];
    let id = c["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no container: {finding}"));
    assert!(
        id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{finding}"
    );
    assert_eq!(c["runtime"], runtime, "{finding}");
    let image = c["image"].as_str().unwrap_or_default();
    assert!(
        image == IMAGE || image == format!("localhost/{IMAGE}"),
        "{finding}"
    );
    assert!(
        c["name"].as_str().is_some_and(|n| !n.is_empty()),
        "{finding}"
    );
    if let Some(name) = name {
        assert_eq!(c["name"], name, "{finding}");
    }
}

/// A container made outside any job, from the same image as the jobs' and reading the same
/// credentials when started: its id.
pub fn create_outside_jobs(docker: &Docker, env: &crate::TestEnv, name: &str) -> String {
    docker
        .run(&[
            "create",
            "--network",
            "none",
            "--name",
            name,
            "-v",
            &format!("{}:/h", env.home.display()),
            IMAGE,
            "sh",
            "-c",
            &format!("{} > /dev/null", read_three_kinds("/h")),
        ])
        .trim()
        .to_owned()
}

/// The finding's container was matched to the job's start by `by` (`name`, `short-id`) of
/// `reference`, and the daemon confirmed it. A name was resolved by the agent at the daemon
/// before the container's cgroup was made (`resolved_us`): the match is exact, not the
/// kernel's guess.
pub fn assert_requested_as(finding: &serde_json::Value, by: &str, reference: &str) {
    let r = &finding["container"]["requested_as"];
    assert_eq!(r["by"], by, "{finding}");
    assert_eq!(r["reference"], reference, "{finding}");
    assert_eq!(r["confirmed"], true, "{finding}");
    // The window the match depends on: from the job's request to the container's cgroup, and
    // for a name the agent's answer within it.
    eprintln!(
        "start by {by}: request to cgroup {} us, to the agent's resolution {:?} us",
        r["waited_us"].as_u64().unwrap_or_default(),
        r["resolved_us"].as_u64(),
    );
    if by == "name" {
        let resolved = r["resolved_us"]
            .as_u64()
            .unwrap_or_else(|| panic!("not resolved: {finding}"));
        assert!(
            resolved <= r["waited_us"].as_u64().unwrap_or_default(),
            "{finding}"
        );
    }
}

/// A container of GitLab's docker executor, created as the runner does it (outside any job):
/// the runner's labels, the job's `CI_*` variables (a canary `CI_JOB_TOKEN`), the job's home
/// at `/builds/h`; `kind` is the label's type (`build`, `service`, `helper`). Without
/// `ci_variables` the container has the labels only (a service such as `docker:dind`).
pub fn gitlab_container(
    docker: &Docker,
    env: &crate::TestEnv,
    job_id: &str,
    kind: &str,
    name: &str,
    ci_variables: bool,
    command: &str,
) {
    let mut c = docker.cli();
    c.args(["create", "--name", name, "--network", "none", "-v"])
        .arg(format!("{}:/builds/h", env.home.display()))
        .args([
            "--label",
            &format!("com.gitlab.gitlab-runner.job.id={job_id}"),
        ])
        .args(["--label", "com.gitlab.gitlab-runner.project.id=42"])
        .args(["--label", "com.gitlab.gitlab-runner.pipeline.id=77"])
        .args(["--label", "com.gitlab.gitlab-runner.runner.id=9"])
        .args(["--label", &format!("com.gitlab.gitlab-runner.type={kind}")]);
    if ci_variables {
        c.args(["-e", "GITLAB_CI=true", "-e", "CI=true"])
            .args(["-e", &format!("CI_JOB_ID={job_id}")])
            .args(["-e", "CI_PROJECT_PATH=group/with-service"])
            .args(["-e", "CI_PIPELINE_ID=77", "-e", "CI_JOB_NAME=test"])
            .args(["-e", "CI_RUNNER_ID=9", "-e", "CI_JOB_TOKEN"])
            // The CLI reads the token from its own environment: not on any command line.
            .env("CI_JOB_TOKEN", crate::CANARY);
    }
    c.args([IMAGE, "sh", "-c", command]);
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The build container of GitLab job `job_id` as the runner makes it, straight over the Docker
/// API with no CLI in between: `POST /containers/create` with the runner's labels and the job's
/// `CI_*` variables (the canary `CI_JOB_TOKEN` in the body, read from a file: on no command
/// line), then at once `POST /containers/<id>/start`, then `wait`. The container's id.
pub fn api_gitlab_build(
    docker: &Docker,
    env: &crate::TestEnv,
    job_id: &str,
    name: &str,
    command: &str,
) -> String {
    let body = serde_json::json!({
        "Image": IMAGE,
        "Cmd": ["sh", "-c", command],
        "Env": [
            "GITLAB_CI=true", "CI=true", format!("CI_JOB_ID={job_id}"),
            "CI_PROJECT_PATH=group/with-service", "CI_PIPELINE_ID=77", "CI_JOB_NAME=test",
            "CI_RUNNER_ID=9", format!("CI_JOB_TOKEN={}", crate::CANARY),
        ],
        "Labels": {
            "com.gitlab.gitlab-runner.job.id": job_id,
            "com.gitlab.gitlab-runner.project.id": "42",
            "com.gitlab.gitlab-runner.pipeline.id": "77",
            "com.gitlab.gitlab-runner.runner.id": "9",
            "com.gitlab.gitlab-runner.type": "build",
        },
        "HostConfig": {
            "NetworkMode": "none",
            "Binds": [format!("{}:/builds/h", env.home.display())],
        },
    });
    let file = docker.dir.join(format!("create-{name}.json"));
    std::fs::write(&file, body.to_string()).unwrap();
    let api = format!(
        "curl -s --unix-socket {} http://docker",
        docker.socket.display()
    );
    let script = format!(
        "id=$({api}/containers/create?name={name} -H 'Content-Type: application/json' \
         --data-binary @{file} | sed -n 's/.*\"Id\":\"\\([0-9a-f]*\\)\".*/\\1/p')\n\
         {api}/containers/$id/start -X POST -o /dev/null -w '%{{http_code}}' >&2\n\
         {api}/containers/$id/wait -X POST > /dev/null\n\
         echo $id",
        file = file.display(),
    );
    let out = Command::new("sh").arg("-c").arg(&script).output().unwrap();
    let _ = std::fs::remove_file(&file);
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        id.len() == 64 && String::from_utf8_lossy(&out.stderr) == "204",
        "create and start over the API: {id:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    id
}

/// Debian's static busybox (the dynamic one would need its libraries in the image).
fn busybox() -> &'static Path {
    let path = Path::new("/bin/busybox");
    let out = Command::new("file").arg("-L").arg(path).output();
    if let Ok(out) = out {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            !text.contains("dynamically linked"),
            "/bin/busybox is not static: install Debian's busybox-static (`cargo xtask setup`)"
        );
    }
    path
}

impl Drop for Docker {
    fn drop(&mut self) {
        if let Ok(out) = self.cli().args(["ps", "-aq"]).output() {
            let ids = String::from_utf8_lossy(&out.stdout).to_string();
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let _ = self.cli().args(["rm", "-f"]).args(&ids).output();
            }
        }
        crate::terminate(&mut self.child, Duration::from_secs(20));
        // Whatever the daemon left mounted under its roots goes before its files.
        let _ = Command::new("umount")
            .args(["-R", "-l"])
            .arg(self.dir.join("exec"))
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("umount")
            .args(["-R", "-l"])
            .arg(self.dir.join("data"))
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
