//! Block mode's DNS through the real agent: job processes in block mode that ask a DNS server
//! (UDP connected, UDP unconnected, TCP, and glibc's resolver through a private resolv.conf) are
//! sent in the kernel to the agent's resolver, which forwards the names the job's allowlist
//! admits to the server and admits the addresses of the answer for that job before answering;
//! other names are REFUSED and their addresses stay refused.
//!
//! The DNS server and the listeners live in a namespace joined to this one by a veth pair
//! (10.215.0.0/24): the job's processes run in the agent's network namespace, whose loopback is
//! where the resolver listens. Nothing is sent anywhere else.

use std::{collections::BTreeMap, process::Command};

use integration_tests::{
    TestEnv,
    dns::{ALLOWED, CNAME_TARGET, DENIED, GLIBC},
    dns_hosts::{CLUSTER, JobNamespace, SERVER, SERVER6, ServerNamespace},
    job_step,
    live::{
        Agent, agent_dir, agent_log, alerts, free_port, job_answers, json_lines, run_id,
        test_policy, wait_alert,
    },
    netpair::serve_in,
    output_of,
};
use serde_json::Value;

const PORT: u16 = 7000;

/// The tests share the namespaces' names and each starts an agent: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn policy() -> String {
    let names = format!(
        "{{ name = \"allowed.test\", ports = [{PORT}] }}, {{ name = \"*.allowed.test\", ports = [{PORT}] }}"
    );
    format!(
        "{}\n[[rules]]\nrepository = \"acme/dns-a\"\nmode = \"block\"\nallow_egress = [{names}]\n\
         \n[[rules]]\nrepository = \"acme/dns-b\"\nmode = \"block\"\nallow_egress = [{names}]\n\
         \n[[rules]]\nrepository = \"acme/dns-6\"\nmode = \"block\"\nallow_egress = [{names}]\n\
         \n[[rules]]\nrepository = \"acme/dns-ns\"\nmode = \"block\"\nallow_egress = [{names}]\n\
         \n[[rules]]\nrepository = \"acme/dns-cluster\"\nmode = \"block\"\n\
         allow_egress = [{names}, {{ cidr = \"{CLUSTER}\", ports = [53] }}]\n\
         \n[[rules]]\nrepository = \"acme/dns-sni\"\nmode = \"block\"\nsni = true\n\
         allow_egress = [{names}, {{ cidr = \"{CLUSTER}\", ports = [{PORT}] }}]\n\
         \n[[rules]]\nrepository = \"acme/dns-sni-net\"\nmode = \"block\"\nsni = true\n\
         allow_egress = [{names}, {{ cidr = \"10.215.0.0/29\", ports = [{PORT}] }}]\n",
        test_policy().replace(
            "[egress]\n",
            &format!("[egress]\ndns_upstream = [\"{SERVER}:53\"]\n")
        )
    )
}

/// Runs a GitHub-style job of `repository` whose steps are `steps` (label, command line after
/// `$JOB_STEP`, or a whole shell line when it starts with `!`); returns label -> output.
fn job(
    env: &TestEnv,
    agent: &Agent,
    run: &str,
    repository: &str,
    steps: &[(&str, String)],
) -> BTreeMap<String, String> {
    let mut script = String::new();
    for (label, step) in steps {
        let command = match step.strip_prefix('!') {
            Some(line) => line.to_owned(),
            None => format!("\"$JOB_STEP\" {step}"),
        };
        script.push_str(&format!("printf '%s=' '{label}'; {command}\n"));
    }
    job_answers(env, agent, run, repository, &script)
}

/// The step `label` answered `want`.
fn expect_answer(
    answers: &BTreeMap<String, String>,
    label: &str,
    want: &str,
    dir: &std::path::Path,
) {
    assert_eq!(
        answers.get(label).map(String::as_str),
        Some(want),
        "`{label}`; all answers: {answers:#?}\nlog: {}",
        agent_log(dir)
    );
}

/// A process outside jobs (started through `launcher`, if any: `ip netns exec NS`) asking the
/// server is not redirected: the server answers any name.
fn outside_jobs_is_not_redirected(launcher: &[&str]) {
    let (step, server, port) = (
        job_step().display().to_string(),
        format!("{SERVER}:53"),
        PORT.to_string(),
    );
    let mut argv = launcher.to_vec();
    argv.extend([step.as_str(), "dns", "udp", &server, "denied.test", &port]);
    let out = output_of(Command::new(argv[0]).args(&argv[1..]));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("NoError {DENIED} ok"),
        "outside jobs nothing is redirected ({launcher:?})"
    );
}

