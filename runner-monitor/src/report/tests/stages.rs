//! A staged (GitLab) job's gap between stages: what a survivor did in it is after the end only
//! when no stage follows, as the engine judges it.

use super::*;

fn stage(id: &str) -> EventDetail {
    EventDetail::JobStart(JobInfo {
        id: id.into(),
        platform: Some("gitlab".into()),
        repository: Some("group/project".into()),
        ..JobInfo::default()
    })
}

/// Stage one of job 555 (kernel job 7, root 100) leaves a survivor (101) that reads a
/// credential 0.8 s after the stage's shell exited; the kernel calls the stage ended.
fn stage_with_a_survivor_reading_in_the_gap(run: &mut Run) {
    run.feed(1000, 7, false, true, 100, 1, "bash", stage("555"));
    run.feed(
        1050,
        7,
        false,
        true,
        100,
        1,
        "bash",
        EventDetail::Fork { child_pid: 101 },
    );
    run.feed(
        1200,
        7,
        false,
        true,
        100,
        1,
        "bash",
        EventDetail::Exit {
            exit_code: Some(0),
            signal: None,
        },
    );
    run.feed(
        2000,
        7,
        true,
        false,
        101,
        1,
        "cat",
        read("/home/ci/.aws/credentials"),
    );
}

#[test]
fn a_read_in_the_gap_is_inside_the_job_when_another_stage_follows() {
    let mut run = Run::new();
    stage_with_a_survivor_reading_in_the_gap(&mut run);
    run.feed(3000, 8, false, true, 200, 1, "bash", stage("555"));
    run.pipeline.advance(4 * S).unwrap();
    let r = run.report("555");
    let aws = r.credentials.iter().find(|c| c.kind == "aws").unwrap();
    assert!(!aws.after_end, "{r:#?}");
}

#[test]
fn a_read_in_the_gap_is_after_the_end_when_no_stage_follows() {
    let mut run = Run::new();
    stage_with_a_survivor_reading_in_the_gap(&mut run);
    // Past the stage gap (10 s in the built-in policy): the job is over since 1.2 s.
    run.pipeline.advance(30 * S).unwrap();
    let r = run.report("555");
    assert!(
        r.findings
            .iter()
            .any(|f| f.rule == RuleId::CredentialAfterJobEnd),
        "{r:#?}"
    );
    let aws = r.credentials.iter().find(|c| c.kind == "aws").unwrap();
    assert!(aws.after_end, "{r:#?}");
}
