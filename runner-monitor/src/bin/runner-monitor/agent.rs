//! `runner-monitor run`: the agent, in three parts. `Agent::start` loads the sensors and the
//! outputs and takes over the state a previous agent left; `Agent::serve` is the loop, one method
//! per input (a batch of events, a control request, SIGHUP, the snapshot tick, the one-second
//! tick, the status line) until SIGTERM; `Agent::stop` drains, saves, delivers and detaches.
//! Every event goes through the one `Pipeline` (`runner_monitor::pipeline`). `start` is in
//! `agent/start.rs`.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use runner_monitor::{
    clock::monotonic_ns,
    event::{Event, EventDetail, JobKey, JobOverBudget, SensorStatus},
    job::{
        agent_event,
        control::{self, Reply, Request},
    },
    output::{metrics::Metrics, ocsf::AlertFormat},
    pipeline::Pipeline,
    policy::{Policy, SensorPolicy},
    sensor::{
        KernelCounters, ProbeState, ProbeStatus, Sensor, reader::ReaderCounters, ringfill::RingFill,
    },
    state::StateDir,
};
use tokio::{
    signal::unix::Signal,
    sync::{mpsc, oneshot},
    task::JoinHandle,
    time::Interval,
};

use crate::requests::control_request;

mod egress;
mod start;

#[derive(clap::Args)]
pub struct RunArgs {
    /// Policy file (TOML); without it, the built-in policy.
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Where to write the findings, one JSON object per line; `-` is stdout.
    #[arg(long, value_name = "FILE", default_value = "-")]
    alerts_out: PathBuf,
    /// Also write every event, one JSON object per line (`-` is stdout); `replay` reads it back.
    #[arg(long, value_name = "FILE")]
    events_out: Option<PathBuf>,
    /// Executable basename that starts a job when executed (repeatable); adds to the default
    /// (`Runner.Worker`).
    #[arg(long = "job-root-exe", value_name = "NAME")]
    job_root_exes: Vec<String>,
    /// Register a running process (and all its descendants) as a job root (repeatable).
    #[arg(long = "job-pid", value_name = "PID")]
    job_pids: Vec<u32>,
    /// The control socket for `runner-monitor job start|end`.
    #[arg(long, value_name = "PATH", env = "RUNNER_MONITOR_SOCKET", default_value = control::DEFAULT_SOCKET)]
    control_socket: PathBuf,
    /// The user the runner (and its hooks) run as; admitted on the control socket besides root.
    #[arg(long, value_name = "NAME")]
    runner_user: Option<String>,
    /// Deliver alerts to this Alertmanager (base URL, v2 API), spooled on disk while it is down.
    #[arg(long, value_name = "URL")]
    alertmanager: Option<String>,
    /// Deliver alerts as JSON arrays POSTed to this URL, spooled on disk while it is down.
    #[arg(long, value_name = "URL")]
    webhook: Option<String>,
    /// What the alert stream (`--alerts-out`) holds: our JSON findings, or OCSF 1.5.0 Detection
    /// Findings (docs/ocsf.md). Also the webhook's format unless `--webhook-format` says.
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = AlertFormat::Json)]
    alerts_format: AlertFormat,
    /// What the webhook receives (default: `--alerts-format`). Alertmanager always gets its own.
    #[arg(long, value_name = "FORMAT", value_enum)]
    webhook_format: Option<AlertFormat>,
    /// PEM CA certificates that https:// receivers' certificates must chain to (instead of the
    /// system's CA roots).
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// PEM client certificate presented to https:// receivers that ask for one (mTLS); with
    /// `--tls-key`.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Publish every finding and credential fingerprint to the fleet's NATS JetStream stream
    /// (`nats://HOST:PORT` or `tls://HOST:PORT`; stream, subjects, credentials and TLS in the
    /// policy's `[fleet]`), spooled on disk while it is unreachable.
    #[arg(long, value_name = "URL")]
    nats: Option<String>,
    /// Where undelivered alerts wait, per receiver (kept across restarts).
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/lib/runner-monitor/spool"
    )]
    spool_dir: PathBuf,
    /// Address of the HTTP endpoint (/metrics, /healthz, /readyz).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9477")]
    listen: std::net::SocketAddr,
    /// Secret key file (at least 32 bytes, mode 0600) for credential fingerprints: keyed hashes
    /// of credential contents that recognise a token copied to another path or host.
    #[arg(long, value_name = "FILE")]
    fingerprint_key: Option<PathBuf>,
    /// The CRI socket asked for the names of the pods and containers jobs run in under
    /// Kubernetes (containerd's; an absent socket is fine). `none`: the kubelet's cgroup
    /// layout only.
    #[arg(long, value_name = "SOCKET", default_value = runner_monitor::enrich::DEFAULT_CRI_SOCKET)]
    cri_socket: PathBuf,
    /// ed25519 private key (PKCS#8 PEM, mode 0600; `runner-monitor attest keygen`) that signs a
    /// runtime attestation of every job at its end, written to <state-dir>/attestations/.
    #[arg(long, value_name = "FILE")]
    attestation_key: Option<PathBuf>,
    /// Seconds between status lines in the log (events sent, lost).
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    status_interval: u64,
    /// Where the agent keeps its state across restarts (engine and job tables), locked so that
    /// one agent runs per host.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/lib/runner-monitor/state"
    )]
    state_dir: PathBuf,
    /// Where the kernel's process and job maps are pinned (bpffs), so that jobs stay attributed
    /// across restarts.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/runner-monitor")]
    pin_dir: PathBuf,
    /// Start afresh: forget the saved state and the pinned kernel maps.
    #[arg(long)]
    fresh_state: bool,
    /// Which hooks see file opens, process memory access and signals: `auto` (per family, its
    /// BPF LSM hook, else fentry on its `security_*` function, else its syscall tracepoints),
    /// `tracepoint` (always those), `fast` (LSM or fentry for every family, or refuse to start),
    /// `fentry` (fentry for every family, or refuse to start). docs/sensors.md, "Hook sets".
    #[arg(long, value_name = "SET", default_value = "auto")]
    hooks: runner_monitor::sensor::hook_sets::HookChoice,
}

