//! Decoded events: what the sensor hands to the rest of the agent, and the JSON-lines format of
//! `run --events-out` that `replay` reads back.
//!
//! Strings that come from the kernel (paths, arguments, comm) are untrusted bytes: they are turned
//! into UTF-8 lossily and JSON escapes every control character, so newlines and terminal escapes
//! cannot forge lines or colour a terminal.

use serde::{Deserialize, Serialize};

mod container;
pub use container::{Bind, ContainerInfo, PodInfo, RequestedAs};

/// Identifies a job for as long as the agent runs. Made in the kernel (job root recognised at
/// exec) or by the agent (registered root, top bit set).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobKey(pub u64);

impl std::fmt::Display for JobKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// CLOCK_MONOTONIC nanoseconds, from the kernel.
    pub time_ns: u64,
    /// The job, `None` only for tamper events from processes outside any job.
    pub job: Option<JobRef>,
    pub process: ProcessRef,
    /// A string was cut at the kernel's buffer size.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    #[serde(flatten)]
    pub detail: EventDetail,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRef {
    pub key: JobKey,
    /// The job had already ended when the event happened.
    pub ended: bool,
    /// The process is the job's root.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub root: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRef {
    /// Process id (tgid).
    pub pid: u32,
    /// Thread id.
    #[serde(default)]
    pub tid: u32,
    /// Parent process as recorded when the process was forked (0 when unknown).
    #[serde(default)]
    pub ppid: u32,
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub comm: String,
    #[serde(default)]
    pub cgroup_id: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventDetail {
    Fork {
        child_pid: u32,
    },
    Exec {
        filename: String,
        argv: Vec<String>,
        /// Arguments the program was given (`argv` may hold fewer).
        argc: u32,
    },
    Exit {
        /// The status passed to `exit_group`; `None` when the process did not call it (killed).
        exit_code: Option<i32>,
        /// The signal that killed it; `None` when it exited, or when the kernel's layout is not
        /// known (no BTF).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<i32>,
    },
    FileOpen(FileAccess),
    FileRename(FileAccess),
    FileUnlink(FileAccess),
    FileLink(FileAccess),
    Ptrace {
        request: String,
        target_pid: u32,
        targets_agent: bool,
    },
    ProcessVmRead {
        target_pid: u32,
        targets_agent: bool,
    },
    Connect(Connect),
    DnsQuery(Dns),
    DnsAnswer(Dns),
    /// The first data segment of a job's TCP socket was a TLS ClientHello (read in the kernel).
    TlsClientHello(TlsHello),
    Signal {
        target_pid: u32,
        signal: u32,
        syscall: String,
    },
    Bpf {
        cmd: u32,
        cmd_name: String,
    },
    Chdir {
        /// The new working directory, absolute and normalised when it could be resolved.
        path: String,
        resolved: bool,
    },
    /// From the agent, not the kernel: a job started (hook, control socket, discovery) or its
    /// metadata became known. `process` is the job's root.
    JobStart(JobInfo),
    /// From the kernel, never written to the event trace: the identity values of a job root's
    /// environment at exec (only variables the policy names; see `job::discovery`). The agent
    /// turns it into a `JobStart`.
    JobEnv {
        /// Each value with the kernel's `NAMES` value of its variable (index into
        /// `Policy::job_env_vars` and `JOB_ENV_*` bits); marker-only variables have no value.
        values: Vec<(u32, String)>,
    },
    /// From the kernel: the cgroup of a container the job asked a runtime to start was made;
    /// the container's processes are the job's (docs/containers.md). `process` is the runtime's.
    Container(ContainerInfo),
    /// From the kernel: a job process asked a runtime to start the container named `reference`
    /// (`POST /containers/<name>/start`); the agent asks the daemon which container that is
    /// (docs/containers.md, "Starts by name or short id"). `slot` and `pending_ns` name the
    /// kernel's pending start.
    ContainerStart {
        reference: String,
        slot: u32,
        pending_ns: u64,
    },
    /// From the kernel: a job process asked a runtime to run a command in the container named
    /// `reference` (`POST /containers/<name>/exec`); the agent asks the daemon which container
    /// that is, so that the command joins the job (docs/containers.md, "docker exec").
    ContainerExec {
        reference: String,
    },
    /// From the kernel, never judged nor written anywhere: one buffer a job process sent on its
    /// connection to a runtime's API socket (`enrich/runtime_streams.rs` follows the stream).
    RuntimeSent {
        /// `(tgid << 32) | fd`, or an io_uring registered file's address.
        conn: u64,
        /// The buffer's index in its send: the kernel reads a request only at the start of
        /// the first.
        buffer: u32,
        /// Bytes sent in this buffer; `None`: more buffers were sent than the kernel reads
        /// (the stream has a gap of unknown length).
        len: Option<u64>,
        /// The buffer's first bytes (at most `RUNTIME_SENT_BYTES`).
        data: SentBytes,
        /// How they were sent: from `sendfile` or `splice` nothing is copied.
        via: SentVia,
        /// Sent by an io_uring operation (its `IORING_OP_SPLICE`), not a syscall.
        io_uring: bool,
    },
    /// From the agent's reading of a job's runtime API stream (`enrich/runtime_streams.rs`): a
    /// job process sent bytes there that the monitor cannot read, where a request could begin
    /// (by `sendfile` or `splice`, or from memory the kernel could not copy). A container
    /// request among them would not be the job's: a way to hide from the monitor.
    RuntimeUnread {
        /// The runtime's socket, when known.
        socket: Option<String>,
        via: SentVia,
        /// Sent by an io_uring operation, not a syscall.
        io_uring: bool,
        /// Bytes sent that way (`None`: a `sendmmsg`'s later messages, or an io_uring splice
        /// whose length the kernel's layout did not give).
        bytes: Option<u64>,
    },
    /// A job process set up an io_uring instance: what it submits there makes no syscall, and
    /// only some of it is seen (docs/sensors.md, "io_uring").
    IoUringSetup {
        /// The ring's file descriptor.
        fd: i32,
        sq_entries: u32,
        cq_entries: u32,
        /// `IORING_SETUP_*` flags.
        flags: u32,
        /// `IORING_SETUP_SQPOLL`: a kernel thread of the process submits for it, no syscall.
        sqpoll: bool,
    },
    /// From the agent: the job was ended explicitly (hook, control socket).
    JobEnd,
    /// From the agent: the sensor lost events or a probe is not attached.
    SensorStatus(SensorStatus),
    /// From the agent: the keyed hash of a credential the job wrote (hashed when the writer
    /// exited, so the content is complete).
    CredentialFingerprint {
        path: String,
        fingerprint: String,
    },
}

/// What is known about a job, from its hooks or its processes' environment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct JobInfo {
    /// The CI's job id (`GITHUB_RUN_ID`/`GITHUB_JOB`, `CI_JOB_ID`, or the id given to `job start`).
    pub id: String,
    /// `github`, `gitlab`, or `manual`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// The runner's tag for the job's processes (GitHub: `RUNNER_TRACKING_ID`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking_id: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SensorStatus {
    /// Events lost since the previous status.
    pub lost_events: u64,
    /// Probes that are not attached.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub detached_probes: Vec<String>,
    /// Jobs whose events the kernel dropped for being over their event budget, since the
    /// previous status (part of `lost_events`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub over_budget: Vec<JobOverBudget>,
}

