//! persistence-planted: a job process planting work for something outside the job.

use super::*;

/// A file event of `pid` (as `uid`) in job `job` at `t` seconds.
fn file_event(t: &mut Trace, at: u64, job: u64, pid: u32, uid: u32, detail: EventDetail) {
    let event = Event {
        time_ns: at * S,
        job: Some(JobRef {
            key: JobKey(job),
            ended: t.ended.contains(&job),
            root: false,
        }),
        process: ProcessRef {
            pid,
            tid: pid,
            ppid: 100,
            uid,
            comm: "sh".into(),
            cgroup_id: 1,
        },
        truncated: false,
        detail,
    };
    let found = t.engine.handle(&event);
    t.findings.extend(found);
}

fn write(path: &str) -> EventDetail {
    EventDetail::FileOpen(FileAccess {
        flags: 0o1101,
        write: true,
        result: 3,
        matched: vec!["dirname".into()],
        ..FileAccess::at(path)
    })
}

fn read(path: &str) -> EventDetail {
    EventDetail::FileOpen(FileAccess {
        result: 3,
        matched: vec!["dirname".into()],
        ..FileAccess::at(path)
    })
}

fn rename(from: &str, to: &str) -> EventDetail {
    EventDetail::FileRename(FileAccess {
        new_path: Some(to.into()),
        matched: vec!["new_path".into()],
        ..FileAccess::at(from)
    })
}

fn planted(t: &Trace) -> Vec<(String, String, String)> {
    t.findings
        .iter()
        .filter(|f| f.rule == RuleId::PersistencePlanted)
        .map(|f| {
            let p = f.persistence.as_ref().expect("names the path");
            (p.path.clone(), p.kind.clone(), f.mitre.id.clone())
        })
        .collect()
}

#[test]
fn a_step_writing_cron_systemd_and_ld_so_preload_plants_persistence_three_times() {
    let mut t = Trace::new();
    t.start(1, 1, 100, "evil/app");
    file_event(&mut t, 2, 1, 101, 0, write("/etc/cron.d/x"));
    file_event(&mut t, 3, 1, 101, 0, write("/etc/systemd/system/x.service"));
    file_event(&mut t, 4, 1, 101, 0, write("/etc/ld.so.preload"));
    assert_eq!(
        planted(&t),
        [
            ("/etc/cron.d/x".into(), "cron".into(), "T1053.003".into()),
            (
                "/etc/systemd/system/x.service".into(),
                "systemd".into(),
                "T1543.002".into()
            ),
            (
                "/etc/ld.so.preload".into(),
                "ld-preload".into(),
                "T1574.006".into()
            ),
        ]
    );
    let f = &t.findings[0];
    assert_eq!(f.severity, Severity::High);
    assert_eq!(f.mitre.name, "Scheduled Task/Job: Cron");
    assert_eq!(f.job.as_ref().unwrap().info.id, "run-1");
    assert_eq!(f.process.as_ref().unwrap().pid, 101);
    assert!(f.summary.contains("/etc/cron.d/x"), "{}", f.summary);
    assert!(f.summary.contains("evil/app"), "{}", f.summary);
}

#[test]
fn reading_a_persistence_path_or_failing_to_write_it_plants_nothing() {
    let mut t = Trace::new();
    t.start(1, 1, 100, "acme/app");
    file_event(&mut t, 2, 1, 101, 0, read("/etc/crontab"));
    file_event(
        &mut t,
        3,
        1,
        101,
        1001,
        EventDetail::FileOpen(FileAccess {
            write: true,
            result: -13,
            ..FileAccess::at("/etc/cron.d/x")
        }),
    );
    assert!(planted(&t).is_empty(), "{:#?}", t.findings);
}

#[test]
fn crontab_renaming_its_temporary_file_into_the_spool_plants_a_cron_entry() {
    let mut t = Trace::new();
    t.start(1, 1, 100, "acme/app");
    // What crontab(1) does: a temporary file beside the target, renamed onto it.
    file_event(
        &mut t,
        2,
        1,
        101,
        0,
        write("/var/spool/cron/crontabs/tmp.Xa1"),
    );
    file_event(
        &mut t,
        2,
        1,
        101,
        0,
        rename(
            "/var/spool/cron/crontabs/tmp.Xa1",
            "/var/spool/cron/crontabs/root",
        ),
    );
    let all = planted(&t);
    assert!(
        all.iter()
            .any(|(p, k, _)| p == "/var/spool/cron/crontabs/root" && k == "cron"),
        "{all:?}"
    );
    let f = t
        .findings
        .iter()
        .find(|f| f.persistence.as_ref().unwrap().path == "/var/spool/cron/crontabs/root")
        .unwrap();
    assert_eq!(f.persistence.as_ref().unwrap().how, "renamed a file onto");
}

