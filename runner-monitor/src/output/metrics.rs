//! Prometheus metrics, all prefixed `runner_monitor_`. Label values are bounded sets (event kinds,
//! rules, severities, credential kinds, verdicts, probes): never a job id, pid or path.

use std::collections::BTreeMap;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::{
    engine::{EngineStats, Finding},
    job::control::{Outcome, REQUEST_NAMES},
    sensor::{KernelCounters, ProbeState, ProbeStatus},
};

/// Every metric the agent exports; the dashboards and alert rules use these names.
pub const METRIC_NAMES: &[&str] = &[
    "runner_monitor_build_info",
    "runner_monitor_events_total",
    "runner_monitor_events_lost_total",
    "runner_monitor_decode_errors_total",
    "runner_monitor_unreadable_strings_total",
    "runner_monitor_kernel_map_full_total",
    "runner_monitor_findings_total",
    "runner_monitor_credential_accesses_total",
    "runner_monitor_egress_connections_total",
    "runner_monitor_jobs_started_total",
    "runner_monitor_jobs_ended_total",
    "runner_monitor_jobs_active",
    "runner_monitor_tracked_processes",
    "runner_monitor_survivor_processes_total",
    "runner_monitor_ring_buffer_fill_ratio",
    "runner_monitor_engine_latency_seconds",
    "runner_monitor_alert_latency_seconds",
    "runner_monitor_policy_reloads_total",
    "runner_monitor_probe_attached",
    "runner_monitor_engine_evictions_total",
    "runner_monitor_alerts_delivered_total",
    "runner_monitor_alert_delivery_failures_total",
    "runner_monitor_alert_spool_pending_bytes",
    "runner_monitor_control_requests_total",
];

