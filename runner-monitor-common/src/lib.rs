//! Types shared by the kernel programs and the agent.
//!
//! Every struct here crosses the kernel/user boundary as raw bytes, so each is `#[repr(C)]`, has
//! no `bool`, no implicit padding (checked by the size asserts at the bottom), and only fixed-size
//! arrays. The agent never casts a ring-buffer pointer to these types: it checks the length and
//! copies (see `runner-monitor/src/sensor/decode.rs`).
#![no_std]

/// Longest path (including the NUL) the kernel copies for one path argument.
pub const PATH_LEN: usize = 256;
/// Bytes of the argument vector copied at exec (NUL-separated, like `/proc/<pid>/cmdline`).
pub const ARGV_LEN: usize = 512;
/// How many arguments are copied at most.
pub const ARGV_MAX_ARGS: u32 = 16;
/// Bytes of one argument copied at most.
pub const ARG_LEN: usize = 128;
/// Bytes of a DNS message copied from a packet.
pub const DNS_LEN: usize = 512;
/// Longest `sun_path` of a unix socket address.
pub const UNIX_PATH_LEN: usize = 108;
/// Width of a name key (basename, directory name or executable name) in the pattern maps.
pub const NAME_LEN: usize = 64;
/// Length of `task_struct::comm`.
pub const COMM_LEN: usize = 16;
/// Longest basename prefix the kernel checks (a credential name pattern such as `id_*` is matched
/// by its literal prefix, cut to this length); the `PREFIX_LENGTHS` setting has one bit per length.
pub const MAX_PREFIX_LEN: usize = 16;

/// What an event is. The numbers are part of the wire format: never renumber.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Fork = 1,
    Exec = 2,
    Exit = 3,
    FileOpen = 4,
    FileRename = 5,
    FileUnlink = 6,
    FileLink = 7,
    Ptrace = 8,
    ProcessVmRead = 9,
    Connect = 10,
    DnsQuery = 11,
    DnsAnswer = 12,
    Signal = 13,
    Bpf = 14,
    Chdir = 15,
    /// Sent just before the exec event of a process that became a job root by its environment
    /// (or of a job root whose environment names its job): the identity values found there.
    JobEnv = 16,
    /// A job process set up an io_uring instance (`io_uring:io_uring_create`).
    IoUringSetup = 17,
    /// The cgroup of a container a job asked a runtime to start was made (`container.rs`).
    Container = 18,
    /// A job's TCP socket sent a TLS ClientHello first: its server name (`tls.rs`).
    TlsClientHello = 19,
    /// A job asked a runtime to start a container by name (`container_refs.rs`): the agent
    /// asks the daemon which container that is while the start is under way.
    ContainerStart = 20,
    /// A job asked a runtime to run a command in a container (`docker exec`) by name or short
    /// id (`container_refs.rs`): the agent asks the daemon which container that is, so that the
    /// command's process joins the job (`ContainerStartEvent` body, `slot` unused).
    ContainerExec = 21,
    /// Bytes a job process sent on its connection to a runtime's API socket
    /// (`container::RuntimeSentEvent`): the agent follows the HTTP stream for the requests the
    /// kernel cannot read at once (cut across writes or buffers, pipelined, encoded).
    RuntimeSent = 22,
}

/// Per-kind counter slots: a power of two above the highest `EventKind`, because the kernel
/// programs index the counters with `kind & (EVENT_KIND_SLOTS - 1)` (a mask the verifier can
/// bound). At 17 the mask sent every kind but one to slot 0.
pub const EVENT_KIND_SLOTS: u32 = 32;
const _: () = assert!(
    EVENT_KIND_SLOTS.is_power_of_two() && (EventKind::RuntimeSent as u32) < EVENT_KIND_SLOTS,
    "EVENT_KIND_SLOTS must be a power of two above every EventKind"
);

