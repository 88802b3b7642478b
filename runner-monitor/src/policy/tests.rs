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
