//! io_uring, which syscall hooks cannot see: a job process that opens and reads credentials
//! with `IORING_OP_OPENAT` + `IORING_OP_READ` only, renames or links them, or connects with
//! `IORING_OP_CONNECT` (`tests/c/uring-cat.c`, liburing; no open, read, rename, link or connect
//! syscall) is seen through the `io_uring:` tracepoints, with the real programs (root).
//!
//! Needs Debian's liburing-dev and a C compiler (`cargo xtask setup` installs liburing-dev).

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use integration_tests::{
    CANARY, TestEnv, assert_no_canary, harness,
    live::{agent, agent_log, assert_no_secret, github_job, repo_root, run_id, wait_alert},
};
use runner_monitor::event::{Connect, Event, EventDetail, FileAccess, JobKey, SocketFamily};

/// `uring-cat`, built once per test binary from `tests/c/uring-cat.c` with liburing.
fn uring_cat() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("rm-uring-cat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let binary = dir.join("uring-cat");
        let out = Command::new("cc")
            .args(["-O2", "-Wall", "-o"])
            .arg(&binary)
            .arg(repo_root().join("tests/c/uring-cat.c"))
            .arg("-luring")
            .output()
            .expect("running cc");
        assert!(
            out.status.success(),
            "building uring-cat failed (is liburing-dev installed? `cargo xtask setup` \
             installs it): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        binary
    })
}

/// A home with the credentials the tests read: the canary ones of `TestEnv` plus an SSH RSA key
/// and a kubeconfig.
fn env_with_keys(name: &str) -> TestEnv {
    let env = TestEnv::new(name);
    for (path, content) in [
        (
            ".ssh/id_rsa",
            format!("-----BEGIN RSA PRIVATE KEY-----\n{CANARY}\n"),
        ),
        (
            ".kube/config",
            format!("users:\n- user:\n    token: {CANARY}\n"),
        ),
    ] {
        let file = env.home.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, content).unwrap();
    }
    env
}

const READ: [&str; 3] = [".aws/credentials", ".ssh/id_rsa", ".kube/config"];

fn file_open(e: &Event) -> Option<&FileAccess> {
    match &e.detail {
        EventDetail::FileOpen(f) => Some(f),
        _ => None,
    }
}

fn connect(e: &Event) -> Option<&Connect> {
    match &e.detail {
        EventDetail::Connect(c) => Some(c),
        _ => None,
    }
}