impl EventKind {
    pub const ALL: [EventKind; 22] = [
        EventKind::Fork,
        EventKind::Exec,
        EventKind::Exit,
        EventKind::FileOpen,
        EventKind::FileRename,
        EventKind::FileUnlink,
        EventKind::FileLink,
        EventKind::Ptrace,
        EventKind::ProcessVmRead,
        EventKind::Connect,
        EventKind::DnsQuery,
        EventKind::DnsAnswer,
        EventKind::Signal,
        EventKind::Bpf,
        EventKind::Chdir,
        EventKind::JobEnv,
        EventKind::IoUringSetup,
        EventKind::Container,
        EventKind::TlsClientHello,
        EventKind::ContainerStart,
        EventKind::ContainerExec,
        EventKind::RuntimeSent,
    ];

    pub fn from_u32(value: u32) -> Option<Self> {
        Self::ALL.iter().copied().find(|k| *k as u32 == value)
    }

    /// Stable lowercase name, used in JSON and metrics.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Fork => "fork",
            EventKind::Exec => "exec",
            EventKind::Exit => "exit",
            EventKind::FileOpen => "file_open",
            EventKind::FileRename => "file_rename",
            EventKind::FileUnlink => "file_unlink",
            EventKind::FileLink => "file_link",
            EventKind::Ptrace => "ptrace",
            EventKind::ProcessVmRead => "process_vm_read",
            EventKind::Connect => "connect",
            EventKind::DnsQuery => "dns_query",
            EventKind::DnsAnswer => "dns_answer",
            EventKind::Signal => "signal",
            EventKind::Bpf => "bpf",
            EventKind::Chdir => "chdir",
            EventKind::JobEnv => "job_env",
            EventKind::IoUringSetup => "io_uring_setup",
            EventKind::Container => "container",
            EventKind::TlsClientHello => "tls_client_hello",
            EventKind::ContainerStart => "container_start",
            EventKind::ContainerExec => "container_exec",
            EventKind::RuntimeSent => "runtime_sent",
        }
    }
}

/// `EventHeader::flags`: the event's job had already ended when the event happened.
pub const HEADER_JOB_ENDED: u32 = 1;
/// `EventHeader::flags`: the process is the root of its job.
pub const HEADER_JOB_ROOT: u32 = 1 << 1;
/// `EventHeader::flags`: a string in the body was cut at its buffer size.
pub const HEADER_TRUNCATED: u32 = 1 << 2;
/// `EventHeader::flags`: a file event or `Connect` from an io_uring request (`IORING_OP_OPENAT`,
/// `OPENAT2`, `RENAMEAT`, `LINKAT`, `SYMLINKAT`, `CONNECT`), sent at its submission, before it
/// ran: its `result` is 0.
pub const HEADER_IO_URING: u32 = 1 << 3;
/// `EventHeader::flags`: a `FileOpen` from the kernel's open of the file (`security_file_open`,
/// LSM or fentry), not from the syscall: `path` is the kernel's path of the file opened (symlinks,
/// `..` and bind mounts resolved, as the opening process sees it), and `result` is 0 (the open
/// had not returned).
pub const HEADER_KERNEL_PATH: u32 = 1 << 4;

/// Common to every event; the first bytes of every ring-buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EventHeader {
    /// An `EventKind`.
    pub kind: u32,
    /// `HEADER_*` bits.
    pub flags: u32,
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Job key, 0 when the process belongs to no job (only tamper events).
    pub job: u64,
    pub cgroup_id: u64,
    /// Thread id.
    pub pid: u32,
    /// Process id.
    pub tgid: u32,
    /// Parent process id as recorded at fork (0 when unknown, e.g. for a job root).
    pub ppid: u32,
    pub uid: u32,
    pub comm: [u8; COMM_LEN],
}

/// A job process created a child process (not a thread).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ForkEvent {
    pub header: EventHeader,
    pub child_tgid: u32,
    pub _pad: u32,
}

