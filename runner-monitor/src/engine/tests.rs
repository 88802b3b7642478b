//! The engine, driven with event sequences and timestamps.

use std::sync::Arc;

use super::*;
use crate::{
    event::{
        Connect, Dns, DnsQuestion, DnsRecord, FileAccess, JobRef, ProcessRef, SensorStatus,
        SocketFamily,
    },
    rule::{RuleId, Severity},
};

const S: u64 = 1_000_000_000;

/// Builds events of jobs: `t` in seconds.
struct Trace {
    engine: Engine,
    findings: Vec<Finding>,
    ended: BTreeSet<u64>,
}

impl Trace {
    fn new() -> Self {
        Self::with_policy(Policy::builtin())
    }

    fn with_policy(policy: Policy) -> Self {
        Self {
            engine: Engine::new(Arc::new(policy)),
            findings: Vec::new(),
            ended: BTreeSet::new(),
        }
    }

    fn feed(&mut self, t: u64, job: u64, pid: u32, ppid: u32, comm: &str, detail: EventDetail) {
        self.feed_as(t, job, false, pid, ppid, comm, detail);
    }

    /// `feed`, saying whether the process is its (kernel) job's root.
    #[expect(
        clippy::too_many_arguments,
        reason = "a test helper that reads like the event"
    )]
    fn feed_as(
        &mut self,
        t: u64,
        job: u64,
        root: bool,
        pid: u32,
        ppid: u32,
        comm: &str,
        detail: EventDetail,
    ) {
        let event = Event {
            time_ns: t * S,
            job: (job != 0).then(|| JobRef {
                key: JobKey(job),
                ended: self.ended.contains(&job),
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
        let found = self.engine.handle(&event);
        self.findings.extend(found);
    }

    fn start(&mut self, t: u64, job: u64, root: u32, repository: &str) {
        self.feed(
            t,
            job,
            root,
            1,
            "Runner.Worker",
            EventDetail::JobStart(JobInfo {
                id: format!("run-{job}"),
                platform: Some("github".into()),
                repository: Some(repository.into()),
                workflow: Some("ci".into()),
                run: Some(job.to_string()),
                runner: Some("runner-1".into()),
                ..JobInfo::default()
            }),
        );
    }

    /// The job-completed hook, then the root's exit.
    fn end(&mut self, t: u64, job: u64, root: u32) {
        self.feed(t, job, root, 1, "Runner.Worker", EventDetail::JobEnd);
        self.ended.insert(job);
        self.feed(
            t,
            job,
            root,
            1,
            "Runner.Worker",
            EventDetail::Exit { exit_code: Some(0) },
        );
    }

    fn fork(&mut self, t: u64, job: u64, parent: u32, child: u32) {
        self.feed(
            t,
            job,
            parent,
            0,
            "sh",
            EventDetail::Fork { child_pid: child },
        );
    }

    fn exec(&mut self, t: u64, job: u64, pid: u32, ppid: u32, argv: &[&str]) {
        self.feed(
            t,
            job,
            pid,
            ppid,
            argv[0],
            EventDetail::Exec {
                filename: format!("/usr/bin/{}", argv[0]),
                argv: argv.iter().map(|s| s.to_string()).collect(),
                argc: argv.len() as u32,
            },
        );
    }

    fn open(&mut self, t: u64, job: u64, pid: u32, path: &str, write: bool) {
        self.feed(
            t,
            job,
            pid,
            0,
            "cat",
            EventDetail::FileOpen(FileAccess {
                path: path.into(),
                raw_path: path.into(),
                resolved: true,
                new_path: None,
                flags: if write { 0o1101 } else { 0 },
                write,
                result: 3,
                matched: vec!["basename".into()],
                target_pid: None,
                fingerprint: None,
            }),
        );
    }

    fn connect(&mut self, t: u64, job: u64, pid: u32, ip: &str, port: u16) {
        self.feed(
            t,
            job,
            pid,
            0,
            "curl",
            EventDetail::Connect(Connect {
                family: SocketFamily::Inet,
                ip: Some(ip.parse().unwrap()),
                port: Some(port),
                unix_path: None,
                fd: 3,
                result: 0,
            }),
        );
    }

    fn rules(&self) -> Vec<RuleId> {
        self.findings.iter().map(|f| f.rule).collect()
    }

    fn only(&self, rule: RuleId) -> &Finding {
        let matching: Vec<&Finding> = self.findings.iter().filter(|f| f.rule == rule).collect();
        assert_eq!(
            matching.len(),
            1,
            "one {rule} finding expected, got {:#?}",
            self.findings
        );
        matching[0]
    }
}

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
        EventDetail::Exit { exit_code: Some(0) },
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
        f.job.as_ref().unwrap().repository.as_deref(),
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
        f.origin_job.as_ref().unwrap().repository.as_deref(),
        Some("acme/release")
    );
    assert_eq!(
        f.job.as_ref().unwrap().repository.as_deref(),
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
        EventDetail::FileUnlink(FileAccess {
            path: "/home/ci/.docker/config.json".into(),
            raw_path: String::new(),
            resolved: true,
            new_path: None,
            flags: 0,
            write: false,
            result: 0,
            matched: vec![],
            target_pid: None,
            fingerprint: None,
        }),
    );
    t.end(4, 1, 100);
    assert!(t.findings.is_empty(), "{:#?}", t.findings);
}

