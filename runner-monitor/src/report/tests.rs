//! The report stage, driven with event sequences through the pipeline (no host, as `replay`),
//! and its renderings.

use std::sync::Arc;

use super::*;
use crate::{
    event::{JobRef, ProcessRef},
    output::{Outputs, alerts::AlertWriter},
    pipeline::Pipeline,
};

mod stages;
mod steps;

const S: u64 = 1_000_000_000;

struct Run {
    pipeline: Pipeline,
    reports: SharedReports,
}

impl Run {
    fn new() -> Self {
        let policy = Arc::new(Policy::builtin());
        let reports = JobReports::shared(policy.clone());
        let outputs = Outputs::new(
            AlertWriter::to_writer(Box::new(std::io::sink()), None),
            None,
        )
        .unwrap();
        Self {
            pipeline: Pipeline::new(policy, None, outputs).with_reports(reports.clone()),
            reports,
        }
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "a test helper that reads like the event"
    )]
    fn feed(
        &mut self,
        t_ms: u64,
        job: u64,
        ended: bool,
        root: bool,
        pid: u32,
        ppid: u32,
        comm: &str,
        detail: EventDetail,
    ) {
        let event = Event {
            time_ns: t_ms * S / 1000,
            job: (job != 0).then_some(JobRef {
                key: JobKey(job),
                ended,
                root,
            }),
            process: ProcessRef {
                pid,
                tid: pid,
                ppid,
                uid: 1001,
                comm: comm.into(),
                cgroup_id: 1,
            },
            truncated: false,
            detail,
        };
        self.pipeline.run([event]).unwrap();
    }

    fn start(&mut self, t_ms: u64, job: u64, root: u32, id: &str, repository: &str) {
        let info = JobInfo {
            id: id.into(),
            platform: Some("github".into()),
            repository: Some(repository.into()),
            workflow: Some("CI".into()),
            run: Some("9001".into()),
            ..JobInfo::default()
        };
        self.feed(
            t_ms,
            job,
            false,
            true,
            root,
            1,
            "Runner.Worker",
            EventDetail::JobStart(info),
        );
    }

    fn exec(&mut self, t_ms: u64, job: u64, ended: bool, pid: u32, ppid: u32, argv: &[&str]) {
        let comm = argv[0].rsplit('/').next().unwrap();
        self.feed(
            t_ms,
            job,
            ended,
            false,
            ppid,
            0,
            "sh",
            EventDetail::Fork { child_pid: pid },
        );
        self.feed(
            t_ms,
            job,
            ended,
            false,
            pid,
            ppid,
            comm,
            EventDetail::Exec {
                filename: format!("/usr/bin/{comm}"),
                argv: argv.iter().map(|s| (*s).to_owned()).collect(),
                argc: argv.len() as u32,
            },
        );
    }

    fn end(&mut self, t_ms: u64, job: u64, root: u32) {
        self.feed(
            t_ms,
            job,
            false,
            true,
            root,
            1,
            "Runner.Worker",
            EventDetail::JobEnd,
        );
        self.feed(
            t_ms,
            job,
            true,
            true,
            root,
            1,
            "Runner.Worker",
            EventDetail::Exit {
                exit_code: Some(0),
                signal: None,
            },
        );
    }

    fn report(&self, id: &str) -> JobReport {
        lock(&self.reports)
            .find(id)
            .unwrap_or_else(|| panic!("no report of {id}"))
    }
}

fn read(path: &str) -> EventDetail {
    EventDetail::FileOpen(FileAccess {
        result: 3,
        ..FileAccess::at(path)
    })
}

fn connect(ip: &str, port: u16) -> EventDetail {
    EventDetail::Connect(Connect::inet(ip.parse().unwrap(), port))
}