pub struct Metrics {
    registry: Registry,
    events: IntCounterVec,
    /// `events` of each kernel event kind, resolved once: `event` runs for every event.
    events_by_kind: Vec<(&'static str, IntCounter)>,
    lost: IntCounterVec,
    decode_errors: IntCounter,
    unreadable: IntCounter,
    map_full: IntCounterVec,
    findings: IntCounterVec,
    credential_accesses: IntCounterVec,
    egress: IntCounterVec,
    jobs_started: IntCounter,
    jobs_ended: IntCounter,
    jobs_active: IntGauge,
    tracked_processes: IntGauge,
    survivors: IntCounter,
    ring_fill: prometheus::Gauge,
    latency: Histogram,
    alert_latency: Histogram,
    policy_reloads: IntCounterVec,
    probe_attached: IntGaugeVec,
    evictions: IntCounterVec,
    delivered: IntCounterVec,
    delivery_failures: IntCounterVec,
    spool_pending: IntGaugeVec,
    control_requests: IntCounterVec,
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

/// Raises a counter to an absolute value read elsewhere (counters only go up).
fn raise_to(counter: &IntCounter, value: u64) {
    let now = counter.get();
    if value > now {
        counter.inc_by(value - now);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let mut m = Self {
            events_by_kind: Vec::new(),
            events: counter_vec(
                "runner_monitor_events_total",
                "Events read from the kernel, by kind.",
                &["kind"],
            ),
            lost: counter_vec(
                "runner_monitor_events_lost_total",
                "Events the kernel could not hand over (ring buffer full), by kind.",
                &["kind"],
            ),
            decode_errors: IntCounter::new(
                "runner_monitor_decode_errors_total",
                "Kernel records that did not decode.",
            )
            .expect("valid metric"),
            unreadable: IntCounter::new(
                "runner_monitor_unreadable_strings_total",
                "Paths or addresses the kernel could not read from a process's memory.",
            )
            .expect("valid metric"),
            map_full: counter_vec(
                "runner_monitor_kernel_map_full_total",
                "Kernel map inserts that failed because the map was full, by map.",
                &["map"],
            ),
            findings: counter_vec(
                "runner_monitor_findings_total",
                "Findings raised (after deduplication), by rule and severity.",
                &["rule", "severity"],
            ),
            credential_accesses: counter_vec(
                "runner_monitor_credential_accesses_total",
                "Successful credential reads and writes by job processes, by credential kind.",
                &["kind"],
            ),
            egress: counter_vec(
                "runner_monitor_egress_connections_total",
                "Outbound connections by job processes, by verdict.",
                &["verdict"],
            ),
            jobs_started: IntCounter::new("runner_monitor_jobs_started_total", "Jobs started.")
                .expect("valid metric"),
            jobs_ended: IntCounter::new("runner_monitor_jobs_ended_total", "Jobs ended.")
                .expect("valid metric"),
            jobs_active: IntGauge::new("runner_monitor_jobs_active", "Jobs running now.")
                .expect("valid metric"),
            tracked_processes: IntGauge::new(
                "runner_monitor_tracked_processes",
                "Job processes followed.",
            )
            .expect("valid metric"),
            survivors: IntCounter::new(
                "runner_monitor_survivor_processes_total",
                "Processes found alive after their job ended and its grace period passed.",
            )
            .expect("valid metric"),
            ring_fill: prometheus::Gauge::new(
                "runner_monitor_ring_buffer_fill_ratio",
                "Share of the event ring buffer waiting to be read (0 to 1).",
            )
            .expect("valid metric"),
            latency: Histogram::with_opts(
                HistogramOpts::new(
                    "runner_monitor_engine_latency_seconds",
                    "Time from an event's kernel timestamp to the engine having judged it.",
                )
                .buckets(vec![
                    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0,
                ]),
            )
            .expect("valid metric"),
            policy_reloads: counter_vec(
                "runner_monitor_policy_reloads_total",
                "Policy reloads (SIGHUP), by result: applied or rejected (the old policy stays).",
                &["result"],
            ),
            alert_latency: Histogram::with_opts(
                HistogramOpts::new(
                    "runner_monitor_alert_latency_seconds",
                    "Time from the kernel timestamp of the event behind an alert to the alert \
                     written out.",
                )
                .buckets(vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05,
                    0.1, 0.5, 1.0,
                ]),
            )
            .expect("valid metric"),
            probe_attached: IntGaugeVec::new(
                Opts::new(
                    "runner_monitor_probe_attached",
                    "1 when the probe is attached, 0 when not.",
                ),
                &["sensor", "program", "target"],
            )
            .expect("valid metric"),
            evictions: counter_vec(
                "runner_monitor_engine_evictions_total",
                "Engine table entries dropped to stay within the limits, by table.",
                &["table"],
            ),
            delivered: counter_vec(
                "runner_monitor_alerts_delivered_total",
                "Alerts a receiver accepted, by sink.",
                &["sink"],
            ),
            delivery_failures: counter_vec(
                "runner_monitor_alert_delivery_failures_total",
                "Failed delivery attempts (the alerts stay spooled), by sink.",
                &["sink"],
            ),
            spool_pending: IntGaugeVec::new(
                Opts::new(
                    "runner_monitor_alert_spool_pending_bytes",
                    "Bytes of alerts spooled on disk and not yet delivered, by sink.",
                ),
                &["sink"],
            )
            .expect("valid metric"),
            control_requests: counter_vec(
                "runner_monitor_control_requests_total",
                "Control-socket requests, by request and result (ok, rejected, replayed, \
                 cross_job, forbidden_peer, malformed, oversized, timeout).",
                &["request", "result"],
            ),
            registry,
        };
        let build = IntGaugeVec::new(
            Opts::new("runner_monitor_build_info", "The agent's version."),
            &["version"],
        )
        .expect("valid metric");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let r = &m.registry;
        for c in [
            Box::new(build) as Box<dyn prometheus::core::Collector>,
            Box::new(m.events.clone()),
            Box::new(m.lost.clone()),
            Box::new(m.decode_errors.clone()),
            Box::new(m.unreadable.clone()),
            Box::new(m.map_full.clone()),
            Box::new(m.findings.clone()),
            Box::new(m.credential_accesses.clone()),
            Box::new(m.egress.clone()),
            Box::new(m.jobs_started.clone()),
            Box::new(m.jobs_ended.clone()),
            Box::new(m.jobs_active.clone()),
            Box::new(m.tracked_processes.clone()),
            Box::new(m.survivors.clone()),
            Box::new(m.ring_fill.clone()),
            Box::new(m.latency.clone()),
            Box::new(m.alert_latency.clone()),
            Box::new(m.policy_reloads.clone()),
            Box::new(m.probe_attached.clone()),
            Box::new(m.evictions.clone()),
            Box::new(m.delivered.clone()),
            Box::new(m.delivery_failures.clone()),
            Box::new(m.spool_pending.clone()),
            Box::new(m.control_requests.clone()),
        ] {
            r.register(c).expect("unique metric names");
        }
        // Every known label value exists from the start at zero: queries see the family, and
        // `increase()` counts the first event too (a series born at 1 would hide it).
        for rule in crate::rule::RuleId::ALL {
            m.findings
                .with_label_values(&[rule.as_str(), rule.default_severity().as_str()]);
        }
        for kind in runner_monitor_common::EventKind::ALL {
            let counter = m.events.with_label_values(&[kind.name()]);
            m.events_by_kind.push((kind.name(), counter));
            m.lost.with_label_values(&[kind.name()]);
        }
        for kind in [
            "job_start",
            "job_end",
            "sensor_status",
            "credential_fingerprint",
        ] {
            m.events.with_label_values(&[kind]);
        }
        for result in ["applied", "rejected"] {
            m.policy_reloads.with_label_values(&[result]);
        }
        for map in ["processes", "pending", "jobs", "dns_sockets"] {
            m.map_full.with_label_values(&[map]);
        }
        for verdict in ["allowed", "unexpected", "metadata"] {
            m.egress.with_label_values(&[verdict]);
        }
        for table in ["processes", "jobs", "credentials", "dns"] {
            m.evictions.with_label_values(&[table]);
        }
        for sink in ["alertmanager", "webhook"] {
            m.delivered.with_label_values(&[sink]);
            m.delivery_failures.with_label_values(&[sink]);
            m.spool_pending.with_label_values(&[sink]);
        }
        for outcome in Outcome::ALL {
            // A request that was not read or parsed has no name.
            for request in REQUEST_NAMES
                .into_iter()
                .filter(|r| (*r == "unknown") != outcome.of_parsed_request())
            {
                m.control_requests
                    .with_label_values(&[request, outcome.as_str()]);
            }
        }
        m
    }

    /// One control-socket request and how it ended (`job::control::Outcome`).
    pub fn control_request(&self, request: &str, result: &str) {
        self.control_requests
            .with_label_values(&[request, result])
            .inc();
    }

    pub fn delivered(&self, sink: &str, alerts: u64) {
        self.delivered.with_label_values(&[sink]).inc_by(alerts);
    }

    pub fn delivery_failed(&self, sink: &str) {
        self.delivery_failures.with_label_values(&[sink]).inc();
    }

    pub fn spool_pending(&self, sink: &str, bytes: u64) {
        self.spool_pending
            .with_label_values(&[sink])
            .set(bytes as i64);
    }

    /// Creates the credential-kind series at zero (the kinds come from the policy).
    pub fn credential_kinds<'a>(&self, kinds: impl IntoIterator<Item = &'a str>) {
        for kind in kinds {
            self.credential_accesses.with_label_values(&[kind]);
        }
    }

