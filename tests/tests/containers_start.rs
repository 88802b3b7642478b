//! Containers a job starts by name or short id (`docker create --name X`, then `docker start X`;
//! the API's `POST /containers/X/start`), and through `docker-compose`: the kernel matches the
//! start request to the container made next (runner-monitor-ebpf/src/container_refs.rs), and
//! the agent checks the match against the daemon. Real dockerd, real agent, GitHub-style jobs.

use integration_tests::{
    TestEnv,
    docker::{
        Docker, IMAGE, PY_AWAIT_START, assert_container, assert_requested_as, create_outside_jobs,
        read_three_kinds,
    },
    kernel_at_least,
    live::{agent, assert_no_secret, github_job, run_id, wait_alert},
};

/// `docker create` from a job step: the job's home mounted at `/h`, the container reads three
/// kinds of credentials; `args` before the image (a name).
fn create_reader(docker: &Docker, env: &TestEnv, args: &str) -> String {
    format!(
        "{cli} create --network none -v {home}:/h {args} {IMAGE} sh -c '{read} > /dev/null'",
        cli = docker.shell_cli(),
        home = env.home.display(),
        read = read_three_kinds("/h"),
    )
}

#[test]
fn a_container_a_job_starts_by_name_is_the_job() {
    let agent = agent();
    let docker = Docker::start("byname");
    let env = TestEnv::new("containers-byname");
    let run = run_id(11);
    let name = format!("rm-byname-{run}");
    let cli = docker.shell_cli();
    let step = format!(
        "{create} > /dev/null\n{cli} start {name} > /dev/null\n{cli} wait {name} > /dev/null",
        create = create_reader(&docker, &env, &format!("--name {name}")),
    );
    github_job(&env, agent, &run, "acme/byname", &step);
    let id = format!("{run}/build");
    let harvest = wait_alert(agent, "credential-harvesting", &id, |_| true);
    // busybox's `sh` runs its `cat` applet as `/proc/self/exe`.
    assert!(
        harvest["process"]["cmdline"]
            .as_str()
            .is_some_and(|c| c.starts_with("cat /h/")),
        "{harvest}"
    );
    assert_container(&harvest, Some(&name));
    assert_requested_as(&harvest, "name", &name);
    assert_no_secret(agent);
}

#[test]
fn a_container_a_job_starts_by_short_id_is_the_job() {
    let agent = agent();
    let docker = Docker::start("byshortid");
    let env = TestEnv::new("containers-byshortid");
    let run = run_id(12);
    let cli = docker.shell_cli();
    let step = format!(
        "cid=$({create})\nshort=$(echo $cid | cut -c1-12)\n\
         {cli} start $short > /dev/null\n{cli} wait $short > /dev/null",
        create = create_reader(&docker, &env, ""),
    );
    github_job(&env, agent, &run, "acme/byshortid", &step);
    let id = format!("{run}/build");
    let harvest = wait_alert(agent, "credential-harvesting", &id, |_| true);
    assert_container(&harvest, None);
    let full = harvest["container"]["id"].as_str().unwrap();
    assert_requested_as(&harvest, "short-id", &full[..12]);
    assert_no_secret(agent);
}

/// curl's request is short (under 100 bytes, no body): the reference is still found.
#[test]
fn a_container_a_job_starts_by_name_through_the_docker_api() {
    let agent = agent();
    let docker = Docker::start("apiname");
    let env = TestEnv::new("containers-apiname");
    let run = run_id(13);
    let name = format!("rm-apiname-{run}");
    let step = format!(
        "{create} > /dev/null\n\
         curl -sf --unix-socket {socket} -X POST http://docker/v1.41/containers/{name}/start\n\
         {cli} wait {name} > /dev/null",
        create = create_reader(&docker, &env, &format!("--name {name}")),
        socket = docker.socket.display(),
        cli = docker.shell_cli(),
    );
    github_job(&env, agent, &run, "acme/apiname", &step);
    let id = format!("{run}/build");
    let harvest = wait_alert(agent, "credential-harvesting", &id, |_| true);
    assert_container(&harvest, Some(&name));
    assert_requested_as(&harvest, "name", &name);
    assert_no_secret(agent);
}