/// A job whose step reads a credential twice, resolves a name and connects to it, and leaves a
/// survivor that reads another credential after the job ended.
fn job_with_a_survivor(run: &mut Run) {
    run.start(1000, 7, 100, "9001/build", "acme/app");
    run.exec(1100, 7, false, 101, 100, &["sh", "-c", "step"]);
    run.exec(
        1200,
        7,
        false,
        102,
        101,
        &["cat", "/home/ci/.aws/credentials"],
    );
    for t in [1300, 1310] {
        run.feed(
            t,
            7,
            false,
            false,
            102,
            101,
            "cat",
            read("/home/ci/.aws/credentials"),
        );
    }
    run.feed(
        1320,
        7,
        false,
        false,
        102,
        101,
        "cat",
        read("/home/ci/notes.txt"),
    );
    run.feed(
        1400,
        7,
        false,
        false,
        101,
        100,
        "sh",
        EventDetail::DnsAnswer(Dns::answer_a("exfil.example", "203.0.113.9")),
    );
    run.feed(
        1500,
        7,
        false,
        false,
        101,
        100,
        "sh",
        connect("203.0.113.9", 443),
    );
    run.feed(
        1510,
        7,
        false,
        false,
        101,
        100,
        "sh",
        connect("203.0.113.9", 443),
    );
    run.feed(
        1600,
        7,
        false,
        false,
        102,
        101,
        "cat",
        EventDetail::Exit {
            exit_code: Some(0),
            signal: None,
        },
    );
    run.exec(1700, 7, false, 103, 101, &["nohup", "sleep", "60"]);
    run.end(2000, 7, 100);
    run.exec(
        3000,
        7,
        true,
        104,
        103,
        &["cat", "/home/ci/.docker/config.json"],
    );
    run.feed(
        3100,
        7,
        true,
        false,
        104,
        103,
        "cat",
        read("/home/ci/.docker/config.json"),
    );
    // Past the grace period (30 s): the survivors are found.
    run.pipeline.advance(40 * S).unwrap();
}

#[test]
fn a_jobs_report_holds_its_tree_credentials_egress_survivors_and_findings() {
    let mut run = Run::new();
    job_with_a_survivor(&mut run);
    let r = run.report("9001/build");
    assert_eq!(r.key, JobKey(7));
    assert_eq!(r.job.repository.as_deref(), Some("acme/app"));
    assert_eq!(r.end_ns, Some(2 * S));

    let pids: Vec<(u32, u32)> = r.processes.iter().map(|p| (p.pid, p.ppid)).collect();
    assert_eq!(
        pids,
        [(100, 1), (101, 100), (102, 101), (103, 101), (104, 103)]
    );
    let cat = &r.processes[2];
    assert_eq!(cat.argv.as_deref(), Some("cat /home/ci/.aws/credentials"));
    assert_eq!((cat.exit_ns, cat.exit_code), (Some(1_600_000_000), Some(0)));
    assert!(r.processes[3].survivor, "the nohup'd sleep survived");

    // Two reads of one file are one line; a path that is no credential is not there.
    assert_eq!(r.credentials.len(), 2, "{:#?}", r.credentials);
    let aws = &r.credentials[0];
    assert_eq!(
        (aws.kind.as_str(), aws.reads, aws.after_end),
        ("aws", 2, false)
    );
    assert_eq!(aws.pids, [102]);
    let docker = &r.credentials[1];
    assert_eq!((docker.kind.as_str(), docker.after_end), ("docker", true));

    assert_eq!(r.egress.len(), 1);
    let e = &r.egress[0];
    assert_eq!(e.dns_name.as_deref(), Some("exfil.example"));
    assert_eq!((e.port, e.connections), (443, 2));

    assert!(
        r.survivors
            .iter()
            .any(|s| s.pid == 103 && s.escape.contains(&"nohup".to_owned()))
    );
    let rules: Vec<RuleId> = r.findings.iter().map(|f| f.rule).collect();
    assert!(rules.contains(&RuleId::UnexpectedEgress), "{rules:?}");
    assert!(rules.contains(&RuleId::CredentialAfterJobEnd), "{rules:?}");
    assert!(rules.contains(&RuleId::ProcessSurvivedJob), "{rules:?}");
    assert_eq!(r.not_tracked, NOT_TRACKED);
}

