//! Alert delivery to receivers that can be down: the Alertmanager v2 API and a generic JSON
//! webhook (reqwest, over the same hyper stack as the HTTP endpoint), over http:// or https://
//! (rustls, `super::tls`). A webhook gets our JSON or OCSF findings (`SinkOptions::format`).
//!
//! Every alert is first appended to the sink's spool on disk (fsynced), then delivered in order
//! by the sink's own task, which moves a cursor (also on disk) only when the receiver accepted.
//! A receiver outage or an agent restart therefore loses nothing: delivery resumes from the
//! cursor, with backoff, and failures are counted.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use serde_json::{Value, json};
use tokio::sync::Notify;

use super::{
    metrics::Metrics,
    ocsf::{self, AlertFormat},
    tls::{self, TlsError, TlsFiles},
};

/// Alerts sent in one request at most.
const BATCH: usize = 64;
/// A spool larger than this refuses new alerts (counted as dropped) until the receiver drains it.
const MAX_SPOOL_BYTES: u64 = 256 << 20;
const MAX_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Receiver {
    /// Base URL of an Alertmanager; alerts go to `<url>/api/v2/alerts`.
    Alertmanager(String),
    /// Any URL; receives a JSON array of alerts per POST.
    Webhook(String),
}

impl Receiver {
    pub fn name(&self) -> &'static str {
        match self {
            Receiver::Alertmanager(_) => "alertmanager",
            Receiver::Webhook(_) => "webhook",
        }
    }

    pub fn url(&self) -> &str {
        match self {
            Receiver::Alertmanager(u) | Receiver::Webhook(u) => u,
        }
    }

    /// Checks the URL: http:// or https://.
    pub fn validate(&self) -> Result<(), String> {
        let url = self.url();
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?}: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(format!("{url:?}: only http:// and https:// receivers"));
        }
        Ok(())
    }

    fn is_https(&self) -> bool {
        self.url().starts_with("https://")
    }
}

