//! A job's containers: their processes join the job at exec (in the kernel), and findings about
//! them name the container.

use super::*;
use crate::event::{ContainerInfo, SentVia};

fn container(cgroup_id: u64) -> ContainerInfo {
    ContainerInfo {
        id: "ab".repeat(32),
        name: Some("web".into()),
        image: Some("busybox:latest".into()),
        runtime: "docker".into(),
        cgroup: format!("/docker/{}", "ab".repeat(32)),
        cgroup_id,
        pod: None,
        requested_as: None,
        exec_only: false,
        labels: Default::default(),
        binds: Vec::new(),
    }
}

#[test]
fn findings_about_a_job_container_process_name_the_container() {
    let mut t = Trace::new();
    t.start(1, 7, 100, "acme/app");
    // The runtime (runc, outside the job) made the container's cgroup 77 the job's.
    t.feed(2, 7, 900, 1, "runc", EventDetail::Container(container(77)));
    // A job process outside the container reads one credential: no container named.
    t.fork(2, 7, 100, 101);
    t.exec(2, 7, 101, 100, &["docker", "run"]);
    // The entrypoint joined the job at its exec, in the container's cgroup.
    t.cgroup = 77;
    t.exec(3, 7, 200, 0, &["cat"]);
    for path in [
        "/h/.aws/credentials",
        "/h/.ssh/id_rsa",
        "/h/.docker/config.json",
    ] {
        t.open(3, 7, 200, path, false);
    }
    let f = t.only(RuleId::CredentialHarvesting);
    assert_eq!(f.container, Some(container(77)), "{f:#?}");
    assert_eq!(f.process.as_ref().unwrap().pid, 200);
    t.feed(
        4,
        7,
        200,
        0,
        "cat",
        EventDetail::Exit {
            exit_code: Some(0),
            signal: None,
        },
    );
    t.cgroup = 1;
    t.feed(
        4,
        7,
        101,
        100,
        "docker",
        EventDetail::Exit {
            exit_code: Some(0),
            signal: None,
        },
    );
    t.end(5, 7, 100);
    let found = t.engine.advance(600 * S);
    t.findings.extend(found);
    // The runtime's process was never one of the job's: it is no survivor.
    assert!(
        !t.rules().contains(&RuleId::ProcessSurvivedJob),
        "{:#?}",
        t.findings
    );
}

/// Job 7 (root pid 100) whose container (cgroup `cgroup`) runs pid 300, `sleep 600`, past the
/// job's end at t = 5 s.
fn survivor_in_container(cgroup: u64) -> Trace {
    let mut t = Trace::new();
    t.start(1, 7, 100, "acme/app");
    t.feed(
        2,
        7,
        900,
        1,
        "runc",
        EventDetail::Container(container(cgroup)),
    );
    t.cgroup = cgroup;
    t.exec(2, 7, 300, 0, &["sleep", "600"]);
    t.cgroup = 1;
    t.end(5, 7, 100);
    t
}

#[test]
fn a_detached_container_surviving_its_job_is_named_in_the_survivor_finding() {
    let mut t = survivor_in_container(78);
    let found = t.engine.advance(600 * S);
    t.findings.extend(found);
    let f = t.only(RuleId::ProcessSurvivedJob);
    assert_eq!(f.process.as_ref().unwrap().pid, 300);
    assert_eq!(f.container, Some(container(78)), "{f:#?}");
}

#[test]
fn a_restarted_agent_still_names_the_container_of_a_survivor() {
    let mut t = survivor_in_container(79);
    // The agent restarts: its engine comes back from the saved state.
    let saved = t.engine.save(serde_json::value::Serializer).unwrap();
    let snapshot = serde_json::from_value(saved).unwrap();
    t.engine = Engine::restore(Arc::new(Policy::builtin()), snapshot);
    t.cgroup = 79;
    t.open(30, 7, 300, "/h/.aws/credentials", false);
    let f = t.only(RuleId::CredentialAfterJobEnd);
    assert_eq!(f.container, Some(container(79)), "{f:#?}");
}

#[test]
fn the_runtime_is_read_from_the_cgroup_path() {
    let id = "ab".repeat(32);
    for (path, runtime) in [
        (format!("/docker/{id}"), "docker"),
        (format!("/system.slice/docker-{id}.scope"), "docker"),
        (format!("/machine.slice/libpod-{id}.scope"), "podman"),
        (
            format!("/kubepods.slice/kubepods-pod1.slice/cri-containerd-{id}.scope"),
            "containerd",
        ),
        (format!("/kubepods/burstable/pod1/crio-{id}.scope"), "cri-o"),
        (format!("/kubepods/burstable/pod1/{id}"), "unknown"),
    ] {
        assert_eq!(ContainerInfo::runtime_of(&path), runtime, "{path}");
    }
}

