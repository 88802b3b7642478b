//! File opens seen where the kernel opens the file (BPF LSM `file_open`, or fentry on
//! `security_file_open`): the file is matched and reported by what the kernel opened, not by the
//! string the process passed. Only that hook set can pass these; where the kernel allows neither
//! (this project's 6.18 host refuses both with EPERM) each test says so and why, and passes
//! without checking anything: run them in a guest, `cargo xtask test --kernel 6.12 kernel_opens`.

use std::io::Write as _;

use integration_tests::{Harness, TestEnv, harness};
use runner_monitor::event::{EventDetail, FileAccess, JobKey};

fn opens(h: &Harness, job: JobKey) -> Vec<FileAccess> {
    h.job_events(job)
        .into_iter()
        .filter_map(|e| match e.detail {
            EventDetail::FileOpen(f) => Some(f),
            _ => None,
        })
        .collect()
}

/// The harness, or `None` (with the reason printed) when this kernel has no fast file-open hook.
fn kernel_open_harness(test: &str) -> Option<&'static Harness> {
    let h = harness();
    if h.kernel_opens() {
        return Some(h);
    }
    // Straight to stderr: libtest keeps a passing test's eprintln! to itself.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: this kernel loads neither the BPF LSM file_open hook nor fentry on \
         security_file_open ({}); a kernel limitation, not a pass",
        h.sensor().file_open_hooks().describe()
    );
    None
}

/// A link the agent never saw made (it was there before the job), removed on drop.
struct Link(String);

impl Drop for Link {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn a_credential_read_through_a_symlink_made_before_the_job_is_reported_as_itself() {
    let env = TestEnv::new("kopen-link");
    let credential = env.path(".aws/credentials");
    let link = Link(format!("/tmp/rm-notes-{}.txt", std::process::id()));
    std::os::unix::fs::symlink(&credential, &link.0).unwrap();
    let Some(h) = kernel_open_harness("symlink") else {
        return;
    };
    let job = h
        .start_job(&env, &format!("cat {} > /dev/null", link.0))
        .wait_success();
    h.wait_for("open through the link", |e| {
        e.job.as_ref().is_some_and(|j| j.key == job)
            && matches!(&e.detail, EventDetail::FileOpen(f) if f.path == credential)
    });
    let opens = opens(h, job);
    assert_eq!(
        opens.len(),
        1,
        "one open, not one per overlay layer: {opens:#?}"
    );
    assert!(
        opens[0].matched.iter().any(|m| m == "basename"),
        "{opens:#?}"
    );
    assert!(opens.iter().all(|f| f.path != link.0), "{opens:#?}");
}

#[test]
fn a_credential_read_through_proc_pid_root_is_reported_under_its_own_path() {
    let env = TestEnv::new("kopen-root");
    let credential = env.path(".docker/config.json");
    let Some(h) = kernel_open_harness("proc_root") else {
        return;
    };
    // The job's shell reaches the file through its own /proc/<pid>/root and a `..` detour.
    let job = h
        .start_job(
            &env,
            &format!(
                "cat /proc/$$/root{}/../.docker/config.json > /dev/null",
                env.path("notes")
            ),
        )
        .wait_success();
    let event = h.wait_for("open through /proc/<pid>/root", |e| {
        e.job.as_ref().is_some_and(|j| j.key == job)
            && matches!(&e.detail, EventDetail::FileOpen(_))
    });
    let EventDetail::FileOpen(f) = &event.detail else {
        unreachable!()
    };
    assert_eq!(f.path, credential, "{f:?}");
    assert_eq!(f.raw_path, credential, "{f:?}");
    assert!(f.resolved && !f.write, "{f:?}");
}

#[test]
fn an_ordinary_file_opened_by_a_job_crosses_nothing() {
    let env = TestEnv::new("kopen-plain");
    let Some(h) = kernel_open_harness("plain") else {
        return;
    };
    let job = h
        .start_job(
            &env,
            &format!(
                "cat {} /etc/hostname > /dev/null; cat {} > /dev/null",
                env.path("notes/readme.txt"),
                env.path(".git-credentials")
            ),
        )
        .wait_success();
    h.wait_for("the credential open", |e| {
        e.job.as_ref().is_some_and(|j| j.key == job)
            && matches!(&e.detail, EventDetail::FileOpen(_))
    });
    let opens = opens(h, job);
    assert_eq!(opens.len(), 1, "{opens:#?}");
    assert_eq!(opens[0].path, env.path(".git-credentials"));
}