#[test]
fn memory_dump_of_the_runner_then_unknown_egress() {
    let mut t = Trace::new();
    t.start(1, 1, 100, "acme/app");
    t.exec(1, 1, 100, 1, &["Runner.Worker"]);
    t.fork(2, 1, 100, 101);
    t.feed(
        3,
        1,
        101,
        100,
        "python3",
        EventDetail::FileOpen(FileAccess {
            path: "/proc/100/mem".into(),
            raw_path: "/proc/100/mem".into(),
            resolved: true,
            new_path: None,
            flags: 0,
            write: false,
            result: 5,
            matched: vec!["proc_memory".into()],
            target_pid: Some(100),
            fingerprint: None,
        }),
    );
    t.feed(
        4,
        1,
        101,
        100,
        "python3",
        EventDetail::DnsAnswer(Dns {
            server_ip: "127.0.0.53".parse().unwrap(),
            server_port: 53,
            id: 1,
            rcode: Some("No Error".into()),
            questions: vec![DnsQuestion {
                name: "exfil.example.net.".into(),
                record_type: "A".into(),
            }],
            answers: vec![DnsRecord {
                name: "exfil.example.net.".into(),
                record_type: "A".into(),
                ttl: 60,
                data: "203.0.113.9".into(),
            }],
            parse_error: None,
        }),
    );
    t.connect(5, 1, 101, "203.0.113.9", 443);
    assert_eq!(
        t.rules(),
        [RuleId::ProcessMemoryAccess, RuleId::UnexpectedEgress]
    );
    let mem = &t.findings[0];
    assert_eq!(mem.target.as_ref().unwrap().pid, 100);
    assert_eq!(
        mem.target.as_ref().unwrap().exe.as_deref(),
        Some("/usr/bin/Runner.Worker")
    );
    assert_eq!(mem.severity, Severity::Critical);
    let egress = &t.findings[1];
    let d = egress.destination.as_ref().unwrap();
    assert_eq!(d.dns_name.as_deref(), Some("exfil.example.net"));
    assert_eq!(d.port, 443);
    assert_eq!(egress.process.as_ref().unwrap().ancestry[0].pid, 100);
}

