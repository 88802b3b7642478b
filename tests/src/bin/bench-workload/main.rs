//! Workloads for `cargo xtask bench`, run inside a tracked job or outside any.
//!
//! bench-workload getppid N            N getppid() calls; prints ns per call
//! bench-workload open PATH N          N openat(PATH) + close() pairs; prints ns per pair
//! bench-workload write N [BYTES]      N write(2) of BYTES (default 1) to /dev/null; prints ns per
//!                                     write
//! bench-workload sendto N             N sendto(2) of 1 byte on a connected unix datagram socket,
//!                                     each received by a recv(2) on its peer; prints ns per pair
//! bench-workload sendmsg N            the same with sendmsg(2) of one buffer
//! bench-workload sendmmsg N           the same with sendmmsg(2) of one message of one buffer
//! bench-workload writev N             N writev(2) of one 64-byte buffer to /dev/null; prints ns
//!                                     per writev
//! bench-workload sendfile N          N sendfile(2) of 1 byte of a file to /dev/null; prints ns
//!                                     per call
//! bench-workload uring N              N io_uring IORING_OP_WRITE requests of 64 bytes to
//!                                     /dev/null, submitted 16 at a time; prints ns per request
//! bench-workload flood PATH SECS P [RATE]
//!                                     P processes open PATH as fast as they can (or RATE opens
//!                                     per second in all) for SECS seconds; prints the number of
//!                                     opens. `{}` in PATH becomes the process's index: separate
//!                                     paths do not contend for one dentry across CPUs
//! bench-workload alerts SECS US       every US microseconds a new child reads its parent's
//!                                     environment (one alert each) for SECS; prints how many
//! bench-workload exec PROGRAM N      N fork + execve(PROGRAM) + wait, with an environment of 60
//!                                     variables of realistic size; prints wall-clock ns per exec
//!                                     and CPU ns per exec (this process and its children)
//! bench-workload hold N               N children that wait; prints "ready", then waits for
//!                                     stdin to close and reaps them
//! bench-workload connect ADDR N       N TCP connects to ADDR (closed with a reset: no
//!                                     TIME_WAIT); prints ns per connect, the slowest connect in
//!                                     ns and how many took over 100 ms (a SYN retransmitted)
//! bench-workload http ADDR N          N HTTP/1.0 GETs to ADDR, a connection each; prints ns per
//!                                     request, the slowest in ns and how many took over 100 ms
//! bench-workload serve-accept ADDR T  T threads accept connections on ADDR (backlog 4096) and
//!                                     close them at once; prints "listening", then serves until
//!                                     killed
//! bench-workload serve-http ADDR      answers every connection on ADDR with 16 KiB; prints
//!                                     "listening", then serves until killed
//! bench-workload dns-serve ADDR       serve the test DNS zone on ADDR; print "listening", then
//!                                     serve until killed
//! bench-workload floor-egress        programs that do nothing on the hooks a job's connects and
//!                                     packets meet in the agent; prints "attached", then holds
//!                                     them until stdin closes (floor.rs)
//! bench-workload dns SERVER NAME N    N lookups of NAME's A record at SERVER, each on a new UDP
//!                                     socket (connect, send, receive), as glibc does; prints the
//!                                     p50 and p99 latency in microseconds, or `rcode CODE` at
//!                                     the first answer without an address

mod floor;
mod sends;