/// How often the state snapshot is written while events arrive.
const SNAPSHOT_INTERVAL: Duration = Duration::from_secs(10);
/// How long a stopping agent waits for receivers to take the spooled alerts.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The exit status of an agent that handed over (`SIGUSR2`): the unit's
/// `RestartForceExitStatus=` starts the next one.
const HAND_OVER_EXIT: i32 = 75;

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let (mut agent, mut inputs) = Agent::start(args).await?;
    let hand_over = agent.serve(&mut inputs).await?;
    agent.stop(inputs, hand_over).await?;
    if hand_over {
        std::process::exit(HAND_OVER_EXIT);
    }
    Ok(())
}

/// The running agent: the sensors, the pipeline every event goes through, and what the loop
/// keeps between its inputs.
struct Agent {
    args: RunArgs,
    sensor: Sensor,
    pipeline: Pipeline,
    metrics: Arc<Metrics>,
    state: StateDir,
    /// `/readyz`: set at the first one-second tick.
    ready: Arc<AtomicBool>,
    reader_counters: Arc<ReaderCounters>,
    ring_fill: Option<RingFill>,
    /// Lost events raised so far; events dropped over budget reported so far, per job.
    lost_raised: u64,
    budget_reported: HashMap<JobKey, u64>,
    /// The engine's job changes block mode's plans were last brought in step with; `None`:
    /// bring them in step at the next chance.
    egress_seen: Option<u64>,
    /// Where block mode's resolver forwards (`None`: it did not start).
    dns_upstream: Option<runner_monitor::sensor::resolver::Upstream>,
    /// Something changed since the last snapshot; the snapshot being written, if one is.
    dirty: bool,
    /// A job was named by its environment since the last snapshot (`save_names`).
    names_unsaved: bool,
    snapshot_write: Option<JoinHandle<()>>,
}

/// What the loop waits on.
struct Inputs {
    batches: mpsc::Receiver<Vec<Event>>,
    commands: mpsc::Receiver<control::Command>,
    stop_reader: oneshot::Sender<()>,
    reader: JoinHandle<std::io::Result<()>>,
    sigterm: Signal,
    sighup: Signal,
    /// Hand over to the next agent: stop, leaving the probes attached and recording.
    sigusr2: Signal,
    snapshot_tick: Interval,
    status_tick: Interval,
    second: Interval,
}

