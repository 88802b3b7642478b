//! Alert delivery over TLS (`output/delivery.rs`, `output/tls.rs`) to real receivers the tests
//! start, with a test CA the tests generate (rcgen):
//! - a real Alertmanager (Debian's, from `cargo xtask setup`) serving https with its
//!   `--web.config.file` and requiring a client certificate: alerts arrive with our client
//!   certificate, and without one they stay spooled;
//! - an https webhook (axum over tokio-rustls) taking OCSF findings: a server certificate from
//!   another CA is a `tls` failure in the metrics and the log, the alert stays spooled, and an
//!   agent restarted with the right CA delivers it.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use runner_monitor::output::{
    delivery::{Receiver, Sink, SinkOptions},
    metrics::Metrics,
    ocsf::AlertFormat,
    tls::TlsFiles,
};
use serde_json::{Value, json};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rm-tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A test CA, and PEM files of certificates it signs.
struct TestCa {
    key: KeyPair,
    params: CertificateParams,
}

impl TestCa {
    /// A CA; its certificate in `dir/<name>.pem`.
    fn new(dir: &Path, name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("runner-monitor test {name}"),
        );
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        Self { key, params }
    }

    /// A certificate for `names`, signed by this CA: `dir/<name>.pem` and `dir/<name>-key.pem`.
    fn issue(&self, dir: &Path, name: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let (cert_path, key_path) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}-key.pem")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }
}

/// A child process killed when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Everything the library logs, for the tests to read (one subscriber per test binary).
fn log() -> Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let log: Arc<Mutex<Vec<u8>>> = Arc::default();
        let writer = log.clone();
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || LogWriter(writer.clone()))
            .init();
        log
    })
    .clone()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn wait_until(what: &str, seconds: u64, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The value of a metric series, from the exposition text.
fn series(metrics: &Metrics, name_and_labels: &str) -> u64 {
    metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0)
}

/// A finding as the alert stream writes it.
fn alert(job_id: &str) -> Vec<u8> {
    json!({"rule": "credential-after-job-end", "severity": "critical",
        "mitre": {"id": "T1552.001", "name": "Unsecured Credentials: Credentials In Files"},
        "time": "2026-12-03T02:00:00.000Z", "time_ns": 5,
        "job": {"key": 7, "id": job_id, "repository": "acme/app", "ended": true},
        "process": {"pid": 42, "comm": "python3", "uid": 1001, "ancestry": []},
        "credential": {"path": "/home/runner/.aws/credentials", "kind": "aws"},
        "summary": "python3 read aws credentials after its job ended"})
    .to_string()
    .into_bytes()
}

/// Curl (an independent TLS client) against the https Alertmanager, with our client certificate.
fn curl(dir: &Path, url: &str) -> String {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5", "--cacert"])
        .arg(dir.join("ca.pem"))
        .arg("--cert")
        .arg(dir.join("agent.pem"))
        .arg("--key")
        .arg(dir.join("agent-key.pem"))
        .arg(url)
        .output()
        .expect("curl (cargo xtask setup installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A real Alertmanager serving https on `port`, requiring a client certificate from the CA.
fn start_alertmanager(dir: &Path, port: u16) -> Running {
    std::fs::write(
        dir.join("alertmanager.yml"),
        "route:\n  receiver: soc\nreceivers:\n  - name: soc\n",
    )
    .unwrap();
    let mut web = std::fs::File::create(dir.join("web.yml")).unwrap();
    write!(
        web,
        "tls_server_config:\n  cert_file: {}\n  key_file: {}\n  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {}\n",
        dir.join("alertmanager.pem").display(),
        dir.join("alertmanager-key.pem").display(),
        dir.join("ca.pem").display()
    )
    .unwrap();
    let child = Command::new("prometheus-alertmanager")
        .arg(format!(
            "--config.file={}",
            dir.join("alertmanager.yml").display()
        ))
        .arg(format!(
            "--web.config.file={}",
            dir.join("web.yml").display()
        ))
        .arg(format!("--storage.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--cluster.listen-address=")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("alertmanager.log")).unwrap())
        .spawn()
        .expect("starting prometheus-alertmanager (cargo xtask setup installs it)");
    let running = Running(child);
    wait_until("alertmanager over https", 20, || {
        curl(dir, &format!("https://127.0.0.1:{port}/-/ready")).trim() == "OK"
    });
    running
}

#[test]
fn alerts_reach_an_https_alertmanager_with_a_client_certificate_and_wait_without_one() {
    let dir = scratch("am");
    let ca = TestCa::new(&dir, "ca");
    ca.issue(&dir, "alertmanager", &["127.0.0.1", "localhost"]);
    let (cert, key) = ca.issue(&dir, "agent", &["runner-1"]);
    let port = free_port();
    let _alertmanager = start_alertmanager(&dir, port);
    let url = format!("https://127.0.0.1:{port}");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _guard = runtime.enter();

    // mTLS: the CA and our client certificate.
    let metrics = Arc::new(Metrics::new());
    let options = SinkOptions {
        format: AlertFormat::Json,
        tls: TlsFiles {
            ca: Some(dir.join("ca.pem")),
            cert: Some(cert),
            key: Some(key),
        },
    };
    let sink = Sink::start_with(
        Receiver::Alertmanager(url.clone()),
        &options,
        &dir.join("spool-mtls"),
        metrics.clone(),
    )
    .unwrap();
    sink.send(&alert("run-1/build")).unwrap();
    wait_until("the alert in Alertmanager", 20, || {
        let alerts: Value =
            serde_json::from_str(&curl(&dir, &format!("{url}/api/v2/alerts"))).unwrap_or_default();
        alerts
            .as_array()
            .is_some_and(|a| a.iter().any(|a| a["labels"]["job_id"] == "run-1/build"))
    });
    wait_until("the spool emptied", 10, || sink.pending_bytes() == 0);
    assert_eq!(
        series(
            &metrics,
            "runner_monitor_alerts_delivered_total{sink=\"alertmanager\"}"
        ),
        1
    );

    // The CA but no client certificate: Alertmanager refuses the handshake; the alert waits.
    let metrics = Arc::new(Metrics::new());
    let options = SinkOptions {
        format: AlertFormat::Json,
        tls: TlsFiles {
            ca: Some(dir.join("ca.pem")),
            ..Default::default()
        },
    };
    let sink = Sink::start_with(
        Receiver::Alertmanager(url.clone()),
        &options,
        &dir.join("spool-no-cert"),
        metrics.clone(),
    )
    .unwrap();
    sink.send(&alert("run-2/build")).unwrap();
    wait_until("a tls failure counted", 20, || {
        series(
            &metrics,
            "runner_monitor_alert_delivery_failures_total{reason=\"tls\",sink=\"alertmanager\"}",
        ) > 0
    });
    assert!(sink.pending_bytes() > 0, "the alert stays spooled");
    let alerts = curl(&dir, &format!("{url}/api/v2/alerts"));
    assert!(!alerts.contains("run-2/build"), "{alerts}");
    let _ = std::fs::remove_dir_all(dir);
}

/// An https webhook (axum over tokio-rustls) with `cert`/`key`, recording the bodies it gets.
fn start_webhook(
    runtime: &tokio::runtime::Runtime,
    cert: &Path,
    key: &Path,
) -> (u16, Arc<Mutex<Vec<Value>>>) {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let chain = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let store = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: String| {
            let store = store.clone();
            async move {
                let batch: Vec<Value> = serde_json::from_str(&body).unwrap();
                store.lock().unwrap().extend(batch);
                "ok"
            }
        }),
    );
    let tcp = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = tcp.local_addr().unwrap().port();
    runtime.spawn(async move { axum::serve(TlsListener { tcp, acceptor }, app).await });
    (port, got)
}

