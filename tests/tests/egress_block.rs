//! Block mode through the real agent: a GitHub-style job whose rule says `mode = "block"` tries
//! TCP connects, UDP connects and UDP sends from a client network namespace to a server
//! namespace (IPv4, IPv6, IPv4-mapped and NAT64 forms) and to the metadata endpoint; what its
//! allowlist does not admit fails with EPERM in the kernel and is reported `"blocked": true`.
//! A process outside the job and a job in audit mode reach the same address.
//!
//! Traffic stays in the two namespaces: every attempt runs inside the client namespace, whose
//! only route is the veth pair to the server namespace, so a refusal that did not happen fails
//! with "network unreachable" instead of sending anything off the host.

use std::{collections::BTreeMap, process::Command};

use integration_tests::{
    TestEnv, job_step,
    live::{
        Agent, agent_dir, agent_log, alerts, curl, free_port, job_answers, run_id, test_policy,
        wait_alert, wait_until,
    },
    netpair::{NetPair, assert_answers},
    output_of,
};
use serde_json::Value;

const ALLOWED_V4: &str = "10.214.0.2";
const REFUSED_V4: &str = "10.214.0.3";
const ALLOWED_V6: &str = "fd00:214::2";
const REFUSED_V6: &str = "fd00:214::3";
const PORT: u16 = 7000;
const LOOPBACK_PORT: u16 = 7001;

/// The attempts a job makes (`job-step egress HOW ADDR`), with what block mode must answer:
/// `ok`, `errno 1` (EPERM: refused) or another errno that shows the kernel let it through.
fn block_cases() -> Vec<(String, &'static str)> {
    let p = PORT;
    [
        (format!("tcp {ALLOWED_V4}:{p}"), "ok"),
        (format!("tcp {REFUSED_V4}:{p}"), "errno 1"),
        (format!("tcp [{ALLOWED_V6}]:{p}"), "ok"),
        (format!("tcp [{REFUSED_V6}]:{p}"), "errno 1"),
        (format!("tcp [::ffff:{ALLOWED_V4}]:{p}"), "ok"),
        (format!("tcp [::ffff:{REFUSED_V4}]:{p}"), "errno 1"),
        // NAT64 of the allowed address: admitted (it then has no route: ENETUNREACH).
        (format!("tcp [64:ff9b::ad6:2]:{p}"), "errno 101"),
        (format!("tcp [64:ff9b::ad6:3]:{p}"), "errno 1"),
        ("tcp 169.254.169.254:80".to_owned(), "errno 1"),
        ("tcp [::ffff:169.254.169.254]:80".to_owned(), "errno 1"),
        ("tcp [64:ff9b::a9fe:a9fe]:80".to_owned(), "errno 1"),
        // io_uring's connect makes no connect syscall; the cgroup hook sees it all the same.
        (format!("uring {REFUSED_V4}:{p}"), "errno 1"),
        (format!("uring [{REFUSED_V6}]:{p}"), "errno 1"),
        (format!("uring {ALLOWED_V4}:{p}"), "ok"),
        (format!("udp {REFUSED_V4}:{p}"), "errno 1"),
        (format!("udp-send {REFUSED_V4}:{p}"), "errno 1"),
        (format!("udp-send [{REFUSED_V6}]:{p}"), "errno 1"),
        (format!("udp-send {ALLOWED_V4}:{p}"), "ok"),
        (format!("udp-send [{ALLOWED_V6}]:{p}"), "ok"),
        (format!("tcp 127.0.0.1:{LOOPBACK_PORT}"), "ok"),
        (format!("tcp [::1]:{LOOPBACK_PORT}"), "ok"),
    ]
    .into_iter()
    .collect()
}

/// A cgroup v2 group of its own, removed on drop: a job process moves itself there.
struct Cgroup(std::path::PathBuf);

