//! Job lifecycle: survivors, grace periods, stages, policy rules, bounded tables, dedup.

use super::*;

#[test]
fn clean_job_produces_nothing() {
    let mut t = Trace::new();
    t.start(1, 7, 100, "acme/app");
    t.fork(2, 7, 100, 101);
    t.exec(2, 7, 101, 100, &["git", "fetch"]);
    t.open(3, 7, 101, "/home/ci/.git-credentials", false);
    t.connect(3, 7, 101, "127.0.0.1", 8080);
    t.feed(
        4,
        7,
        101,
        100,
        "git",
        EventDetail::Exit {
            exit_code: Some(0),
            signal: None,
        },
    );
    t.end(5, 7, 100);
    t.engine.advance(600 * S);
    assert!(t.findings.is_empty(), "{:#?}", t.findings);
}

#[test]
fn survivor_reading_aws_credentials_ten_minutes_after_job_end_is_critical() {
    let mut t = Trace::new();
    t.start(1, 7, 100, "acme/app");
    t.fork(2, 7, 100, 101);
    t.exec(
        2,
        7,
        101,
        100,
        &["nohup", "sh", "-c", "sleep 600; cat ~/.aws/credentials"],
    );
    t.end(10, 7, 100);
    t.open(610, 7, 101, "/home/ci/.aws/credentials", false);
    let f = t.only(RuleId::CredentialAfterJobEnd);
    assert_eq!(f.severity, Severity::Critical);
    assert_eq!(f.credential.as_ref().unwrap().kind, "aws");
    assert_eq!(
        f.job.as_ref().unwrap().info.repository.as_deref(),
        Some("acme/app")
    );
    assert!(f.job.as_ref().unwrap().ended);
    assert!(
        f.summary.contains("600 s after the job ended"),
        "{}",
        f.summary
    );
    assert_eq!(f.mitre.id, "T1552.001");
    // The survivor itself was also reported, once the grace period passed, naming nohup.
    let s = t.only(RuleId::ProcessSurvivedJob);
    assert_eq!(s.process.as_ref().unwrap().pid, 101);
    assert!(
        s.escape.contains(&"re-parented".to_owned()),
        "{:?}",
        s.escape
    );
    assert!(s.escape.contains(&"nohup".to_owned()), "{:?}", s.escape);
}

#[test]
fn survivors_wait_for_the_grace_period_from_policy() {
    let policy = Policy::parse(
        "[agent]\ngrace_period_seconds = 30\n[[rules]]\nrepository = \"acme/slow\"\ngrace_period_seconds = 120\n",
        "t.toml",
    )
    .unwrap();
    let mut t = Trace::with_policy(policy);
    t.start(0, 1, 100, "acme/slow");
    t.fork(1, 1, 100, 101);
    t.end(10, 1, 100);
    t.findings.extend(t.engine.advance(100 * S));
    assert!(t.findings.is_empty(), "rule grace 120 s: {:#?}", t.findings);
    t.findings.extend(t.engine.advance(131 * S));
    assert_eq!(t.rules(), [RuleId::ProcessSurvivedJob]);
}

#[test]
fn suppression_and_severity_override_apply_per_repository() {
    let policy = Policy::parse(
        &format!(
            "{}\n[[rules]]\nrepository = \"acme/release\"\nseverity = {{ credential-left-behind = \"low\" }}\n\
             [[rules]]\nrepository = \"acme/docs\"\nsuppress = [{{ rule = \"credential-left-behind\", reason = \"docs publish keeps its token\" }}]\n",
            crate::policy::DEFAULT_POLICY
        ),
        "t.toml",
    )
    .unwrap();
    let mut t = Trace::with_policy(policy);
    for (job, repo) in [(1, "acme/release"), (2, "acme/docs")] {
        t.start(1, job, 100 + job as u32, repo);
        t.open(
            2,
            job,
            100 + job as u32,
            &format!("/home/ci{job}/.pypirc"),
            true,
        );
        t.end(3, job, 100 + job as u32);
    }
    assert_eq!(t.rules(), [RuleId::CredentialLeftBehind]);
    assert_eq!(t.findings[0].severity, Severity::Low);
    assert_eq!(t.engine.stats().suppressed, 1);
}

