//! Ends that cannot be gamed: a staged job's end is inferred `stage_gap_seconds` after its last
//! stage; what its survivors did in between is judged as after the end.

use super::*;

fn gitlab(id: &str) -> JobInfo {
    JobInfo {
        id: id.into(),
        platform: Some("gitlab".into()),
        repository: Some("group/project".into()),
        ..JobInfo::default()
    }
}

/// Stage 1 (kernel job 1, root 100) leaves `setsid sh -c 'sleep 4; cat ~/.aws/credentials'`
/// (pid 101) and exits at 3 s.
fn stage_leaving_a_survivor(t: &mut Trace) {
    t.feed_as(
        1,
        1,
        true,
        100,
        50,
        "bash",
        EventDetail::JobStart(gitlab("77")),
    );
    t.fork(2, 1, 100, 101);
    t.exec(
        2,
        1,
        101,
        100,
        &["setsid", "sh", "-c", "sleep 4; cat ~/.aws/credentials"],
    );
    t.exec(
        2,
        1,
        101,
        100,
        &["sh", "-c", "sleep 4; cat ~/.aws/credentials"],
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
}

#[test]
fn a_survivor_acting_inside_the_stage_gap_is_judged_after_the_true_end() {
    let mut t = Trace::new();
    stage_leaving_a_survivor(&mut t);
    // 4 s after the last stage ended, inside the 10 s stage gap.
    t.open(7, 1, 101, "/home/gitlab-runner/.aws/credentials", false);
    t.connect(7, 1, 101, "203.0.113.9", 443);
    t.feed(
        8,
        1,
        101,
        100,
        "sh",
        EventDetail::Exit {
            exit_code: Some(0),
            signal: None,
        },
    );
    assert!(
        !t.rules().contains(&RuleId::CredentialAfterJobEnd),
        "the end is not known yet: {:#?}",
        t.findings
    );
    // No stage followed: at 13 s the job is known to have ended at 3 s.
    t.findings.extend(t.engine.advance(13 * S));
    let after: Vec<&Finding> = t
        .findings
        .iter()
        .filter(|f| f.rule == RuleId::CredentialAfterJobEnd)
        .collect();
    assert_eq!(after.len(), 2, "{:#?}", t.findings);
    let read = after.iter().find(|f| f.credential.is_some()).unwrap();
    assert_eq!(read.time_ns, 7 * S);
    assert_eq!(read.severity, Severity::Critical);
    let job = read.job.as_ref().unwrap();
    assert_eq!(job.info.id, "77");
    assert!(job.ended);
    assert_eq!(
        job.ended_ns,
        Some(3 * S),
        "the true end, not the inferred one"
    );
    assert!(
        read.summary.contains("4 s after the job ended"),
        "{}",
        read.summary
    );
    let connect = after.iter().find(|f| f.destination.is_some()).unwrap();
    assert_eq!(connect.time_ns, 7 * S);
}

#[test]
fn a_new_stage_inside_the_gap_reopens_the_job_and_nothing_is_raised() {
    let mut t = Trace::new();
    stage_leaving_a_survivor(&mut t);
    t.open(4, 1, 101, "/home/gitlab-runner/.aws/credentials", false);
    t.feed(
        5,
        1,
        101,
        100,
        "sh",
        EventDetail::Exit {
            exit_code: Some(0),
            signal: None,
        },
    );
    // The next stage, 3 s after the first ended.
    t.feed_as(
        6,
        2,
        true,
        200,
        50,
        "bash",
        EventDetail::JobStart(gitlab("77")),
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
    t.findings.extend(t.engine.advance(60 * S));
    assert!(t.findings.is_empty(), "{:#?}", t.findings);
    assert_eq!(t.engine.active_jobs(), 0);
}

#[test]
fn what_the_gap_holds_is_bounded() {
    let mut t = Trace::new();
    stage_leaving_a_survivor(&mut t);
    for n in 0..1000 {
        t.open(4, 1, 101, &format!("/home/u{n}/.aws/credentials"), false);
    }
    let key = JobKey(1);
    assert_eq!(t.engine.jobs.get(&key).unwrap().gap.len(), MAX_GAP_EVENTS);
    t.findings.extend(t.engine.advance(13 * S));
    let after = t
        .findings
        .iter()
        .filter(|f| f.rule == RuleId::CredentialAfterJobEnd)
        .count();
    assert_eq!(after, MAX_GAP_EVENTS);
}

#[test]
fn a_job_ended_by_its_hook_inside_the_gap_judges_nothing_held() {
    let mut t = Trace::new();
    stage_leaving_a_survivor(&mut t);
    t.open(4, 1, 101, "/home/gitlab-runner/.aws/credentials", false);
    // The hook ends the job at 5 s: the read at 4 s was inside it.
    t.feed(5, 1, 100, 50, "bash", EventDetail::JobEnd);
    t.feed(
        6,
        1,
        101,
        100,
        "sh",
        EventDetail::Exit {
            exit_code: Some(0),
            signal: None,
        },
    );
    t.findings.extend(t.engine.advance(60 * S));
    assert!(
        !t.rules().contains(&RuleId::CredentialAfterJobEnd),
        "{:#?}",
        t.findings
    );
}
