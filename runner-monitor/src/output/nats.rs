//! The fleet stream sink: findings and credential fingerprints to NATS JetStream (`async-nats`,
//! TLS through rustls). The wire contract (subjects, message form, message ids) is
//! `crate::fleet::message`.
//!
//! Like the other receivers (`delivery`), every message is first appended to the sink's spool on
//! disk (fsynced), then published in order by the sink's own task; the cursor moves only past
//! messages JetStream acknowledged. Each message's `Nats-Msg-Id` comes from its spool record's
//! absolute offset, so a message published again after a crash or an outage (before the cursor
//! moved) is dropped by the stream's duplicate window instead of stored twice.
//!
//! A spool record is `KIND<TAB>JSON`, `KIND` being `findings`, `fingerprints` or `attestations`
//! (the subject's middle token); the JSON is published as written.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use async_nats::jetstream::{self, message::PublishMessage, stream};
use bytes::Bytes;
use tokio::sync::Notify;

use super::{
    alerts::WallClock,
    delivery::{Spool, SpoolRecord},
    metrics::Metrics,
};
use crate::{
    enrich::fingerprint_key_id,
    event::{Event, EventDetail, JobInfo},
    fleet::message::{
        CredentialUse, FingerprintMessage, attestations_subject, findings_subject,
        fingerprints_subject, message_id,
    },
    policy::FleetConfig,
};

/// The sink's name in metrics, logs and the spool directory.
pub const SINK: &str = "nats";
/// Messages published before their acknowledgements are awaited.
const BATCH: usize = 256;
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long a publish waits for JetStream's acknowledgement.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the fleet stream is and who this agent is on it.
#[derive(Clone, Debug)]
pub struct NatsTarget {
    /// `nats://HOST:PORT` or `tls://HOST:PORT`.
    pub url: String,
    pub fleet: FleetConfig,
    /// The host name in subjects and messages.
    pub host: String,
}

impl NatsTarget {
    /// The fleet stream to publish to, if any: `url` (`--nats`) or the policy's `[fleet] url`;
    /// the host is `host` (`--host`), else the policy's, else the kernel's host name.
    pub fn resolve(
        url: Option<&str>,
        fleet: &FleetConfig,
        host: Option<&str>,
    ) -> Result<Option<Self>, String> {
        let Some(url) = url.or(fleet.url.as_deref()) else {
            return Ok(None);
        };
        crate::policy::fleet::check_url(url)?;
        let host = host
            .map(str::to_owned)
            .or_else(|| fleet.host.clone())
            .unwrap_or_else(super::delivery::hostname);
        Ok(Some(Self {
            url: url.to_owned(),
            fleet: fleet.clone(),
            host,
        }))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("fleet credentials file {path}: {source}")]
    Credentials {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("fleet TLS {what} {path}: {source}")]
    TlsFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("stream {stream} on {url}: {reason}")]
    Stream {
        url: String,
        stream: String,
        reason: String,
    },
    #[error("publishing to {url}: {reason}")]
    Publish { url: String, reason: String },
}

/// An error with its causes, for the log (rustls' reason is in the source chain).
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let s = e.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        source = e.source();
    }
    text
}

/// The fleet stream sink: its spool and its delivery task.
pub struct NatsSink {
    host: String,
    spool: Arc<Mutex<Spool>>,
    wake: Arc<Notify>,
}

