//! baseline-deviation: what a job with a learned baseline uses outside it.

use super::*;

const BASELINE: &str = r#"
[[rules]]
repository = "acme/app"
workflow = "ci"
baseline = true
allow_egress = [{ name = "*.crates.io", ports = [443] }, { cidr = "10.0.0.5", ports = [5432] }]
secret_sockets = []
credential_kinds = ["git"]
"#;

fn with_baseline(extra: &str) -> Trace {
    Trace::with_policy(
        Policy::parse(
            &format!("{}\n{BASELINE}\n{extra}", crate::policy::DEFAULT_POLICY),
            "t.toml",
        )
        .unwrap(),
    )
}

fn resolve(t: &mut Trace, at: u64, job: u64, pid: u32, name: &str, ip: &str) {
    t.feed(
        at,
        job,
        pid,
        0,
        "curl",
        EventDetail::DnsAnswer(Dns::answer_a(name, ip)),
    );
}

fn unix_connect(t: &mut Trace, at: u64, job: u64, pid: u32, path: &str) {
    t.feed(
        at,
        job,
        pid,
        0,
        "docker",
        EventDetail::Connect(Connect::unix(path)),
    );
}

fn deviations(t: &Trace) -> Vec<&Finding> {
    t.findings
        .iter()
        .filter(|f| f.rule == RuleId::BaselineDeviation)
        .collect()
}

#[test]
fn what_the_baseline_lists_raises_no_deviation() {
    let mut t = with_baseline("");
    t.start(1, 1, 100, "acme/app");
    resolve(&mut t, 2, 1, 101, "index.crates.io", "18.154.22.10");
    t.connect(2, 1, 101, "18.154.22.10", 443);
    t.connect(3, 1, 101, "10.0.0.5", 5432);
    t.open(4, 1, 101, "/home/ci/.git-credentials", false);
    assert_eq!(t.rules(), []);
}

#[test]
fn a_new_destination_raises_baseline_deviation_once_per_job_not_per_process() {
    let mut t = with_baseline("");
    t.start(1, 1, 100, "acme/app");
    resolve(&mut t, 2, 1, 101, "collector.evil.example", "198.51.100.7");
    t.connect(3, 1, 101, "198.51.100.7", 443);
    t.connect(4, 1, 102, "198.51.100.7", 443);
    t.connect(5, 1, 101, "198.51.100.7", 443);
    let d = deviations(&t);
    assert_eq!(d.len(), 1, "{:#?}", t.findings);
    assert_eq!(d[0].severity, Severity::Medium);
    assert_eq!(d[0].mitre.id, "T1041");
    let dest = d[0].destination.as_ref().unwrap();
    assert_eq!(dest.dns_name.as_deref(), Some("collector.evil.example"));
    assert_eq!(d[0].process.as_ref().unwrap().pid, 101);
    // The allowlist judges on its own: both processes' connections are unexpected.
    assert_eq!(
        t.rules()
            .iter()
            .filter(|r| **r == RuleId::UnexpectedEgress)
            .count(),
        2
    );
    // A port the baseline never saw is a new object of the same job.
    t.connect(6, 1, 101, "10.0.0.5", 22);
    assert_eq!(deviations(&t).len(), 2);
}

#[test]
fn sockets_and_credential_kinds_outside_the_baseline_deviate_with_their_technique() {
    let mut t = with_baseline("");
    t.start(1, 1, 100, "acme/app");
    unix_connect(&mut t, 2, 1, 101, "/var/run/docker.sock");
    unix_connect(&mut t, 3, 1, 102, "/run/docker.sock");
    t.open(4, 1, 101, "/home/ci/.aws/credentials", false);
    t.open(5, 1, 101, "/home/ci/.aws/config", false);
    let d = deviations(&t);
    assert_eq!(d.len(), 2, "{:#?}", t.findings);
    assert_eq!(d[0].socket.as_ref().unwrap().kind, "docker");
    assert_eq!(d[0].mitre.id, "T1552");
    assert_eq!(d[1].credential.as_ref().unwrap().kind, "aws");
    assert_eq!(d[1].mitre.id, "T1552.001");
}

#[test]
fn without_a_baseline_for_the_job_nothing_deviates() {
    let mut t = with_baseline("");
    // Another repository, and acme/app's release workflow: no baseline selects them.
    t.start(1, 1, 100, "acme/other");
    t.connect(2, 1, 101, "198.51.100.7", 443);
    t.open(3, 1, 101, "/home/ci/.aws/credentials", false);
    t.feed(
        4,
        2,
        200,
        1,
        "Runner.Worker",
        EventDetail::JobStart(JobInfo {
            id: "run-2".into(),
            repository: Some("acme/app".into()),
            workflow: Some("release".into()),
            ..JobInfo::default()
        }),
    );
    t.connect(5, 2, 201, "198.51.100.7", 443);
    assert!(deviations(&t).is_empty(), "{:#?}", t.findings);
    assert_eq!(
        t.rules(),
        [RuleId::UnexpectedEgress, RuleId::UnexpectedEgress]
    );
}

#[test]
fn deviation_does_not_depend_on_the_egress_verdict_or_the_connection_succeeding() {
    let mut t = with_baseline("");
    t.start(1, 1, 100, "acme/app");
    // github.com is on the global allowlist, but this repository's jobs never went there.
    resolve(&mut t, 2, 1, 101, "github.com", "140.82.121.4");
    t.connect(3, 1, 101, "140.82.121.4", 443);
    assert_eq!(t.rules(), [RuleId::BaselineDeviation]);
    // A refused connection (as block mode will report it) deviates just the same.
    t.feed(
        4,
        1,
        101,
        0,
        "curl",
        EventDetail::Connect(Connect {
            result: -1,
            ..Connect::inet("203.0.113.9".parse().unwrap(), 443)
        }),
    );
    assert_eq!(deviations(&t).len(), 2);
}

#[test]
fn deviation_severity_follows_the_policy_and_suppression_silences_it() {
    let mut t = with_baseline(
        "[[rules]]\nrepository = \"acme/*\"\nseverity = { baseline-deviation = \"critical\" }\n",
    );
    t.start(1, 1, 100, "acme/app");
    t.open(2, 1, 101, "/home/ci/.npmrc", false);
    assert_eq!(deviations(&t)[0].severity, Severity::Critical);
    let mut t = with_baseline(
        "[[rules]]\nrepository = \"acme/app\"\nsuppress = [{ rule = \"baseline-deviation\", reason = \"migrating registries\" }]\n",
    );
    t.start(1, 1, 100, "acme/app");
    t.open(2, 1, 101, "/home/ci/.npmrc", false);
    assert!(deviations(&t).is_empty());
}

#[test]
fn the_engine_records_what_jobs_use_only_when_asked() {
    let mut t = Trace::new();
    t.start(1, 1, 100, "acme/app");
    t.connect(2, 1, 101, "127.0.0.1", 8080);
    assert!(t.engine.take_usage().is_empty());
    t.engine.record_usage();
    t.open(3, 1, 101, "/home/ci/.git-credentials", false);
    t.open(4, 1, 101, "/home/runner/actions-runner/.runner", false);
    let usage = t.engine.take_usage();
    assert_eq!(usage.len(), 1, "the runner's credentials are never usage");
    assert_eq!(
        usage[0].used,
        usage::Used::Credential {
            kind: "git".into(),
            path: "/home/ci/.git-credentials".into()
        }
    );
    assert_eq!(usage[0].job, JobKey(1));
}
