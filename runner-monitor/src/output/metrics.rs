//! Prometheus metrics, all prefixed `runner_monitor_`. Label values are bounded sets (event kinds,
//! rules, severities, credential kinds, verdicts, probes): never a job id, pid or path.

use std::collections::BTreeMap;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::{
    engine::{EngineStats, Finding},
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
    "runner_monitor_egress_mode",
    "runner_monitor_egress_jobs_blocking",
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
    // Registered by the control socket (`job::control::ControlMetrics`) into the same registry.
    "runner_monitor_control_requests_total",
];

/// The `reason` label of `runner_monitor_alert_delivery_failures_total`.
pub const DELIVERY_FAILURE_REASONS: [&str; 5] = ["tls", "connect", "timeout", "http", "other"];

/// The agent's registry and the metrics of each part of it. A part that lives above this module
/// (the control socket) registers its own metric into `registry()`.
pub struct Metrics {
    registry: Registry,
    kernel: KernelMetrics,
    engine: EngineMetrics,
    delivery: DeliveryMetrics,
    policy_reloads: IntCounterVec,
    /// 1 for the global `[egress] mode` in force, 0 for the other.
    egress_mode: IntGaugeVec,
    egress_jobs_blocking: IntGauge,
}

/// What the kernel side reports: losses, decode errors, full maps, the ring buffer, the probes.
struct KernelMetrics {
    lost: IntCounterVec,
    decode_errors: IntCounter,
    unreadable: IntCounter,
    map_full: IntCounterVec,
    ring_fill: prometheus::Gauge,
    probe_attached: IntGaugeVec,
}