use std::{
    ffi::CString,
    io::{Read as _, Write as _},
    time::{Duration, Instant},
};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize| -> u64 {
        args.get(i)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("argument {i} must be a number"))
    };
    match args[0].as_str() {
        "getppid" => {
            let n = num(1);
            let start = Instant::now();
            for _ in 0..n {
                // SAFETY: getppid has no preconditions.
                std::hint::black_box(unsafe { libc::getppid() });
            }
            per_op(start, n);
        }
        "open" => {
            let path = CString::new(args[1].as_str()).unwrap();
            let n = num(2);
            let start = Instant::now();
            for _ in 0..n {
                assert!(open_close(&path), "open failed");
            }
            per_op(start, n);
        }
        "write" => sends::write(num(1), if args.len() > 2 { num(2) as usize } else { 1 }),
        "sendto" => sends::send(num(1), sends::Send::To),
        "sendmsg" => sends::send(num(1), sends::Send::Msg),
        "sendmmsg" => sends::send(num(1), sends::Send::Mmsg),
        "uring" => sends::uring(num(1)),
        "sendfile" => sends::sendfile(num(1)),
        "writev" => sends::writev(num(1)),
        "flood" => flood(
            &args[1],
            Duration::from_secs(num(2)),
            num(3),
            args.get(4).map(|_| num(4)),
        ),
        "alerts" => alerts(Duration::from_secs(num(1)), Duration::from_micros(num(2))),
        "hold" => hold(num(1)),
        "exec" => exec(&args[1], num(2)),
        "connect" => {
            let addr: std::net::SocketAddr = args[1].parse().expect("IP:PORT");
            let n = num(2);
            let mut slow = Slowest::default();
            let start = Instant::now();
            for _ in 0..n {
                let t = Instant::now();
                let stream = std::net::TcpStream::connect(addr).expect("connect");
                slow.add(t);
                reset_on_close(&stream);
            }
            slow.print(start, n);
        }
        "http" => {
            let addr: std::net::SocketAddr = args[1].parse().expect("IP:PORT");
            let n = num(2);
            let mut body = Vec::new();
            let mut slow = Slowest::default();
            let start = Instant::now();
            for _ in 0..n {
                let t = Instant::now();
                let mut stream = std::net::TcpStream::connect(addr).expect("connect");
                stream
                    .write_all(b"GET /object HTTP/1.0\r\nHost: bench\r\n\r\n")
                    .expect("request");
                body.clear();
                stream.read_to_end(&mut body).expect("response");
                assert!(body.starts_with(b"HTTP/1.0 200"), "not an HTTP answer");
                slow.add(t);
            }
            slow.print(start, n);
        }
        "serve-http" => serve_http(&args[1]),
        "serve-accept" => serve_accept(&args[1], num(2)),
        "dns-serve" => {
            integration_tests::dns::serve(args[1].parse().expect("IP:PORT"));
            println!("listening");
            loop {
                std::thread::park();
            }
        }
        "dns" => dns(&args[1], &args[2], num(3)),
        "floor-egress" => floor::egress(),
        other => panic!("unknown workload {other}"),
    }
}

fn per_op(start: Instant, n: u64) {
    println!("{:.1}", start.elapsed().as_nanos() as f64 / n as f64);
}

/// The slowest of a series of operations, and how many took over 100 ms: a TCP SYN
/// retransmission (a full accept queue) takes at least 200 ms, the agent's programs microseconds.
#[derive(Default)]
struct Slowest {
    max: Duration,
    over_100ms: u64,
}

impl Slowest {
    fn add(&mut self, since: Instant) {
        let took = since.elapsed();
        self.max = self.max.max(took);
        if took > Duration::from_millis(100) {
            self.over_100ms += 1;
        }
    }

    /// ns per operation, the slowest in ns, the count over 100 ms.
    fn print(&self, start: Instant, n: u64) {
        println!(
            "{:.1} {} {}",
            start.elapsed().as_nanos() as f64 / n as f64,
            self.max.as_nanos(),
            self.over_100ms
        );
    }
}

/// openat + close; whether the open succeeded.
fn open_close(path: &CString) -> bool {
    // SAFETY: openat/close with a valid NUL-terminated path.
    unsafe {
        let fd = libc::openat(libc::AT_FDCWD, path.as_ptr(), libc::O_RDONLY);
        if fd >= 0 {
            libc::close(fd);
        }
        fd >= 0
    }
}

/// Forks; the child runs `f` and exits with its status. Returns the child's pid.
fn fork_child(f: impl FnOnce() -> i32) -> libc::pid_t {
    // SAFETY: the child only runs `f` (no locks held across fork in this single-threaded
    // program) and leaves with _exit.
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            libc::_exit(f());
        }
        pid
    }
}

fn reap(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    // SAFETY: waits for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    libc::WEXITSTATUS(status)
}

