//! Ring-buffer records -> `Event`s.
//!
//! Nothing the kernel wrote is trusted: every record's length is checked before it is copied into
//! its struct (never a pointer cast: records are only 8-byte aligned by luck), every length field
//! is clamped to its buffer, and bytes become strings lossily.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use runner_monitor_common::{
    ACCESS_BY_SYSCALL, AF_INET, AF_INET6, AF_PACKET, AF_UNIX, BpfEvent, CONNECT_BLOCKED,
    CONNECT_DNS_REDIRECTED, CONNECT_QUIC, CONNECT_RAW_SOCKET, CONNECT_UDP_SEND, ChdirEvent,
    ConnectEvent, ContainerEvent, ContainerStartEvent, DnsEvent, EXIT_CODE_KNOWN,
    EXIT_KILLED_BY_SIGNAL, EventHeader, EventKind, ExecEvent, ExitEvent, FileEvent, ForkEvent,
    HEADER_IO_URING, HEADER_JOB_ENDED, HEADER_JOB_ROOT, HEADER_TRUNCATED, IoUringSetupEvent,
    JobEnvEvent, MATCH_BASENAME, MATCH_DIRNAME, MATCH_PREFIX, MATCH_PROC_MEMORY, MATCH_SECOND_PATH,
    PTRACE_ATTACH, PTRACE_PEEKDATA, PTRACE_PEEKTEXT, PTRACE_PEEKUSER, PTRACE_SEIZE,
    ProcessAccessEvent, SIGNAL_SYSCALL_KILL, SIGNAL_SYSCALL_NR, SIGNAL_SYSCALL_TGKILL,
    SIGNAL_SYSCALL_TKILL, SOCK_RAW, SignalEvent, TLS_BLOCKED, TLS_NO_SNI, TLS_SNI_TRUNCATED,
    TlsEvent, container,
    container::{
        RUNTIME_SENT_MORE, RuntimeSentEvent, SENT_BY_PROVIDED_BUFFER, SENT_BY_SENDFILE,
        SENT_BY_SENDMMSG, SENT_BY_SPLICE,
    },
};

use super::{dns, paths::WorkingDirectories};
use crate::event::{
    Connect, ContainerInfo, Event, EventDetail, FileAccess, JobKey, JobRef, ProcessRef, RawSocket,
    RawSocketKind, RequestedAs, SentBytes, SentVia, SocketFamily, TlsHello,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than the {needed} bytes of its kind")]
    Short { len: usize, needed: usize },
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
    /// The kernel sends connects of inet, inet6 and unix sockets only.
    #[error("connect record with address family {0}")]
    UnknownFamily(u16),
}

/// Copies a `T` out of the front of `bytes` after checking the length.
fn read<T: Copy>(bytes: &[u8]) -> Result<T, DecodeError> {
    let needed = std::mem::size_of::<T>();
    if bytes.len() < needed {
        return Err(DecodeError::Short {
            len: bytes.len(),
            needed,
        });
    }
    // SAFETY: `bytes` holds at least size_of::<T>() bytes; T is one of the plain-old-data event
    // structs of runner-monitor-common (integers and byte arrays only), valid for any bits;
    // read_unaligned makes no alignment assumption.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// A `T` from a record that may stop short of its end (down to `min` bytes), the rest zero: a
/// file event without a second path is sent cut after its first path (`emit::send_file`).
fn read_prefix<T: Copy>(bytes: &[u8], min: usize) -> Result<T, DecodeError> {
    let whole = std::mem::size_of::<T>();
    if bytes.len() >= whole {
        return read(bytes);
    }
    if bytes.len() < min {
        return Err(DecodeError::Short {
            len: bytes.len(),
            needed: min,
        });
    }
    // SAFETY: T is one of the plain-old-data event structs (see `read`), valid all zero; at most
    // `whole` bytes are copied into it.
    unsafe {
        let mut value = std::mem::MaybeUninit::<T>::zeroed();
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), value.as_mut_ptr().cast::<u8>(), bytes.len());
        Ok(value.assume_init())
    }
}

