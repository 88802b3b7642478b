//! Containers a job starts are the job, from their first instruction: a real Docker engine
//! (Debian's `docker.io`, started by each test with its own roots and socket, see
//! `integration_tests::docker`), driven by the docker CLI from GitHub-style jobs of the real
//! agent. The agent's alert stream must name the job for what the containers did, containers
//! started outside jobs must produce nothing, and no output may hold a secret.

use std::time::Duration;

use integration_tests::{
    TestEnv,
    docker::{Docker, IMAGE, PY_AWAIT_START, assert_container, docker_run, read_three_kinds},
    live::{
        Agent, agent, agent_dir, assert_no_secret, assert_nothing_of, free_port, github_job,
        run_id, test_policy, wait_alert,
    },
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

/// A Docker API socket under a name of its own (`DOCKER_HOST=unix:///run/engine-api.sock`), listed
/// among the policy's `docker` secret sockets: the kernel reads the job's requests there (it
/// knows runtime sockets by the file names the policy gives), so the container is the job's from
/// its first instruction. Before, only `docker.sock` and `podman.sock` were read.
#[test]
fn a_docker_socket_the_policy_lists_under_another_name_is_read() {
    let dir = agent_dir("containers-renamed");
    let policy = test_policy().replace(
        "\"**/podman/podman.sock\",",
        "\"**/podman/podman.sock\",\n    \"**/.docker/run/engine-api.sock\",",
    );
    assert!(policy.contains("engine-api.sock"));
    std::fs::write(dir.join("policy.toml"), policy).unwrap();
    let agent = Agent::launch(&dir, free_port(), &[]);
    let docker = Docker::start_at("renamed", "engine-api.sock");
    let env = TestEnv::new("containers-renamed");
    let run = run_id(41);
    let step = docker_run(
        &docker,
        &env,
        "/h",
        &format!("--rm {IMAGE} {} > /dev/null", read_three_kinds("/h")),
    );
    github_job(&env, &agent, &run, "acme/renamed", &step);
    let id = format!("{run}/build");
    let harvest = wait_alert(&agent, "credential-harvesting", &id, |_| true);
    assert_eq!(harvest["process"]["comm"], "cat", "{harvest}");
    assert_container(&harvest, None);
    let socket = wait_alert(&agent, "secret-socket-access", &id, |_| true);
    assert_eq!(socket["socket"]["kind"], "docker", "{socket}");
    assert_no_secret(&agent);
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
    assert_nothing_of(agent, "/h-outside", "a container outside jobs");
    let events = std::fs::read_to_string(agent.dir.join("events.jsonl")).unwrap_or_default();
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
    let api = format!(
        "curl -sf --unix-socket {socket}",
        socket = docker.socket.display()
    );
    let step = format!(
        "{create}\n\
         {api} -X POST http://docker/v1.41/containers/$id/start\n\
         {api} -X POST http://docker/v1.41/containers/$id/wait > /dev/null",
        create = create_reading(&docker, &env, &format!("rm-curl-{run}")),
    );
    github_job(&env, agent, &run, "acme/api", &step);
    let id = format!("{run}/build");
    let harvest = wait_alert(agent, "credential-harvesting", &id, |_| true);
    assert_container(&harvest, Some(&format!("rm-curl-{run}")));
    assert_no_secret(agent);
}

/// Start requests sent with `writev`, `sendmsg` and `sendmmsg` (Node's libuv writes a request of
/// several buffers with `writev`; other clients use `sendmsg`; `sendmmsg` is one more way), each
/// split in two buffers: the request line, then the headers. All three containers are the job's.
/// A start in a `sendmmsg`'s second message (no message after the first is read, and no HTTP
/// client sends so) raises `agent-tamper` for the job. A start written on a `dup` of the
/// connection, and one from a forked child on the descriptor it inherited (neither the
/// descriptor `connect` made), are the job's too: both were nobody's before.
#[test]
fn a_start_request_sent_with_writev_sendmsg_or_sendmmsg_is_the_jobs() {
    let agent = agent();
    let docker = Docker::start("vectored");
    let env = TestEnv::new("containers-vectored");
    let run = run_id(10);
    let script = env.dir.join("start.py");
    std::fs::write(
        &script,
        [
            PY_AWAIT_START,
            r#"import os, socket, sys
path, how, cid = sys.argv[1:]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
parts = [f"POST /v1.41/containers/{cid}/start HTTP/1.1\r\n".encode(),
         b"Host: docker\r\nContent-Length: 0\r\n\r\n"]
if how == "dup":
    # On a copy of the connected descriptor: not the one `connect` made.
    os.write(os.dup(s.fileno()), b"".join(parts))
elif how == "fork":
    # From a child, on the descriptor it inherited.
    pid = os.fork()
    if pid == 0:
        os.write(s.fileno(), b"".join(parts))
        os._exit(0)
    os.waitpid(pid, 0)
elif how == "writev":
    os.writev(s.fileno(), parts)
elif how == "sendmsg":
    s.sendmsg(parts)
else:
    # sendmmsg(2) of one message of the two buffers (Python has no binding for it).
    import ctypes
    class Iovec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_char_p), ("len", ctypes.c_size_t)]
    class Msghdr(ctypes.Structure):
        _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                    ("iov", ctypes.POINTER(Iovec)), ("iovlen", ctypes.c_size_t),
                    ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                    ("flags", ctypes.c_int)]
    class Mmsghdr(ctypes.Structure):
        _fields_ = [("hdr", Msghdr), ("len", ctypes.c_uint32)]
    iov = (Iovec * 2)(*[Iovec(p, len(p)) for p in parts])
    msgs = [Mmsghdr(Msghdr(None, 0, iov, 2, None, 0, 0), 0)]
    if how == "sendmmsg-later":
        # The start in a second message, after a ping: the kernel reads only the first.
        ping = b"GET /_ping HTTP/1.1\r\nHost: docker\r\n\r\n"
        first = (Iovec * 1)(Iovec(ping, len(ping)))
        msgs.insert(0, Mmsghdr(Msghdr(None, 0, first, 1, None, 0, 0), 0))
    vec = (Mmsghdr * len(msgs))(*msgs)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.sendmmsg(s.fileno(), vec, len(msgs), 0) != len(msgs):
        sys.exit(f"sendmmsg: errno {ctypes.get_errno()}")
answer = await_start(s)
sys.exit(0 if b"HTTP/1.1 204" in answer else f"{how}: {answer[-40:]!r}")
"#,
        ]
        .concat(),
    )
    .unwrap();
    let socket = docker.socket.display();
    let api = format!("curl -sf --unix-socket {socket}");
    let mut step = String::new();
    for how in [
        "writev",
        "sendmsg",
        "sendmmsg",
        "sendmmsg-later",
        "dup",
        "fork",
    ] {
        step += &format!(
            "{create}\n\
             python3 {script} {socket} {how} $id\n\
             {api} -X POST http://docker/v1.41/containers/$id/wait > /dev/null\n",
            create = create_reading(&docker, &env, &format!("rm-{how}-{run}")),
            script = script.display(),
        );
    }
    github_job(&env, agent, &run, "acme/vectored", &step);
    let id = format!("{run}/build");
    for how in ["writev", "sendmsg", "sendmmsg", "dup", "fork"] {
        let name = format!("rm-{how}-{run}");
        let harvest = wait_alert(agent, "credential-harvesting", &id, |a| {
            a["container"]["name"] == name.as_str()
        });
        assert_container(&harvest, Some(&name));
    }
    let tamper = wait_alert(agent, "agent-tamper", &id, |a| {
        a["target"]["access"]
            .as_str()
            .is_some_and(|t| t.starts_with("sendmmsg to "))
    });
    assert!(
        tamper["summary"]
            .as_str()
            .is_some_and(|s| s.contains("sent messages to")),
        "{tamper}"
    );
    assert_no_secret(agent);
}

