//! The steps made through io_uring: no connect, write or send syscall is made for them.

use std::{
    io::{Read, Write},
    net::SocketAddr,
    os::fd::FromRawFd,
    os::unix::net::UnixStream,
    path::Path,
};

/// A TCP connect made by io_uring (`IORING_OP_CONNECT`): no `connect` syscall is made.
pub(crate) fn uring_connect(addr: SocketAddr) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe {
        libc::socket(
            if addr.is_ipv4() {
                libc::AF_INET
            } else {
                libc::AF_INET6
            },
            libc::SOCK_STREAM,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    let socket = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero sockaddr structs are valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large enough and aligned for sockaddr_in.
            let sin = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as u16;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as u16;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    let connect = io_uring::opcode::Connect::new(
        io_uring::types::Fd(socket.as_raw_fd()),
        &storage as *const _ as *const libc::sockaddr,
        len as libc::socklen_t,
    )
    .build();
    // SAFETY: the address and the socket outlive the operation.
    unsafe { uring_once(&connect) }.map(|_| ())
}

/// Submits `entry` on a ring of its own and waits for its completion: its result, a negative
/// one as the error it is.
///
/// # Safety
/// What `entry` points at must stay valid until this returns.
unsafe fn uring_once(entry: &io_uring::squeue::Entry) -> std::io::Result<i32> {
    // SAFETY: as the caller's.
    unsafe { uring_on(&mut io_uring::IoUring::new(4)?, entry) }
}

/// Submits `entry` on `ring` and waits for its completion, as `uring_once`.
///
/// # Safety
/// As `uring_once`.
unsafe fn uring_on(
    ring: &mut io_uring::IoUring,
    entry: &io_uring::squeue::Entry,
) -> std::io::Result<i32> {
    // SAFETY: the caller keeps what the entry points at valid; it is waited for below.
    unsafe { ring.submission().push(&entry.clone().user_data(1)) }
        .map_err(std::io::Error::other)?;
    ring.submit_and_wait(1)?;
    let result = ring.completion().next().expect("a completion").result();
    if result < 0 {
        Err(std::io::Error::from_raw_os_error(-result))
    } else {
        Ok(result)
    }
}

/// The provided-buffer group of a `send_select`, and the bytes its SQE's `addr` names.
const SELECT_GROUP: u16 = 7;
const DECOY: &[u8] = b"GET /_ping HTTP/1.1\r\nHost: docker\r\n\r\n";

/// The registered-file index `uring_send` sends on when asked to: past every fd job-step has
/// open, so that the descriptor of that number is not the connection.
const FIXED_INDEX: u32 = 40;

/// Submits `request` through io_uring as `op` on `fd` and waits for its completion; with
/// `fixed: Some(i)`, on the ring's registered file `i`, which is `fd`.
fn uring_send(
    fd: std::os::fd::RawFd,
    request: &[u8],
    op: &str,
    fixed: Option<u32>,
) -> std::io::Result<()> {
    use io_uring::{
        opcode,
        types::{Fd, Fixed},
    };
    use std::os::fd::AsRawFd;
    let iov = libc::iovec {
        iov_base: request.as_ptr() as *mut _,
        iov_len: request.len(),
    };
    // SAFETY: an all-zero msghdr is valid; it names only `iov`, which outlives the request.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &iov as *const _ as *mut _;
    msg.msg_iovlen = 1;
    let len = request.len() as u32;
    // A splice's bytes come from a pipe that holds the request (the kernel's pipe buffer is
    // larger than any request here).
    let pipe = if op == "splice" {
        Some(filled_pipe(request)?)
    } else {
        None
    };
    let pipe_in = pipe.as_ref().map_or(-1, |(read, _)| read.as_raw_fd());
    // The same request on a descriptor or on a registered file (two types of target).
    macro_rules! entry {
        ($at:expr) => {
            match op {
                "splice" => opcode::Splice::new(Fd(pipe_in), -1, $at, -1, len).build(),
                "write" => opcode::Write::new($at, request.as_ptr(), len).build(),
                "writev" => opcode::Writev::new($at, &iov, 1).build(),
                "writev_fixed" => opcode::WritevFixed::new($at, &iov, 1, 0).build(),
                "send" => opcode::Send::new($at, request.as_ptr(), len).build(),
                // The bytes sent are the provided buffer's; `addr` names a harmless decoy.
                "send_select" => opcode::Send::new($at, DECOY.as_ptr(), len)
                    .buf_group(SELECT_GROUP)
                    .build()
                    .flags(io_uring::squeue::Flags::BUFFER_SELECT),
                "sendmsg" => opcode::SendMsg::new($at, &msg).build(),
                other => panic!("unknown io_uring send {other}"),
            }
        };
    }
    let mut ring = io_uring::IoUring::new(4)?;
    if op == "send_select" {
        let provide = opcode::ProvideBuffers::new(
            request.as_ptr() as *mut u8,
            len as i32,
            1,
            SELECT_GROUP,
            0,
        )
        .build();
        // SAFETY: the request's buffer outlives the ring; the kernel only reads it (a send).
        unsafe { uring_on(&mut ring, &provide) }?;
    }
    if op == "writev_fixed" {
        // SAFETY: the request's buffer outlives the ring, which is dropped at the end.
        unsafe {
            ring.submitter()
                .register_buffers(std::slice::from_ref(&iov))
        }?;
    }
    let entry = match fixed {
        Some(index) => {
            ring.submitter().register_files_sparse(index + 1)?;
            ring.submitter().register_files_update(index, &[fd])?;
            entry!(Fixed(index))
        }
        None => entry!(Fd(fd)),
    };
    // SAFETY: the buffer, iovec and msghdr outlive the operation.
    let sent = unsafe { uring_on(&mut ring, &entry) }?;
    assert_eq!(sent as usize, request.len(), "a short send");
    Ok(())
}

/// A pipe holding `bytes`: (read end, write end).
fn filled_pipe(bytes: &[u8]) -> std::io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe(2) writes two descriptors into `fds`, owned below.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors nobody else owns.
    let (read, write) = unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    std::fs::File::from(write.try_clone()?).write_all(bytes)?;
    Ok((read, write))
}