#[test]
fn tables_are_bounded_and_evictions_counted() {
    let policy = Policy::parse(
        &crate::policy::DEFAULT_POLICY.replace("processes = 65536", "processes = 100"),
        "t.toml",
    )
    .unwrap();
    let mut t = Trace::with_policy(policy);
    t.start(1, 1, 10, "acme/app");
    for child in 0..1000 {
        t.fork(2, 1, 10, 1000 + child);
    }
    assert!(t.engine.tracked_processes() <= 100);
    assert!(t.engine.stats().evicted_processes >= 900);
}

#[test]
fn gitlab_stages_are_one_job_that_ends_after_the_last_stage() {
    let mut t = Trace::new();
    let info = JobInfo {
        id: "4242".into(),
        platform: Some("gitlab".into()),
        repository: Some("group/project".into()),
        ..JobInfo::default()
    };
    // Stage 1 (kernel job 1, root 100) writes a credential; its root exits (the kernel marks
    // kernel job 1 ended).
    t.feed_as(
        1,
        1,
        true,
        100,
        50,
        "bash",
        EventDetail::JobStart(info.clone()),
    );
    t.fork(1, 1, 100, 101);
    t.open(2, 1, 101, "/home/gitlab-runner/.npmrc", true);
    t.feed(
        2,
        1,
        101,
        100,
        "npm",
        EventDetail::Exit {
            exit_code: Some(0),
            signal: None,
        },
    );
    t.feed_as(
        3,
        1,
        true,
        100,
        50,
        "bash",
        EventDetail::Exit {
            exit_code: Some(0),
            signal: None,
        },
    );
    t.ended.insert(1);
    // Stage 2 (kernel job 2) starts within the gap, reads it, leaves a process behind.
    t.feed_as(4, 2, true, 200, 50, "bash", EventDetail::JobStart(info));
    t.fork(5, 2, 200, 201);
    t.open(5, 2, 201, "/home/gitlab-runner/.npmrc", false);
    t.fork(5, 2, 201, 202);
    t.feed(
        6,
        2,
        201,
        200,
        "cat",
        EventDetail::Exit {
            exit_code: Some(0),
            signal: None,
        },
    );
    t.feed_as(
        7,
        2,
        true,
        200,
        50,
        "bash",
        EventDetail::Exit {
            exit_code: Some(0),
            signal: None,
        },
    );
    t.ended.insert(2);
    assert!(
        t.findings.is_empty(),
        "stages of one job are not reuse: {:#?}",
        t.findings
    );
    // No stage follows: the job ends at the last stage's end (7 s); what it wrote is left
    // behind; the leftover process survives it.
    t.findings.extend(t.engine.advance(20 * S));
    let left = t.only(RuleId::CredentialLeftBehind);
    assert_eq!(left.job.as_ref().unwrap().info.id, "4242");
    assert_eq!(left.time_ns, 7 * S);
    t.findings.extend(t.engine.advance(40 * S));
    let survivor = t.only(RuleId::ProcessSurvivedJob);
    assert_eq!(survivor.process.as_ref().unwrap().pid, 202);
    assert_eq!(t.engine.active_jobs(), 0);
}

#[test]
fn a_thousand_reads_are_one_finding() {
    let mut t = Trace::new();
    t.start(1, 1, 100, "acme/app");
    t.end(2, 1, 100);
    for i in 0..1000 {
        t.open(3 + i / 100, 1, 100, "/home/ci/.git-credentials", false);
    }
    assert_eq!(t.rules(), [RuleId::CredentialAfterJobEnd]);
    assert_eq!(t.engine.stats().duplicates, 999);
}