impl NatsSink {
    /// Opens the spool (`<spool_dir>/nats.jsonl`) and starts publishing (in the current tokio
    /// runtime). Connecting is the task's: a broker that is down, or a certificate that does not
    /// verify, is logged and counted, and the messages wait in the spool.
    pub fn start(
        target: NatsTarget,
        spool_dir: &Path,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let spool = Arc::new(Mutex::new(Spool::open(spool_dir, SINK)?));
        let wake = Arc::new(Notify::new());
        let host = target.host.clone();
        tokio::spawn(deliver(target, spool.clone(), wake.clone(), metrics));
        Ok(Self { host, spool, wake })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    fn spool(&self, kind: &str, json: &[u8]) -> std::io::Result<()> {
        let mut record = Vec::with_capacity(kind.len() + 1 + json.len());
        record.extend_from_slice(kind.as_bytes());
        record.push(b'\t');
        record.extend_from_slice(json);
        self.spool.lock().expect("spool lock").append(&record)?;
        self.wake.notify_one();
        Ok(())
    }

    /// Spools one finding (a line of the alert stream) for `<prefix>.findings.<host>`.
    pub fn finding(&self, line: &[u8]) -> std::io::Result<()> {
        self.spool("findings", line)
    }

    /// Spools one fingerprint for `<prefix>.fingerprints.<host>`.
    pub fn fingerprint(&self, message: &FingerprintMessage) -> std::io::Result<()> {
        self.spool("fingerprints", &serde_json::to_vec(message)?)
    }

    /// Spools one signed job attestation (a DSSE envelope, one line of JSON) for
    /// `<prefix>.attestations.<host>`.
    pub fn attestation(&self, envelope: &[u8]) -> std::io::Result<()> {
        self.spool("attestations", envelope.trim_ascii_end())
    }

    pub fn pending_bytes(&self) -> u64 {
        self.spool.lock().expect("spool lock").pending_bytes()
    }

    /// Gives the task until `deadline` to empty the spool; returns the bytes still pending (they
    /// stay spooled for the next start).
    pub async fn drain(&self, deadline: tokio::time::Instant) -> u64 {
        loop {
            let pending = self.pending_bytes();
            if pending == 0 || tokio::time::Instant::now() >= deadline {
                return pending;
            }
            self.wake.notify_one();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The fingerprint message of an event, if it carries one: a credential read (`FileOpen` with a
/// fingerprint) or one the job wrote (`CredentialFingerprint`). `job` is who the engine knows
/// the job to be; `kind` the path's credential kind.
pub fn fingerprint_message(
    event: &Event,
    job: Option<&JobInfo>,
    kind: Option<&str>,
    host: &str,
    clock: Option<WallClock>,
) -> Option<FingerprintMessage> {
    let job_key = event.job.as_ref()?.key;
    let (path, fingerprint, usage) = match &event.detail {
        EventDetail::FileOpen(f) if !f.write => {
            (&f.path, f.fingerprint.as_ref()?, CredentialUse::Read)
        }
        EventDetail::CredentialFingerprint { path, fingerprint } => {
            (path, fingerprint, CredentialUse::Materialised)
        }
        _ => return None,
    };
    // Replay has no clock for the trace: its messages carry the time they were replayed.
    let unix_ns = match clock {
        Some(c) => c.unix_ns(event.time_ns),
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    };
    Some(FingerprintMessage {
        host: host.to_owned(),
        key_id: fingerprint_key_id(fingerprint).unwrap_or("").to_owned(),
        fingerprint: fingerprint.clone(),
        usage,
        credential_kind: kind.map(str::to_owned),
        path: path.clone(),
        job: job.cloned().unwrap_or_else(|| JobInfo {
            id: job_key.to_string(),
            ..JobInfo::default()
        }),
        pid: event.process.pid,
        time: humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + Duration::from_nanos(unix_ns),
        )
        .to_string(),
        time_unix_ns: unix_ns,
    })
}

/// Connects, with the target's credentials and TLS, and makes sure the stream exists.
async fn connect(target: &NatsTarget) -> Result<jetstream::Context, NatsError> {
    let fleet = &target.fleet;
    let mut options = async_nats::ConnectOptions::new()
        .name(format!("runner-monitor {}", target.host))
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None);
    if let Some(path) = &fleet.credentials {
        options =
            options
                .credentials_file(path)
                .await
                .map_err(|source| NatsError::Credentials {
                    path: path.clone(),
                    source,
                })?;
    }
    let readable = |what: &'static str, path: &PathBuf| {
        std::fs::metadata(path)
            .map(|_| ())
            .map_err(|source| NatsError::TlsFile {
                what,
                path: path.clone(),
                source,
            })
    };
    if let Some(ca) = &fleet.tls.ca {
        readable("CA file", ca)?;
        options = options.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &fleet.tls.client {
        readable("client certificate", cert)?;
        readable("client key", key)?;
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    if target.url.starts_with("tls://") {
        options = options.require_tls(true);
    }
    let client = options
        .connect(target.url.as_str())
        .await
        .map_err(|e| NatsError::Connect {
            url: target.url.clone(),
            reason: chain(&e),
        })?;
    let mut context = jetstream::new(client);
    context.set_timeout(ACK_TIMEOUT);
    context
        .get_or_create_stream(stream::Config {
            name: fleet.stream.clone(),
            subjects: vec![format!("{}.>", fleet.subject_prefix)],
            storage: stream::StorageType::File,
            duplicate_window: fleet.duplicate_window,
            ..Default::default()
        })
        .await
        .map_err(|e| NatsError::Stream {
            url: target.url.clone(),
            stream: fleet.stream.clone(),
            reason: chain(&e),
        })?;
    Ok(context)
}

/// Publishes `records` in order; returns how many JetStream acknowledged (a prefix) and the
/// error that stopped the rest, if one did.
async fn publish(
    context: &jetstream::Context,
    target: &NatsTarget,
    records: &[SpoolRecord],
) -> (usize, Option<NatsError>) {
    let prefix = &target.fleet.subject_prefix;
    let failed = |e: &dyn std::error::Error| NatsError::Publish {
        url: target.url.clone(),
        reason: chain(e),
    };
    let mut acks = Vec::with_capacity(records.len());
    let mut error = None;
    for record in records {
        let (subject, body) = match record.line.split_once('\t') {
            Some(("findings", body)) => (findings_subject(prefix, &target.host), body),
            Some(("fingerprints", body)) => (fingerprints_subject(prefix, &target.host), body),
            Some(("attestations", body)) => (attestations_subject(prefix, &target.host), body),
            _ => {
                // Not written by this sink: acknowledged as is, so it cannot block the rest.
                tracing::error!(sink = SINK, "unreadable record in the spool: skipped");
                acks.push(None);
                continue;
            }
        };
        let message = PublishMessage::build()
            .payload(Bytes::copy_from_slice(body.as_bytes()))
            .message_id(message_id(&target.host, SINK, record.id));
        match context.send_publish(subject, message).await {
            Ok(ack) => acks.push(Some(ack)),
            Err(e) => {
                error = Some(failed(&e));
                break;
            }
        }
    }
    let mut acked = 0;
    for ack in acks {
        if let Some(ack) = ack {
            match ack.await {
                Ok(ack) if ack.duplicate => {
                    tracing::debug!(
                        sink = SINK,
                        sequence = ack.sequence,
                        "resent message was a duplicate"
                    );
                }
                Ok(_) => {}
                Err(e) => {
                    error.get_or_insert(failed(&e));
                    break;
                }
            }
        }
        acked += 1;
    }
    (acked, error)
}

async fn deliver(
    target: NatsTarget,
    spool: Arc<Mutex<Spool>>,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
) {
    let mut backoff = Duration::from_millis(250);
    let mut context: Option<jetstream::Context> = None;
    loop {
        let records = spool.lock().expect("spool lock").next_records(BATCH);
        metrics.spool_pending(SINK, spool.lock().expect("spool lock").pending_bytes());
        let records = match records {
            Ok(r) => r,
            Err(error) => {
                tracing::error!(%error, sink = SINK, "reading the spool");
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        if records.is_empty() {
            let _ = tokio::time::timeout(Duration::from_secs(5), wake.notified()).await;
            continue;
        }
        let result = match &context {
            Some(c) => publish(c, &target, &records).await,
            None => match connect(&target).await {
                Ok(c) => {
                    tracing::info!(sink = SINK, url = %target.url, stream = %target.fleet.stream, "connected to the fleet stream");
                    let result = publish(&c, &target, &records).await;
                    context = Some(c);
                    result
                }
                Err(e) => (0, Some(e)),
            },
        };
        let (acked, error) = result;
        if acked > 0 {
            // Counted before the cursor moves: whoever sees the spool empty sees them counted.
            metrics.delivered(SINK, acked as u64);
            if let Err(error) = spool
                .lock()
                .expect("spool lock")
                .commit(records[acked - 1].end)
            {
                tracing::error!(%error, sink = SINK, "saving the spool cursor");
            }
        }
        match error {
            None => backoff = Duration::from_millis(250),
            Some(error) => {
                // Connect afresh next time: a broker that lost its store gets its stream back.
                context = None;
                tracing::warn!(error = %error, sink = SINK, pending = records.len() - acked, retry_in = ?backoff, "fleet stream delivery failed; kept in the spool");
                // Counted after the log line: whoever sees the count finds the reason logged.
                metrics.delivery_failed(SINK);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests;
