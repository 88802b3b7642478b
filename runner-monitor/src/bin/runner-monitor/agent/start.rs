//! `Agent::start`: everything before the first event. Configuration errors come first, before the
//! probes take seconds to load; then the probes, the outputs, the state a previous agent left, the
//! control socket and the ring buffer's reader.

use std::{
    collections::HashMap,
    os::fd::AsRawFd,
    path::Path,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use anyhow::Context as _;
use runner_monitor::{
    attest::{Attestor, dsse},
    clock::monotonic_ns,
    engine::Engine,
    enrich::{Fingerprinter, PodNamer},
    event::JobInfo,
    job::{
        JobDirectory,
        control::{self, ControlMetrics},
        job_start_event,
    },
    output::{
        Outputs,
        alerts::{AlertWriter, WallClock},
        delivery::{Receiver, Sink, SinkOptions},
        http::{self, Endpoint},
        metrics::Metrics,
        nats::{NatsSink, NatsTarget},
        ocsf::AlertFormat,
        tls::{self, TlsFiles},
    },
    pipeline::{Host, Pipeline},
    policy::Policy,
    privilege,
    report::JobReports,
    sensor::{
        ProbeState, ProbeStatus, Sensor, SensorOptions,
        decode::Decoder,
        pins,
        reader::{self, ReaderCounters},
        ringfill::RingFill,
    },
    state::StateDir,
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
};

use super::{Agent, Inputs, RunArgs, SNAPSHOT_INTERVAL, attached, sensor_policy_of, sensor_status};

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

/// The probes that did not attach, logged; as `program on target` for a `sensor_status` event.
fn detached(probes: &[ProbeStatus]) -> Vec<String> {
    let mut out = Vec::new();
    for probe in probes {
        if let ProbeState::Failed(reason) = &probe.state {
            tracing::warn!(sensor = probe.sensor, program = %probe.program, target = %probe.target, %reason,
                "sensor degraded: probe not attached");
            out.push(format!("{} on {}", probe.program, probe.target));
        }
    }
    out
}

impl Agent {
    /// Everything before the first event: configuration errors first, before the probes take
    /// seconds to load; then the probes, the outputs, the state a previous agent left, the
    /// control socket and the ring buffer's reader.
    pub(super) async fn start(args: RunArgs) -> anyhow::Result<(Self, Inputs)> {
        require_capabilities(args.runner_user.is_some())?;
        let state = StateDir::open(&args.state_dir)?;
        if args.fresh_state {
            pins::remove(&args.pin_dir)?;
            state.discard()?;
            tracing::info!("--fresh-state: saved state and pinned kernel maps removed");
        }
        let policy = Arc::new(match &args.policy {
            Some(path) => Policy::load(path).context("refusing to start with an invalid policy")?,
            None => Policy::builtin(),
        });
        let mut host = Host {
            containers: Default::default(),
            fingerprints: match &args.fingerprint_key {
                Some(path) => Some(Fingerprinter::load(path)?),
                None => None,
            },
            attestor: match &args.attestation_key {
                Some(path) => {
                    let key = dsse::load_signing_key(path)?;
                    let dir = args.state_dir.join("attestations");
                    let attestor = Attestor::new(key, dir.clone(), Attestor::host_name())
                        .with_context(|| format!("creating {}", dir.display()))?;
                    tracing::info!(dir = %dir.display(), "signed job attestations on");
                    Some(attestor)
                }
                None => None,
            },
            identities: Default::default(),
            pods: PodNamer::new(
                (args.cri_socket != Path::new("none")).then(|| args.cri_socket.clone()),
            ),
        };
        Self::check_receivers(&args)?;
        let fleet = NatsTarget::resolve(args.nats.as_deref(), &policy.fleet, None)
            .map_err(|e| anyhow::anyhow!("--nats: {e}"))?;
        if fleet.is_some() && host.fingerprints.is_none() {
            tracing::warn!(
                "fleet stream without --fingerprint-key: findings are published, credential \
                 fingerprints are not (there are none)"
            );
        }
        let sensor_policy = sensor_policy_of(&policy, &args.job_root_exes);
        let options = SensorOptions {
            pin_dir: Some(args.pin_dir.clone()),
            hooks: args.hooks,
        };
        let mut sensor =
            Sensor::load_with(&sensor_policy, &options).context("starting the sensors")?;
        let detached = detached(sensor.probes());
        tracing::info!(attached = attached(sensor.probes()), total = sensor.probes().len(), job_roots = ?sensor_policy.job_root_executables, "probes attached");
        super::egress::announce(&policy, sensor.probes());
        let dns_upstream = super::egress::start_resolver(&policy, &mut sensor).await;

        let metrics = Arc::new(Metrics::new());
        metrics.probes(sensor.probes());
        metrics.credential_kinds(policy.credentials.iter().map(|c| c.kind.as_str()));
        let ready = Arc::new(AtomicBool::new(false));
        let reports = JobReports::shared(policy.clone());
        let endpoint = Endpoint {
            metrics: metrics.clone(),
            ready: ready.clone(),
            reports: Some(reports.clone()),
        };
        let bound = http::serve(args.listen, endpoint)
            .await
            .with_context(|| format!("listening on {} (--listen)", args.listen))?;
        tracing::info!(address = %bound, "serving /metrics, /healthz, /readyz, /jobs");

        // Containers running before the agent: a job's `docker exec` into one finds its cgroup.
        match sensor.learn_container_ids() {
            Ok(n) => tracing::info!(containers = n, "running containers learned"),
            Err(error) => {
                tracing::warn!(%error, "running containers not learned: a job's docker exec into one is not followed")
            }
        }
        // The workflow pods of runner pods (actions-runner-controller's kubernetes mode) join
        // their jobs through the kernel's map of job container cgroups.
        if let Some(mut cgroups) = sensor.container_cgroups_handle() {
            host.pods.link_containers(Box::new(move |cgroup, job| {
                cgroups.insert(cgroup, job.0, 0).map_err(|e| e.to_string())
            }));
        }
        // A job's `docker build` stays open while its connection lives.
        if let Some(slots) = sensor.build_slots() {
            host.containers.watch_builds(Box::new(slots));
        }
        // A job's start by name is resolved at its daemon while the start is under way.
        if let Some(mut maps) = sensor.name_start_maps() {
            host.containers
                .resolve_names(Box::new(move |id, job, asked| {
                    maps.register(id, job, asked)
                }));
        }
        let outputs = Self::outputs(&args, &metrics, fleet)?;
        let mut pipeline = Pipeline::new(policy, Some(host), outputs).with_reports(reports);
        Self::resume(&args, &state, &mut sensor, &mut pipeline)?;
        if !detached.is_empty() {
            pipeline.run([sensor_status(0, detached, Vec::new())])?;
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
            pipeline.jobs_mut().set_explicit(key, &info.id);
            pipeline.run([job_start_event(key, pid, info)])?;
        }
        let commands = Self::control_socket(&args, &metrics, pipeline.policy())?;

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
        let reader_counters = Arc::new(ReaderCounters::default());
        // Batches of up to `reader::BATCH` events: 8192 events in flight at most.
        let (tx, batches) = mpsc::channel(8192 / reader::BATCH);
        let (stop_reader, stop) = oneshot::channel();
        let reader = tokio::spawn(reader::run(
            ring,
            Decoder::new(),
            tx,
            reader_counters.clone(),
            stop,
            sensor.settings_handle(),
        ));
        let mut status_tick =
            tokio::time::interval(Duration::from_secs(args.status_interval.max(1)));
        status_tick.tick().await;
        let inputs = Inputs {
            batches,
            commands,
            stop_reader,
            reader,
            sigterm: signal(SignalKind::terminate())?,
            sighup: signal(SignalKind::hangup())?,
            sigusr2: signal(SignalKind::user_defined2())?,
            snapshot_tick: tokio::time::interval(SNAPSHOT_INTERVAL),
            status_tick,
            second: tokio::time::interval(Duration::from_secs(1)),
        };
        let agent = Self {
            args,
            sensor,
            pipeline,
            metrics,
            state,
            ready,
            reader_counters,
            ring_fill,
            lost_raised: 0,
            budget_reported: HashMap::new(),
            egress_seen: None,
            dns_upstream,
            dirty: false,
            names_unsaved: false,
            snapshot_write: None,
        };
        Ok((agent, inputs))
    }

    /// The receivers' URLs and TLS files, checked before the probes take seconds to load.
    fn check_receivers(args: &RunArgs) -> anyhow::Result<()> {
        let receivers = [
            args.alertmanager.clone().map(Receiver::Alertmanager),
            args.webhook.clone().map(Receiver::Webhook),
        ];
        let mut https = false;
        for receiver in receivers.into_iter().flatten() {
            receiver
                .validate()
                .map_err(|e| anyhow::anyhow!("--{}: {e}", receiver.name()))?;
            https |= receiver.url().starts_with("https://");
        }
        if https {
            tls::client_config(&tls_files(args)).context("TLS to the receivers")?;
        }
        Ok(())
    }

    /// The alert stream, the receivers behind it (spooled on disk) and the event trace.
    fn outputs(
        args: &RunArgs,
        metrics: &Arc<Metrics>,
        fleet: Option<NatsTarget>,
    ) -> anyhow::Result<Outputs> {
        let clock = WallClock::now(monotonic_ns());
        let alerts = AlertWriter::open(&args.alerts_out, Some(clock))
            .with_context(|| format!("opening {}", args.alerts_out.display()))?
            .with_format(args.alerts_format);
        let mut outputs = Outputs::new(alerts, args.events_out.as_deref())
            .context("opening the event output")?
            .with_metrics(metrics.clone());
        let tls = tls_files(args);
        let receivers = [
            args.alertmanager.clone().map(Receiver::Alertmanager),
            args.webhook.clone().map(Receiver::Webhook),
        ];
        for receiver in receivers.into_iter().flatten() {
            receiver
                .validate()
                .map_err(|e| anyhow::anyhow!("--{}: {e}", receiver.name()))?;
            let name = receiver.name();
            let options = SinkOptions {
                format: match receiver {
                    Receiver::Webhook(_) => args.webhook_format.unwrap_or(args.alerts_format),
                    Receiver::Alertmanager(_) => AlertFormat::Json,
                },
                tls: tls.clone(),
            };
            let sink = Sink::start_with(receiver, &options, &args.spool_dir, metrics.clone())
                .with_context(|| {
                    format!(
                        "starting the {name} sink (spool in {})",
                        args.spool_dir.display()
                    )
                })?;
            tracing::info!(
                sink = name,
                pending_bytes = sink.pending_bytes(),
                "alert delivery ready"
            );
            outputs = outputs.with_sink(sink);
        }
        if let Some(target) = fleet {
            let (url, stream, host) = (
                target.url.clone(),
                target.fleet.stream.clone(),
                target.host.clone(),
            );
            let sink =
                NatsSink::start(target, &args.spool_dir, metrics.clone()).with_context(|| {
                    format!("opening the nats spool in {}", args.spool_dir.display())
                })?;
            tracing::info!(sink = "nats", %url, %stream, %host, pending_bytes = sink.pending_bytes(), "fleet stream delivery ready");
            outputs = outputs.with_nats(sink);
        }
        Ok(outputs)
    }

    /// Takes over what a previous agent left: its saved tables, and the pinned kernel maps
    /// brought in line with what happened while no agent ran (exits, forks, job roots gone).
    fn resume(
        args: &RunArgs,
        state: &StateDir,
        sensor: &mut Sensor,
        pipeline: &mut Pipeline,
    ) -> anyhow::Result<()> {
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
            pipeline.restore(
                Engine::restore(pipeline.policy().clone(), saved.engine),
                JobDirectory::restore(saved.directory),
            );
            tracing::info!(
                jobs = pipeline.engine().active_jobs(),
                processes = pipeline.engine().tracked_processes(),
                age_s,
                "resumed from the saved state"
            );
        }
        if sensor.resumed() {
            let reconciled = sensor
                .reconcile()
                .context("reconciling the pinned kernel maps")?;
            tracing::info!(
                exited = reconciled.exited.len(),
                born = reconciled.adopted.len(),
                jobs_ended = reconciled.ended.len(),
                "resumed the pinned kernel maps; while the agent was down"
            );
            pipeline.run(reconciled.events(sensor))?;
        }
        Ok(())
    }

    /// Binds the control socket and serves it; its requests arrive on the returned channel.
    /// GitLab docker-executor jobs end when the runner removed their containers: Docker's
    /// events at the runner's socket arrive as `job_end` requests on the same channel.
    fn control_socket(
        args: &RunArgs,
        metrics: &Metrics,
        policy: &Policy,
    ) -> anyhow::Result<mpsc::Receiver<control::Command>> {
        let runner = match &args.runner_user {
            Some(name) => Some(
                control::user_ids(name)
                    .with_context(|| format!("no such user {name:?} (--runner-user)"))?,
            ),
            None => None,
        };
        let listener = control::bind(&args.control_socket, runner)?;
        let (command_tx, commands) = mpsc::channel(64);
        let docker_sockets = policy
            .secret_socket_paths
            .iter()
            .filter(|p| policy.secret_socket_of(p) == Some("docker"))
            .map(std::path::PathBuf::from)
            .filter(|p| p.exists())
            .collect();
        let gitlab = policy
            .job_identity
            .iter()
            .find(|i| i.platform == "gitlab")
            .cloned();
        runner_monitor::job::docker_events::watch(docker_sockets, gitlab, command_tx.clone());
        tokio::spawn(control::serve(
            listener,
            runner.map(|(uid, _)| uid),
            command_tx,
            ControlMetrics::register(metrics.registry()),
        ));
        tracing::info!(socket = %args.control_socket.display(), runner_user = ?args.runner_user, "control socket ready");
        Ok(commands)
    }
}

fn tls_files(args: &RunArgs) -> TlsFiles {
    TlsFiles {
        ca: args.tls_ca.clone(),
        cert: args.tls_cert.clone(),
        key: args.tls_key.clone(),
    }
}
