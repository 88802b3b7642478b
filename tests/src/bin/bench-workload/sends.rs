//! The sends of `cargo xtask bench`'s syscalls outside jobs: the calls the container probes
//! run on (`write`, `writev`, `sendto`, `sendmsg`, `sendmmsg`, `sendfile`, io_uring writes).

use std::time::Instant;

use crate::per_op;

/// N write(2) of `bytes` bytes to /dev/null.
pub fn write(n: u64, bytes: usize) {
    let data = vec![b'x'; bytes];
    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .expect("/dev/null");
    let fd = std::os::fd::AsRawFd::as_raw_fd(&null);
    let start = Instant::now();
    for _ in 0..n {
        // SAFETY: writes `bytes` bytes from a live buffer to an open fd.
        let written = unsafe { libc::write(fd, data.as_ptr().cast(), bytes) };
        assert_eq!(written, bytes as isize, "write failed");
    }
    per_op(start, n);
}

/// N writev(2) of one 64-byte buffer to /dev/null.
pub fn writev(n: u64) {
    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .expect("/dev/null");
    let fd = std::os::fd::AsRawFd::as_raw_fd(&null);
    let data = [b'x'; 64];
    let iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let start = Instant::now();
    for _ in 0..n {
        // SAFETY: one iovec over a live buffer, to an open fd.
        let written = unsafe { libc::writev(fd, &iov, 1) };
        assert_eq!(written, 64, "writev failed");
    }
    per_op(start, n);
}

/// N sendfile(2) of 1 byte of a file to /dev/null.
pub fn sendfile(n: u64) {
    // 1 byte of a file to /dev/null, from offset 0 each time.

    let file = std::env::temp_dir().join(format!("bench-sendfile-{}", std::process::id()));
    std::fs::write(&file, b"x").expect("sendfile source");
    let from = std::fs::File::open(&file).expect("sendfile source");
    std::fs::remove_file(&file).ok();
    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .expect("/dev/null");
    let (from, to) = (
        std::os::fd::AsRawFd::as_raw_fd(&from),
        std::os::fd::AsRawFd::as_raw_fd(&null),
    );
    let start = Instant::now();
    for _ in 0..n {
        let mut offset: libc::off_t = 0;
        // SAFETY: two open fds and a live offset.
        let sent = unsafe { libc::sendfile(to, from, &mut offset, 1) };
        assert_eq!(sent, 1, "sendfile failed");
    }
    per_op(start, n);
}

/// N sendto (or sendmsg) + recv of 1 byte over a unix datagram socket pair (connected to each
/// other).
/// Which call sends the byte.
#[derive(Clone, Copy)]
pub enum Send {
    To,
    Msg,
    Mmsg,
}

pub fn send(n: u64, how: Send) {
    let mut fds = [0i32; 2];
    // SAFETY: socketpair fills the two fds.
    let made = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM, 0, fds.as_mut_ptr()) };
    assert_eq!(made, 0, "socketpair failed");
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: b"x".as_ptr() as *mut libc::c_void,
        iov_len: 1,
    };
    // SAFETY: an all-zero msghdr is a valid empty one; its buffer is set below.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    let mut message = libc::mmsghdr {
        msg_hdr: header,
        msg_len: 0,
    };
    let start = Instant::now();
    for _ in 0..n {
        // SAFETY: sends 1 byte from a static on a connected socket (no address), then receives
        // it into a local buffer.
        unsafe {
            // sendmmsg returns the messages sent (one), the others the bytes (one).
            let sent = match how {
                Send::To => libc::sendto(fds[0], b"x".as_ptr().cast(), 1, 0, std::ptr::null(), 0),
                Send::Msg => libc::sendmsg(fds[0], &header, 0),
                Send::Mmsg => libc::sendmmsg(fds[0], &mut message, 1, 0) as isize,
            };
            assert_eq!(sent, 1, "send failed");
            libc::recv(fds[1], byte.as_mut_ptr().cast(), 1, 0);
        }
    }
    per_op(start, n);
}

/// `n` 64-byte `IORING_OP_WRITE` requests to /dev/null, 16 per submission: what io_uring's
/// request tracepoint costs a process (the agent's two programs on it return at once for a
/// process outside jobs).
pub fn uring(n: u64) {
    const BATCH: u64 = 16;
    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .expect("/dev/null");
    let fd = io_uring::types::Fd(std::os::fd::AsRawFd::as_raw_fd(&null));
    let data = [b'x'; 64];
    let mut ring = io_uring::IoUring::new(BATCH as u32).expect("io_uring_setup");
    let batches = n.div_ceil(BATCH);
    let start = Instant::now();
    for _ in 0..batches {
        for _ in 0..BATCH {
            let write = io_uring::opcode::Write::new(fd, data.as_ptr(), data.len() as u32).build();
            // SAFETY: the buffer and the file outlive the request (waited for below).
            unsafe { ring.submission().push(&write) }.expect("a free submission entry");
        }
        ring.submit_and_wait(BATCH as usize)
            .expect("io_uring_enter");
        for cqe in ring.completion() {
            assert_eq!(cqe.result(), 64, "write failed");
        }
    }
    per_op(start, batches * BATCH);
}
