//! What a job writes on a container runtime's API socket (step 2 of `containers.rs`): a
//! `write`, `sendto`, `writev`, `sendmsg` or `sendmmsg` (its first message's first buffer), or
//! the same submitted through io_uring (`io_uring_send`), on a connection a job process made to
//! a runtime's socket (`unix_connected`), that starts `POST [/vN.NN]/containers/<ref>/start`
//! (or `/attach`, `/exec`) records the container as the job's, at the syscall's entry (or the
//! request's submission): before the daemon can read the request.

use aya_ebpf::{
    helpers::{bpf_probe_read_user, bpf_probe_read_user_buf},
    macros::tracepoint,
    programs::TracePointContext,
};
use runner_monitor_common::{CONTAINER_ID_LEN, ExecTarget, ProcessJob, counter};

use crate::{
    args::syscall_arg_direct,
    container_refs::{is_hex, start_by_reference},
    containers::{CONTAINER_IDS, EXEC_TARGETS, REQUESTED_CONTAINERS, UNIX_CONNS},
    maps::{count, current_process, current_tgid, now_ns},
};

/// A job process connected socket `fd` to a unix address.
#[inline(always)]
pub fn unix_connected(tgid: u32, fd: i32, job: u64) {
    let key = (u64::from(tgid) << 32) | u64::from(fd as u32);
    if UNIX_CONNS.insert(key, job, 0).is_err() {
        count(counter::PENDING_MAP_FULL);
    }
}

const POST: &[u8; 6] = b"POST /";
const CONTAINERS: &[u8; 12] = b"/containers/";
const START: &[u8; 6] = b"/start";
/// `docker exec` creates its command with `POST .../containers/<ref>/exec`.
const EXEC: &[u8; 5] = b"/exec";
/// The docker CLI's `run` attaches before it starts; podman's Docker API makes the container's
/// cgroup at the attach (it initialises the container there), before the start request.
const ATTACH: &[u8; 7] = b"/attach";
/// The request line's first bytes: `POST /v1.47/containers/`, with room for a longer version.
const PREFIX_LEN: usize = 32;
/// Where `/containers/` may begin: unversioned, or after `/v1.9`, `/v1.47`, `/v1.100`.
const CONTAINERS_AT: [usize; 4] = [5, 10, 11, 12];

