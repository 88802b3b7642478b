//! The conductor: every event the agent judges goes through here, live and in `replay`, through
//! the same stages in the same order.
//!
//! ```text
//! batch ─▶ containers ─▶ pods ─▶ fingerprint ─▶ discover ─▶ engine ─▶ tracking id ─▶ report ─▶ write
//!          (host)        (host)   (host)         (host)                (host)
//! time  ─────────────────────────────────────────▶ engine ─▶ tracking id ─▶ report ─▶ write
//! ```
//!
//! - containers: a job's new container is named by the Docker API the job used (`enrich`).
//! - pods: the first event of a job process from a cgroup of a Kubernetes pod (kubelet's
//!   layout) brings a container event naming container and pod (CRI) before it, and a GitLab
//!   kubernetes-executor pod's annotations name its job when discovery has not (`enrich`).
//!   The pods named as running a job are watched for their ARC workflow pods, whose containers
//!   the CRI thread links to the job in the kernel (`enrich::workflow_pods`).
//! - fingerprint: an open or unix connect that reached a credential or secret socket under
//!   another name is brought back to it (`identity`); a credential read gets the keyed hash of
//!   its content; a credential written is hashed when its writer exits, as an event of its own
//!   after the exit (`enrich`).
//! - discover: the identity values the kernel copied from a job root's environment at exec
//!   (`job_env`, consumed here), or else an exec in a job whose identity is not known yet has its
//!   environment read from /proc; the
//!   `job_start` found there goes to the engine *before* the exec that revealed it, with that
//!   exec's time and process, so the exec and everything after it are judged as the named job
//!   (its repository's rules) and the event trace holds them in that order (`job`).
//! - engine: events in, findings out (`engine`; pure).
//! - tracking id: a survivor that changed `RUNNER_TRACKING_ID` says so (`enrich`).
//! - report: what each recent job did, for `runner-monitor report` and `/jobs` (`report`), when
//!   the pipeline has one (`with_reports`); locked once per batch.
//! - attest: after time moves, each ended job whose survivors were looked for gets its signed
//!   runtime attestation (`attest`; host, and only with the report stage on).
//! - write: the event trace, the alert stream and its receivers, the metrics (`output`); with a
//!   fleet stream, also every credential fingerprint (read or materialised) with its job.
//!
//! The stages marked "host" read the file system and `/proc`; `replay` runs without a `Host`,
//! so it runs the rest exactly as live, on the events the live agent recorded (discovered job
//! starts and fingerprints included).

use std::sync::Arc;

use crate::{
    attest::Attestor,
    engine::{Engine, EngineStats, Finding},
    enrich::{self, Fingerprinter},
    event::{Event, EventDetail},
    identity::Identities,
    job::JobDirectory,
    output::Outputs,
    policy::Policy,
    report::{self, JobReports, SharedReports},
};

/// What only the live agent reads from the host.
pub struct Host {
    /// Keyed hashes of credential contents (`--fingerprint-key`), when configured.
    pub fingerprints: Option<Fingerprinter>,
    /// Signed job attestations (`--attestation-key`), when configured; needs the report stage.
    pub attestor: Option<Attestor>,
    /// Credentials and secret sockets reached under another name (`identity`).
    pub identities: Identities,
    /// Names and images of the jobs' containers, from the Docker API they used.
    pub containers: enrich::ContainerNamer,
    /// Pods and containers under Kubernetes, from the kubelet's cgroup layout and the CRI.
    pub pods: enrich::PodNamer,
}

impl Default for Host {
    fn default() -> Self {
        Self {
            fingerprints: None,
            attestor: None,
            identities: Default::default(),
            containers: Default::default(),
            pods: enrich::PodNamer::new(Some(enrich::DEFAULT_CRI_SOCKET.into())),
        }
    }
}

pub struct Pipeline {
    policy: Arc<Policy>,
    host: Option<Host>,
    jobs: JobDirectory,
    engine: Engine,
    reports: Option<SharedReports>,
    out: Outputs,
}

impl Pipeline {
    /// `host`: the live agent's; `None` in `replay`.
    pub fn new(policy: Arc<Policy>, host: Option<Host>, out: Outputs) -> Self {
        Self {
            engine: Engine::new(policy.clone()),
            jobs: JobDirectory::default(),
            reports: None,
            policy,
            host,
            out,
        }
    }

