//! A Docker daemon a job reaches through a mount namespace of its own, as in the runner pods of
//! actions-runner-controller's dind mode: the `dind` sidecar's dockerd serves its socket in a
//! volume that the runner container mounts at the path a host's daemon has, and makes its
//! containers' cgroups inside its own (`.../pod<uid>/<dind container id>/docker/<id>`). Here the
//! sidecar is a second test daemon whose cgroups nest under a kubepods-style path, and the job
//! binds its socket over the first daemon's path in a private mount namespace (`unshare -m`).
//! Real dockerd twice, real agent, a GitHub-style job.

use integration_tests::{
    TestEnv,
    docker::{Docker, assert_container, assert_requested_as, create_outside_jobs},
    live::{agent, assert_no_secret, github_job, run_id, wait_alert},
};

/// The kubepods-style cgroup the sidecar's containers nest in, in every hierarchy it was made
/// in (dockerd makes the parents and leaves them): removed when dropped, after the daemon.
struct PodCgroup(String);

impl Drop for PodCgroup {
    fn drop(&mut self) {
        let top = self
            .0
            .split('/')
            .find(|p| !p.is_empty())
            .unwrap_or_default();
        let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
            return;
        };
        for hierarchy in hierarchies.flatten() {
            let mut dirs: Vec<_> = walk(&hierarchy.path().join(top));
            // The deepest first.
            dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            for dir in dirs {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut dirs = vec![dir.to_owned()];
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            dirs.extend(walk(&entry.path()));
        }
    }
    dirs
}

/// A container named `web` on each daemon, created outside jobs; the job starts `web` by name at
/// the host daemon's socket path, which its mount namespace binds to the sidecar's socket. The
/// sidecar's `web` is the job's from its first instruction, named and confirmed by that daemon,
/// its cgroup nested in the pod's; the host daemon's `web` (the one the agent would find at that
/// path) is asked nothing of: before, the agent resolved the name there and the sidecar's
/// container was nobody's.
#[test]
fn a_dind_sidecars_container_a_job_starts_by_name_is_the_job() {
    let agent = agent();
    let host = Docker::start("dind-host");
    let pid = std::process::id();
    let pod = PodCgroup(format!(
        "/rm-dind-{pid}/kubepods/burstable/pod{pid:08x}-1111-2222-3333-444455556666/{:f>64}/docker",
        format!("{pid:x}")
    ));
    let sidecar = Docker::start_with(
        "dind-sidecar",
        "docker.sock",
        &[&format!("--cgroup-parent={}", pod.0)],
    );
    let env = TestEnv::new("containers-dind");
    let run = run_id(52);
    let name = format!("rm-dind-{run}");
    let decoy = create_outside_jobs(&host, &env, &name);
    let theirs = create_outside_jobs(&sidecar, &env, &name);
    let path = host.socket.display();
    let step = format!(
        "unshare -m sh -c 'mount --bind {sidecar} {path} && {cli} start {name} > /dev/null && {cli} wait {name} > /dev/null'",
        sidecar = sidecar.socket.display(),
        cli = host.shell_cli(),
    );
    github_job(&env, agent, &run, "acme/dind", &step);
    let id = format!("{run}/build");
    let harvest = wait_alert(agent, "credential-harvesting", &id, |_| true);
    assert_eq!(harvest["container"]["id"], theirs.as_str(), "{harvest}");
    assert_container(&harvest, Some(&name));
    assert_requested_as(&harvest, "name", &name);
    let cgroup = harvest["container"]["cgroup"].as_str().unwrap_or_default();
    assert_eq!(cgroup, format!("{}/{theirs}", pod.0), "{harvest}");
    // Nested below the kubelet's layout: no pod is claimed for it.
    assert!(harvest["pod"].is_null(), "{harvest}");
    let state = host.run(&["inspect", "-f", "{{.State.StartedAt}}", &decoy]);
    assert!(
        state.starts_with("0001-01-01"),
        "the host's {name} ran: {state}"
    );
    assert_no_secret(agent);
}