/// A job process executed a program (or a job root was recognised at exec).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExecEvent {
    pub header: EventHeader,
    /// Bytes of `filename` used (without NUL).
    pub filename_len: u32,
    /// Bytes of `argv` used: NUL-terminated arguments back to back.
    pub argv_len: u32,
    /// Number of arguments the process was given (may exceed what was copied).
    pub argc: u32,
    pub _pad: u32,
    pub filename: [u8; PATH_LEN],
    pub argv: [u8; ARGV_LEN],
}

/// `ExitEvent::flags`: `exit_code` is the process's own exit status (from `exit_group`).
pub const EXIT_CODE_KNOWN: u32 = 1;
/// `ExitEvent::flags`: the process was killed by the signal in `exit_code` (read from
/// `task_struct.exit_code`, at the offset in `setting::TASK_EXIT_CODE`).
pub const EXIT_KILLED_BY_SIGNAL: u32 = 1 << 1;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExitEvent {
    pub header: EventHeader,
    pub exit_code: i32,
    pub flags: u32,
}

/// `FileEvent::matched` bits: which kernel-side pattern let the event through.
pub const MATCH_BASENAME: u32 = 1;
pub const MATCH_DIRNAME: u32 = 1 << 1;
pub const MATCH_PREFIX: u32 = 1 << 2;
/// `/proc/<pid>/{mem,environ,maps}` of another process.
pub const MATCH_PROC_MEMORY: u32 = 1 << 3;
/// The match was on the second path (the destination of a rename or link).
pub const MATCH_SECOND_PATH: u32 = 1 << 4;

/// `FileEvent::flags` of a `FileLink` event: a symbolic link (`symlink`, `symlinkat`), whose first
/// path is the link's target as written, not a path the process opened. No `linkat` flag uses it.
pub const LINK_SYMBOLIC: u32 = 1 << 31;

/// `dirfd` value meaning "relative to the working directory".
pub const AT_FDCWD: i32 = -100;

/// A file operation on a watched path: open, rename, unlink or link.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FileEvent {
    pub header: EventHeader,
    /// Syscall return value: an fd or 0 on success, `-errno` on failure.
    pub result: i64,
    /// `dirfd` of `path` (`AT_FDCWD` for the working directory).
    pub dirfd: i32,
    /// `dirfd` of `path2`.
    pub dirfd2: i32,
    /// open flags, or rename/unlink/link flags.
    pub flags: u32,
    /// `MATCH_*` bits.
    pub matched: u32,
    /// For `/proc/<pid>/...` matches: the pid whose memory was asked for.
    pub target_pid: u32,
    pub path_len: u32,
    pub path2_len: u32,
    pub _pad: u32,
    pub path: [u8; PATH_LEN],
    /// Destination of a rename or link; empty otherwise.
    pub path2: [u8; PATH_LEN],
}

/// Ptrace requests reported (the agent names them).
pub const PTRACE_PEEKTEXT: u64 = 1;
pub const PTRACE_PEEKDATA: u64 = 2;
pub const PTRACE_PEEKUSER: u64 = 3;
pub const PTRACE_ATTACH: u64 = 16;
pub const PTRACE_SEIZE: u64 = 0x4206;
/// `ProcessAccessEvent::request` flag: not a ptrace request but, in the low 32 bits, the number
/// (of the agent's architecture) of the syscall that made a ptrace attach check, seen by the
/// LSM or fentry hook on `security_ptrace_access_check`: `process_vm_writev`, `pidfd_getfd`.
pub const ACCESS_BY_SYSCALL: u64 = 1 << 63;

/// A `ptrace` or `process_vm_readv` aimed at another process.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcessAccessEvent {
    pub header: EventHeader,
    /// ptrace request; 0 for `process_vm_readv`; `ACCESS_BY_SYSCALL` | a syscall number for
    /// another syscall's attach check.
    pub request: u64,
    pub target_pid: u32,
    /// 1 when the target is the agent itself.
    pub targets_agent: u32,
}