/// How a sink talks to its receiver.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SinkOptions {
    /// What a webhook receives: our JSON findings or OCSF Detection Findings. Alertmanager always
    /// gets its own v2 form.
    pub format: AlertFormat,
    /// CA, client certificate and key for an https:// receiver.
    pub tls: TlsFiles,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("opening the spool: {0}")]
    Spool(#[from] std::io::Error),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("building the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// The HTTP client for `receiver`: rustls (ring) for https://, with `options.tls`.
fn http_client(receiver: &Receiver, options: &SinkOptions) -> Result<reqwest::Client, SinkError> {
    // reqwest is built without a bundled crypto provider: ring is installed once, for any
    // client (a plain http:// one too, which reqwest also prepares TLS for).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(10));
    if receiver.is_https() {
        builder = builder.tls_backend_preconfigured(tls::client_config(&options.tls)?);
    }
    Ok(builder.build()?)
}

/// An append-only file of alerts (JSON lines) and the offset up to which they were delivered.
///
/// The cursor file holds `DELIVERED BASE`: the offset delivered up to in the data file, and the
/// data file's start as an offset in everything this spool ever held (`BASE` grows each time a
/// fully delivered file is emptied). A record's absolute offset (`BASE` + its offset) therefore
/// names it for good: the NATS sink's message ids are built from it. A cursor of one number (as
/// written before) has `BASE` 0.
pub struct Spool {
    data: PathBuf,
    cursor: PathBuf,
    file: File,
    delivered: u64,
    size: u64,
    base: u64,
    pub dropped: u64,
}

impl Spool {
    pub fn open(dir: &Path, name: &str) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let data = dir.join(format!("{name}.jsonl"));
        let cursor = dir.join(format!("{name}.cursor"));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&data)?;
        let size = file.metadata()?.len();
        let saved = std::fs::read_to_string(&cursor).unwrap_or_default();
        let mut numbers = saved.split_whitespace().map(|n| n.parse::<u64>().ok());
        let mut delivered = numbers.next().flatten().unwrap_or(0);
        let mut base = numbers.next().flatten().unwrap_or(0);
        if delivered > size {
            // Emptied after it was all delivered, before the cursor said so (see `commit`).
            base += delivered;
            delivered = 0;
        }
        Ok(Self {
            data,
            cursor,
            file,
            delivered,
            size,
            base,
            dropped: 0,
        })
    }

    /// Appends one alert (a JSON object) and syncs it to disk.
    pub fn append(&mut self, alert: &[u8]) -> std::io::Result<()> {
        if self.size - self.delivered > MAX_SPOOL_BYTES {
            self.dropped += 1;
            tracing::error!(spool = %self.data.display(), "alert spool full: alert dropped");
            return Ok(());
        }
        let mut line = alert.to_vec();
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.file.sync_data()?;
        self.size += line.len() as u64;
        Ok(())
    }

    /// Bytes waiting for delivery.
    pub fn pending_bytes(&self) -> u64 {
        self.size - self.delivered
    }

    /// Up to `max` undelivered alerts, and the offset just after the last one.
    pub fn next_batch(&self, max: usize) -> std::io::Result<(Vec<Value>, u64)> {
        let mut reader = BufReader::new(File::open(&self.data)?);
        reader.seek(SeekFrom::Start(self.delivered))?;
        let mut out = Vec::new();
        let mut offset = self.delivered;
        let mut line = String::new();
        while out.len() < max {
            line.clear();
            let n = reader.read_line(&mut line)?;
            if n == 0 || !line.ends_with('\n') {
                break;
            }
            offset += n as u64;
            match serde_json::from_str::<Value>(line.trim_end()) {
                Ok(v) => out.push(v),
                Err(e) => {
                    tracing::error!(error = %e, "unreadable line in the alert spool: skipped")
                }
            }
        }
        Ok((out, offset))
    }

    /// Up to `max` undelivered records as written.
    pub fn next_records(&self, max: usize) -> std::io::Result<Vec<SpoolRecord>> {
        let mut reader = BufReader::new(File::open(&self.data)?);
        reader.seek(SeekFrom::Start(self.delivered))?;
        let mut out = Vec::new();
        let mut offset = self.delivered;
        let mut line = String::new();
        while out.len() < max {
            line.clear();
            let n = reader.read_line(&mut line)?;
            if n == 0 || !line.ends_with('\n') {
                break;
            }
            out.push(SpoolRecord {
                id: self.base + offset,
                end: offset + n as u64,
                line: line.trim_end_matches('\n').to_owned(),
            });
            offset += n as u64;
        }
        Ok(out)
    }

    /// Everything before `offset` was delivered: saves the cursor (atomically), and empties the
    /// spool once it is all delivered. The cursor is saved before the file is emptied, so that a
    /// crash in between is recognised at the next `open` (delivered past the end) and the
    /// absolute offsets never repeat.
    pub fn commit(&mut self, offset: u64) -> std::io::Result<()> {
        self.delivered = offset.min(self.size);
        self.save_cursor()?;
        if self.delivered == self.size && self.size > 0 {
            self.file.set_len(0)?;
            self.file.sync_all()?;
            self.base += self.size;
            self.size = 0;
            self.delivered = 0;
            self.save_cursor()?;
        }
        Ok(())
    }

    fn save_cursor(&self) -> std::io::Result<()> {
        let tmp = self.cursor.with_extension("cursor.tmp");
        std::fs::write(&tmp, format!("{} {}", self.delivered, self.base))?;
        File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &self.cursor)
    }
}

/// One record of a spool, as `Spool::next_records` reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolRecord {
    /// Its absolute offset (see `Spool`): names it for good.
    pub id: u64,
    /// Where it ends in the spool file: `Spool::commit(end)` once it is delivered.
    pub end: u64,
    /// As appended, without the newline.
    pub line: String,
}

/// The host name, from gethostname(2): /proc/sys is hidden under systemd's ProcSubset=pid.
pub fn hostname() -> String {
    let mut name = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer.
    let rc = unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len()) };
    let len = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    match std::str::from_utf8(&name[..len]) {
        Ok(host) if rc == 0 && !host.is_empty() => host.to_owned(),
        _ => "unknown".into(),
    }
}

