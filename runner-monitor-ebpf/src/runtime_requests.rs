//! What a job writes on a container runtime's API socket (step 2 of `containers.rs`): a
//! `write`, `sendto`, `writev`, `sendmsg` or `sendmmsg` (its first message's first buffer), or
//! the same submitted through io_uring (`io_uring_send`), on a connection a job process made to
//! a runtime's socket (`unix_connected`), that starts `POST [/vN.NN]/containers/<ref>/start`
//! (or `/attach`, `/exec`) records the container as the job's, at the syscall's entry (or the
//! request's submission): before the daemon can read the request.
//!
//! Every buffer sent on such a connection is also copied for the agent (`runtime_sent.rs`:
//! `RuntimeSentEvent`, the first `RUNTIME_SENT_BYTES` of each), which follows the HTTP stream
//! and finds the requests read here cannot be: a request line cut across writes or buffers,
//! one pipelined after another, one percent-encoded (`enrich/runtime_streams.rs`).

use aya_ebpf::{
    helpers::{bpf_probe_read_user, bpf_probe_read_user_buf},
    macros::tracepoint,
    programs::TracePointContext,
};
use runner_monitor_common::{
    CONTAINER_ID_LEN, ExecTarget, HEADER_IO_URING, ProcessJob,
    container::{
        RUNTIME_SENT_MORE, SENT_BY_BUFFER, SENT_BY_SENDFILE, SENT_BY_SENDMMSG, SENT_BY_SPLICE,
        request::{ATTACH, CONTAINERS, CONTAINERS_AT, EXEC, POST, PREFIX_LEN, START},
    },
    counter,
};

use crate::{
    args::syscall_arg_direct,
    container_refs::{is_hex, start_by_reference},
    containers::{CONTAINER_IDS, EXEC_TARGETS, REQUESTED_CONTAINERS, RUNTIME_TGIDS, UNIX_CONNS},
    maps::{count, current_process, current_tgid, now_ns},
    runtime_sent::{STREAM_BUFFERS, sent_record, stream, stream_vectors},
};

/// A job process connected socket `fd` to a unix address.
#[inline(always)]
pub fn unix_connected(tgid: u32, fd: i32, job: u64) {
    let key = (u64::from(tgid) << 32) | u64::from(fd as u32);
    if UNIX_CONNS.insert(key, job, 0).is_err() {
        count(counter::PENDING_MAP_FULL);
    }
    mark_runtime_tgid(tgid);
}

/// A job process forked `child`: a runtime connection of the parent's is the child's too (the
/// descriptor is inherited), so the child is looked at as the parent is (`adopt`).
#[inline(always)]
pub fn forked(parent: u32, child: u32) {
    if may_have_runtime_conn(parent) {
        mark_runtime_tgid(child);
    }
}

/// Sets process `tgid`'s bit in `RUNTIME_TGIDS`.
#[inline(always)]
fn mark_runtime_tgid(tgid: u32) {
    if let Some(word) = RUNTIME_TGIDS.get_ptr_mut(tgid >> 6) {
        // The BPF target has no atomic OR (no compare-and-swap in Rust's `core` for it): two
        // processes of one word's 64 pids setting their bits at the same instant on two CPUs
        // could lose one, and with it every request of that process. The bit is read back and
        // set again until it holds, three times at most (threads of one process set the same
        // bit, which no race loses).
        let bit = 1u64 << (tgid & 63);
        for _ in 0..3 {
            // SAFETY: a pointer into the array map's value, aligned.
            let now = unsafe { core::ptr::read_volatile(word) };
            if now & bit != 0 {
                break;
            }
            // SAFETY: as above.
            unsafe { core::ptr::write_volatile(word, now | bit) };
        }
    }
}

/// Whether process `tgid` may have a runtime connection: its bit in `RUNTIME_TGIDS`.
#[inline(always)]
fn may_have_runtime_conn(tgid: u32) -> bool {
    RUNTIME_TGIDS
        .get(tgid >> 6)
        .is_some_and(|word| word & (1 << (tgid & 63)) != 0)
}

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

/// The job whose unix socket `fd` of the current process is, when a job process connected it
/// and it is still a runtime's connection (`still_connected`). It runs on every write on the
/// host, so the cheapest test goes first: the process's bit (an array load), then the hash map.
#[inline(always)]
fn job_socket(fd: u64) -> Option<u64> {
    let tgid = current_tgid();
    if !may_have_runtime_conn(tgid) {
        return None;
    }
    let key = (u64::from(tgid) << 32) | (fd & 0xffff_ffff);
    // SAFETY: the value is copied out at once.
    match unsafe { UNIX_CONNS.get(key).copied() } {
        Some(job) => still_connected(Socket::Fd(fd)).then_some(job),
        None => adopt(tgid, fd),
    }
}

/// A runtime connection of a job process that it did not `connect` on descriptor `fd`: a copy
/// (`dup`, `dup2`, `fcntl(F_DUPFD)`) or one inherited at fork. Only a process that connected to
/// a runtime, or the child of one, gets here, for a descriptor not known yet; believed as a
/// connect's is: a job process's, whose other end is a runtime's API, remembered from then on.
#[inline(always)]
fn adopt(tgid: u32, fd: u64) -> Option<u64> {
    let process = current_process()?;
    remember_if_runtime(tgid, fd, process.job).then_some(process.job)
}

