//! `runner-monitor fleet`: the fleet's correlator. Two JetStream consumers on the fleet stream's
//! `<prefix>.fingerprints.>`:
//!
//! - the view: an ordered consumer of this instance alone, from `--ledger-ttl` ago, that feeds
//!   every materialisation (and every key id) to the ledger, so every instance has the whole
//!   fleet's ledger and a restarted one rebuilds it from the stream;
//! - the work: the durable consumer `--consumer` that all instances share, so each read is
//!   judged by one of them. A read is judged once the view has reached it (its stream sequence),
//!   so the materialisations before it are in the ledger; its finding is published to
//!   `<prefix>.findings.fleet` (with a `Nats-Msg-Id`, and the publish acknowledged) and written to
//!   the alert stream and the receivers' spools before the read is acknowledged.
//!
//! The ledger itself (`runner_monitor::fleet::ledger`) is pure.

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};
use async_nats::jetstream::{
    self, AckKind,
    consumer::{AckPolicy, DeliverPolicy, pull},
    stream,
};
use futures_util::StreamExt as _;
use runner_monitor::{
    fleet::{
        ledger::{Ledger, LedgerConfig, Outcome, Raised},
        message::{CORRELATOR_HOST, DEFAULT_PREFIX, DEFAULT_STREAM, FingerprintMessage},
        metrics::FleetMetrics,
    },
    output::{
        Outputs,
        alerts::{Alert, WallClock},
        delivery::{Receiver, Sink},
        http::{self, Endpoint},
        jsonl,
        metrics::Metrics,
    },
};
use tokio::{signal::unix::SignalKind, sync::watch};

mod connect;

#[derive(clap::Args)]
pub struct FleetArgs {
    /// The NATS server: `nats://HOST:PORT`, or `tls://HOST:PORT` for TLS.
    #[arg(long, value_name = "URL", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// The JetStream stream the agents publish to (created with subjects `<prefix>.>` if absent).
    #[arg(long, value_name = "NAME", default_value = DEFAULT_STREAM)]
    stream: String,
    #[arg(long, value_name = "PREFIX", default_value = DEFAULT_PREFIX)]
    subject_prefix: String,
    /// The durable consumer; every correlator instance with the same name shares the work.
    #[arg(long, value_name = "NAME", default_value = "runner-monitor-fleet")]
    consumer: String,
    /// NATS credentials file (`.creds`: JWT and NKey seed).
    #[arg(long, value_name = "FILE")]
    creds: Option<PathBuf>,
    /// CA certificate(s) (PEM) that sign the server's certificate, for `tls://`.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), with --tls-key, when the server asks for one.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Where to write the findings, one JSON object per line; `-` is stdout.
    #[arg(long, value_name = "FILE", default_value = "-")]
    alerts_out: PathBuf,
    /// Deliver findings to this Alertmanager (base URL, v2 API), spooled while it is down.
    #[arg(long, value_name = "URL")]
    alertmanager: Option<String>,
    /// Deliver findings as JSON arrays POSTed to this URL, spooled while it is down.
    #[arg(long, value_name = "URL")]
    webhook: Option<String>,
    /// Where undelivered findings wait, per receiver.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/lib/runner-monitor/fleet-spool"
    )]
    spool_dir: PathBuf,
    /// Address of the HTTP endpoint (/metrics, /healthz, /readyz).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9478")]
    listen: std::net::SocketAddr,
    /// Fingerprints the ledger keeps at most (the oldest go first).
    #[arg(long, value_name = "N", default_value_t = 1_000_000)]
    ledger_max: usize,
    /// How long the ledger remembers a materialised credential (`12h`, `7d`, ...).
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = humantime::parse_duration)]
    ledger_ttl: Duration,
    /// How long fingerprints made with an old key id still count after a newer key id is first
    /// seen (the time the fleet takes to roll out a new key file).
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = humantime::parse_duration)]
    key_grace: Duration,
    /// Messages pulled at a time; smaller spreads a trickle of messages over more instances.
    #[arg(long, value_name = "N", default_value_t = 64)]
    fetch_batch: usize,
}

/// How far this instance's view of the stream has been applied to the ledger.
#[derive(Clone, Copy, Debug)]
struct ViewPosition {
    /// Stream sequence of the last fingerprint message applied.
    applied: u64,
    /// The first stream sequence the view covers: reads before it are judged without waiting.
    first: Option<u64>,
}

impl ViewPosition {
    fn covers(&self, sequence: u64) -> bool {
        self.applied >= sequence || self.first.is_some_and(|f| f > sequence)
    }
}