/// `procs` processes open `path` (`{}` replaced by the process's number) for `secs`, each as
/// fast as it can or, with `rate`, at its share of `rate` opens per second (in steps of 64,
/// sleeping when ahead: the load a busy but not overloaded runner puts on the pipeline).
fn flood(path: &str, secs: Duration, procs: u64, rate: Option<u64>) {
    let procs = procs.max(1);
    let (read_end, write_end) = pipe();
    let children: Vec<_> = (0..procs)
        .map(|i| {
            let path = CString::new(path.replace("{}", &i.to_string())).unwrap();
            let per_open = rate.map(|r| Duration::from_secs(procs).div_f64(r.max(1) as f64));
            fork_child(move || {
                let start = Instant::now();
                let deadline = start + secs;
                let mut n: u64 = 0;
                while Instant::now() < deadline {
                    for _ in 0..64 {
                        open_close(&path);
                    }
                    n += 64;
                    if let Some(per_open) = per_open {
                        let due = start + per_open.mul_f64(n as f64);
                        if let Some(ahead) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(ahead);
                        }
                    }
                }
                // SAFETY: writes 8 bytes from a live local to our pipe.
                unsafe { libc::write(write_end, (&raw const n).cast(), 8) };
                0
            })
        })
        .collect();
    let mut total = 0u64;
    for pid in children {
        reap(pid);
        let mut n = 0u64;
        // SAFETY: reads 8 bytes into a live local.
        unsafe { libc::read(read_end, (&raw mut n).cast(), 8) };
        total += n;
    }
    println!("{total}");
}

fn alerts(secs: Duration, every: Duration) {
    let environ = CString::new(format!("/proc/{}/environ", std::process::id())).unwrap();
    let deadline = Instant::now() + secs;
    let mut n = 0u64;
    while Instant::now() < deadline {
        let environ = environ.clone();
        let pid = fork_child(move || if open_close(&environ) { 0 } else { 1 });
        assert_eq!(reap(pid), 0, "reading the parent's environment failed");
        n += 1;
        std::thread::sleep(every);
    }
    println!("{n}");
}

fn hold(n: u64) {
    let (read_end, write_end) = pipe();
    let children: Vec<_> = (0..n)
        .map(|_| {
            fork_child(move || {
                // SAFETY: blocks on our pipe until the parent closes it or kills us.
                unsafe {
                    libc::close(write_end);
                    let mut b = 0u8;
                    libc::read(read_end, (&raw mut b).cast(), 1);
                }
                0
            })
        })
        .collect();
    println!("ready");
    std::io::stdout().flush().unwrap();
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    // SAFETY: closing our write end wakes every child.
    unsafe { libc::close(write_end) };
    for pid in children {
        reap(pid);
    }
}

fn pipe() -> (i32, i32) {
    let mut fds = [0; 2];
    // SAFETY: pipe writes two fds into the array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe failed");
    (fds[0], fds[1])
}

/// An environment as a CI host's processes have one: 60 variables of realistic names and sizes
/// (a long PATH, locale, XDG, a few tool settings, none of them a job marker).
fn realistic_environment() -> Vec<CString> {
    let mut vars = vec![
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/snap/bin:/opt/tools/bin"
            .to_owned(),
        "HOME=/home/runner".to_owned(),
        "USER=runner".to_owned(),
        "LOGNAME=runner".to_owned(),
        "SHELL=/bin/bash".to_owned(),
        "LANG=C.UTF-8".to_owned(),
        "LC_ALL=C.UTF-8".to_owned(),
        "TERM=xterm-256color".to_owned(),
        "PWD=/home/runner/work".to_owned(),
        "XDG_RUNTIME_DIR=/run/user/1001".to_owned(),
        "XDG_CONFIG_HOME=/home/runner/.config".to_owned(),
        "XDG_CACHE_HOME=/home/runner/.cache".to_owned(),
        "JAVA_HOME=/usr/lib/jvm/java-17-openjdk-amd64".to_owned(),
        "GOPATH=/home/runner/go".to_owned(),
        "CARGO_HOME=/home/runner/.cargo".to_owned(),
        "RUSTUP_HOME=/home/runner/.rustup".to_owned(),
        "NODE_OPTIONS=--max-old-space-size=4096".to_owned(),
        "DEBIAN_FRONTEND=noninteractive".to_owned(),
        "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt".to_owned(),
        "EDITOR=vi".to_owned(),
    ];
    for i in vars.len()..60 {
        vars.push(format!(
            "TOOL_SETTING_{i:02}=/opt/tools/{i}/share/config/value-{i}-{}",
            "x".repeat(i % 24)
        ));
    }
    vars.into_iter().map(|v| CString::new(v).unwrap()).collect()
}

