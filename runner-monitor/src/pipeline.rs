//! Events in, findings out, both written: the part of the agent that `run` and `replay` share.

use std::{io::Write, path::Path, sync::Arc};

use crate::{
    engine::{Engine, EngineStats, Finding},
    event::Event,
    output::{
        alerts::{AlertWriter, WallClock},
        delivery::Sink,
        metrics::Metrics,
    },
    policy::Policy,
};

pub struct Pipeline {
    engine: Engine,
    sinks: Vec<Sink>,
    metrics: Option<std::sync::Arc<Metrics>>,
    events: Option<Box<dyn Write + Send>>,
    alerts: AlertWriter,
}

impl Pipeline {
    /// `events_out`: where to copy every event (JSON lines), if anywhere. `clock`: to give alerts
    /// a wall-clock time (live only).
    pub fn new(
        policy: Arc<Policy>,
        events_out: Option<&Path>,
        alerts_out: &Path,
        clock: Option<WallClock>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            engine: Engine::new(policy),
            sinks: Vec::new(),
            metrics: None,
            events: events_out.map(crate::output::open_append).transpose()?,
            alerts: AlertWriter::open(alerts_out, clock)?,
        })
    }

    /// The engine, e.g. to snapshot it.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Replaces the engine (one restored from a snapshot).
    pub fn set_engine(&mut self, engine: Engine) {
        self.engine = engine;
    }

    /// Replaces the policy the engine judges by; its tables are kept.
    pub fn set_policy(&mut self, policy: Arc<Policy>) {
        self.engine.set_policy(policy);
    }

    /// Shutdown: gives each receiver until `deadline` to take the spooled alerts; returns what
    /// is still pending per receiver (kept in the spool for the next start).
    pub async fn drain_sinks(&self, deadline: tokio::time::Instant) -> Vec<(&'static str, u64)> {
        let mut left = Vec::new();
        for sink in &self.sinks {
            left.push((sink.receiver.name(), sink.drain(deadline).await));
        }
        left
    }

    /// Also delivers every alert to `sink` (spooled, retried).
    pub fn with_sink(mut self, sink: Sink) -> Self {
        self.sinks.push(sink);
        self
    }

    /// Counts events, findings and latency into `metrics` (the live agent).
    pub fn with_metrics(mut self, metrics: std::sync::Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Records the event and runs the engine on it; returns what it found, for the caller to
    /// add to (live enrichment) and `alert`.
    pub fn handle(&mut self, event: &Event) -> std::io::Result<Vec<Finding>> {
        if let Some(out) = &mut self.events {
            out.write_all(&crate::output::jsonl::line(event)?)?;
            out.write_all(b"\n")?;
        }
        let findings = self.engine.handle(event);
        if let Some(m) = &self.metrics {
            m.event(event.detail.kind_name());
            let now = crate::clock::monotonic_ns();
            m.latency(now.saturating_sub(event.time_ns) as f64 / 1e9);
        }
        Ok(findings)
    }

    /// Refreshes the engine's gauges and counters in `metrics`.
    pub fn export_engine(&self) {
        if let Some(m) = &self.metrics {
            m.engine(
                &self.engine.stats(),
                self.engine.active_jobs(),
                self.engine.tracked_processes(),
            );
        }
    }

    /// `handle`, then writes the findings as they are.
    pub fn event(&mut self, event: &Event) -> std::io::Result<usize> {
        let findings = self.handle(event)?;
        self.alert_all(&findings)?;
        Ok(findings.len())
    }

    /// Moves the engine's time (timers such as survivors' grace periods).
    pub fn tick(&mut self, now_ns: u64) -> Vec<Finding> {
        self.engine.advance(now_ns)
    }

    /// `tick`, then writes the findings as they are.
    pub fn advance(&mut self, now_ns: u64) -> std::io::Result<usize> {
        let findings = self.tick(now_ns);
        self.alert_all(&findings)?;
        Ok(findings.len())
    }

    pub fn alert_all(&mut self, findings: &[Finding]) -> std::io::Result<()> {
        if let Some(m) = &self.metrics {
            m.findings(findings);
        }
        for f in findings {
            let line = self.alerts.write(f)?;
            for sink in &self.sinks {
                sink.send(&line)?;
            }
        }
        Ok(())
    }

    /// Records the latency of `alerts` alerts written for an event of kernel time `event_ns`.
    pub fn alerted(&self, event_ns: u64, alerts: usize) {
        if let Some(m) = &self.metrics {
            let seconds = crate::clock::monotonic_ns().saturating_sub(event_ns) as f64 / 1e9;
            for _ in 0..alerts {
                m.alert_latency(seconds);
            }
        }
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        if let Some(out) = &mut self.events {
            out.flush()?;
        }
        Ok(())
    }

    pub fn stats(&self) -> EngineStats {
        self.engine.stats()
    }
}
