//! Policy parsing, matching and error reporting.
use super::*;

#[test]
fn builtin_policy_parses_and_knows_the_usual_credentials() {
    let p = Policy::builtin();
    assert_eq!(
        p.credential_of("/home/ci/.docker/config.json")
            .unwrap()
            .kind,
        "docker"
    );
    assert_eq!(
        p.credential_of("/root/.aws/credentials").unwrap().kind,
        "aws"
    );
    assert_eq!(
        p.credential_of("/home/u/.ssh/id_ed25519").unwrap().kind,
        "ssh"
    );
    assert_eq!(
        p.credential_of("/home/u/.config/gcloud/legacy_credentials/a@b/adc.json")
            .unwrap()
            .kind,
        "gcloud"
    );
    assert!(
        p.credential_of("/home/runner/actions-runner/.credentials")
            .unwrap()
            .runner
    );
    assert!(p.credential_of("/home/u/project/.git/config").is_none());
    assert!(p.credential_of("/home/u/.ssh/known_hosts").is_none());
    assert!(p.credential_of("/home/u/src/config.json").is_none());
    assert_eq!(p.secret_socket_of("/var/run/docker.sock"), Some("docker"));
    assert_eq!(p.runtime_sockets, ["docker.sock", "podman.sock"]);
    assert_eq!(
        p.secret_socket_of("/tmp/ssh-XXXXabcd/agent.1234"),
        Some("ssh-agent")
    );
    assert_eq!(p.secret_socket_of("/tmp/other.sock"), None);
    assert!(p.is_metadata_endpoint("169.254.169.254".parse().unwrap()));
    assert_eq!(p.job_root_executables, ["Runner.Worker"]);
}

#[test]
fn wildcard_names_match_subdomains_only() {
    assert!(name_matches("*.github.com", "api.github.com."));
    assert!(name_matches("*.github.com", "a.b.github.com"));
    assert!(!name_matches("*.github.com", "github.com"));
    assert!(!name_matches("*.github.com", "evilgithub.com"));
    assert!(name_matches("github.com", "GitHub.com."));
}

#[test]
fn rules_select_by_repository_and_workflow_globs() {
    let p = Policy::parse(
        r#"
[[secret_sockets]]
kind = "docker"
paths = ["/var/run/docker.sock"]

[[rules]]
repository = "acme/*"
allow_egress = [{ name = "registry.npmjs.org", ports = [443] }, { cidr = "10.0.0.0/8" }]
secret_sockets = ["docker"]
severity = { unexpected-egress = "low" }
suppress = [{ rule = "credential-left-behind", reason = "release job keeps its token" }]

[[rules]]
repository = "acme/site"
workflow = "deploy*"
grace_period_seconds = 300
"#,
        "test.toml",
    )
    .unwrap();
    let site_deploy = JobSelector {
        repository: Some("acme/site"),
        workflow: Some("deploy-prod"),
    };
    assert_eq!(p.rules_for(site_deploy).count(), 2);
    let other = JobSelector {
        repository: Some("other/x"),
        workflow: Some("ci"),
    };
    assert_eq!(p.rules_for(other).count(), 0);
    let r = &p.rules[0];
    let ip = "104.16.0.1".parse().unwrap();
    assert!(r.allow_egress[0].allows(ip, 443, &["registry.npmjs.org.".into()]));
    assert!(!r.allow_egress[0].allows(ip, 80, &["registry.npmjs.org".into()]));
    assert!(r.allow_egress[1].allows("10.1.2.3".parse().unwrap(), 22, &[]));
    assert_eq!(r.severity[&RuleId::UnexpectedEgress], Severity::Low);
    assert!(r.suppress.contains_key(&RuleId::CredentialLeftBehind));
}

fn error_of(text: &str) -> PolicyError {
    Policy::parse(text, "bad.toml").expect_err("must be rejected")
}