/// An alert (as written to the alert stream) in the Alertmanager v2 form.
fn alertmanager_alert(alert: &Value, host: &str) -> Value {
    let text = |v: &Value| v.as_str().unwrap_or("").to_owned();
    let job = &alert["job"];
    let object = alert["credential"]["path"]
        .as_str()
        .map(str::to_owned)
        .or_else(|| {
            alert["destination"]["ip"]
                .as_str()
                .map(|ip| format!("{ip}:{}", alert["destination"]["port"]))
        })
        .or_else(|| alert["socket"]["path"].as_str().map(str::to_owned))
        .or_else(|| alert["persistence"]["path"].as_str().map(str::to_owned))
        .unwrap_or_default();
    // Alertmanager merges alerts with equal labels: the finding's identity keeps them apart.
    let identity = format!(
        "{}|{}|{}|{}|{}",
        text(&alert["rule"]),
        job["key"],
        alert["process"]["pid"],
        object,
        alert["time_ns"]
    );
    let mut labels = json!({
        "alertname": "RunnerMonitorFinding",
        "rule": text(&alert["rule"]),
        "severity": text(&alert["severity"]),
        "mitre": text(&alert["mitre"]["id"]),
        "host": host,
        "finding": format!("{:016x}", fnv1a(identity.as_bytes())),
    });
    for (label, value) in [
        ("job_id", &job["id"]),
        ("repository", &job["repository"]),
        ("workflow", &job["workflow"]),
        ("platform", &job["platform"]),
    ] {
        if let Some(v) = value.as_str() {
            labels[label] = json!(v);
        }
    }
    let mut am = json!({
        "labels": labels,
        "annotations": {
            "summary": text(&alert["summary"]),
            "object": object,
            "finding": alert.to_string(),
        },
    });
    if let Some(time) = alert["time"].as_str() {
        am["startsAt"] = json!(time);
    }
    am
}

/// FNV-1a, for a short stable label value.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A receiver with its spool and delivery task.
pub struct Sink {
    pub receiver: Receiver,
    spool: Arc<Mutex<Spool>>,
    wake: Arc<Notify>,
    /// The last delivery attempt failed (the task is backing off).
    failing: Arc<AtomicBool>,
}

impl Sink {
    /// Opens the spool and starts delivering (in the current tokio runtime), with the default
    /// options (our JSON, system CA roots).
    pub fn start(
        receiver: Receiver,
        spool_dir: &Path,
        metrics: Arc<Metrics>,
    ) -> Result<Self, SinkError> {
        Self::start_with(receiver, &SinkOptions::default(), spool_dir, metrics)
    }

    /// Opens the spool and starts delivering with `options`; a CA or client certificate file
    /// that cannot be used is an error here, not at the first alert.
    pub fn start_with(
        receiver: Receiver,
        options: &SinkOptions,
        spool_dir: &Path,
        metrics: Arc<Metrics>,
    ) -> Result<Self, SinkError> {
        let client = http_client(&receiver, options)?;
        let spool = Arc::new(Mutex::new(Spool::open(spool_dir, receiver.name())?));
        let wake = Arc::new(Notify::new());
        let failing = Arc::new(AtomicBool::new(false));
        tokio::spawn(deliver(
            Delivery {
                receiver: receiver.clone(),
                format: options.format,
                client,
                failing: failing.clone(),
            },
            spool.clone(),
            wake.clone(),
            metrics,
        ));
        Ok(Self {
            receiver,
            spool,
            wake,
            failing,
        })
    }

    /// Spools one alert for delivery.
    pub fn send(&self, alert: &[u8]) -> std::io::Result<()> {
        self.spool.lock().expect("spool lock").append(alert)?;
        self.wake.notify_one();
        Ok(())
    }

    pub fn pending_bytes(&self) -> u64 {
        self.spool.lock().expect("spool lock").pending_bytes()
    }