pub const AF_UNIX: u16 = 1;
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const AF_PACKET: u16 = 17;
pub const SOCK_DGRAM: u16 = 2;
pub const SOCK_RAW: u16 = 3;
pub const IPPROTO_ICMP: u16 = 1;
pub const IPPROTO_ICMPV6: u16 = 58;

/// `connect()` by a job process.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ConnectEvent {
    pub header: EventHeader,
    pub result: i64,
    pub fd: i32,
    pub family: u16,
    /// Host byte order.
    pub port: u16,
    /// IPv4 in the first 4 bytes, or IPv6; network byte order.
    pub addr: [u8; 16],
    /// Bytes of `unix_path` used; an abstract socket starts with a NUL byte.
    pub unix_path_len: u32,
    /// `CONNECT_*` bits: what the egress check decided, and how the destination was addressed.
    pub flags: u32,
    pub unix_path: [u8; UNIX_PATH_LEN],
    pub _pad2: [u8; 4],
}

/// `ConnectEvent::flags`: block mode refused the connection in the kernel (`result` is -EPERM).
pub const CONNECT_BLOCKED: u32 = 1;
/// `ConnectEvent::flags`: a UDP send (`sendto`, `sendmsg`) to the address, not a `connect()`;
/// only refused sends are reported (`fd` is -1: the cgroup hook does not see it).
pub const CONNECT_UDP_SEND: u32 = 1 << 1;
/// `ConnectEvent::flags`: not a connect but the creation of a socket that bypasses the
/// address hooks (raw, packet, ICMP): `family` is its family, `port` its protocol,
/// `addr[0]` its type; `fd` is -1. With `CONNECT_BLOCKED`, block mode refused the `socket()`.
pub const CONNECT_RAW_SOCKET: u32 = 1 << 2;
/// `ConnectEvent::flags`: a DNS connect that block mode sent to the agent's resolver.
pub const CONNECT_DNS_REDIRECTED: u32 = 1 << 3;
/// `ConnectEvent::flags`, with `CONNECT_BLOCKED`: UDP refused because a rule of the job checks
/// TLS server names (`sni = true`) and UDP carries none to check (QUIC's are encrypted): to port
/// 443 (QUIC) of any allowed address, or to another port (but DNS) of an address only a name
/// admitted. The address itself is allowed.
pub const CONNECT_QUIC: u32 = 1 << 4;
/// The port QUIC (HTTP/3) is served on.
pub const QUIC_PORT: u16 = 443;
/// The port DNS is served on: block mode sends a job's queries there to the agent's resolver.
pub const DNS_PORT: u16 = 53;

pub const DNS_DIRECTION_QUERY: u32 = 0;
pub const DNS_DIRECTION_ANSWER: u32 = 1;

/// A DNS message on UDP port 53 sent or received on a job process's socket.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DnsEvent {
    pub header: EventHeader,
    /// Bytes of `payload` used.
    pub len: u32,
    /// Length of the UDP payload on the wire (may exceed `len`).
    pub wire_len: u32,
    pub family: u16,
    /// The DNS server's port, host byte order.
    pub server_port: u16,
    pub _pad: u32,
    /// The DNS server's address, network byte order.
    pub server_addr: [u8; 16],
    pub payload: [u8; DNS_LEN],
}

pub const SIGNAL_SYSCALL_KILL: u32 = 1;
pub const SIGNAL_SYSCALL_TKILL: u32 = 2;
pub const SIGNAL_SYSCALL_TGKILL: u32 = 3;
/// `SignalEvent::syscall` flag: the low bits are the number (of the agent's architecture) of the
/// syscall that sent the signal, seen by the LSM or fentry hook on `security_task_kill`.
pub const SIGNAL_SYSCALL_NR: u32 = 1 << 31;

/// A signal sent to the agent (by any process).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SignalEvent {
    pub header: EventHeader,
    pub target_pid: u32,
    pub signal: u32,
    /// `SIGNAL_SYSCALL_*`, or `SIGNAL_SYSCALL_NR` | a syscall number.
    pub syscall: u32,
    pub _pad: u32,
}