/// A `TlsEvent`'s destination and server name.
fn tls_hello(e: &TlsEvent) -> Result<TlsHello, DecodeError> {
    let ip = ip(e.family, &e.addr).ok_or(DecodeError::UnknownFamily(e.family))?;
    let name = &e.sni[..(e.sni_len as usize).min(e.sni.len())];
    Ok(TlsHello {
        ip,
        port: e.port,
        sni: (e.flags & TLS_NO_SNI == 0 && !name.is_empty()).then(|| lossy(name)),
        sni_truncated: e.flags & TLS_SNI_TRUNCATED != 0,
        blocked: e.flags & TLS_BLOCKED != 0,
    })
}

/// The first `len` bytes of `buf` (clamped), up to the first NUL.
fn c_bytes(buf: &[u8], len: u32) -> &[u8] {
    let bytes = &buf[..(len as usize).min(buf.len())];
    match bytes.iter().position(|b| *b == 0) {
        Some(end) => &bytes[..end],
        None => bytes,
    }
}

fn lossy(bytes: &[u8]) -> String {
    // Valid UTF-8 (nearly every path and name) is checked by the faster validator and copied.
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_owned(),
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

/// Peeks at a record's kind without decoding it.
pub fn kind_of(bytes: &[u8]) -> Option<EventKind> {
    let kind: u32 = read(bytes).ok()?;
    EventKind::from_u32(kind)
}

/// Decodes records, following job processes' working directories to resolve relative paths.
pub struct Decoder {
    cwd: WorkingDirectories,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    pub fn new() -> Self {
        Self {
            cwd: WorkingDirectories::new(),
        }
    }

    pub fn with_working_directories(cwd: WorkingDirectories) -> Self {
        Self { cwd }
    }

    pub fn decode(&mut self, bytes: &[u8]) -> Result<Event, DecodeError> {
        let header: EventHeader = read(bytes)?;
        let kind = EventKind::from_u32(header.kind).ok_or(DecodeError::UnknownKind(header.kind))?;
        let detail = match kind {
            EventKind::Fork => {
                let e: ForkEvent = read(bytes)?;
                self.cwd.fork(header.tgid, e.child_tgid);
                EventDetail::Fork {
                    child_pid: e.child_tgid,
                }
            }
            EventKind::Exec => {
                let e: ExecEvent = read(bytes)?;
                let argv = c_split(&e.argv, e.argv_len);
                EventDetail::Exec {
                    filename: lossy(c_bytes(&e.filename, e.filename_len)),
                    argv,
                    argc: e.argc,
                }
            }
            EventKind::Exit => {
                let e: ExitEvent = read(bytes)?;
                self.cwd.exit(header.tgid);
                EventDetail::Exit {
                    exit_code: (e.flags & EXIT_CODE_KNOWN != 0).then_some(e.exit_code),
                    signal: (e.flags & EXIT_KILLED_BY_SIGNAL != 0).then_some(e.exit_code),
                }
            }
            EventKind::FileOpen
            | EventKind::FileRename
            | EventKind::FileUnlink
            | EventKind::FileLink => {
                let at = std::mem::offset_of!(FileEvent, path);
                let e: FileEvent = read_prefix(bytes, at)?;
                // Cut only after a whole first path, and only when there is no second one.
                let needed = at + (e.path_len as usize).min(runner_monitor_common::PATH_LEN);
                if bytes.len() < std::mem::size_of::<FileEvent>()
                    && (e.path2_len != 0 || bytes.len() < needed)
                {
                    return Err(DecodeError::Short {
                        len: bytes.len(),
                        needed,
                    });
                }
                let access = self.file_access(&header, &e, kind);
                match kind {
                    EventKind::FileOpen => EventDetail::FileOpen(access),
                    EventKind::FileRename => EventDetail::FileRename(access),
                    EventKind::FileUnlink => EventDetail::FileUnlink(access),
                    _ => EventDetail::FileLink(access),
                }
            }
            EventKind::Ptrace => {
                let e: ProcessAccessEvent = read(bytes)?;
                EventDetail::Ptrace {
                    request: ptrace_request_name(e.request),
                    target_pid: e.target_pid,
                    targets_agent: e.targets_agent != 0,
                }
            }
            EventKind::ProcessVmRead => {
                let e: ProcessAccessEvent = read(bytes)?;
                EventDetail::ProcessVmRead {
                    target_pid: e.target_pid,
                    targets_agent: e.targets_agent != 0,
                }
            }
            EventKind::Connect => {
                let e: ConnectEvent = read(bytes)?;
                let mut c = connect(&e)?;
                c.io_uring = header.flags & HEADER_IO_URING != 0;
                EventDetail::Connect(c)
            }
            EventKind::DnsQuery | EventKind::DnsAnswer => {
                let e: DnsEvent = read(bytes)?;
                let len = (e.len as usize).min(e.payload.len());
                let server =
                    ip(e.family, &e.server_addr).unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
                let parsed = dns::parse(&e.payload[..len], server, e.server_port);
                if kind == EventKind::DnsQuery {
                    EventDetail::DnsQuery(parsed)
                } else {
                    EventDetail::DnsAnswer(parsed)
                }
            }
            EventKind::TlsClientHello => {
                let e: TlsEvent = read(bytes)?;
                EventDetail::TlsClientHello(tls_hello(&e)?)
            }
            EventKind::Signal => {
                let e: SignalEvent = read(bytes)?;
                EventDetail::Signal {
                    target_pid: e.target_pid,
                    signal: e.signal,
                    syscall: signal_syscall_name(e.syscall),
                }
            }
            EventKind::Bpf => {
                let e: BpfEvent = read(bytes)?;
                EventDetail::Bpf {
                    cmd: e.cmd,
                    cmd_name: bpf_cmd_name(e.cmd).to_owned(),
                }
            }
            EventKind::JobEnv => {
                let e: JobEnvEvent = read(bytes)?;
                let count = (e.count as usize).min(e.values.len());
                EventDetail::JobEnv {
                    values: e.values[..count]
                        .iter()
                        .map(|v| (v.var, lossy(c_bytes(&v.value, v.len))))
                        .collect(),
                }
            }
            EventKind::IoUringSetup => {
                let e: IoUringSetupEvent = read(bytes)?;
                EventDetail::IoUringSetup {
                    fd: e.fd,
                    sq_entries: e.sq_entries,
                    cq_entries: e.cq_entries,
                    flags: e.flags,
                    sqpoll: e.flags & runner_monitor_common::io_uring::IORING_SETUP_SQPOLL != 0,
                }
            }
            EventKind::Container => {
                let e: ContainerEvent = read(bytes)?;
                let path = lossy(c_bytes(&e.path, e.path_len));
                // A BuildKit step's id is shorter, NUL-padded.
                let id = lossy(c_bytes(&e.id, e.id.len() as u32));
                let mut info = ContainerInfo::new(id, path, e.cgroup_id);
                let by = match e.matched {
                    container::MATCHED_BY_SHORT_ID => Some("short-id"),
                    container::MATCHED_BY_NAME => Some("name"),
                    container::MATCHED_BY_BUILD | container::MATCHED_BY_BUILD_CONTESTED => {
                        Some("build")
                    }
                    _ => None,
                };
                info.exec_only = e.matched == container::MATCHED_BY_EXEC;
                info.requested_as = by.map(|by| RequestedAs {
                    reference: lossy(c_bytes(&e.reference, e.reference.len() as u32)),
                    by: by.to_owned(),
                    waited_us: e.waited_ns / 1000,
                    // Builds of several jobs were open: the oldest's job is a guess.
                    confirmed: (e.matched == container::MATCHED_BY_BUILD_CONTESTED)
                        .then_some(false),
                    resolved_us: None,
                });
                EventDetail::Container(info)
            }
            EventKind::ContainerStart => {
                let e: ContainerStartEvent = read(bytes)?;
                EventDetail::ContainerStart {
                    reference: lossy(c_bytes(&e.reference, e.len)),
                    slot: e.slot,
                    pending_ns: e.ts_ns,
                }
            }
            EventKind::ContainerExec => {
                let e: ContainerStartEvent = read(bytes)?;
                EventDetail::ContainerExec {
                    reference: lossy(c_bytes(&e.reference, e.len)),
                }
            }
            EventKind::RuntimeSent => {
                // Cut after the bytes read (`emit::send_runtime_sent`).
                let e: RuntimeSentEvent =
                    read_prefix(bytes, std::mem::offset_of!(RuntimeSentEvent, data))?;
                let captured = (e.captured as usize).min(e.data.len());
                EventDetail::RuntimeSent {
                    conn: e.conn,
                    buffer: u32::from(e.buffer),
                    len: (e.len != RUNTIME_SENT_MORE).then_some(e.len),
                    data: SentBytes(e.data[..captured].to_vec()),
                    via: match e.via {
                        SENT_BY_SENDFILE => SentVia::Sendfile,
                        SENT_BY_SPLICE => SentVia::Splice,
                        SENT_BY_SENDMMSG => SentVia::Sendmmsg,
                        SENT_BY_PROVIDED_BUFFER => SentVia::ProvidedBuffer,
                        _ => SentVia::Buffer,
                    },
                    io_uring: header.flags & HEADER_IO_URING != 0,
                }
            }
            EventKind::Chdir => {
                let e: ChdirEvent = read(bytes)?;
                let raw = lossy(c_bytes(&e.path, e.path_len));
                match self.cwd.chdir(header.tgid, e.fd, &raw) {
                    Some(path) => EventDetail::Chdir {
                        path,
                        resolved: true,
                    },
                    None => EventDetail::Chdir {
                        path: raw,
                        resolved: false,
                    },
                }
            }
        };
        Ok(Event {
            time_ns: header.ts_ns,
            job: (header.job != 0).then_some(JobRef {
                key: JobKey(header.job),
                ended: header.flags & HEADER_JOB_ENDED != 0,
                root: header.flags & HEADER_JOB_ROOT != 0,
            }),
            process: ProcessRef {
                pid: header.tgid,
                tid: header.pid,
                ppid: header.ppid,
                uid: header.uid,
                comm: lossy(c_bytes(&header.comm, header.comm.len() as u32)),
                cgroup_id: header.cgroup_id,
            },
            truncated: header.flags & HEADER_TRUNCATED != 0,
            detail,
        })
    }

    fn file_access(&mut self, header: &EventHeader, e: &FileEvent, kind: EventKind) -> FileAccess {
        let raw_path = lossy(c_bytes(&e.path, e.path_len));
        let (path, resolved) = self.cwd.resolve(header.tgid, e.dirfd, &raw_path);
        let new_path = (kind == EventKind::FileRename || kind == EventKind::FileLink).then(|| {
            let raw = lossy(c_bytes(&e.path2, e.path2_len));
            self.cwd.resolve(header.tgid, e.dirfd2, &raw).0
        });
        let mut matched = Vec::new();
        for (bit, name) in [
            (MATCH_BASENAME, "basename"),
            (MATCH_DIRNAME, "dirname"),
            (MATCH_PREFIX, "prefix"),
            (MATCH_PROC_MEMORY, "proc_memory"),
            (MATCH_SECOND_PATH, "new_path"),
        ] {
            if e.matched & bit != 0 {
                matched.push(name.into());
            }
        }
        const WRITE_FLAGS: u32 =
            (libc::O_WRONLY | libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC) as u32;
        FileAccess {
            path,
            raw_path,
            resolved,
            new_path,
            flags: e.flags,
            write: kind == EventKind::FileOpen && e.flags & WRITE_FLAGS != 0,
            result: e.result,
            matched,
            target_pid: (e.matched & MATCH_PROC_MEMORY != 0).then_some(e.target_pid),
            fingerprint: None,
            io_uring: header.flags & HEADER_IO_URING != 0,
            via: None,
        }
    }
}

/// NUL-separated arguments, the first `len` bytes of `buf`.
fn c_split(buf: &[u8], len: u32) -> Vec<String> {
    let bytes = &buf[..(len as usize).min(buf.len())];
    let bytes = bytes.strip_suffix(&[0]).unwrap_or(bytes);
    if bytes.is_empty() {
        return Vec::new();
    }
    bytes.split(|b| *b == 0).map(lossy).collect()
}

fn ip(family: u16, addr: &[u8; 16]) -> Option<IpAddr> {
    match family {
        AF_INET => Some(IpAddr::V4(Ipv4Addr::new(
            addr[0], addr[1], addr[2], addr[3],
        ))),
        AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(*addr))),
        _ => None,
    }
}