fn unix_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// How long a failed finding's read waits before JetStream redelivers it.
const RETRY: Duration = Duration::from_secs(2);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn run(args: FleetArgs) -> anyhow::Result<()> {
    let receivers: Vec<Receiver> = [
        args.alertmanager.clone().map(Receiver::Alertmanager),
        args.webhook.clone().map(Receiver::Webhook),
    ]
    .into_iter()
    .flatten()
    .collect();
    for r in &receivers {
        r.validate()
            .map_err(|e| anyhow::anyhow!("--{}: {e}", r.name()))?;
    }
    if args.ledger_max == 0 {
        bail!("--ledger-max must be at least 1");
    }
    let client = connect::connect(&args).await?;
    let js = jetstream::new(client);
    let mut stream = js
        .get_or_create_stream(stream::Config {
            name: args.stream.clone(),
            subjects: vec![format!("{}.>", args.subject_prefix)],
            ..Default::default()
        })
        .await
        .with_context(|| format!("opening the stream {} (--stream)", args.stream))?;

    let metrics = Arc::new(Metrics::new());
    let fleet = Arc::new(FleetMetrics::register(metrics.registry()));
    let ready = Arc::new(AtomicBool::new(false));
    let bound = http::serve(
        args.listen,
        Endpoint {
            metrics: metrics.clone(),
            ready: ready.clone(),
            reports: None,
        },
    )
    .await
    .with_context(|| format!("listening on {} (--listen)", args.listen))?;
    tracing::info!(address = %bound, "serving /metrics, /healthz, /readyz");

    let mut outputs = Outputs::to_file(&args.alerts_out, Some(WallClock::unix()), None)
        .with_context(|| format!("opening {} (--alerts-out)", args.alerts_out.display()))?;
    for receiver in receivers {
        outputs = outputs.with_sink(
            Sink::start(receiver, &args.spool_dir, metrics.clone())
                .with_context(|| format!("opening the spool in {}", args.spool_dir.display()))?,
        );
    }

    let ledger = Arc::new(Mutex::new(Ledger::new(LedgerConfig {
        max_entries: args.ledger_max,
        ttl_ns: args.ledger_ttl.as_nanos() as u64,
        key_grace_ns: args.key_grace.as_nanos() as u64,
    })));
    let filter = format!("{}.fingerprints.>", args.subject_prefix);
    let view = start_view(&mut stream, &filter, &args, ledger.clone(), fleet.clone()).await?;

    let work = stream
        .get_or_create_consumer(
            &args.consumer,
            pull::Config {
                durable_name: Some(args.consumer.clone()),
                filter_subject: filter,
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                ..Default::default()
            },
        )
        .await
        .with_context(|| {
            format!(
                "opening the durable consumer {} (--consumer)",
                args.consumer
            )
        })?;
    let mut messages = work
        .stream()
        .max_messages_per_batch(args.fetch_batch.max(1))
        .messages()
        .await
        .context("pulling from the durable consumer")?;
    ready.store(true, Ordering::Relaxed);
    tracing::info!(stream = %args.stream, consumer = %args.consumer, "correlating");

    let mut correlator = Correlator {
        js,
        findings_subject: format!("{}.findings.{CORRELATOR_HOST}", args.subject_prefix),
        ledger: ledger.clone(),
        fleet: fleet.clone(),
        outputs,
        view,
    };
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut second = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            message = messages.next() => match message {
                Some(Ok(message)) => correlator.read(message).await?,
                Some(Err(error)) => {
                    fleet.error("stream");
                    tracing::warn!(%error, "pulling from the durable consumer");
                }
                None => bail!("the durable consumer's message stream ended"),
            },
            _ = second.tick() => {
                let mut l = ledger.lock().expect("ledger lock");
                l.expire(unix_now_ns());
                fleet.ledger(&l);
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    for (sink, pending) in correlator
        .outputs
        .drain_sinks(tokio::time::Instant::now() + DRAIN_TIMEOUT)
        .await
    {
        if pending > 0 {
            tracing::warn!(
                sink,
                pending_bytes = pending,
                "findings stay spooled for the next start"
            );
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// The view: every fingerprint message from `--ledger-ttl` ago on, into the ledger.
async fn start_view(
    stream: &mut jetstream::stream::Stream,
    filter: &str,
    args: &FleetArgs,
    ledger: Arc<Mutex<Ledger>>,
    fleet: Arc<FleetMetrics>,
) -> anyhow::Result<watch::Receiver<ViewPosition>> {
    // The stream's end before the view starts: if the view has nothing to replay, everything
    // up to here is older than the ledger's horizon.
    let last = stream.info().await?.state.last_sequence;
    let start = SystemTime::now() - args.ledger_ttl;
    let start_time = time::OffsetDateTime::from_unix_timestamp_nanos(
        start
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128),
    )
    .context("--ledger-ttl reaches before 1970")?;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: filter.to_owned(),
            deliver_policy: DeliverPolicy::ByStartTime { start_time },
            ..Default::default()
        })
        .await
        .context("creating the ledger's view of the stream")?;
    let replay = consumer.cached_info().num_pending;
    let (position, view) = watch::channel(ViewPosition {
        applied: 0,
        first: (replay == 0).then_some(last + 1),
    });
    tracing::info!(
        replay,
        "rebuilding the ledger from the stream's fingerprints"
    );
    let mut messages = consumer.messages().await?;
    tokio::spawn(async move {
        while let Some(message) = messages.next().await {
            let message = match message {
                Ok(m) => m,
                Err(error) => {
                    fleet.error("stream");
                    tracing::warn!(%error, "the ledger's view of the stream");
                    continue;
                }
            };
            let Ok(sequence) = message.info().map(|i| i.stream_sequence) else {
                continue;
            };
            // Not a fingerprint message: counted once, by the instance the work consumer gives
            // it to.
            if let Ok(m) = serde_json::from_slice::<FingerprintMessage>(&message.payload) {
                ledger.lock().expect("ledger lock").learn(&m, unix_now_ns());
            }
            position.send_modify(|p| {
                p.applied = sequence;
                p.first.get_or_insert(sequence);
            });
        }
        tracing::error!("the ledger's view of the stream ended");
    });
    Ok(view)
}

struct Correlator {
    js: jetstream::Context,
    findings_subject: String,
    ledger: Arc<Mutex<Ledger>>,
    fleet: Arc<FleetMetrics>,
    outputs: Outputs,
    view: watch::Receiver<ViewPosition>,
}

impl Correlator {
    /// One message of the shared consumer: judged, its finding made durable, then acknowledged.
    async fn read(&mut self, message: jetstream::Message) -> anyhow::Result<()> {
        let sequence = match message.info() {
            Ok(info) => info.stream_sequence,
            Err(error) => {
                self.fleet.error("decode");
                tracing::warn!(%error, "message without JetStream metadata");
                return Ok(());
            }
        };
        self.view
            .wait_for(|p| p.covers(sequence))
            .await
            .context("the ledger's view of the stream stopped")?;
        let m = match serde_json::from_slice::<FingerprintMessage>(&message.payload) {
            Ok(m) => m,
            Err(error) => {
                self.fleet.error("decode");
                self.fleet.message(Outcome::Invalid);
                tracing::warn!(%error, subject = %message.subject, sequence, "not a fingerprint message: dropped");
                self.ack(&message, AckKind::Term).await;
                return Ok(());
            }
        };
        let (outcome, raised) = self
            .ledger
            .lock()
            .expect("ledger lock")
            .judge(&m, unix_now_ns());
        if let Some(raised) = raised {
            if let Err(error) = self.deliver(&raised).await {
                tracing::warn!(error = format!("{error:#}"), sequence, retry_in = ?RETRY, "finding not delivered; the read is retried");
                self.ack(&message, AckKind::Nak(Some(RETRY))).await;
                return Ok(());
            }
            self.ledger.lock().expect("ledger lock").commit(&raised);
            self.fleet.finding(raised.finding.severity);
        }
        self.fleet.message(outcome);
        self.ack(&message, AckKind::Ack).await;
        Ok(())
    }

    /// The finding to the stream (publish acknowledged) and to the alert stream and spools.
    async fn deliver(&mut self, raised: &Raised) -> anyhow::Result<()> {
        let line = jsonl::line(&Alert {
            time: Some(WallClock::unix().format(raised.finding.time_ns)),
            finding: &raised.finding,
        })?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", raised.message_id.as_str());
        let published = async {
            self.js
                .publish_with_headers(self.findings_subject.clone(), headers, line.into())
                .await?
                .await
        }
        .await;
        if let Err(error) = published {
            self.fleet.error("publish");
            bail!("publishing to {}: {error}", self.findings_subject);
        }
        if let Err(error) = self
            .outputs
            .findings(std::slice::from_ref(&raised.finding), None)
        {
            self.fleet.error("output");
            bail!("writing the finding: {error}");
        }
        Ok(())
    }

    /// Acknowledged and confirmed by the server (a restart must not see it again).
    async fn ack(&self, message: &jetstream::Message, kind: AckKind) {
        let result = match kind {
            AckKind::Ack => message.double_ack().await,
            other => message.ack_with(other).await,
        };
        if let Err(error) = result {
            self.fleet.error("ack");
            tracing::warn!(%error, "acknowledging a message; it will be redelivered");
        }
    }
}
