//! Syscall loops for `cargo xtask bench`: prints the mean cost of one iteration in nanoseconds.
//!
//! bench-workload getppid N         N getppid() calls
//! bench-workload open PATH N       N openat(PATH) + close() pairs

use std::{ffi::CString, time::Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: u64 = args
        .last()
        .and_then(|s| s.parse().ok())
        .expect("the iteration count last");
    let start = Instant::now();
    match args[0].as_str() {
        "getppid" => {
            for _ in 0..n {
                // SAFETY: getppid has no preconditions.
                std::hint::black_box(unsafe { libc::getppid() });
            }
        }
        "open" => {
            let path = CString::new(args[1].as_str()).unwrap();
            for _ in 0..n {
                // SAFETY: openat/close with a valid NUL-terminated path.
                unsafe {
                    let fd = libc::openat(libc::AT_FDCWD, path.as_ptr(), libc::O_RDONLY);
                    assert!(fd >= 0, "open failed");
                    libc::close(fd);
                }
            }
        }
        other => panic!("unknown workload {other}"),
    }
    println!("{:.1}", start.elapsed().as_nanos() as f64 / n as f64);
}