fn status(kernel: &KernelCounters, reader: &ReaderCounters) -> String {
    format!(
        "events sent {} read {}, lost {}, decode errors {}, unreadable user strings {}",
        kernel.total_emitted(),
        reader.records.load(Ordering::Relaxed),
        kernel.total_lost(),
        reader.decode_errors.load(Ordering::Relaxed),
        kernel.user_read_errors,
    )
}

/// The kernel's view of `policy` (plus `--job-root-exe`).
fn sensor_policy_of(policy: &Policy, job_root_exes: &[String]) -> SensorPolicy {
    let mut sensor_policy = policy.sensor_policy();
    sensor_policy
        .job_root_executables
        .extend(job_root_exes.iter().cloned());
    sensor_policy
}

fn attached(probes: &[ProbeStatus]) -> usize {
    probes
        .iter()
        .filter(|p| p.state == ProbeState::Attached)
        .count()
}

fn sensor_status(
    lost_events: u64,
    detached_probes: Vec<String>,
    over_budget: Vec<JobOverBudget>,
) -> Event {
    agent_event(
        EventDetail::SensorStatus(SensorStatus {
            lost_events,
            detached_probes,
            over_budget,
        }),
        None,
        0,
    )
}

impl Agent {
    /// The loop: until SIGTERM, Ctrl-C, or the reader stops (false), or SIGUSR2 (true: hand
    /// over).
    async fn serve(&mut self, inputs: &mut Inputs) -> anyhow::Result<bool> {
        loop {
            tokio::select! {
                batch = inputs.batches.recv() => {
                    let Some(batch) = batch else { break };
                    self.events(batch)?;
                    // Flush when the queue is empty, so a quiet stream is never held back.
                    if inputs.batches.is_empty() {
                        self.pipeline.flush()?;
                    }
                }
                Some(command) = inputs.commands.recv() => self.command(command).await?,
                _ = inputs.sighup.recv() => self.reload(),
                // A tick while a snapshot is still being written waits for the next.
                _ = inputs.snapshot_tick.tick(), if self.dirty && self.snapshot_write.as_ref().is_none_or(|w| w.is_finished()) => self.snapshot(None),
                _ = inputs.second.tick() => self.second()?,
                _ = inputs.status_tick.tick() => self.status()?,
                _ = tokio::signal::ctrl_c() => break,
                _ = inputs.sigterm.recv() => break,
                _ = inputs.sigusr2.recv() => return Ok(true),
            }
        }
        Ok(false)
    }

    /// A batch from the ring buffer.
    fn events(&mut self, batch: Vec<Event>) -> std::io::Result<()> {
        let names = batch
            .iter()
            .any(|e| matches!(e.detail, EventDetail::JobEnv { .. }));
        self.pipeline.run(batch)?;
        self.sync_egress();
        self.sync_alias_names();
        self.dirty = true;
        self.names_unsaved |= names;
        self.save_names();
        Ok(())
    }

    /// A job named by its environment (no hook) is saved at once, not at the next tick, so
    /// that an agent that crashes soon after still knows whose events its probes recorded;
    /// after the snapshot being written, if one is (looked at again every second).
    fn save_names(&mut self) {
        if self.names_unsaved && self.snapshot_write.as_ref().is_none_or(|w| w.is_finished()) {
            self.snapshot(None);
        }
    }

    /// Credential aliases the pipeline learned: the kernel reports their opens from now on.
    fn sync_alias_names(&mut self) {
        let names = self.pipeline.take_kernel_names();
        if names.is_empty() {
            return;
        }
        match self.sensor.add_alias_names(names) {
            Ok(0) => {}
            Ok(refused) => tracing::warn!(
                refused,
                "credential aliases not watched in the kernel: its name table is full"
            ),
            Err(error) => tracing::warn!(%error, "credential aliases not watched in the kernel"),
        }
    }