#[test]
fn reports_are_found_by_ci_id_or_key_and_listed_most_recent_first() {
    let mut run = Run::new();
    run.start(1000, 7, 100, "first", "acme/a");
    run.start(2000, 8, 200, "second", "acme/b");
    assert_eq!(run.report("0000000000000008").job.id, "second");
    let list = lock(&run.reports).list();
    let ids: Vec<&str> = list.iter().map(|j| j.job.id.as_str()).collect();
    assert_eq!(ids, ["second", "first"]);
    assert!(lock(&run.reports).find("third").is_none());
}

#[test]
fn only_the_most_recent_jobs_are_kept() {
    let mut run = Run::new();
    for job in 1..=(MAX_JOBS as u64 + 5) {
        run.start(
            job * 1000,
            job,
            job as u32 * 10,
            &format!("job-{job}"),
            "acme/app",
        );
    }
    // An event of a job whose report went does not start a partial one that pushes out another.
    run.feed(
        99_000,
        1,
        false,
        false,
        10,
        1,
        "cat",
        read("/home/ci/.aws/credentials"),
    );
    let reports = lock(&run.reports);
    assert_eq!(reports.list().len(), MAX_JOBS);
    assert!(reports.find("job-1").is_none(), "the oldest went");
    assert!(reports.find("0000000000000001").is_none(), "and stays gone");
    assert!(reports.find("job-6").is_some());
    assert!(reports.find(&format!("job-{}", MAX_JOBS + 5)).is_some());
}

#[test]
fn a_report_is_bounded_and_counts_what_it_left_out() {
    let mut run = Run::new();
    run.start(1000, 7, 100, "busy", "acme/app");
    for pid in 0..(MAX_PROCESSES as u32 + 10) {
        run.feed(
            2000,
            7,
            false,
            false,
            100,
            1,
            "sh",
            EventDetail::Fork {
                child_pid: 1000 + pid,
            },
        );
    }
    for port in 0..(MAX_EGRESS as u16 + 3) {
        run.feed(
            3000,
            7,
            false,
            false,
            100,
            1,
            "sh",
            connect("203.0.113.1", 1000 + port),
        );
    }
    let r = run.report("busy");
    assert_eq!(r.processes.len(), MAX_PROCESSES);
    assert_eq!(r.omitted.processes, 11, "the root and 1023 children fit");
    assert_eq!(r.egress.len(), MAX_EGRESS);
    assert_eq!(r.omitted.egress, 3);
    assert!(text(&r).contains("not shown (over the report's bounds): 11 processes"));
}

#[test]
fn events_of_kinds_a_report_does_not_show_leave_no_record() {
    let mut run = Run::new();
    run.feed(
        1000,
        9,
        false,
        false,
        100,
        1,
        "sh",
        EventDetail::Chdir {
            path: "/tmp".into(),
            resolved: true,
        },
    );
    assert!(lock(&run.reports).list().is_empty());
}

