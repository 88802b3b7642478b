//! Steps in a report: listed, marked on the process that started each, named on findings.

use super::*;

/// A GitHub job: a `run:` step, then a JavaScript action reading Runner.Worker's environment.
fn job_with_an_action(run: &mut Run) {
    run.start(1000, 9, 100, "9100/build", "acme/app");
    run.exec(
        1100,
        9,
        false,
        101,
        100,
        &["bash", "-e", "/home/runner/_work/_temp/1a2b.sh"],
    );
    run.exec(1150, 9, false, 102, 101, &["make", "test"]);
    run.exec(
        1200,
        9,
        false,
        110,
        100,
        &[
            "node",
            "/home/runner/_work/_actions/evil-org/changed-files/v45/dist/index.js",
        ],
    );
    run.feed(
        1300,
        9,
        false,
        false,
        110,
        100,
        "node",
        EventDetail::FileOpen(FileAccess {
            target_pid: Some(100),
            result: 3,
            matched: vec!["proc_memory".into()],
            ..FileAccess::at("/proc/100/environ")
        }),
    );
    run.end(2000, 9, 100);
}

#[test]
fn a_report_lists_the_steps_and_names_the_action_that_did_it() {
    let mut run = Run::new();
    job_with_an_action(&mut run);
    let r = run.report("9100/build");
    let steps: Vec<String> = r
        .steps
        .iter()
        .map(|s| crate::engine::step::label(&s.step))
        .collect();
    assert_eq!(
        steps,
        [
            "step 1: run _temp/1a2b.sh",
            "step 2: action evil-org/changed-files@v45"
        ]
    );
    assert_eq!(r.steps[1].pid, 110);
    // `make` runs in the `run:` step; the action's process starts step 2.
    let step_of = |pid: u32| r.processes.iter().find(|p| p.pid == pid).unwrap().step;
    assert_eq!(step_of(102), Some(0));
    assert_eq!(step_of(110), Some(1));
    assert_eq!(step_of(100), None);
    assert!(!r.not_tracked.iter().any(|t| t == "steps" || t == "actions"));

    let text = text(&r);
    assert!(text.contains("Steps (2)"), "{text}");
    assert!(
        text.contains("starts step 2: action evil-org/changed-files@v45"),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.contains("process-memory-access")
            && l.contains("(step 2: action evil-org/changed-files@v45)")),
        "{text}"
    );
    let page = job_page(&r);
    assert!(page.contains("<h2 id=\"steps\">Steps (2)</h2>"), "{page}");
    assert!(
        page.contains("step 2: action evil-org/changed-files@v45 (pid 110)"),
        "{page}"
    );
    let md = markdown(&r);
    assert!(md.contains("### Steps (2)"), "{md}");
}

#[test]
fn a_hostile_action_path_is_escaped_in_every_rendering() {
    let mut run = Run::new();
    run.start(1000, 11, 100, "9200/build", "acme/app");
    run.exec(
        1100,
        11,
        false,
        101,
        100,
        &["node", "/r/_work/_actions/<b>x\x1b[31m/y/v1/index.js"],
    );
    run.end(2000, 11, 100);
    let r = run.report("9200/build");
    let page = job_page(&r);
    assert!(!page.contains("<b>x"), "{page}");
    assert!(!text(&r).contains('\x1b'));
    assert!(!markdown(&r).contains("<b>"));
}
