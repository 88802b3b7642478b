//! The HTTP streams jobs send on their connections to a runtime's API socket, followed for the
//! container requests the kernel cannot read where they are sent. The kernel reads a request
//! line only at the start of a send's first buffer (`runner-monitor-ebpf/src/runtime_requests.rs`);
//! a job that cuts `POST /containers/<id>/start` across writes or buffers, pipelines it after
//! another request, or percent-encodes its id would start a container that is not its own. The
//! kernel copies the first `RUNTIME_SENT_BYTES` of every buffer sent on such a connection
//! (`EventDetail::RuntimeSent`, woken at once); this puts them back together as the daemon
//! reads them (request heads with `httparse`, bodies skipped by `Content-Length` or chunk sizes)
//! and returns the container requests the kernel did not read, for `name_starts.rs` to register
//! before the daemon makes the container (tens of milliseconds later).
//!
//! Bytes the kernel could not copy are a gap in the stream. Inside a body whose length was read
//! they are skipped. Anywhere else a request could hide there, and the send is `Read::unread`
//! (the job's `agent-tamper`): bytes nothing could copy (`sendfile`, `splice`, memory the kernel
//! could not read), a head longer than the copy (`RUNTIME_SENT_BYTES`, 8 KiB: no Docker client
//! sends a head that long in one buffer), bytes past a body's end, a `sendmmsg`'s later
//! messages. Where the thread was already lost (a record the job's event budget dropped, a
//! request that may switch the connection to a raw stream: `attach`, an exec's start, an
//! upgraded `/session` or `/grpc`) the bytes past a long buffer's copy are not a finding: an
//! attached stdin comes in long writes. The thread is picked up again at the next request line
//! at the start of a buffer or of a line. Nothing here is ever printed: the bytes may hold a
//! registry password or a container's environment.

use percent_encoding::percent_decode;
use runner_monitor_common::CONTAINER_ID_LEN;

use crate::{bounded::BoundedMap, event::JobKey};

/// Connections followed at once (the least recently used is forgotten).
const CONNECTIONS: usize = 1024;
/// The longest request head kept; a longer one loses the thread. With `CONNECTIONS`, what jobs
/// can make the agent hold: 16 MiB at most (a buffer's copy is 8 KiB: a longer head comes in
/// several sends).
const MAX_HEAD: usize = 16 << 10;

/// A container request found in a job's stream that the kernel did not read, a build, or an
/// inspect by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub job: JobKey,
    /// The container as the request names it (decoded): a 64-digit id, a short id or a name.
    pub reference: String,
    pub action: Action,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// `start`, or `attach` (podman makes the cgroup there): the container becomes the job's.
    Start,
    /// `exec`: the command's process joins the job.
    Exec,
    /// `POST /build` or `/grpc` (no container named: `reference` is empty): the build's steps
    /// are the job's while its connection lives (`builds.rs`).
    Build,
    /// `GET /containers/<name or short id>/json`, an inspect: what `docker exec` sends just
    /// before the exec, so the name is looked up ahead of it (`name_starts.rs`).
    Inspect,
}

/// What one send gave the reader.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Read {
    /// The container requests completed in it that the kernel did not read.
    pub found: Vec<Found>,
    /// It held bytes the kernel could not copy where a request could hide (see the module's
    /// notes): not wholly in a body whose length was known.
    pub unread: bool,
    /// Request heads completed in it, of any request (an open build ends at the next request
    /// on its connection: its answer was whole).
    pub heads: usize,
}

/// Where the reader is in one connection's stream.
#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    /// In a request head: its bytes so far.
    Head(Vec<u8>),
    /// In a body of this many bytes still to come.
    Body(u64),
    /// In a chunk-size line (chunked body): its bytes so far.
    ChunkSize(Vec<u8>),
    /// In chunk data of this many bytes (with its closing CRLF).
    ChunkData(u64),
    /// In the trailer after the last chunk: its bytes so far.
    Trailer(Vec<u8>),
    /// Thread lost: waiting for a request line at the start of a buffer or a line.
    Lost,
}

#[derive(Default)]
struct Stream {
    state: State,
    /// Bytes of the head being read that the kernel saw as one buffer: the head began at the
    /// start of a send's first buffer, and that buffer gave it these (`kernel_reads`); 0 when
    /// it began anywhere else.
    kernel_window: usize,
    /// Request heads completed on the connection.
    heads: usize,
}

impl Default for State {
    fn default() -> Self {
        State::Head(Vec::new())
    }
}

