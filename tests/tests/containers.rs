//! Containers a job starts are the job, from their first instruction: a real Docker engine
//! (Debian's `docker.io`, started by each test with its own roots and socket, see
//! `integration_tests::docker`), driven by the docker CLI from GitHub-style jobs of the real
//! agent. The agent's alert stream must name the job for what the containers did, containers
//! started outside jobs must produce nothing, and no output may hold a secret.

use std::time::Duration;

use integration_tests::{
    TestEnv,
    docker::{Docker, IMAGE, assert_container, docker_run, read_three_kinds},
    live::{agent, alerts, assert_no_secret, github_job, run_id, wait_alert},
};

#[test]
fn a_short_container_of_a_job_is_seen_from_its_first_instruction() {
    let agent = agent();
    let docker = Docker::start("short");
    let env = TestEnv::new("containers-short");
    let run = run_id(1);
    // `cat` is the container's entrypoint: its opens are its first actions, a few ms after the
    // start request.
    let step = docker_run(
        &docker,
        &env,
        "/h",
        &format!("--rm {IMAGE} {} > /dev/null", read_three_kinds("/h")),
    );
    github_job(&env, agent, &run, "acme/containers", &step);
    let id = format!("{run}/build");
    let harvest = wait_alert(agent, "credential-harvesting", &id, |_| true);
    assert_eq!(harvest["job"]["repository"], "acme/containers", "{harvest}");
    assert_eq!(harvest["process"]["comm"], "cat", "{harvest}");
    assert_container(&harvest, None);
    // The job's connect to the Docker socket is reported as before.
    let socket = wait_alert(agent, "secret-socket-access", &id, |_| true);
    assert_eq!(socket["socket"]["kind"], "docker", "{socket}");
    assert_no_secret(agent);
}

#[test]
fn a_detached_container_of_a_job_outlives_it_and_reads_a_credential_after_the_end() {
    let agent = agent();
    let docker = Docker::start("detached");
    let env = TestEnv::new("containers-detached");
    let run = run_id(2);
    let step = docker_run(
        &docker,
        &env,
        "/h",
        &format!(
            "-d {IMAGE} sh -c 'sleep 3; cat /h/.aws/credentials > /dev/null; sleep 30' > /dev/null"
        ),
    );
    github_job(&env, agent, &run, "acme/detached", &step);
    let id = format!("{run}/build");
    let after = wait_alert(agent, "credential-after-job-end", &id, |_| true);
    assert_eq!(after["credential"]["kind"], "aws", "{after}");
    // The file's path on the host, and the one the container used (`-v $HOME:/h`).
    let host = env.home.join(".aws/credentials");
    assert_eq!(
        after["credential"]["path"],
        host.to_str().unwrap(),
        "{after}"
    );
    assert_eq!(
        after["credential"]["used_path"], "/h/.aws/credentials",
        "{after}"
    );
    assert_eq!(after["job"]["repository"], "acme/detached", "{after}");
    // busybox's `sh` runs its `cat` applet as `/proc/self/exe`.
    assert_eq!(
        after["process"]["cmdline"], "cat /h/.aws/credentials",
        "{after}"
    );
    assert_container(&after, None);
    let survivor = wait_alert(agent, "process-survived-job", &id, |_| true);
    assert_eq!(survivor["job"]["repository"], "acme/detached", "{survivor}");
    assert_container(&survivor, None);
    assert_eq!(survivor["container"]["id"], after["container"]["id"]);
    assert_no_secret(agent);
}

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

