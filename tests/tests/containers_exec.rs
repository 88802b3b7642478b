//! `docker exec` from a job, and what a job cannot make its own: a real Docker engine (Debian's
//! `docker.io`, started by each test with its own roots and socket, see
//! `integration_tests::docker`), GitHub-style jobs of the real agent. A job's exec into its own
//! container or into one that is nobody's runs the job's command; the host's own exec, and one
//! a job tries to claim through a socket that is not a runtime's, stay nobody's.

use std::time::Duration;

use integration_tests::{
    TestEnv,
    docker::{Docker, IMAGE, assert_container, docker_run, read_three_kinds},
    live::{agent, assert_no_secret, assert_nothing_of, github_job, run_id, wait_alert},
};

#[test]
fn docker_exec_into_a_job_container_is_the_job() {
    let agent = agent();
    let docker = Docker::start("exec");
    let env = TestEnv::new("containers-exec");
    let run = run_id(3);
    let name = format!("rm-exec-{run}");
    // The container itself only sleeps; what reads is the program `docker exec` runs in it.
    let step = format!(
        "{run_detached} > /dev/null\n{cli} exec {name} {read} > /dev/null\n\
         {cli} rm -f {name} > /dev/null",
        run_detached = docker_run(
            &docker,
            &env,
            "/h",
            &format!("-d --name {name} {IMAGE} sleep 30")
        ),
        cli = docker.shell_cli(),
        read = read_three_kinds("/h"),
    );
    github_job(&env, agent, &run, "acme/exec", &step);
    let id = format!("{run}/build");
    let harvest = wait_alert(agent, "credential-harvesting", &id, |_| true);
    assert_eq!(harvest["process"]["comm"], "cat", "{harvest}");
    assert_container(&harvest, Some(&name));
    // The job's own container, not one it only ran a command in.
    assert!(harvest["container"]["exec_only"].is_null(), "{harvest}");
    assert_no_secret(agent);
}

/// A job cannot mark a container for itself by writing an exec request on a unix socket that is
/// not a container runtime's API (`unix_peer.rs`): one it serves itself (named `docker.sock`),
/// one whose listener handed it to a child and exited, one a process outside jobs serves
/// under another name (journald's, the bus), and that last one again on the descriptor number
/// of a connection to the real daemon it has just closed (the kernel remembers the job's
/// runtime connections by process and number). Were the request read, the host's own exec into
/// that container (a health check) would join the job.
#[test]
fn a_jobs_request_on_a_socket_not_a_runtimes_marks_nothing() {
    let agent = agent();
    let env = TestEnv::new("containers-own-socket");
    let docker = Docker::start("ownsock");
    let run = run_id(12);
    let home = env.home.display().to_string();
    let service = format!("rm-svc-own-{run}");
    let id = docker.run(&[
        "run",
        "-d",
        "--network",
        "none",
        "--name",
        &service,
        "-v",
        &format!("{home}:/h-own"),
        IMAGE,
        "sleep",
        "120",
    ]);
    let id = id.trim();
    // Served outside jobs, not named as a runtime's socket.
    let outside = env.dir.join("outside/journal.sock");
    std::fs::create_dir_all(outside.parent().unwrap()).unwrap();
    let listener = std::os::unix::net::UnixListener::bind(&outside).unwrap();
    listener.set_nonblocking(true).unwrap();
    // The job writes the exec request for the host's container every 50 ms on the socket of
    // `phase`, until the host's exec of that phase is done.
    let script = env.dir.join("own-socket.py");
    std::fs::write(
        &script,
        format!(
            r#"
import os, socket, sys, time
phase = sys.argv[1]
path = "{dir}/" + phase + "/docker.sock"
server = None
if phase in ("outside", "reused"):
    path = "{outside}"
else:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(64)
    # The listener hands the socket to a child and exits.
    if phase == "handed" and os.fork() > 0:
        os._exit(0)
request = b"POST /v1.41/containers/{id}/exec HTTP/1.1\r\nHost: docker\r\nContent-Length: 0\r\n\r\n"
deadline = time.time() + 30
while not os.path.exists("{dir}/done-" + phase) and time.time() < deadline:
    number = None
    if phase == "reused":
        daemon = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        daemon.connect("{daemon}")
        number = daemon.fileno()
        daemon.close()
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    assert number is None or client.fileno() == number
    try:
        client.connect(path)
    except ConnectionRefusedError:
        # The test's listener is between phases: its backlog is full until it accepts again.
        client.close()
        time.sleep(0.05)
        continue
    client.sendall(request)
    if server:
        server.accept()[0].close()
    client.close()
    open("{dir}/marking-" + phase, "a").close()
    time.sleep(0.05)
"#,
            dir = env.dir.display(),
            outside = outside.display(),
            daemon = docker.socket.display(),
        ),
    )
    .unwrap();
    let phases = ["own", "handed", "outside", "reused"];
    let mut exec = docker.cli();
    exec.args([
        "exec",
        &service,
        "sh",
        "-c",
        &format!("{} > /dev/null", read_three_kinds("/h-own")),
    ]);
    let host = std::thread::spawn({
        let dir = env.dir.clone();
        move || {
            let mut outs = Vec::new();
            for phase in phases {
                let marking = dir.join(format!("marking-{phase}"));
                integration_tests::live::wait_until("the job's requests", 30, || {
                    // The outside socket's connections are taken and dropped here.
                    while listener.accept().is_ok() {}
                    marking.exists()
                });
                outs.push(integration_tests::output_of(&mut exec));
                std::fs::write(dir.join(format!("done-{phase}")), "").unwrap();
            }
            outs
        }
    });
    // After the requests, the job reads credentials of its own: once that is raised, what the
    // host's execs became (before it) has been judged too.
    let mut step = String::new();
    for phase in phases {
        step += &format!(
            "python3 {script} {phase}\nwhile [ ! -e {done} ]; do sleep 0.1; done\n",
            script = script.display(),
            done = env.dir.join(format!("done-{phase}")).display(),
        );
    }
    step += &format!("{} > /dev/null", read_three_kinds(&home));
    github_job(&env, agent, &run, "acme/own-socket", &step);
    for out in host.join().unwrap() {
        assert!(out.status.success(), "the host's exec: {out:?}");
    }
    let harvest = wait_alert(
        agent,
        "credential-harvesting",
        &format!("{run}/build"),
        |_| true,
    );
    assert!(harvest["container"].is_null(), "{harvest}");
    std::thread::sleep(Duration::from_millis(500));
    assert_nothing_of(agent, "/h-own", "the host's own exec");
    assert_no_secret(agent);
}