/// A unix stream connection to `path` made by io_uring (`IORING_OP_CONNECT`): no `connect`
/// syscall.
fn uring_connect_unix(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::{fd::AsRawFd, unix::ffi::OsStrExt};
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as u16;
    let bytes = path.as_os_str().as_bytes();
    assert!(bytes.len() < addr.sun_path.len(), "socket path too long");
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    let connect = io_uring::opcode::Connect::new(
        io_uring::types::Fd(stream.as_raw_fd()),
        &addr as *const _ as *const libc::sockaddr,
        len as libc::socklen_t,
    )
    .build();
    // SAFETY: the address and the socket outlive the operation.
    unsafe { uring_once(&connect) }?;
    Ok(stream)
}

/// `POST /containers/ID/start` sent through io_uring (`uring-start`); the answer's status line.
pub(crate) fn uring_start(
    socket: &Path,
    id: &str,
    op: &str,
    connect: &str,
) -> std::io::Result<String> {
    use std::os::fd::AsRawFd;
    let mut stream = match connect {
        "syscall" | "fixed" | "decoy" => UnixStream::connect(socket)?,
        "uring" => uring_connect_unix(socket)?,
        other => panic!("unknown connect {other}"),
    };
    let request = format!(
        "POST /v1.41/containers/{id}/start HTTP/1.0\r\nHost: docker\r\nContent-Length: 0\r\n\r\n"
    );
    match connect {
        "fixed" => {
            assert!(
                stream.as_raw_fd() < FIXED_INDEX as i32,
                "the fd is the fixed index"
            );
            uring_send(
                stream.as_raw_fd(),
                request.as_bytes(),
                op,
                Some(FIXED_INDEX),
            )?
        }
        "decoy" => {
            // The request goes into the pair, at the index that is the Docker connection's
            // number: the daemon never gets it.
            let (pair, _other) = UnixStream::pair()?;
            let index = stream.as_raw_fd() as u32;
            uring_send(pair.as_raw_fd(), request.as_bytes(), op, Some(index))?;
            return Ok("decoy".to_owned());
        }
        _ => uring_send(stream.as_raw_fd(), request.as_bytes(), op, None)?,
    }
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer.lines().next().unwrap_or_default().to_owned())
}