fn exec(program: &str, n: u64) {
    let program = CString::new(program).unwrap();
    let env = realistic_environment();
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|v| v.as_ptr()).collect();
    envp.push(std::ptr::null());
    let argv = [program.as_ptr(), std::ptr::null()];
    let cpu_start = cpu_ns();
    let start = Instant::now();
    for _ in 0..n {
        // SAFETY: fork, then only async-signal-safe calls in the child (execve, _exit).
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: NUL-terminated arrays of NUL-terminated strings that outlive the call.
            unsafe {
                libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr());
                libc::_exit(127);
            }
        }
        assert!(pid > 0, "fork failed");
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the exec'd program failed: {status}"
        );
    }
    let wall = start.elapsed().as_nanos() as f64 / n as f64;
    // CPU time is what the kernel's exec programs add to (they run in the exec'ing child), and
    // it does not count the time spent waiting for a busy host's CPUs.
    let cpu = (cpu_ns() - cpu_start) as f64 / n as f64;
    println!("{wall:.1} {cpu:.1}");
}

/// User and system CPU time of this process and its waited-for children, in ns.
fn cpu_ns() -> u64 {
    let mut total = 0;
    for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
        // SAFETY: getrusage fills the struct it is given.
        let usage = unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            libc::getrusage(who, &mut usage);
            usage
        };
        for t in [usage.ru_utime, usage.ru_stime] {
            total += t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1_000;
        }
    }
    total
}

/// A minimal HTTP/1.0 server: every request gets the same 16 KiB answer and the connection is
/// closed by the server (the client sees EOF, and the server side holds the TIME_WAIT).
fn serve_http(addr: &str) {
    let listener = std::net::TcpListener::bind(addr).expect("bind");
    let mut answer = b"HTTP/1.0 200 OK\r\nContent-Length: 16384\r\n\r\n".to_vec();
    answer.resize(answer.len() + 16384, b'x');
    println!("listening");
    std::io::stdout().flush().expect("stdout");
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let mut request = [0u8; 1024];
        let mut got = 0;
        while got < request.len() {
            match stream.read(&mut request[got..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
            if request[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        let _ = stream.write_all(&answer);
    }
}

/// `threads` threads accept on one listener with a backlog of 4096 and close each connection at
/// once: a listener that keeps up with a client connecting in a loop, so the connect benchmark
/// measures the connect path and not a full accept queue.
fn serve_accept(addr: &str, threads: u64) {
    use std::os::fd::AsRawFd as _;
    let listener = std::net::TcpListener::bind(addr).expect("bind");
    // A second listen() on a listening socket only changes its backlog (capped by the
    // namespace's net.core.somaxconn, 4096 by default).
    // SAFETY: listen on a valid socket.
    let rc = unsafe { libc::listen(listener.as_raw_fd(), 4096) };
    assert_eq!(rc, 0, "listen: {}", std::io::Error::last_os_error());
    let listener = std::sync::Arc::new(listener);
    for _ in 0..threads.max(1) {
        let listener = listener.clone();
        std::thread::spawn(move || {
            loop {
                // Dropped at once: closed. Errors (a connection reset before it was accepted)
                // are skipped.
                let _ = listener.accept();
            }
        });
    }
    println!("listening");
    std::io::stdout().flush().expect("stdout");
    loop {
        std::thread::park();
    }
}

/// SO_LINGER 0: the close sends a reset and leaves no TIME_WAIT, so a long run of connects does
/// not run out of ephemeral ports.
fn reset_on_close(stream: &std::net::TcpStream) {
    use std::os::fd::AsRawFd as _;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a valid socket and a linger struct of the size given.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
}

fn dns(server: &str, name: &str, n: u64) {
    let server: std::net::SocketAddr = server.parse().expect("IP:PORT");
    let mut us = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let start = Instant::now();
        let (rcode, addrs) =
            integration_tests::dns::ask("udp", server, name).expect("a DNS answer");
        if rcode != "NoError" || addrs.is_empty() {
            println!("rcode {rcode}");
            return;
        }
        us.push(start.elapsed().as_nanos() as f64 / 1000.0);
    }
    us.sort_by(f64::total_cmp);
    let at = |q: f64| us[((us.len() as f64 * q) as usize).min(us.len() - 1)];
    println!("{:.1} {:.1}", at(0.5), at(0.99));
}
