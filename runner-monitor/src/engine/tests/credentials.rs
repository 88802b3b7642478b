//! Credentials across jobs: reuse by path and by fingerprint, left behind.

use super::*;

#[test]
fn docker_login_in_one_job_read_by_another_repository_is_cross_job_reuse() {
    let mut t = Trace::new();
    t.start(1, 1, 100, "acme/release");
    t.open(2, 1, 100, "/home/ci/.docker/config.json", true);
    t.end(3, 1, 100);
    // Left behind at the end of the first job.
    let left = t.only(RuleId::CredentialLeftBehind).clone();
    assert_eq!(
        left.credential.as_ref().unwrap().path,
        "/home/ci/.docker/config.json"
    );
    t.start(10, 2, 200, "evil/fork");
    t.open(11, 2, 200, "/home/ci/.docker/config.json", false);
    let f = t.only(RuleId::CrossJobCredentialReuse);
    assert_eq!(f.severity, Severity::Critical, "another repository");
    assert_eq!(
        f.origin_job.as_ref().unwrap().info.repository.as_deref(),
        Some("acme/release")
    );
    assert_eq!(
        f.job.as_ref().unwrap().info.repository.as_deref(),
        Some("evil/fork")
    );
}

#[test]
fn reuse_within_the_same_repository_is_high_not_critical() {
    let mut t = Trace::new();
    t.start(1, 1, 100, "acme/app");
    t.open(2, 1, 100, "/home/ci/.npmrc", true);
    t.end(3, 1, 100);
    t.start(4, 2, 200, "acme/app");
    t.open(5, 2, 200, "/home/ci/.npmrc", false);
    assert_eq!(
        t.only(RuleId::CrossJobCredentialReuse).severity,
        Severity::High
    );
}

/// The runner's end request can reach the engine before the write it follows: a write is reported
/// once the writer closed the file and it was hashed.
#[test]
fn a_write_of_the_job_seen_after_its_end_is_left_behind() {
    let mut t = Trace::new();
    t.start(1, 1, 100, "acme/release");
    t.end(3, 1, 100);
    assert!(t.findings.is_empty(), "{:#?}", t.findings);
    // Written at 2 s, while the job ran (the kernel did not mark it ended), seen now.
    t.ended.remove(&1);
    t.open(2, 1, 101, "/home/ci/.npmrc", true);
    let left = t.only(RuleId::CredentialLeftBehind).clone();
    assert_eq!(left.credential.as_ref().unwrap().path, "/home/ci/.npmrc");
    assert_eq!(left.time_ns, 3 * S, "at the job's end");
    // A survivor's write after the end is credential-after-job-end, not left behind as well.
    t.ended.insert(1);
    t.findings.clear();
    t.open(4, 1, 101, "/home/ci/.docker/config.json", true);
    assert_eq!(t.rules(), [RuleId::CredentialAfterJobEnd]);
}

#[test]
fn a_credential_removed_before_the_end_is_not_left_behind() {
    let mut t = Trace::new();
    t.start(1, 1, 100, "acme/app");
    t.open(2, 1, 100, "/home/ci/.docker/config.json", true);
    t.feed(
        3,
        1,
        100,
        1,
        "rm",
        EventDetail::FileUnlink(FileAccess::at("/home/ci/.docker/config.json")),
    );
    t.end(4, 1, 100);
    assert!(t.findings.is_empty(), "{:#?}", t.findings);
}

#[test]
fn a_token_copied_to_another_path_is_recognised_by_its_fingerprint() {
    let mut t = Trace::new();
    t.start(1, 1, 100, "acme/release");
    t.open(2, 1, 101, "/home/ci/.npmrc", true);
    // The writer exited; the agent hashed what it wrote.
    t.feed(
        3,
        1,
        101,
        100,
        "npm",
        EventDetail::CredentialFingerprint {
            path: "/home/ci/.npmrc".into(),
            fingerprint: "hmac-sha256:aa".into(),
        },
    );
    t.end(4, 1, 100);
    t.findings.clear();
    t.start(10, 2, 200, "evil/fork");
    t.feed(
        11,
        2,
        200,
        1,
        "cat",
        EventDetail::FileOpen(FileAccess {
            result: 3,
            matched: vec!["basename".into()],
            fingerprint: Some("hmac-sha256:aa".into()),
            ..FileAccess::at("/tmp/loot/.npmrc")
        }),
    );
    let f = t.only(RuleId::CrossJobCredentialReuse);
    assert_eq!(f.severity, Severity::Critical);
    assert_eq!(
        f.credential.as_ref().unwrap().fingerprint.as_deref(),
        Some("hmac-sha256:aa")
    );
    assert!(
        f.summary.contains("same content, another path"),
        "{}",
        f.summary
    );
}

#[test]
fn reuse_by_a_job_not_yet_identified_is_not_claimed_to_cross_repositories() {
    let mut t = Trace::new();
    t.start(1, 1, 100, "acme/release");
    t.open(2, 1, 100, "/home/ci/.npmrc", true);
    t.end(3, 1, 100);
    // Job 2's identity is not known yet (no job_start): its repository is unknown.
    t.open(4, 2, 200, "/home/ci/.npmrc", false);
    let f = t.only(RuleId::CrossJobCredentialReuse);
    assert_eq!(f.severity, Severity::High);
    assert!(!f.summary.contains("another repository"), "{}", f.summary);
}

#[test]
fn the_fingerprint_of_what_an_exited_writer_wrote_does_not_bring_the_writer_back_as_a_survivor() {
    let mut t = Trace::new();
    t.start(1, 1, 100, "acme/release");
    t.fork(2, 1, 100, 101);
    t.open(3, 1, 101, "/home/ci/.npmrc", true);
    t.feed(
        4,
        1,
        101,
        100,
        "sh",
        EventDetail::Exit {
            exit_code: Some(0),
            signal: None,
        },
    );
    // The agent hashes what the writer wrote once it exited: an event of the exited process.
    t.feed(
        4,
        1,
        101,
        100,
        "sh",
        EventDetail::CredentialFingerprint {
            path: "/home/ci/.npmrc".into(),
            fingerprint: "hmac-sha256:aa".into(),
        },
    );
    t.end(5, 1, 100);
    t.findings.extend(t.engine.advance(1000 * S));
    assert!(
        !t.rules().contains(&RuleId::ProcessSurvivedJob),
        "{:#?}",
        t.findings
    );
    assert!(t.rules().contains(&RuleId::CredentialLeftBehind));
}

#[test]
fn a_survivor_opening_a_credential_through_io_uring_is_caught_and_said_so() {
    let mut t = Trace::new();
    t.start(1, 1, 100, "acme/app");
    t.end(3, 1, 100);
    t.findings.clear();
    t.feed(
        5,
        1,
        101,
        1,
        "uring-cat",
        EventDetail::FileOpen(FileAccess {
            io_uring: true,
            matched: vec!["dirname".into()],
            ..FileAccess::at("/home/ci/.aws/credentials")
        }),
    );
    let f = t.only(RuleId::CredentialAfterJobEnd);
    assert_eq!(f.credential.as_ref().unwrap().kind, "aws");
    // Seen at submission: the summary does not claim the open succeeded.
    assert!(
        f.summary
            .contains("submitted an io_uring open of aws credential /home/ci/.aws/credentials"),
        "{}",
        f.summary
    );
}