    /// Turns the report stage on: every job's report is kept in `reports` (see `report`).
    pub fn with_reports(mut self, reports: SharedReports) -> Self {
        self.reports = Some(reports);
        self
    }

    /// The report stage's reports, when it is on.
    pub fn reports(&self) -> Option<&SharedReports> {
        self.reports.as_ref()
    }

    /// Basenames of credential aliases learned since the last call, for the kernel's name table
    /// (`identity`).
    pub fn take_kernel_names(&mut self) -> Vec<String> {
        self.host
            .as_mut()
            .map(|h| h.identities.take_kernel_names())
            .unwrap_or_default()
    }

    /// Runs a batch of events through the stages, in order; returns the findings written.
    pub fn run(&mut self, batch: impl IntoIterator<Item = Event>) -> std::io::Result<Vec<Finding>> {
        // The reports are locked once for the batch (readers copy a report out and go).
        let reports = self.reports.clone();
        let mut reports = reports.as_ref().map(report::lock);
        let mut written = Vec::new();
        for mut event in batch {
            if matches!(event.detail, EventDetail::JobEnv { .. }) {
                // Identity values for discovery only: not judged, not in the event trace.
                if let Some(start) = self.discover(&event) {
                    written.extend(self.start(&start, reports.as_deref_mut())?);
                }
                continue;
            }
            if let Some(host) = self.host.as_mut() {
                host.containers
                    .process(&mut event, &self.policy, &mut self.jobs);
            }
            if matches!(event.detail, EventDetail::RuntimeSent { .. }) {
                // Read for container requests only: never judged, never in the event trace.
                continue;
            }
            for pod in self.pods(&event) {
                if let Some(info) = pod.gitlab_job
                    && let Some(start) = self.jobs.discover_pod(&event, info, &self.policy)
                {
                    written.extend(self.judge(&start, reports.as_deref_mut())?);
                }
                written.extend(self.judge(&pod.event, reports.as_deref_mut())?);
            }
            let credentials_written = self.fingerprint(&mut event);
            if let Some(start) = self.discover(&event) {
                written.extend(self.start(&start, reports.as_deref_mut())?);
            }
            written.extend(self.judge(&event, reports.as_deref_mut())?);
            for e in &credentials_written {
                written.extend(self.judge(e, reports.as_deref_mut())?);
            }
        }
        Ok(written)
    }

    /// Moves time to `now_ns` (timers such as survivors' grace periods); returns the findings
    /// written.
    pub fn advance(&mut self, now_ns: u64) -> std::io::Result<Vec<Finding>> {
        let mut findings = self.engine.advance(now_ns);
        self.tracking_id(&mut findings);
        if let Some(reports) = &self.reports
            && !findings.is_empty()
        {
            report::lock(reports).findings(&findings);
        }
        self.attest(now_ns)?;
        self.out.findings(&findings, None)?;
        self.out.engine(&self.engine);
        Ok(findings)
    }

    /// Stage 0b: the container events for a pod container `event` reveals (`enrich::PodNamer`).
    fn pods(&mut self, event: &Event) -> Vec<enrich::PodContainer> {
        match self.host.as_mut() {
            Some(host) => host.pods.process(event),
            None => Vec::new(),
        }
    }

    /// Stage 1: fingerprints a credential read in place; returns the fingerprints of credentials
    /// written by a process that exits now, to judge after its exit. An exec has its executable
    /// hashed for the job's attestation.
    fn fingerprint(&mut self, event: &mut Event) -> Vec<Event> {
        if let Some(host) = self.host.as_mut() {
            host.identities.process(event, &self.policy);
        }
        if let Some(a) = self.host.as_mut().and_then(|h| h.attestor.as_mut()) {
            a.event(event);
        }
        match self.host.as_mut().and_then(|h| h.fingerprints.as_mut()) {
            Some(f) => f.process(event, &self.policy),
            None => Vec::new(),
        }
    }

    /// Stage 2: the `job_start` an exec reveals, if any.
    fn discover(&mut self, event: &Event) -> Option<Event> {
        self.host.as_ref()?;
        self.jobs.discover(event, &self.policy)
    }