/// A job's detached container outlives the job and an agent restart: a program `docker exec`
/// runs in it afterwards (here from outside any job) is still the job's, because the kernel's
/// container maps are pinned with the process map, and is named, because the engine's container
/// table is saved with its state. A job process's connection to the Docker socket is pinned too:
/// a start request it sends on that connection after the restart is the job's.
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
    let held = format!("rm-held-{run}");
    let (ready, go) = (env.dir.join("held-ready"), env.dir.join("held-go"));
    let script = env.dir.join("held.py");
    std::fs::write(
        &script,
        r#"import os, socket, sys, time
path, cid, ready, go = sys.argv[1:]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.05)
s.sendall(f"POST /v1.41/containers/{cid}/start HTTP/1.1\r\nHost: docker\r\nContent-Length: 0\r\n\r\n".encode())
s.recv(4096)
"#,
    )
    .unwrap();
    let socket = docker.socket.display();
    // The container to start later is created now; the connection that will start it is held
    // open by a process of the job that outlives it.
    let step = format!(
        "{run_detached}\n\
         {create}\n\
         nohup python3 {script} {socket} $id {ready} {go} > /dev/null 2>&1 &\n\
         until [ -e {ready} ]; do sleep 0.1; done\n",
        run_detached = docker_run(
            &docker,
            &env,
            "/h",
            &format!("-d --name {name} {IMAGE} sleep 60 > /dev/null"),
        ),
        create = create_reading(&docker, &env, &held),
        script = script.display(),
        ready = ready.display(),
        go = go.display(),
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
    let harvest = wait_alert(&agent, "credential-harvesting", &id, |a| {
        a["container"]["name"] == name.as_str()
    });
    assert_eq!(harvest["job"]["repository"], "acme/restart", "{harvest}");
    assert_eq!(harvest["job"]["ended"], true, "{harvest}");
    // Named as before the restart: the engine's container table is in its saved state.
    assert_container(&harvest, Some(&name));
    // The held connection's start request, sent now.
    std::fs::write(&go, "").unwrap();
    let started = wait_alert(&agent, "credential-harvesting", &id, |a| {
        a["container"]["name"] == held.as_str()
    });
    assert_eq!(started["job"]["ended"], true, "{started}");
    assert_container(&started, Some(&held));
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

/// A step's line that creates (not starts) container `name` over the Docker API, reading three
/// kinds of credentials from the test home at `/h` when it runs, and sets `id` to its id.
fn create_reading(docker: &Docker, env: &TestEnv, name: &str) -> String {
    let body = format!(
        r#"{{"Image":"{IMAGE}","Cmd":["sh","-c","{read} > /dev/null"],"HostConfig":{{"Binds":["{home}:/h"],"NetworkMode":"none"}}}}"#,
        read = read_three_kinds("/h"),
        home = env.home.display(),
    );
    format!(
        "id=$(curl -sf --unix-socket {socket} -H 'Content-Type: application/json' -d '{body}' \
         http://docker/v1.41/containers/create?name={name} | sed 's/.*\"Id\":\"\\([0-9a-f]*\\)\".*/\\1/')",
        socket = docker.socket.display(),
    )
}
