//! The fleet correlator against a real NATS JetStream: Debian's `nats-server` (JetStream on, its
//! store in a directory the test owns, on a loopback port the test picks), fingerprint messages
//! published with async-nats exactly as the wire contract (`runner_monitor::fleet::message`)
//! says, for several hosts, and the real `runner-monitor fleet` binary:
//! - a credential materialised on one host and read on another is found, naming both hosts,
//!   jobs and repositories, critical across repositories; same-host reuse and fingerprints made
//!   with different key ids raise nothing;
//! - two instances on one durable consumer share the work: each read judged once, both got some;
//! - a restarted correlator rebuilds its ledger from the stream and resumes: nothing lost,
//!   nothing raised twice.
//!
//! The credential contents are the canary; no output (alerts, the stream's findings, metrics,
//! logs) carries it.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use async_nats::jetstream;
use futures_util::StreamExt as _;
use integration_tests::{
    CANARY,
    live::{curl, free_port, target_dir},
};
use runner_monitor::{
    enrich::Fingerprinter,
    event::JobInfo,
    fleet::message::{
        CredentialUse, DEFAULT_PREFIX, DEFAULT_STREAM, FingerprintMessage, fingerprints_subject,
        message_id,
    },
};
use serde_json::Value;

fn tempdir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("fleet")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A nats-server with JetStream, killed when dropped; over TLS (client certificates required)
/// with `pki`.
struct Nats {
    child: Child,
    port: u16,
    pki: Option<Pki>,
}

/// A test CA, the server's certificate (127.0.0.1) and a client certificate, made by rcgen.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

impl Pki {
    fn generate(dir: &Path) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "runner-monitor fleet test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let leaf = |names: Vec<String>, name: &str| {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(names)
                .unwrap()
                .signed_by(&key, &ca)
                .unwrap();
            (
                write(&format!("{name}.pem"), &cert.pem()),
                write(&format!("{name}.key"), &key.serialize_pem()),
            )
        };
        let (cert, key) = leaf(vec!["127.0.0.1".into()], "server");
        let (client_cert, client_key) = leaf(vec!["fleet-correlator".into()], "client");
        Self {
            ca: write("ca.pem", &ca.pem()),
            cert,
            key,
            client_cert,
            client_key,
        }
    }
}

impl Nats {
    fn start(dir: &Path) -> Self {
        Self::start_with(dir, None)
    }