fn destination_is(alert: &Value, ip: &str, port: u16) -> bool {
    alert["destination"]["ip"] == ip && alert["destination"]["port"] == port
}

/// This test's turn, the agent (its directory) on `policy()`, a job environment, and the
/// server namespace with the DNS server (IPv4 and IPv6) and the listeners.
fn started(
    name: &str,
) -> (
    std::sync::MutexGuard<'static, ()>,
    std::path::PathBuf,
    Agent,
    TestEnv,
    ServerNamespace,
) {
    let turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = agent_dir(name);
    std::fs::write(dir.join("policy.toml"), policy()).unwrap();
    let agent = Agent::launch(&dir, free_port(), &[]);
    let env = TestEnv::new(name);
    let mut ns = ServerNamespace::create();
    ns.serve(&["dns-serve".to_owned(), format!("{SERVER}:53")]);
    ns.serve(&["dns-serve".to_owned(), format!("[{SERVER6}]:53")]);
    ns.serve(&["dns-serve".to_owned(), format!("{CLUSTER}:53")]);
    let mut listeners: Vec<String> = [ALLOWED, DENIED, CNAME_TARGET, GLIBC]
        .iter()
        .map(|ip| format!("{ip}:{PORT}"))
        .collect();
    listeners.extend([SERVER, CLUSTER].map(|ip| format!("{ip}:{PORT}")));
    ns.serve(&[vec!["serve".to_owned()], listeners].concat());
    (turn, dir, agent, env, ns)
}