pub struct RuntimeStreams {
    conns: BoundedMap<u64, Stream>,
}

impl Default for RuntimeStreams {
    fn default() -> Self {
        Self {
            conns: BoundedMap::new(CONNECTIONS),
        }
    }
}

impl RuntimeStreams {
    /// A new connection `conn` (a job's connect): its stream starts afresh.
    pub fn connected(&mut self, conn: u64) {
        self.conns.remove(&conn);
    }

    /// Buffer `buffer` of a send on connection `conn` of job `job` (by any call): `data`, the
    /// first bytes of `len` sent (`None`: an unknown number of bytes, of buffers or of a
    /// `sendmmsg`'s messages, nothing read; `data` empty with `len` above 0: none could be
    /// copied).
    pub fn sent(
        &mut self,
        job: JobKey,
        conn: u64,
        buffer: u32,
        len: Option<u64>,
        data: &[u8],
    ) -> Read {
        let stream = self.conns.get_or_insert_with(conn, Stream::default);
        let mut read = Read::default();
        let Some(len) = len else {
            stream.state = State::Lost;
            // Bytes nothing read: a `sendmmsg`'s later messages (no HTTP client sends requests
            // that way), a splice whose length is not known (an io_uring one, where the
            // kernel's layout did not give it), an io_uring send from a provided buffer, the
            // buffers of a `writev` or `sendmsg` whose iovecs the kernel could not read (not
            // yet paged in: the send itself faults them in). Until 2026-12-07 the kernel copied
            // a send's first four buffers and marked the rest, and a `writev` of more (Node's
            // chunked bodies) was not a finding.
            read.unread = true;
            return read;
        };
        if matches!(&stream.state, State::Head(h) if h.is_empty()) || stream.state == State::Lost {
            stream.kernel_window = if buffer == 0 { data.len() } else { 0 };
        }
        let heads = stream.heads;
        feed(stream, data, job, &mut read.found);
        read.heads = stream.heads - heads;
        let gap = len.saturating_sub(data.len() as u64);
        if gap > 0 {
            let lost = stream.state == State::Lost;
            let in_body = skip(stream, gap);
            read.unread = !in_body && (data.is_empty() || !lost);
        }
        read
    }
}