/// A secret socket the policy knows (`**/.docker/run/docker.sock`) in the test's home, listening.
fn docker_socket(env: &TestEnv) -> (PathBuf, std::os::unix::net::UnixListener) {
    let dir = env.home.join(".docker/run");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("docker.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    (path, listener)
}

fn of_job(job: JobKey) -> impl Fn(&Event) -> bool {
    move |e| e.job.as_ref().is_some_and(|j| j.key == job)
}

/// Runs `uring-cat ARGS... FILES...` (files relative to the home) as a registered job and waits
/// for its io_uring opens of the credentials among them; returns the job and its events.
fn run_job(env: &TestEnv, args: &str, files: &[&str]) -> (JobKey, Vec<Event>) {
    let h = harness();
    let paths: Vec<String> = files.iter().map(|f| env.path(f)).collect();
    let job = h
        .start_job(
            env,
            &format!(
                "{} {args} {} > /dev/null",
                uring_cat().display(),
                paths.join(" ")
            ),
        )
        .wait_success();
    for (file, path) in files.iter().zip(&paths) {
        if READ.contains(file) {
            h.wait_for(&format!("io_uring open of {file}"), |e| {
                of_job(job)(e) && file_open(e).is_some_and(|f| &f.path == path)
            });
        }
    }
    (job, h.job_events(job))
}

#[test]
fn a_job_process_setting_up_io_uring_is_seen() {
    let env = TestEnv::new("uring-setup");
    let (job, _) = run_job(&env, "", &["notes/readme.txt"]);
    let h = harness();
    let setup = h.wait_for("io_uring_setup of the job", |e| {
        of_job(job)(e) && matches!(e.detail, EventDetail::IoUringSetup { .. })
    });
    assert_eq!(setup.process.comm, "uring-cat");
    let EventDetail::IoUringSetup {
        fd,
        sq_entries,
        sqpoll,
        ..
    } = setup.detail
    else {
        unreachable!()
    };
    assert!(fd >= 0, "{setup:?}");
    assert_eq!(sq_entries, 8, "liburing asked for 8 entries: {setup:?}");
    assert!(!sqpoll);
    // A file that is no credential does not cross the ring buffer, by io_uring either.
    assert!(
        !h.job_events(job).iter().any(|e| file_open(e).is_some()),
        "{:#?}",
        h.job_events(job)
    );
}

#[test]
fn io_uring_opens_of_credentials_are_the_jobs_file_opens() {
    let env = env_with_keys("uring-open");
    let (job, events) = run_job(&env, "", &[READ[0], "notes/readme.txt", READ[1], READ[2]]);
    let opens: Vec<(&Event, &FileAccess)> = events
        .iter()
        .filter_map(|e| file_open(e).map(|f| (e, f)))
        .collect();
    assert_eq!(
        opens.len(),
        3,
        "one event per credential, none for the readme: {opens:#?}"
    );
    for ((e, f), file) in opens.iter().zip(READ) {
        assert_eq!(f.path, env.path(file), "{f:?}");
        assert!(f.resolved && !f.write, "{f:?}");
        // On the file-open hook set (LSM, fentry) the open is seen when it runs, as any other.
        assert!(
            f.io_uring || harness().kernel_opens(),
            "seen through io_uring, not a syscall: {f:?}"
        );
        assert_eq!(f.result, 0, "the open had not run at submission: {f:?}");
        // The hook sees the open where it runs: an io-wq worker thread of the same process.
        let worker = harness().kernel_opens() && e.process.comm.starts_with("iou-wrk-");
        assert!(e.process.comm == "uring-cat" || worker, "{e:?}");
        assert!(!e.job.as_ref().unwrap().ended);
    }
    assert_no_canary(&harness().job_events(job));
}

/// With `IORING_SETUP_SQPOLL` the process makes no syscall for its requests: the ring's polling
/// thread submits them. That thread belongs to the process that set the ring up, so the opens
/// are that process's, in its job.
#[test]
fn sqpoll_opens_are_the_ring_creators() {
    let env = env_with_keys("uring-sqpoll");
    let (_, events) = run_job(&env, "--sqpoll", &[READ[0]]);
    let setup = events
        .iter()
        .find(|e| matches!(e.detail, EventDetail::IoUringSetup { sqpoll: true, .. }))
        .unwrap_or_else(|| panic!("an SQPOLL io_uring_setup: {events:#?}"));
    let (open, f) = events
        .iter()
        .find_map(|e| file_open(e).map(|f| (e, f)))
        .unwrap();
    assert!(
        (f.io_uring || harness().kernel_opens()) && f.path == env.path(READ[0]),
        "{f:?}"
    );
    assert_eq!(open.process.pid, setup.process.pid, "{open:?}");
    assert_ne!(
        open.process.tid, open.process.pid,
        "the polling thread: {open:?}"
    );
    // On the file-open hook set the open runs (and is seen) in an io-wq worker of the process.
    let worker = harness().kernel_opens() && open.process.comm.starts_with("iou-wrk-");
    assert!(
        open.process.comm.starts_with("iou-sqp") || worker,
        "{open:?}"
    );
}

#[test]
fn io_uring_connects_are_the_jobs_connects() {
    let env = TestEnv::new("uring-connect");
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tcp.local_addr().unwrap().port();
    let (sock, _listener) = docker_socket(&env);
    let h = harness();
    let job = h
        .start_job(
            &env,
            &format!(
                "{} tcp:127.0.0.1:{port} unix:{} > /dev/null",
                uring_cat().display(),
                sock.display()
            ),
        )
        .wait_success();
    h.wait_for("io_uring connect to the docker socket", |e| {
        of_job(job)(e) && connect(e).is_some_and(|c| c.family == SocketFamily::Unix)
    });
    let events = h.job_events(job);
    let connects: Vec<&Connect> = events.iter().filter_map(connect).collect();
    assert_eq!(connects.len(), 2, "{connects:#?}");
    let (inet, unix) = (connects[0], connects[1]);
    assert!(inet.io_uring && unix.io_uring, "{connects:#?}");
    assert_eq!(inet.family, SocketFamily::Inet);
    assert_eq!(inet.ip, Some("127.0.0.1".parse().unwrap()));
    assert_eq!(inet.port, Some(port));
    assert!(inet.fd >= 0 && inet.result == 0, "{inet:?}");
    assert_eq!(unix.unix_path.as_deref(), Some(sock.to_str().unwrap()));
}

#[test]
fn io_uring_renames_and_links_of_credentials_are_the_jobs_file_events() {
    let env = TestEnv::new("uring-paths");
    let (staged, docker) = (env.path("notes/staged"), env.path(".docker/config.json"));
    let (aws, git) = (env.path(".aws/credentials"), env.path(".git-credentials"));
    let (hard, soft) = (env.path("notes/hard"), env.path("notes/soft"));
    let h = harness();
    let job = h
        .start_job(
            &env,
            &format!(
                "echo '{{}}' > {staged} && {} rename:{staged}:{docker} link:{aws}:{hard} \
                 symlink:{git}:{soft} > /dev/null",
                uring_cat().display()
            ),
        )
        .wait_success();
    h.wait_for("io_uring symlink to the git credentials", |e| {
        of_job(job)(e) && matches!(&e.detail, EventDetail::FileLink(f) if f.path == git)
    });
    let events = h.job_events(job);
    let file_events: Vec<(&str, &FileAccess)> = events
        .iter()
        .filter_map(|e| match &e.detail {
            EventDetail::FileRename(f) => Some(("rename", f)),
            EventDetail::FileLink(f) => Some(("link", f)),
            EventDetail::FileOpen(f) => Some(("open", f)),
            _ => None,
        })
        .collect();
    assert_eq!(file_events.len(), 3, "{file_events:#?}");
    let [(k0, rename), (k1, link), (k2, symlink)] = file_events[..] else {
        unreachable!()
    };
    assert_eq!((k0, k1, k2), ("rename", "link", "link"));
    assert!(
        rename.io_uring && link.io_uring && symlink.io_uring,
        "{file_events:#?}"
    );
    assert_eq!(rename.path, staged);
    assert_eq!(rename.new_path.as_deref(), Some(docker.as_str()));
    assert!(rename.matched.iter().any(|m| m == "new_path"), "{rename:?}");
    assert_eq!(
        (link.path.as_str(), link.new_path.as_deref()),
        (aws.as_str(), Some(hard.as_str()))
    );
    assert_eq!(link.flags & (1 << 31), 0, "a hard link: {link:?}");
    assert_eq!(symlink.new_path.as_deref(), Some(soft.as_str()));
    assert_ne!(symlink.flags & (1 << 31), 0, "LINK_SYMBOLIC: {symlink:?}");
}

/// The case: a survivor of a GitHub job reads three credentials through io_uring only,
/// after its job ended. Each read raises `credential-after-job-end`.
#[test]
fn github_survivor_reading_credentials_through_io_uring_is_caught() {
    let agent = agent();
    let env = env_with_keys("uring-survivor");
    let run = run_id(1);
    let files: Vec<String> = READ.iter().map(|f| format!("\"$HOME/{f}\"")).collect();
    github_job(
        &env,
        agent,
        &run,
        "acme/app",
        &format!(
            "(setsid sh -c 'sleep 1; {} {} > /dev/null; sleep 4' &)",
            uring_cat().display(),
            files.join(" ")
        ),
    );
    let id = format!("{run}/build");
    for (file, kind) in READ.iter().zip(["aws", "ssh", "kubernetes"]) {
        let path = env.path(file);
        let after = wait_alert(agent, "credential-after-job-end", &id, |a| {
            a["credential"]["path"] == path.as_str()
        });
        assert_eq!(after["severity"], "critical");
        assert_eq!(after["credential"]["kind"], kind, "{after}");
        assert_eq!(after["process"]["comm"], "uring-cat", "{after}");
    }
    // They came through io_uring: the trace has the opens, flagged so (on the tracepoint set; the
    // file-open hook set sees them when they run, as any open).
    let trace = std::fs::read_to_string(agent.dir.join("events.jsonl")).unwrap_or_default();
    let tracepoint_set = agent_log(&agent.dir).contains("file opens hooks=tracepoints");
    for file in READ.iter().filter(|_| tracepoint_set) {
        let path = env.path(file);
        assert!(
            trace
                .lines()
                .any(|l| l.contains("\"io_uring\":true")
                    && l.contains(&format!("\"path\":\"{path}\""))),
            "no io_uring open of {path} in the trace; log: {}",
            agent_log(&agent.dir)
        );
    }
    assert_no_secret(agent);
}

/// A survivor that reaches the Docker socket through io_uring after its job ended.
#[test]
fn github_survivor_using_the_docker_socket_through_io_uring_is_caught() {
    let agent = agent();
    let env = TestEnv::new("uring-survivor-socket");
    let (sock, _listener) = docker_socket(&env);
    let run = run_id(2);
    github_job(
        &env,
        agent,
        &run,
        "acme/app",
        &format!(
            "(setsid sh -c 'sleep 1; {} unix:{} > /dev/null; sleep 4' &)",
            uring_cat().display(),
            sock.display()
        ),
    );
    let id = format!("{run}/build");
    let after = wait_alert(agent, "credential-after-job-end", &id, |a| {
        a["socket"]["kind"] == "docker"
    });
    assert_eq!(after["socket"]["path"], sock.to_str().unwrap(), "{after}");
    assert_eq!(after["process"]["comm"], "uring-cat", "{after}");
    assert_no_secret(agent);
}

/// A credential put in place by an io_uring rename during a job (no rename syscall) is still
/// there when the job ends: left behind.
#[test]
fn a_credential_renamed_into_place_through_io_uring_is_left_behind() {
    let agent = agent();
    let env = TestEnv::new("uring-left-behind");
    let (staged, docker) = (env.path("notes/staged"), env.path(".docker/config.json"));
    let run = run_id(3);
    github_job(
        &env,
        agent,
        &run,
        "acme/app",
        &format!(
            // The pause: the job-completed hook's end, which reaches the agent through its
            // control socket, can overtake kernel events still in the ring buffer on a loaded
            // host (seen: a rename 9 ms before the hook was judged after the end, and no
            // credential was left behind). Not io_uring's doing: any write just before the end.
            "echo '{{}}' > {staged} && {} rename:{staged}:{docker} > /dev/null && sleep 1",
            uring_cat().display()
        ),
    );
    let left = wait_alert(
        agent,
        "credential-left-behind",
        &format!("{run}/build"),
        |a| a["credential"]["path"] == docker.as_str(),
    );
    assert_eq!(left["credential"]["kind"], "docker", "{left}");
}

/// A container start request on an io_uring registered file (`IOSQE_FIXED_FILE`: the request
/// names index 40, which is no open fd) is read on the file the ring holds there, in the
/// table's shape of the running kernel (an array of `struct io_fixed_file` before Linux 6.13,
/// of `struct io_rsrc_node` pointers since): the container's cgroup, made afterwards, is the
/// job's. The API socket is the test's own (outside jobs, at a path named `docker.sock`), the
/// cgroup one the test makes: no daemon is needed, so this runs in the kernel matrix's guests.
#[test]
fn a_start_request_on_a_registered_file_marks_the_container_for_the_job() {
    use std::io::{Read as _, Write as _};
    let Some(v2) = runner_monitor::cgroups::cgroup2_root() else {
        eprintln!("no cgroup v2 hierarchy mounted: skipped");
        return;
    };
    let env = TestEnv::new("uring-fixed");
    let (sock, listener) = docker_socket(&env);
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut request = [0u8; 512];
        let n = conn.read(&mut request).unwrap();
        conn.write_all(b"HTTP/1.0 204 No Content\r\n\r\n").unwrap();
        String::from_utf8_lossy(&request[..n]).into_owned()
    });
    let id = format!("{:f>64}", format!("{:x}", std::process::id()));
    let h = harness();
    let job = h
        .start_job(
            &env,
            &format!(
                "\"$JOB_STEP\" uring-start {} {id} writev fixed > /dev/null",
                sock.display()
            ),
        )
        .wait_success();
    let request = server.join().unwrap();
    assert!(
        request.starts_with(&format!("POST /v1.41/containers/{id}/start ")),
        "{request}"
    );
    let parent = v2.join(format!("rm-uring-fixed-{}", std::process::id()));
    std::fs::create_dir_all(&parent).unwrap();
    let cgroup = parent.join(&id);
    std::fs::create_dir(&cgroup).unwrap();
    let found = std::panic::catch_unwind(|| {
        h.wait_for("the container's cgroup, as the job's", |e| {
            of_job(job)(e) && matches!(&e.detail, EventDetail::Container(c) if c.id == id)
        })
    });
    let _ = std::fs::remove_dir(&cgroup);
    let _ = std::fs::remove_dir(&parent);
    if let Err(panic) = found {
        std::panic::resume_unwind(panic);
    }
}