fn connect(e: &ConnectEvent) -> Result<Connect, DecodeError> {
    if e.flags & CONNECT_RAW_SOCKET != 0 {
        return raw_socket(e);
    }
    let (family, unix_path) = match e.family {
        AF_INET => (SocketFamily::Inet, None),
        AF_INET6 => (SocketFamily::Inet6, None),
        AF_UNIX => {
            let len = (e.unix_path_len as usize).min(e.unix_path.len());
            let bytes = &e.unix_path[..len];
            // Abstract names start with NUL and are not NUL-terminated; shown with '@' like ss(8).
            let path = if bytes.first() == Some(&0) {
                format!("@{}", lossy(&bytes[1..]).trim_end_matches('\0'))
            } else {
                lossy(c_bytes(bytes, len as u32))
            };
            (SocketFamily::Unix, Some(path))
        }
        // Not a record the kernel writes (a debug assertion used to panic on it, found by the
        // `decode` fuzz target): an error, counted like any undecodable record.
        other => return Err(DecodeError::UnknownFamily(other)),
    };
    let is_inet = e.family == AF_INET || e.family == AF_INET6;
    Ok(Connect {
        family,
        ip: ip(e.family, &e.addr),
        port: is_inet.then_some(e.port),
        unix_path,
        fd: e.fd,
        result: e.result,
        io_uring: false,
        blocked: e.flags & CONNECT_BLOCKED != 0,
        udp_send: e.flags & CONNECT_UDP_SEND != 0,
        raw_socket: None,
        via: None,
        dns_redirected: e.flags & CONNECT_DNS_REDIRECTED != 0,
        quic: e.flags & CONNECT_QUIC != 0,
    })
}

