//! GitHub Actions container jobs (`container:`) and service containers (`services:`), as the
//! runner makes them with the real docker CLI: `docker create` with the runner's hash as name
//! and label and `tail -f /dev/null` as entrypoint, `docker start`, each step through `docker
//! exec -i <id> sh -e /__w/_temp/<step>.sh`, and `docker rm --force` at the end. All of it is
//! the job. And the Docker secret socket entitlement: an entitled job's containers are still
//! attributed, without `secret-socket-access`.

use std::time::Duration;

use integration_tests::{
    TestEnv,
    docker::{Docker, IMAGE, assert_container, docker_run, gitlab_container, read_three_kinds},
    live::{
        Agent, agent, agent_dir, alerts, assert_no_secret, free_port, github_job, json_lines,
        run_id, test_policy, wait_alert, wait_until,
    },
};

/// The steps of a GitHub container job with one service container, as the runner's
/// `Initialize containers`, script steps and `Stop containers` run them. `remove`: whether the
/// runner removes the containers at the end.
fn container_job(docker: &Docker, env: &TestEnv, hash: &str, remove: bool) -> String {
    let work = env.dir.join(format!("_work-{hash}"));
    std::fs::create_dir_all(work.join("_temp")).unwrap();
    // The step's script, as the runner writes it under `_temp`.
    std::fs::write(
        work.join("_temp/step1.sh"),
        format!("{} > /dev/null\n", read_three_kinds("/github/home")),
    )
    .unwrap();
    let cli = docker.shell_cli();
    let home = env.home.display();
    let job = format!(
        "cid=$({cli} create --name {hash} --label {hash} --workdir /__w/repo/repo --network none \
         -v {work}:/__w -v {home}:/github/home -v {socket}:/var/run/docker.sock \
         --entrypoint tail {IMAGE} -f /dev/null)\n\
         {cli} start $cid > /dev/null\n\
         sid=$({cli} create --name svc{hash} --label {hash} --network none -v {home}:/h-svc \
         {IMAGE} sh -c 'sleep 1; cat /h-svc/.aws/credentials > /dev/null; sleep 60')\n\
         {cli} start $sid > /dev/null\n\
         {cli} exec -i $cid sh -e /__w/_temp/step1.sh\n\
         sleep 2\n",
        work = work.display(),
        socket = docker.socket.display(),
    );
    if remove {
        format!("{job}{cli} rm --force $cid $sid > /dev/null\n")
    } else {
        format!("{job}{cli} rm --force $cid > /dev/null\n")
    }
}

/// The event trace's file events for `path` belong to the job whose key is `key`.
fn assert_trace_of(agent: &Agent, path: &str, key: &serde_json::Value) {
    let events = std::fs::read_to_string(agent.dir.join("events.jsonl")).unwrap_or_default();
    let mine: Vec<serde_json::Value> = events
        .lines()
        .filter(|l| l.contains(path))
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|e: &serde_json::Value| e["kind"] != "exec")
        .collect();
    assert!(!mine.is_empty(), "no event for {path}");
    for e in &mine {
        assert_eq!(&e["job"]["key"], key, "{e}");
    }
}

#[test]
fn a_github_container_job_and_its_service_containers_are_the_job() {
    let agent = agent();
    let docker = Docker::start("ghcontainer");
    let env = TestEnv::new("containers-ghcontainer");
    // The runner removes its containers: no survivor.
    let run = run_id(21);
    let hash = format!("a1b2c3{run}");
    github_job(
        &env,
        agent,
        &run,
        "acme/container-job",
        &container_job(&docker, &env, &hash, true),
    );
    let id = format!("{run}/build");
    let harvest = wait_alert(agent, "credential-harvesting", &id, |_| true);
    assert!(
        harvest["process"]["cmdline"]
            .as_str()
            .is_some_and(|c| c.starts_with("cat /github/home/")),
        "{harvest}"
    );
    assert_container(&harvest, Some(&hash));
    // The service container's read is the job's.
    assert_trace_of(agent, "/h-svc/.aws/credentials", &harvest["job"]["key"]);
    // A service left running by the runner: a survivor naming it.
    let left = run_id(22);
    let left_hash = format!("d4e5f6{left}");
    github_job(
        &env,
        agent,
        &left,
        "acme/container-job",
        &container_job(&docker, &env, &left_hash, false),
    );
    let survivor = wait_alert(
        agent,
        "process-survived-job",
        &format!("{left}/build"),
        |_| true,
    );
    assert_container(&survivor, Some(&format!("svc{left_hash}")));
    // The first job's containers were removed before its end: past the grace period (2 s), it
    // has no survivor.
    std::thread::sleep(Duration::from_secs(3));
    let survivors: Vec<_> = alerts(agent)
        .into_iter()
        .filter(|a| a["rule"] == "process-survived-job" && a["job"]["id"] == id)
        .collect();
    assert!(survivors.is_empty(), "survivors: {survivors:#?}");
    assert_no_secret(agent);
}