/// Compose v1 (Debian's `docker-compose`, Python: docker-py creates each service's container
/// and starts it by id): a service that reads credentials is the job.
#[test]
fn a_compose_service_of_a_job_is_the_job() {
    let agent = agent();
    let docker = Docker::start("compose");
    let env = TestEnv::new("containers-compose");
    let run = run_id(14);
    let project = env.dir.join("compose");
    std::fs::create_dir_all(&project).unwrap();
    std::fs::write(
        project.join("docker-compose.yml"),
        format!(
            "version: \"3\"\nservices:\n  reader:\n    image: {IMAGE}\n    network_mode: none\n    \
             volumes:\n      - {home}:/h\n    command: [\"sh\", \"-c\", \"{read} > /dev/null\"]\n",
            home = env.home.display(),
            read = read_three_kinds("/h"),
        ),
    )
    .unwrap();
    // Compose reads the CLI's configuration: the daemon's own, not the job's canary one (which
    // docker-py cannot parse).
    std::fs::create_dir_all(docker.dir.join("cli")).unwrap();
    std::fs::write(docker.dir.join("cli/config.json"), "{}").unwrap();
    let step = format!(
        "cd {dir} && export DOCKER_CONFIG={config}\nDOCKER_HOST={host} docker-compose -p rm{run} up --no-color \
         --abort-on-container-exit > compose.log 2>&1\n\
         DOCKER_HOST={host} docker-compose -p rm{run} rm -f >> compose.log 2>&1",
        dir = project.display(),
        config = docker.dir.join("cli").display(),
        host = docker.host(),
    );
    github_job(&env, agent, &run, "acme/compose", &step);
    eprintln!(
        "docker-compose: {}",
        std::fs::read_to_string(project.join("compose.log")).unwrap_or_default()
    );
    let id = format!("{run}/build");
    let harvest = wait_alert(agent, "credential-harvesting", &id, |_| true);
    assert_eq!(harvest["job"]["repository"], "acme/compose", "{harvest}");
    assert_container(&harvest, Some(&format!("rm{run}_reader_1")));
    assert_no_secret(agent);
}

/// `POST /containers/<id>/start` from the test itself (outside any job), at once: no CLI start-up.
fn start_outside_jobs(docker: &Docker, id: &str) {
    use std::io::{Read as _, Write as _};
    let mut stream = std::os::unix::net::UnixStream::connect(&docker.socket).unwrap();
    write!(
        stream,
        "POST /v1.41/containers/{id}/start HTTP/1.0\r\nHost: docker\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.0 204"), "{answer}");
}

/// The case the kernel's first-in first-out guess gets wrong: a container started outside any
/// job just before the job's start by name makes its cgroup first, and would take the job's
/// pending start. The agent resolves the name at the daemon before either cgroup exists, so
/// the job's container is the job's and the other is nobody's.
#[test]
fn a_container_started_outside_jobs_beside_a_start_by_name_does_not_take_it() {
    let agent = agent();
    let docker = Docker::start("byname-race");
    let env = TestEnv::new("containers-byname-race");
    let run = run_id(15);
    let name = format!("rm-race-{run}");
    let other = format!("rm-race-host-{run}");
    let other_id = create_outside_jobs(&docker, &env, &other);
    let (ready, go) = (env.dir.join("ready"), env.dir.join("go"));
    let step = format!(
        "{create} > /dev/null\ntouch {ready}\nwhile [ ! -e {go} ]; do :; done\n\
         curl -sf --unix-socket {socket} -X POST http://docker/v1.41/containers/{name}/start\n\
         {cli} wait {name} > /dev/null",
        create = create_reader(&docker, &env, &format!("--name {name}")),
        ready = ready.display(),
        go = go.display(),
        socket = docker.socket.display(),
        cli = docker.shell_cli(),
    );
    std::thread::scope(|scope| {
        let job = scope.spawn(|| github_job(&env, agent, &run, "acme/race", &step));
        integration_tests::live::wait_until("the job's container created", 30, || ready.exists());
        std::fs::write(&go, "").unwrap();
        start_outside_jobs(&docker, &other_id);
        job.join().unwrap();
    });
    let id = format!("{run}/build");
    let harvest = wait_alert(agent, "credential-harvesting", &id, |_| true);
    assert_container(&harvest, Some(&name));
    assert_requested_as(&harvest, "name", &name);
    assert_nobodys(agent, &docker, &other_id);
    assert_no_secret(agent);
}

