//! Ring-buffer records -> `Event`s.
//!
//! Nothing the kernel wrote is trusted: every record's length is checked before it is copied into
//! its struct (never a pointer cast: records are only 8-byte aligned by luck), every length field
//! is clamped to its buffer, and bytes become strings lossily.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use runner_monitor_common::{
    AF_INET, AF_INET6, AF_UNIX, BpfEvent, CONNECT_BLOCKED, CONNECT_DNS_REDIRECTED,
    CONNECT_UDP_SEND, ChdirEvent, ConnectEvent, DnsEvent, EXIT_CODE_KNOWN, EventHeader, EventKind,
    ExecEvent, ExitEvent, FileEvent, ForkEvent, HEADER_IO_URING, HEADER_JOB_ENDED, HEADER_JOB_ROOT,
    HEADER_TRUNCATED, IoUringSetupEvent, JobEnvEvent, MATCH_BASENAME, MATCH_DIRNAME, MATCH_PREFIX,
    MATCH_PROC_MEMORY, MATCH_SECOND_PATH, PTRACE_ATTACH, PTRACE_PEEKDATA, PTRACE_PEEKTEXT,
    PTRACE_PEEKUSER, PTRACE_SEIZE, ProcessAccessEvent, SIGNAL_SYSCALL_KILL, SIGNAL_SYSCALL_TGKILL,
    SIGNAL_SYSCALL_TKILL, SignalEvent,
};