#[test]
fn a_container_started_outside_any_job_produces_nothing() {
    let agent = agent();
    let docker = Docker::start("outside");
    let env = TestEnv::new("containers-outside");
    // The host's own service starts a container that reads the same credentials: nothing.
    let home = env.home.display().to_string();
    docker.run(&[
        "run",
        "--rm",
        "--network",
        "none",
        "-v",
        &format!("{home}:/h-outside"),
        IMAGE,
        "sh",
        "-c",
        &format!("{} > /dev/null", read_three_kinds("/h-outside")),
    ]);
    // The control: the same container started by a job is seen. Its alert comes after
    // everything the outside container could have caused (one ring buffer, read in order).
    let run = run_id(4);
    let step = docker_run(
        &docker,
        &env,
        "/h-job",
        &format!("--rm {IMAGE} {} > /dev/null", read_three_kinds("/h-job")),
    );
    github_job(&env, agent, &run, "acme/control", &step);
    wait_alert(
        agent,
        "credential-harvesting",
        &format!("{run}/build"),
        |_| true,
    );
    std::thread::sleep(Duration::from_millis(500));
    let outside: Vec<_> = alerts(agent)
        .into_iter()
        .filter(|a| a.to_string().contains("/h-outside"))
        .collect();
    assert!(
        outside.is_empty(),
        "alerts for a container outside jobs: {outside:#?}"
    );
    let events = std::fs::read_to_string(agent.dir.join("events.jsonl")).unwrap_or_default();
    assert!(
        !events.contains("/h-outside"),
        "the event trace holds a container outside jobs"
    );
    assert!(
        events.contains("/h-job"),
        "the control job's container left no event"
    );
    assert_no_secret(agent);
}

/// A job's `--pid=host` container reads the environment of a host process (one holding a
/// secret, as the runner's worker does).
#[test]
fn a_host_pid_container_of_a_job_reading_a_host_process_environment() {
    let agent = agent();
    let docker = Docker::start("pidhost");
    let env = TestEnv::new("containers-pidhost");
    let mut victim = std::process::Command::new("sleep")
        .arg("60")
        .env("RUNNER_SECRET", integration_tests::CANARY)
        .spawn()
        .unwrap();
    let run = run_id(5);
    let step = format!(
        "{cli} run --rm --network none --pid=host --cap-add SYS_PTRACE {IMAGE} \
         cat /proc/{pid}/environ > /dev/null",
        cli = docker.shell_cli(),
        pid = victim.id(),
    );
    github_job(&env, agent, &run, "acme/pidhost", &step);
    let _ = victim.kill();
    let _ = victim.wait();
    let id = format!("{run}/build");
    let access = wait_alert(agent, "process-memory-access", &id, |_| true);
    assert_eq!(access["process"]["comm"], "cat", "{access}");
    assert_no_secret(agent);
}