#[test]
fn findings_about_a_pod_container_process_name_the_pod_beside_the_container() {
    let mut t = Trace::new();
    t.start(1, 7, 100, "group/app");
    let mut c = container(78);
    c.runtime = "containerd".into();
    c.pod = Some(crate::event::PodInfo {
        name: Some("runner-abc-project-42-concurrent-0".into()),
        namespace: Some("gitlab-ci".into()),
        uid: "5f0c1e2a-7b3d-4c8e-9a1f-000000000001".into(),
    });
    // The pods stage sends the container event before the first event from its cgroup.
    t.feed(2, 7, 200, 0, "sh", EventDetail::Container(c.clone()));
    t.cgroup = 78;
    t.exec(2, 7, 200, 0, &["cat"]);
    for path in [
        "/h/.aws/credentials",
        "/h/.ssh/id_rsa",
        "/h/.docker/config.json",
    ] {
        t.open(3, 7, 200, path, false);
    }
    let f = t.only(RuleId::CredentialHarvesting);
    assert_eq!(f.pod, c.pod, "{f:#?}");
    let shown = f.container.as_ref().expect("a container");
    assert_eq!(shown.pod, None, "the pod is beside the container: {f:#?}");
    assert_eq!(shown.id, c.id);
}

/// A file opened in a container is reported under its host path (`identity.rs`), which need not
/// be a credential's name: the path the process used still says what it is (a pod's
/// service-account token, bound from a file the kubelet names otherwise).
#[test]
fn a_credential_is_known_by_the_path_used_when_its_host_path_says_nothing() {
    let mut t = Trace::new();
    t.start(1, 7, 100, "group/app");
    t.exec(2, 7, 200, 100, &["cat"]);
    for (host, used) in [
        (
            "/var/lib/kubelet/pods/1/volumes/kubernetes.io~projected/x/..data/token",
            "/var/run/secrets/kubernetes.io/serviceaccount/token",
        ),
        ("/srv/h/.aws/credentials", "/h/.aws/credentials"),
        ("/tmp/key-copy", "/h/.ssh/id_rsa"),
    ] {
        t.feed(
            3,
            7,
            200,
            100,
            "cat",
            EventDetail::FileOpen(FileAccess {
                result: 3,
                via: Some(used.into()),
                ..FileAccess::at(host)
            }),
        );
    }
    let f = t.only(RuleId::CredentialHarvesting);
    let json = serde_json::to_value(f).unwrap();
    let kinds = json["kinds"].as_array().unwrap();
    assert!(
        kinds.iter().any(|k| k == "kubernetes-serviceaccount"),
        "{json:#}"
    );
    assert_eq!(kinds.len(), 3, "{json:#}");
}

#[test]
fn bytes_sent_to_the_docker_api_that_the_monitor_cannot_read_are_tampering() {
    let mut t = Trace::new();
    t.start(1, 7, 100, "acme/app");
    t.feed(
        2,
        7,
        100,
        1,
        "python3",
        EventDetail::RuntimeUnread {
            socket: Some("/var/run/docker.sock".into()),
            via: SentVia::Sendfile,
            io_uring: false,
            bytes: Some(93),
        },
    );
    let f = t.only(RuleId::AgentTamper);
    assert!(f.summary.ends_with(
        "sent 93 bytes to /var/run/docker.sock by sendfile that the monitor cannot read: a \
         container request among them would not be attributed to the job"
    ));
    assert_eq!(
        f.target.as_ref().unwrap().access,
        "sendfile to /var/run/docker.sock"
    );
    // A `sendmmsg`'s later messages: their length is unknown.
    t.feed(
        3,
        7,
        100,
        1,
        "python3",
        EventDetail::RuntimeUnread {
            socket: Some("/var/run/docker.sock".into()),
            via: SentVia::Sendmmsg,
            io_uring: false,
            bytes: None,
        },
    );
    assert!(t.findings.iter().any(|f| {
        f.rule == RuleId::AgentTamper
            && f.summary
                .contains("sent messages to /var/run/docker.sock by sendmmsg")
    }));
    // A buffer longer than the kernel's copy, where a request could go on past it.
    t.feed(
        4,
        7,
        100,
        1,
        "python3",
        EventDetail::RuntimeUnread {
            socket: Some("/var/run/docker.sock".into()),
            via: SentVia::Buffer,
            io_uring: false,
            bytes: Some(9127),
        },
    );
    assert!(t.findings.iter().any(|f| {
        f.rule == RuleId::AgentTamper
            && f.summary.contains(
                "sent 9127 bytes in one buffer to /var/run/docker.sock by write that the monitor \
                 cannot read",
            )
            && f.target.as_ref().unwrap().access == "write to /var/run/docker.sock"
    }));
    // io_uring's splice, its length not given by the kernel's layout.
    t.feed(
        5,
        7,
        100,
        1,
        "python3",
        EventDetail::RuntimeUnread {
            socket: Some("/var/run/docker.sock".into()),
            via: SentVia::Splice,
            io_uring: true,
            bytes: None,
        },
    );
    assert!(t.findings.iter().any(|f| {
        f.rule == RuleId::AgentTamper
            && f.summary
                .contains("sent bytes to /var/run/docker.sock by io_uring splice that")
            && f.target.as_ref().unwrap().access == "io_uring splice to /var/run/docker.sock"
    }));
    // Outside jobs: nothing (the kernel sends these for job connections only).
    let mut t = Trace::new();
    t.feed(
        2,
        0,
        300,
        1,
        "dockerd",
        EventDetail::RuntimeUnread {
            socket: None,
            via: SentVia::Splice,
            io_uring: false,
            bytes: Some(10),
        },
    );
    assert!(t.rules().is_empty());
}