/// A raw, packet or ICMP socket created by a job process (`CONNECT_RAW_SOCKET`).
fn raw_socket(e: &ConnectEvent) -> Result<Connect, DecodeError> {
    let family = match e.family {
        AF_INET => SocketFamily::Inet,
        AF_INET6 => SocketFamily::Inet6,
        AF_PACKET => SocketFamily::Packet,
        other => return Err(DecodeError::UnknownFamily(other)),
    };
    let kind = match (e.family, u16::from(e.addr[0])) {
        (AF_PACKET, _) => RawSocketKind::Packet,
        (_, SOCK_RAW) => RawSocketKind::Raw,
        _ => RawSocketKind::Icmp,
    };
    Ok(Connect {
        family,
        ip: None,
        port: None,
        unix_path: None,
        fd: e.fd,
        result: e.result,
        io_uring: false,
        blocked: e.flags & CONNECT_BLOCKED != 0,
        udp_send: false,
        raw_socket: Some(RawSocket {
            kind,
            protocol: e.port,
        }),
        via: None,
        dns_redirected: false,
        quic: false,
    })
}

/// The syscall that sent a signal: named by the tracepoint that saw it, or by its number (the
/// LSM and fentry hooks on `security_task_kill`).
fn signal_syscall_name(syscall: u32) -> String {
    match syscall {
        SIGNAL_SYSCALL_KILL => "kill".to_owned(),
        SIGNAL_SYSCALL_TKILL => "tkill".to_owned(),
        SIGNAL_SYSCALL_TGKILL => "tgkill".to_owned(),
        nr if nr & SIGNAL_SYSCALL_NR != 0 => syscall_number_name(nr & !SIGNAL_SYSCALL_NR),
        _ => "unknown".to_owned(),
    }
}

