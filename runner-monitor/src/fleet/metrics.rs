//! The fleet correlator's own metrics, registered into the registry its `/metrics` serves. Labels
//! are bounded sets (outcome, reason, severity, error kind): never a host, job or fingerprint.

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

use super::ledger::{Ledger, LedgerStats, Outcome};
use crate::rule::Severity;

/// Every metric the correlator adds; the dashboards' fleet row uses these names.
pub const FLEET_METRIC_NAMES: &[&str] = &[
    "runner_monitor_fleet_messages_total",
    "runner_monitor_fleet_ledger_fingerprints",
    "runner_monitor_fleet_ledger_jobs",
    "runner_monitor_fleet_ledger_evictions_total",
    "runner_monitor_fleet_findings_total",
    "runner_monitor_fleet_errors_total",
];

/// What can go wrong in the correlator's loop.
pub const ERROR_KINDS: [&str; 5] = ["decode", "publish", "output", "ack", "stream"];

pub struct FleetMetrics {
    messages: IntCounterVec,
    fingerprints: IntGauge,
    jobs: IntGauge,
    evictions: IntCounterVec,
    findings: IntCounterVec,
    errors: IntCounterVec,
    /// Evictions already counted, per reason (the ledger counts since it was made).
    counted: std::sync::Mutex<LedgerStats>,
}

fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, m: M) -> M {
    registry
        .register(Box::new(m.clone()))
        .expect("unique metric names");
    m
}

impl FleetMetrics {
    pub fn register(registry: &Registry) -> Self {
        let vec = |name: &str, help: &str, label: &str| {
            register(
                registry,
                IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric"),
            )
        };
        let gauge = |name: &str, help: &str| {
            register(registry, IntGauge::new(name, help).expect("valid metric"))
        };
        let m = Self {
            messages: vec(
                "runner_monitor_fleet_messages_total",
                "Fingerprint messages this correlator was given, by outcome.",
                "outcome",
            ),
            fingerprints: gauge(
                "runner_monitor_fleet_ledger_fingerprints",
                "Fingerprints in the ledger.",
            ),
            jobs: gauge(
                "runner_monitor_fleet_ledger_jobs",
                "Distinct jobs (per host) the ledger's fingerprints were materialised by.",
            ),
            evictions: vec(
                "runner_monitor_fleet_ledger_evictions_total",
                "Fingerprints the ledger forgot, by reason: full (--ledger-max) or expired (--ledger-ttl).",
                "reason",
            ),
            findings: vec(
                "runner_monitor_fleet_findings_total",
                "Cross-host credential reuse raised by this correlator, by severity.",
                "severity",
            ),
            errors: vec(
                "runner_monitor_fleet_errors_total",
                "Correlator errors, by kind: decode (message skipped), publish, output, ack, stream (messages retried).",
                "kind",
            ),
            counted: Default::default(),
        };
        for o in Outcome::ALL {
            m.messages.with_label_values(&[o.as_str()]);
        }
        for r in ["full", "expired"] {
            m.evictions.with_label_values(&[r]);
        }
        for s in [Severity::High, Severity::Critical] {
            m.findings.with_label_values(&[s.as_str()]);
        }
        for k in ERROR_KINDS {
            m.errors.with_label_values(&[k]);
        }
        m
    }

    pub fn message(&self, outcome: Outcome) {
        self.messages.with_label_values(&[outcome.as_str()]).inc();
    }

    pub fn finding(&self, severity: Severity) {
        self.findings.with_label_values(&[severity.as_str()]).inc();
    }

    pub fn error(&self, kind: &str) {
        self.errors.with_label_values(&[kind]).inc();
    }

    /// The ledger's size and evictions, refreshed.
    pub fn ledger(&self, ledger: &Ledger) {
        self.fingerprints.set(ledger.len() as i64);
        self.jobs.set(ledger.origin_jobs() as i64);
        let now = ledger.stats();
        let mut counted = self.counted.lock().expect("metrics lock");
        self.evictions
            .with_label_values(&["full"])
            .inc_by(now.evicted_full - counted.evicted_full);
        self.evictions
            .with_label_values(&["expired"])
            .inc_by(now.evicted_expired - counted.evicted_expired);
        *counted = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fleet_metric_is_exported() {
        let registry = Registry::new();
        let m = FleetMetrics::register(&registry);
        m.message(Outcome::Reuse);
        m.error("publish");
        let mut out = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &registry.gather(),
            &mut out,
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        for name in FLEET_METRIC_NAMES {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name}:\n{text}");
        }
        assert!(text.contains("runner_monitor_fleet_messages_total{outcome=\"reuse\"} 1"));
    }
}
