//! Podman's containers of a job are the job's: podman is daemonless, so the job's `podman run`
//! forks conmon, which forks runc, which forks the container's init: every process of the
//! container descends from the job and inherits it at fork, in the kernel, like any child. The
//! container's cgroup, made by that runc (a job process), is the job's too: a `podman exec`
//! into it from outside any job is the job's. Real podman (Debian's, with runc, its own roots
//! per test: `integration_tests::podman`) from GitHub-style jobs of the real agent. Podman's
//! Docker-compatible API socket (`podman system service`) is a Docker socket like any other:
//! the job's connect is `secret-socket-access`, its start request by id links the container.

use integration_tests::{
    TestEnv,
    docker::{DOCKER_CLI, IMAGE, assert_container_of, read_three_kinds},
    live::{agent, assert_no_secret, github_job, run_id, wait_alert},
    podman::Podman,
};

#[test]
fn a_podman_container_of_a_job_is_the_job() {
    let agent = agent();
    let podman = Podman::new("short");
    let env = TestEnv::new("podman-short");
    let run = run_id(1);
    let step = format!(
        "{cli} run --rm --network none -v {home}:/h {IMAGE} {read} > /dev/null",
        cli = podman.shell_cli(),
        home = env.home.display(),
        read = read_three_kinds("/h"),
    );
    github_job(&env, agent, &run, "acme/podman", &step);
    let id = format!("{run}/build");
    let harvest = wait_alert(agent, "credential-harvesting", &id, |_| true);
    assert_eq!(harvest["job"]["repository"], "acme/podman", "{harvest}");
    assert_eq!(harvest["process"]["comm"], "cat", "{harvest}");
    assert_container_of(&harvest, "podman", None);
    assert_no_secret(agent);
}

#[test]
fn a_detached_podman_container_outlives_its_job_and_is_judged_after_the_end() {
    let agent = agent();
    let podman = Podman::new("detached");
    let env = TestEnv::new("podman-detached");
    let run = run_id(2);
    let step = format!(
        "{cli} run -d --name rm-detached --network none -v {home}:/h {IMAGE} sh -c \
         'sleep 3; cat /h/.aws/credentials > /dev/null; sleep 30' > /dev/null",
        cli = podman.shell_cli(),
        home = env.home.display(),
    );
    github_job(&env, agent, &run, "acme/podman-detached", &step);
    let id = format!("{run}/build");
    let after = wait_alert(agent, "credential-after-job-end", &id, |_| true);
    assert_eq!(after["credential"]["kind"], "aws", "{after}");
    assert_eq!(
        after["credential"]["path"],
        env.home.join(".aws/credentials").to_str().unwrap(),
        "{after}"
    );
    assert_container_of(&after, "podman", Some("rm-detached"));
    // The container's processes survive the job (conmon too, outside the container).
    wait_alert(agent, "process-survived-job", &id, |a| {
        a["container"]["id"] == after["container"]["id"]
    });
    // From outside any job, into the job's container: the exec'd program is the job's.
    podman.run(&["exec", "rm-detached", "cat", "/h/.ssh/id_ed25519"]);
    let exec = wait_alert(agent, "credential-after-job-end", &id, |a| {
        a["credential"]["kind"] == "ssh"
    });
    assert_eq!(exec["container"]["id"], after["container"]["id"], "{exec}");
    assert_no_secret(agent);
}

/// The docker CLI of a job against podman's Docker-compatible API: the container podman's service
/// (outside any job) creates is the job's by the start request, as with dockerd, and is named
/// through that API.
#[test]
fn a_container_a_job_starts_through_podmans_docker_api_is_the_job() {
    let agent = agent();
    let mut podman = Podman::new("service");
    let socket = podman.serve();
    let env = TestEnv::new("podman-service");
    let run = run_id(3);
    let step = format!(
        "DOCKER_CONFIG={cli_config} {DOCKER_CLI} -H unix://{socket} run --rm --name rm-api-{run} \
         --network none -v {home}:/h {IMAGE} {read} > /dev/null",
        cli_config = podman.dir.join("cli").display(),
        socket = socket.display(),
        home = env.home.display(),
        read = read_three_kinds("/h"),
    );
    github_job(&env, agent, &run, "acme/podman-api", &step);
    let id = format!("{run}/build");
    let harvest = wait_alert(agent, "credential-harvesting", &id, |_| true);
    assert_container_of(&harvest, "podman", Some(&format!("rm-api-{run}")));
    let access = wait_alert(agent, "secret-socket-access", &id, |_| true);
    assert_eq!(access["socket"]["kind"], "docker", "{access}");
    assert_no_secret(agent);
}

