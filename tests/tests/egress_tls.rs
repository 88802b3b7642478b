//! TLS server names through the real agent: a job sends a real ClientHello (rustls) from a
//! client network namespace to a server namespace (IPv4 and IPv6); the kernel reads its SNI from
//! the first data segment. With `sni = true` in block mode, a name outside the allowlist never
//! reaches the server (the kernel drops the segment and every later one) and is reported
//! `"blocked": true` with `destination.sni`; allowed names, exact and `*.` wildcards, go through.
//! In audit mode the same name reaches the server and is reported. UDP to port 443 (QUIC, whose
//! server name is encrypted) of an allowed address is refused with `sni = true` in block mode.
//!
//! The server answers one byte to the first bytes it receives: `answered` proves it received
//! them, `silent` (no answer in 3 s) that it received nothing.

use integration_tests::{
    TestEnv,
    live::{
        Agent, agent_dir, agent_log, alerts, free_port, job_answers, json_lines, run_id,
        test_policy, wait_alert,
    },
    netpair::{NetPair, assert_answers},
};
use serde_json::Value;

const SERVER_V4: &str = "10.217.0.2";
const SERVER_V6: &str = "fd00:217::2";
const PORT: u16 = 7443;

/// The namespaces, with a `tls-serve` in the server one.
fn namespaces() -> NetPair {
    let mut ns = NetPair::new("tl", 217, &[SERVER_V4], &[SERVER_V6]);
    let server = ns.server.clone();
    ns.serve(
        &server,
        &[
            "tls-serve".to_owned(),
            format!("{SERVER_V4}:{PORT}"),
            format!("[{SERVER_V6}]:{PORT}"),
        ],
    );
    ns
}

fn policy() -> String {
    let allow = format!(
        "allow_egress = [{{ cidr = \"{SERVER_V4}\" }}, {{ cidr = \"{SERVER_V6}/128\" }}, \
         {{ name = \"allowed.example\" }}, {{ name = \"*.good.example\" }}]"
    );
    format!(
        "{}\n[[rules]]\nrepository = \"acme/tls-block\"\nmode = \"block\"\nsni = true\n{allow}\n\
         \n[[rules]]\nrepository = \"acme/tls-audit\"\nsni = true\n{allow}\n",
        test_policy()
    )
}

/// Runs a job of `repository` that runs `job-step COMMAND CASE` in the client namespace for each
/// case (`tls NAME ADDR`, `egress HOW ADDR`); returns case -> answer.
fn job_runs(
    env: &TestEnv,
    agent: &Agent,
    (ns, command): (&NetPair, &str),
    run: &str,
    repository: &str,
    cases: &[String],
) -> std::collections::BTreeMap<String, String> {
    job_answers(
        env,
        agent,
        run,
        repository,
        &ns.client_steps(command, cases),
    )
}

fn sni_is(alert: &Value, sni: &str, ip: &str) -> bool {
    alert["destination"]["sni"] == sni && alert["destination"]["ip"] == ip
}