    /// A `job_start` discovery revealed, judged; then, for a GitLab docker-executor job root,
    /// its container (labels, name: `enrich::of_job_root`). Live agent only: replay finds the
    /// container event in the trace.
    fn start(
        &mut self,
        start: &Event,
        mut reports: Option<&mut JobReports>,
    ) -> std::io::Result<Vec<Finding>> {
        let mut written = self.judge(start, reports.as_deref_mut())?;
        if self.host.is_some()
            && let Some(c) = enrich::of_job_root(start, &self.policy)
        {
            written.extend(self.judge(&c, reports)?);
        }
        Ok(written)
    }

    /// Stages 3 to 6 for one event: engine, tracking id, report, write.
    fn judge(
        &mut self,
        event: &Event,
        reports: Option<&mut JobReports>,
    ) -> std::io::Result<Vec<Finding>> {
        self.out.event(event)?;
        let mut findings = self.engine.handle(event);
        self.out.judged(event.time_ns);
        self.credential_use(event)?;
        self.tracking_id(&mut findings);
        if let Some(reports) = reports {
            reports.judged(event, &findings);
        }
        self.out.findings(&findings, Some(event.time_ns))?;
        Ok(findings)
    }

    /// After time moved (and the survivors found were reported): the attestations of the jobs
    /// whose survivors were looked for, written, then spooled for the fleet stream.
    fn attest(&mut self, now_ns: u64) -> std::io::Result<()> {
        let (Some(attestor), Some(reports)) = (
            self.host.as_mut().and_then(|h| h.attestor.as_mut()),
            &self.reports,
        ) else {
            return Ok(());
        };
        attestor.attest_due(&report::lock(reports), &self.engine, now_ns);
        for written in attestor.take_written() {
            self.out.attestation(&written.envelope)?;
        }
        Ok(())
    }

    /// Part of the write stage: a credential fingerprint (read, or written by the job) goes to
    /// the fleet stream with who the job is, as the engine knows it after judging the event.
    fn credential_use(&mut self, event: &Event) -> std::io::Result<()> {
        if !self.out.wants_fingerprints() {
            return Ok(());
        }
        let Some(job) = &event.job else {
            return Ok(());
        };
        let kind = match &event.detail {
            crate::event::EventDetail::FileOpen(f) if f.fingerprint.is_some() => {
                self.policy.credential_of_access(f)
            }
            crate::event::EventDetail::CredentialFingerprint { path, .. } => {
                self.policy.credential_of(path)
            }
            _ => return Ok(()),
        };
        let kind = kind.map(|c| c.kind.clone());
        self.out
            .credential_use(event, self.engine.job(job.key), kind.as_deref())
    }

    /// Stage 4: survivors that changed the runner's tracking id.
    fn tracking_id(&self, findings: &mut [Finding]) {
        if self.host.is_some() {
            for f in findings {
                enrich::survivor_tracking_id(f, &self.jobs);
            }
        }
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    /// Replaces the policy every stage judges by; the tables are kept.
    pub fn set_policy(&mut self, policy: Arc<Policy>) {
        self.engine.set_policy(policy.clone());
        if let Some(reports) = &self.reports {
            report::lock(reports).set_policy(policy.clone());
        }
        self.policy = policy;
    }

    /// From now on, the engine records what jobs use (learning a baseline: `crate::baseline`).
    pub fn record_usage(&mut self) {
        self.engine.record_usage();
    }

    /// What jobs used since the last call, as the engine judged it.
    pub fn take_usage(&mut self) -> Vec<crate::engine::usage::Usage> {
        self.engine.take_usage()
    }

    /// The engine, e.g. to snapshot it.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// What the agent knows of jobs beyond the kernel's keys.
    pub fn jobs(&self) -> &JobDirectory {
        &self.jobs
    }

    /// The job directory, for the control socket's requests (which then `run` their event).
    pub fn jobs_mut(&mut self) -> &mut JobDirectory {
        &mut self.jobs
    }

    /// Takes over the engine and job tables a previous agent saved.
    pub fn restore(&mut self, engine: Engine, jobs: JobDirectory) {
        self.engine = engine;
        self.jobs = jobs;
    }

    pub fn stats(&self) -> EngineStats {
        self.engine.stats()
    }

    /// Shutdown: gives each receiver until `deadline` to take the spooled alerts; returns what
    /// is still pending per receiver (kept in the spool for the next start).
    pub async fn drain_sinks(&self, deadline: tokio::time::Instant) -> Vec<(&'static str, u64)> {
        self.out.drain_sinks(deadline).await
    }
}
