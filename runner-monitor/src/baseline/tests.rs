//! Learning baselines from event sequences, and the entitlements no job used.

use super::*;
use crate::policy::{DEFAULT_POLICY, JobSelector};

/// Events of one job of `repository` / `workflow` (key `key`, root pid `key`): each step is a
/// JSON event detail done by pid `key + 1`.
fn job(key: u64, repository: &str, workflow: &str, steps: &[&str]) -> Vec<Event> {
    let mut lines = vec![format!(
        r#"{{"time_ns": 1, "job": {{"key": {key}, "ended": false, "root": true}}, "process": {{"pid": {key}, "ppid": 1, "comm": "Runner.Worker"}}, "kind": "job_start", "id": "run-{key}", "repository": "{repository}", "workflow": "{workflow}"}}"#
    )];
    for (i, step) in steps.iter().enumerate() {
        lines.push(format!(
            r#"{{"time_ns": {}, "job": {{"key": {key}, "ended": false}}, "process": {{"pid": {}, "ppid": {key}, "comm": "step"}}, {step}}}"#,
            i + 2,
            key + 1
        ));
    }
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

fn dns(name: &str, ip: &str) -> String {
    format!(
        r#""kind": "dns_answer", "server_ip": "127.0.0.53", "server_port": 53, "id": 1, "rcode": "No Error", "questions": [{{"name": "{name}.", "type": "A"}}], "answers": [{{"name": "{name}.", "type": "A", "ttl": 60, "data": "{ip}"}}]"#
    )
}

fn connect(ip: &str, port: u16) -> String {
    format!(
        r#""kind": "connect", "family": "inet", "ip": "{ip}", "port": {port}, "fd": 3, "result": 0"#
    )
}

fn unix(path: &str) -> String {
    format!(r#""kind": "connect", "family": "unix", "unix_path": "{path}", "fd": 3, "result": 0"#)
}

fn read(path: &str) -> String {
    format!(
        r#""kind": "file_open", "path": "{path}", "raw_path": "{path}", "resolved": true, "flags": 0, "write": false, "result": 3, "matched": ["basename"]"#
    )
}

fn learner(jobs: &[Vec<Event>]) -> Learner {
    let mut l = Learner::new(Arc::new(Policy::builtin()));
    for (i, events) in jobs.iter().enumerate() {
        l.learn(&format!("trace-{i}.jsonl"), events.clone());
    }
    l
}

#[test]
fn names_are_preferred_and_wildcards_only_where_several_subdomains_were_seen() {
    let l = learner(&[
        job(
            10,
            "acme/app",
            "ci",
            &[
                &dns("index.crates.io", "18.0.0.1"),
                &connect("18.0.0.1", 443),
                &dns("static.crates.io", "18.0.0.2"),
                &connect("18.0.0.2", 443),
                &dns("registry.npmjs.org", "104.16.0.1"),
                &connect("104.16.0.1", 443),
                &connect("10.0.0.5", 5432),
            ],
        ),
        job(
            20,
            "acme/app",
            "ci",
            &[
                &dns("registry.npmjs.org", "104.16.0.2"),
                &connect("104.16.0.2", 443),
                &connect("104.16.0.2", 80),
            ],
        ),
    ]);
    let rules = l.rules();
    assert!(
        rules.contains(
            "    { name = \"*.crates.io\", ports = [443] }, # used by 1 of 2 jobs: index.crates.io, static.crates.io\n"
        ),
        "{rules}"
    );
    assert!(
        rules.contains(
            "    { name = \"registry.npmjs.org\", ports = [80, 443] }, # used by 2 of 2 jobs\n"
        ),
        "{rules}"
    );
    assert!(!rules.contains("*.npmjs.org"), "{rules}");
    assert!(
        rules.contains("    { cidr = \"10.0.0.5\", ports = [5432] }, # used by 1 of 2 jobs\n"),
        "{rules}"
    );
    assert!(
        !rules.contains("104.16.0"),
        "named destinations are not listed by address: {rules}"
    );
}

#[test]
fn learned_rules_are_a_policy_under_which_the_learned_jobs_raise_nothing() {
    let jobs = [
        job(
            10,
            "acme/app",
            "ci",
            &[
                &dns("index.crates.io", "18.0.0.1"),
                &connect("18.0.0.1", 443),
                &unix("/var/run/docker.sock"),
                &read("/home/ci/.npmrc"),
            ],
        ),
        job(
            20,
            "acme/site",
            "deploy",
            &[
                &read("/home/ci/.aws/credentials"),
                &connect("192.0.2.10", 22),
            ],
        ),
    ];
    let l = learner(&jobs);
    let rules = l.rules();
    assert!(rules.contains("repository = \"acme/site\"\nworkflow = \"deploy\"\nbaseline = true\n"));
    let policy = Policy::parse(&format!("{DEFAULT_POLICY}\n{rules}"), "learned.toml")
        .unwrap_or_else(|e| panic!("{e}\n{rules}"));
    // Under the built-in policy these jobs raise findings; under the learned rules, none.
    let mut before = Learner::new(Arc::new(Policy::builtin()));
    let mut after = Learner::new(Arc::new(policy));
    for events in &jobs {
        let findings = |p: Arc<Policy>| {
            let alerts = AlertWriter::to_writer(Box::new(std::io::sink()), None);
            let mut pipeline = Pipeline::new(p, None, Outputs::new(alerts, None).unwrap());
            pipeline.run(events.clone()).unwrap()
        };
        assert!(!findings(before.policy.clone()).is_empty());
        assert_eq!(findings(after.policy.clone()), []);
        before.learn("again", events.clone());
        after.learn("again", events.clone());
    }
    // Learning under the learned policy gives the same rules.
    assert_eq!(
        after.rules().split_once("\n\n").unwrap().1,
        before.rules().split_once("\n\n").unwrap().1
    );
}

#[test]
fn hostile_names_are_learned_by_address_and_glob_characters_are_literal() {
    let l = learner(&[job(
        10,
        "acme/app",
        "build [linux] *",
        &[
            &dns("evil\\u001b[31m.example", "203.0.113.9"),
            &connect("203.0.113.9", 443),
        ],
    )]);
    let rules = l.rules();
    assert!(
        rules.contains("{ cidr = \"203.0.113.9\", ports = [443] }"),
        "{rules}"
    );
    let policy = Policy::parse(&format!("{DEFAULT_POLICY}\n{rules}"), "learned.toml").unwrap();
    let selects = |workflow| {
        policy
            .rules_for(JobSelector {
                repository: Some("acme/app"),
                workflow: Some(workflow),
            })
            .count()
    };
    assert_eq!(selects("build [linux] *"), 1);
    assert_eq!(selects("build l anything"), 0);
}

#[test]
fn jobs_without_a_repository_are_counted_not_learned() {
    let mut events = job(10, "acme/app", "ci", &[&connect("10.0.0.5", 22)]);
    // The same job, but the kernel's key only: no identity ever arrived.
    events.remove(0);
    let l = learner(&[events]);
    assert_eq!((l.jobs().len(), l.unidentified), (0, 1));
    assert!(!l.rules().contains("\n[[rules]]\n"), "{}", l.rules());
}

#[test]
fn unused_entitlements_name_the_grant_and_where_it_was_written() {
    let policy = Policy::parse(
        &format!(
            "{DEFAULT_POLICY}\n[[rules]]\nrepository = \"acme/*\"\nallow_egress = [{{ name = \"registry.npmjs.org\", ports = [443] }}, {{ cidr = \"10.0.0.0/8\" }}]\nsecret_sockets = [\"docker\", \"ssh-agent\"]\n\n[[rules]]\nrepository = \"acme/site\"\nsecret_sockets = [\"vault-agent\"]\n"
        ),
        "policy.toml",
    )
    .unwrap();
    let mut l = Learner::new(Arc::new(policy));
    l.learn(
        "t.jsonl",
        job(
            10,
            "acme/app",
            "ci",
            &[
                &connect("10.1.2.3", 5432),
                &unix("/var/run/docker.sock"),
                &dns("github.com", "140.82.121.4"),
                &connect("140.82.121.4", 443),
            ],
        ),
    );
    let unused = l.unused();
    let line = DEFAULT_POLICY.lines().count() + 2;
    let expected_rules = [
        format!(
            "rules[0] (repository acme/*, workflow *, policy.toml:{line}): allow_egress[0] registry.npmjs.org port 443: none of the 1 recorded job(s) it selects used it"
        ),
        format!(
            "rules[0] (repository acme/*, workflow *, policy.toml:{line}): secret socket ssh-agent: none of the 1 recorded job(s) it selects used it"
        ),
        format!(
            "rules[1] (repository acme/site, workflow *, policy.toml:{}): secret socket vault-agent: no recorded job is of this repository and workflow",
            line + 5
        ),
    ];
    for want in &expected_rules {
        assert!(unused.contains(want), "{want}\nnot in {unused:#?}");
    }
    // Used grants are not listed: github.com (global), 10.0.0.0/8, docker.
    assert!(unused.iter().all(|l| !l.contains("10.0.0.0/8")
        && !l.contains("docker")
        && !l.contains(": github.com")));
    assert!(
        unused
            .iter()
            .any(|l| l.starts_with("egress.allow[8]: gitlab.com, every port"))
    );
    // Of the built-in allowlist, only github.com was reached.
    assert_eq!(unused.len(), 3 + 9, "{unused:#?}");
}