    /// A control-socket request, carried out and answered.
    async fn command(&mut self, command: control::Command) -> std::io::Result<()> {
        let control::Command {
            peer,
            request,
            reply,
        } = command;
        // A job's name, end and containers come only from here.
        let names_jobs = matches!(
            request,
            Request::JobStart { .. } | Request::JobEnd { .. } | Request::ContainerJob { .. }
        );
        let response = control_request(&mut self.sensor, &mut self.pipeline, peer, request)?;
        // What it raised and recorded is written now, not with the next batch of events.
        self.pipeline.flush()?;
        // A job named by the job-started hook is enforced before the hook returns (a job known
        // already is renamed without a new start: always look).
        self.egress_seen = None;
        self.sync_egress();
        if !names_jobs {
            let _ = reply.send(response);
            return Ok(());
        }
        // Saved before the answer, so that an agent that crashes right after the hook returns
        // still knows whose events its probes kept recording. A snapshot being written is
        // waited for (it may not hold this change).
        if let Some(write) = self.snapshot_write.take() {
            let _ = write.await;
        }
        self.snapshot(Some((reply, response)));
        Ok(())
    }

    /// SIGHUP: the policy file read again. A policy that does not parse, or that the kernel
    /// cannot take, is rejected and the one in force stays.
    fn reload(&mut self) {
        match self.load_policy() {
            Ok(Some(policy)) => {
                self.metrics
                    .credential_kinds(policy.credentials.iter().map(|c| c.kind.as_str()));
                self.set_dns_upstream(&policy);
                self.pipeline.set_policy(policy);
                self.egress_seen = None;
                self.sync_egress();
                self.metrics.policy_reload(true);
                tracing::info!(policy = ?self.args.policy, "SIGHUP: policy reloaded; state kept");
            }
            Ok(None) => {}
            Err(error) => {
                self.metrics.policy_reload(false);
                tracing::error!(
                    error = format!("{error:#}"),
                    "SIGHUP: new policy rejected; the previous policy stays in force"
                );
            }
        }
    }

    fn load_policy(&mut self) -> anyhow::Result<Option<Arc<Policy>>> {
        let Some(path) = &self.args.policy else {
            tracing::info!("SIGHUP: no policy file (--policy); the built-in policy stays in force");
            return Ok(None);
        };
        let policy = Arc::new(Policy::load(path)?);
        let exes = &self.args.job_root_exes;
        if let Err(error) = self.sensor.set_names(&sensor_policy_of(&policy, exes)) {
            // Put the kernel back to the policy in force.
            self.sensor
                .set_names(&sensor_policy_of(self.pipeline.policy(), exes))?;
            return Err(error.into());
        }
        Ok(Some(policy))
    }

    /// The state snapshot: encoded here, written and synced on a blocking thread (the fsync must
    /// not hold up events), one write at a time; `answer`, if any, is sent once it is written.
    fn snapshot(&mut self, answer: Option<(oneshot::Sender<Reply>, Reply)>) {
        match StateDir::encode(self.pipeline.engine(), self.pipeline.jobs(), monotonic_ns()) {
            Ok(bytes) => {
                let writer = self.state.writer();
                self.snapshot_write = Some(tokio::task::spawn_blocking(move || {
                    if let Err(error) = writer.write(&bytes) {
                        tracing::warn!(%error, "writing the state snapshot");
                    }
                    if let Some((reply, response)) = answer {
                        let _ = reply.send(response);
                    }
                }));
            }
            Err(error) => {
                tracing::warn!(%error, "encoding the state snapshot");
                if let Some((reply, response)) = answer {
                    let _ = reply.send(response);
                }
            }
        }
        self.dirty = false;
        self.names_unsaved = false;
    }

