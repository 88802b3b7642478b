//! What a CI job step does, one syscall at a time, so the integration tests can trigger exactly
//! the call they check (`openat` with a directory fd, `connect` on each family, ...).
//!
//! job-step open-at DIR NAME [GATE] openat(open(DIR), NAME), then keep both open until the file
//!                                  GATE exists (at most 30 s)
//! job-step connect-tcp IP:PORT     connect a TCP socket
//! job-step connect-unix PATH       connect a unix stream socket
//! job-step listen IP:PORT          accept one TCP connection, then exit
//! job-step signal PID SIG          kill(PID, SIG)
//! job-step pidfd-signal PID SIG    pidfd_send_signal(pidfd_open(PID), SIG)
//! job-step ptrace-seize PID        PTRACE_SEIZE PID (detached again when this exits)
//! job-step vm-read PID             process_vm_readv of one byte at an unmapped address of PID
//! job-step vm-write PID            process_vm_writev of one byte to an unmapped address of PID
//!                                  (both fail with EFAULT after the kernel's access check)
//! job-step egress HOW ADDR         try `tcp` (connect), `udp` (connect), `udp-send` (sendto) or
//!                                  `uring` (a TCP connect issued through io_uring) to ADDR
//!                                  (`IP:PORT`, `[IPv6]:PORT`); print `ok` or `errno N`
//! job-step socket KIND             socket() of KIND: `raw` (IPv4 ICMP), `raw6` (IPv6 ICMP),
//!                                  `packet` (AF_PACKET), `icmp` (a ping socket) or `tcp`;
//!                                  print `ok` or `errno N`
//! job-step serve ADDR...           accept TCP connections and take UDP datagrams on each ADDR,
//!                                  print `listening`, then serve until killed
//! job-step dns-serve ADDR          serve the test DNS zone (`integration_tests::dns`) on ADDR
//!                                  (UDP and TCP), print `listening`, serve until killed
//! job-step dns HOW SERVER NAME PORT
//!                                  ask SERVER for NAME's A records over HOW (`udp`, `udp-send`,
//!                                  `tcp`), then at once TCP-connect to the first address on
//!                                  PORT; print `RCODE ADDRS CONNECT` (`-` for none)
//! job-step tls NAME ADDR          TCP-connect to ADDR, send a rustls ClientHello for NAME (`-`:
//!                                  a plain HTTP request instead), print `answered`, `silent`
//!                                  (no answer in 3 s: the server got nothing) or `errno N`
//! job-step tls-held NAME ADDR GO WHEN  a connection across an agent restart: connect, send
//!                                  NAME's ClientHello `before` or `after` the file GO appears,
//!                                  print each phase's answer (`tls::held_across`)
//! job-step tls-serve ADDR...       answer `!` to the first bytes of each TCP connection on each
//!                                  ADDR, print `listening`, serve until killed
//! job-step connect-name HOST:PORT  resolve HOST with the C library (getaddrinfo, so
//!                                  /etc/resolv.conf) and TCP-connect; print `ok` or `errno N`
//! job-step uring-start SOCKET ID OP CONNECT
//!                                  start container ID at the Docker API socket SOCKET with a
//!                                  request submitted through io_uring as OP (`write`, `writev`,
//!                                  `writev_fixed` from a registered buffer (Linux 6.15+),
//!                                  `send`, `sendmsg`, or `splice` from a pipe the request was
//!                                  written into) on a connection made by CONNECT
//!                                  (`syscall`, `uring`, or `fixed`: by syscall, then sent
//!                                  as a registered file whose index is no open fd); print
//!                                  the answer's status line. CONNECT `decoy`: connect by
//!                                  syscall, but send on a socket pair's end registered at
//!                                  the connection's fd number; print `decoy`
//! job-step in-netns NAME ARGS...  enter network namespace NAME (`ip netns`) by setns, with no
//!                                  exec, then do ARGS
//! job-step wait-ms N ARGS...       sleep N ms, then do ARGS
//! job-step with-resolv-conf FILE ARGS...
//!                                  in a mount namespace of its own, FILE bind-mounted on
//!                                  /etc/resolv.conf, exec job-step ARGS (as a container runtime
//!                                  sets up a container's program, with no exec before)
//! job-step start-then-mkdir SOCKET REF DIR
//!                                  send `POST /containers/REF/start` to the Docker API at
//!                                  SOCKET, make directory DIR (a cgroup) at once, then print
//!                                  the answer's status line and remove DIR

