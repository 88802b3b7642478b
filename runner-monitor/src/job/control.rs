//! The control socket: `runner-monitor job start|end` from the runner's hooks, and
//! `runner-monitor report --job ID` (a job's report, read-only).
//!
//! One JSON request per connection, one JSON response. Only root and the configured runner user
//! are admitted (peer credentials); requests are bounded in size and time; a process inside a
//! job may only speak for its own job.

use std::{os::unix::fs::PermissionsExt, path::Path, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

use prometheus::{IntCounterVec, Opts, Registry};

use crate::event::JobInfo;

/// Default path of the control socket.
pub const DEFAULT_SOCKET: &str = "/run/runner-monitor/control.sock";
/// Largest request accepted.
pub const MAX_REQUEST: usize = 16 * 1024;
/// Largest answer a client reads (a job's report is bounded well below it).
pub const MAX_ANSWER: usize = 8 * 1024 * 1024;
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Start a job rooted at `pid` (with all its descendants), or name the job `pid` is in.
    JobStart {
        pid: u32,
        #[serde(flatten)]
        info: Box<JobInfo>,
    },
    JobEnd {
        id: String,
    },
    /// The report of the job with this id (or key): what it did so far.
    JobReport {
        id: String,
    },
    /// The agent's state: the egress mode in force and what block mode enforces.
    Status,
    /// From the agent itself, never from the socket (no peer can send it): GitLab Runner
    /// created container `container` (64 hex digits) for the job `info` names, at `created_ns`
    /// (CLOCK_MONOTONIC). Docker's events at the runner's socket (`docker_events.rs`).
    /// `named_by_environment`: the container's `CI_*` variables named the job, not only the
    /// runner's labels.
    #[serde(skip)]
    ContainerJob {
        container: String,
        created_ns: u64,
        info: Box<JobInfo>,
        named_by_environment: bool,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The job's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// For `job_report`: the report (`runner_monitor::report::JobReport` as JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<serde_json::Value>,
    /// For `status`: the agent's state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

impl Response {
    pub fn ok(job: String) -> Self {
        Self {
            ok: true,
            error: None,
            job: Some(job),
            report: None,
            status: None,
        }
    }

    pub fn error(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(message.into()),
            job: None,
            report: None,
            status: None,
        }
    }
}

/// Who is asking, from the socket's peer credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub pid: u32,
}

impl Request {
    /// The request's name, a label of `runner_monitor_control_requests_total`.
    pub fn name(&self) -> &'static str {
        match self {
            Request::JobStart { .. } => "job_start",
            Request::JobEnd { .. } => "job_end",
            Request::JobReport { .. } => "job_report",
            Request::Status => "status",
            Request::ContainerJob { .. } => "container_job",
        }
    }
}

/// Every request name a peer can send, and `unknown` for what was refused before it was read or
/// parsed (`container_job` is the agent's own and never counted).
pub const REQUEST_NAMES: [&str; 5] = ["job_start", "job_end", "job_report", "status", "unknown"];

/// How a control request ended: the `result` label of `runner_monitor_control_requests_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Refused on its merits (no such job, no such process, no id).
    Rejected,
    /// A request that was already carried out: the same job started twice, a job ended twice.
    Replayed,
    /// A process inside one job speaking for another.
    CrossJob,
    /// Neither root nor the runner user.
    ForbiddenPeer,
    Malformed,
    Oversized,
    Timeout,
}

impl Outcome {
    pub const ALL: [Outcome; 8] = [
        Outcome::Ok,
        Outcome::Rejected,
        Outcome::Replayed,
        Outcome::CrossJob,
        Outcome::ForbiddenPeer,
        Outcome::Malformed,
        Outcome::Oversized,
        Outcome::Timeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Rejected => "rejected",
            Outcome::Replayed => "replayed",
            Outcome::CrossJob => "cross_job",
            Outcome::ForbiddenPeer => "forbidden_peer",
            Outcome::Malformed => "malformed",
            Outcome::Oversized => "oversized",
            Outcome::Timeout => "timeout",
        }
    }

    /// The outcomes a parsed request can have (the others happen before parsing).
    pub fn of_parsed_request(self) -> bool {
        matches!(
            self,
            Outcome::Ok | Outcome::Rejected | Outcome::Replayed | Outcome::CrossJob
        )
    }
}