/// The case the kernel's guess gets wrong and the agent corrects: a container cgroup made
/// right after the job's start by name (here by the job's own step, at once, before the agent
/// can have asked the daemon) takes the job's pending start, first in, first out. The agent's
/// answer then finds the start gone and the job's container not made yet: it registers the
/// container by id, so its cgroup is the job's when the daemon makes it. Before, it was
/// nobody's.
#[test]
fn a_start_by_name_another_cgroup_took_is_still_the_jobs_container() {
    let agent = agent();
    let docker = Docker::start("byname-taken");
    let env = TestEnv::new("containers-byname-taken");
    let run = run_id(17);
    let name = format!("rm-taken-{run}");
    let v2 = runner_monitor::cgroups::cgroup2_root().expect("a cgroup v2 hierarchy");
    std::fs::create_dir_all(v2.join("docker")).unwrap();
    // A container's cgroup by its name: `docker/<64 hex digits>`.
    let other = v2.join("docker").join(format!("{run:f>64}"));
    let answers = env.dir.join("answers");
    let step = format!(
        "{create} > /dev/null\n\
         {job_step} start-then-mkdir {socket} {name} {other} > {answers}\n\
         {cli} wait {name} > /dev/null",
        create = create_reader(&docker, &env, &format!("--name {name}")),
        job_step = integration_tests::job_step().display(),
        socket = docker.socket.display(),
        other = other.display(),
        answers = answers.display(),
        cli = docker.shell_cli(),
    );
    github_job(&env, agent, &run, "acme/taken", &step);
    let answers = std::fs::read_to_string(&answers).unwrap_or_default();
    assert!(answers.starts_with("HTTP/1.0 204"), "{answers}");
    let id = format!("{run}/build");
    let harvest = wait_alert(agent, "credential-harvesting", &id, |a| {
        a["container"]["name"] == name.as_str()
    });
    assert_container(&harvest, Some(&name));
    assert_requested_as(&harvest, "name", &name);
    assert_no_secret(agent);
}

/// Once container `id` (started, reading credentials) has exited, no alert names it: its reads
/// went to nobody.
fn assert_nobodys(agent: &integration_tests::live::Agent, docker: &Docker, id: &str) {
    docker.run(&["wait", id]);
    std::thread::sleep(std::time::Duration::from_secs(1));
    let named = integration_tests::live::alerts(agent)
        .into_iter()
        .filter(|a| a["container"]["id"] == id)
        .collect::<Vec<_>>();
    assert!(
        named.is_empty(),
        "the container started outside jobs was attributed: {named:#?}"
    );
}