/// Remembers descriptor `fd` of process `tgid` as job `job`'s runtime connection when its
/// other end is a runtime's API (`unix_peer`); whether it did.
#[inline(always)]
fn remember_if_runtime(tgid: u32, fd: u64, job: u64) -> bool {
    if crate::unix_peer::is_runtime_api(fd as i32) != Some(true) {
        return false;
    }
    unix_connected(tgid, fd as i32, job);
    true
}

/// A `write` or `sendto` of the current process: `(fd, buf, len)` are its first arguments,
/// loaded from the record, not read with a helper.
#[inline(always)]
fn on_send(ctx: &TracePointContext) {
    let fd = syscall_arg_direct(ctx, 0);
    let Some(job) = job_socket(fd) else {
        return;
    };
    let (buf, len) = (syscall_arg_direct(ctx, 1), syscall_arg_direct(ctx, 2));
    stream(Socket::Fd(fd).conn(), job, buf, len, 0);
    if len >= SHORTEST {
        on_request(buf, len, job);
    }
}

/// The buffers of a `writev` or `sendmsg` on a job's unix socket: `iov` points at the caller's
/// `count` `struct iovec`s (`{ void *base; size_t len; }`). The first is read for a request
/// here (HTTP clients put the request line in one buffer: Node's libuv writes a request of
/// several buffers with `writev`); every one goes to the agent's stream.
#[inline(always)]
fn on_vectored(iov: u64, count: u64, socket: Socket, job: u64) {
    if iov == 0 || count == 0 {
        return;
    }
    // SAFETY: a checked read of user memory.
    let Ok([base, len]) = (unsafe { bpf_probe_read_user(iov as *const [u64; 2]) }) else {
        return;
    };
    stream_vectors(iov, count, socket.conn(), job);
    if len >= SHORTEST {
        on_request(base, len, job);
    }
}