/// A job's `docker exec` into containers that are not its own (a host service's): by name into
/// one that ran before the agent started, detached and by the full id into one started after.
/// Each command is the job's, named by its container; the containers themselves, and an exec
/// into them from outside the job, are not.
#[test]
fn a_jobs_docker_exec_into_a_container_outside_jobs_is_the_job() {
    let env = TestEnv::new("containers-exec-outside");
    let docker = Docker::start("execout");
    let home = env.home.display().to_string();
    let service = |name: &str| {
        let id = docker.run(&[
            "run",
            "-d",
            "--network",
            "none",
            "--name",
            name,
            "-v",
            &format!("{home}:/h-svc"),
            "-v",
            &format!("{home}:/h-host"),
            IMAGE,
            "sleep",
            "120",
        ]);
        id.trim().to_owned()
    };
    let run = run_id(11);
    let before = format!("rm-svc-before-{run}");
    service(&before);
    let dir = env.dir.join("agent");
    let port = integration_tests::live::free_port();
    let agent = integration_tests::live::Agent::launch(&dir, port, &[]);
    let after = format!("rm-svc-after-{run}");
    let after_id = service(&after);
    // The host's own exec into the same container: nothing.
    docker.run(&[
        "exec",
        &before,
        "sh",
        "-c",
        &format!("{} > /dev/null", read_three_kinds("/h-host")),
    ]);
    let step = format!(
        "{cli} exec {before} {read} > /dev/null\n\
         {cli} exec -d {after_id} sh -c 'sleep 3; cat /h-svc/.aws/credentials > /dev/null; sleep 20'",
        cli = docker.shell_cli(),
        read = read_three_kinds("/h-svc"),
    );
    github_job(&env, &agent, &run, "acme/exec-outside", &step);
    let id = format!("{run}/build");
    let harvest = wait_alert(&agent, "credential-harvesting", &id, |_| true);
    assert_eq!(
        harvest["job"]["repository"], "acme/exec-outside",
        "{harvest}"
    );
    assert_eq!(harvest["process"]["comm"], "cat", "{harvest}");
    assert_container(&harvest, Some(&before));
    assert_eq!(harvest["container"]["exec_only"], true, "{harvest}");
    // The detached command reads after the job ended: judged as after the end.
    let late = wait_alert(&agent, "credential-after-job-end", &id, |_| true);
    assert_eq!(late["credential"]["kind"], "aws", "{late}");
    assert_container(&late, Some(&after));
    assert_eq!(late["container"]["id"], after_id.as_str(), "{late}");
    assert_eq!(late["container"]["exec_only"], true, "{late}");
    std::thread::sleep(Duration::from_millis(500));
    assert_nothing_of(&agent, "/h-host", "the host's own exec");
    drop(docker);
    assert!(agent.stop().success());
    integration_tests::live::assert_no_secret_in(&dir);
}