/// A `bpf()` call by a job process.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BpfEvent {
    pub header: EventHeader,
    pub cmd: u32,
    pub _pad: u32,
}

/// A successful `chdir`/`fchdir` by a job process, so the agent can resolve relative paths.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ChdirEvent {
    pub header: EventHeader,
    /// -1 for `chdir(path)`, the fd for `fchdir(fd)`.
    pub fd: i32,
    pub path_len: u32,
    pub path: [u8; PATH_LEN],
}

/// Environment variables scanned at most per exec (the rest are not looked at; counted by
/// `HEADER_TRUNCATED` on the `JobEnvEvent`, and a marker among them is missed).
pub const JOB_ENV_MAX_VARS: u32 = 512;
/// Variables whose name passes the 7-byte prefix filter that are looked at in full per exec.
pub const JOB_ENV_MAX_CANDIDATES: u32 = 32;
/// Identity values carried out of the kernel per exec at most.
pub const JOB_ENV_MAX_VALUES: usize = 16;
/// Bytes of one identity value (with its NUL); a longer value is cut.
pub const JOB_ENV_VALUE_LEN: usize = 128;

/// `NAMES` value of a `NAME_KIND_ENV_VAR` key: the variable's index in the agent's table
/// (`JOB_ENV_INDEX`), and what it is.
pub const JOB_ENV_INDEX: u32 = 0xffff;
/// The variable is a job marker: a process outside any job that has it becomes a job root.
pub const JOB_ENV_MARKER: u32 = 1 << 31;
/// The variable is an identity field: its value (only its) is copied out of the kernel.
pub const JOB_ENV_VALUE: u32 = 1 << 30;

/// One environment variable of a job's identity found at exec.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct JobEnvValue {
    /// The `NAMES` value of its name: index and `JOB_ENV_*` bits.
    pub var: u32,
    /// Bytes of `value` used (without NUL); 0 when the value is not copied (a marker only).
    pub len: u32,
    pub value: [u8; JOB_ENV_VALUE_LEN],
}

/// The identity values of one exec's new environment: only variables the policy names as
/// identity fields have a value here; no other variable ever leaves the kernel.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct JobEnvEvent {
    pub header: EventHeader,
    /// Entries of `values` used.
    pub count: u32,
    /// Markers among them.
    pub markers: u32,
    pub values: [JobEnvValue; JOB_ENV_MAX_VALUES],
}

/// Value of the process map: which job a process belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessJob {
    pub job: u64,
    /// Parent tgid recorded at fork; 0 for a root.
    pub ppid: u32,
    /// `PROCESS_*` bits.
    pub flags: u32,
    /// When the process started, in CLOCK_BOOTTIME ns (the clock of /proc/PID/stat's start
    /// time); 0 when unknown. Tells a live process from a later one that reused its pid.
    pub start_ns: u64,
}

/// `ProcessJob::flags`: this process is the job's root.
pub const PROCESS_JOB_ROOT: u32 = 1;
/// `ProcessJob::flags`: this process joined its job at exec, in the cgroup of a container the
/// job started (`runner-monitor-ebpf/src/containers.rs`).
pub const PROCESS_CONTAINER: u32 = 1 << 1;

/// Value of the job map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobState {
    /// tgid of the root process.
    pub root_tgid: u32,
    /// `JOB_*` bits.
    pub flags: u32,
    /// When the job started (ktime ns).
    pub started_ns: u64,
    /// When the job ended (ktime ns), 0 while it runs.
    pub ended_ns: u64,
}

/// `JobState::flags`: the job has ended.
pub const JOB_ENDED: u32 = 1;
/// `JobState::flags`: the job was registered by the agent (its end comes from the agent too).
pub const JOB_REGISTERED: u32 = 1 << 1;