/// Whether `data` begins with a request line: a method (any upper-case token: the daemon reads
/// an `OPTIONS` or a made-up method's request, and its connection goes on), a target (origin or
/// absolute form) and `HTTP/1.x`, the whole line in `data`. A raw stream's line that merely
/// starts like one is not taken for a request.
fn is_request_line(data: &[u8]) -> bool {
    let Some(end) = data.iter().take(MAX_LINE).position(|&b| b == b'\n') else {
        return false;
    };
    let line = &data[..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    (1..=16).contains(&method.len())
        && method.iter().all(u8::is_ascii_uppercase)
        && matches!(target.first(), Some(b'/' | b'h' | b'H'))
        && matches!(version, b"HTTP/1.1" | b"HTTP/1.0")
}

/// The longest request line picked up where the thread was lost.
const MAX_LINE: usize = 8 << 10;

/// Reads `data` on from the stream's state.
fn feed(stream: &mut Stream, mut data: &[u8], job: JobKey, found: &mut Vec<Found>) {
    while !data.is_empty() {
        match &mut stream.state {
            State::Lost => {
                // Picked up again at the first request line: at `data`'s start (a buffer's, or
                // just after a head or body) or after a line feed.
                let Some(at) = (0..data.len())
                    .find(|&i| (i == 0 || data[i - 1] == b'\n') && is_request_line(&data[i..]))
                else {
                    return;
                };
                if at > 0 {
                    stream.kernel_window = 0;
                }
                stream.state = State::Head(Vec::new());
                data = &data[at..];
            }
            State::Head(head) => {
                let before = head.len();
                head.extend_from_slice(data);
                let Some(end) = head_end(head) else {
                    if head.len() > MAX_HEAD {
                        stream.state = State::Lost;
                    }
                    return;
                };
                let used = end - before;
                let head = std::mem::take(head);
                let window = stream.kernel_window.min(end);
                stream.state = request(&head[..end], &head[..window], job, found);
                stream.heads += 1;
                stream.kernel_window = 0;
                data = &data[used..];
            }
            State::Body(left) => {
                if take(left, &mut data) {
                    stream.state = State::Head(Vec::new());
                }
            }
            State::ChunkSize(line) => {
                let Some(nl) = data.iter().position(|&b| b == b'\n') else {
                    line.extend_from_slice(data);
                    if line.len() > 1024 {
                        stream.state = State::Lost;
                    }
                    return;
                };
                line.extend_from_slice(&data[..nl]);
                data = &data[nl + 1..];
                let size = std::str::from_utf8(line)
                    .ok()
                    .map(|l| l.trim_end_matches('\r'))
                    .map(|l| l.split(';').next().unwrap_or("").trim())
                    .and_then(|hex| u64::from_str_radix(hex, 16).ok());
                stream.state = match size {
                    Some(0) => State::Trailer(Vec::new()),
                    // The data, then its CRLF.
                    Some(size) => State::ChunkData(size.saturating_add(2)),
                    None => State::Lost,
                };
            }
            State::ChunkData(left) => {
                if take(left, &mut data) {
                    stream.state = State::ChunkSize(Vec::new());
                }
            }
            State::Trailer(trailer) => {
                // Ends at an empty line: CRLF right away, or CRLF CRLF after trailer fields.
                let before = trailer.len();
                trailer.extend_from_slice(data);
                let end = if trailer.starts_with(b"\r\n") {
                    Some(2)
                } else {
                    find(trailer, b"\r\n\r\n").map(|at| at + 4)
                };
                let Some(end) = end else {
                    if trailer.len() > MAX_HEAD {
                        stream.state = State::Lost;
                    }
                    return;
                };
                data = &data[end - before..];
                stream.state = State::Head(Vec::new());
                stream.kernel_window = 0;
            }
        }
    }
}

/// Takes up to `left` bytes off `data`; whether none are left to take.
fn take(left: &mut u64, data: &mut &[u8]) -> bool {
    let n = (*left).min(data.len() as u64);
    *left -= n;
    *data = &data[n as usize..];
    *left == 0
}

/// Bytes the kernel did not copy: a body's or chunk's as they should be; anywhere else the
/// thread is lost. Whether they were all a body's or chunk's.
fn skip(stream: &mut Stream, gap: u64) -> bool {
    let (state, in_body) = match stream.state {
        State::Body(left) if gap < left => (State::Body(left - gap), true),
        State::Body(left) if gap == left => (State::Head(Vec::new()), true),
        State::ChunkData(left) if gap < left => (State::ChunkData(left - gap), true),
        State::ChunkData(left) if gap == left => (State::ChunkSize(Vec::new()), true),
        _ => (State::Lost, false),
    };
    stream.state = state;
    stream.kernel_window = 0;
    in_body
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Where a request head ends (past its empty line), if it has.
fn head_end(head: &[u8]) -> Option<usize> {
    find(head, b"\r\n\r\n").map(|at| at + 4)
}

/// A whole request head: the container request it is, if the kernel did not read it (in
/// `window`, the head's bytes the kernel saw at the start of a send's first buffer), and the
/// state after it.
fn request(head: &[u8], window: &[u8], job: JobKey, found: &mut Vec<Found>) -> State {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = req.parse(head) else {
        return State::Lost;
    };
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return State::Lost;
    };
    // The path as the daemon routes it, without its version: decoded once for both questions.
    let path = decoded_path(target);
    let path = path.as_deref().map(strip_version);
    // `/build`: the classic builder's, and the 20.10 CLI's BuildKit. `/grpc`: buildx's docker
    // driver (Docker 23 and later, `docker/build-push-action`) runs BuildKit's gRPC API over it
    // for the whole build.
    let asked = path.and_then(|p| match method {
        "POST" if p == "/build" || p == "/grpc" => Some((String::new(), Action::Build)),
        "POST" => container_request(p),
        "GET" => inspect_request(p),
        _ => None,
    });
    // A build or an inspect is never read by the kernel (`runner-monitor-ebpf/src/builds.rs`).
    if let Some((reference, action)) = &asked
        && (matches!(action, Action::Build | Action::Inspect) || !kernel_reads(window))
    {
        found.push(Found {
            job,
            reference: reference.clone(),
            action: *action,
        });
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
    };
    // The daemon may answer by taking the connection over (attach, an exec's start, an upgraded
    // session): what follows is then no HTTP. Picked up again at the next request line. An
    // `Upgrade` header elsewhere changes nothing for the daemon, nor here.
    let raw_after = path.is_some_and(|p| {
        p.ends_with("/attach")
            || p.ends_with("/attach/ws")
            || (p.starts_with("/exec/") && p.ends_with("/start"))
            || (matches!(p, "/session" | "/grpc") && header("upgrade").is_some())
    });
    if raw_after {
        return State::Lost;
    }
    if header("transfer-encoding").is_some_and(|te| te.ends_with("chunked")) {
        return State::ChunkSize(Vec::new());
    }
    match header("content-length").map(|l| l.parse::<u64>()) {
        None | Some(Ok(0)) => State::Head(Vec::new()),
        Some(Ok(n)) => State::Body(n),
        Some(Err(_)) => State::Lost,
    }
}

/// The request target's path, percent-decoded, as the daemon routes it: an absolute-form
/// target (`http://host/path`) is its path; the query is cut.
fn decoded_path(target: &str) -> Option<String> {
    let path = match target.split_once("://") {
        Some((_, rest)) => &rest[rest.find('/')?..],
        None => target,
    };
    let path = path.split(['?', '#']).next().unwrap_or("");
    Some(
        percent_decode(path.as_bytes())
            .decode_utf8()
            .ok()?
            .into_owned(),
    )
}

/// `path` without Docker's `/v<version>` prefix.
fn strip_version(path: &str) -> &str {
    if let Some(rest) = path.strip_prefix("/v") {
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if end > 0 && rest[end..].starts_with('/') {
            return &rest[end..];
        }
    }
    path
}

/// `/containers/<ref>/{start,attach,exec}` (a decoded path without its version): the container
/// and what is asked.
fn container_request(path: &str) -> Option<(String, Action)> {
    let rest = path.strip_prefix("/containers/")?;
    let (reference, action) = rest.split_once('/')?;
    let action = match action {
        "start" | "attach" => Action::Start,
        "exec" => Action::Exec,
        _ => return None,
    };
    container_reference(reference).then(|| (reference.to_owned(), action))
}

/// `/containers/<ref>/json` with `ref` a name or a short id (a full id needs no look-up).
fn inspect_request(path: &str) -> Option<(String, Action)> {
    let reference = path.strip_prefix("/containers/")?.strip_suffix("/json")?;
    let full_id = reference.len() == CONTAINER_ID_LEN;
    (container_reference(reference) && !full_id).then(|| (reference.to_owned(), Action::Inspect))
}

/// A container's name or id as the daemon takes it in a path: `[a-zA-Z0-9_.-]`, at most an
/// id long.
fn container_reference(reference: &str) -> bool {
    let name_byte = |b: u8| b.is_ascii_alphanumeric() || b"_.-".contains(&b);
    !reference.is_empty() && reference.len() <= CONTAINER_ID_LEN && reference.bytes().all(name_byte)
}

/// Whether the kernel read this request where it was sent (it began a send's first buffer):
/// the grammar of `runtime_requests.rs::on_request` and `container_refs.rs::start_by_reference`,
/// on the same bytes. A request read there is registered by the kernel; one read twice would
/// leave a pending start by name for another container to take.
fn kernel_reads(head: &[u8]) -> bool {
    use runner_monitor_common::container::request::{
        ATTACH, CONTAINERS, CONTAINERS_AT, EXEC, POST, PREFIX_LEN, START,
    };
    if head.len() < PREFIX_LEN + 2 || !head.starts_with(POST) {
        return false;
    }
    let Some(id_at) = CONTAINERS_AT
        .into_iter()
        .find(|&at| head[at..].starts_with(CONTAINERS))
        .map(|at| at + CONTAINERS.len())
    else {
        return false;
    };
    let tail = &head[id_at..];
    let ends = |at: usize| matches!(tail.get(at), Some(b' ') | Some(b'?'));
    let is_hex = |c: &u8| c.is_ascii_digit() || (b'a'..=b'f').contains(c);
    let id = CONTAINER_ID_LEN;
    if tail.len() > id && tail[..id].iter().all(is_hex) {
        let suffix = &tail[id..];
        if [&START[..], ATTACH, EXEC]
            .iter()
            .any(|action| suffix.starts_with(action) && ends(id + action.len()))
        {
            return true;
        }
    }
    // By name or short id: `<ref>/start` or `<ref>/exec`, `ref` shorter than an id.
    let name_byte = |b: &u8| b.is_ascii_alphanumeric() || b"_.-".contains(b);
    let Some(len) = tail.iter().take(id).position(|&b| b == b'/') else {
        return false;
    };
    if len == 0 || !tail[..len].iter().all(name_byte) {
        return false;
    }
    let after = &tail[len..];
    [&START[..], EXEC]
        .iter()
        .any(|action| after.starts_with(action) && ends(len + action.len()))
}

#[cfg(test)]
mod tests;