/// What goes through the pipeline: events, findings, the engine's tables and latencies.
struct EngineMetrics {
    events: IntCounterVec,
    /// `events` of each kernel event kind, resolved once: `event` runs for every event.
    events_by_kind: Vec<(&'static str, IntCounter)>,
    findings: IntCounterVec,
    credential_accesses: IntCounterVec,
    egress: IntCounterVec,
    jobs_started: IntCounter,
    jobs_ended: IntCounter,
    jobs_active: IntGauge,
    tracked_processes: IntGauge,
    survivors: IntCounter,
    latency: Histogram,
    alert_latency: Histogram,
    evictions: IntCounterVec,
}

/// Alert delivery to the receivers, per sink.
struct DeliveryMetrics {
    delivered: IntCounterVec,
    delivery_failures: IntCounterVec,
    spool_pending: IntGaugeVec,
}

/// Registers `metric` in `registry` and returns it.
fn registered<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: M,
) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric names");
    metric
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    registered(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    registered(registry, IntCounter::new(name, help).expect("valid metric"))
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    registered(registry, IntGauge::new(name, help).expect("valid metric"))
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    registered(
        registry,
        IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    registered(
        registry,
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
            .expect("valid metric"),
    )
}

/// Raises a counter to an absolute value read elsewhere (counters only go up).
fn raise_to(counter: &IntCounter, value: u64) {
    let now = counter.get();
    if value > now {
        counter.inc_by(value - now);
    }
}

// Every known label value exists from the start at zero: queries see the family, and
// `increase()` counts the first event too (a series born at 1 would hide it).

impl KernelMetrics {
    fn new(r: &Registry) -> Self {
        let m = Self {
            lost: counter_vec(
                r,
                "runner_monitor_events_lost_total",
                "Events the kernel could not hand over (ring buffer full), by kind.",
                &["kind"],
            ),
            decode_errors: counter(
                r,
                "runner_monitor_decode_errors_total",
                "Kernel records that did not decode.",
            ),
            unreadable: counter(
                r,
                "runner_monitor_unreadable_strings_total",
                "Paths or addresses the kernel could not read from a process's memory.",
            ),
            map_full: counter_vec(
                r,
                "runner_monitor_kernel_map_full_total",
                "Kernel map inserts that failed because the map was full, by map.",
                &["map"],
            ),
            ring_fill: registered(
                r,
                prometheus::Gauge::new(
                    "runner_monitor_ring_buffer_fill_ratio",
                    "Share of the event ring buffer waiting to be read (0 to 1).",
                )
                .expect("valid metric"),
            ),
            probe_attached: gauge_vec(
                r,
                "runner_monitor_probe_attached",
                "1 when the probe is attached, 0 when not.",
                &["sensor", "program", "target"],
            ),
        };
        for kind in runner_monitor_common::EventKind::ALL {
            m.lost.with_label_values(&[kind.name()]);
        }
        for map in ["processes", "pending", "jobs", "dns_sockets"] {
            m.map_full.with_label_values(&[map]);
        }
        m
    }
}

impl EngineMetrics {
    fn new(r: &Registry) -> Self {
        let mut m = Self {
            events_by_kind: Vec::new(),
            events: counter_vec(
                r,
                "runner_monitor_events_total",
                "Events read from the kernel, by kind.",
                &["kind"],
            ),
            findings: counter_vec(
                r,
                "runner_monitor_findings_total",
                "Findings raised (after deduplication), by rule and severity.",
                &["rule", "severity"],
            ),
            credential_accesses: counter_vec(
                r,
                "runner_monitor_credential_accesses_total",
                "Successful credential reads and writes by job processes, by credential kind.",
                &["kind"],
            ),
            egress: counter_vec(
                r,
                "runner_monitor_egress_connections_total",
                "Outbound connections by job processes, by verdict (`blocked`: refused by block mode; \
                 a TLS connection refused for its server name counts at its connect and again as \
                 `blocked` at its ClientHello).",
                &["verdict"],
            ),
            jobs_started: counter(r, "runner_monitor_jobs_started_total", "Jobs started."),
            jobs_ended: counter(r, "runner_monitor_jobs_ended_total", "Jobs ended."),
            jobs_active: gauge(r, "runner_monitor_jobs_active", "Jobs running now."),
            tracked_processes: gauge(
                r,
                "runner_monitor_tracked_processes",
                "Job processes followed.",
            ),
            survivors: counter(
                r,
                "runner_monitor_survivor_processes_total",
                "Processes found alive after their job ended and its grace period passed.",
            ),
            latency: histogram(
                r,
                "runner_monitor_engine_latency_seconds",
                "Time from an event's kernel timestamp to the engine having judged it.",
                &[0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0],
            ),
            alert_latency: histogram(
                r,
                "runner_monitor_alert_latency_seconds",
                "Time from the kernel timestamp of the event behind an alert to the alert \
                 written out.",
                &[
                    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05,
                    0.1, 0.5, 1.0,
                ],
            ),
            evictions: counter_vec(
                r,
                "runner_monitor_engine_evictions_total",
                "Engine table entries dropped to stay within the limits, by table.",
                &["table"],
            ),
        };
        for rule in crate::rule::RuleId::ALL {
            m.findings
                .with_label_values(&[rule.as_str(), rule.default_severity().as_str()]);
        }
        for kind in runner_monitor_common::EventKind::ALL {
            let counter = m.events.with_label_values(&[kind.name()]);
            m.events_by_kind.push((kind.name(), counter));
        }
        for kind in [
            "job_start",
            "job_end",
            "sensor_status",
            "credential_fingerprint",
        ] {
            m.events.with_label_values(&[kind]);
        }
        for verdict in ["allowed", "unexpected", "metadata", "blocked"] {
            m.egress.with_label_values(&[verdict]);
        }
        for table in ["processes", "jobs", "credentials", "dns"] {
            m.evictions.with_label_values(&[table]);
        }
        m
    }
}

impl DeliveryMetrics {
    fn new(r: &Registry) -> Self {
        let m = Self {
            delivered: counter_vec(
                r,
                "runner_monitor_alerts_delivered_total",
                "Alerts a receiver accepted, by sink.",
                &["sink"],
            ),
            delivery_failures: counter_vec(
                r,
                "runner_monitor_alert_delivery_failures_total",
                "Failed delivery attempts (the alerts stay spooled), by sink and reason (tls: a \
                 certificate that does not verify or a refused handshake; connect, timeout, \
                 http: a non-2xx answer, other).",
                &["sink", "reason"],
            ),
            spool_pending: gauge_vec(
                r,
                "runner_monitor_alert_spool_pending_bytes",
                "Bytes of alerts spooled on disk and not yet delivered, by sink.",
                &["sink"],
            ),
        };
        for sink in ["alertmanager", "webhook"] {
            m.delivered.with_label_values(&[sink]);
            for reason in DELIVERY_FAILURE_REASONS {
                m.delivery_failures.with_label_values(&[sink, reason]);
            }
            m.spool_pending.with_label_values(&[sink]);
        }
        m
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
        let build = gauge_vec(
            &registry,
            "runner_monitor_build_info",
            "The agent's version.",
            &["version"],
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let policy_reloads = counter_vec(
            &registry,
            "runner_monitor_policy_reloads_total",
            "Policy reloads (SIGHUP), by result: applied or rejected (the old policy stays).",
            &["result"],
        );
        for result in ["applied", "rejected"] {
            policy_reloads.with_label_values(&[result]);
        }
        let egress_mode = gauge_vec(
            &registry,
            "runner_monitor_egress_mode",
            "The global egress mode in force: 1 for it, 0 for the other (rules may override it \
             per repository).",
            &["mode"],
        );
        egress_mode.with_label_values(&["audit"]).set(1);
        egress_mode.with_label_values(&["block"]).set(0);
        let egress_jobs_blocking = gauge(
            &registry,
            "runner_monitor_egress_jobs_blocking",
            "Jobs whose egress outside their allowlist the kernel refuses (block mode).",
        );
        Self {
            egress_mode,
            egress_jobs_blocking,
            kernel: KernelMetrics::new(&registry),
            engine: EngineMetrics::new(&registry),
            delivery: DeliveryMetrics::new(&registry),
            policy_reloads,
            registry,
        }
    }

    /// The registry, for a part of the agent that owns a metric of its own.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn delivered(&self, sink: &str, alerts: u64) {
        self.delivery
            .delivered
            .with_label_values(&[sink])
            .inc_by(alerts);
    }

    /// A failed delivery attempt, for no reason in particular (`other`).
    pub fn delivery_failed(&self, sink: &str) {
        self.delivery_failed_because(sink, "other");
    }

    /// A failed delivery attempt; `reason` is one of `DELIVERY_FAILURE_REASONS`.
    pub fn delivery_failed_because(&self, sink: &str, reason: &str) {
        self.delivery
            .delivery_failures
            .with_label_values(&[sink, reason])
            .inc();
    }

    pub fn spool_pending(&self, sink: &str, bytes: u64) {
        self.delivery
            .spool_pending
            .with_label_values(&[sink])
            .set(bytes as i64);
    }

    /// Creates the credential-kind series at zero (the kinds come from the policy).
    pub fn credential_kinds<'a>(&self, kinds: impl IntoIterator<Item = &'a str>) {
        for kind in kinds {
            self.engine.credential_accesses.with_label_values(&[kind]);
        }
    }

    /// Counts one event. The kernel's kinds have their series looked up once, at start.
    pub fn event(&self, kind: &str) {
        match self.engine.events_by_kind.iter().find(|(k, _)| *k == kind) {
            Some((_, c)) => c.inc(),
            None => self.engine.events.with_label_values(&[kind]).inc(),
        }
    }

    pub fn findings(&self, findings: &[Finding]) {
        for f in findings {
            self.engine
                .findings
                .with_label_values(&[f.rule.as_str(), f.severity.as_str()])
                .inc();
        }
    }

    /// Event-to-judgement latency, in seconds.
    pub fn latency(&self, seconds: f64) {
        self.engine.latency.observe(seconds);
    }

    /// A policy reload, applied or rejected.
    pub fn policy_reload(&self, applied: bool) {
        self.policy_reloads
            .with_label_values(&[if applied { "applied" } else { "rejected" }])
            .inc();
    }

    /// Event-to-alert latency of one alert, in seconds.
    pub fn alert_latency(&self, seconds: f64) {
        self.engine.alert_latency.observe(seconds);
    }

    pub fn kernel(&self, k: &KernelCounters, decode_errors: u64) {
        let m = &self.kernel;
        for (kind, lost) in &k.lost {
            raise_to(&m.lost.with_label_values(&[kind]), *lost);
        }
        raise_to(&m.decode_errors, decode_errors);
        raise_to(&m.unreadable, k.user_read_errors);
        for (map, value) in [
            ("processes", k.process_map_full),
            ("pending", k.pending_map_full),
            ("jobs", k.job_map_full),
            ("dns_sockets", k.dns_socket_map_full),
        ] {
            raise_to(&m.map_full.with_label_values(&[map]), value);
        }
    }

    pub fn engine(&self, s: &EngineStats, active_jobs: usize, tracked_processes: usize) {
        let m = &self.engine;
        raise_to(&m.jobs_started, s.jobs_started);
        raise_to(&m.jobs_ended, s.jobs_ended);
        raise_to(&m.survivors, s.survivors);
        m.jobs_active.set(active_jobs as i64);
        m.tracked_processes.set(tracked_processes as i64);
        let set = |vec: &IntCounterVec, values: &BTreeMap<String, u64>| {
            for (label, value) in values {
                raise_to(&vec.with_label_values(&[label]), *value);
            }
        };
        set(&m.credential_accesses, &s.credential_accesses);
        set(&m.egress, &s.egress);
        for (table, value) in [
            ("processes", s.evicted_processes),
            ("jobs", s.evicted_jobs),
            ("credentials", s.evicted_credentials),
            ("dns", s.evicted_dns),
        ] {
            raise_to(&m.evictions.with_label_values(&[table]), value);
        }
    }

    /// The global egress mode (`audit` or `block`) and the jobs block mode refuses egress for.
    pub fn egress(&self, mode: &str, jobs_blocking: usize) {
        for m in ["audit", "block"] {
            self.egress_mode
                .with_label_values(&[m])
                .set(i64::from(m == mode));
        }
        self.egress_jobs_blocking.set(jobs_blocking as i64);
    }

    pub fn ring_fill(&self, ratio: f64) {
        self.kernel.ring_fill.set(ratio);
    }

    pub fn probes(&self, probes: &[ProbeStatus]) {
        for p in probes {
            let attached = i64::from(p.state == ProbeState::Attached);
            self.kernel
                .probe_attached
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
        m.egress("block", 2);
        let text = m.encode();
        assert!(
            text.contains("runner_monitor_egress_mode{mode=\"block\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("runner_monitor_egress_mode{mode=\"audit\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("runner_monitor_egress_jobs_blocking 2"),
            "{text}"
        );
        for name in METRIC_NAMES {
            if *name == "runner_monitor_probe_attached" {
                continue; // no probe given here
            }
            if *name == "runner_monitor_control_requests_total" {
                continue; // the control socket registers it (tested there)
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