/// The agent's answer to a request, and how the request ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub response: Response,
    pub outcome: Outcome,
}

impl Reply {
    pub fn ok(job: String) -> Self {
        Self {
            response: Response::ok(job),
            outcome: Outcome::Ok,
        }
    }

    /// A job's report, for `job_report`.
    pub fn report(job: String, report: serde_json::Value) -> Self {
        let mut response = Response::ok(job);
        response.report = Some(report);
        Self {
            response,
            outcome: Outcome::Ok,
        }
    }

    /// The agent's state, for `status`.
    pub fn status(status: serde_json::Value) -> Self {
        let mut response = Response::ok(String::new());
        response.job = None;
        response.status = Some(status);
        Self {
            response,
            outcome: Outcome::Ok,
        }
    }

    pub fn refused(outcome: Outcome, message: impl Into<String>) -> Self {
        Self {
            response: Response::error(message),
            outcome,
        }
    }
}

/// A request admitted by the socket, for the agent's main loop to carry out.
pub struct Command {
    pub peer: Peer,
    pub request: Request,
    pub reply: oneshot::Sender<Reply>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the socket: mode 0600, or 0660 with the runner user's group when one is allowed.
pub fn bind(path: &Path, runner: Option<(u32, u32)>) -> Result<UnixListener, ControlError> {
    let io = |source| ControlError::Io {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    // A stale socket from a previous run.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    let mode = if let Some((_, gid)) = runner {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(io)?;
        0o660
    } else {
        0o600
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    Ok(listener)
}

/// The control socket's own metric, `runner_monitor_control_requests_total{request,result}`,
/// registered into the agent's registry: every request counted by how it ended.
#[derive(Clone)]
pub struct ControlMetrics(IntCounterVec);

impl ControlMetrics {
    /// Registers the metric with every (request, result) series that can occur, at zero.
    pub fn register(registry: &Registry) -> Self {
        let requests = IntCounterVec::new(
            Opts::new(
                "runner_monitor_control_requests_total",
                "Control-socket requests, by request and result (ok, rejected, replayed, \
                 cross_job, forbidden_peer, malformed, oversized, timeout).",
            ),
            &["request", "result"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(requests.clone()))
            .expect("unique metric names");
        for outcome in Outcome::ALL {
            // A request that was not read or parsed has no name.
            for request in REQUEST_NAMES
                .into_iter()
                .filter(|r| (*r == "unknown") != outcome.of_parsed_request())
            {
                requests.with_label_values(&[request, outcome.as_str()]);
            }
        }
        Self(requests)
    }

    fn count(&self, request: &str, outcome: Outcome) {
        self.0.with_label_values(&[request, outcome.as_str()]).inc();
    }
}

/// Accepts connections until the receiver of `commands` is gone; counts every request by
/// outcome in `metrics`.
pub async fn serve(
    listener: UnixListener,
    runner_uid: Option<u32>,
    commands: mpsc::Sender<Command>,
    metrics: ControlMetrics,
) {
    serve_with_timeout(listener, runner_uid, commands, metrics, TIMEOUT).await
}

async fn serve_with_timeout(
    listener: UnixListener,
    runner_uid: Option<u32>,
    commands: mpsc::Sender<Command>,
    metrics: ControlMetrics,
    timeout: Duration,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let commands = commands.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(error) = connection(stream, runner_uid, commands, &metrics, timeout).await {
                tracing::warn!(%error, "control connection failed");
            }
        });
    }
}

/// Parses one request as read from the socket (the line, newline included, at most
/// `MAX_REQUEST + 1` bytes). The error is the message the client gets back. Public so that the
/// fuzz target `control` drives exactly what the socket runs on a peer's bytes.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    if line.len() > MAX_REQUEST {
        return Err(format!("request larger than {MAX_REQUEST} bytes"));
    }
    // serde's messages quote the offending name or value as given ("unknown variant `…`"):
    // escaped, so the peer's control characters reach neither its terminal nor the log raw.
    serde_json::from_slice(line)
        .map_err(|e| format!("malformed request: {}", e.to_string().escape_debug()))
}

async fn respond(stream: &mut UnixStream, response: &Response) -> std::io::Result<()> {
    let mut line = crate::jsonl::line(response).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line).await
}