/// `secret_sockets = ["docker"]` for the repository: its connect to the Docker socket is no
/// finding, its container's credential reads are the job's all the same.
#[test]
fn an_entitled_job_raises_no_socket_finding_and_its_containers_are_still_the_job() {
    let dir = agent_dir("containers-entitled");
    std::fs::write(
        dir.join("policy.toml"),
        format!(
            "{}\n[[rules]]\nrepository = \"acme/images\"\nsecret_sockets = [\"docker\"]\n",
            test_policy()
        ),
    )
    .unwrap();
    let agent = Agent::launch(&dir, free_port(), &[]);
    let docker = Docker::start("entitled");
    let env = TestEnv::new("containers-entitled");
    let run = run_id(23);
    let step = docker_run(
        &docker,
        &env,
        "/h",
        &format!("--rm {IMAGE} {} > /dev/null", read_three_kinds("/h")),
    );
    github_job(&env, &agent, &run, "acme/images", &step);
    let id = format!("{run}/build");
    let harvest = wait_alert(&agent, "credential-harvesting", &id, |_| true);
    assert_container(&harvest, None);
    // The control: the same job of a repository that is not entitled raises it.
    let other = run_id(24);
    github_job(&env, &agent, &other, "acme/other", &step);
    wait_alert(
        &agent,
        "secret-socket-access",
        &format!("{other}/build"),
        |_| true,
    );
    let socket: Vec<_> = alerts(&agent)
        .into_iter()
        .filter(|a| a["rule"] == "secret-socket-access" && a["job"]["id"] == id)
        .collect();
    assert!(socket.is_empty(), "{socket:#?}");
    assert_no_secret(&agent);
    drop(docker);
    assert!(agent.stop().success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// GitLab's docker executor with a service: the runner (outside any job) creates the service
/// and the build container with its labels and the job's `CI_*` variables, the build reads
/// credentials, the runner removes both. One job (its containers are stages of it, by the
/// environment scan), and once its containers are gone no survivor.
#[test]
fn a_gitlab_job_with_a_service_is_one_job_and_leaves_no_survivor_once_removed() {
    let agent = agent();
    let docker = Docker::start("gitlabsvc");
    let env = TestEnv::new("containers-gitlabsvc");
    let job_id = run_id(25);
    let service = format!("rm-svc-{job_id}");
    let build = format!("rm-build-{job_id}");
    gitlab_container(
        &docker, &env, &job_id, "service", &service, true, "sleep 60",
    );
    gitlab_container(
        &docker,
        &env,
        &job_id,
        "build",
        &build,
        true,
        &format!("{} > /dev/null", read_three_kinds("/builds/h")),
    );
    docker.run(&["start", &service]);
    docker.run(&["start", "-a", &build]);
    let harvest = wait_alert(agent, "credential-harvesting", &job_id, |_| true);
    assert_eq!(harvest["job"]["platform"], "gitlab", "{harvest}");
    assert_eq!(
        harvest["job"]["repository"], "group/with-service",
        "{harvest}"
    );
    // Two stages of the one job: the service's and the build's entrypoints, each a root found
    // by the environment scan.
    let stages = json_lines(&agent.dir.join("events.jsonl"))
        .into_iter()
        .filter(|e| e["kind"] == "job_start" && e["id"] == job_id.as_str())
        .count();
    assert_eq!(stages, 2, "stages of job {job_id}");
    // The runner removes the containers: the job ends `stage_gap` after its last stage's root
    // exits, and nothing of it survives the grace period.
    docker.run(&["rm", "-f", &service, &build]);
    std::thread::sleep(Duration::from_secs(5));
    let survivors: Vec<_> = alerts(agent)
        .into_iter()
        .filter(|a| {
            (a["rule"] == "process-survived-job" || a["rule"] == "credential-after-job-end")
                && a["job"]["id"] == job_id
        })
        .collect();
    assert!(survivors.is_empty(), "survivors: {survivors:#?}");
    assert_no_secret(agent);
}

/// The agent reads GitLab Runner's labels of a docker-executor container from the runner's
/// Docker socket (a `docker` secret socket path of the policy): findings about the build
/// container name it, with the job, project, pipeline and runner ids and its type; the job
/// ends when the runner removes its container, not before (the stage gap is long here).
#[test]
fn a_gitlab_executor_container_is_named_with_the_runners_labels_and_its_removal_ends_the_job() {
    let docker = Docker::start("gitlablabels");
    let dir = agent_dir("containers-gitlablabels");
    std::fs::write(
        dir.join("policy.toml"),
        format!(
            "{}\n[[secret_sockets]]\nkind = \"docker\"\npaths = [\"{}\"]\n",
            test_policy().replace("stage_gap_seconds = 1", "stage_gap_seconds = 300"),
            docker.socket.display()
        ),
    )
    .unwrap();
    let agent = Agent::launch(&dir, free_port(), &[]);
    let env = TestEnv::new("containers-gitlablabels");
    let job_id = run_id(26);
    let build = format!("rm-build-{job_id}");
    // The entrypoint lives on a second after its reads: the agent reads its cgroup from /proc.
    let read = format!("{} > /dev/null; sleep 1", read_three_kinds("/builds/h"));
    gitlab_container(&docker, &env, &job_id, "build", &build, true, &read);
    docker.run(&["start", "-a", &build]);
    let harvest = wait_alert(&agent, "credential-harvesting", &job_id, |_| true);
    assert_eq!(harvest["job"]["platform"], "gitlab", "{harvest}");
    let c = &harvest["container"];
    assert_eq!(c["name"], build.as_str(), "{harvest}");
    assert_eq!(c["image"], IMAGE, "{harvest}");
    let labels = &c["labels"];
    assert_eq!(
        labels["com.gitlab.gitlab-runner.job.id"],
        job_id.as_str(),
        "{harvest}"
    );
    assert_eq!(
        labels["com.gitlab.gitlab-runner.project.id"], "42",
        "{harvest}"
    );
    assert_eq!(
        labels["com.gitlab.gitlab-runner.pipeline.id"], "77",
        "{harvest}"
    );
    assert_eq!(
        labels["com.gitlab.gitlab-runner.runner.id"], "9",
        "{harvest}"
    );
    assert_eq!(
        labels["com.gitlab.gitlab-runner.type"], "build",
        "{harvest}"
    );
    // The container has exited; the job is not over until the runner removes it.
    let trace = || -> Vec<serde_json::Value> { json_lines(&dir.join("events.jsonl")) };
    let key = trace()
        .into_iter()
        .find(|e| e["kind"] == "job_start" && e["id"] == job_id.as_str())
        .expect("the job's start in the trace")["job"]["key"]
        .clone();
    let ended = || {
        trace()
            .iter()
            .any(|e| e["kind"] == "job_end" && e["job"]["key"] == key)
    };
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !ended(),
        "job {job_id} ended before its container was removed"
    );
    docker.run(&["rm", &build]);
    wait_until("the job's end once its container is removed", 10, ended);
    let end = trace()
        .into_iter()
        .find(|e| e["kind"] == "job_end" && e["job"]["key"] == key)
        .unwrap();
    assert_eq!(end["process"]["pid"], 0, "ended by the agent itself: {end}");
    assert_no_secret(&agent);
    drop(docker);
    assert!(agent.stop().success());
    let _ = std::fs::remove_dir_all(&dir);
}
