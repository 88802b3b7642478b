//! Pods as the kubelet makes them, through a real containerd's CRI (`integration_tests::cri`:
//! Debian's containerd 1.6 with its CRI plugin, started by the test, pods in the host's network
//! namespace under the kubelet's cgroup parent `/kubepods/besteffort/pod<uid>`). A GitLab
//! kubernetes-executor pod (the runner's annotations and labels, the job's `CI_*` variables in
//! its build container) is a job; what its container does is reported with `pod` and
//! `container` named through the CRI; no output holds the job token. An actions-runner-controller
//! runner pod in kubernetes mode: the steps exec'd into its `<runner>-workflow` pod's container
//! `job` are the runner's job.

use std::collections::HashMap;

use integration_tests::{
    TestEnv,
    cri::{Containerd, IMAGE, PodSpec},
    live::{
        Agent, agent_dir, assert_no_secret, free_port, json_lines, replay_alerts, run_id,
        wait_alert,
    },
};

/// Where the kubelet mounts a pod's service-account token.
const SA_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn a_gitlab_kubernetes_executor_pod_is_a_job_and_findings_name_pod_and_container() {
    let mut containerd = Containerd::start("gitlab");
    let dir = agent_dir("pods");
    let socket = containerd.socket.display().to_string();
    let agent = Agent::launch(&dir, free_port(), &["--cri-socket", &socket]);
    let env = TestEnv::new("pods-gitlab");
    let job_id = run_id(1);
    let uid = format!("5f0c1e2a-7b3d-4c8e-9a1f-{:012x}", std::process::id());
    let pod = PodSpec {
        name: format!("runner-abc123-project-42-concurrent-0-{job_id}"),
        namespace: "gitlab-ci".into(),
        uid: uid.clone(),
        labels: map(&[
            (
                "job.runner.gitlab.com/pod",
                "runner-abc123-project-42-concurrent-0",
            ),
            ("project.runner.gitlab.com/id", "42"),
            ("project.runner.gitlab.com/name", "app"),
            ("project.runner.gitlab.com/namespace", "group"),
        ]),
        annotations: map(&[
            ("job.runner.gitlab.com/id", &job_id),
            (
                "job.runner.gitlab.com/url",
                &format!("https://gitlab.example.test/group/app/-/jobs/{job_id}"),
            ),
            ("job.runner.gitlab.com/name", "test"),
            ("job.runner.gitlab.com/ref", "main"),
            ("project.runner.gitlab.com/id", "42"),
        ]),
    };
    // The pod's service-account token, mounted read-only where the kubelet mounts it.
    let token = env.dir.join("sa-token");
    std::fs::write(&token, integration_tests::CANARY).unwrap();
    let id = containerd.run(
        &pod,
        "build",
        &[
            ("GITLAB_CI", "true"),
            ("CI", "true"),
            ("CI_JOB_ID", &job_id),
            ("CI_PROJECT_PATH", "group/app"),
            ("CI_PIPELINE_ID", "77"),
            ("CI_JOB_NAME", "test"),
            ("CI_RUNNER_ID", "9"),
            ("CI_JOB_TOKEN", integration_tests::CANARY),
        ],
        &[(&env.home, "/builds/h"), (&token, SA_TOKEN)],
        &format!(
            "sleep 1; cat {SA_TOKEN} /builds/h/.aws/credentials /builds/h/.ssh/id_ed25519 \
             > /dev/null; sleep 2"
        ),
    );
    let harvest = wait_alert(&agent, "credential-harvesting", &job_id, |_| true);
    // The service-account token is one of the kinds, read by the job in its pod.
    assert!(
        harvest["kinds"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "kubernetes-serviceaccount")),
        "{harvest}"
    );
    assert_eq!(harvest["job"]["platform"], "gitlab", "{harvest}");
    assert_eq!(harvest["job"]["repository"], "group/app", "{harvest}");
    let c = &harvest["container"];
    assert_eq!(c["id"], id.as_str(), "{harvest}");
    assert_eq!(c["name"], "build", "{harvest}");
    assert_eq!(c["image"], IMAGE, "{harvest}");
    assert_eq!(c["runtime"], "containerd", "{harvest}");
    assert_eq!(
        c["cgroup"],
        format!("/kubepods/besteffort/pod{uid}/{id}").as_str(),
        "{harvest}"
    );
    assert!(c.get("pod").is_none(), "pod is beside container: {harvest}");
    let p = &harvest["pod"];
    assert_eq!(p["name"], pod.name.as_str(), "{harvest}");
    assert_eq!(p["namespace"], "gitlab-ci", "{harvest}");
    assert_eq!(p["uid"], uid.as_str(), "{harvest}");
    // The event trace has the container event with its pod, for replay.
    let container = json_lines(&dir.join("events.jsonl"))
        .into_iter()
        .find(|e| e["kind"] == "container" && e["id"] == id.as_str() && e["name"] == "build")
        .unwrap_or_else(|| panic!("no named container event in the trace"));
    assert_eq!(container["pod"]["name"], pod.name.as_str(), "{container}");
    // Replay of that trace names the same pod and container.
    let again = replay_alerts(&dir)
        .into_iter()
        .find(|a| a["rule"] == "credential-harvesting" && a["job"]["id"] == job_id.as_str())
        .expect("replay raises the finding");
    assert_eq!(again["pod"], harvest["pod"], "{again}");
    assert_eq!(again["container"], harvest["container"], "{again}");
    drop(containerd);
    assert_no_secret(&agent);
}