    /// Gives the delivery task until `deadline` to empty the spool (shutdown); returns the bytes
    /// still pending, which stay spooled for the next start. A receiver whose last delivery
    /// failed is not waited for: the task is backing off, and waiting would only delay the stop.
    pub async fn drain(&self, deadline: tokio::time::Instant) -> u64 {
        loop {
            let pending = self.pending_bytes();
            if pending == 0
                || self.failing.load(Ordering::Relaxed)
                || tokio::time::Instant::now() >= deadline
            {
                return pending;
            }
            self.wake.notify_one();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// What the delivery task sends where, and with which client.
struct Delivery {
    receiver: Receiver,
    format: AlertFormat,
    client: reqwest::Client,
    failing: Arc<AtomicBool>,
}

/// Why a delivery failed: `reason` is the metric's label (`tls`, `connect`, `timeout`, `http`,
/// `other`), `message` the whole story for the log.
struct Failure {
    reason: &'static str,
    message: String,
}

impl Failure {
    fn of(url: &str, error: &reqwest::Error) -> Self {
        let reason = if tls::tls_failure(error).is_some() {
            "tls"
        } else if error.is_timeout() {
            "timeout"
        } else if error.is_connect() {
            "connect"
        } else {
            "other"
        };
        Self {
            reason,
            message: format!("{url}: {}", tls::error_chain(error)),
        }
    }
}

async fn post(delivery: &Delivery, batch: &[Value], host: &str) -> Result<(), Failure> {
    let (url, body) = match &delivery.receiver {
        Receiver::Alertmanager(base) => (
            format!("{}/api/v2/alerts", base.trim_end_matches('/')),
            Value::Array(batch.iter().map(|a| alertmanager_alert(a, host)).collect()),
        ),
        Receiver::Webhook(url) => (
            url.clone(),
            match delivery.format {
                AlertFormat::Json => Value::Array(batch.to_vec()),
                AlertFormat::Ocsf => Value::Array(
                    batch
                        .iter()
                        .map(|a| ocsf::from_alert(a, host).unwrap_or_else(|| a.clone()))
                        .collect(),
                ),
            },
        ),
    };
    let response = delivery
        .client
        .post(&url)
        .json(&body)
        .send()
        .await
        .map_err(|e| Failure::of(&url, &e))?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(Failure {
            reason: "http",
            message: format!("{url}: HTTP {}", response.status()),
        })
    }
}

async fn deliver(
    delivery: Delivery,
    spool: Arc<Mutex<Spool>>,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
) {
    let host = hostname();
    let name = delivery.receiver.name();
    let mut backoff = Duration::from_millis(500);
    loop {
        let batch = spool.lock().expect("spool lock").next_batch(BATCH);
        let (alerts, end) = match batch {
            Ok(b) => b,
            Err(error) => {
                tracing::error!(%error, sink = name, "reading the alert spool");
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        metrics.spool_pending(name, spool.lock().expect("spool lock").pending_bytes());
        if alerts.is_empty() {
            let _ = tokio::time::timeout(Duration::from_secs(5), wake.notified()).await;
            continue;
        }
        match post(&delivery, &alerts, &host).await {
            Ok(()) => {
                // Counted before the cursor moves: whoever sees the spool empty sees them counted.
                metrics.delivered(name, alerts.len() as u64);
                delivery.failing.store(false, Ordering::Relaxed);
                if let Err(error) = spool.lock().expect("spool lock").commit(end) {
                    tracing::error!(%error, sink = name, "saving the alert spool cursor");
                }
                backoff = Duration::from_millis(500);
            }
            Err(Failure { reason, message }) => {
                if reason == "tls" {
                    // Not an outage: the receiver's certificate (or ours) is wrong until
                    // someone fixes the CA or certificate files; say so loudly.
                    tracing::error!(error = %message, sink = name, pending = alerts.len(), retry_in = ?backoff, "alert delivery failed: TLS; kept in the spool (check --tls-ca / --tls-cert)");
                } else {
                    tracing::warn!(error = %message, sink = name, reason, pending = alerts.len(), retry_in = ?backoff, "alert delivery failed; kept in the spool");
                }
                // Counted after the log line: whoever sees the count finds the reason logged.
                metrics.delivery_failed_because(name, reason);
                delivery.failing.store(true, Ordering::Relaxed);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests;
