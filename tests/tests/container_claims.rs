//! A container registered for a job (GitLab's docker executor: the agent registers each
//! container the runner creates) before or after its runtime made its cgroup, with the real
//! kernel programs and a real cgroup named as Docker names a container's. Made before (the
//! runner's start beat the registration, or the container ran when the agent subscribed): the
//! kernel's `cgroup_mkdir` found no entry, so the agent maps the cgroup and takes in its
//! processes. Made after: the kernel maps it at its creation.

use std::{path::PathBuf, process::Command};

use integration_tests::{TestEnv, harness, live::wait_until};
use runner_monitor::{
    event::{EventDetail, JobKey},
    sensor::Claim,
};

/// A container cgroup made and removed by a test: `<v2 root>/rm-claim-<pid>/<id>`.
struct ContainerCgroup {
    dir: PathBuf,
}

impl ContainerCgroup {
    fn path(id: &str) -> PathBuf {
        let root = runner_monitor::cgroups::cgroup2_root().expect("a cgroup v2 hierarchy");
        root.join(format!("rm-claim-{}", std::process::id()))
            .join(id)
    }

    fn make(id: &str) -> Self {
        let dir = Self::path(id);
        std::fs::create_dir_all(&dir).unwrap();
        Self { dir }
    }

    fn inode(&self) -> u64 {
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&self.dir).unwrap())
    }

    /// A shell moved into the cgroup that then runs `then` (exec'd by it: the process that
    /// opens is one that joined the cgroup from outside any job).
    fn run(&self, then: &str) -> std::process::Child {
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {procs}; {then}",
                procs = self.dir.join("cgroup.procs").display()
            ))
            .spawn()
            .unwrap()
    }

    /// A process outside any job joins the cgroup and execs `cat cred`: the read is `job`'s.
    fn joiner_reads_for(&self, job: JobKey, cred: &str, what: &str) {
        let mut exec = self.run(&format!("exec cat {cred}"));
        assert!(exec.wait().unwrap().success());
        wait_read(job, self.inode(), Some(exec.id()), cred, what);
    }
}

impl Drop for ContainerCgroup {
    /// Kills what is left in it (a failed test's waiting process), then removes it.
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("cgroup.kill"), "1");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while std::fs::remove_dir(&self.dir).is_err() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if let Some(parent) = self.dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

fn container_id(n: u8) -> String {
    format!(
        "{:08x}{}",
        std::process::id(),
        format!("{n:02x}").repeat(28)
    )
}

fn new_job() -> JobKey {
    let h = harness();
    let mut sensor = h.sensor();
    let key = sensor.new_container_job_key();
    sensor
        .register_container_job(key, runner_monitor::clock::monotonic_ns())
        .unwrap();
    key
}

/// `cred`'s open by a process of `job` in cgroup `cgroup` (by process `pid`, when given).
fn wait_read(job: JobKey, cgroup: u64, pid: Option<u32>, cred: &str, what: &str) {
    harness().wait_for(what, |e| {
        e.job.as_ref().is_some_and(|j| j.key == job)
            && e.process.cgroup_id == cgroup
            && pid.is_none_or(|p| p == e.process.pid)
            && matches!(&e.detail, EventDetail::FileOpen(f) if f.path == cred)
    });
}

#[test]
fn a_container_cgroup_made_before_its_registration_is_adopted_and_one_made_after_is_mapped() {
    let h = harness();
    let env = TestEnv::new("claims");
    let cred = env.path(".git-credentials");
    let gate = env.dir.join("gate");

    // Made before: a process already runs in it (the runtime's init), waiting on a gate.
    let early = ContainerCgroup::make(&container_id(1));
    let mut init = early.run(&format!(
        "while [ ! -e {gate} ]; do sleep 0.05; done; cat {cred} > /dev/null",
        gate = gate.display()
    ));
    let procs = early.dir.join("cgroup.procs");
    wait_until("the init in its cgroup", 5, || {
        std::fs::read_to_string(&procs)
            .unwrap_or_default()
            .split_whitespace()
            .any(|p| p == init.id().to_string())
    });
    assert_eq!(h.sensor().job_of(init.id()), None);
    let job = new_job();
    let claim = h.sensor().claim_container(&container_id(1), job).unwrap();
    assert_eq!(
        claim,
        Claim::Adopted {
            path: format!("/rm-claim-{}/{}", std::process::id(), container_id(1)),
            cgroup: early.inode(),
        }
    );
    // Its process is the job's, and so is what it forks and reads.
    assert_eq!(h.sensor().job_of(init.id()), Some(job));
    std::fs::write(&gate, "").unwrap();
    assert!(init.wait().unwrap().success());
    wait_read(
        job,
        early.inode(),
        None,
        &cred,
        "the adopted process's read",
    );
    // A process that joins the cgroup later (a `docker exec`) is the job's at its exec.
    early.joiner_reads_for(job, &cred, "the later process's read");
    // Registered again (the daemon's events followed anew): kept, nothing adopted twice.
    assert_eq!(
        h.sensor().claim_container(&container_id(1), job).unwrap(),
        Claim::Kept
    );

    // Made after: the kernel maps it at its creation, from the entry.
    let other = new_job();
    assert_eq!(
        h.sensor().claim_container(&container_id(2), other).unwrap(),
        Claim::Requested
    );
    let late = ContainerCgroup::make(&container_id(2));
    late.joiner_reads_for(other, &cred, "the read in the cgroup made after");
}