/// A pod outside any job (no CI variables: the node's own workloads) reading credentials is
/// nobody's job: nothing is reported about it.
#[test]
fn a_pod_outside_any_job_produces_nothing() {
    let mut containerd = Containerd::start("plain");
    let dir = agent_dir("pods-plain");
    let socket = containerd.socket.display().to_string();
    let agent = Agent::launch(&dir, free_port(), &["--cri-socket", &socket]);
    let env = TestEnv::new("pods-plain");
    let uid = format!("6a1d2f3b-8c4e-4d9f-8b2a-{:012x}", std::process::id());
    let pod = PodSpec {
        name: "node-agent-x7k2p".into(),
        namespace: "kube-system".into(),
        uid: uid.clone(),
        labels: HashMap::new(),
        annotations: HashMap::new(),
    };
    containerd.run(
        &pod,
        "agent",
        &[],
        &[(&env.home, "/h")],
        "cat /h/.aws/credentials /h/.ssh/id_ed25519 /h/.docker/config.json > /dev/null",
    );
    std::thread::sleep(std::time::Duration::from_secs(3));
    let alerts = integration_tests::live::alerts(&agent);
    assert!(
        alerts.iter().all(|a| !a.to_string().contains(&uid)),
        "{alerts:#?}"
    );
    drop(containerd);
}

/// A pod of `name` in `namespace`, without labels or annotations unless given.
fn pod(name: &str, namespace: &str, tag: u32, labels: &[(&str, &str)]) -> PodSpec {
    PodSpec {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        uid: format!("7b2e4c6d-{tag:04x}-4e1f-9a3b-{:012x}", std::process::id()),
        labels: map(labels),
        annotations: HashMap::new(),
    }
}

/// Waits until the agent logged that a container of pod `pod` joined its runner pod's job: the
/// container hooks exec a step only once the pod is Running, which the kubelet reports after
/// its next relist (every second); the test waits for the link instead of guessing a delay.
fn wait_linked(agent: &Agent, pod: &str) {
    integration_tests::live::wait_until("the workflow pod's link to its job", 15, || {
        integration_tests::live::agent_log(&agent.dir)
            .lines()
            .any(|l| l.contains("workflow pod container is its job") && l.contains(pod))
    });
}