/// Accepts TCP connections and completes the TLS handshake (failed handshakes are skipped).
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, addr)) = self.tcp.accept().await else {
                continue;
            };
            if let Ok(tls) = self.acceptor.accept(stream).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

#[test]
fn a_certificate_that_does_not_verify_keeps_the_alert_spooled_until_the_ca_is_right() {
    let log = log();
    let dir = scratch("hook");
    let ca = TestCa::new(&dir, "ca");
    let (cert, key) = ca.issue(&dir, "webhook", &["127.0.0.1"]);
    TestCa::new(&dir, "other-ca");
    let server = tokio::runtime::Runtime::new().unwrap();
    let (port, got) = start_webhook(&server, &cert, &key);
    let url = format!("https://127.0.0.1:{port}/hook");
    let spool = dir.join("spool");
    let options = |ca: &str| SinkOptions {
        format: AlertFormat::Ocsf,
        tls: TlsFiles {
            ca: Some(dir.join(ca)),
            ..Default::default()
        },
    };

    // The agent trusts another CA: the receiver's certificate does not verify.
    let agent = tokio::runtime::Runtime::new().unwrap();
    let metrics = Arc::new(Metrics::new());
    {
        let _guard = agent.enter();
        let sink = Sink::start_with(
            Receiver::Webhook(url.clone()),
            &options("other-ca.pem"),
            &spool,
            metrics.clone(),
        )
        .unwrap();
        sink.send(&alert("run-3/build")).unwrap();
        wait_until("a tls failure counted", 20, || {
            series(
                &metrics,
                "runner_monitor_alert_delivery_failures_total{reason=\"tls\",sink=\"webhook\"}",
            ) > 0
        });
        assert!(sink.pending_bytes() > 0, "the alert stays spooled");
    }
    assert!(
        got.lock().unwrap().is_empty(),
        "nothing may arrive unverified"
    );
    let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    let line = text
        .lines()
        .find(|l| l.contains("ERROR") && l.contains(&url))
        .unwrap_or_else(|| panic!("no TLS error logged:\n{text}"));
    assert!(
        line.contains("TLS") && line.contains("UnknownIssuer"),
        "the log says why: {line}"
    );
    // The agent stops (its tasks with it) and starts again with the right CA: delivered.
    agent.shutdown_timeout(Duration::from_secs(1));
    let agent = tokio::runtime::Runtime::new().unwrap();
    let _guard = agent.enter();
    let metrics = Arc::new(Metrics::new());
    let sink = Sink::start_with(
        Receiver::Webhook(url.clone()),
        &options("ca.pem"),
        &spool,
        metrics.clone(),
    )
    .unwrap();
    wait_until("the spooled alert delivered", 20, || {
        !got.lock().unwrap().is_empty()
    });
    wait_until("the spool emptied", 10, || sink.pending_bytes() == 0);
    let got = got.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "once: {got:?}");
    // The webhook asked for OCSF.
    assert_eq!(got[0]["class_uid"], 2004);
    assert_eq!(got[0]["unmapped"]["job"]["id"], "run-3/build");
    assert_eq!(got[0]["time"], 1_796_263_200_000u64);
    let _ = std::fs::remove_dir_all(dir);
}