#[test]
fn block_mode_admits_what_a_job_resolved_for_an_allowed_name_and_nothing_else() {
    let (_one, dir, agent, env, ns) = started("egress-dns");
    assert!(
        agent_log(&dir).contains("DNS resolver on 127.0.0.1"),
        "the resolver started: {}",
        agent_log(&dir)
    );

    // The job's own resolv.conf, in a private mount namespace, for glibc's resolver.
    let resolv = env.dir.join("resolv.conf");
    std::fs::write(
        &resolv,
        format!("nameserver {SERVER}\noptions attempts:1\n"),
    )
    .unwrap();
    let glibc = format!(
        "!unshare -m sh -c 'mount --bind {} /etc/resolv.conf && exec \"$JOB_STEP\" connect-name glibc.allowed.test:{PORT}'",
        resolv.display()
    );
    let dns = |how: &str, name: &str| format!("dns {how} {SERVER}:53 {name} {PORT}");
    let run_a = run_id(1);
    let steps = vec![
        // Connects at once after the answer: no window in which the address is not admitted.
        ("udp", dns("udp", "allowed.test")),
        ("cname", dns("udp-send", "www.allowed.test")),
        ("tcp", dns("tcp", "allowed.test")),
        ("denied", dns("udp", "denied.test")),
        // A socket bound to one of the host's addresses before its connect: redirected too,
        // known by that address and port (REFUSED proves the agent answered, not the server).
        ("bound", dns("udp-from=10.215.0.1", "allowed.test")),
        ("bound-denied", dns("udp-from=10.215.0.1", "denied.test")),
        ("denied-addr", format!("egress tcp {DENIED}:{PORT}")),
        // An allowed name's address on a port its entry does not list: refused, and the
        // finding names it.
        ("other-port", format!("egress tcp {ALLOWED}:{}", PORT + 1)),
        ("glibc", glibc),
    ];
    let answers = job(&env, &agent, &run_a, "acme/dns-a", &steps);
    let expect = |label: &str, want: &str| expect_answer(&answers, label, want, &dir);
    expect("udp", &format!("NoError {ALLOWED} ok"));
    expect("cname", &format!("NoError {CNAME_TARGET} ok"));
    expect("tcp", &format!("NoError {ALLOWED} ok"));
    expect("denied", "Refused - -");
    expect("bound", &format!("NoError {ALLOWED} ok"));
    expect("bound-denied", "Refused - -");
    expect("denied-addr", "errno 1");
    expect("other-port", "errno 1");
    expect("glibc", "ok");

    let job_a = format!("{run_a}/build");
    let alert = wait_alert(&agent, "unexpected-egress", &job_a, |a| {
        destination_is(a, &DENIED.to_string(), PORT)
    });
    assert_eq!(alert["blocked"], true, "{alert}");
    // The answers the job got still feed the engine's names: the finding names the destination.
    let alert = wait_alert(&agent, "unexpected-egress", &job_a, |a| {
        destination_is(a, &ALLOWED.to_string(), PORT + 1)
    });
    assert_eq!(alert["blocked"], true, "{alert}");
    assert_eq!(alert["destination"]["dns_name"], "allowed.test", "{alert}");
    for ip in [ALLOWED, CNAME_TARGET, GLIBC] {
        assert!(
            !alerts(&agent)
                .iter()
                .any(|a| a["job"]["id"] == job_a.as_str()
                    && destination_is(a, &ip.to_string(), PORT)),
            "a resolved, allowed address ({ip}) is not reported"
        );
    }
    assert!(
        !alerts(&agent)
            .iter()
            .any(|a| a["job"]["id"] == job_a.as_str() && a["destination"]["port"] == 53),
        "a redirected DNS connect is not unexpected egress"
    );

    // Job B may reach the same names, but never resolved allowed.test: A's answer admits
    // nothing for B.
    let run_b = run_id(2);
    let answers = job(
        &env,
        &agent,
        &run_b,
        "acme/dns-b",
        &[("a-address", format!("egress tcp {ALLOWED}:{PORT}"))],
    );
    assert_eq!(
        answers.get("a-address").map(String::as_str),
        Some("errno 1"),
        "job B: {answers:#?}"
    );

    // The same server asked by its IPv6 address (a job of a third rule, so that nothing job A
    // resolved admits anything here): connects over IPv6 (UDP, a socket bound to `[::]:0`
    // first; TCP; glibc's resolver with an IPv6 nameserver) are redirected through
    // `::ffff:127.0.0.1`, unconnected IPv6 sends (musl's resolver) to the resolver's `[::1]`,
    // and the answer comes back from the address the process asked.
    let resolv6 = env.dir.join("resolv6.conf");
    std::fs::write(
        &resolv6,
        format!("nameserver {SERVER6}\noptions attempts:1\n"),
    )
    .unwrap();
    let dns6 = |how: &str, name: &str| format!("dns {how} [{SERVER6}]:53 {name} {PORT}");
    let run_d = run_id(4);
    let answers = job(
        &env,
        &agent,
        &run_d,
        "acme/dns-6",
        &[
            ("udp6", dns6("udp", "allowed.test")),
            ("tcp6", dns6("tcp", "www.allowed.test")),
            ("denied6", dns6("udp", "denied.test")),
            ("send6", dns6("udp-send", "allowed.test")),
            ("send6-cname", dns6("udp-send", "www.allowed.test")),
            ("send6-denied", dns6("udp-send", "denied.test")),
            (
                "glibc6",
                format!(
                    "!unshare -m sh -c 'mount --bind {} /etc/resolv.conf && exec \"$JOB_STEP\" connect-name glibc.allowed.test:{PORT}'",
                    resolv6.display()
                ),
            ),
        ],
    );
    let expect6 = |label: &str, want: &str| expect_answer(&answers, label, want, &dir);
    expect6("udp6", &format!("NoError {ALLOWED} ok"));
    expect6("tcp6", &format!("NoError {CNAME_TARGET} ok"));
    expect6("denied6", "Refused - -");
    expect6("send6", &format!("NoError {ALLOWED} ok"));
    expect6("send6-cname", &format!("NoError {CNAME_TARGET} ok"));
    expect6("send6-denied", "Refused - -");
    expect6("glibc6", "ok");
    // The redirected sends are reported as queries to the server the process addressed (only
    // `send6-cname` asks for this name over UDP), and nothing of this job's DNS is egress.
    let job_d = format!("{run_d}/build");
    let asked_cname = |e: &Value| {
        e["questions"].as_array().is_some_and(|q| {
            q.iter().any(|q| {
                q["name"].as_str().unwrap_or("").trim_end_matches('.') == "www.allowed.test"
            })
        })
    };
    let queries: Vec<Value> = json_lines(&dir.join("events.jsonl"))
        .into_iter()
        .filter(|e| e["kind"] == "dns_query" && asked_cname(e))
        .collect();
    assert!(
        queries
            .iter()
            .any(|q| q["server_ip"] == SERVER6 && q["server_port"] == 53),
        "the unconnected IPv6 query is not reported as sent to {SERVER6}: {queries:#?}"
    );
    assert!(
        !alerts(&agent)
            .iter()
            .any(|a| a["job"]["id"] == job_d.as_str() && a["destination"]["port"] == 53),
        "a redirected IPv6 query raised a finding"
    );

    // A job in audit mode and a process outside jobs are not redirected: they ask the server
    // itself, which answers any name.
    let run_c = run_id(3);
    let answers = job(
        &env,
        &agent,
        &run_c,
        "acme/audited",
        &[("denied", dns("udp", "denied.test"))],
    );
    assert_eq!(
        answers.get("denied").map(String::as_str),
        Some(format!("NoError {DENIED} ok").as_str()),
        "audit mode: {answers:#?}"
    );
    outside_jobs_is_not_redirected(&[]);

    drop(ns);
    let status = agent.stop();
    assert!(status.success(), "agent exit: {status}");
}