#[test]
fn egress_allowed_by_name_or_by_repository_rule_is_quiet() {
    let policy = Policy::parse(
        &format!(
            "{}\n[[rules]]\nrepository = \"acme/*\"\nallow_egress = [{{ cidr = \"198.51.100.0/24\", ports = [443] }}]\n",
            crate::policy::DEFAULT_POLICY
        ),
        "t.toml",
    )
    .unwrap();
    let mut t = Trace::with_policy(policy);
    t.start(1, 1, 100, "acme/app");
    t.feed(
        2,
        1,
        100,
        1,
        "git",
        EventDetail::DnsAnswer(Dns {
            server_ip: "127.0.0.53".parse().unwrap(),
            server_port: 53,
            id: 2,
            rcode: None,
            questions: vec![DnsQuestion {
                name: "api.github.com.".into(),
                record_type: "A".into(),
            }],
            answers: vec![DnsRecord {
                name: "api.github.com.".into(),
                record_type: "A".into(),
                ttl: 60,
                data: "140.82.112.5".into(),
            }],
            parse_error: None,
        }),
    );
    t.connect(3, 1, 100, "140.82.112.5", 443);
    t.connect(3, 1, 100, "198.51.100.7", 443);
    assert!(t.findings.is_empty(), "{:#?}", t.findings);
    t.connect(4, 1, 100, "198.51.100.7", 22);
    assert_eq!(t.rules(), [RuleId::UnexpectedEgress]);
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
fn metadata_runner_credentials_secret_sockets_harvesting_and_tamper() {
    let mut t = Trace::new();
    t.start(1, 1, 100, "acme/app");
    t.connect(2, 1, 100, "169.254.169.254", 80);
    t.open(3, 1, 100, "/home/runner/actions-runner/.credentials", false);
    t.feed(
        4,
        1,
        100,
        1,
        "docker",
        EventDetail::Connect(Connect {
            family: SocketFamily::Unix,
            ip: None,
            port: None,
            unix_path: Some("/var/run/docker.sock".into()),
            fd: 3,
            result: 0,
        }),
    );
    t.open(5, 1, 100, "/home/ci/.aws/credentials", false);
    t.open(5, 1, 100, "/home/ci/.kube/config", false);
    t.open(5, 1, 100, "/home/ci/.config/gh/hosts.yml", false);
    t.feed(
        6,
        1,
        100,
        1,
        "kill",
        EventDetail::Signal {
            target_pid: 4242,
            signal: 9,
            syscall: "kill".into(),
        },
    );
    t.feed(
        7,
        0,
        0,
        0,
        "agent",
        EventDetail::SensorStatus(SensorStatus {
            lost_events: 12,
            detached_probes: vec![],
        }),
    );
    assert_eq!(
        t.rules(),
        [
            RuleId::MetadataEndpointAccess,
            RuleId::RunnerCredentialAccess,
            RuleId::SecretSocketAccess,
            RuleId::CredentialHarvesting,
            RuleId::AgentTamper,
            RuleId::SensorDegraded,
        ]
    );
    let harvest = t.only(RuleId::CredentialHarvesting);
    assert_eq!(harvest.kinds, ["aws", "gh", "kubernetes"]);
}

#[test]
fn an_entitled_secret_socket_is_quiet() {
    let policy = Policy::parse(
        &format!(
            "{}\n[[rules]]\nrepository = \"acme/*\"\nsecret_sockets = [\"docker\"]\n",
            crate::policy::DEFAULT_POLICY
        ),
        "t.toml",
    )
    .unwrap();
    let mut t = Trace::with_policy(policy);
    t.start(1, 1, 100, "acme/app");
    t.feed(
        2,
        1,
        100,
        1,
        "docker",
        EventDetail::Connect(Connect {
            family: SocketFamily::Unix,
            ip: None,
            port: None,
            unix_path: Some("/run/docker.sock".into()),
            fd: 3,
            result: 0,
        }),
    );
    assert!(t.findings.is_empty(), "{:#?}", t.findings);
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
            path: "/tmp/loot/.npmrc".into(),
            raw_path: "/tmp/loot/.npmrc".into(),
            resolved: true,
            new_path: None,
            flags: 0,
            write: false,
            result: 3,
            matched: vec!["basename".into()],
            target_pid: None,
            fingerprint: Some("hmac-sha256:aa".into()),
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
        EventDetail::Exit { exit_code: Some(0) },
    );
    t.feed_as(
        3,
        1,
        true,
        100,
        50,
        "bash",
        EventDetail::Exit { exit_code: Some(0) },
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
        EventDetail::Exit { exit_code: Some(0) },
    );
    t.feed_as(
        7,
        2,
        true,
        200,
        50,
        "bash",
        EventDetail::Exit { exit_code: Some(0) },
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
    assert_eq!(left.job.as_ref().unwrap().id, "4242");
    assert_eq!(left.time_ns, 7 * S);
    t.findings.extend(t.engine.advance(40 * S));
    let survivor = t.only(RuleId::ProcessSurvivedJob);
    assert_eq!(survivor.process.as_ref().unwrap().pid, 202);
    assert_eq!(t.engine.active_jobs(), 0);
}