#[test]
fn another_stage_of_a_gitlab_job_reports_as_that_job() {
    let mut run = Run::new();
    let info = |id: &str| {
        EventDetail::JobStart(JobInfo {
            id: id.into(),
            platform: Some("gitlab".into()),
            repository: Some("group/project".into()),
            ..JobInfo::default()
        })
    };
    run.feed(1000, 7, false, true, 100, 1, "bash", info("555"));
    run.feed(
        1100,
        7,
        false,
        false,
        100,
        1,
        "cat",
        read("/home/ci/.aws/credentials"),
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
    run.feed(1300, 8, false, true, 200, 1, "bash", info("555"));
    run.feed(
        1400,
        8,
        false,
        false,
        200,
        1,
        "bash",
        read("/home/ci/.docker/config.json"),
    );
    let list = lock(&run.reports).list();
    assert_eq!(list.len(), 1, "{list:#?}");
    let r = run.report("555");
    assert_eq!(r.credentials.len(), 2);
    assert_eq!(r.end_ns, None, "a stage's end is not the job's");
    assert!(r.processes.iter().any(|p| p.pid == 200));
}

/// A job whose every name is hostile: HTML, Markdown, terminal escapes.
fn hostile_report() -> JobReport {
    let mut run = Run::new();
    let evil = "<script>alert(1)</script>\u{1b}]0;pwn\u{7}|**x**";
    run.start(1000, 7, 100, evil, evil);
    run.exec(1100, 7, false, 101, 100, &["sh", "-c", evil]);
    run.feed(
        1200,
        7,
        false,
        false,
        101,
        100,
        "sh",
        read(&format!("/home/{evil}/.aws/credentials")),
    );
    run.report(evil)
}

#[test]
fn the_page_escapes_every_job_supplied_string_and_loads_nothing() {
    let r = hostile_report();
    let page = job_page(&r);
    assert!(!page.contains("<script"), "{page}");
    assert!(
        page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{page}"
    );
    assert!(!page.contains('\u{1b}'), "raw ESC on the page");
    assert!(page.contains(r"\u{1b}]0;pwn\u{7}"), "{page}");
    for external in [
        "src=", "http:", "https:", "<link", "<form", "<iframe", "@import",
    ] {
        assert!(!page.contains(external), "{external} on the page");
    }
    assert!(jobs_page(&[]).contains("No job seen"));
}

#[test]
fn the_jobs_list_links_by_key_and_escapes_the_names() {
    let r = hostile_report();
    let summary = JobSummary {
        key: r.key,
        job: r.job.clone(),
        start_ns: r.start_ns,
        end_ns: None,
        processes: r.processes.len(),
        findings: r.findings.len(),
        worst: None,
    };
    let page = jobs_page(&[summary]);
    assert!(page.contains("href=\"/jobs/0000000000000007\""), "{page}");
    assert!(!page.contains("<script"), "{page}");
}

#[test]
fn text_and_markdown_escape_controls_and_markup() {
    let r = hostile_report();
    let t = text(&r);
    assert!(!t.chars().any(|c| c.is_control() && c != '\n'), "{t:?}");
    assert!(t.contains(r"\u{1b}]0;pwn"), "{t}");
    let m = markdown(&r);
    assert!(!m.chars().any(|c| c.is_control() && c != '\n'), "{m:?}");
    assert!(!m.contains("<script"), "{m}");
    assert!(
        m.contains(r"\|\*\*x\*\*"),
        "table cells cannot be split: {m}"
    );
}

#[test]
fn the_text_tree_draws_each_process_under_its_parent() {
    let mut run = Run::new();
    job_with_a_survivor(&mut run);
    let t = text(&run.report("9001/build"));
    let tree: Vec<&str> = t
        .lines()
        .skip_while(|l| !l.starts_with("Processes"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .map(|l| l.split(" (pid").next().unwrap())
        .collect();
    assert_eq!(
        tree,
        [
            "  Runner.Worker",
            "  └─ sh",
            "     ├─ cat",
            "     └─ nohup",
            "        └─ cat",
        ],
        "{t}"
    );
}

#[test]
fn the_json_report_reads_back() {
    let mut run = Run::new();
    job_with_a_survivor(&mut run);
    let r = run.report("9001/build");
    let json = serde_json::to_string(&r).unwrap();
    assert!(json.contains("\"steps\":[{"), "{json}");
    let back: JobReport = serde_json::from_str(&json).unwrap();
    assert_eq!(back, r);
}

#[test]
fn a_process_that_set_up_io_uring_is_marked() {
    let mut run = Run::new();
    run.start(1000, 7, 100, "9001/build", "acme/app");
    run.exec(1100, 7, false, 101, 100, &["node", "build.js"]);
    let setup = EventDetail::IoUringSetup {
        fd: 3,
        sq_entries: 8,
        cq_entries: 16,
        flags: 0,
        sqpoll: false,
    };
    run.feed(1200, 7, false, false, 101, 100, "node", setup);
    let r = run.report("9001/build");
    let marked: Vec<u32> = r
        .processes
        .iter()
        .filter(|p| p.io_uring)
        .map(|p| p.pid)
        .collect();
    assert_eq!(marked, [101]);
    assert!(text(&r).contains("set up io_uring"), "{}", text(&r));
}
