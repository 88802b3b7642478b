//! Workloads for `cargo xtask bench`, run inside a tracked job.
//!
//! bench-workload getppid N            N getppid() calls; prints ns per call
//! bench-workload open PATH N          N openat(PATH) + close() pairs; prints ns per pair
//! bench-workload flood PATH SECS P    P processes open PATH as fast as they can for SECS
//!                                     seconds; prints the number of opens. `{}` in PATH becomes
//!                                     the process's index: separate paths do not contend for
//!                                     one dentry across CPUs
//! bench-workload alerts SECS US       every US microseconds a new child reads its parent's
//!                                     environment (one alert each) for SECS; prints how many
//! bench-workload hold N               N children that wait; prints "ready", then waits for
//!                                     stdin to close and reaps them

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
        "flood" => flood(&args[1], Duration::from_secs(num(2)), num(3)),
        "alerts" => alerts(Duration::from_secs(num(1)), Duration::from_micros(num(2))),
        "hold" => hold(num(1)),
        other => panic!("unknown workload {other}"),
    }
}

fn per_op(start: Instant, n: u64) {
    println!("{:.1}", start.elapsed().as_nanos() as f64 / n as f64);
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

fn flood(path: &str, secs: Duration, procs: u64) {
    let (read_end, write_end) = pipe();
    let children: Vec<_> = (0..procs.max(1))
        .map(|i| {
            let path = CString::new(path.replace("{}", &i.to_string())).unwrap();
            fork_child(move || {
                let deadline = Instant::now() + secs;
                let mut n: u64 = 0;
                while Instant::now() < deadline {
                    for _ in 0..256 {
                        open_close(&path);
                    }
                    n += 256;
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