#[test]
fn sni_true_in_block_mode_drops_tls_to_a_server_name_outside_the_allowlist() {
    let dir = agent_dir("egress-tls");
    std::fs::write(dir.join("policy.toml"), policy()).unwrap();
    let agent = Agent::launch(&dir, free_port(), &[]);
    let env = TestEnv::new("egress-tls");
    let ns = namespaces();
    let v4 = format!("{SERVER_V4}:{PORT}");
    let v6 = format!("[{SERVER_V6}]:{PORT}");
    let cases: Vec<(String, &str)> = vec![
        (format!("allowed.example {v4}"), "answered"),
        (format!("API.Good.Example {v4}"), "answered"),
        (format!("deep.api.good.example {v6}"), "answered"),
        (format!("allowed.example {v6}"), "answered"),
        // Not TLS: the address check already admitted it; nothing to read.
        (format!("- {v4}"), "answered"),
        (format!("evil.example {v4}"), "silent"),
        (format!("evil.example {v6}"), "silent"),
        // `*.good.example` does not match `good.example` itself.
        (format!("good.example {v4}"), "silent"),
        (format!("good.example.evil.example {v4}"), "silent"),
        // An IP address is never a TLS server name: a ClientHello without SNI is refused.
        (format!("{SERVER_V4} {v4}"), "silent"),
    ];
    let attempts: Vec<String> = cases.iter().map(|(c, _)| c.clone()).collect();
    let run = run_id(1);
    let answers = job_runs(
        &env,
        &agent,
        (&ns, "tls"),
        &run,
        "acme/tls-block",
        &attempts,
    );
    assert_answers("block mode, sni = true", &cases, &answers, || {
        agent_log(&dir)
    });
    let job_id = format!("{run}/build");
    for (sni, ip) in [
        ("evil.example", SERVER_V4),
        ("evil.example", SERVER_V6),
        ("good.example", SERVER_V4),
    ] {
        let alert = wait_alert(&agent, "unexpected-egress", &job_id, |a| sni_is(a, sni, ip));
        assert_eq!(alert["blocked"], true, "{alert}");
        assert_eq!(alert["destination"]["port"], PORT, "{alert}");
        assert!(
            alert["summary"]
                .as_str()
                .unwrap()
                .contains("was refused TLS"),
            "{alert}"
        );
    }
    let no_name = wait_alert(&agent, "unexpected-egress", &job_id, |a| {
        a["blocked"] == true
            && a["summary"]
                .as_str()
                .unwrap()
                .contains("without a readable")
    });
    assert!(no_name["destination"].get("sni").is_none(), "{no_name}");
    for allowed in [
        "allowed.example",
        "API.Good.Example",
        "deep.api.good.example",
    ] {
        assert!(
            !alerts(&agent)
                .iter()
                .any(|a| a["destination"]["sni"] == allowed),
            "an allowed server name raised a finding"
        );
    }
    // The event trace has every ClientHello with its name.
    let hellos: Vec<Value> = json_lines(&dir.join("events.jsonl"))
        .into_iter()
        .filter(|e| e["kind"] == "tls_client_hello")
        .collect();
    for sni in ["allowed.example", "deep.api.good.example", "evil.example"] {
        assert!(
            hellos.iter().any(|e| e["sni"] == sni),
            "no tls_client_hello event for {sni}: {hellos:#?}"
        );
    }

    // QUIC: UDP to port 443 of an allowed address carries its server name encrypted, so with
    // `sni = true` block mode refuses it (clients fall back to TCP); other UDP to a listed
    // address (`cidr`) is judged by the address alone (to one only a name admits: egress_dns.rs),
    // and audit mode changes nothing.
    let quic = [
        format!("udp {SERVER_V4}:443"),
        format!("udp-send [{SERVER_V6}]:443"),
        format!("udp {SERVER_V4}:{PORT}"),
    ];
    let run = run_id(3);
    let answers = job_runs(&env, &agent, (&ns, "egress"), &run, "acme/tls-block", &quic);
    let expected = ["errno 1", "errno 1", "ok"];
    for (case, want) in quic.iter().zip(expected) {
        assert_eq!(
            answers.get(case).map(String::as_str),
            Some(want),
            "block mode, sni = true: `{case}`: {answers:#?}"
        );
    }
    for ip in [SERVER_V4, SERVER_V6] {
        let alert = wait_alert(&agent, "unexpected-egress", &format!("{run}/build"), |a| {
            a["destination"]["ip"] == ip && a["destination"]["port"] == 443
        });
        assert_eq!(alert["blocked"], true, "{alert}");
        assert!(
            alert["summary"]
                .as_str()
                .unwrap()
                .contains("was refused QUIC"),
            "{alert}"
        );
    }
    let run = run_id(4);
    let answers = job_runs(
        &env,
        &agent,
        (&ns, "egress"),
        &run,
        "acme/tls-audit",
        &quic[..1],
    );
    assert_eq!(
        answers.get(&quic[0]).map(String::as_str),
        Some("ok"),
        "audit mode: {answers:#?}"
    );

    // Audit mode with the same rule: everything reaches the server; the name is reported.
    let run = run_id(2);
    let audit_cases = [
        format!("evil.example {v4}"),
        format!("allowed.example {v6}"),
    ];
    let answers = job_runs(
        &env,
        &agent,
        (&ns, "tls"),
        &run,
        "acme/tls-audit",
        &audit_cases,
    );
    for case in &audit_cases {
        assert_eq!(
            answers.get(case).map(String::as_str),
            Some("answered"),
            "audit mode: `{case}`: {answers:#?}"
        );
    }
    let alert = wait_alert(&agent, "unexpected-egress", &format!("{run}/build"), |a| {
        sni_is(a, "evil.example", SERVER_V4)
    });
    assert_ne!(alert["blocked"], true, "{alert}");
    assert!(
        alert["summary"].as_str().unwrap().contains("sent TLS"),
        "{alert}"
    );
}