/// GitLab Runner's docker executor, as the runner does it: a process outside any job creates
/// the job container with the runner's labels and the job's `CI_*` variables (a canary
/// `CI_JOB_TOKEN` among them). The kernel's environment scan makes the container's entrypoint a
/// job root at its exec, named from those variables.
#[test]
fn a_gitlab_docker_executor_job_container_is_a_job_named_from_its_environment() {
    let agent = agent();
    let docker = Docker::start("gitlab");
    let env = TestEnv::new("containers-gitlab");
    let job_id = run_id(6);
    let home = env.home.display().to_string();
    let mut run = docker.cli();
    run.args(["run", "--rm", "--network", "none", "-v"])
        .arg(format!("{home}:/builds/h"))
        .args([
            "--label",
            &format!("com.gitlab.gitlab-runner.job.id={job_id}"),
        ])
        .args(["--label", "com.gitlab.gitlab-runner.project.id=42"])
        .args(["--label", "com.gitlab.gitlab-runner.type=build"])
        .args(["-e", "GITLAB_CI=true", "-e", "CI=true"])
        .args(["-e", &format!("CI_JOB_ID={job_id}")])
        .args(["-e", "CI_PROJECT_PATH=group/containerised"])
        .args(["-e", "CI_PIPELINE_ID=77", "-e", "CI_JOB_NAME=test"])
        .args(["-e", "CI_RUNNER_ID=9"])
        // The CLI reads the token from its own environment: not on any command line.
        .args(["-e", "CI_JOB_TOKEN"])
        .env("CI_JOB_TOKEN", integration_tests::CANARY)
        .args([
            IMAGE,
            "sh",
            "-c",
            &format!("{} > /dev/null", read_three_kinds("/builds/h")),
        ]);
    let out = run.output().unwrap();
    assert!(
        out.status.success(),
        "docker run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let harvest = wait_alert(agent, "credential-harvesting", &job_id, |_| true);
    assert_eq!(harvest["job"]["platform"], "gitlab", "{harvest}");
    assert_eq!(
        harvest["job"]["repository"], "group/containerised",
        "{harvest}"
    );
    assert_no_secret(agent);
}

/// The Docker API straight from a job process (curl, which sends with `sendto`, where the docker
/// CLI writes with `write`): create, start by id, wait.
#[test]
fn a_container_a_job_starts_through_the_docker_api_with_curl() {
    let agent = agent();
    let docker = Docker::start("curl");
    let env = TestEnv::new("containers-curl");
    let run = run_id(7);
    let body = format!(
        r#"{{"Image":"{IMAGE}","Cmd":["sh","-c","{read} > /dev/null"],"HostConfig":{{"Binds":["{home}:/h"],"NetworkMode":"none"}}}}"#,
        read = read_three_kinds("/h"),
        home = env.home.display(),
    );
    let api = format!(
        "curl -sf --unix-socket {socket}",
        socket = docker.socket.display()
    );
    let step = format!(
        "id=$({api} -H 'Content-Type: application/json' -d '{body}' \
         http://docker/v1.41/containers/create?name=rm-curl-{run} | sed 's/.*\"Id\":\"\\([0-9a-f]*\\)\".*/\\1/')\n\
         {api} -X POST http://docker/v1.41/containers/$id/start\n\
         {api} -X POST http://docker/v1.41/containers/$id/wait > /dev/null"
    );
    github_job(&env, agent, &run, "acme/api", &step);
    let id = format!("{run}/build");
    let harvest = wait_alert(agent, "credential-harvesting", &id, |_| true);
    assert_container(&harvest, Some(&format!("rm-curl-{run}")));
    assert_no_secret(agent);
}

/// Start requests sent with `writev` and `sendmsg` (Node's libuv writes a request of several
/// buffers with `writev`; other clients use `sendmsg`), each split in two buffers: the request
/// line, then the headers. Both containers are the job's.
#[test]
fn a_start_request_sent_with_writev_or_sendmsg_is_the_jobs() {
    let agent = agent();
    let docker = Docker::start("vectored");
    let env = TestEnv::new("containers-vectored");
    let run = run_id(10);
    let script = env.dir.join("start.py");
    std::fs::write(
        &script,
        r#"import os, socket, sys
path, how, cid = sys.argv[1:]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
parts = [f"POST /v1.41/containers/{cid}/start HTTP/1.1\r\n".encode(),
         b"Host: docker\r\nContent-Length: 0\r\n\r\n"]
if how == "writev":
    os.writev(s.fileno(), parts)
else:
    s.sendmsg(parts)
answer = s.recv(4096)
sys.exit(0 if answer.startswith(b"HTTP/1.1 204") else f"{how}: {answer[:40]!r}")
"#,
    )
    .unwrap();
    let body = format!(
        r#"{{"Image":"{IMAGE}","Cmd":["sh","-c","{read} > /dev/null"],"HostConfig":{{"Binds":["{home}:/h"],"NetworkMode":"none"}}}}"#,
        read = read_three_kinds("/h"),
        home = env.home.display(),
    );
    let socket = docker.socket.display();
    let api = format!("curl -sf --unix-socket {socket}");
    let mut step = String::new();
    for how in ["writev", "sendmsg"] {
        step += &format!(
            "id=$({api} -H 'Content-Type: application/json' -d '{body}' \
             http://docker/v1.41/containers/create?name=rm-{how}-{run} | sed 's/.*\"Id\":\"\\([0-9a-f]*\\)\".*/\\1/')\n\
             python3 {script} {socket} {how} $id\n\
             {api} -X POST http://docker/v1.41/containers/$id/wait > /dev/null\n",
            script = script.display(),
        );
    }
    github_job(&env, agent, &run, "acme/vectored", &step);
    let id = format!("{run}/build");
    for how in ["writev", "sendmsg"] {
        let name = format!("rm-{how}-{run}");
        let harvest = wait_alert(agent, "credential-harvesting", &id, |a| {
            a["container"]["name"] == name.as_str()
        });
        assert_container(&harvest, Some(&name));
    }
    assert_no_secret(agent);
}

/// A job cannot mark a container for itself by writing an exec request on a unix socket that is
/// not a container runtime's API (`unix_peer.rs`): one it serves itself (named `docker.sock`),
/// one whose listener handed it to a child and exited, and one a process outside jobs serves
/// under another name (journald's, the bus). Were the request read, the host's own exec into
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
if phase == "outside":
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
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    client.sendall(request)
    if server:
        server.accept()[0].close()
    client.close()
    open("{dir}/marking-" + phase, "a").close()
    time.sleep(0.05)
"#,
            dir = env.dir.display(),
            outside = outside.display(),
        ),
    )
    .unwrap();
    let phases = ["own", "handed", "outside"];
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
    let own: Vec<_> = alerts(agent)
        .into_iter()
        .filter(|a| a.to_string().contains("/h-own"))
        .collect();
    assert!(own.is_empty(), "the host's exec became the job's: {own:#?}");
    let events = std::fs::read_to_string(agent.dir.join("events.jsonl")).unwrap_or_default();
    assert!(
        !events.contains("/h-own"),
        "the event trace holds the host's own exec"
    );
    assert_no_secret(agent);
}