/// Job keys the agent hands out have this bit set; keys made in the kernel never do.
pub const AGENT_JOB_KEY_BIT: u64 = 1 << 63;

mod names;
pub use names::*;

pub mod counter;

mod egress;
pub use egress::*;

pub mod map_name;

/// Length of a job's event-budget window.
pub const BUDGET_WINDOW_NS: u64 = 100_000_000;

/// A job's use of its event budget (value of `JOB_BUDGETS`, keyed by job). Updated without
/// atomics from every CPU: the counts are close, not exact.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JobBudget {
    /// Start of the current window (ktime ns).
    pub window_ns: u64,
    /// Events of the job in the current window.
    pub count: u64,
    /// Events dropped because the job was over budget, since the job was first seen.
    pub dropped: u64,
}

/// Indexes of the kernel's `SETTINGS` array, which the agent writes at load and on reload.
pub mod setting;

/// Capacity of the kernel's process map: job processes alive at once.
pub const MAX_TRACKED_PROCESSES: u32 = 65536;
/// Capacity of the kernel's job map: jobs running or ended with survivors.
pub const MAX_JOBS: u32 = 4096;
/// Size of the ring buffer in bytes.
pub const RING_BUFFER_BYTES: u32 = 16 << 20;
/// Backlog in the ring buffer at which the producer wakes the agent early; below it the agent
/// finds the records on its next poll, every `WAKEUP_POLL_MS`.
pub const WAKEUP_BYTES: u64 = 256 << 10;
/// How often the agent polls the ring buffer when nobody woke it.
pub const WAKEUP_POLL_MS: u64 = 2;
/// Polls in a row that find nothing before the reader sleeps (`setting::READER_ASLEEP`).
pub const READER_IDLE_POLLS: u32 = 25;
/// How often a sleeping reader looks all the same (a record written while it fell asleep).
pub const READER_SLEEP_POLL_MS: u64 = 50;

macro_rules! assert_size {
    ($t:ty, $size:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $size);
    };
}
assert_size!(EventHeader, 64);
assert_size!(ForkEvent, 72);
assert_size!(ExecEvent, 64 + 16 + PATH_LEN + ARGV_LEN);
assert_size!(ExitEvent, 72);
assert_size!(FileEvent, 64 + 40 + 2 * PATH_LEN);
assert_size!(ProcessAccessEvent, 80);
assert_size!(ConnectEvent, 64 + 16 + 16 + 8 + UNIX_PATH_LEN + 4);
assert_size!(DnsEvent, 64 + 16 + 16 + DNS_LEN);
assert_size!(SignalEvent, 80);
assert_size!(
    ContainerEvent,
    64 + 24 + 2 * container::CONTAINER_ID_LEN + container::CGROUP_PATH_LEN
);
assert_size!(BpfEvent, 72);
assert_size!(ChdirEvent, 64 + 8 + PATH_LEN);
assert_size!(JobEnvValue, 8 + JOB_ENV_VALUE_LEN);
assert_size!(
    JobEnvEvent,
    64 + 8 + JOB_ENV_MAX_VALUES * (8 + JOB_ENV_VALUE_LEN)
);
assert_size!(ProcessJob, 24);
assert_size!(JobState, 24);
assert_size!(JobBudget, 24);
assert_size!(NameKey, 8 + NAME_LEN);

pub mod io_uring;
pub use io_uring::IoUringSetupEvent;
pub mod container;
pub use container::{
    CONTAINER_ID_LEN, ContainerEvent, ContainerStartEvent, ExecTarget, OpenBuild, PendingStart,
};
pub mod tls;
pub use tls::*;

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: plain `#[repr(C)]` data without padding (sizes asserted above); every bit pattern
    // is a valid value.
    unsafe impl aya::Pod for ProcessJob {}
    unsafe impl aya::Pod for JobState {}
    unsafe impl aya::Pod for JobBudget {}
    unsafe impl aya::Pod for NameKey {}
}