impl Cgroup {
    fn new() -> Self {
        let root = runner_monitor::sensor::attach::cgroup2_root().expect("a cgroup v2 hierarchy");
        let dir = root.join(format!("rm-egress-{}", std::process::id()));
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).expect("creating a cgroup");
        Cgroup(dir)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Runs a GitHub-style job of `repository` (with the runner's hooks, so the agent knows the
/// repository before the first step) whose steps try each of `cases` from the client namespace,
/// and then `extra` (script lines printing `NAME=ANSWER`); returns attempt -> answer.
fn job_tries(
    env: &TestEnv,
    agent: &Agent,
    ns: &NetPair,
    run: &str,
    repository: &str,
    cases: &[String],
    extra: &str,
) -> BTreeMap<String, String> {
    let script = ns.client_steps("egress", cases) + extra;
    job_answers(env, agent, run, repository, &script)
}

fn policy() -> String {
    format!(
        "{}\n[[rules]]\nrepository = \"acme/blocked\"\nmode = \"block\"\nallow_egress = [\
         {{ cidr = \"{ALLOWED_V4}\", ports = [{PORT}] }}, {{ cidr = \"{ALLOWED_V6}/128\", ports = [{PORT}] }}]\n\
         \n[[rules]]\nrepository = \"group/blocked\"\nmode = \"block\"\n",
        test_policy()
    )
}

/// A GitLab shell-executor job of `group/blocked` (no hooks): two stages, each a child shell of
/// `gitlab-runner` found by its environment, each trying the refused address once the agent has
/// had time to name it; returns stage -> answer.
fn gitlab_stages_try(
    env: &TestEnv,
    agent: &Agent,
    ns: &NetPair,
    job_id: &str,
) -> BTreeMap<String, String> {
    let runner = env.dir.join("gitlab-runner");
    std::fs::copy("/bin/sh", &runner).unwrap();
    let stage = |n: u32| {
        format!(
            "bash -c 'sleep 1.5; printf \"stage{n}=\"; ip netns exec {} \"$JOB_STEP\" egress tcp {REFUSED_V4}:{PORT}'\n",
            ns.client
        )
    };
    let out = output_of(
        integration_tests::live::job_command(&runner, env, agent)
            .arg("-c")
            .arg(format!("{}{}", stage(1), stage(2)))
            .env("CI_JOB_ID", job_id)
            .env("CI_PROJECT_PATH", "group/blocked")
            .env("CI_JOB_NAME", "build")
            .env("CI_PIPELINE_ID", "89"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(stage, answer)| (stage.to_owned(), answer.to_owned()))
        .collect()
}

/// The value of one series of the agent's /metrics (0 when absent).
fn metric(agent: &Agent, series: &str) -> u64 {
    curl(&format!("http://{}/metrics", agent.http))
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

fn destination_is(alert: &Value, ip: &str, port: u16) -> bool {
    alert["destination"]["ip"] == ip && alert["destination"]["port"] == port
}

#[test]
fn block_mode_refuses_in_the_kernel_what_the_allowlist_does_not_admit() {
    let dir = agent_dir("egress-block");
    std::fs::write(dir.join("policy.toml"), policy()).unwrap();
    let agent = Agent::launch(&dir, free_port(), &[]);
    let env = TestEnv::new("egress-block");
    let mut ns = NetPair::new(
        "eg",
        214,
        &[ALLOWED_V4, REFUSED_V4],
        &[ALLOWED_V6, REFUSED_V6],
    );
    let servers: Vec<String> = [ALLOWED_V4, REFUSED_V4]
        .iter()
        .map(|ip| format!("{ip}:{PORT}"))
        .chain(
            [ALLOWED_V6, REFUSED_V6]
                .iter()
                .map(|ip| format!("[{ip}]:{PORT}")),
        )
        .collect();
    let server_ns = ns.server.clone();
    let serve: Vec<String> = std::iter::once("serve".to_owned()).chain(servers).collect();
    ns.serve(&server_ns, &serve);
    let client_ns = ns.client.clone();
    ns.serve(
        &client_ns,
        &[
            "serve".to_owned(),
            format!("127.0.0.1:{LOOPBACK_PORT}"),
            format!("[::1]:{LOOPBACK_PORT}"),
        ],
    );
    assert!(
        agent_log(&dir).contains("egress mode"),
        "the agent says which egress mode is in force"
    );

    // A job in block mode.
    let cases = block_cases();
    let attempts: Vec<String> = cases.iter().map(|(c, _)| c.clone()).collect();
    // A step that moves itself to another cgroup stays enforced: the job is the process's, not
    // its cgroup's, and the programs sit at the root of the hierarchy.
    let cgroup = Cgroup::new();
    let moved = format!(
        "printf 'moved-cgroup='; sh -c 'echo $$ > {}/cgroup.procs && exec ip netns exec {} \
         \"$JOB_STEP\" egress tcp {REFUSED_V4}:{PORT}'\n",
        cgroup.0.display(),
        ns.client
    );
    let run = run_id(1);
    let answers = job_tries(&env, &agent, &ns, &run, "acme/blocked", &attempts, &moved);
    assert_eq!(
        answers.get("moved-cgroup").map(String::as_str),
        Some("errno 1"),
        "a job process in another cgroup: {answers:#?}"
    );
    drop(cgroup);
    assert_answers("block mode", &cases, &answers, || agent_log(&dir));
    let job_id = format!("{run}/build");
    for (ip, rule) in [
        (REFUSED_V4, "unexpected-egress"),
        (REFUSED_V6, "unexpected-egress"),
        ("::ffff:10.214.0.3", "unexpected-egress"),
        ("64:ff9b::ad6:3", "unexpected-egress"),
        ("169.254.169.254", "metadata-endpoint-access"),
        ("::ffff:169.254.169.254", "metadata-endpoint-access"),
        ("64:ff9b::a9fe:a9fe", "metadata-endpoint-access"),
    ] {
        let port = if rule == "unexpected-egress" {
            PORT
        } else {
            80
        };
        let alert = wait_alert(&agent, rule, &job_id, |a| destination_is(a, ip, port));
        assert_eq!(alert["blocked"], true, "{alert}");
        assert!(
            alert["summary"].as_str().unwrap().contains("was refused"),
            "{alert}"
        );
    }
    let uring = wait_alert(&agent, "unexpected-egress", &job_id, |a| {
        destination_is(a, REFUSED_V4, PORT)
            && a["process"]["cmdline"]
                .as_str()
                .is_some_and(|c| c.contains("egress uring"))
    });
    assert_eq!(
        uring["blocked"], true,
        "an io_uring connect is reported: {uring}"
    );
    let udp_send = wait_alert(&agent, "unexpected-egress", &job_id, |a| {
        destination_is(a, REFUSED_V6, PORT) && a["summary"].as_str().unwrap().contains("UDP send")
    });
    assert_eq!(udp_send["blocked"], true, "{udp_send}");
    for ip in [ALLOWED_V4, ALLOWED_V6, "127.0.0.1"] {
        assert!(
            !alerts(&agent)
                .iter()
                .any(|a| a["job"]["id"] == job_id.as_str() && a["destination"]["ip"] == ip),
            "an allowed destination ({ip}) is not reported"
        );
    }
    let refused = cases.iter().filter(|(_, a)| *a == "errno 1").count() as u64;
    let series = "runner_monitor_egress_connections_total{verdict=\"blocked\"}";
    wait_until("the blocked connections counted in /metrics", 10, || {
        metric(&agent, series) >= refused
    });
    assert_eq!(
        metric(&agent, "runner_monitor_egress_mode{mode=\"audit\"}"),
        1
    );
    assert_eq!(
        metric(&agent, "runner_monitor_egress_mode{mode=\"block\"}"),
        0
    );

    // The control socket's status says the mode and counts the refusals.
    let out = output_of(
        Command::new(integration_tests::live::target_dir().join("runner-monitor"))
            .args(["job", "status", "--socket"])
            .arg(&agent.socket),
    );
    let status: Value = serde_json::from_slice(&out.stdout).expect("status is JSON");
    let egress = &status["status"]["egress"];
    assert_eq!(egress["mode"], "audit", "{status}");
    assert_eq!(egress["rules_blocking"], 2, "{status}");
    assert_eq!(egress["enforceable"], true, "{status}");
    assert!(
        egress["connections_blocked"].as_u64() >= Some(refused),
        "{status}"
    );

    // A process outside any job reaches the address the job was refused.
    let out = output_of(
        Command::new("ip")
            .args(["netns", "exec", &ns.client])
            .arg(job_step())
            .args(["egress", "tcp", &format!("{REFUSED_V4}:{PORT}")]),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ok",
        "outside jobs nothing is refused"
    );

    // A job in audit mode (the global mode) reaches it too, and is reported unblocked.
    let run = run_id(2);
    let audit_case = format!("tcp {REFUSED_V4}:{PORT}");
    let answers = job_tries(
        &env,
        &agent,
        &ns,
        &run,
        "acme/audited",
        std::slice::from_ref(&audit_case),
        "",
    );
    assert_eq!(
        answers.get(&audit_case).map(String::as_str),
        Some("ok"),
        "audit mode"
    );
    let alert = wait_alert(&agent, "unexpected-egress", &format!("{run}/build"), |a| {
        destination_is(a, REFUSED_V4, PORT)
    });
    assert!(alert.get("blocked").is_none(), "{alert}");

    // Both stages of a GitLab job in block mode are refused: the second stage, a kernel job of
    // its own, is judged by its job's plan.
    let job_id = run_id(4);
    let answers = gitlab_stages_try(&env, &agent, &ns, &job_id);
    for stage in ["stage1", "stage2"] {
        assert_eq!(
            answers.get(stage).map(String::as_str),
            Some("errno 1"),
            "GitLab {stage} in block mode: {answers:#?}"
        );
    }

    // SIGHUP: the rule now says audit, and the next block-mode job is not refused.
    std::fs::write(
        dir.join("policy.toml"),
        policy().replace("mode = \"block\"", "mode = \"audit\""),
    )
    .unwrap();
    agent.signal(libc::SIGHUP);
    wait_until("the policy reload", 10, || {
        agent_log(&dir).contains("policy reloaded")
    });
    let run = run_id(3);
    let answers = job_tries(
        &env,
        &agent,
        &ns,
        &run,
        "acme/blocked",
        std::slice::from_ref(&audit_case),
        "",
    );
    assert_eq!(
        answers.get(&audit_case).map(String::as_str),
        Some("ok"),
        "after the reload to audit mode"
    );
    assert!(!curl(&format!("http://{}/metrics", agent.http)).contains("rmcanary"));
    drop(ns);
    let status = agent.stop();
    assert!(status.success(), "agent exit: {status}");
}