/// A job's detached container outlives the job and an agent restart: a program `docker exec`
/// runs in it afterwards (here from outside any job) is still the job's, because the kernel's
/// container maps are pinned with the process map.
#[test]
fn a_job_container_stays_the_job_across_an_agent_restart() {
    let env = TestEnv::new("containers-restart");
    let dir = env.dir.join("agent");
    let pins = integration_tests::pin_dir_of(&dir);
    let port = integration_tests::live::free_port();
    let agent = integration_tests::live::Agent::launch(&dir, port, &[]);
    let docker = Docker::start("restart");
    let run = run_id(8);
    let name = format!("rm-restart-{run}");
    let step = docker_run(
        &docker,
        &env,
        "/h",
        &format!("-d --name {name} {IMAGE} sleep 60 > /dev/null"),
    );
    github_job(&env, &agent, &run, "acme/restart", &step);
    let id = format!("{run}/build");
    wait_alert(&agent, "secret-socket-access", &id, |_| true);
    assert!(agent.stop().success());
    let agent = integration_tests::live::Agent::launch(&dir, port, &[]);
    docker.run(&[
        "exec",
        &name,
        "sh",
        "-c",
        &format!("{} > /dev/null", read_three_kinds("/h")),
    ]);
    let harvest = wait_alert(&agent, "credential-harvesting", &id, |_| true);
    assert_eq!(harvest["job"]["repository"], "acme/restart", "{harvest}");
    assert_eq!(harvest["job"]["ended"], true, "{harvest}");
    drop(docker);
    assert!(agent.stop().success());
    integration_tests::live::assert_no_secret_in(&dir);
    let _ = std::fs::remove_dir_all(&pins);
}

/// A credential file bound into a job's container under an innocent name (`-v
/// ~/.aws/credentials:/run/notes.txt`) and read there after the job: the read is of the
/// credential, reported with its host path and the path used.
#[test]
fn a_credential_bound_into_a_container_under_another_name_is_the_credential() {
    let agent = agent();
    let docker = Docker::start("bindname");
    let env = TestEnv::new("containers-bindname");
    let run = run_id(9);
    let host = env.home.join(".aws/credentials");
    let step = format!(
        "{cli} run -d --network none -v {host}:/run/notes.txt {IMAGE} \
         sh -c 'sleep 3; cat /run/notes.txt > /dev/null; sleep 30' > /dev/null",
        cli = docker.shell_cli(),
        host = host.display(),
    );
    github_job(&env, agent, &run, "acme/bindname", &step);
    let id = format!("{run}/build");
    let after = wait_alert(agent, "credential-after-job-end", &id, |_| true);
    assert_eq!(after["credential"]["kind"], "aws", "{after}");
    assert_eq!(
        after["credential"]["path"],
        host.to_str().unwrap(),
        "{after}"
    );
    assert_eq!(
        after["credential"]["used_path"], "/run/notes.txt",
        "{after}"
    );
    assert_container(&after, None);
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
    let host: Vec<_> = alerts(&agent)
        .into_iter()
        .filter(|a| a.to_string().contains("/h-host"))
        .collect();
    assert!(host.is_empty(), "alerts for the host's own exec: {host:#?}");
    let events = std::fs::read_to_string(dir.join("events.jsonl")).unwrap_or_default();
    assert!(
        !events.contains("/h-host"),
        "the event trace holds the host's own exec"
    );
    drop(docker);
    assert!(agent.stop().success());
    integration_tests::live::assert_no_secret_in(&dir);
}