/// actions-runner-controller's kubernetes mode as the kubelet runs it: the runner pod's
/// container runs the GitHub job; the container hooks make `<runner pod>-workflow` (label
/// `runner-pod`) whose container `job` idles, and exec each step into it (CRI `ExecSync`:
/// containerd-shim starts the step in the `job` container, outside the job's process tree and
/// without its environment). The steps are the job: a step reading the service-account token
/// and mounted credentials is `credential-harvesting` for the GitHub job naming the workflow pod
/// and container `job`; a process a step left behind is a `process-survived-job` naming them
/// once the job ended; a step exec'd after the end reading the token is
/// `credential-after-job-end`. No output holds the token.
#[test]
fn an_arc_workflow_pods_exec_steps_are_the_runner_pods_job() {
    let mut containerd = Containerd::start("arc");
    let dir = agent_dir("pods-arc");
    let socket = containerd.socket.display().to_string();
    let agent = Agent::launch(&dir, free_port(), &["--cri-socket", &socket]);
    let env = TestEnv::new("pods-arc");
    let token = env.dir.join("sa-token");
    std::fs::write(&token, integration_tests::CANARY).unwrap();
    let done = env.dir.join("done");
    std::fs::create_dir_all(&done).unwrap();
    let run = run_id(3);
    let job_id = format!("{run}/build");
    let runner_name = format!("arc-runner-set-{run}-runner-x7k2p");
    let runner = pod(&runner_name, "arc-runners", 1, &[]);
    // The runner container: the job's process runs until the test says the job is over.
    containerd.run(
        &runner,
        "runner",
        &[
            ("GITHUB_ACTIONS", "true"),
            ("GITHUB_RUN_ID", &run),
            ("GITHUB_JOB", "build"),
            ("GITHUB_REPOSITORY", "acme/app"),
            ("GITHUB_WORKFLOW", "CI"),
            ("RUNNER_NAME", &runner_name),
            ("ACTIONS_RUNNER_POD_NAME", &runner_name),
            ("GITHUB_TOKEN", integration_tests::CANARY),
        ],
        &[(&done, "/done")],
        "while [ ! -e /done/now ]; do sleep 1; done",
    );
    let workflow_name = format!("{runner_name}-workflow");
    let workflow = pod(
        &workflow_name,
        "arc-runners",
        2,
        &[("runner-pod", &runner_name)],
    );
    let job = containerd.run(
        &workflow,
        "job",
        &[],
        &[(&env.home, "/github/home"), (&token, SA_TOKEN)],
        "sleep 1000000",
    );
    // A container action's step pod (`<runner pod>-step-<hex>`, the same label): the hooks
    // exec the action into its container `job` too.
    let step_name = format!("{runner_name}-step-3f9a1c2b");
    let step_pod = pod(
        &step_name,
        "arc-runners",
        3,
        &[("runner-pod", &runner_name)],
    );
    let action = containerd.run(
        &step_pod,
        "job",
        &[],
        &[(&token, SA_TOKEN)],
        "sleep 1000000",
    );
    let started = std::time::Instant::now();
    wait_linked(&agent, &workflow_name);
    eprintln!(
        "workflow pod linked to the job within {} ms of its container's start (looked every 250 ms)",
        started.elapsed().as_millis()
    );
    let step = format!(
        "cat {SA_TOKEN} /github/home/.aws/credentials /github/home/.ssh/id_ed25519 > /dev/null"
    );
    assert_eq!(containerd.exec(&job, &step), 0);
    let harvest = wait_alert(&agent, "credential-harvesting", &job_id, |_| true);
    assert_eq!(harvest["job"]["platform"], "github", "{harvest}");
    assert_eq!(harvest["job"]["repository"], "acme/app", "{harvest}");
    assert_eq!(harvest["container"]["id"], job.as_str(), "{harvest}");
    assert_eq!(harvest["container"]["name"], "job", "{harvest}");
    assert_eq!(harvest["pod"]["name"], workflow_name.as_str(), "{harvest}");
    assert_eq!(harvest["pod"]["namespace"], "arc-runners", "{harvest}");
    assert_eq!(harvest["pod"]["uid"], workflow.uid.as_str(), "{harvest}");
    assert!(
        harvest["kinds"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "kubernetes-serviceaccount")),
        "{harvest}"
    );
    // A step leaves a process behind; then the job ends with the workflow pod still running.
    assert_eq!(
        containerd.exec(&job, "sleep 600 < /dev/null > /dev/null 2>&1 &"),
        0
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    std::fs::write(done.join("now"), "").unwrap();
    let survivor = wait_alert(&agent, "process-survived-job", &job_id, |a| {
        a["container"]["name"] == "job"
    });
    assert_eq!(
        survivor["pod"]["name"],
        workflow_name.as_str(),
        "{survivor}"
    );
    // A step exec'd after the end is judged as after the end.
    assert_eq!(
        containerd.exec(&job, &format!("cat {SA_TOKEN} > /dev/null")),
        0
    );
    let after = wait_alert(&agent, "credential-after-job-end", &job_id, |a| {
        a["container"]["name"] == "job"
    });
    assert_eq!(after["pod"]["name"], workflow_name.as_str(), "{after}");
    // The step pod's container is the job's as well.
    wait_linked(&agent, &step_name);
    assert_eq!(
        containerd.exec(&action, &format!("cat {SA_TOKEN} > /dev/null")),
        0
    );
    let in_step = wait_alert(&agent, "credential-after-job-end", &job_id, |a| {
        a["pod"]["name"] == step_name.as_str()
    });
    assert_eq!(in_step["container"]["id"], action.as_str(), "{in_step}");
    drop(containerd);
    assert_no_secret(&agent);
}

/// A `<name>-workflow` pod whose `<name>` pod runs no job (the node's own workloads) is
/// nobody's: what is exec'd into it produces nothing.
#[test]
fn a_workflow_pod_of_a_pod_that_is_no_job_is_nobodys() {
    let mut containerd = Containerd::start("arc-none");
    let dir = agent_dir("pods-arc-none");
    let socket = containerd.socket.display().to_string();
    let agent = Agent::launch(&dir, free_port(), &["--cri-socket", &socket]);
    let env = TestEnv::new("pods-arc-none");
    let name = format!("batch-{}", std::process::id());
    containerd.run(
        &pod(&name, "arc-runners", 3, &[]),
        "main",
        &[],
        &[(&env.home, "/h")],
        "sleep 1000000",
    );
    let workflow = pod(
        &format!("{name}-workflow"),
        "arc-runners",
        4,
        &[("runner-pod", &name)],
    );
    let job = containerd.run(
        &workflow,
        "job",
        &[],
        &[(&env.home, "/github/home")],
        "sleep 1000000",
    );
    // Longer than the agent takes to link a job pod's workflow pod.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let step = "cat /github/home/.aws/credentials /github/home/.ssh/id_ed25519 \
                /github/home/.docker/config.json > /dev/null";
    assert_eq!(containerd.exec(&job, step), 0);
    std::thread::sleep(std::time::Duration::from_secs(3));
    let alerts = integration_tests::live::alerts(&agent);
    assert!(
        alerts.iter().all(|a| !a.to_string().contains(&name)),
        "{alerts:#?}"
    );
    assert!(
        !integration_tests::live::agent_log(&dir).contains("workflow pod container is its job"),
        "linked: {}",
        integration_tests::live::agent_log(&dir)
    );
    drop(containerd);
}
