use std::{path::PathBuf, sync::Arc};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use runner_monitor::{
    event::{Event, JobInfo},
    job::control::{self, Request},
    output::{
        Outputs,
        alerts::AlertWriter,
        metrics::Metrics,
        nats::{NatsSink, NatsTarget},
        ocsf::AlertFormat,
    },
    pipeline::Pipeline,
    policy::{Policy, SensorPolicy},
    privilege,
    sensor::{
        ProbeState, Sensor, SensorError,
        check::{Support, probe_kernel},
    },
};

/// Events are decoded on the ring-buffer reader's thread and dropped on the pipeline's. glibc's
/// malloc sends most such cross-thread frees through an arena lock; mimalloc frees them into the
/// owning page's list. Measured (docs/performance.md): at 500k events/s, 656 against 860 ns of
/// agent CPU per event and p99 event-to-alert 6.8 against 22.9 ms. Its memory price is paid down
/// by the two options below.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (15 in its `mi_option_e`, v2 and v3 alike; libmimalloc-sys
/// does not name it). With v3's default delay of 1 s, memory freed at start-up (program loading)
/// stayed resident: 122 MB against glibc's 65 at idle. Purged at once: 67 MB.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// mimalloc v3's `mi_option_allow_thp` (43, default 1). With it, mimalloc asks for transparent
/// huge pages on its arenas, and a 2 MiB page is resident as soon as one byte of it is touched:
/// 36.9 MiB at idle and 1.0-1.2 KB per tracked process, against 21.4 MiB and 790 bytes without
/// (same run, docs/performance.md); the pipeline's cost per event did not move.
const MI_OPTION_ALLOW_THP: libmimalloc_sys::mi_option_t = 43;

/// An operator's own `MIMALLOC_PURGE_DELAY` or `MIMALLOC_ALLOW_THP` wins over these settings.
fn tune_the_allocator() {
    let unset = |name| std::env::var_os(name).is_none();
    if unset("MIMALLOC_PURGE_DELAY") {
        // SAFETY: sets one of mimalloc's integer options, before the agent starts any thread.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    }
    if unset("MIMALLOC_ALLOW_THP") {
        // SAFETY: as above.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ALLOW_THP, 0) };
        // mimalloc read the host's THP mode before main; where it is `always`, only the
        // process's own switch keeps huge pages off. Best effort: an old kernel keeps its default.
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
}

mod agent;
mod attest;
mod baseline;
mod fleet;
mod hooks;
mod job_report;
mod requests;

use agent::RunArgs;

#[derive(Parser)]
#[command(
    name = "runner-monitor",
    version,
    about = "eBPF runtime monitor for CI runner hosts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the probes and stream events (JSON lines).
    Run(Box<RunArgs>),
    /// Tell the running agent that a job starts or ends (for the runner's hooks).
    #[command(subcommand)]
    Job(JobCommand),
    /// Policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Run a recorded event trace (JSON lines, as written by `run --events-out`) through the
    /// engine and write the findings.
    Replay {
        /// The trace.
        events: PathBuf,
        /// Policy file; without it, the built-in policy.
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
        /// Where to write the findings; `-` is stdout.
        #[arg(long, value_name = "FILE", default_value = "-")]
        alerts_out: PathBuf,
        /// Our JSON findings, or OCSF 1.5.0 Detection Findings (their `time` is when replay
        /// wrote them: a trace has no wall clock).
        #[arg(long, value_name = "FORMAT", value_enum, default_value_t = AlertFormat::Json)]
        alerts_format: AlertFormat,
        /// Then print, per rule and repository, how many findings and of which severities.
        #[arg(long)]
        summary: bool,
        /// Also publish the findings and the trace's credential fingerprints to this NATS
        /// JetStream server (as `run --nats`), e.g. to feed the fleet correlator a recorded host.
        #[arg(long, value_name = "URL")]
        nats: Option<String>,
        /// The host name the replayed trace is published under (default: the policy's
        /// `[fleet] host`, else this host's name).
        #[arg(long, value_name = "NAME", requires = "nats")]
        host: Option<String>,
        /// Where messages wait for the NATS server (kept for the next run if it is down).
        #[arg(
            long,
            value_name = "DIR",
            default_value = "/var/lib/runner-monitor/replay-spool"
        )]
        spool_dir: PathBuf,
    },
    /// Point GitHub / GitLab runners at runner-monitor's hook scripts, or take them out.
    #[command(subcommand)]
    Hooks(hooks::HooksCommand),
    /// Learn per-repository baselines from recorded traces of normal jobs.
    #[command(subcommand)]
    Baseline(baseline::BaselineCommand),
    /// What one job did: its process tree, credentials, egress, survivors and findings, from the
    /// running agent or offline from a trace.
    Report(job_report::ReportArgs),
    /// Signed job attestations: make a key, verify an attestation.
    #[command(subcommand)]
    Attest(attest::AttestCommand),
    /// The fleet's correlator: consumes every agent's credential fingerprints from NATS
    /// JetStream and raises cross-job-credential-reuse across hosts.
    Fleet(fleet::FleetArgs),
    /// Probe what this kernel supports and print the sensor set the agent would use.
    Check {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The policy whose egress mode to show (default: the built-in one).
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
        /// Which hook sets to try, as `run --hooks`.
        #[arg(long, value_name = "SET", default_value = "auto")]
        hooks: runner_monitor::sensor::hook_sets::HookChoice,
    },
}