/// A job process in a network namespace of its own reaches the agent's resolver there: the agent
/// listens in the namespace once the kernel names it (at an exec there, or at its first query),
/// and the job's allowlist judges names and addresses as in the agent's own namespace. A query
/// that comes before the resolver is there is parked (dropped, nothing sent): the client's retry
/// gets the resolver.
#[test]
fn block_mode_serves_dns_in_a_jobs_own_network_namespace() {
    let (_one, dir, agent, env, ns) = started("egress-dns-ns");
    let job_ns = JobNamespace::new(&ns, 0, None);
    let j = &job_ns.name;
    // The namespace's own loopback DNS server, as Docker's embedded DNS is: one the job does not
    // name in its resolv.conf here, and one it does in a second namespace (as a container on a
    // user-defined Docker network does).
    let mut embedded = serve_in(j, &["dns-serve".to_owned(), "127.0.0.11:53".to_owned()]);
    let conf = "nameserver 127.0.0.11\noptions timeout:1 attempts:2\n";
    let docker_ns = JobNamespace::new(&ns, 1, Some(conf));
    let d = &docker_ns.name;
    let mut embedded_d = serve_in(d, &["dns-serve".to_owned(), "127.0.0.11:53".to_owned()]);
    let in_d =
        |step: &str| format!("!ip netns exec {d} sh -c 'sleep 0.5; exec \"$JOB_STEP\" {step}'");

    let resolv = env.dir.join("resolv.conf");
    std::fs::write(
        &resolv,
        format!("nameserver {SERVER}\noptions timeout:1 attempts:2\n"),
    )
    .unwrap();
    // The first thing of the job in its namespace: a process that entered it by setns, with no
    // exec there, asks over connected UDP at once. Its first query is parked, unless the agent
    // (named at the setns) was quicker; its resend, a second later, is answered by the
    // resolver the agent opened meanwhile.
    let parked =
        format!("!\"$JOB_STEP\" in-netns {j} dns udp-retry {SERVER}:53 allowed.test {PORT}");
    // A process that entered a third namespace by setns and asks once, with no resend, a moment
    // later (as a container's program asks after its runtime joined the namespace): the agent,
    // named at the setns, listens there by then.
    let early_ns = JobNamespace::new(&ns, 2, None);
    let early = format!(
        "!\"$JOB_STEP\" in-netns {} wait-ms 300 dns udp {SERVER}:53 allowed.test {PORT}",
        early_ns.name
    );
    // As a container runtime starts a container's program on a Docker network: a thread joins
    // the namespace (named to the agent then), makes a mount namespace with the container's
    // resolv.conf (naming the namespace's own server at 127.0.0.11), and only then execs. The
    // agent reads that resolv.conf at the exec: the resolver asks the namespace's server
    // (`whoami` answers with the answering server's address; from upstream it would be
    // SERVER's), and a name outside the allowlist is refused (left to the namespace's server,
    // it would be answered).
    let runtime_ns = JobNamespace::new(&ns, 3, None);
    let r = &runtime_ns.name;
    let mut embedded_r = serve_in(r, &["dns-serve".to_owned(), "127.0.0.11:53".to_owned()]);
    let runtime_conf = env.dir.join("runtime-resolv.conf");
    std::fs::write(&runtime_conf, conf).unwrap();
    let runtime = |name: &str| {
        format!(
            "!\"$JOB_STEP\" in-netns {r} wait-ms 300 with-resolv-conf {} wait-ms 300 \
             dns udp 127.0.0.11:53 {name} {PORT}",
            runtime_conf.display()
        )
    };
    // In the job's namespace, after a shell's exec there (which names it to the agent) and a
    // wait.
    let in_ns =
        |step: &str| format!("!ip netns exec {j} sh -c 'sleep 0.5; exec \"$JOB_STEP\" {step}'");
    let dns = |how: &str, name: &str| format!("dns {how} {SERVER}:53 {name} {PORT}");
    let glibc = format!(
        "!ip netns exec {j} unshare -m sh -c 'mount --bind {} /etc/resolv.conf && sleep 0.5 && \
         exec \"$JOB_STEP\" connect-name glibc.allowed.test:{PORT}'",
        resolv.display()
    );
    let run = run_id(5);
    let answers = job(
        &env,
        &agent,
        &run,
        "acme/dns-ns",
        &[
            ("parked", parked),
            ("early", early),
            ("runtime", runtime("whoami.allowed.test")),
            ("runtime-denied", runtime("denied.test")),
            ("udp", in_ns(&dns("udp", "allowed.test"))),
            ("cname", in_ns(&dns("udp-send", "www.allowed.test"))),
            ("tcp", in_ns(&dns("tcp", "allowed.test"))),
            ("denied", in_ns(&dns("udp", "denied.test"))),
            ("denied-addr", in_ns(&format!("egress tcp {DENIED}:{PORT}"))),
            // Not redirected: the namespace's own server answers any name, and its answer
            // admits nothing.
            (
                "embedded",
                in_ns(&format!("dns udp 127.0.0.11:53 denied.test {PORT}")),
            ),
            // Where the job's resolv.conf names its namespace's own server, the resolver asks
            // that server, from inside the namespace, for the names the allowlist admits.
            (
                "local",
                in_d(&format!("dns udp 127.0.0.11:53 allowed.test {PORT}")),
            ),
            (
                "local-denied",
                in_d(&format!("dns udp 127.0.0.11:53 denied.test {PORT}")),
            ),
            (
                "local-glibc",
                in_d(&format!("connect-name glibc.allowed.test:{PORT}")),
            ),
            ("glibc", glibc),
        ],
    );
    let expect = |label: &str, want: &str| expect_answer(&answers, label, want, &dir);
    expect("parked", &format!("NoError {ALLOWED} ok"));
    expect("early", &format!("NoError {ALLOWED} ok"));
    expect("runtime", "NoError 127.0.0.11 errno-111");
    expect("runtime-denied", "Refused - -");
    expect("udp", &format!("NoError {ALLOWED} ok"));
    expect("cname", &format!("NoError {CNAME_TARGET} ok"));
    expect("tcp", &format!("NoError {ALLOWED} ok"));
    expect("denied", "Refused - -");
    expect("denied-addr", "errno 1");
    expect("embedded", &format!("NoError {DENIED} errno-1"));
    expect("local", &format!("NoError {ALLOWED} ok"));
    expect("local-denied", "Refused - -");
    expect("local-glibc", "ok");
    expect("glibc", "ok");
    let log = agent_log(&dir);
    let listens: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("listens in a job's network namespace"))
        .collect();
    assert!(
        !listens.is_empty(),
        "the agent says where it listens: {log}"
    );
    eprintln!("{}", listens.join("\n"));
    let job_id = format!("{run}/build");
    let alert = wait_alert(&agent, "unexpected-egress", &job_id, |a| {
        destination_is(a, &DENIED.to_string(), PORT)
    });
    assert_eq!(alert["blocked"], true, "{alert}");

    // A process outside jobs in that namespace is not redirected either.
    outside_jobs_is_not_redirected(&["ip", "netns", "exec", j]);

    for server in [&mut embedded, &mut embedded_d, &mut embedded_r] {
        let _ = server.kill();
        let _ = server.wait();
    }
    drop(runtime_ns);
    drop(early_ns);
    drop(docker_ns);
    drop(job_ns);
    drop(ns);
    let status = agent.stop();
    assert!(status.success(), "agent exit: {status}");
}

