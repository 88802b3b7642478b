//! `runner-monitor run`: the agent. Loads the sensors, takes over the state a previous agent left,
//! then reads events, serves the control socket and keeps time until SIGTERM; SIGHUP reloads the
//! policy.

use std::{
    os::fd::AsRawFd,
    path::PathBuf,
    sync::atomic::AtomicBool,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::Context as _;
use runner_monitor::{
    clock::monotonic_ns,
    engine::Engine,
    enrich::{self, Fingerprinter},
    event::{Event, EventDetail, JobInfo, JobKey, JobOverBudget, SensorStatus},
    job::{
        JobDirectory, agent_event,
        control::{self},
        job_start_event,
        requests::{control_request, feed},
    },
    output::alerts::WallClock,
    output::{
        delivery::{Receiver, Sink},
        http::{self, Endpoint},
        metrics::Metrics,
    },
    pipeline::Pipeline,
    policy::{Policy, SensorPolicy},
    privilege,
    sensor::ringfill::RingFill,
    sensor::{
        KernelCounters, ProbeState, Sensor, SensorOptions,
        decode::Decoder,
        pins,
        reader::{self, ReaderCounters},
    },
    state::StateDir,
};
use tokio::sync::mpsc;

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
}

/// How often the state snapshot is written while events arrive.
const SNAPSHOT_INTERVAL: Duration = Duration::from_secs(10);
/// How long a stopping agent waits for receivers to take the spooled alerts.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Checks the effective capabilities before anything is loaded: a missing required one stops
/// the agent with its name and purpose; a missing optional one is a warning.
fn require_capabilities(runner_user: bool) -> anyhow::Result<()> {
    for r in privilege::check(&privilege::Setup::here(runner_user))? {
        tracing::warn!(
            capability = %r.capability,
            "sensor degraded: missing capability {} (needed {}): {}",
            r.capability,
            r.why,
            r.without
        );
    }
    Ok(())
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

/// Jobs with events dropped over their budget since the last call (`reported` remembers).
fn over_budget_since(
    sensor: &Sensor,
    directory: &JobDirectory,
    reported: &mut std::collections::HashMap<JobKey, u64>,
) -> Vec<JobOverBudget> {
    let mut out = Vec::new();
    // Only the jobs the kernel still has (its map is LRU): so this stays bounded too.
    let mut now = std::collections::HashMap::new();
    for (job, dropped) in sensor.over_budget_jobs() {
        let before = reported.get(&job).copied().unwrap_or(0);
        if dropped > before {
            out.push(JobOverBudget {
                job,
                id: directory.id_of(directory.job_of_stage(job)),
                dropped: dropped - before,
            });
        }
        now.insert(job, dropped);
    }
    *reported = now;
    out
}

/// One batch from the ring buffer through enrichment, the engine and the outputs.
fn handle_batch(
    batch: Vec<Event>,
    fingerprints: &mut Option<Fingerprinter>,
    pipeline: &mut Pipeline,
    directory: &mut JobDirectory,
    policy: &Policy,
) -> std::io::Result<()> {
    for mut event in batch {
        let extra = match fingerprints {
            Some(f) => f.process(&mut event, policy),
            None => Vec::new(),
        };
        feed(pipeline, directory, &event)?;
        if let Some(start) = directory.discover(&event, policy) {
            feed(pipeline, directory, &start)?;
        }
        for e in &extra {
            feed(pipeline, directory, e)?;
        }
    }
    Ok(())
}

/// SIGHUP: the policy file read again. A policy that does not parse, or that the kernel cannot
/// take, is rejected and the one in force stays.
fn reload_policy(
    args: &RunArgs,
    sensor: &mut Sensor,
    current: &Policy,
) -> anyhow::Result<Option<Arc<Policy>>> {
    let Some(path) = &args.policy else {
        tracing::info!("SIGHUP: no policy file (--policy); the built-in policy stays in force");
        return Ok(None);
    };
    let policy = Arc::new(Policy::load(path)?);
    if let Err(error) = sensor.set_names(&sensor_policy_of(&policy, &args.job_root_exes)) {
        // Put the kernel back to the policy in force.
        sensor.set_names(&sensor_policy_of(current, &args.job_root_exes))?;
        return Err(error.into());
    }
    Ok(Some(policy))
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    require_capabilities(args.runner_user.is_some())?;
    let state = StateDir::open(&args.state_dir)?;
    if args.fresh_state {
        pins::remove(&args.pin_dir)?;
        state.discard()?;
        tracing::info!("--fresh-state: saved state and pinned kernel maps removed");
    }
    let mut policy = Arc::new(match &args.policy {
        Some(path) => Policy::load(path).context("refusing to start with an invalid policy")?,
        None => Policy::builtin(),
    });
    // Configuration errors first, before the probes take seconds to load.
    let mut fingerprints = match &args.fingerprint_key {
        Some(path) => Some(Fingerprinter::load(path)?),
        None => None,
    };
    let sensor_policy = sensor_policy_of(&policy, &args.job_root_exes);
    let options = SensorOptions {
        pin_dir: Some(args.pin_dir.clone()),
    };
    let mut sensor = Sensor::load_with(&sensor_policy, &options).context("starting the sensors")?;
    let detached: Vec<String> = sensor
        .probes()
        .iter()
        .filter(|p| matches!(p.state, ProbeState::Failed(_)))
        .map(|p| format!("{} on {}", p.program, p.target))
        .collect();
    for probe in sensor.probes() {
        if let ProbeState::Failed(reason) = &probe.state {
            tracing::warn!(sensor = probe.sensor, program = %probe.program, target = %probe.target, %reason,
                "sensor degraded: probe not attached");
        }
    }
    let attached = sensor
        .probes()
        .iter()
        .filter(|p| p.state == ProbeState::Attached)
        .count();
    tracing::info!(attached, total = sensor.probes().len(), job_roots = ?sensor_policy.job_root_executables, "probes attached");

    let metrics = Arc::new(Metrics::new());
    metrics.probes(sensor.probes());
    metrics.credential_kinds(policy.credentials.iter().map(|c| c.kind.as_str()));
    let ready = Arc::new(AtomicBool::new(false));
    let endpoint = Endpoint {
        metrics: metrics.clone(),
        ready: ready.clone(),
    };
    let bound = http::serve(args.listen, endpoint)
        .await
        .with_context(|| format!("listening on {} (--listen)", args.listen))?;
    tracing::info!(address = %bound, "serving /metrics, /healthz, /readyz");

    let clock = WallClock::now(monotonic_ns());
    let mut pipeline = Pipeline::new(
        policy.clone(),
        args.events_out.as_deref(),
        &args.alerts_out,
        Some(clock),
    )
    .context("opening the event and alert outputs")?
    .with_metrics(metrics.clone());
    let receivers = [
        args.alertmanager.clone().map(Receiver::Alertmanager),
        args.webhook.clone().map(Receiver::Webhook),
    ];
    for receiver in receivers.into_iter().flatten() {
        receiver
            .validate()
            .map_err(|e| anyhow::anyhow!("--{}: {e}", receiver.name()))?;
        let name = receiver.name();
        let sink = Sink::start(receiver, &args.spool_dir, metrics.clone())
            .with_context(|| format!("opening the {name} spool in {}", args.spool_dir.display()))?;
        tracing::info!(
            sink = name,
            pending_bytes = sink.pending_bytes(),
            "alert delivery ready"
        );
        pipeline = pipeline.with_sink(sink);
    }
    let mut directory = JobDirectory::default();
    let saved = state.load();
    if !sensor.resumed() && saved.is_some() {
        tracing::warn!(
            pin_dir = %args.pin_dir.display(),
            "saved state found but the pinned kernel maps were not: the jobs it names are judged \
             from what was saved, their processes are no longer attributed"
        );
    }
    if let Some(saved) = saved {
        let age_s = monotonic_ns().saturating_sub(saved.saved_ns) as f64 / 1e9;
        pipeline.set_engine(Engine::restore(policy.clone(), saved.engine));
        directory = JobDirectory::restore(saved.directory);
        tracing::info!(
            jobs = pipeline.engine().active_jobs(),
            processes = pipeline.engine().tracked_processes(),
            age_s,
            "resumed from the saved state"
        );
    }
    if sensor.resumed() {
        // What happened while no agent ran: exits, forks, job roots gone.
        let reconciled = sensor
            .reconcile()
            .context("reconciling the pinned kernel maps")?;
        tracing::info!(
            exited = reconciled.exited.len(),
            born = reconciled.adopted.len(),
            jobs_ended = reconciled.ended.len(),
            "resumed the pinned kernel maps; while the agent was down"
        );
        for event in reconciled.events(&sensor) {
            feed(&mut pipeline, &directory, &event)?;
        }
    }
    if !detached.is_empty() {
        feed(
            &mut pipeline,
            &directory,
            &agent_event(
                EventDetail::SensorStatus(SensorStatus {
                    lost_events: 0,
                    detached_probes: detached,
                    over_budget: Vec::new(),
                }),
                None,
                0,
            ),
        )?;
    }
    for &pid in &args.job_pids {
        let key = sensor
            .register_job(pid)
            .with_context(|| format!("registering process {pid} as a job root"))?;
        tracing::info!(job = %key, pid, "watching job");
        let info = JobInfo {
            id: format!("pid-{pid}"),
            platform: Some("manual".into()),
            ..JobInfo::default()
        };
        directory.set_explicit(key, &info.id);
        feed(&mut pipeline, &directory, &job_start_event(key, pid, info))?;
    }
    let runner = match &args.runner_user {
        Some(name) => Some(
            control::user_ids(name)
                .with_context(|| format!("no such user {name:?} (--runner-user)"))?,
        ),
        None => None,
    };
    let listener = control::bind(&args.control_socket, runner)?;
    let (command_tx, mut commands) = mpsc::channel(64);
    tokio::spawn(control::serve(
        listener,
        runner.map(|(uid, _)| uid),
        command_tx,
        metrics.clone(),
    ));
    tracing::info!(socket = %args.control_socket.display(), runner_user = ?args.runner_user, "control socket ready");

    sensor.start_kernel_log();
    let ring = sensor
        .take_events()
        .context("event ring buffer already taken")?;
    let ring_fill = RingFill::new(
        ring.as_raw_fd(),
        u64::from(runner_monitor_common::RING_BUFFER_BYTES),
    )
    .map_err(|error| tracing::warn!(%error, "ring buffer fill will not be reported"))
    .ok();
    let counters = Arc::new(ReaderCounters::default());
    // Batches of up to `reader::BATCH` events: 8192 events in flight at most.
    let (tx, mut rx) = mpsc::channel(8192 / reader::BATCH);
    let (stop_reader, stop) = tokio::sync::oneshot::channel();
    let reader = tokio::spawn(reader::run(
        ring,
        Decoder::new(),
        tx,
        counters.clone(),
        stop,
    ));

    use tokio::signal::unix::{SignalKind, signal};
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut snapshot_tick = tokio::time::interval(SNAPSHOT_INTERVAL);
    let mut dirty = false;
    let mut snapshot_write: Option<tokio::task::JoinHandle<()>> = None;
    let mut status_tick = tokio::time::interval(Duration::from_secs(args.status_interval.max(1)));
    let mut second = tokio::time::interval(Duration::from_secs(1));
    status_tick.tick().await;
    let mut last_lost = 0;
    let mut budget_reported = std::collections::HashMap::new();
    loop {
        tokio::select! {
            batch = rx.recv() => {
                let Some(batch) = batch else { break };
                handle_batch(batch, &mut fingerprints, &mut pipeline, &mut directory, &policy)?;
                dirty = true;
                // Flush when the queue is empty, so a quiet stream is never held back.
                if rx.is_empty() {
                    pipeline.flush()?;
                }
            }
            Some(command) = commands.recv() => {
                let control::Command { peer, request, reply } = command;
                let response = control_request(&mut sensor, &mut directory, &mut pipeline, &policy, peer, request)?;
                let _ = reply.send(response);
                dirty = true;
            }
            _ = sighup.recv() => match reload_policy(&args, &mut sensor, &policy) {
                Ok(Some(new)) => {
                    policy = new;
                    pipeline.set_policy(policy.clone());
                    metrics.credential_kinds(policy.credentials.iter().map(|c| c.kind.as_str()));
                    metrics.policy_reload(true);
                    tracing::info!(policy = ?args.policy, "SIGHUP: policy reloaded; state kept");
                }
                Ok(None) => {}
                Err(error) => {
                    metrics.policy_reload(false);
                    tracing::error!(error = format!("{error:#}"), "SIGHUP: new policy rejected; the previous policy stays in force");
                }
            },
            // Encoded here, written and synced on a blocking thread: the fsync must not hold up
            // events. One write at a time; a tick while one is under way waits for the next.
            _ = snapshot_tick.tick(), if dirty && snapshot_write.as_ref().is_none_or(|w| w.is_finished()) => {
                match StateDir::encode(pipeline.engine(), &directory, monotonic_ns()) {
                    Ok(bytes) => {
                        let writer = state.writer();
                        snapshot_write = Some(tokio::task::spawn_blocking(move || {
                            if let Err(error) = writer.write(&bytes) {
                                tracing::warn!(%error, "writing the state snapshot");
                            }
                        }));
                    }
                    Err(error) => tracing::warn!(%error, "encoding the state snapshot"),
                }
                dirty = false;
            }
            _ = second.tick() => {
                let mut findings = pipeline.tick(monotonic_ns());
                for f in &mut findings {
                    enrich::survivor_tracking_id(f, &directory);
                }
                pipeline.alert_all(&findings)?;
                pipeline.export_engine();
                let kernel = sensor.counters()?;
                // Every event the kernel could not keep is raised within a second.
                let lost = kernel.total_lost();
                if lost > last_lost {
                    let over_budget = over_budget_since(&sensor, &directory, &mut budget_reported);
                    tracing::warn!(lost = lost - last_lost, ?over_budget, "sensor degraded: events lost in the kernel");
                    feed(&mut pipeline, &directory, &agent_event(EventDetail::SensorStatus(SensorStatus {
                        lost_events: lost - last_lost,
                        detached_probes: Vec::new(),
                        over_budget,
                    }), None, 0))?;
                    last_lost = lost;
                }
                metrics.kernel(&kernel, counters.decode_errors.load(Ordering::Relaxed));
                if let Some(fill) = &ring_fill {
                    metrics.ring_fill(fill.ratio());
                }
                ready.store(true, Ordering::Relaxed);
            }
            _ = status_tick.tick() => {
                let kernel = sensor.counters()?;
                tracing::info!(
                    "{}; engine {:?}; unnamed jobs {}",
                    status(&kernel, &counters),
                    pipeline.stats(),
                    directory.unidentified
                );
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    // The reader drains the ring buffer, then closes the channel.
    let _ = stop_reader.send(());
    while let Some(batch) = rx.recv().await {
        handle_batch(
            batch,
            &mut fingerprints,
            &mut pipeline,
            &mut directory,
            &policy,
        )?;
    }
    match reader.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::error!(%error, "event reader failed"),
        Err(error) => tracing::error!(%error, "event reader panicked"),
    }
    pipeline.flush()?;
    tracing::info!(
        "stopping: {}; engine {:?}",
        status(&sensor.counters()?, &counters),
        pipeline.stats()
    );
    if let Some(write) = snapshot_write.take() {
        let _ = write.await;
    }
    match state.save(pipeline.engine(), &directory, monotonic_ns()) {
        Ok(()) => tracing::info!(dir = %state.path().display(), "state saved for the next start"),
        Err(error) => tracing::error!(%error, "saving the state"),
    }
    for (sink, pending) in pipeline
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
    let attached = sensor
        .probes()
        .iter()
        .filter(|p| p.state == ProbeState::Attached)
        .count();
    drop(sensor);
    tracing::info!(
        detached = attached,
        pin_dir = %args.pin_dir.display(),
        "stopped: every probe detached; the kernel's job maps stay pinned for the next start"
    );
    Ok(())
}