    /// Counts one event. The kernel's kinds have their series looked up once, at start.
    pub fn event(&self, kind: &str) {
        match self.events_by_kind.iter().find(|(k, _)| *k == kind) {
            Some((_, c)) => c.inc(),
            None => self.events.with_label_values(&[kind]).inc(),
        }
    }

    pub fn findings(&self, findings: &[Finding]) {
        for f in findings {
            self.findings
                .with_label_values(&[f.rule.as_str(), f.severity.as_str()])
                .inc();
        }
    }

    /// Event-to-judgement latency, in seconds.
    pub fn latency(&self, seconds: f64) {
        self.latency.observe(seconds);
    }

    /// A policy reload, applied or rejected.
    pub fn policy_reload(&self, applied: bool) {
        self.policy_reloads
            .with_label_values(&[if applied { "applied" } else { "rejected" }])
            .inc();
    }

    /// Event-to-alert latency of one alert, in seconds.
    pub fn alert_latency(&self, seconds: f64) {
        self.alert_latency.observe(seconds);
    }

    pub fn kernel(&self, k: &KernelCounters, decode_errors: u64) {
        for (kind, lost) in &k.lost {
            let c = self.lost.with_label_values(&[kind]);
            raise_to(&c, *lost);
        }
        raise_to(&self.decode_errors, decode_errors);
        raise_to(&self.unreadable, k.user_read_errors);
        for (map, value) in [
            ("processes", k.process_map_full),
            ("pending", k.pending_map_full),
            ("jobs", k.job_map_full),
            ("dns_sockets", k.dns_socket_map_full),
        ] {
            raise_to(&self.map_full.with_label_values(&[map]), value);
        }
    }