/// `len` bytes at `buf` that the current process sends on a job's unix socket: a container
/// start request records the container as the job's.
#[inline(always)]
fn on_request(buf: u64, len: u64, job: u64) {
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
/// otherwise inherit it. Checked at each send on a remembered connection: the writer is a job
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

impl Socket {
    /// The connection as the agent knows it (`RuntimeSentEvent::conn`): the process and
    /// descriptor, or the file.
    #[inline(always)]
    pub fn conn(self) -> u64 {
        match self {
            Socket::Fd(fd) => (u64::from(current_tgid()) << 32) | (fd & 0xffff_ffff),
            Socket::File(file) => file,
        }
    }
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
    let fd = syscall_arg_direct(&ctx, 0);
    if let Some(job) = job_socket(fd) {
        let (iov, count) = (syscall_arg_direct(&ctx, 1), syscall_arg_direct(&ctx, 2));
        on_vectored(iov, count, Socket::Fd(fd), job);
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
//
// VERIFIER: inlined into the macro's entry point (see `io_uring_send_req`): left a function of
// its own, it returns whatever its last instruction left in r0, a stack pointer here.
#[tracepoint]
#[inline(always)]
pub fn enter_sendmmsg(ctx: TracePointContext) -> u32 {
    let messages = syscall_arg_direct(&ctx, 2);
    if messages != 0 {
        on_message(&ctx);
    }
    // Only the first message is read: the stream has a gap after it.
    if messages > 1 {
        let fd = syscall_arg_direct(&ctx, 0);
        if let Some(job) = job_socket(fd) {
            sent_record(
                Socket::Fd(fd).conn(),
                job,
                0,
                RUNTIME_SENT_MORE,
                STREAM_BUFFERS as u32 + 1,
                SENT_BY_SENDMMSG,
                0,
            );
        }
    }
    0
}

// ssize_t sendfile64(int out_fd, int in_fd, loff_t __user *offset, size_t count)
// Bytes from a file: nothing to copy, and nothing the request reader above can read. The agent
// is told how many (a job hiding a container request from the monitor this way is a finding).
#[tracepoint]
pub fn enter_sendfile(ctx: TracePointContext) -> u32 {
    let fd = syscall_arg_direct(&ctx, 0);
    if let Some(job) = job_socket(fd) {
        let count = syscall_arg_direct(&ctx, 3);
        sent_record(Socket::Fd(fd).conn(), job, 0, count, 0, SENT_BY_SENDFILE, 0);
    }
    0
}

// long splice(int fd_in, loff_t __user *off_in, int fd_out, loff_t __user *off_out,
//             size_t len, unsigned int flags)
// Bytes from a pipe (filled by `write` or `vmsplice`): as `sendfile`'s.
#[tracepoint]
pub fn enter_splice(ctx: TracePointContext) -> u32 {
    let fd = syscall_arg_direct(&ctx, 2);
    if let Some(job) = job_socket(fd) {
        let len = syscall_arg_direct(&ctx, 4);
        sent_record(Socket::Fd(fd).conn(), job, 0, len, 0, SENT_BY_SPLICE, 0);
    }
    0
}

/// The message of a `sendmsg` (or the first of a `sendmmsg`) on a job's unix socket: its first
/// buffer.
#[inline(always)]
fn on_message(ctx: &TracePointContext) {
    let fd = syscall_arg_direct(ctx, 0);
    let Some(job) = job_socket(fd) else {
        return;
    };
    let msg = syscall_arg_direct(ctx, 1);
    if msg == 0 {
        return;
    }
    // SAFETY: a checked read of user memory.
    let Ok([iov, count]) = (unsafe { bpf_probe_read_user((msg + MSG_IOV) as *const [u64; 2]) })
    else {
        return;
    };
    on_vectored(iov, count, Socket::Fd(fd), job);
}

/// What an io_uring write or send request of a job process sends (`io_uring.rs`).
#[derive(Clone, Copy)]
pub enum Sent {
    /// `len` bytes at `buf` (`WRITE`, `WRITE_FIXED`, `SEND`, `SEND_ZC`).
    Buffer { buf: u64, len: u64 },
    /// `count` iovecs at `iov` (`WRITEV`, a vectorized `SEND`).
    Vectors { iov: u64, count: u64 },
    /// A `struct user_msghdr` (`SENDMSG`, `SENDMSG_ZC`).
    Message(u64),
    /// `len` bytes (`RUNTIME_SENT_MORE`: not known) with nothing to copy at submission, sent
    /// `via` (`SENT_BY_*`): from a pipe (`SPLICE`), or from a provided buffer.
    Unreadable { len: u64, via: u16 },
}

/// An io_uring write or send request that job process `process` submitted on `socket`: read as
/// the syscalls' are when it is a connection to a runtime's API. A descriptor is the
/// submitter's (a ring's polling thread shares its creator's table), so the (tgid, fd) key is
/// the syscalls'. A connection the connect tracepoint did not see (an io_uring `CONNECT`: no
/// syscall) is checked here, at the first request that begins as an HTTP request does (an
/// uppercase letter: a method, or its first bytes), and remembered as a job's runtime
/// connection from then on. A registered file (`IOSQE_FIXED_FILE`) has no descriptor to
/// remember it by: its socket is checked at every request (`still_connected`), and believed
/// only when the kernel's socket layout is known. A splice, or a send from the ring's provided
/// buffers, has no bytes to look at: its socket is checked whatever it sends, and on a
/// runtime's connection it is reported as the `splice` syscall's is (`SENT_BY_SPLICE`,
/// `SENT_BY_PROVIDED_BUFFER`), flagged `HEADER_IO_URING`.
#[inline(always)]
pub fn io_uring_send(process: &ProcessJob, socket: Socket, sent: Sent) {
    // The iovecs (`count` 0: one buffer) and the first buffer. Plain values: a returned tuple
    // of options is returned through a stack pointer, which the verifier refuses.
    let (iov, count) = match sent {
        Sent::Buffer { .. } | Sent::Unreadable { .. } => (0, 0),
        Sent::Vectors { iov, count } => (iov, count),
        Sent::Message(msg) => {
            if msg == 0 {
                return;
            }
            // SAFETY: a checked read of user memory.
            match unsafe { bpf_probe_read_user((msg + MSG_IOV) as *const [u64; 2]) } {
                Ok([iov, count]) => (iov, count),
                Err(_) => return,
            }
        }
    };
    let (unreadable, via) = match sent {
        Sent::Unreadable { via, .. } => (true, via),
        _ => (false, SENT_BY_BUFFER),
    };
    let (buf, len) = match sent {
        Sent::Buffer { buf, len } => (buf, len),
        Sent::Unreadable { len, .. } => (0, len),
        _ => {
            if iov == 0 || count == 0 {
                return;
            }
            // SAFETY: a checked read of user memory.
            match unsafe { bpf_probe_read_user(iov as *const [u64; 2]) } {
                Ok([base, len]) => (base, len),
                Err(_) => return,
            }
        }
    };
    let job = match socket {
        Socket::Fd(fd) => match job_socket(fd) {
            Some(job) => job,
            None => {
                // SAFETY: a checked read of user memory.
                let request_like = unreadable
                    || unsafe { bpf_probe_read_user(buf as *const u8) }
                        .is_ok_and(|c| c.is_ascii_uppercase());
                if len == 0
                    || !request_like
                    || !remember_if_runtime(current_tgid(), fd, process.job)
                {
                    return;
                }
                process.job
            }
        },
        Socket::File(file) => {
            if !crate::unix_peer::layout_known() || file == 0 || !still_connected(socket) {
                return;
            }
            process.job
        }
    };
    if unreadable {
        sent_record(socket.conn(), job, 0, len, 0, via, HEADER_IO_URING);
        return;
    }
    // One call of the request parser: the verifier follows each call site's copy.
    if count != 0 {
        stream_vectors(iov, count, socket.conn(), job);
    } else {
        stream(socket.conn(), job, buf, len, 0);
    }
    if len >= SHORTEST && buf != 0 {
        on_request(buf, len, job);
    }
}