/// Start requests submitted through io_uring make no `write` or `send` syscall: the kernel
/// reads them at submission (`io_uring_send_req`), as each of the four ways to send (`WRITE`,
/// `WRITEV`, `SEND`, `SENDMSG`), on connections made by `connect(2)` and by io_uring's own
/// `CONNECT` (no connect syscall either: the socket is checked at the request), and on a
/// registered file (`IOSQE_FIXED_FILE`: the request names an index, the file is found in the
/// ring's table), and from 6.15 as a `WRITEV_FIXED` (iovecs in a registered buffer). Each
/// container is the job's. A request on a registered file whose index is the
/// number of the job's Docker connection, but which is another socket, marks nothing: a
/// container the host starts afterwards is nobody's. A start request spliced from a pipe
/// (`IORING_OP_SPLICE`), which nothing can copy, or sent from the ring's provided buffers
/// (picked when the request runs), is the job hiding from the monitor: `agent-tamper` for the
/// job, naming the way.
#[test]
fn containers_a_job_starts_through_io_uring_are_the_job() {
    let agent = agent();
    let docker = Docker::start("uring");
    let env = TestEnv::new("containers-uring");
    let run = run_id(16);
    let mut cases = vec![
        ("write", "syscall"),
        ("writev", "uring"),
        ("send", "uring"),
        ("sendmsg", "syscall"),
        ("writev", "fixed"),
    ];
    if kernel_at_least(6, 15) {
        // `IORING_OP_WRITEV_FIXED`: iovecs in a registered buffer.
        cases.push(("writev_fixed", "syscall"));
    }
    // Sent from bytes nothing can read at submission: a pipe (`SPLICE`), and from 6.10 a
    // `SEND` from the ring's provided buffers whose SQE names a harmless decoy.
    let mut hidden = vec![("splice", "io_uring splice to ")];
    if kernel_at_least(6, 10) {
        hidden.push(("send_select", "io_uring send from a provided buffer to "));
    }
    let answers = env.dir.join("answers");
    let host_id = create_outside_jobs(&docker, &env, &format!("rm-uring-host-{run}"));
    let mut step = format!(
        "{job_step} uring-start {socket} {host_id} send decoy >> {answers}\n",
        job_step = integration_tests::job_step().display(),
        socket = docker.socket.display(),
        answers = answers.display(),
    );
    for &(op, connect) in &cases {
        step += &format!(
            "cid=$({create})\n{job_step} uring-start {socket} $cid {op} {connect} >> {answers}\n\
             {cli} wait $cid > /dev/null\n",
            create = create_reader(
                &docker,
                &env,
                &format!("--name rm-uring-{op}-{connect}-{run}")
            ),
            job_step = integration_tests::job_step().display(),
            socket = docker.socket.display(),
            answers = answers.display(),
            cli = docker.shell_cli(),
        );
    }
    for (op, _) in &hidden {
        step += &format!(
            "cid=$({create})\n{job_step} uring-start {socket} $cid {op} syscall >> {answers}\n\
             {cli} wait $cid > /dev/null\n",
            create = create_reader(&docker, &env, &format!("--name rm-uring-{op}-{run}")),
            job_step = integration_tests::job_step().display(),
            socket = docker.socket.display(),
            answers = answers.display(),
            cli = docker.shell_cli(),
        );
    }
    github_job(&env, agent, &run, "acme/uring", &step);
    let answers = std::fs::read_to_string(&answers).unwrap_or_default();
    assert_eq!(
        answers
            .lines()
            .filter(|l| l.starts_with("HTTP/1.0 204"))
            .count(),
        cases.len() + hidden.len(),
        "the daemon's answers: {answers}"
    );
    assert!(answers.lines().any(|l| l == "decoy"), "{answers}");
    let id = format!("{run}/build");
    for (op, connect) in cases {
        let name = format!("rm-uring-{op}-{connect}-{run}");
        let harvest = wait_alert(agent, "credential-harvesting", &id, |a| {
            a["container"]["name"] == name.as_str()
        });
        assert_container(&harvest, Some(&name));
    }
    for (_, access) in hidden {
        let tamper = wait_alert(agent, "agent-tamper", &id, |a| {
            a["target"]["access"]
                .as_str()
                .is_some_and(|t| t.starts_with(access))
        });
        let summary = tamper["summary"].as_str().unwrap_or_default();
        assert!(summary.contains("cannot read"), "{tamper}");
    }
    start_outside_jobs(&docker, &host_id);
    assert_nobodys(agent, &docker, &host_id);
    assert_no_secret(agent);
}