/// A job that addresses a DNS server its allowlist admits on port 53 (a Kubernetes pod's cluster
/// DNS: `{ cidr = "10.96.0.10", ports = [53] }`) is answered by that server, which knows names
/// the agent's upstream does not; the name must still be allowed, and what it resolved is
/// admitted as always. Any other server is the agent's upstream, as before. `whoami.allowed.test`
/// resolves to the address of the server that answered.
#[test]
fn block_mode_asks_the_dns_server_a_job_addressed_where_its_allowlist_admits_it() {
    let (_one, dir, agent, env, ns) = started("egress-dns-cluster");
    let job_ns = JobNamespace::new(&ns, 2, None);
    let j = &job_ns.name;
    let ask = |how: &str, server: &str, name: &str| format!("dns {how} {server}:53 {name} {PORT}");
    let whoami = |how: &str, server: &str| ask(how, server, "whoami.allowed.test");
    let in_ns = |how: &str| format!("!\"$JOB_STEP\" in-netns {j} {}", whoami(how, CLUSTER));
    let steps = [
        ("udp", whoami("udp", CLUSTER)),
        ("send", whoami("udp-send", CLUSTER)),
        ("tcp", whoami("tcp", CLUSTER)),
        // An IPv6 socket that addresses it v4-mapped.
        ("udp-mapped", whoami("udp", &format!("[::ffff:{CLUSTER}]"))),
        ("tcp-mapped", whoami("tcp", &format!("[::ffff:{CLUSTER}]"))),
        ("denied", ask("udp", CLUSTER, "denied.test")),
        ("upstream", whoami("udp", SERVER)),
        ("upstream-tcp", whoami("tcp", SERVER)),
        // In the job's own namespace: asked from there (the first query may be parked).
        ("in-ns", in_ns("udp-retry")),
        ("in-ns-tcp", in_ns("tcp")),
    ];
    let answers = job(&env, &agent, &run_id(6), "acme/dns-cluster", &steps);
    let expect = |label: &str, want: &str| expect_answer(&answers, label, want, &dir);
    for label in [
        "udp",
        "send",
        "tcp",
        "udp-mapped",
        "tcp-mapped",
        "in-ns",
        "in-ns-tcp",
    ] {
        expect(label, &format!("NoError {CLUSTER} ok"));
    }
    expect("denied", "Refused - -");
    expect("upstream", &format!("NoError {SERVER} ok"));
    expect("upstream-tcp", &format!("NoError {SERVER} ok"));
    // A job whose allowlist does not admit that server gets the agent's upstream.
    let steps = [
        ("other", whoami("udp", CLUSTER)),
        ("other-tcp", whoami("tcp", CLUSTER)),
    ];
    let answers = job(&env, &agent, &run_id(7), "acme/dns-a", &steps);
    for label in ["other", "other-tcp"] {
        expect_answer(&answers, label, &format!("NoError {SERVER} ok"), &dir);
    }
    drop(job_ns);
    drop(ns);
    let status = agent.stop();
    assert!(status.success(), "agent exit: {status}");
}

