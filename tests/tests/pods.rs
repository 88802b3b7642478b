//! Pods as the kubelet makes them, through a real containerd's CRI (`integration_tests::cri`:
//! Debian's containerd 1.6 with its CRI plugin, started by the test, pods in the host's network
//! namespace under the kubelet's cgroup parent `/kubepods/besteffort/pod<uid>`). A GitLab
//! kubernetes-executor pod (the runner's annotations and labels, the job's `CI_*` variables in
//! its build container) is a job; what its container does is reported with `pod` and
//! `container` named through the CRI; no output holds the job token.

use std::collections::HashMap;

use integration_tests::{
    TestEnv,
    cri::{Containerd, IMAGE, PodSpec},
    live::{Agent, agent_dir, assert_no_secret, free_port, replay_alerts, run_id, wait_alert},
};

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
        (&env.home, "/builds/h"),
        "sleep 1; cat /builds/h/.aws/credentials /builds/h/.ssh/id_ed25519 \
         /builds/h/.docker/config.json > /dev/null; sleep 2",
    );
    let harvest = wait_alert(&agent, "credential-harvesting", &job_id, |_| true);
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
    let events = std::fs::read_to_string(dir.join("events.jsonl")).unwrap();
    let container = events
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
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
        (&env.home, "/h"),
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