use super::{dns, paths::WorkingDirectories};
use crate::event::{
    Connect, Event, EventDetail, FileAccess, JobKey, JobRef, ProcessRef, SocketFamily,
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

/// The first `len` bytes of `buf` (clamped), up to the first NUL.
fn c_bytes(buf: &[u8], len: u32) -> &[u8] {
    let bytes = &buf[..(len as usize).min(buf.len())];
    match bytes.iter().position(|b| *b == 0) {
        Some(end) => &bytes[..end],
        None => bytes,
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
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
                }
            }
            EventKind::FileOpen
            | EventKind::FileRename
            | EventKind::FileUnlink
            | EventKind::FileLink => {
                let e: FileEvent = read(bytes)?;
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
            EventKind::Signal => {
                let e: SignalEvent = read(bytes)?;
                EventDetail::Signal {
                    target_pid: e.target_pid,
                    signal: e.signal,
                    syscall: match e.syscall {
                        SIGNAL_SYSCALL_KILL => "kill",
                        SIGNAL_SYSCALL_TKILL => "tkill",
                        SIGNAL_SYSCALL_TGKILL => "tgkill",
                        _ => "unknown",
                    }
                    .to_owned(),
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
                matched.push(name.to_owned());
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
        dns_redirected: e.flags & CONNECT_DNS_REDIRECTED != 0,
    })
}

fn ptrace_request_name(request: u64) -> String {
    match request {
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
mod tests {
    use runner_monitor_common::{AT_FDCWD, PATH_LEN};

    use super::*;
    use crate::sensor::paths::WorkingDirectories;

    fn header(kind: EventKind) -> EventHeader {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"cat\0");
        EventHeader {
            kind: kind as u32,
            flags: HEADER_JOB_ENDED,
            ts_ns: 42,
            job: 7,
            cgroup_id: 1,
            pid: 101,
            tgid: 100,
            ppid: 99,
            uid: 1000,
            comm,
        }
    }

    fn bytes_of<T: Copy>(value: &T) -> Vec<u8> {
        // SAFETY: T is a padding-free plain-old-data event struct.
        unsafe {
            std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>())
        }
        .to_vec()
    }

    fn file_event(path: &[u8], dirfd: i32) -> FileEvent {
        let mut e = FileEvent {
            header: header(EventKind::FileOpen),
            result: 3,
            dirfd,
            dirfd2: 0,
            flags: 0,
            matched: MATCH_BASENAME,
            target_pid: 0,
            path_len: path.len() as u32,
            path2_len: 0,
            _pad: 0,
            path: [0; PATH_LEN],
            path2: [0; PATH_LEN],
        };
        e.path[..path.len()].copy_from_slice(path);
        e
    }

    fn decoder() -> Decoder {
        Decoder::with_working_directories(WorkingDirectories::with_proc_root("/nonexistent"))
    }

    #[test]
    fn open_of_absolute_credential_path_decodes_with_job_and_process() {
        let e = file_event(b"/root/./.docker//config.json", AT_FDCWD);
        let event = decoder().decode(&bytes_of(&e)).unwrap();
        assert_eq!(event.time_ns, 42);
        let job = event.job.unwrap();
        assert_eq!(job.key, JobKey(7));
        assert!(job.ended);
        assert_eq!(event.process.pid, 100);
        assert_eq!(event.process.tid, 101);
        assert_eq!(event.process.comm, "cat");
        match event.detail {
            EventDetail::FileOpen(f) => {
                assert_eq!(f.path, "/root/.docker/config.json");
                assert_eq!(f.raw_path, "/root/./.docker//config.json");
                assert!(f.resolved);
                assert_eq!(f.result, 3);
                assert_eq!(f.matched, ["basename"]);
            }
            other => panic!("expected a file open, got {other:?}"),
        }
    }

    #[test]
    fn lengths_from_the_kernel_are_clamped() {
        let mut e = file_event(b"/x/credentials", AT_FDCWD);
        e.path_len = u32::MAX;
        let event = decoder().decode(&bytes_of(&e)).unwrap();
        let EventDetail::FileOpen(f) = event.detail else {
            panic!("expected a file open");
        };
        assert_eq!(f.raw_path, "/x/credentials");
    }

    #[test]
    fn short_and_unknown_records_are_errors_not_panics() {
        let e = file_event(b"/x", AT_FDCWD);
        let bytes = bytes_of(&e);
        let mut d = decoder();
        for cut in [0, 3, 63, 64, 100, bytes.len() - 1] {
            assert!(
                matches!(d.decode(&bytes[..cut]), Err(DecodeError::Short { .. })),
                "cut at {cut}"
            );
        }
        let mut h = header(EventKind::Fork);
        h.kind = 999;
        assert_eq!(d.decode(&bytes_of(&h)), Err(DecodeError::UnknownKind(999)));
    }

    #[test]
    fn hostile_bytes_become_escaped_json() {
        let e = file_event(
            b"/tmp/\n{\"kind\":\"forged\"}\x1b[31m\xff/credentials",
            AT_FDCWD,
        );
        let event = decoder().decode(&bytes_of(&e)).unwrap();
        let line = serde_json::to_string(&event).unwrap();
        assert!(!line.contains('\n'));
        assert!(!line.contains('\x1b'));
        assert!(line.contains("\\n"));
        assert!(line.contains("\\u001b"));
        let back: Event = serde_json::from_str(&line).unwrap();
        assert_eq!(back, event);
    }

    #[test]
    fn connect_record_of_an_unknown_address_family_is_an_error_not_a_panic() {
        // The `decode` fuzz target's first crash: family 0 hit a debug assertion.
        let e = ConnectEvent {
            header: header(EventKind::Connect),
            result: 0,
            fd: 3,
            family: 0,
            port: 0,
            addr: [0; 16],
            unix_path_len: 0,
            flags: 0,
            unix_path: [0; 108],
            _pad2: [0; 4],
        };
        assert_eq!(
            decoder().decode(&bytes_of(&e)),
            Err(DecodeError::UnknownFamily(0))
        );
    }

    #[test]
    fn del_and_c1_controls_from_the_kernel_are_escaped_in_the_json_line() {
        // The `decode` fuzz target's second finding: serde_json leaves DEL and the C1 controls
        // (U+009B is CSI to a terminal) raw; the agent's JSON lines escape them.
        let mut e = file_event(b"/tmp/\xc2\x9b2J\x7f/credentials", AT_FDCWD);
        e.header.comm[..6].copy_from_slice(b"\x7f\xc2\x9b31m");
        let event = decoder().decode(&bytes_of(&e)).unwrap();
        assert_eq!(event.process.comm, "\u{7f}\u{9b}31m");
        let line = crate::jsonl::line_string(&event).unwrap();
        assert!(!line.contains(char::is_control), "{line:?}");
        assert!(line.contains(r"/tmp/\u009b2J\u007f/credentials"), "{line}");
        let back: Event = serde_json::from_str(&line).unwrap();
        assert_eq!(back, event);
    }

    #[test]
    fn exec_arguments_are_split() {
        let mut e = ExecEvent {
            header: header(EventKind::Exec),
            filename_len: 8,
            argv_len: 0,
            argc: 3,
            _pad: 0,
            filename: [0; PATH_LEN],
            argv: [0; runner_monitor_common::ARGV_LEN],
        };
        e.filename[..8].copy_from_slice(b"/bin/cat");
        let argv = b"cat\0-n\0\0";
        e.argv[..argv.len()].copy_from_slice(argv);
        e.argv_len = argv.len() as u32;
        let event = decoder().decode(&bytes_of(&e)).unwrap();
        match event.detail {
            EventDetail::Exec {
                filename,
                argv,
                argc,
            } => {
                assert_eq!(filename, "/bin/cat");
                assert_eq!(argv, ["cat", "-n", ""]);
                assert_eq!(argc, 3);
            }
            other => panic!("expected exec, got {other:?}"),
        }
    }

    #[test]
    fn unix_and_inet_connects_decode() {
        let mut e = ConnectEvent {
            header: header(EventKind::Connect),
            result: -111,
            fd: 3,
            family: AF_INET,
            port: 8080,
            addr: [0; 16],
            unix_path_len: 0,
            flags: 0,
            unix_path: [0; 108],
            _pad2: [0; 4],
        };
        e.addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let c = connect(&e).unwrap();
        assert_eq!(c.ip, Some("127.0.0.1".parse().unwrap()));
        assert_eq!(c.port, Some(8080));
        assert_eq!(c.result, -111);
        assert!(!c.blocked && !c.udp_send);

        e.flags = CONNECT_BLOCKED | CONNECT_UDP_SEND;
        e.result = -1;
        let c = connect(&e).unwrap();
        assert!(
            c.blocked && c.udp_send,
            "the kernel's verdict and operation decode"
        );
        e.flags = 0;

        e.family = AF_UNIX;
        let path = b"/run/docker.sock\0";
        e.unix_path[..path.len()].copy_from_slice(path);
        e.unix_path_len = 200;
        let c = connect(&e).unwrap();
        assert_eq!(c.unix_path.as_deref(), Some("/run/docker.sock"));
        assert_eq!(c.ip, None);
        assert_eq!(c.port, None);

        e.unix_path = [0; 108];
        e.unix_path[1..6].copy_from_slice(b"agent");
        e.unix_path_len = 6;
        assert_eq!(connect(&e).unwrap().unix_path.as_deref(), Some("@agent"));
    }
}