/// With `sni = true` in block mode, UDP to an address only a name admitted is refused on every
/// port but 53 (QUIC on any port included: no server name can be read from it), and TCP to it
/// goes through; an address the rule's networks admit keeps its UDP, also once the job resolved
/// a name to it (the name's entry must not hide the network's from the kernel's look-up).
#[test]
fn under_sni_true_udp_to_an_address_only_a_name_admits_is_refused() {
    let (_one, dir, agent, env, _ns) = started("egress-dns-sni");
    let resolved = |how: &str| {
        format!(
            "!\"$JOB_STEP\" dns udp {SERVER}:53 allowed.test {PORT} > /dev/null && \
             \"$JOB_STEP\" egress {how} {ALLOWED}:{PORT}"
        )
    };
    let run = run_id(1);
    let steps = [
        ("udp", resolved("udp")),
        ("udp-send", resolved("udp-send")),
        ("tcp", resolved("tcp")),
        ("udp-net", format!("egress udp {CLUSTER}:{PORT}")),
    ];
    let answers = job(&env, &agent, &run, "acme/dns-sni", &steps);
    let expect = |label: &str, want: &str| expect_answer(&answers, label, want, &dir);
    expect("udp", "errno 1");
    expect("udp-send", "errno 1");
    expect("tcp", "ok");
    expect("udp-net", "ok");
    let alert = wait_alert(&agent, "unexpected-egress", &format!("{run}/build"), |a| {
        destination_is(a, &ALLOWED.to_string(), PORT)
    });
    assert_eq!(alert["blocked"], true, "{alert}");
    assert!(
        alert["summary"]
            .as_str()
            .unwrap()
            .contains("was refused UDP to"),
        "{alert}"
    );

    // The rule's network holds the address as well: its UDP goes through, resolved or not.
    let run = run_id(2);
    let steps = [("udp", resolved("udp")), ("udp-send", resolved("udp-send"))];
    let answers = job(&env, &agent, &run, "acme/dns-sni-net", &steps);
    expect_answer(&answers, "udp", "ok", &dir);
    expect_answer(&answers, "udp-send", "ok", &dir);
}