    fn start_with(dir: &Path, pki: Option<Pki>) -> Self {
        let port = free_port();
        let config = dir.join("nats.conf");
        let tls = pki.as_ref().map_or(String::new(), |p| {
            format!(
                "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n}}\n",
                p.cert, p.key, p.ca
            )
        });
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:{port}\njetstream {{ store_dir: {:?} }}\n{tls}",
                dir.join("jetstream")
            ),
        )
        .unwrap();
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("nats-server.log")).unwrap())
            .spawn()
            .expect("nats-server (cargo xtask setup installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, port, pki }
    }

    fn url(&self) -> String {
        match self.pki {
            Some(_) => format!("tls://127.0.0.1:{}", self.port),
            None => format!("nats://127.0.0.1:{}", self.port),
        }
    }

    /// A client as an agent's sink connects: with the CA and a client certificate over TLS.
    async fn client(&self) -> async_nats::Client {
        let mut options = async_nats::ConnectOptions::new();
        if let Some(p) = &self.pki {
            options = options
                .require_tls(true)
                .add_root_certificates(p.ca.clone())
                .add_client_certificate(p.client_cert.clone(), p.client_key.clone());
        }
        options.connect(self.url()).await.unwrap()
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `runner-monitor fleet`.
struct Correlator {
    child: Child,
    port: u16,
    alerts: PathBuf,
    log: PathBuf,
}

impl Correlator {
    fn start(nats: &Nats, dir: &Path, name: &str, consumer: &str) -> Self {
        let tls: Vec<PathBuf> = nats.pki.as_ref().map_or(Vec::new(), |p| {
            [
                "--tls-ca".into(),
                p.ca.clone(),
                "--tls-cert".into(),
                p.client_cert.clone(),
                "--tls-key".into(),
                p.client_key.clone(),
            ]
            .into()
        });
        Self::start_with(nats, dir, name, consumer, &tls)
    }

    fn start_with(nats: &Nats, dir: &Path, name: &str, consumer: &str, extra: &[PathBuf]) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let alerts = dir.join("alerts.jsonl");
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(target_dir().join("runner-monitor"))
            .args(["fleet", "--nats", &nats.url(), "--consumer", consumer])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--fetch-batch", "1", "--key-grace", "1h"])
            .arg("--alerts-out")
            .arg(&alerts)
            .arg("--spool-dir")
            .arg(dir.join("spool"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        let c = Self {
            child,
            port,
            alerts,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while curl(&format!("http://127.0.0.1:{port}/readyz")) != "ready\n" {
            assert!(
                Instant::now() < deadline,
                "correlator not ready: {}",
                std::fs::read_to_string(&c.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    fn metrics(&self) -> String {
        curl(&format!("http://127.0.0.1:{}/metrics", self.port))
    }

    /// Fingerprint messages this instance was given (all outcomes).
    fn messages(&self) -> u64 {
        self.metrics()
            .lines()
            .filter(|l| l.starts_with("runner_monitor_fleet_messages_total{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    }

    fn alerts(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.alerts)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn stop(mut self) -> String {
        // SAFETY: signalling the child we spawned.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        let log = std::fs::read_to_string(&self.log).unwrap();
        assert!(status.success(), "correlator failed: {log}");
        log
    }
}

impl Drop for Correlator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The credential whose content is the canary, as fingerprinted with key `key`.
fn fingerprint(key: &str, n: u32) -> String {
    Fingerprinter::new(format!("fleet-test-key-{key}-0123456789abcdef").into_bytes())
        .fingerprint(format!("{CANARY}-{n}").as_bytes())
}

fn message(
    host: &str,
    job: &str,
    repo: &str,
    usage: CredentialUse,
    key: &str,
    n: u32,
) -> FingerprintMessage {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    FingerprintMessage {
        host: host.into(),
        key_id: key.into(),
        fingerprint: fingerprint(key, n),
        usage,
        credential_kind: Some("docker".into()),
        path: "/home/runner/.docker/config.json".into(),
        job: JobInfo {
            id: job.into(),
            platform: Some("github".into()),
            repository: Some(repo.into()),
            ..JobInfo::default()
        },
        pid: 4242,
        time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        time_unix_ns: now.as_nanos() as u64,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Publishes `messages` as an agent's NATS sink does (subject per host, Nats-Msg-Id), each
/// acknowledged by JetStream. `offset` keeps message ids distinct across calls.
fn publish(nats: &Nats, messages: &[FingerprintMessage], offset: u64) {
    runtime().block_on(async {
        let js = jetstream::new(nats.client().await);
        js.get_or_create_stream(jetstream::stream::Config {
            name: DEFAULT_STREAM.into(),
            subjects: vec![format!("{DEFAULT_PREFIX}.>")],
            ..Default::default()
        })
        .await
        .unwrap();
        for (i, m) in messages.iter().enumerate() {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                "Nats-Msg-Id",
                message_id(&m.host, "fingerprints", offset + i as u64).as_str(),
            );
            js.publish_with_headers(
                fingerprints_subject(DEFAULT_PREFIX, &m.host),
                headers,
                serde_json::to_vec(m).unwrap().into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
    });
}

/// The correlator's findings on the stream (`<prefix>.findings.fleet`).
fn stream_findings(nats: &Nats) -> Vec<Value> {
    runtime().block_on(async {
        let js = jetstream::new(nats.client().await);
        let stream = js.get_stream(DEFAULT_STREAM).await.unwrap();
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: format!("{DEFAULT_PREFIX}.findings.fleet"),
                ..Default::default()
            })
            .await
            .unwrap();
        let pending = consumer.cached_info().num_pending;
        let mut messages = consumer.messages().await.unwrap().take(pending as usize);
        let mut out = Vec::new();
        while let Some(m) = messages.next().await {
            out.push(serde_json::from_slice(&m.unwrap().payload).unwrap());
        }
        out
    })
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// No output of the test carries the credential's content.
fn assert_no_canary(dir: &Path, more: &[String]) {
    for entry in walk(dir) {
        if entry.starts_with(dir.join("jetstream")) {
            continue; // the broker's own store: only what was published, checked below
        }
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(CANARY),
            "canary in {}",
            entry.display()
        );
    }
    for text in more {
        assert!(!text.contains(CANARY), "canary in {text}");
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

use CredentialUse::{Materialised, Read};

#[test]
fn cross_host_reuse_is_found_with_both_sides_and_nothing_else() {
    let dir = tempdir("find");
    let nats = Nats::start(&dir);
    let c = Correlator::start(&nats, &dir, "c1", "fleet-find");
    let messages = [
        // Another repository's job on another host: critical.
        message("runner-a", "101/build", "acme/app", Materialised, "k1", 1),
        message("runner-b", "202/test", "evil/fork", Read, "k1", 1),
        // Same repository, another host: the rule's own severity.
        message("runner-a", "103/build", "acme/app", Materialised, "k1", 2),
        message("runner-c", "204/deploy", "acme/app", Read, "k1", 2),
        // Same host: the agent's own engine reports it, not the correlator.
        message("runner-a", "105/build", "acme/app", Materialised, "k1", 3),
        message("runner-a", "206/test", "evil/fork", Read, "k1", 3),
        // The same credential fingerprinted with another key: never the same.
        message("runner-a", "107/build", "acme/app", Materialised, "k1", 4),
        message("runner-b", "208/test", "evil/fork", Read, "k2", 4),
    ];
    publish(&nats, &messages, 0);
    wait_until("every message judged", Duration::from_secs(30), || {
        c.messages() == messages.len() as u64
    });
    let alerts = c.alerts();
    assert_eq!(alerts.len(), 2, "{alerts:#?}");
    let critical = alerts
        .iter()
        .find(|a| a["job"]["id"] == "202/test")
        .expect("runner-b's read");
    assert_eq!(critical["rule"], "cross-job-credential-reuse");
    assert_eq!(critical["severity"], "critical");
    assert_eq!(critical["job"]["host"], "runner-b");
    assert_eq!(critical["job"]["repository"], "evil/fork");
    assert_eq!(critical["origin_job"]["host"], "runner-a");
    assert_eq!(critical["origin_job"]["id"], "101/build");
    assert_eq!(critical["origin_job"]["repository"], "acme/app");
    assert!(critical["time"].as_str().unwrap().starts_with("20"));
    let same_repo = alerts
        .iter()
        .find(|a| a["job"]["id"] == "204/deploy")
        .expect("runner-c's read");
    assert_eq!(same_repo["severity"], "high");
    assert_eq!(same_repo["origin_job"]["id"], "103/build");
    // The same findings on the stream, for the rest of the fleet's pipeline.
    let on_stream = stream_findings(&nats);
    assert_eq!(on_stream.len(), 2, "{on_stream:#?}");
    // The ledger's gauges are refreshed every second.
    wait_until(
        "the ledger's size in /metrics",
        Duration::from_secs(5),
        || {
            c.metrics()
                .contains("runner_monitor_fleet_ledger_fingerprints 4")
        },
    );
    let metrics = c.metrics();
    assert!(metrics.contains("runner_monitor_fleet_messages_total{outcome=\"same_host\"} 1"));
    assert!(metrics.contains("runner_monitor_fleet_findings_total{severity=\"critical\"} 1"));
    assert!(metrics.contains("runner_monitor_fleet_ledger_jobs 4"));
    let log = c.stop();
    let stream_text: Vec<String> = on_stream.iter().map(Value::to_string).collect();
    assert_no_canary(&dir, &[stream_text, vec![metrics, log]].concat());
}

#[test]
fn two_instances_share_the_durable_consumer() {
    let dir = tempdir("share");
    let nats = Nats::start(&dir);
    let one = Correlator::start(&nats, &dir.join("one"), "one", "fleet-shared");
    let two = Correlator::start(&nats, &dir.join("two"), "two", "fleet-shared");
    let mut messages = Vec::new();
    for n in 0..30 {
        messages.push(message(
            "runner-a",
            &format!("1{n}/build"),
            "acme/app",
            Materialised,
            "k1",
            n,
        ));
        messages.push(message(
            "runner-b",
            &format!("2{n}/test"),
            "evil/fork",
            Read,
            "k1",
            n,
        ));
    }
    publish(&nats, &messages, 0);
    wait_until("every message judged", Duration::from_secs(60), || {
        one.messages() + two.messages() == messages.len() as u64
    });
    std::thread::sleep(Duration::from_millis(500));
    let (a, b) = (one.messages(), two.messages());
    assert_eq!(a + b, messages.len() as u64, "a message handled twice");
    assert!(a > 0 && b > 0, "work not shared: {a} and {b}");
    // Every read judged once, by one of them: 30 findings in all, none twice.
    let mut jobs: Vec<String> = one
        .alerts()
        .into_iter()
        .chain(two.alerts())
        .map(|f| f["job"]["id"].as_str().unwrap().to_owned())
        .collect();
    jobs.sort();
    let all = jobs.len();
    jobs.dedup();
    assert_eq!((all, jobs.len()), (30, 30));
    assert_eq!(stream_findings(&nats).len(), 30);
    let logs = vec![one.stop(), two.stop()];
    assert_no_canary(&dir, &logs);
}

#[test]
fn a_restarted_correlator_resumes_without_losing_or_raising_again() {
    let dir = tempdir("restart");
    let nats = Nats::start(&dir);
    let first = Correlator::start(&nats, &dir, "first", "fleet-restart");
    publish(
        &nats,
        &[
            message("runner-a", "101/build", "acme/app", Materialised, "k1", 1),
            message("runner-b", "202/test", "evil/fork", Read, "k1", 1),
        ],
        0,
    );
    wait_until("the first finding", Duration::from_secs(30), || {
        first.alerts().len() == 1
    });
    let log1 = first.stop();
    // While it is down, another host reads the credential materialised before the restart.
    publish(
        &nats,
        &[message(
            "runner-c",
            "303/release",
            "evil/other",
            Read,
            "k1",
            1,
        )],
        10,
    );
    let second = Correlator::start(&nats, &dir, "second", "fleet-restart");
    wait_until("the read made while down", Duration::from_secs(30), || {
        second.messages() == 1
    });
    std::thread::sleep(Duration::from_millis(500));
    let alerts = second.alerts();
    let jobs: Vec<&str> = alerts
        .iter()
        .map(|a| a["job"]["id"].as_str().unwrap())
        .collect();
    // The same file across both runs: the first finding once, the new one found.
    assert_eq!(jobs, ["202/test", "303/release"], "{alerts:#?}");
    assert_eq!(alerts[1]["origin_job"]["host"], "runner-a");
    assert_eq!(second.messages(), 1, "an acknowledged read was given again");
    assert_eq!(stream_findings(&nats).len(), 2);
    let log2 = second.stop();
    assert_no_canary(&dir, &[log1, log2]);
}

#[test]
fn over_tls_with_a_client_certificate_and_refused_without_the_ca() {
    let dir = tempdir("tls");
    let nats = Nats::start_with(&dir, Some(Pki::generate(&dir)));
    // Without the CA the server's certificate does not verify: a clear error, no start.
    let out = Command::new(target_dir().join("runner-monitor"))
        .args(["fleet", "--nats", &nats.url(), "--alerts-out"])
        .arg(dir.join("refused.jsonl"))
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("connecting to tls://127.0.0.1"), "{stderr}");
    let c = Correlator::start(&nats, &dir, "tls", "fleet-tls");
    publish(
        &nats,
        &[
            message("runner-a", "101/build", "acme/app", Materialised, "k1", 1),
            message("runner-b", "202/test", "evil/fork", Read, "k1", 1),
        ],
        0,
    );
    wait_until("the finding over TLS", Duration::from_secs(30), || {
        c.alerts().len() == 1
    });
    assert_eq!(stream_findings(&nats).len(), 1);
    let log = c.stop();
    assert_no_canary(&dir, &[log, stderr.into_owned()]);
}
