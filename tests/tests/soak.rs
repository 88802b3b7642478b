//! Soak: rounds of GitHub-style jobs that flood the sensors (a million-open flood is counted,
//! not stored), fork hundreds of processes and leave a survivor that reads a credential after
//! the job ended, while the agent is restarted mid-job, its webhook receiver goes down and comes
//! back, and its policy is reloaded. At the end every finding the agent wrote was delivered to
//! the receiver exactly once, every round's expected findings are there, and the agent's memory
//! stayed flat.
//!
//! `RM_SOAK_ROUNDS` sets the number of rounds (default 3: one of each disturbance).

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpListener,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use integration_tests::{
    CANARY, TestEnv,
    live::{
        Agent, agent_log, assert_no_secret_in, free_port, job_command, json_lines, repo_root,
        target_dir, wait_alert, wait_until,
    },
    pin_dir_of,
};
use serde_json::Value;

/// A webhook receiver that can be taken down and brought back on the same port.
struct Receiver {
    port: u16,
    received: Arc<Mutex<Vec<Value>>>,
    up: Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
}

impl Receiver {
    fn new() -> Self {
        let mut r = Receiver {
            port: free_port(),
            received: Arc::default(),
            up: None,
        };
        r.start();
        r
    }

    fn start(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let running = Arc::new(AtomicBool::new(true));
        let (flag, received) = (running.clone(), self.received.clone());
        let thread = std::thread::spawn(move || {
            while flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).unwrap();
                        serve(stream, &received);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        self.up = Some((running, thread));
    }

    fn stop(&mut self) {
        if let Some((flag, thread)) = self.up.take() {
            flag.store(false, Ordering::Relaxed);
            thread.join().unwrap();
        }
    }

    fn alerts(&self) -> Vec<Value> {
        self.received.lock().unwrap().clone()
    }
}

/// One HTTP/1.1 request per connection: the body (a JSON array of alerts) is kept, 200 back.
fn serve(stream: std::net::TcpStream, received: &Mutex<Vec<Value>>) {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reader = BufReader::new(stream);
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    let batch: Vec<Value> = serde_json::from_slice(&body).expect("a JSON array of alerts");
    received.lock().unwrap().extend(batch);
    let mut stream = reader.into_inner();
    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
}

/// The agent's own memory: RSS without its mappings of BPF maps (the ring buffer's pages).
fn own_rss_kib(pid: u32) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let (mut total, mut maps, mut in_map) = (0, 0, false);
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            in_map = line.ends_with("anon_inode:bpf-map");
        } else if first == "Rss:" {
            let kib: u64 = fields.next().unwrap().parse().unwrap();
            total += kib;
            if in_map {
                maps += kib;
            }
        }
    }
    total - maps
}