#[test]
fn errors_name_file_line_and_field() {
    let e = error_of("[agent]\ngrace_period_seconds = 5\nfoo = 1\n");
    assert_eq!((e.origin.as_str(), e.line), ("bad.toml", 3), "{e}");
    assert!(e.message.contains("unknown field `foo`"), "{e}");

    let e = error_of("[egress]\nallow = [\n  { cidr = \"10.0.0.0/40\" },\n]\n");
    assert_eq!(
        (e.line, e.field.as_str()),
        (3, "egress.allow[0].cidr"),
        "{e}"
    );

    let e =
        error_of("[[rules]]\nrepository = \"a/*\"\nseverity = { unexpected-egress = \"huge\" }\n");
    assert_eq!(
        (e.line, e.field.as_str()),
        (3, "rules[0].severity.unexpected-egress"),
        "{e}"
    );

    let e = error_of("[[rules]]\nsuppress = [{ rule = \"agent-tamper\", reason = \" \" }]\n");
    assert_eq!(e.field, "rules[0].suppress[0].reason", "{e}");

    // The kernel reads container requests on Docker API sockets by their file name.
    let e = error_of(
        "[[secret_sockets]]\nkind = \"docker\"\npaths = [\"/run/a.sock\", \"/run/*.sock\"]\n",
    );
    assert_eq!(
        (e.line, e.field.as_str()),
        (3, "secret_sockets[0].paths[1]"),
        "{e}"
    );
    assert!(e.message.contains("must be literal"), "{e}");

    let e = error_of("[[rules]]\nsecret_sockets = [\"docker\"]\n");
    assert_eq!(
        (e.line, e.field.as_str()),
        (2, "rules[0].secret_sockets[0]"),
        "{e}"
    );

    let e = error_of("[[credentials]]\nkind = \"x\"\npaths = [\"**/*\"]\n");
    assert_eq!(
        (e.line, e.field.as_str()),
        (3, "credentials[0].paths[0]"),
        "{e}"
    );

    let e = error_of("[[credentials]]\nkind = \"x\"\npaths = [\"relative/file\"]\n");
    assert!(e.message.contains("absolute"), "{e}");

    let text = e.to_string();
    assert!(text.starts_with("bad.toml:3:"), "{text}");
}

#[test]
fn a_wrongly_typed_or_unknown_field_is_named_with_its_table() {
    let e = Policy::parse("[agent]\ngrace_period_seconds = \"soon\"\n", "p.toml").unwrap_err();
    assert_eq!(
        (e.line, e.field.as_str()),
        (2, "agent.grace_period_seconds")
    );
    let e = Policy::parse(
        "[agent]\nstage_gap_seconds = 1\n\n[[credentials]]\nkind = \"x\"\npathz = [\"a\"]\n",
        "p.toml",
    )
    .unwrap_err();
    assert_eq!((e.line, e.field.as_str()), (6, "credentials.pathz"));
    assert!(e.to_string().starts_with("p.toml:6:"), "{e}");
}

#[test]
fn a_table_header_without_a_name_is_an_error_with_a_field() {
    // Found by the `policy` fuzz target: a lone `[` under a table named no field at all.
    let e = Policy::parse(
        "[agent]\nstage_gap_seconds = 1\n\n[\nkind = \"x\"\n",
        "p.toml",
    )
    .unwrap_err();
    assert_eq!((e.line, e.field.as_str()), (4, "-"), "{e:?}");
}

/// A directory of its own under the system's temporary directory, with `files` written in it.
fn policy_dir(name: &str, files: &[(&str, &str)]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("rm-policy-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (file, text) in files {
        std::fs::write(dir.join(file), text).unwrap();
    }
    dir
}

const LEARNED: &str = r#"# learned
[[rules]]
repository = "acme/app"
workflow = "ci"
baseline = true
allow_egress = [
    { name = "*.crates.io", ports = [443] }, # used by 1 of 2 jobs
]
secret_sockets = [] # none used
credential_kinds = [
    "git", # used by 2 of 2 jobs
]
"#;