/// A job over its event budget and the events of it dropped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobOverBudget {
    pub job: JobKey,
    /// The job's CI id, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub dropped: u64,
}

impl EventDetail {
    /// The stable name of the kind, as in the JSON `kind` field.
    pub fn kind_name(&self) -> &'static str {
        match self {
            EventDetail::Fork { .. } => "fork",
            EventDetail::Exec { .. } => "exec",
            EventDetail::Exit { .. } => "exit",
            EventDetail::FileOpen(_) => "file_open",
            EventDetail::FileRename(_) => "file_rename",
            EventDetail::FileUnlink(_) => "file_unlink",
            EventDetail::FileLink(_) => "file_link",
            EventDetail::Ptrace { .. } => "ptrace",
            EventDetail::ProcessVmRead { .. } => "process_vm_read",
            EventDetail::Connect(_) => "connect",
            EventDetail::DnsQuery(_) => "dns_query",
            EventDetail::DnsAnswer(_) => "dns_answer",
            EventDetail::TlsClientHello(_) => "tls_client_hello",
            EventDetail::Signal { .. } => "signal",
            EventDetail::Bpf { .. } => "bpf",
            EventDetail::Chdir { .. } => "chdir",
            EventDetail::JobStart(_) => "job_start",
            EventDetail::JobEnv { .. } => "job_env",
            EventDetail::IoUringSetup { .. } => "io_uring_setup",
            EventDetail::Container(_) => "container",
            EventDetail::ContainerStart { .. } => "container_start",
            EventDetail::ContainerExec { .. } => "container_exec",
            EventDetail::RuntimeSent { .. } => "runtime_sent",
            EventDetail::RuntimeUnread { .. } => "runtime_unread",
            EventDetail::JobEnd => "job_end",
            EventDetail::SensorStatus(_) => "sensor_status",
            EventDetail::CredentialFingerprint { .. } => "credential_fingerprint",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileAccess {
    /// Absolute, normalised path (relative paths, `dirfd` and `..` resolved) when `resolved`;
    /// otherwise the path as the process gave it.
    pub path: String,
    /// The path exactly as passed to the syscall.
    #[serde(default)]
    pub raw_path: String,
    #[serde(default)]
    pub resolved: bool,
    /// Destination of a rename or link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_path: Option<String>,
    /// open(2) flags, or the rename/unlink/link flags.
    #[serde(default)]
    pub flags: u32,
    /// Opened for writing (O_WRONLY, O_RDWR, O_CREAT or O_TRUNC).
    #[serde(default)]
    pub write: bool,
    /// The syscall's return value: fd or 0 on success, negative errno on failure.
    #[serde(default)]
    pub result: i64,
    /// Which kernel-side patterns matched: `basename`, `dirname`, `prefix`, `proc_memory`,
    /// `new_path`.
    #[serde(default)]
    pub matched: Vec<std::borrow::Cow<'static, str>>,
    /// For `/proc/<pid>/{mem,environ,maps}`: whose memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_pid: Option<u32>,
    /// Keyed hash of the credential's content (when fingerprints are on), added by the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// Submitted as an io_uring request (`IORING_OP_OPENAT`/`OPENAT2`), not a syscall; seen at
    /// submission, so `result` is 0 whatever the open then returned.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub io_uring: bool,
    /// The path the process used, when `path` is what it stands for: the credential a symlink,
    /// hard link or renamed copy leads to (set by the agent, `identity`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
}

impl FileAccess {
    /// An access to the resolved `path` and nothing more (flags 0, result 0): the base for
    /// traces written by hand (`FileAccess { write: true, ..FileAccess::at(path) }`).
    pub fn at(path: &str) -> Self {
        Self {
            path: path.to_owned(),
            raw_path: path.to_owned(),
            resolved: true,
            new_path: None,
            flags: 0,
            write: false,
            result: 0,
            matched: Vec::new(),
            target_pid: None,
            fingerprint: None,
            io_uring: false,
            via: None,
        }
    }
}

/// How bytes were sent on a job's runtime connection (`RuntimeSentEvent::via`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SentVia {
    /// From the sender's memory (`write`, `send*`, io_uring's writes and sends).
    Buffer,
    Sendfile,
    Splice,
    /// A `sendmmsg`'s messages after its first (none read: their length is unknown).
    Sendmmsg,
    /// An io_uring send from the ring's provided buffers, picked when it runs: none read.
    ProvidedBuffer,
}

impl SentVia {
    pub fn as_str(self) -> &'static str {
        match self {
            SentVia::Buffer => "write",
            SentVia::Sendfile => "sendfile",
            SentVia::Splice => "splice",
            SentVia::Sendmmsg => "sendmmsg",
            SentVia::ProvidedBuffer => "send from a provided buffer",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SocketFamily {
    Inet,
    Inet6,
    Unix,
    /// `AF_PACKET`: only ever a `raw_socket`.
    Packet,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connect {
    pub family: SocketFamily,
    /// IP address for inet sockets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<std::net::IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Socket path for unix sockets; abstract names start with `@`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix_path: Option<String>,
    #[serde(default)]
    pub fd: i32,
    /// 0 on success, negative errno on failure (`-115`, EINPROGRESS, for a non-blocking connect).
    #[serde(default)]
    pub result: i64,
    /// Submitted as an io_uring request (`IORING_OP_CONNECT`), not a syscall; seen at
    /// submission, so `result` is 0 whatever the connect then returned.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub io_uring: bool,
    /// Block mode refused it in the kernel (`result` is -1, EPERM).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub blocked: bool,
    /// A UDP send to the address (`sendto`, `sendmsg`), not a `connect()`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub udp_send: bool,
    /// Not a connect: the creation of a socket that sends without passing the address hooks
    /// (`ip` and `port` are unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_socket: Option<RawSocket>,
    /// The unix path the process used, when `unix_path` is the secret socket it leads to (set
    /// by the agent, `identity`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// A DNS connect block mode sent to the agent's resolver instead (the address is the one the
    /// process gave).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dns_redirected: bool,
    /// With `blocked`: UDP refused because a rule of the job checks TLS server names (`sni =
    /// true`), which UDP does not carry (QUIC encrypts them): to port 443 (QUIC) of any allowed
    /// address, or to another port (but 53) of an address only a name admits.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub quic: bool,
}

/// A TLS ClientHello a job's TCP socket sent as its first data (docs/policy.md, "TLS server
/// names").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsHello {
    pub ip: std::net::IpAddr,
    pub port: u16,
    /// The `server_name` (SNI) host name; absent when the first segment had none the kernel
    /// could read (no extension, or a ClientHello longer than the segment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// The name was longer than the kernel copies (128 bytes) and is cut.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sni_truncated: bool,
    /// Block mode refused it (`sni = true`, a name the allowlist does not have): the kernel
    /// dropped this segment and every later one of the connection.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub blocked: bool,
}

impl Connect {
    /// A successful connect of fd 3 to `ip` port `port`: the base for traces written by hand
    /// (`Connect { blocked: true, ..Connect::inet(ip, port) }`).
    pub fn inet(ip: std::net::IpAddr, port: u16) -> Self {
        Self {
            family: if ip.is_ipv4() {
                SocketFamily::Inet
            } else {
                SocketFamily::Inet6
            },
            ip: Some(ip),
            port: Some(port),
            unix_path: None,
            fd: 3,
            result: 0,
            io_uring: false,
            blocked: false,
            udp_send: false,
            raw_socket: None,
            via: None,
            dns_redirected: false,
            quic: false,
        }
    }

    /// A successful connect of fd 3 to the unix socket `path`.
    pub fn unix(path: &str) -> Self {
        Self {
            family: SocketFamily::Unix,
            ip: None,
            port: None,
            unix_path: Some(path.to_owned()),
            ..Self::inet(std::net::Ipv4Addr::UNSPECIFIED.into(), 0)
        }
    }
}

/// A raw IP, packet or ICMP ("ping") socket a job process created.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawSocket {
    pub kind: RawSocketKind,
    /// The protocol given to `socket()` (`ETH_P_*` in network byte order for packet sockets).
    pub protocol: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawSocketKind {
    /// `SOCK_RAW` in `AF_INET`/`AF_INET6`.
    Raw,
    /// `AF_PACKET`.
    Packet,
    /// `SOCK_DGRAM` with `IPPROTO_ICMP`/`IPPROTO_ICMPV6`.
    Icmp,
}

impl RawSocketKind {
    pub fn describe(self) -> &'static str {
        match self {
            RawSocketKind::Raw => "a raw IP socket",
            RawSocketKind::Packet => "a packet socket",
            RawSocketKind::Icmp => "an ICMP socket",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    pub server_ip: std::net::IpAddr,
    pub server_port: u16,
    /// Transaction id, to pair a query with its answer.
    pub id: u16,
    /// Response code name (answers only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rcode: Option<String>,
    pub questions: Vec<DnsQuestion>,
    pub answers: Vec<DnsRecord>,
    /// The message could not be parsed (it is kept out of the event: it may be anything).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parse_error: Option<String>,
}

impl Dns {
    /// A resolver's answer (from 127.0.0.53) giving `name` one A record: for traces written by
    /// hand.
    pub fn answer_a(name: &str, ip: &str) -> Self {
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        Self {
            server_ip: std::net::IpAddr::from([127, 0, 0, 53]),
            server_port: 53,
            id: 1,
            rcode: Some("No Error".into()),
            questions: vec![DnsQuestion {
                name: fqdn.clone(),
                record_type: "A".into(),
            }],
            answers: vec![DnsRecord {
                name: fqdn,
                record_type: "A".into(),
                ttl: 60,
                data: ip.to_owned(),
            }],
            parse_error: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsQuestion {
    pub name: String,
    #[serde(rename = "type")]
    pub record_type: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsRecord {
    pub name: String,
    #[serde(rename = "type")]
    pub record_type: String,
    pub ttl: u32,
    /// IP address for A/AAAA, target name for CNAME.
    pub data: String,
}

/// Bytes a job sent to a runtime's API: they may hold a registry password or a container's
/// environment, so they are never printed (`Debug` gives their length) nor serialized.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SentBytes(pub Vec<u8>);

impl std::fmt::Debug for SentBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} bytes>", self.0.len())
    }
}

impl Serialize for SentBytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0.len() as u64)
    }
}

impl<'de> Deserialize<'de> for SentBytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        u64::deserialize(d).map(|_| SentBytes::default())
    }
}