/// A job's `docker exec`, through podman's Docker API, into a container podman started outside
/// any job: the command is the job's and named (`exec_only`), as with Docker's daemon.
#[test]
fn a_jobs_docker_exec_through_podmans_api_into_a_container_outside_jobs_is_the_job() {
    let agent = agent();
    let mut podman = Podman::new("execout");
    let env = TestEnv::new("podman-exec-outside");
    let run = run_id(4);
    let name = format!("rm-psvc-{run}");
    podman.run(&[
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        "none",
        "-v",
        &format!("{}:/h", env.home.display()),
        IMAGE,
        "sleep",
        "60",
    ]);
    let socket = podman.serve();
    let step = format!(
        "DOCKER_CONFIG={cli_config} {DOCKER_CLI} -H unix://{socket} exec {name} {read} > /dev/null",
        cli_config = podman.dir.join("cli").display(),
        socket = socket.display(),
        read = read_three_kinds("/h"),
    );
    github_job(&env, agent, &run, "acme/podman-exec", &step);
    let id = format!("{run}/build");
    let harvest = wait_alert(agent, "credential-harvesting", &id, |_| true);
    assert_eq!(harvest["process"]["comm"], "cat", "{harvest}");
    assert_container_of(&harvest, "podman", Some(&name));
    assert_eq!(harvest["container"]["exec_only"], true, "{harvest}");
    assert_no_secret(agent);
}

/// Podman's systemd cgroup manager makes a scope for the container's monitor before the
/// container's own, both named by the id: `libpod-conmon-<id>.scope`, then `libpod-<id>.scope`.
/// The monitor's is not the container. This host runs no systemd, so the test makes the two
/// cgroups itself, in that order, after a job's start request for the id on a socket the test
/// serves (outside jobs, as a daemon's is).
#[test]
fn podmans_monitor_scope_is_not_the_container() {
    use std::io::{Read, Write};
    let agent = agent();
    let env = TestEnv::new("podman-conmon-scope");
    let run = run_id(5);
    let id = format!("{:0>64}", format!("c0e{run}"));
    // A runtime's socket: named as podman's, served outside jobs.
    let socket = env.dir.join("api/podman.sock");
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = [0u8; 1024];
        let n = stream.read(&mut request).unwrap();
        stream
            .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
            .unwrap();
        String::from_utf8_lossy(&request[..n]).into_owned()
    });
    let step = format!(
        "curl -sf --unix-socket {} -X POST http://podman/v1.41/containers/{id}/start",
        socket.display()
    );
    github_job(&env, agent, &run, "acme/conmon", &step);
    assert!(server.join().unwrap().contains(&id));
    let parent = runner_monitor::sensor::attach::cgroup2_root()
        .expect("a cgroup v2 hierarchy")
        .join(format!("rm-test-{run}"));
    let monitor = parent.join(format!("libpod-conmon-{id}.scope"));
    let container = parent.join(format!("libpod-{id}.scope"));
    for dir in [&parent, &monitor, &container] {
        std::fs::create_dir(dir).unwrap();
    }
    let events = agent.dir.join("events.jsonl");
    let read = || std::fs::read_to_string(&events).unwrap_or_default();
    integration_tests::live::wait_until("the container's event", 20, || {
        read().contains(&format!("libpod-{id}.scope"))
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let trace = read();
    for dir in [&container, &monitor, &parent] {
        std::fs::remove_dir(dir).unwrap();
    }
    assert!(
        !trace.contains(&format!("libpod-conmon-{id}")),
        "the monitor's scope was taken for the container"
    );
    let event = trace
        .lines()
        .find(|l| l.contains(&format!("libpod-{id}.scope")))
        .unwrap();
    let event: serde_json::Value = serde_json::from_str(event).unwrap();
    assert_eq!(event["kind"], "container", "{event}");
    assert!(event["job"]["key"].is_u64(), "{event}");
    assert_eq!(event["runtime"], "podman", "{event}");
}