/// Start requests the kernel cannot read where they are sent, each from a job step: the request
/// line cut across two writes (by id, and by name), pipelined after a ping in one write (and after
/// a ping whose head is 3 KB long), in the second buffer of a `writev` after a ping, in the
/// eleventh and twelfth of one after a ping in ten (the kernel copied four until 2026-12-07), and
/// with its id percent-encoded (the daemon routes the decoded path). The agent follows the job's
/// stream and registers each container before the daemon makes it: every one is the job's. The
/// pings carry the canary credential in a header, as a registry password would be: it is in no
/// output. Starts sent from a file (`sendfile`) or a pipe (`splice`), which nothing can copy, or
/// pipelined past the kernel's copy of a buffer (after a 9 KB head), are the job hiding from the
/// monitor: `agent-tamper` for the job, naming the call.
#[test]
fn start_requests_the_kernel_cannot_read_where_they_are_sent_are_the_jobs() {
    let agent = agent();
    let docker = Docker::start("cut");
    let env = TestEnv::new("containers-cut");
    let run = run_id(18);
    let script = env.dir.join("start.py");
    std::fs::write(
        &script,
        [
            PY_AWAIT_START,
            r#"import os, socket, sys, time
path, how, ref, credentials = sys.argv[1:]
canary = open(credentials).read().split("= ")[1].strip()
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
# A secret in the stream the agent reads (a registry password would be there): never printed.
ping = f"GET /_ping HTTP/1.1\r\nHost: docker\r\nX-Registry-Auth: {canary}\r\n\r\n".encode()
target = ref
if how == "encoded":
    target = "%{:02x}".format(ord(ref[0])) + ref[1:]
start = f"POST /v1.41/containers/{target}/start HTTP/1.1\r\nHost: docker\r\nContent-Length: 0\r\n\r\n".encode()
if how in ("cut", "cut-name"):
    s.send(start[:20])
    time.sleep(0.05)
    s.send(start[20:])
elif how == "pipelined":
    s.send(ping + start)
elif how in ("long-ping", "padded"):
    # A head longer than the kernel copied before (512 bytes), or than it copies (8 KiB).
    pad = 3000 if how == "long-ping" else 9000
    s.send(ping[:-2] + b"X-Pad: " + b"a" * pad + b"\r\n\r\n" + start)
elif how == "later":
    os.writev(s.fileno(), [ping, start])
elif how == "many-buffers":
    # The ping in ten pieces, then the start cut in two: its line begins in the eleventh buffer.
    pieces = [ping[i * len(ping) // 10:(i + 1) * len(ping) // 10] for i in range(10)]
    os.writev(s.fileno(), pieces + [start[:30], start[30:]])
elif how == "sendfile":
    request = os.path.join(os.path.dirname(sys.argv[0]), "request")
    with open(request, "wb") as f:
        f.write(start)
    with open(request, "rb") as f:
        os.sendfile(s.fileno(), f.fileno(), 0, len(start))
elif how == "splice":
    r, w = os.pipe()
    os.write(w, start)
    os.splice(r, s.fileno(), len(start))
else:
    s.send(start)
answer = await_start(s)
print(f"started {how}" if b"HTTP/1.1 204" in answer else f"{how}: {answer[-80:]!r}")
"#,
        ]
        .concat(),
    )
    .unwrap();
    let hows = [
        "cut",
        "cut-name",
        "pipelined",
        "long-ping",
        "later",
        "many-buffers",
        "encoded",
    ];
    let hidden = ["sendfile", "splice", "padded"];
    // The calls the agent-tamper findings name.
    let calls = ["sendfile", "splice", "write"];
    let answers = env.dir.join("answers");
    let mut step = String::new();
    for how in hows.iter().chain(&hidden) {
        let how = *how;
        let name = format!("rm-{how}-{run}");
        let reference = if how == "cut-name" {
            name.clone()
        } else {
            "$id".into()
        };
        step += &format!(
            "id=$({create})\n\
             python3 {script} {socket} {how} {reference} {credentials} >> {answers} 2>&1\n\
             {cli} wait $id > /dev/null\n",
            create = create_reader(&docker, &env, &format!("--name {name}")),
            credentials = env.home.join(".aws/credentials").display(),
            script = script.display(),
            answers = answers.display(),
            socket = docker.socket.display(),
            cli = docker.shell_cli(),
        );
    }
    github_job(&env, agent, &run, "acme/cut", &step);
    let answers = std::fs::read_to_string(&answers).unwrap_or_default();
    for how in hows.iter().chain(&hidden) {
        assert!(
            answers.lines().any(|l| l == format!("started {how}")),
            "the daemon's answers: {answers}"
        );
    }
    let id = format!("{run}/build");
    for how in hows {
        let name = format!("rm-{how}-{run}");
        let harvest = wait_alert(agent, "credential-harvesting", &id, |a| {
            a["container"]["name"] == name.as_str()
        });
        assert_container(&harvest, Some(&name));
    }
    for call in calls {
        let tamper = wait_alert(agent, "agent-tamper", &id, |a| {
            a["target"]["access"]
                .as_str()
                .is_some_and(|t| t.starts_with(&format!("{call} to ")))
        });
        let summary = tamper["summary"].as_str().unwrap_or_default();
        assert!(summary.contains("cannot read"), "{tamper}");
    }
    assert_no_secret(agent);
}
