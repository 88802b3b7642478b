//! Where findings, events and metrics go: the pipeline's last stage.

pub mod alerts;
pub mod delivery;
pub mod http;
pub mod metrics;
pub mod nats;
pub mod ocsf;
pub mod summary;
pub mod tls;

/// The JSON-lines writer of the alert stream and the event trace (at the crate root: the control
/// socket writes its answers with it too).
pub use crate::jsonl;

use std::{io::Write, path::Path, sync::Arc};

use crate::{
    clock::monotonic_ns,
    engine::Engine,
    engine::Finding,
    event::{Event, JobInfo},
};
use alerts::{AlertWriter, WallClock};
use delivery::Sink;
use metrics::Metrics;
use nats::NatsSink;

/// `-` is stdout; a path is opened for appending (created when missing).
pub fn open_append(target: &Path) -> std::io::Result<Box<dyn Write + Send>> {
    Ok(if target.as_os_str() == "-" {
        Box::new(std::io::BufWriter::new(std::io::stdout()))
    } else {
        Box::new(std::io::BufWriter::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(target)?,
        ))
    })
}

/// The write stage: the event trace, the alert stream and the receivers behind it, and what the
/// metrics count of both.
pub struct Outputs {
    /// Every event the engine judges, in that order (`--events-out`; `replay` reads it back).
    events: Option<Box<dyn Write + Send>>,
    alerts: AlertWriter,
    sinks: Vec<Sink>,
    /// The fleet stream: findings and credential fingerprints.
    nats: Option<NatsSink>,
    metrics: Option<Arc<Metrics>>,
}

impl Outputs {
    /// Alerts to `alerts` (see `AlertWriter`); events copied to `events_out`, if anywhere.
    pub fn new(alerts: AlertWriter, events_out: Option<&Path>) -> std::io::Result<Self> {
        Ok(Self {
            events: events_out.map(open_append).transpose()?,
            alerts,
            sinks: Vec::new(),
            nats: None,
            metrics: None,
        })
    }

    /// Alerts to `alerts_out` (`-` is stdout), stamped with wall-clock time when `clock` is given.
    pub fn to_file(
        alerts_out: &Path,
        clock: Option<WallClock>,
        events_out: Option<&Path>,
    ) -> std::io::Result<Self> {
        Self::new(AlertWriter::open(alerts_out, clock)?, events_out)
    }

    /// Also delivers every alert to `sink` (spooled, retried).
    pub fn with_sink(mut self, sink: Sink) -> Self {
        self.sinks.push(sink);
        self
    }

    /// Also publishes every finding and credential fingerprint to the fleet stream.
    pub fn with_nats(mut self, sink: NatsSink) -> Self {
        self.nats = Some(sink);
        self
    }

    /// Whether credential fingerprints go anywhere (the fleet stream).
    pub fn wants_fingerprints(&self) -> bool {
        self.nats.is_some()
    }

    /// A credential fingerprint the engine judged (a credential read, or one a job wrote), as
    /// the fleet stream's message. `job`: who the engine knows the job to be; `kind`: the path's
    /// credential kind.
    pub fn credential_use(
        &mut self,
        event: &Event,
        job: Option<&JobInfo>,
        kind: Option<&str>,
    ) -> std::io::Result<()> {
        if let Some(sink) = &self.nats
            && let Some(message) =
                nats::fingerprint_message(event, job, kind, sink.host(), self.alerts.clock())
        {
            sink.fingerprint(&message)?;
        }
        Ok(())
    }

    /// A job's signed attestation (its DSSE envelope as written), to the fleet stream if there
    /// is one.
    pub fn attestation(&mut self, envelope: &[u8]) -> std::io::Result<()> {
        if let Some(sink) = &self.nats {
            sink.attestation(envelope)?;
        }
        Ok(())
    }

    /// Counts events, findings and latencies into `metrics` (the live agent).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// An event about to be judged: into the trace, counted by kind.
    pub fn event(&mut self, event: &Event) -> std::io::Result<()> {
        if let Some(out) = &mut self.events {
            out.write_all(&jsonl::line(event)?)?;
            out.write_all(b"\n")?;
        }
        if let Some(m) = &self.metrics {
            m.event(event.detail.kind_name());
        }
        Ok(())
    }

    /// The engine judged an event of kernel time `event_ns`.
    pub fn judged(&self, event_ns: u64) {
        if let Some(m) = &self.metrics {
            m.latency(monotonic_ns().saturating_sub(event_ns) as f64 / 1e9);
        }
    }

    /// Findings: into the alert stream and to every receiver, counted. `event_ns` is the kernel
    /// time of the event that raised them, for the event-to-alert latency (none for timers).
    pub fn findings(&mut self, findings: &[Finding], event_ns: Option<u64>) -> std::io::Result<()> {
        if let Some(m) = &self.metrics {
            m.findings(findings);
        }
        for f in findings {
            let line = self.alerts.write(f)?;
            for sink in &self.sinks {
                sink.send(&line)?;
            }
            if let Some(nats) = &self.nats {
                nats.finding(&line)?;
            }
        }
        if let (Some(m), Some(event_ns)) = (&self.metrics, event_ns) {
            let seconds = monotonic_ns().saturating_sub(event_ns) as f64 / 1e9;
            for _ in findings {
                m.alert_latency(seconds);
            }
        }
        Ok(())
    }

    /// The engine's gauges and counters, refreshed.
    pub fn engine(&self, engine: &Engine) {
        if let Some(m) = &self.metrics {
            m.engine(
                &engine.stats(),
                engine.active_jobs(),
                engine.tracked_processes(),
            );
        }
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        if let Some(out) = &mut self.events {
            out.flush()?;
        }
        Ok(())
    }

    /// Shutdown: gives each receiver until `deadline` to take the spooled alerts; returns what
    /// is still pending per receiver (kept in the spool for the next start).
    pub async fn drain_sinks(&self, deadline: tokio::time::Instant) -> Vec<(&'static str, u64)> {
        let mut left = Vec::new();
        for sink in &self.sinks {
            left.push((sink.receiver.name(), sink.drain(deadline).await));
        }
        if let Some(nats) = &self.nats {
            left.push((nats::SINK, nats.drain(deadline).await));
        }
        left
    }
}