#[test]
fn a_baseline_file_resolves_beside_the_policy_and_its_rules_are_baselines() {
    let policy = format!(
        "{DEFAULT_POLICY}\n[[rules]]\nbaseline = \"learned/app.toml\"\n\n[[rules]]\nrepository = \"acme/site\"\n"
    );
    let dir = policy_dir("include", &[("policy.toml", &policy)]);
    std::fs::create_dir_all(dir.join("learned")).unwrap();
    std::fs::write(dir.join("learned/app.toml"), LEARNED).unwrap();
    let p = Policy::load(&dir.join("policy.toml")).unwrap();
    assert_eq!(p.rules.len(), 2);
    let learned = &p.rules[0];
    assert!(learned.baseline);
    assert!(learned.credential_kinds.contains("git"));
    assert!(learned.allow_egress[0].allows(
        "18.1.1.1".parse().unwrap(),
        443,
        &["index.crates.io".into()]
    ));
    assert_eq!(
        learned.origin,
        format!("{}:2", dir.join("learned/app.toml").display())
    );
    assert!(!p.rules[1].baseline);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_missing_baseline_file_is_an_error_naming_the_policy_line_and_field() {
    let policy = format!("{DEFAULT_POLICY}\n[[rules]]\nbaseline = \"nowhere.toml\"\n");
    let line = policy.lines().count();
    let dir = policy_dir("missing", &[("policy.toml", &policy)]);
    let e = Policy::load(&dir.join("policy.toml")).unwrap_err();
    assert_eq!(e.origin, dir.join("policy.toml").display().to_string());
    assert_eq!((e.line, e.field.as_str()), (line, "rules[0].baseline"));
    assert!(e.message.contains("nowhere.toml"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_error_inside_a_baseline_file_names_that_file_and_who_included_it() {
    let policy = format!("{DEFAULT_POLICY}\n[[rules]]\nbaseline = \"b.toml\"\n");
    let line = policy.lines().count();
    let learned = LEARNED.replace("\"git\"", "\"floppy\"");
    let dir = policy_dir("inner", &[("policy.toml", &policy), ("b.toml", &learned)]);
    let e = Policy::load(&dir.join("policy.toml")).unwrap_err();
    assert_eq!(e.origin, dir.join("b.toml").display().to_string());
    assert_eq!(
        (e.line, e.field.as_str()),
        (11, "rules[0].credential_kinds[0]")
    );
    assert!(
        e.message.contains(&format!(
            "included by {}:{line}",
            dir.join("policy.toml").display()
        )),
        "{e}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn baseline_references_are_refused_where_they_cannot_mean_anything() {
    // From policy text (no directory to resolve against; the fuzzer reads no files).
    let e = Policy::parse(
        &format!("{DEFAULT_POLICY}\n[[rules]]\nbaseline = \"b.toml\"\n"),
        "t.toml",
    )
    .unwrap_err();
    assert_eq!(e.field, "rules[0].baseline");
    // An include entry holds nothing else.
    let policy =
        format!("{DEFAULT_POLICY}\n[[rules]]\nrepository = \"acme/*\"\nbaseline = \"b.toml\"\n");
    let dir = policy_dir("extra", &[("policy.toml", &policy), ("b.toml", LEARNED)]);
    let e = Policy::load(&dir.join("policy.toml")).unwrap_err();
    assert!(e.message.contains("holds nothing else"), "{e}");
    // A baseline file does not include another.
    let nested = LEARNED.replace("baseline = true", "baseline = \"other.toml\"");
    std::fs::write(dir.join("b.toml"), nested).unwrap();
    let policy = format!("{DEFAULT_POLICY}\n[[rules]]\nbaseline = \"b.toml\"\n");
    std::fs::write(dir.join("policy.toml"), policy).unwrap();
    let e = Policy::load(&dir.join("policy.toml")).unwrap_err();
    assert_eq!(e.field, "rules[0].baseline");
    assert_eq!(e.origin, dir.join("b.toml").display().to_string());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn baseline_must_be_true_or_a_file_and_credential_kinds_need_it() {
    let e = Policy::parse(
        &format!("{DEFAULT_POLICY}\n[[rules]]\nbaseline = 3\n"),
        "t.toml",
    )
    .unwrap_err();
    assert_eq!(e.field, "rules[0].baseline");
    let e = Policy::parse(
        &format!("{DEFAULT_POLICY}\n[[rules]]\ncredential_kinds = [\"git\"]\n"),
        "t.toml",
    )
    .unwrap_err();
    assert_eq!(e.field, "rules[0].credential_kinds");
    assert!(e.message.contains("baseline = true"), "{e}");
    // Pasted learned rules are a policy of their own.
    let p = Policy::parse(&format!("{DEFAULT_POLICY}\n{LEARNED}"), "t.toml").unwrap();
    assert!(p.rules[0].baseline);
}

#[test]
fn job_identity_variable_names_must_fit_the_kernel_scan() {
    let e = error_of("[[job_identity]]\nplatform = \"x\"\ndetect = \"A=B\"\nid = [\"X_ID\"]\n");
    assert_eq!(e.field, "job_identity[0]", "{e}");
    assert!(e.message.contains("\"A=B\""), "{e}");
    let long = "V".repeat(63);
    let e = error_of(&format!(
        "[[job_identity]]\nplatform = \"x\"\ndetect = \"X\"\nid = [\"{long}\"]\n"
    ));
    assert!(e.message.contains("1 to 62 bytes"), "{e}");
}

#[test]
fn egress_mode_is_audit_by_default_and_the_last_rule_that_sets_one_decides() {
    assert_eq!(Policy::builtin().egress.mode, EgressMode::Audit);
    let p = Policy::parse(
        r#"
[egress]
mode = "block"
allow = [{ cidr = "10.0.0.0/8", ports = [443] }, { name = "github.com" }]

[[rules]]
repository = "acme/*"
mode = "audit"
allow_egress = [{ cidr = "fd00::/8" }]

[[rules]]
repository = "acme/strict"
mode = "block"
metadata = true
"#,
        "test",
    )
    .unwrap();
    let job = |repository| JobSelector {
        repository: Some(repository),
        workflow: Some("ci"),
    };
    assert_eq!(p.egress_mode_for(job("other/x")), EgressMode::Block);
    assert_eq!(p.egress_mode_for(job("acme/app")), EgressMode::Audit);
    assert_eq!(p.egress_mode_for(job("acme/strict")), EgressMode::Block);

    let plan = p.egress_plan(job("acme/strict"));
    assert!(plan.block && plan.metadata);
    assert_eq!(
        plan.nets,
        vec![
            ("10.0.0.0/8".parse().unwrap(), vec![443]),
            ("fd00::/8".parse().unwrap(), vec![]),
        ],
        "the global and the rules' networks; names are not in the kernel's plan"
    );
    let global = p.global_egress_plan();
    assert!(global.block && !global.metadata);
    assert_eq!(global.nets.len(), 1);
    assert!(!p.egress_plan(job("acme/app")).block);
    assert!(!p.egress_plan(job("other/x")).metadata);
}

#[test]
fn bad_egress_modes_are_errors_naming_file_line_and_field() {
    let e = error_of("[egress]\nmode = \"deny\"\n");
    assert_eq!((e.line, e.field.as_str()), (2, "egress.mode"), "{e}");
    assert!(e.message.contains("`audit` or `block`"), "{e}");

    let e = error_of("[[rules]]\nrepository = \"a/*\"\nmode = \"Block\"\n");
    assert_eq!((e.line, e.field.as_str()), (3, "rules[0].mode"), "{e}");

    let e = error_of("[egress]\non_agent_failure = \"maybe\"\n");
    assert_eq!(
        (e.line, e.field.as_str()),
        (2, "egress.on_agent_failure"),
        "{e}"
    );
    assert!(e.message.contains("`open` or `closed`"), "{e}");
    let p = Policy::parse("[egress]\non_agent_failure = \"closed\"\n", "t").unwrap();
    assert_eq!(p.egress.on_agent_failure, AgentFailure::Closed);
    let p = Policy::parse("[egress]\non_agent_failure = \"open\"\n", "t").unwrap();
    assert_eq!(p.egress.on_agent_failure, AgentFailure::Open);

    let e = error_of("[[rules]]\nmetadata = \"yes\"\n");
    assert_eq!(e.line, 2, "{e}");
}

#[test]
fn mapped_and_nat64_forms_of_the_metadata_endpoint_are_the_metadata_endpoint() {
    let p = Policy::builtin();
    for form in [
        "::ffff:169.254.169.254",
        "64:ff9b::a9fe:a9fe",
        "169.254.169.254",
    ] {
        let ip: IpAddr = form.parse().unwrap();
        assert!(p.is_metadata_endpoint(ip), "{form}");
        assert_eq!(
            egress_address(ip),
            "169.254.169.254".parse::<IpAddr>().unwrap()
        );
    }
    let other: IpAddr = "64:ff9c::a9fe:a9fe".parse().unwrap();
    assert!(!p.is_metadata_endpoint(other));
    assert_eq!(egress_address(other), other);
}

#[test]
fn dns_upstream_and_the_names_a_plan_admits() {
    let p = Policy::parse(
        "[egress]\ndns_upstream = [\"10.0.0.2\", \"10.0.0.3:5353\"]\n\
         allow = [{ name = \"*.example.test\", ports = [443] }, { name = \"api.example.test\" }]\n",
        "t",
    )
    .unwrap();
    let upstream: Vec<String> = p
        .egress
        .dns_upstream
        .iter()
        .map(|a| a.to_string())
        .collect();
    assert_eq!(upstream, ["10.0.0.2:53", "10.0.0.3:5353"]);
    let plan = p.global_egress_plan();
    assert_eq!(plan.name_ports("a.b.example.test."), Some(vec![443]));
    assert_eq!(
        plan.name_ports("API.example.test"),
        Some(vec![]),
        "any port"
    );
    assert_eq!(plan.name_ports("example.test"), None);
    let e = error_of("[egress]\ndns_upstream = [\"resolver\"]\n");
    assert_eq!(
        (e.line, e.field.as_str()),
        (2, "egress.dns_upstream[0]"),
        "{e}"
    );
}

#[test]
fn the_resolver_asks_a_server_the_job_addressed_only_where_the_plans_networks_admit_it() {
    let p = Policy::parse(
        "[egress]\nallow = [{ cidr = \"10.96.0.10\", ports = [53] }, { cidr = \"10.20.0.0/16\" }, \
         { cidr = \"127.0.0.0/8\" }, { cidr = \"fd00::/8\", ports = [443] }]\n",
        "t",
    )
    .unwrap();
    let plan = p.global_egress_plan();
    let asks = |server: &str| plan.asks_dns(server.parse().unwrap());
    assert!(asks("10.96.0.10:53"), "a cluster's DNS service, port 53");
    assert!(asks("[::ffff:10.96.0.10]:53"), "the same, v4-mapped");
    assert!(asks("10.20.3.4:53"), "a network allowed on every port");
    assert!(!asks("10.96.0.11:53"), "another address");
    assert!(!asks("10.96.0.10:5353"), "another port");
    assert!(!asks("[fd00::1]:53"), "allowed on 443 only");
    assert!(!asks("127.0.0.53:53"), "loopback, allowed or not");
    assert!(!asks("0.0.0.0:53"), "the unspecified address");
    assert!(
        !Policy::parse("", "t")
            .unwrap()
            .global_egress_plan()
            .asks_dns("10.96.0.10:53".parse().unwrap())
    );
}

#[test]
fn a_plans_networks_admit_an_address_on_a_port_or_on_every_port() {
    let p = Policy::parse(
        "[egress]\nallow = [{ cidr = \"10.20.0.0/16\" }, { cidr = \"10.96.0.0/24\", ports = [443] }]\n",
        "t",
    )
    .unwrap();
    let plan = p.global_egress_plan();
    let admit = |ip: &str, port| plan.nets_admit(ip.parse().unwrap(), port);
    assert!(admit("10.20.3.4", 0) && admit("10.20.3.4", 8443));
    assert!(admit("10.96.0.9", 443) && admit("::ffff:10.96.0.9", 443));
    assert!(
        !admit("10.96.0.9", 0),
        "every port: a network with a port list does not admit"
    );
    assert!(!admit("10.96.0.9", 80) && !admit("10.97.0.1", 443));
}

#[test]
fn sni_true_needs_dns_names_in_the_rule_and_reaches_the_plan() {
    let text = |allow: &str| {
        format!(
            "[[rules]]\nrepository = \"acme/app\"\nmode = \"block\"\nsni = true\nallow_egress = [{allow}]\n"
        )
    };
    let e = Policy::parse(&text("{ cidr = \"10.0.0.0/8\" }"), "p.toml").unwrap_err();
    let message = e.to_string();
    assert!(
        message.contains("rules[0].sni") && message.contains("has none"),
        "{message}"
    );
    let e = Policy::parse(
        "[[rules]]\nrepository = \"acme/app\"\nsni = \"yes\"\n",
        "p.toml",
    )
    .unwrap_err();
    assert!(e.to_string().contains("sni"), "{e}");
    let p = Policy::parse(
        &text("{ name = \"*.github.com\" }, { cidr = \"10.0.0.0/8\" }"),
        "p.toml",
    )
    .unwrap();
    let job = JobSelector {
        repository: Some("acme/app"),
        workflow: Some("ci"),
    };
    let plan = p.egress_plan(job);
    assert!(plan.sni && plan.block);
    assert!(
        !p.egress_plan(JobSelector {
            repository: Some("other/x"),
            workflow: None,
        })
        .sni
    );
}