use std::{
    ffi::CString,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::unix::net::UnixStream,
    path::Path,
};

mod uring;

use uring::{uring_connect, uring_start};

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    // Prefixes, each followed by more arguments: where and when the step runs.
    while args.len() > 2 {
        match args[0].as_str() {
            "in-netns" => {
                let ns =
                    std::fs::File::open(format!("/run/netns/{}", args[1])).expect("the namespace");
                // SAFETY: setns with a namespace descriptor we hold open.
                let rc = unsafe {
                    libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET)
                };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            }
            "wait-ms" => {
                let ms = args[1].parse().expect("milliseconds");
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
            "with-resolv-conf" => with_resolv_conf(&args[1], &args[2..]),
            _ => break,
        }
        args.drain(..2);
    }
    let arg = |i: usize| {
        args.get(i)
            .unwrap_or_else(|| panic!("missing argument {i}: {args:?}"))
    };
    match arg(0).as_str() {
        "open-at" => {
            let dir = CString::new(arg(1).as_str()).unwrap();
            let name = CString::new(arg(2).as_str()).unwrap();
            // SAFETY: plain syscalls with NUL-terminated strings.
            let dirfd = unsafe { libc::open(dir.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) };
            assert!(
                dirfd >= 0,
                "open {}: {}",
                arg(1),
                std::io::Error::last_os_error()
            );
            let fd = unsafe { libc::openat(dirfd, name.as_ptr(), libc::O_RDONLY) };
            assert!(
                fd >= 0,
                "openat {}: {}",
                arg(2),
                std::io::Error::last_os_error()
            );
            if let Some(gate) = args.get(3) {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
                while !std::path::Path::new(gate).exists() && std::time::Instant::now() < deadline {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        }
        "connect-tcp" => {
            let _ = TcpStream::connect(arg(1).as_str()).expect("tcp connect");
        }
        "connect-unix" => {
            let _ = UnixStream::connect(arg(1)).expect("unix connect");
        }
        "listen" => {
            let listener = TcpListener::bind(arg(1).as_str()).expect("bind");
            println!("listening");
            let (mut stream, _) = listener.accept().expect("accept");
            let mut buf = [0u8; 16];
            let _ = stream.read(&mut buf);
        }
        "signal" => {
            let pid: i32 = arg(1).parse().unwrap();
            let sig: i32 = arg(2).parse().unwrap();
            // SAFETY: kill(2).
            unsafe { libc::kill(pid, sig) };
        }
        "pidfd-signal" => {
            let pid: i32 = arg(1).parse().unwrap();
            let sig: i32 = arg(2).parse().unwrap();
            // SAFETY: pidfd_open(2) and pidfd_send_signal(2) with a null siginfo.
            unsafe {
                let fd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
                assert!(fd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
                let sent = libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd,
                    sig,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                );
                assert_eq!(sent, 0, "{}", std::io::Error::last_os_error());
            }
        }
        "ptrace-seize" => {
            let pid: i32 = arg(1).parse().unwrap();
            // SAFETY: ptrace(2); the tracee is detached when this process exits.
            let r = unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, 0, 0) };
            assert_eq!(r, 0, "PTRACE_SEIZE: {}", std::io::Error::last_os_error());
        }
        "vm-read" | "vm-write" => {
            let pid: i32 = arg(1).parse().unwrap();
            let mut byte = 0u8;
            let local = libc::iovec {
                iov_base: (&raw mut byte).cast(),
                iov_len: 1,
            };
            // Below mmap_min_addr: never mapped, so nothing is read or written.
            let remote = libc::iovec {
                iov_base: 0x1000 as *mut libc::c_void,
                iov_len: 1,
            };
            // SAFETY: process_vm_readv/writev(2) with one-element vectors that outlive the call.
            let r = unsafe {
                if arg(0) == "vm-read" {
                    libc::process_vm_readv(pid, &local, 1, &remote, 1, 0)
                } else {
                    libc::process_vm_writev(pid, &local, 1, &remote, 1, 0)
                }
            };
            let errno = std::io::Error::last_os_error().raw_os_error();
            assert!(r < 0 && errno == Some(libc::EFAULT), "{r} {errno:?}");
        }
        "egress" => {
            let addr: SocketAddr = arg(2).parse().expect("IP:PORT");
            let unbound: SocketAddr = if addr.is_ipv4() {
                "0.0.0.0:0".parse().unwrap()
            } else {
                "[::]:0".parse().unwrap()
            };
            let result = match arg(1).as_str() {
                "tcp" => {
                    TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3)).map(|_| ())
                }
                "udp" => UdpSocket::bind(unbound).and_then(|s| s.connect(addr)),
                "udp-send" => {
                    UdpSocket::bind(unbound).and_then(|s| s.send_to(b"x", addr).map(|_| ()))
                }
                "uring" => uring_connect(addr),
                other => panic!("unknown egress {other}"),
            };
            match result {
                Ok(()) => println!("ok"),
                Err(e) => println!("errno {}", e.raw_os_error().unwrap_or(-1)),
            }
        }
        "socket" => {
            let (family, kind, protocol) = match arg(1).as_str() {
                "raw" => (libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP),
                "raw6" => (libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6),
                "packet" => (
                    libc::AF_PACKET,
                    libc::SOCK_RAW,
                    i32::from((libc::ETH_P_ALL as u16).to_be()),
                ),
                "icmp" => (libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP),
                "tcp" => (libc::AF_INET, libc::SOCK_STREAM, 0),
                other => panic!("unknown socket kind {other}"),
            };
            // SAFETY: socket(2); the descriptor is closed at once.
            let fd = unsafe { libc::socket(family, kind, protocol) };
            if fd >= 0 {
                unsafe { libc::close(fd) };
                println!("ok");
            } else {
                let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(-1);
                println!("errno {errno}");
            }
        }
        "serve" => {
            for addr in &args[1..] {
                let listener = TcpListener::bind(addr.as_str()).expect("bind tcp");
                std::thread::spawn(move || {
                    for stream in listener.incoming() {
                        drop(stream);
                    }
                });
                let udp = UdpSocket::bind(addr.as_str()).expect("bind udp");
                std::thread::spawn(move || {
                    let mut buf = [0u8; 64];
                    while udp.recv(&mut buf).is_ok() {}
                });
            }
            println!("listening");
            loop {
                std::thread::park();
            }
        }
        "tls" => {
            let first = match arg(1).as_str() {
                "-" => b"GET / HTTP/1.0\r\n\r\n".to_vec(),
                name => integration_tests::tls::client_hello(name),
            };
            let addr: SocketAddr = arg(2).parse().expect("IP:PORT");
            println!("{}", integration_tests::tls::send_first(addr, &first));
        }
        "tls-held" => {
            let addr: SocketAddr = arg(2).parse().expect("IP:PORT");
            let first = integration_tests::tls::client_hello(arg(1));
            let go = std::path::Path::new(arg(3));
            integration_tests::tls::held_across(addr, &first, go, arg(4));
        }
        "tls-serve" => {
            for addr in &args[1..] {
                integration_tests::tls::answer_first_bytes(addr);
            }
            println!("listening");
            loop {
                std::thread::park();
            }
        }
        "dns-serve" => {
            integration_tests::dns::serve(arg(1).parse().expect("IP:PORT"));
            println!("listening");
            loop {
                std::thread::park();
            }
        }
        "dns" => {
            let server: SocketAddr = arg(2).parse().expect("IP:PORT");
            let port: u16 = arg(4).parse().expect("a port");
            match integration_tests::dns::ask(arg(1), server, arg(3)) {
                Ok((rcode, addrs)) => {
                    let connect = match addrs.first() {
                        Some(ip) => match TcpStream::connect_timeout(
                            &SocketAddr::new(*ip, port),
                            std::time::Duration::from_secs(3),
                        ) {
                            Ok(_) => "ok".to_owned(),
                            Err(e) => format!("errno-{}", e.raw_os_error().unwrap_or(-1)),
                        },
                        None => "-".to_owned(),
                    };
                    let shown: Vec<String> = addrs.iter().map(ToString::to_string).collect();
                    let shown = if shown.is_empty() {
                        "-".to_owned()
                    } else {
                        shown.join(",")
                    };
                    println!("{rcode} {shown} {connect}");
                }
                Err(e) => println!("error {e}"),
            }
        }
        "connect-name" => {
            use std::net::ToSocketAddrs;
            let result = arg(1)
                .as_str()
                .to_socket_addrs()
                .and_then(|mut addrs| {
                    addrs
                        .find(SocketAddr::is_ipv4)
                        .ok_or_else(|| std::io::Error::other("no IPv4 address"))
                })
                .and_then(|addr| {
                    TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3))
                });
            match result {
                Ok(_) => println!("ok"),
                Err(e) => match e.raw_os_error() {
                    Some(errno) => println!("errno {errno}"),
                    None => println!("error {e}"),
                },
            }
        }
        "start-then-mkdir" => {
            let mut stream = UnixStream::connect(arg(1)).expect("unix connect");
            // One write: `write!` on the stream would send each piece by a write of its own.
            let request = format!(
                "POST /v1.41/containers/{}/start HTTP/1.0\r\nHost: docker\r\n\
                 Content-Length: 0\r\n\r\n",
                arg(2)
            );
            stream.write_all(request.as_bytes()).expect("request");
            std::fs::create_dir(arg(3)).expect("mkdir");
            let mut answer = String::new();
            stream.read_to_string(&mut answer).expect("answer");
            println!("{}", answer.lines().next().unwrap_or_default());
            std::fs::remove_dir(arg(3)).expect("rmdir");
        }
        "uring-start" => {
            let status = uring_start(Path::new(&arg(1)), arg(2), arg(3), arg(4))
                .unwrap_or_else(|e| panic!("uring-start: {e}"));
            println!("{status}");
        }
        other => panic!("unknown step {other}"),
    }
}

/// In a private mount namespace, `conf` on /etc/resolv.conf, then this program again with `rest`:
/// what a container runtime does between joining a container's network namespace and its
/// program's exec.
fn with_resolv_conf(conf: &str, rest: &[String]) -> ! {
    let c = |s: &str| CString::new(s).unwrap();
    let (conf, target, root) = (c(conf), c("/etc/resolv.conf"), c("/"));
    // SAFETY: plain syscalls with NUL-terminated strings; the null pointers are optional
    // arguments.
    unsafe {
        assert_eq!(libc::unshare(libc::CLONE_NEWNS), 0, "unshare");
        let private = libc::MS_REC | libc::MS_PRIVATE;
        let none = std::ptr::null();
        assert_eq!(
            libc::mount(none, root.as_ptr(), none, private, none.cast()),
            0
        );
        let bind = libc::mount(
            conf.as_ptr(),
            target.as_ptr(),
            none,
            libc::MS_BIND,
            none.cast(),
        );
        assert_eq!(bind, 0, "bind {}", std::io::Error::last_os_error());
    }
    let error = std::os::unix::process::CommandExt::exec(
        std::process::Command::new("/proc/self/exe").args(rest),
    );
    panic!("exec: {error}");
}