/// What identifies one finding.
fn identity(a: &Value) -> String {
    format!(
        "{} {} {} {} {}",
        a["rule"], a["job"]["id"], a["process"]["pid"], a["time_ns"], a["credential"]["path"]
    )
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Disturbance {
    None,
    ReceiverDown,
    RestartAndReload,
}

#[test]
fn soak_floods_restarts_outages_and_a_reload_deliver_every_finding_exactly_once() {
    let rounds: usize = std::env::var("RM_SOAK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let env = TestEnv::new("soak");
    let dir = env.dir.join("agent");
    let pins = pin_dir_of(&dir);
    let mut receiver = Receiver::new();
    let webhook = format!("http://127.0.0.1:{}/alerts", receiver.port);
    let am_port = free_port();
    let launch = || Agent::launch(&dir, am_port, &["--webhook", &webhook]);
    let mut agent = launch();
    let worker = env.dir.join("Runner.Worker");
    std::fs::copy("/bin/sh", &worker).unwrap();
    let hooks = repo_root().join("hooks/github");
    let flood = target_dir().join("bench-workload");
    let mut memory = Vec::new();
    let mut jobs = Vec::new();

    for round in 0..rounds {
        let disturbance = [
            Disturbance::None,
            Disturbance::ReceiverDown,
            Disturbance::RestartAndReload,
        ][round % 3];
        let run = format!("{}{round:03}", std::process::id());
        let id = format!("{run}/build");
        let (gate, go) = (
            env.dir.join(format!("gate-{round}")),
            env.dir.join(format!("go-{round}")),
        );
        if disturbance == Disturbance::ReceiverDown {
            receiver.stop();
        }
        if disturbance == Disturbance::RestartAndReload {
            // The same policy, reloaded: state and jobs must come through untouched.
            agent.signal(libc::SIGHUP);
            wait_until("the reload", 10, || {
                agent_log(&dir).matches("policy reloaded").count() > round / 3
            });
        }
        let script = format!(
            "sh {started}\n\
             {flood} flood {home}/no-such-dir/.aws/credentials 1 2 > /dev/null\n\
             for i in $(seq 300); do /bin/true; done\n\
             (setsid sh -c 'while [ ! -e {gate} ]; do sleep 0.1; done; \
               cat \"$HOME/.aws/credentials\" > /dev/null; sleep 3' &)\n\
             while [ ! -e {go} ]; do sleep 0.1; done\n\
             sh {completed}\n",
            started = hooks.join("job-started.sh").display(),
            completed = hooks.join("job-completed.sh").display(),
            flood = flood.display(),
            home = env.home.display(),
            gate = gate.display(),
            go = go.display(),
        );
        let mut job = job_command(&worker, &env, &agent)
            .arg("-c")
            .arg(script)
            .env("GITHUB_RUN_ID", &run)
            .env("GITHUB_JOB", "build")
            .env("GITHUB_REPOSITORY", "acme/soak")
            .env("GITHUB_TOKEN", CANARY)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        wait_until("the job is named", 30, || {
            std::fs::read_to_string(dir.join("events.jsonl"))
                .unwrap_or_default()
                .contains(&format!("\"id\":\"{id}\""))
        });
        if disturbance == Disturbance::RestartAndReload {
            assert!(agent.stop().success(), "{}", agent_log(&dir));
            agent = launch();
        }
        std::fs::write(&go, "").unwrap();
        assert!(job.wait().unwrap().success());
        std::fs::write(&gate, "").unwrap();
        wait_alert(&agent, "credential-after-job-end", &id, |_| true);
        wait_alert(&agent, "process-survived-job", &id, |_| true);
        if disturbance == Disturbance::ReceiverDown {
            receiver.start();
        }
        jobs.push(id);
        memory.push(own_rss_kib(agent.pid()));
    }

    // Every finding the agent wrote reaches the receiver, once. The last job's survivors are
    // raised in one tick and written a line at a time: the stream is read once it stopped
    // growing for a second (read earlier, a late line was "delivered but never written").
    let mut last = None;
    wait_until("the alert stream settles", 30, || {
        let now = std::fs::read_to_string(dir.join("alerts.jsonl")).unwrap_or_default();
        let settled = last.as_ref() == Some(&now);
        last = Some(now);
        if !settled {
            std::thread::sleep(Duration::from_millis(750));
        }
        settled
    });
    let written: Vec<Value> = json_lines(&dir.join("alerts.jsonl"))
        .into_iter()
        .filter(|a: &Value| jobs.iter().any(|j| a["job"]["id"] == j.as_str()))
        .collect();
    let count = |alerts: &[Value]| {
        let mut m: BTreeMap<String, usize> = BTreeMap::new();
        for a in alerts {
            *m.entry(identity(a)).or_default() += 1;
        }
        m
    };
    let expected = count(&written);
    assert!(
        expected.values().all(|&n| n == 1),
        "the agent wrote a finding twice: {expected:#?}"
    );
    wait_until("every finding delivered", 30, || {
        let got = count(
            &receiver
                .alerts()
                .into_iter()
                .filter(|a| jobs.iter().any(|j| a["job"]["id"] == j.as_str()))
                .collect::<Vec<_>>(),
        );
        expected.keys().all(|k| got.contains_key(k))
    });
    let delivered: Vec<Value> = receiver
        .alerts()
        .into_iter()
        .filter(|a| jobs.iter().any(|j| a["job"]["id"] == j.as_str()))
        .collect();
    assert_eq!(
        count(&delivered),
        expected,
        "delivered is not exactly what was written"
    );
    for id in &jobs {
        for rule in ["credential-after-job-end", "process-survived-job"] {
            assert!(
                written
                    .iter()
                    .any(|a| a["rule"] == rule && a["job"]["id"] == id.as_str()),
                "{rule} missing for {id}"
            );
        }
    }
    let stopped = agent.stop();
    assert!(stopped.success());
    assert_no_secret_in(&dir);
    eprintln!(
        "soak: {rounds} rounds, {} findings written and delivered once each; agent own RSS by \
         round (KiB): {memory:?}",
        written.len()
    );
    // Flat: after the first round, growth stays under 8 MiB however many rounds run.
    let (first, last) = (memory[0], *memory.last().unwrap());
    assert!(
        last <= first + 8 * 1024,
        "agent memory grew from {first} KiB to {last} KiB"
    );
    let _ = std::fs::remove_dir_all(&pins);
}
