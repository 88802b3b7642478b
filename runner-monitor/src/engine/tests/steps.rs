//! The step that did it: findings name the step of the job their process runs in.

use super::*;

fn exec_path(
    t: &mut Trace,
    time: u64,
    job: u64,
    pid: u32,
    ppid: u32,
    filename: &str,
    argv: &[&str],
) {
    t.feed(
        time,
        job,
        pid,
        ppid,
        filename.rsplit('/').next().unwrap(),
        EventDetail::Exec {
            filename: filename.into(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            argc: argv.len() as u32,
        },
    );
}

#[test]
fn a_javascript_action_reading_the_worker_environ_is_named_by_owner_repo_and_ref() {
    let mut t = Trace::new();
    t.start(1, 1, 100, "acme/app");
    // Step 1: a `run:` script; its child connects out.
    t.fork(2, 1, 100, 101);
    exec_path(
        &mut t,
        2,
        1,
        101,
        100,
        "/usr/bin/bash",
        &["/usr/bin/bash", "-e", "/home/runner/_work/_temp/0c1d.sh"],
    );
    t.fork(2, 1, 101, 102);
    t.exec(2, 1, 102, 101, &["curl", "https://example.org"]);
    t.connect(3, 1, 102, "203.0.113.7", 443);
    // Step 2: the action.
    t.fork(4, 1, 100, 110);
    let node = "/home/runner/externals/node20/bin/node";
    exec_path(
        &mut t,
        4,
        1,
        110,
        100,
        node,
        &[
            node,
            "/home/runner/_work/_actions/evil-org/changed-files/v45/dist/index.js",
        ],
    );
    t.feed(
        5,
        1,
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
    let dump = t.only(RuleId::ProcessMemoryAccess);
    let step = dump.step.as_ref().expect("the finding names its step");
    assert_eq!(step.action.as_deref(), Some("evil-org/changed-files@v45"));
    assert_eq!(step.kind.as_deref(), Some("action"));
    assert_eq!(step.index, Some(2));
    let egress = t.only(RuleId::UnexpectedEgress);
    let step = egress.step.as_ref().unwrap();
    assert_eq!(step.kind.as_deref(), Some("run"));
    assert_eq!(step.name.as_deref(), Some("_temp/0c1d.sh"));
    assert_eq!(step.index, Some(1));
}

#[test]
fn a_survivor_names_the_step_that_left_it() {
    let mut t = Trace::new();
    t.start(1, 1, 100, "acme/app");
    t.fork(2, 1, 100, 101);
    t.exec(2, 1, 101, 100, &["make", "deploy"]);
    t.fork(2, 1, 101, 102);
    t.exec(2, 1, 102, 101, &["nohup", "sleep", "600"]);
    t.end(3, 1, 100);
    t.findings.extend(t.engine.advance(60 * S));
    let survivor = t
        .findings
        .iter()
        .find(|f| f.rule == RuleId::ProcessSurvivedJob && f.process.as_ref().unwrap().pid == 102)
        .unwrap();
    let step = survivor.step.as_ref().unwrap();
    assert_eq!(step.kind.as_deref(), Some("command"));
    assert_eq!(step.name.as_deref(), Some("make deploy"));
}

#[test]
fn a_gitlab_stage_named_on_its_shell_names_what_runs_in_it() {
    let mut t = Trace::new();
    t.feed_as(
        1,
        1,
        true,
        100,
        50,
        "sh",
        EventDetail::Exec {
            filename: "/bin/sh".into(),
            argv: vec!["sh".into(), "/scripts-30-99/step_script".into()],
            argc: 2,
        },
    );
    t.fork(2, 1, 100, 101);
    t.exec(2, 1, 101, 100, &["curl", "https://example.org"]);
    t.connect(3, 1, 101, "203.0.113.7", 443);
    let egress = t.only(RuleId::UnexpectedEgress);
    let step = egress.step.as_ref().unwrap();
    assert_eq!(step.kind.as_deref(), Some("stage"));
    assert_eq!(step.name.as_deref(), Some("step_script"));
}

#[test]
fn a_root_shell_running_its_lines_in_subshells_starts_a_step_per_command() {
    // gitlab-ci-local: the job root (a bash exec'd with the job's environment) forks a subshell
    // that does not exec, and the subshell runs the script's commands.
    let mut t = Trace::new();
    t.start(1, 1, 100, "acme/app");
    t.fork(2, 1, 100, 101);
    t.fork(2, 1, 101, 102);
    t.exec(2, 1, 102, 101, &["cat", "/home/u/.aws/credentials"]);
    t.fork(3, 1, 101, 103);
    t.exec(3, 1, 103, 101, &["curl", "https://example.org"]);
    // A subshell of the subshell: its command starts a step too.
    t.fork(3, 1, 101, 104);
    t.fork(3, 1, 104, 105);
    t.exec(3, 1, 105, 104, &["wget", "https://example.net"]);
    t.connect(4, 1, 103, "203.0.113.7", 443);
    t.connect(4, 1, 105, "203.0.113.8", 443);
    let steps: Vec<_> = t
        .findings
        .iter()
        .filter(|f| f.rule == RuleId::UnexpectedEgress)
        .map(|f| f.step.clone().expect("the finding names its step"))
        .collect();
    assert_eq!(steps.len(), 2);
    assert_eq!(steps[0].name.as_deref(), Some("curl https://example.org"));
    assert_eq!(steps[0].index, Some(2));
    assert_eq!(steps[1].name.as_deref(), Some("wget https://example.net"));
    assert_eq!(steps[1].index, Some(3));
}

#[test]
fn what_a_steps_own_subshell_runs_stays_in_that_step() {
    let mut t = Trace::new();
    t.start(1, 1, 100, "acme/app");
    t.fork(2, 1, 100, 101);
    t.exec(2, 1, 101, 100, &["make", "deploy"]);
    t.fork(2, 1, 101, 102);
    t.fork(2, 1, 102, 103);
    t.exec(2, 1, 103, 102, &["curl", "https://example.org"]);
    t.connect(3, 1, 103, "203.0.113.7", 443);
    let step = t.only(RuleId::UnexpectedEgress).step.clone().unwrap();
    assert_eq!(step.name.as_deref(), Some("make deploy"));
    assert_eq!(step.index, Some(1));
}