/// Only root and the runner user may speak to the agent.
fn admitted(uid: u32, runner_uid: Option<u32>) -> bool {
    uid == 0 || Some(uid) == runner_uid
}

async fn connection(
    mut stream: UnixStream,
    runner_uid: Option<u32>,
    commands: mpsc::Sender<Command>,
    metrics: &ControlMetrics,
    timeout: Duration,
) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    let peer = Peer {
        uid: cred.uid(),
        pid: cred.pid().unwrap_or(0) as u32,
    };
    let (request, reply) = if admitted(peer.uid, runner_uid) {
        read_and_carry_out(&mut stream, peer, &commands, timeout).await
    } else {
        (
            "unknown",
            Reply::refused(
                Outcome::ForbiddenPeer,
                "not allowed: only root and the runner user",
            ),
        )
    };
    metrics.count(request, reply.outcome);
    if !reply.response.ok {
        tracing::warn!(uid = peer.uid, pid = peer.pid, request, result = reply.outcome.as_str(),
            error = ?reply.response.error, "control request rejected");
    }
    respond(&mut stream, &reply.response).await
}

/// Reads one request (bounded in size and time) and has the main loop carry it out. Returns
/// the request's name (`unknown` when it was not read) and the reply.
async fn read_and_carry_out(
    stream: &mut UnixStream,
    peer: Peer,
    commands: &mpsc::Sender<Command>,
    timeout: Duration,
) -> (&'static str, Reply) {
    let mut line = Vec::new();
    let read = {
        let mut reader = BufReader::new(&mut *stream).take(MAX_REQUEST as u64 + 1);
        tokio::time::timeout(timeout, reader.read_until(b'\n', &mut line)).await
    };
    let request = match read {
        Err(_) => {
            return (
                "unknown",
                Reply::refused(Outcome::Timeout, "timed out waiting for the request"),
            );
        }
        Ok(Err(e)) => {
            return (
                "unknown",
                Reply::refused(Outcome::Malformed, format!("reading the request: {e}")),
            );
        }
        Ok(Ok(_)) if line.len() > MAX_REQUEST => {
            return (
                "unknown",
                Reply::refused(
                    Outcome::Oversized,
                    format!("request larger than {MAX_REQUEST} bytes"),
                ),
            );
        }
        Ok(Ok(_)) => match parse_request(&line) {
            Err(message) => {
                return ("unknown", Reply::refused(Outcome::Malformed, message));
            }
            Ok(request) => request,
        },
    };
    let name = request.name();
    let (reply, answer) = oneshot::channel();
    let command = Command {
        peer,
        request,
        reply,
    };
    let reply = if commands.send(command).await.is_err() {
        Reply::refused(Outcome::Rejected, "the agent is stopping")
    } else {
        answer
            .await
            .unwrap_or_else(|_| Reply::refused(Outcome::Rejected, "no answer"))
    };
    (name, reply)
}

/// The client side: sends one request and returns the agent's response.
pub async fn send(path: &Path, request: &Request) -> std::io::Result<Response> {
    let mut stream = tokio::time::timeout(TIMEOUT, UnixStream::connect(path))
        .await
        .map_err(|_| std::io::Error::other("timed out connecting"))??;
    let mut line = serde_json::to_vec(request).map_err(std::io::Error::other)?;
    line.push(b'\n');
    // The agent answers a peer it does not admit without reading the request, and may have
    // closed the connection before this write: its answer is still there to read.
    if let Err(e) = stream.write_all(&line).await
        && !matches!(
            e.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        )
    {
        return Err(e);
    }
    let mut answer = Vec::new();
    let mut reader = BufReader::new(stream).take(MAX_ANSWER as u64);
    tokio::time::timeout(TIMEOUT, reader.read_until(b'\n', &mut answer))
        .await
        .map_err(|_| std::io::Error::other("timed out waiting for the answer"))??;
    serde_json::from_slice(&answer).map_err(|e| std::io::Error::other(format!("bad answer: {e}")))
}

/// uid and primary gid of a user name.
pub fn user_ids(name: &str) -> Option<(u32, u32)> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: getpwnam with a NUL-terminated name; the result is read at once.
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    if pw.is_null() {
        return None;
    }
    // SAFETY: non-null passwd entry.
    Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

#[cfg(test)]
mod tests;