#[derive(Subcommand)]
enum JobCommand {
    /// A job starts: `--pid` is its root (its existing descendants join it), or any process
    /// already in the job, to name it.
    Start {
        #[arg(long)]
        id: String,
        #[arg(long)]
        pid: u32,
        #[arg(long)]
        repository: Option<String>,
        #[arg(long)]
        workflow: Option<String>,
        #[arg(long)]
        run: Option<String>,
        #[arg(long)]
        runner: Option<String>,
        /// github, gitlab, or anything else.
        #[arg(long, default_value = "manual")]
        platform: String,
        #[arg(long, env = "RUNNER_MONITOR_SOCKET", default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// A job ends: from now on its remaining processes are survivors.
    End {
        #[arg(long)]
        id: String,
        #[arg(long, env = "RUNNER_MONITOR_SOCKET", default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// The running agent's state: the egress mode in force, jobs in block mode, connections
    /// refused.
    Status {
        #[arg(long, env = "RUNNER_MONITOR_SOCKET", default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Check a policy file; errors name the file, line and field.
    Check { file: PathBuf },
    /// Print the built-in policy (a starting point for a policy file).
    Default,
}

fn main() -> std::process::ExitCode {
    tune_the_allocator();
    match run_cli() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // The whole chain on one line, without a backtrace: this is for the operator.
            eprintln!("runner-monitor: error: {}", one_line(&error));
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line; a cause the message before it already quotes (errors
/// that name their source in their own text) is not repeated.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn run_cli() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colours only for a terminal: journald and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Check {
            json,
            policy,
            hooks,
        } => check(json, policy.as_deref(), hooks),
        Command::Job(command) => job_command(command),
        Command::Hooks(command) => hooks::run(command),
        Command::Report(args) => job_report::run(args),
        Command::Attest(command) => attest::run(command),
        Command::Replay {
            events,
            policy,
            alerts_out,
            alerts_format,
            summary,
            nats,
            host,
            spool_dir,
        } => replay(
            &events,
            policy.as_deref(),
            &alerts_out,
            alerts_format,
            summary,
            nats.map(|url| (url, host, spool_dir)),
        ),
        Command::Baseline(command) => baseline::command(command),
        Command::Policy(PolicyCommand::Check { file }) => {
            let policy = Policy::load(&file)?;
            let blocking = policy.blocking_rules();
            let sni = policy.rules.iter().filter(|r| r.sni).count();
            println!(
                "{}: ok ({} credential kinds, {} secret socket kinds, {} egress allowances, {} rules; \
                 egress mode {}, {blocking} rules block, {sni} rules check TLS server names)",
                file.display(),
                policy.credentials.len(),
                policy.secret_socket_kinds.len(),
                policy.egress_allow.len(),
                policy.rules.len(),
                policy.egress.mode.as_str(),
            );
            Ok(())
        }
        Command::Policy(PolicyCommand::Default) => {
            print!("{}", runner_monitor::policy::DEFAULT_POLICY);
            Ok(())
        }
        Command::Fleet(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the async runtime")?
            .block_on(fleet::run(args)),
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the async runtime")?
            .block_on(agent::run(*args)),
    }
}

fn check(
    json: bool,
    policy: Option<&std::path::Path>,
    hooks: runner_monitor::sensor::hook_sets::HookChoice,
) -> anyhow::Result<()> {
    let policy = match policy {
        Some(path) => Policy::load(path)?,
        None => Policy::builtin(),
    };
    // Report, not refuse: the table below shows what loads with what the agent has.
    let capabilities = privilege::assess(&privilege::effective()?, &privilege::Setup::here(false));
    let features = probe_kernel();
    // The real test: load and attach the agent's own programs, then detach them.
    let sensor = Sensor::load_with(
        &SensorPolicy::default(),
        &runner_monitor::sensor::SensorOptions {
            hooks,
            ..Default::default()
        },
    );
    let probes = match &sensor {
        Ok(s) => s.probes().to_vec(),
        Err(_) => Vec::new(),
    };
    let hook_sets: Vec<runner_monitor::sensor::hook_sets::FamilyHooks> = sensor
        .as_ref()
        .map(|s| s.hook_sets().to_vec())
        .unwrap_or_default();
    let kernel_opens = sensor.as_ref().is_ok_and(|s| {
        s.file_open_hooks().set != runner_monitor::sensor::hook_sets::HookSet::Tracepoint
    });
    let io_uring = runner_monitor::sensor::io_uring::coverage(&probes, kernel_opens);
    let missing_capabilities: Vec<String> = capabilities
        .missing
        .iter()
        .chain(&capabilities.degraded)
        .map(|r| r.capability.to_string())
        .collect();
    if json {
        let missing_enforcement =
            runner_monitor::sensor::egress::missing_enforcement(&probes, &policy);
        let out = serde_json::json!({
            "features": features,
            "probes": probes,
            "hook_sets": hook_sets.iter().map(|h| (h.family.key(), h))
                .collect::<std::collections::BTreeMap<_, _>>(),
            "io_uring": io_uring.iter().map(|(what, how)| (*what, how.as_str()))
                .collect::<std::collections::BTreeMap<_, _>>(),
            "egress": {
                "mode": policy.egress.mode.as_str(),
                "blocking_rules": policy.blocking_rules(),
                "block_mode_enforceable": sensor.is_ok() && missing_enforcement.is_empty(),
            },
            "missing_capabilities": missing_capabilities,
            "error": sensor.as_ref().err().map(|e| e.to_string()),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("capabilities");
        for r in privilege::REQUIREMENTS {
            let state = if capabilities
                .missing
                .iter()
                .any(|m| m.capability == r.capability)
            {
                "MISSING"
            } else if capabilities
                .degraded
                .iter()
                .any(|m| m.capability == r.capability)
            {
                "missing (optional)"
            } else {
                "ok"
            };
            println!("  {:<20} {state}", r.capability.to_string());
        }
        println!("kernel features");
        for f in &features {
            let mark = match f.support {
                Support::Yes => "yes",
                Support::No => "no",
                Support::Refused => "refused",
            };
            let req = if f.required { " (required)" } else { "" };
            println!("  {:<18} {:<8} {}{}", f.name, mark, f.detail, req);
        }
        println!("sensor set");
        for p in &probes {
            let (mark, reason) = match &p.state {
                ProbeState::Attached => ("attached", String::new()),
                ProbeState::Absent(r) => ("absent", format!(" ({r})")),
                ProbeState::Failed(r) => ("FAILED", format!(" ({r})")),
            };
            println!(
                "  {:<18} {:<28} {:<38} {mark}{reason}",
                p.sensor, p.program, p.target
            );
        }
        println!("hook sets (docs/sensors.md, \"Hook sets\")");
        for h in &hook_sets {
            println!("  {:<18} {}", h.family.label(), h.describe());
        }
        println!("io_uring coverage (docs/sensors.md, \"io_uring\")");
        for (what, how) in &io_uring {
            println!("  {what:<40} {how}");
        }
        let missing = runner_monitor::sensor::egress::missing_enforcement(&probes, &policy);
        println!("egress");
        println!(
            "  mode {}, {} rules block; block mode {}",
            policy.egress.mode.as_str(),
            policy.blocking_rules(),
            if sensor.is_ok() && missing.is_empty() {
                "enforceable (cgroup sock_addr programs attach)".to_owned()
            } else {
                format!("NOT enforceable: {} not attached", missing.join(", "))
            }
        );
    }
    let missing: Vec<&str> = features
        .iter()
        .filter(|f| f.required && f.support != Support::Yes)
        .map(|f| f.name)
        .collect();
    if !missing.is_empty() {
        bail!("required kernel features missing: {}", missing.join(", "));
    }
    if !capabilities.missing.is_empty() {
        bail!(privilege::PrivilegeError::Missing(capabilities.missing));
    }
    match sensor {
        Err(e @ SensorError::NoKernelPrograms) => bail!(e),
        Err(e) => bail!("the agent's probes do not load on this kernel: {e}"),
        Ok(_) => {}
    }
    let unenforced = runner_monitor::sensor::egress::missing_enforcement(&probes, &policy);
    if policy.wants_block() && !unenforced.is_empty() {
        bail!(
            "egress block mode is configured but {} not attached: connections would be reported, \
             not refused",
            unenforced.join(", ")
        );
    }
    Ok(())
}

fn job_command(command: JobCommand) -> anyhow::Result<()> {
    let (socket, request) = match command {
        JobCommand::Start {
            id,
            pid,
            repository,
            workflow,
            run,
            runner,
            platform,
            socket,
        } => (
            socket,
            Request::JobStart {
                pid,
                info: Box::new(JobInfo {
                    id,
                    platform: Some(platform),
                    repository,
                    workflow,
                    run,
                    runner,
                    ..JobInfo::default()
                }),
            },
        ),
        JobCommand::End { id, socket } => (socket, Request::JobEnd { id }),
        JobCommand::Status { socket } => (socket, Request::Status),
    };
    let response = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(control::send(&socket, &request))
        .with_context(|| format!("talking to the agent at {}", socket.display()))?;
    println!("{}", runner_monitor::output::jsonl::line_string(&response)?);
    if !response.ok {
        bail!("{}", response.error.unwrap_or_default());
    }
    Ok(())
}

/// How long `replay --nats` waits for the server to take what it published.
const REPLAY_DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Replays a recorded event trace through the pipeline the live agent runs, without what only
/// the live agent reads from the host (no /proc, no fingerprint key: the trace has what they
/// found).
fn replay(
    file: &std::path::Path,
    policy: Option<&std::path::Path>,
    alerts_out: &std::path::Path,
    format: AlertFormat,
    summary: bool,
    nats: Option<(String, Option<String>, PathBuf)>,
) -> anyhow::Result<()> {
    let policy = Arc::new(match policy {
        Some(path) => Policy::load(path)?,
        None => Policy::builtin(),
    });
    let alerts = AlertWriter::open(alerts_out, None)
        .with_context(|| format!("opening {}", alerts_out.display()))?
        .with_format(format);
    let mut outputs = Outputs::new(alerts, None)?;
    // The fleet sink's task runs on this runtime while the trace is replayed.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    if let Some((url, host, spool_dir)) = &nats {
        let target = NatsTarget::resolve(Some(url), &policy.fleet, host.as_deref())
            .map_err(|e| anyhow::anyhow!("--nats: {e}"))?
            .expect("a URL was given");
        let _guard = runtime.enter();
        let sink = NatsSink::start(target, spool_dir, Arc::new(Metrics::new()))
            .with_context(|| format!("opening the nats spool in {}", spool_dir.display()))?;
        outputs = outputs.with_nats(sink);
    }
    let mut pipeline = Pipeline::new(policy, None, outputs);
    let reader = std::io::BufReader::new(
        std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?,
    );
    let mut last = 0;
    let mut findings = 0;
    let mut table = runner_monitor::output::summary::FindingSummary::default();
    for (n, line) in std::io::BufRead::lines(reader).enumerate() {
        let line = line.with_context(|| format!("reading {}", file.display()))?;
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let event: Event = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not an event", file.display(), n + 1))?;
        last = last.max(event.time_ns);
        let found = pipeline.run([event])?;
        findings += found.len();
        table.add(&found);
    }
    let found = pipeline.advance(last)?;
    findings += found.len();
    table.add(&found);
    pipeline.flush()?;
    if nats.is_some() {
        let deadline = tokio::time::Instant::now() + REPLAY_DRAIN_TIMEOUT;
        let left: u64 = runtime
            .block_on(pipeline.drain_sinks(deadline))
            .iter()
            .map(|(_, pending)| pending)
            .sum();
        if left > 0 {
            bail!(
                "the NATS server did not take every message within {REPLAY_DRAIN_TIMEOUT:?}: \
                 {left} bytes stay spooled for the next replay with this --spool-dir"
            );
        }
    }
    tracing::info!(findings, stats = ?pipeline.stats(), "replay done");
    if summary {
        print!("{}", table.table());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allocator_options_set_are_the_ones_meant() {
        // Option 15 must be mimalloc's purge delay (default 1000 ms in v3) and 43 its
        // allow_thp (default 1): a renumbering in a new mimalloc would set other options.
        // SAFETY: reads mimalloc's integer options.
        let get = |option| unsafe { libmimalloc_sys::mi_option_get(option) };
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some()
            || std::env::var_os("MIMALLOC_ALLOW_THP").is_some()
        {
            return;
        }
        assert_eq!(get(MI_OPTION_PURGE_DELAY), 1000);
        assert_eq!(get(MI_OPTION_ALLOW_THP), 1);
        tune_the_allocator();
        assert_eq!(get(MI_OPTION_PURGE_DELAY), 0);
        assert_eq!(get(MI_OPTION_ALLOW_THP), 0);
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(status.contains("THP_enabled:\t0"), "{status}");
    }
}