/// "pidfd_send_signal", or "syscall-N" for one the agent does not name.
fn syscall_number_name(nr: u32) -> String {
    crate::sensor::task_hooks::syscall_name(nr)
        .map_or_else(|| format!("syscall-{nr}"), str::to_owned)
}

fn ptrace_request_name(request: u64) -> String {
    match request {
        // Another syscall's attach check (the LSM or fentry hook): the syscall names it.
        r if r & ACCESS_BY_SYSCALL != 0 => syscall_number_name(r as u32),
        PTRACE_ATTACH => "attach".to_owned(),
        PTRACE_SEIZE => "seize".to_owned(),
        PTRACE_PEEKTEXT => "peektext".to_owned(),
        PTRACE_PEEKDATA => "peekdata".to_owned(),
        PTRACE_PEEKUSER => "peekuser".to_owned(),
        other => format!("request-{other}"),
    }
}

fn bpf_cmd_name(cmd: u32) -> &'static str {
    match cmd {
        0 => "map_create",
        1 => "map_lookup_elem",
        2 => "map_update_elem",
        3 => "map_delete_elem",
        4 => "map_get_next_key",
        5 => "prog_load",
        6 => "obj_pin",
        7 => "obj_get",
        8 => "prog_attach",
        9 => "prog_detach",
        13 => "prog_get_fd_by_id",
        14 => "map_get_fd_by_id",
        15 => "obj_get_info_by_fd",
        17 => "raw_tracepoint_open",
        28 => "link_create",
        _ => "other",
    }
}

#[cfg(test)]
mod tests;