#[test]
fn the_runners_own_env_file_is_critical() {
    let mut t = Trace::new();
    t.start(1, 1, 100, "evil/app");
    file_event(
        &mut t,
        2,
        1,
        101,
        1001,
        write("/home/runner/actions-runner/.env"),
    );
    let f = t.only(RuleId::PersistencePlanted);
    assert_eq!(f.severity, Severity::Critical);
    assert_eq!(f.persistence.as_ref().unwrap().kind, "runner");
    assert!(f.summary.contains("runner's own file"), "{}", f.summary);
}

#[test]
fn own_profile_is_routine_another_users_is_not() {
    let mut t = Trace::new();
    t.start(1, 1, 100, "acme/app");
    // rustup and conda edit their own user's profile.
    file_event(&mut t, 2, 1, 101, 1001, write("/home/runner/.bashrc"));
    file_event(&mut t, 2, 1, 102, 0, write("/root/.profile"));
    assert!(planted(&t).is_empty(), "{:#?}", t.findings);
    // Root editing the runner user's profile is planting.
    file_event(&mut t, 3, 1, 102, 0, write("/home/runner/.bashrc"));
    // Anyone's authorized_keys, own included, is.
    file_event(
        &mut t,
        4,
        1,
        101,
        1001,
        write("/home/runner/.ssh/authorized_keys"),
    );
    let kinds: Vec<String> = planted(&t).into_iter().map(|(_, k, _)| k).collect();
    assert_eq!(kinds, ["shell-profile", "authorized-keys"]);
    assert_eq!(t.findings[1].mitre.id, "T1098.004");
}

#[test]
fn a_survivor_planting_after_the_end_is_named_as_such() {
    let mut t = Trace::new();
    t.start(1, 1, 100, "acme/app");
    t.fork(2, 1, 100, 101);
    t.end(3, 1, 100);
    file_event(&mut t, 8, 1, 101, 0, write("/etc/cron.d/late"));
    let f = t.only(RuleId::PersistencePlanted);
    assert!(
        f.summary.contains("5 s after the job ended"),
        "{}",
        f.summary
    );
    assert!(f.job.as_ref().unwrap().ended);
}

#[test]
fn a_process_outside_any_job_plants_nothing() {
    let mut t = Trace::new();
    let event = Event {
        time_ns: S,
        job: None,
        process: ProcessRef {
            pid: 5,
            tid: 5,
            ppid: 1,
            uid: 0,
            comm: "apt".into(),
            cgroup_id: 1,
        },
        truncated: false,
        detail: write("/etc/cron.d/apt"),
    };
    assert!(t.engine.handle(&event).is_empty());
    t.findings.clear();
}

#[test]
fn the_same_plant_repeated_is_one_finding_two_paths_are_two() {
    let mut t = Trace::new();
    t.start(1, 1, 100, "acme/app");
    file_event(&mut t, 2, 1, 101, 0, write("/etc/cron.d/a"));
    file_event(&mut t, 3, 1, 101, 0, write("/etc/cron.d/a"));
    file_event(&mut t, 4, 1, 101, 0, write("/etc/cron.d/b"));
    assert_eq!(planted(&t).len(), 2, "{:#?}", t.findings);
}

#[test]
fn a_repository_rule_can_suppress_persistence_with_a_reason() {
    let policy = Policy::parse(
        &format!(
            "{}\n[[rules]]\nrepository = \"acme/infra\"\nsuppress = [{{ rule = \"persistence-planted\", reason = \"installs the cron jobs of this host\" }}]\n",
            crate::policy::DEFAULT_POLICY
        ),
        "p.toml",
    )
    .unwrap();
    let mut t = Trace::with_policy(policy);
    t.start(1, 1, 100, "acme/infra");
    file_event(&mut t, 2, 1, 101, 0, write("/etc/cron.d/backup"));
    assert!(planted(&t).is_empty(), "{:#?}", t.findings);
}

#[test]
fn a_symlink_at_ld_so_preload_plants_it_without_writing_it() {
    let mut t = Trace::new();
    t.start(1, 1, 100, "evil/app");
    file_event(
        &mut t,
        2,
        1,
        101,
        0,
        EventDetail::FileLink(FileAccess {
            new_path: Some("/etc/ld.so.preload".into()),
            flags: runner_monitor_common::LINK_SYMBOLIC,
            matched: vec!["new_path".into()],
            ..FileAccess::at("/tmp/evil.list")
        }),
    );
    let f = t.only(RuleId::PersistencePlanted);
    let p = f.persistence.as_ref().unwrap();
    assert_eq!(
        (p.path.as_str(), p.how.as_str()),
        ("/etc/ld.so.preload", "made a symlink at")
    );
}
