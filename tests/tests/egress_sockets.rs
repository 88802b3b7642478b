//! Sockets that send past the address hooks, through the real agent: raw IP, packet and ICMP
//! ("ping") sockets. A job in block mode is refused them at `socket()` (EPERM) and reported
//! `"blocked": true`; a job in audit mode gets them and is reported; a process outside jobs gets
//! them and nothing is reported.
//!
//! No packet is sent: the sockets are created and closed. The ICMP socket is created in a
//! network namespace of its own, where `net.ipv4.ping_group_range` admits root (the host's
//! setting is not touched).

use std::{collections::BTreeMap, process::Command};

use integration_tests::{
    TestEnv, job_step,
    live::{
        Agent, agent_dir, agent_log, alerts, free_port, job_answers, run_id, test_policy,
        wait_alert,
    },
    output_of,
};

/// `job-step socket KIND` for each kind; the ICMP one in a namespace that admits ping sockets.
fn socket_lines() -> String {
    let mut script = String::new();
    for kind in ["raw", "raw6", "packet", "tcp"] {
        script.push_str(&format!("printf '{kind}='; \"$JOB_STEP\" socket {kind}\n"));
    }
    script.push_str(
        "printf 'icmp='; unshare -n sh -c 'echo \"0 0\" > /proc/sys/net/ipv4/ping_group_range && \
         exec \"$JOB_STEP\" socket icmp'\n",
    );
    script
}

/// A GitHub-style job of `repository` with the runner's hooks whose steps create each socket;
/// returns kind -> answer (`ok` or `errno N`).
fn job_sockets(
    env: &TestEnv,
    agent: &Agent,
    run: &str,
    repository: &str,
) -> BTreeMap<String, String> {
    job_answers(env, agent, run, repository, &socket_lines())
}

#[test]
fn raw_packet_and_icmp_sockets_are_refused_in_block_mode_and_reported() {
    let dir = agent_dir("egress-sockets");
    let policy = format!(
        "{}\n[[rules]]\nrepository = \"acme/blocked\"\nmode = \"block\"\n",
        test_policy()
    );
    std::fs::write(dir.join("policy.toml"), policy).unwrap();
    let agent = Agent::launch(&dir, free_port(), &[]);
    let env = TestEnv::new("egress-sockets");

    let run = run_id(1);
    let answers = job_sockets(&env, &agent, &run, "acme/blocked");
    // The kernel runs no cgroup hook for packet sockets: refused only where the agent hooks the
    // LSM `socket_create` (not this development host: `egress_kernel.rs` runs that in guests),
    // else reported.
    let packet_refused = runner_monitor::sensor::hook_sets::bpf_lsm_active().is_ok();
    let expected: BTreeMap<String, String> = [
        ("raw", "errno 1"),
        ("raw6", "errno 1"),
        ("packet", if packet_refused { "errno 1" } else { "ok" }),
        ("icmp", "errno 1"),
        ("tcp", "ok"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(answers, expected, "block mode; log: {}", agent_log(&dir));
    let job_id = format!("{run}/build");
    for (kind, protocol, blocked) in [
        ("raw", 1, true),
        ("packet", 768, packet_refused),
        ("icmp", 1, true),
    ] {
        let alert = wait_alert(&agent, "unexpected-egress", &job_id, |a| {
            a["raw_socket"]["kind"] == kind && a["raw_socket"]["protocol"] == protocol
        });
        assert_eq!(alert["blocked"] == true, blocked, "{alert}");
        if !blocked {
            assert!(
                alert["summary"].as_str().unwrap().contains("opened"),
                "{alert}"
            );
            continue;
        }
        assert!(
            alert["summary"].as_str().unwrap().contains("was refused"),
            "{alert}"
        );
    }
    wait_alert(&agent, "unexpected-egress", &job_id, |a| {
        a["raw_socket"]["kind"] == "raw" && a["raw_socket"]["protocol"] == 58
    });

    // Audit mode: the job gets its sockets, and each is reported.
    let run = run_id(2);
    let answers = job_sockets(&env, &agent, &run, "acme/audited");
    assert!(
        answers.values().all(|a| a == "ok"),
        "audit mode: {answers:#?}"
    );
    let job_id = format!("{run}/build");
    for kind in ["raw", "packet", "icmp"] {
        let alert = wait_alert(&agent, "unexpected-egress", &job_id, |a| {
            a["raw_socket"]["kind"] == kind
        });
        assert!(alert.get("blocked").is_none(), "{alert}");
        assert!(
            alert["summary"].as_str().unwrap().contains("opened"),
            "{alert}"
        );
    }

    // Outside jobs: created, and nothing said.
    let out = output_of(Command::new(job_step()).args(["socket", "packet"]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let reported = alerts(&agent)
        .into_iter()
        .filter(|a| a.get("raw_socket").is_some())
        .count();
    assert_eq!(reported, 8, "the two jobs' sockets only, none outside jobs");
    let status = agent.stop();
    assert!(status.success(), "agent exit: {status}");
}