    pub fn engine(&self, s: &EngineStats, active_jobs: usize, tracked_processes: usize) {
        raise_to(&self.jobs_started, s.jobs_started);
        raise_to(&self.jobs_ended, s.jobs_ended);
        raise_to(&self.survivors, s.survivors);
        self.jobs_active.set(active_jobs as i64);
        self.tracked_processes.set(tracked_processes as i64);
        let set = |vec: &IntCounterVec, values: &BTreeMap<String, u64>| {
            for (label, value) in values {
                raise_to(&vec.with_label_values(&[label]), *value);
            }
        };
        set(&self.credential_accesses, &s.credential_accesses);
        set(&self.egress, &s.egress);
        for (table, value) in [
            ("processes", s.evicted_processes),
            ("jobs", s.evicted_jobs),
            ("credentials", s.evicted_credentials),
            ("dns", s.evicted_dns),
        ] {
            raise_to(&self.evictions.with_label_values(&[table]), value);
        }
    }

    pub fn ring_fill(&self, ratio: f64) {
        self.ring_fill.set(ratio);
    }

    pub fn probes(&self, probes: &[ProbeStatus]) {
        for p in probes {
            let attached = i64::from(p.state == ProbeState::Attached);
            self.probe_attached
                .with_label_values(&[p.sensor, &p.program, &p.target])
                .set(attached);
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_declared_metric_is_exported_and_labels_stay_bounded() {
        let m = Metrics::new();
        m.event("file_open");
        m.latency(0.002);
        m.ring_fill(0.25);
        m.probes(&[]);
        let mut k = KernelCounters::default();
        k.lost.insert("exec", 3);
        m.kernel(&k, 1);
        m.kernel(&k, 1);
        let mut s = EngineStats::default();
        s.egress.insert("unexpected".into(), 2);
        s.credential_accesses.insert("aws".into(), 1);
        m.engine(&s, 1, 5);
        let text = m.encode();
        for name in METRIC_NAMES {
            if *name == "runner_monitor_probe_attached" {
                continue; // no probe given here
            }
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} missing:\n{text}"
            );
        }
        assert!(
            text.contains("runner_monitor_events_lost_total{kind=\"exec\"} 3"),
            "{text}"
        );
        assert!(text.contains("runner_monitor_egress_connections_total{verdict=\"unexpected\"} 2"));
        assert!(text.contains(
            "runner_monitor_findings_total{rule=\"agent-tamper\",severity=\"critical\"} 0"
        ));
    }
}