#[inline(always)]
fn same<const N: usize>(buf: &[u8], at: usize, want: &[u8; N]) -> bool {
    let mut i = 0;
    while i < N {
        if buf[at + i] != want[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The shortest request that can name a container: `POST /containers/x/start `.
const SHORTEST: u64 = (PREFIX_LEN + 2) as u64;

/// The job whose unix socket `fd` of the current process is, when a job process connected it.
#[inline(always)]
fn job_socket(fd: u64) -> Option<u64> {
    let key = (u64::from(current_tgid()) << 32) | (fd & 0xffff_ffff);
    // SAFETY: the value is copied out at once.
    unsafe { UNIX_CONNS.get(key).copied() }
}

/// A `write` or `sendto` of the current process: `(fd, buf, len)` are its first arguments. It
/// runs on every write on the host, so the cheapest test goes first: a write too short to be a
/// start request is done with before the map lookup, and the arguments are loaded from the
/// record, not read with a helper.
#[inline(always)]
fn on_send(ctx: &TracePointContext) {
    let len = syscall_arg_direct(ctx, 2);
    if len < SHORTEST {
        return;
    }
    let Some(job) = job_socket(syscall_arg_direct(ctx, 0)) else {
        return;
    };
    on_request(
        syscall_arg_direct(ctx, 1),
        len,
        Socket::Fd(syscall_arg_direct(ctx, 0)),
        job,
    );
}

/// The first buffer of a `writev` or `sendmsg` on a job's unix socket: `iov` points at the
/// caller's `struct iovec` array (`{ void *base; size_t len; }`). Only the first buffer is
/// looked at: HTTP clients put the request line in one buffer (Node's libuv writes a request
/// of several buffers with `writev`).
#[inline(always)]
fn on_vectored(iov: u64, fd: u64, job: u64) {
    if iov == 0 {
        return;
    }
    // SAFETY: a checked read of user memory.
    let Ok([base, len]) = (unsafe { bpf_probe_read_user(iov as *const [u64; 2]) }) else {
        return;
    };
    if len >= SHORTEST {
        on_request(base, len, Socket::Fd(fd), job);
    }
}

/// `len` bytes at `buf` that the current process sends on a job's unix socket: a container
/// start request records the container as the job's.
#[inline(always)]
fn on_request(buf: u64, len: u64, socket: Socket, job: u64) {
    if buf == 0 {
        return;
    }
    let mut prefix = [0u8; PREFIX_LEN];
    // SAFETY: a checked read of user memory into a stack buffer.
    if unsafe { bpf_probe_read_user_buf(buf as *const u8, &mut prefix) }.is_err() {
        return;
    }
    if !same(&prefix, 0, POST) {
        return;
    }
    let mut id_at = 0;
    for at in CONTAINERS_AT {
        if same(&prefix, at, CONTAINERS) {
            id_at = at + CONTAINERS.len();
            break;
        }
    }
    if id_at == 0 {
        return;
    }
    if !still_connected(socket) {
        return;
    }
    // The id and what follows it: `/start` or `/attach`, then a space or `?`. A shorter request
    // is read past its end (within the sender's buffer: what follows the reference decides).
    let mut tail = [0u8; CONTAINER_ID_LEN + 8];
    // SAFETY: a checked read of user memory into a stack buffer.
    if unsafe { bpf_probe_read_user_buf((buf + id_at as u64) as *const u8, &mut tail) }.is_err() {
        return;
    }
    let ends = |at: usize| len >= (id_at + at + 1) as u64 && (tail[at] == b' ' || tail[at] == b'?');
    let by_id = ((same(&tail, CONTAINER_ID_LEN, START) && ends(CONTAINER_ID_LEN + START.len()))
        || (same(&tail, CONTAINER_ID_LEN, ATTACH) && ends(CONTAINER_ID_LEN + ATTACH.len())))
        && tail[..CONTAINER_ID_LEN].iter().all(|c| is_hex(*c));
    let hex_id = tail[..CONTAINER_ID_LEN].iter().all(|c| is_hex(*c));
    if !by_id {
        if hex_id && same(&tail, CONTAINER_ID_LEN, EXEC) && ends(CONTAINER_ID_LEN + EXEC.len()) {
            let mut id = [0u8; CONTAINER_ID_LEN];
            id.copy_from_slice(&tail[..CONTAINER_ID_LEN]);
            exec_requested(&id, job);
            return;
        }
        // By name or short id: `docker start web`, `docker start 3f2a9c`, `docker exec web`.
        start_by_reference(&tail, len - id_at as u64, job);
        return;
    }
    let mut id = [0u8; CONTAINER_ID_LEN];
    id.copy_from_slice(&tail[..CONTAINER_ID_LEN]);
    if REQUESTED_CONTAINERS.insert(id, job, 0).is_err() {
        count(counter::PENDING_MAP_FULL);
    }
}

/// Whether the runtime connection remembered for socket `fd` of the current process is still
/// that: the (tgid, fd) key outlives the connection (nothing is removed at `close`), so a
/// number reused for another socket or a file, or a pid reused by a process outside jobs, would
/// otherwise inherit it. Checked only for a container request (rare): the writer is a job
/// process, and the socket is still a runtime's (`unix_peer.rs`; not known: as before).
#[inline(always)]
fn still_connected(socket: Socket) -> bool {
    current_process().is_some()
        && match socket {
            Socket::Fd(fd) => crate::unix_peer::is_runtime_api(fd as i32),
            Socket::File(file) => crate::unix_peer::is_runtime_file(file),
        } != Some(false)
}

/// Where a request is sent: a descriptor of the current process, or the file itself (an
/// io_uring request on a registered file, which has no descriptor).
#[derive(Clone, Copy)]
pub enum Socket {
    Fd(u64),
    File(u64),
}

/// Job `job` asked to run a command in container `id` (its 64-digit id): the container's
/// cgroup, when known, waits for the command's process. Nothing when the container is unknown
/// (not made while the programs ran, not found by the agent at start).
#[inline(always)]
fn exec_requested(id: &[u8; CONTAINER_ID_LEN], job: u64) {
    // SAFETY: the value is copied out at once.
    let Some(cgroup) = (unsafe { CONTAINER_IDS.get(id).copied() }) else {
        return;
    };
    // SAFETY: the value is copied out at once.
    let current = unsafe { EXEC_TARGETS.get(cgroup).copied() };
    let target = ExecTarget::after_request(current.as_ref(), job, now_ns(), id);
    if EXEC_TARGETS.insert(cgroup, target, 0).is_err() {
        count(counter::PENDING_MAP_FULL);
    }
}

// long sys_write(unsigned int fd, const char __user *buf, size_t count)
#[tracepoint]
pub fn sys_enter_write(ctx: TracePointContext) -> u32 {
    on_send(&ctx);
    0
}

// long sys_sendto(int fd, void __user *buff, size_t len, unsigned int flags, ...)
#[tracepoint]
pub fn sys_enter_sendto(ctx: TracePointContext) -> u32 {
    on_send(&ctx);
    0
}

// long sys_writev(unsigned long fd, const struct iovec __user *vec, unsigned long vlen)
// Named so that the kernel's 15-character program name differs from `sys_enter_write`'s.
#[tracepoint]
pub fn enter_writev(ctx: TracePointContext) -> u32 {
    if syscall_arg_direct(&ctx, 2) == 0 {
        return 0;
    }
    if let Some(job) = job_socket(syscall_arg_direct(&ctx, 0)) {
        on_vectored(
            syscall_arg_direct(&ctx, 1),
            syscall_arg_direct(&ctx, 0),
            job,
        );
    }
    0
}

/// `struct user_msghdr`'s `msg_iov` and `msg_iovlen` (after `msg_name` and the padded
/// `msg_namelen`).
const MSG_IOV: u64 = 16;

// long sys_sendmsg(int fd, struct user_msghdr __user *msg, unsigned int flags)
#[tracepoint]
pub fn enter_sendmsg(ctx: TracePointContext) -> u32 {
    on_message(&ctx);
    0
}

// long sys_sendmmsg(int fd, struct mmsghdr __user *mmsg, unsigned int vlen, unsigned int flags)
// A `struct mmsghdr` begins with its `struct user_msghdr`: the first message is read as
// `sendmsg`'s.
#[tracepoint]
pub fn enter_sendmmsg(ctx: TracePointContext) -> u32 {
    if syscall_arg_direct(&ctx, 2) != 0 {
        on_message(&ctx);
    }
    0
}

/// The message of a `sendmsg` (or the first of a `sendmmsg`) on a job's unix socket: its first
/// buffer.
#[inline(always)]
fn on_message(ctx: &TracePointContext) {
    let Some(job) = job_socket(syscall_arg_direct(ctx, 0)) else {
        return;
    };
    on_msghdr(syscall_arg_direct(ctx, 1), syscall_arg_direct(ctx, 0), job);
}

/// The first buffer of the `struct user_msghdr` at `msg`, sent on a job's unix socket.
#[inline(always)]
fn on_msghdr(msg: u64, fd: u64, job: u64) {
    if msg == 0 {
        return;
    }
    // SAFETY: a checked read of user memory.
    let Ok([iov, count]) = (unsafe { bpf_probe_read_user((msg + MSG_IOV) as *const [u64; 2]) })
    else {
        return;
    };
    if count > 0 {
        on_vectored(iov, fd, job);
    }
}

/// What an io_uring write or send request of a job process sends (`io_uring.rs`).
pub enum Sent {
    /// `len` bytes at `buf` (`WRITE`, `WRITE_FIXED`, `SEND`, `SEND_ZC`).
    Buffer { buf: u64, len: u64 },
    /// An iovec array (`WRITEV`, a vectorized `SEND`): its first buffer.
    Vectors(u64),
    /// A `struct user_msghdr` (`SENDMSG`, `SENDMSG_ZC`): its first buffer.
    Message(u64),
}

/// An io_uring write or send request that job process `process` submitted on `socket`: read as
/// the syscalls' are when it is a connection to a runtime's API. A descriptor is the
/// submitter's (a ring's polling thread shares its creator's table), so the (tgid, fd) key is
/// the syscalls'. A connection the connect tracepoint did not see (an io_uring `CONNECT`: no
/// syscall) is checked here, at the first request that begins as a container request
/// (`POST /`), and remembered as a job's runtime connection from then on. A registered file
/// (`IOSQE_FIXED_FILE`) has no descriptor to remember it by: its socket is checked at every
/// container request (`still_connected`), and believed only when the kernel's socket layout is
/// known.
#[inline(always)]
pub fn io_uring_send(process: &ProcessJob, socket: Socket, sent: Sent) {
    let (buf, len) = match sent {
        Sent::Buffer { buf, len } => (buf, len),
        Sent::Vectors(iov) => {
            if iov == 0 {
                return;
            }
            // SAFETY: a checked read of user memory.
            match unsafe { bpf_probe_read_user(iov as *const [u64; 2]) } {
                Ok([base, len]) => (base, len),
                Err(_) => return,
            }
        }
        Sent::Message(msg) => {
            if msg == 0 {
                return;
            }
            // SAFETY: checked reads of user memory.
            let Ok([iov, count]) =
                (unsafe { bpf_probe_read_user((msg + MSG_IOV) as *const [u64; 2]) })
            else {
                return;
            };
            if iov == 0 || count == 0 {
                return;
            }
            // SAFETY: as above.
            match unsafe { bpf_probe_read_user(iov as *const [u64; 2]) } {
                Ok([base, len]) => (base, len),
                Err(_) => return,
            }
        }
    };
    if len < SHORTEST || buf == 0 {
        return;
    }
    let job = match socket {
        Socket::Fd(fd) => match job_socket(fd) {
            Some(job) => job,
            None => {
                // SAFETY: a checked read of user memory.
                let begins = unsafe { bpf_probe_read_user(buf as *const [u8; POST.len()]) };
                if begins != Ok(*POST) || crate::unix_peer::is_runtime_api(fd as i32) != Some(true)
                {
                    return;
                }
                unix_connected(current_tgid(), fd as i32, process.job);
                process.job
            }
        },
        Socket::File(file) => {
            if !crate::unix_peer::layout_known() || file == 0 {
                return;
            }
            process.job
        }
    };
    on_request(buf, len, socket, job);
}
