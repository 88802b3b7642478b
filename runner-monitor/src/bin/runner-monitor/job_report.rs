//! `runner-monitor report`: what one job did, from the running agent (control socket) or offline
//! from a recorded event trace replayed through the same pipeline with the report stage on.
//! Either way the report is a `runner_monitor::report::JobReport`, rendered here.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context as _, bail};
use runner_monitor::{
    event::Event,
    job::control::{self, Request},
    output::{Outputs, alerts::AlertWriter},
    pipeline::Pipeline,
    policy::Policy,
    report::{self, JobReport, JobReports},
};

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Format {
    /// For a terminal: the process tree drawn with box-drawing characters.
    Text,
    /// For a GitHub job summary (`>> $GITHUB_STEP_SUMMARY`) or a merge-request comment.
    Markdown,
    /// The report as one JSON object.
    Json,
}

#[derive(clap::Args)]
pub struct ReportArgs {
    /// The job: its CI id (`9001/build`, `CI_JOB_ID`, the id given to `job start`) or its key.
    /// With `--trace` it may be left out when the trace holds one job.
    #[arg(long, value_name = "ID")]
    job: Option<String>,
    /// Offline: replay this event trace (as written by `run --events-out`) instead of asking the
    /// running agent.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// With `--trace`: the policy to judge it by; without it, the built-in policy.
    #[arg(long, value_name = "FILE", requires = "trace")]
    policy: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    /// The running agent's control socket.
    #[arg(long, env = "RUNNER_MONITOR_SOCKET", default_value = control::DEFAULT_SOCKET)]
    socket: PathBuf,
}

pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    let report = match &args.trace {
        Some(trace) => offline(trace, args.policy.as_deref(), args.job.as_deref())?,
        None => {
            let Some(id) = &args.job else {
                bail!("--job ID is required to ask the running agent (or give --trace FILE)");
            };
            live(&args.socket, id)?
        }
    };
    let out = match args.format {
        Format::Text => report::text(&report),
        Format::Markdown => report::markdown(&report),
        Format::Json => format!("{}\n", serde_json::to_string_pretty(&report)?),
    };
    print!("{out}");
    Ok(())
}

fn live(socket: &Path, id: &str) -> anyhow::Result<JobReport> {
    let request = Request::JobReport { id: id.to_owned() };
    let response = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(control::send(socket, &request))
        .with_context(|| format!("talking to the agent at {}", socket.display()))?;
    match (response.ok, response.report) {
        (true, Some(report)) => {
            serde_json::from_value(report).context("the agent's report does not read back")
        }
        _ => bail!("{}", response.error.unwrap_or_default()),
    }
}

/// Replays `trace` as `runner-monitor replay` does (no host lookups; findings not written
/// anywhere) with the report stage on, and returns the report of job `id` (or of the only job).
fn offline(trace: &Path, policy: Option<&Path>, id: Option<&str>) -> anyhow::Result<JobReport> {
    let policy = Arc::new(match policy {
        Some(path) => Policy::load(path)?,
        None => Policy::builtin(),
    });
    let reports = JobReports::shared(policy.clone());
    let outputs = Outputs::new(
        AlertWriter::to_writer(Box::new(std::io::sink()), None),
        None,
    )?;
    let mut pipeline = Pipeline::new(policy, None, outputs).with_reports(reports.clone());
    let reader = std::io::BufReader::new(
        std::fs::File::open(trace).with_context(|| format!("opening {}", trace.display()))?,
    );
    let mut last = 0;
    for (n, line) in std::io::BufRead::lines(reader).enumerate() {
        let line = line.with_context(|| format!("reading {}", trace.display()))?;
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let event: Event = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not an event", trace.display(), n + 1))?;
        last = last.max(event.time_ns);
        pipeline.run([event])?;
    }
    pipeline.advance(last)?;
    let reports = report::lock(&reports);
    let jobs = reports.list();
    let id = match (id, jobs.as_slice()) {
        (Some(id), _) => id.to_owned(),
        (None, [only]) => only.job.id.clone(),
        (None, _) => bail!(
            "{} holds {} jobs; name one with --job: {}",
            trace.display(),
            jobs.len(),
            jobs.iter()
                .map(|j| format!("{:?}", j.job.id))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    reports
        .find(&id)
        .with_context(|| format!("no job {id:?} in {}", trace.display()))
}
