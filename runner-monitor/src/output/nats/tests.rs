//! The fingerprint message of an event; the sink against a real nats-server is tested in
//! tests/tests/fleet.rs (through the agent) and here (spool, outage, resend).
use super::*;
use crate::event::JobKey;

fn event(json: serde_json::Value) -> Event {
    serde_json::from_value(json).unwrap()
}

#[test]
fn a_fingerprinted_read_and_a_written_credential_become_messages_nothing_else_does() {
    let job = JobInfo {
        id: "42/build".into(),
        repository: Some("acme/app".into()),
        ..JobInfo::default()
    };
    let read = event(
        serde_json::json!({"time_ns": 5_000_000_000u64, "job": {"key": 7, "ended": false},
        "process": {"pid": 9}, "kind": "file_open", "path": "/root/.aws/credentials", "result": 3,
        "fingerprint": "hmac-sha256:0123456789ab:00112233445566778899aabbccddeeff"}),
    );
    let m = fingerprint_message(&read, Some(&job), Some("aws"), "runner-1", None).unwrap();
    assert_eq!(m.usage, CredentialUse::Read);
    assert_eq!(m.key_id, "0123456789ab");
    assert_eq!((m.host.as_str(), m.pid), ("runner-1", 9));
    assert_eq!(m.job, job);
    assert_eq!(m.credential_kind.as_deref(), Some("aws"));
    let written = event(
        serde_json::json!({"time_ns": 1, "job": {"key": 7, "ended": false},
        "process": {"pid": 9}, "kind": "credential_fingerprint", "path": "/root/.aws/credentials",
        "fingerprint": "hmac-sha256:0123456789ab:ff"}),
    );
    let clock = WallClock::now(0);
    let m = fingerprint_message(&written, None, None, "h", Some(clock)).unwrap();
    assert_eq!(m.usage, CredentialUse::Materialised);
    assert_eq!(
        m.job.id,
        JobKey(7).to_string(),
        "an unknown job is named by its key"
    );
    assert_eq!(m.time_unix_ns, clock.unix_ns(1));
    // A read without a fingerprint (no key) and a write are not fingerprints.
    let unhashed = event(
        serde_json::json!({"time_ns": 1, "job": {"key": 7, "ended": false},
        "process": {"pid": 9}, "kind": "file_open", "path": "/root/.aws/credentials", "result": 3}),
    );
    assert!(fingerprint_message(&unhashed, None, None, "h", None).is_none());
}

/// A real nats-server with JetStream, on a loopback port, storing in `dir` (kept across a
/// restart, as a broker's disk is).
struct Broker {
    child: std::process::Child,
    port: u16,
    dir: PathBuf,
}

impl Broker {
    fn start(dir: &Path, port: u16) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let port = if port == 0 {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        } else {
            port
        };
        let child = std::process::Command::new("nats-server")
            .args(["-js", "-sd"])
            .arg(dir)
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server (Debian's nats-server; `cargo xtask setup` installs it)");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            port,
            dir: dir.to_path_buf(),
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn stop(mut self) -> (PathBuf, u16) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        (self.dir.clone(), self.port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every message in the stream: (subject, payload).
async fn stream_messages(url: &str, stream: &str) -> Vec<(String, serde_json::Value)> {
    let client = async_nats::connect(url).await.unwrap();
    let context = jetstream::new(client);
    let mut stream = context.get_stream(stream).await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        if let Ok(m) = stream.get_raw_message(seq).await {
            out.push((
                m.subject.to_string(),
                serde_json::from_slice(&m.payload).unwrap(),
            ));
        }
    }
    out
}

fn target(url: String) -> NatsTarget {
    NatsTarget {
        url,
        fleet: FleetConfig::default(),
        host: "runner.one".into(),
    }
}

async fn wait_drained(sink: &NatsSink, seconds: u64) {
    let left = sink
        .drain(tokio::time::Instant::now() + Duration::from_secs(seconds))
        .await;
    assert_eq!(left, 0, "spool not delivered within {seconds} s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_arrives_once_in_order_across_a_broker_outage_and_a_restart() {
    let dir = std::env::temp_dir().join(format!("rm-nats-sink-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let broker = Broker::start(&dir.join("broker"), 0);
    let url = broker.url();
    let metrics = Arc::new(Metrics::new());
    let sink = NatsSink::start(target(url.clone()), &dir.join("spool"), metrics.clone()).unwrap();
    for n in 0..5 {
        sink.finding(format!("{{\"rule\":\"agent-tamper\",\"n\":{n}}}").as_bytes())
            .unwrap();
    }
    wait_drained(&sink, 15).await;
    // The broker goes down: findings wait in the spool, failures are counted.
    let (store, port) = broker.stop();
    for n in 5..10 {
        sink.finding(format!("{{\"rule\":\"agent-tamper\",\"n\":{n}}}").as_bytes())
            .unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !metrics.encode().lines().any(|l| {
        // Failures carry a reason label beside the sink's.
        l.starts_with("runner_monitor_alert_delivery_failures_total{")
            && l.contains("sink=\"nats\"")
            && !l.ends_with(" 0")
    }) {
        assert!(std::time::Instant::now() < deadline, "no failure counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(sink.pending_bytes() > 0);
    // It comes back with its store: the rest arrives.
    let broker = Broker::start(&store, port);
    wait_drained(&sink, 30).await;
    // A spool whose cursor did not move although its records were published (a crash after
    // the acknowledgement, before the cursor was saved) is sent again: the ids are the same, and
    // the duplicate window drops the resends.
    {
        let mut spool = Spool::open(&dir.join("two"), SINK).unwrap();
        for n in 10..13 {
            spool
                .append(format!("findings\t{{\"n\":{n}}}").as_bytes())
                .unwrap();
        }
        std::fs::create_dir_all(dir.join("two-copy")).unwrap();
        for file in ["nats.jsonl", "nats.cursor"] {
            let _ = std::fs::copy(dir.join("two").join(file), dir.join("two-copy").join(file));
        }
    }
    let mut two = target(url.clone());
    two.host = "runner-two".into();
    let first = NatsSink::start(two.clone(), &dir.join("two"), metrics.clone()).unwrap();
    wait_drained(&first, 15).await;
    let again = NatsSink::start(two, &dir.join("two-copy"), metrics.clone()).unwrap();
    wait_drained(&again, 15).await;
    let messages = stream_messages(&url, "RUNNER_MONITOR").await;
    let n: Vec<i64> = messages
        .iter()
        .map(|(_, m)| m["n"].as_i64().unwrap())
        .collect();
    assert_eq!(n, (0..13).collect::<Vec<_>>(), "{messages:?}");
    assert!(
        messages[..10]
            .iter()
            .all(|(s, _)| s == "runner-monitor.findings.runner_one")
    );
    assert_eq!(messages[10].0, "runner-monitor.findings.runner-two");
    drop(broker);
    let _ = std::fs::remove_dir_all(dir);
}