    /// Every second: time moves (survivors' grace periods), the kernel's losses are raised, the
    /// gauges refreshed.
    fn second(&mut self) -> anyhow::Result<()> {
        self.save_names();
        self.pipeline.advance(monotonic_ns())?;
        // Jobs forgotten as time passes, addresses whose TTL passed.
        self.sync_egress();
        self.sensor.egress_mut().expire(monotonic_ns());
        let kernel = self.sensor.counters()?;
        // Every event the kernel could not keep is raised within a second.
        let lost = kernel.total_lost();
        if lost > self.lost_raised {
            let over_budget = self.over_budget_since();
            tracing::warn!(
                lost = lost - self.lost_raised,
                ?over_budget,
                "sensor degraded: events lost in the kernel"
            );
            self.pipeline.run([sensor_status(
                lost - self.lost_raised,
                Vec::new(),
                over_budget,
            )])?;
            self.lost_raised = lost;
        }
        self.metrics.kernel(
            &kernel,
            self.reader_counters.decode_errors.load(Ordering::Relaxed),
        );
        if let Some(fill) = &self.ring_fill {
            self.metrics.ring_fill(fill.ratio());
        }
        self.metrics.egress(
            self.pipeline.policy().egress.mode.as_str(),
            self.sensor.egress().blocking_jobs(),
        );
        self.ready.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Jobs with events dropped over their budget since the last call.
    fn over_budget_since(&mut self) -> Vec<JobOverBudget> {
        let mut out = Vec::new();
        // Only the jobs the kernel still has (its map is LRU): so this stays bounded too.
        let mut now = HashMap::new();
        let jobs = self.pipeline.jobs();
        for (job, dropped) in self.sensor.over_budget_jobs() {
            let before = self.budget_reported.get(&job).copied().unwrap_or(0);
            if dropped > before {
                out.push(JobOverBudget {
                    job,
                    id: jobs.id_of(jobs.job_of_stage(job)),
                    dropped: dropped - before,
                });
            }
            now.insert(job, dropped);
        }
        self.budget_reported = now;
        out
    }

    /// The status line in the log.
    fn status(&self) -> anyhow::Result<()> {
        let kernel = self.sensor.counters()?;
        tracing::info!(
            "{}; engine {:?}; unnamed jobs {}",
            status(&kernel, &self.reader_counters),
            self.pipeline.stats(),
            self.pipeline.jobs().unidentified
        );
        Ok(())
    }

    /// Shutdown: the reader drains the ring buffer and the pipeline judges it all; the state is
    /// saved; receivers get `DRAIN_TIMEOUT` to take the spooled alerts; every probe detaches,
    /// or, handing over, stays attached and recording for the next agent.
    async fn stop(mut self, mut inputs: Inputs, hand_over: bool) -> anyhow::Result<()> {
        // The reader drains the ring buffer, then closes the channel.
        let _ = inputs.stop_reader.send(());
        while let Some(batch) = inputs.batches.recv().await {
            self.pipeline.run(batch)?;
        }
        match inputs.reader.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::error!(%error, "event reader failed"),
            Err(error) => tracing::error!(%error, "event reader panicked"),
        }
        self.pipeline.flush()?;
        tracing::info!(
            "stopping: {}; engine {:?}",
            status(&self.sensor.counters()?, &self.reader_counters),
            self.pipeline.stats()
        );
        if let Some(write) = self.snapshot_write.take() {
            let _ = write.await;
        }
        match self
            .state
            .save(self.pipeline.engine(), self.pipeline.jobs(), monotonic_ns())
        {
            Ok(()) => {
                tracing::info!(dir = %self.state.path().display(), "state saved for the next start")
            }
            Err(error) => tracing::error!(%error, "saving the state"),
        }
        for (sink, pending) in self
            .pipeline
            .drain_sinks(tokio::time::Instant::now() + DRAIN_TIMEOUT)
            .await
        {
            if pending > 0 {
                tracing::warn!(
                    sink,
                    pending_bytes = pending,
                    "receiver did not take every alert before shutdown: they stay spooled and are \
                     delivered at the next start"
                );
            }
        }
        let attached = attached(self.sensor.probes());
        if hand_over {
            let kept = self.sensor.hand_over();
            tracing::info!(
                kept,
                pin_dir = %self.args.pin_dir.display(),
                "handed over: {kept} probes stay attached and record for the next agent \
                 (exit status {HAND_OVER_EXIT})"
            );
            return Ok(());
        }
        self.sensor.stop();
        tracing::info!(
            detached = attached,
            pin_dir = %self.args.pin_dir.display(),
            "stopped: every probe detached; the kernel's job maps stay pinned for the next start"
        );
        Ok(())
    }
}
