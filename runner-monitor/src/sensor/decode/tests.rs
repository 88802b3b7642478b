//! Records as the kernel writes them, decoded.

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

/// The kernel sends a file event without a second path cut after its first path and its NUL;
/// one cut inside its fixed fields is refused.
#[test]
fn a_file_record_cut_after_its_path_decodes_like_the_whole_one() {
    let e = file_event(b"/home/ci/.npmrc", AT_FDCWD);
    let whole = bytes_of(&e);
    let at = std::mem::offset_of!(FileEvent, path);
    let cut = &whole[..at + "/home/ci/.npmrc".len() + 1];
    let (a, b) = (
        decoder().decode(&whole).unwrap(),
        decoder().decode(cut).unwrap(),
    );
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
    match b.detail {
        EventDetail::FileOpen(f) => assert_eq!(f.path, "/home/ci/.npmrc"),
        other => panic!("expected a file open, got {other:?}"),
    }
    assert!(matches!(
        decoder().decode(&whole[..at - 1]),
        Err(DecodeError::Short { .. })
    ));
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
    // Inside the fixed fields, or inside the path (a file record may stop after its path).
    let path_at = std::mem::offset_of!(FileEvent, path);
    for cut in [0, 3, 63, 64, 100, path_at + 1] {
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

#[test]
fn raw_socket_records_decode_with_their_kind_and_protocol() {
    let mut e = ConnectEvent {
        header: header(EventKind::Connect),
        result: -1,
        fd: -1,
        family: AF_INET6,
        port: 58,
        addr: [0; 16],
        unix_path_len: 0,
        flags: CONNECT_RAW_SOCKET | CONNECT_BLOCKED,
        unix_path: [0; 108],
        _pad2: [0; 4],
    };
    e.addr[0] = SOCK_RAW as u8;
    let c = connect(&e).unwrap();
    assert_eq!(
        (c.family, c.ip, c.port, c.blocked),
        (SocketFamily::Inet6, None, None, true)
    );
    assert_eq!(
        c.raw_socket,
        Some(RawSocket {
            kind: RawSocketKind::Raw,
            protocol: 58
        })
    );
    e.family = AF_PACKET;
    e.port = 768;
    e.flags = CONNECT_RAW_SOCKET;
    let c = connect(&e).unwrap();
    assert_eq!(c.family, SocketFamily::Packet);
    assert_eq!(c.raw_socket.map(|r| r.kind), Some(RawSocketKind::Packet));
    e.family = AF_INET;
    e.addr[0] = 2; // SOCK_DGRAM: an ICMP socket
    assert_eq!(
        connect(&e).unwrap().raw_socket.map(|r| r.kind),
        Some(RawSocketKind::Icmp)
    );
    e.family = AF_UNIX;
    assert!(
        connect(&e).is_err(),
        "a raw socket of another family is not a record the kernel writes"
    );
}

/// A real ClientHello, as rustls sends it first for `server`.
fn client_hello(server: &str) -> Vec<u8> {
    use std::sync::Arc;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(server.to_owned()).unwrap();
    let mut connection = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    while connection.wants_write() {
        connection.write_tls(&mut out).unwrap();
    }
    out
}

#[test]
fn the_kernels_parser_finds_the_server_name_of_a_real_client_hello() {
    use runner_monitor_common::tls::{ClientHello, find_server_name};
    let hello = client_hello("api.github.com");
    // A payload that starts after 52 bytes of IP and TCP headers, as in a socket buffer.
    let mut segment = vec![0u8; 52];
    segment.extend_from_slice(&hello);
    let found = find_server_name(&segment[..], 52);
    let ClientHello::ServerName { offset, len } = found else {
        panic!("no server name in a rustls ClientHello: {found:?}");
    };
    assert_eq!(
        &segment[offset as usize..(offset + len) as usize],
        b"api.github.com"
    );
    // Cut anywhere before the name's last byte (a ClientHello split across segments): no name,
    // but still a TLS handshake.
    for cut in [6, 60, (offset + len - 1) as usize] {
        assert_eq!(
            find_server_name(&segment[..cut], 52),
            if cut <= 53 {
                ClientHello::NotTls
            } else {
                ClientHello::NoServerName
            },
            "cut at {cut}"
        );
    }
    assert_eq!(
        find_server_name(&segment[..(offset + len) as usize], 52),
        found,
        "the name's last byte is enough"
    );
    // An IP address is never sent as a server name.
    assert_eq!(
        find_server_name(&client_hello("10.0.0.1")[..], 0),
        ClientHello::NoServerName
    );
    assert_eq!(
        find_server_name(&b"GET / HTTP/1.1\r\n\r\n"[..], 0),
        ClientHello::NotTls
    );
    // A server_name extension whose length runs past the extensions block, or whose name list
    // does not fill it (both found by the `tls` fuzz target against tls-parser): servers refuse
    // such a ClientHello, so no name is read from it.
    let at = offset as usize - 9;
    for (field, value) in [(at + 2, 0x1300u16), (at + 4, 0x0010)] {
        let mut bad = segment.clone();
        bad[field..field + 2].copy_from_slice(&value.to_be_bytes());
        assert_eq!(
            find_server_name(&bad[..], 52),
            ClientHello::NoServerName,
            "{value:#x} at {field}"
        );
    }
}

#[test]
fn suffix_hashes_fall_out_of_the_name_hash_at_label_boundaries() {
    use runner_monitor_common::tls::{SNI_HASH_SEED, sni_hash, sni_hash_step};
    // The kernel hashes from the last byte; before it folds in the `.` at index 3 it holds the
    // hash of `github.com`, which the agent wrote for `*.github.com`.
    let name = b"API.GitHub.com";
    let mut hash = SNI_HASH_SEED;
    let mut at_dots = Vec::new();
    for (i, byte) in name.iter().enumerate().rev() {
        if *byte == b'.' {
            at_dots.push((i, hash));
        }
        hash = sni_hash_step(hash, *byte);
    }
    assert_eq!(hash, sni_hash(b"api.github.com"), "case folds");
    assert_eq!(
        at_dots,
        vec![(10, sni_hash(b"com")), (3, sni_hash(b"github.com"))]
    );
}

#[test]
fn a_tls_record_decodes_to_its_destination_and_server_name() {
    let mut e = TlsEvent {
        header: header(EventKind::TlsClientHello),
        family: AF_INET6,
        port: 443,
        flags: TLS_BLOCKED,
        addr: "fd00::2".parse::<Ipv6Addr>().unwrap().octets(),
        sni_len: 12,
        _pad: 0,
        sni: [0; runner_monitor_common::SNI_LEN],
    };
    e.sni[..12].copy_from_slice(b"evil.example");
    let event = decoder().decode(&bytes_of(&e)).unwrap();
    let EventDetail::TlsClientHello(t) = event.detail else {
        panic!("{event:?}");
    };
    assert_eq!(t.sni.as_deref(), Some("evil.example"));
    assert!(t.blocked);
    assert_eq!((t.ip, t.port), ("fd00::2".parse().unwrap(), 443));
    e.flags = TLS_NO_SNI;
    let event = decoder().decode(&bytes_of(&e)).unwrap();
    let EventDetail::TlsClientHello(t) = event.detail else {
        panic!("{event:?}");
    };
    assert_eq!(t.sni, None);
}

/// The tracepoints name the syscall; the LSM and fentry hooks send its number, which the agent
/// names alike, so both sets give the same event.
#[test]
fn signal_and_access_syscalls_are_named_alike_from_either_hook_set() {
    assert_eq!(signal_syscall_name(SIGNAL_SYSCALL_KILL), "kill");
    let by_number = |nr: i64| SIGNAL_SYSCALL_NR | nr as u32;
    assert_eq!(signal_syscall_name(by_number(libc::SYS_kill)), "kill");
    assert_eq!(signal_syscall_name(by_number(libc::SYS_tgkill)), "tgkill");
    assert_eq!(
        signal_syscall_name(by_number(libc::SYS_pidfd_send_signal)),
        "pidfd_send_signal"
    );
    assert_eq!(
        signal_syscall_name(by_number(libc::SYS_read)),
        format!("syscall-{}", libc::SYS_read)
    );
    assert_eq!(signal_syscall_name(77), "unknown");
    assert_eq!(ptrace_request_name(PTRACE_SEIZE), "seize");
    assert_eq!(
        ptrace_request_name(ACCESS_BY_SYSCALL | libc::SYS_process_vm_writev as u64),
        "process_vm_writev"
    );
    assert_eq!(
        ptrace_request_name(ACCESS_BY_SYSCALL | libc::SYS_pidfd_getfd as u64),
        "pidfd_getfd"
    );
}
