//! io_uring: rings set up by job processes, and the opens, renames, links and connects they
//! submit, and the writes and sends that may carry a container request (`runtime_requests.rs`).
//!
//! Syscall tracepoints are blind to io_uring: an `IORING_OP_OPENAT` makes no `openat` syscall.
//! The `io_uring:` tracepoints are not, and as `tp_btf` programs they get the kernel's typed
//! arguments. aya-ebpf has no CO-RE field relocations, so the offsets into `struct io_kiocb` and
//! `struct filename` come from the agent, which reads them from the running kernel's BTF
//! (`setting::IO_URING_*`); without them the request probe reads nothing.
//!
//! Both tracepoints fire in the context of the task that submitted: the process that called
//! `io_uring_setup` / `io_uring_enter`, or, with `IORING_SETUP_SQPOLL`, the ring's polling thread
//! (`iou-sqp-<pid>`), which is a thread of the process that created the ring. Either way the
//! process map gives the job.

use aya_ebpf::{
    macros::{btf_tracepoint, map},
    maps::ProgramArray,
    programs::BtfTracePointContext,
};
use runner_monitor_common::{
    AT_FDCWD, EventKind, IoUringSetupEvent, LINK_SYMBOLIC,
    container::{RUNTIME_SENT_MORE, SENT_BY_PROVIDED_BUFFER, SENT_BY_SPLICE},
    io_uring::{
        FILE_PTR_FLAGS, FILE_PTR_REGULAR, IORING_OP_CONNECT, IORING_OP_LINKAT, IORING_OP_OPENAT,
        IORING_OP_OPENAT2, IORING_OP_RENAMEAT, IORING_OP_SEND, IORING_OP_SEND_ZC,
        IORING_OP_SENDMSG, IORING_OP_SENDMSG_ZC, IORING_OP_SPLICE, IORING_OP_SYMLINKAT,
        IORING_OP_WRITE, IORING_OP_WRITE_FIXED, IORING_OP_WRITEV, IORING_OP_WRITEV_FIXED,
        IORING_SEND_VECTORIZED, LAYOUT_CONNECT, LAYOUT_FIXED, LAYOUT_OPEN, LAYOUT_PATHS,
        LAYOUT_SEND, REQ_F_BUFFER_SELECT, REQ_F_FIXED_FILE,
    },
    setting,
};

use crate::{
    emit::send,
    files::kernel_file,
    maps::current_process,
    names::setting,
    net::io_uring_connect,
    runtime_requests::{Sent, Socket, io_uring_send},
};

/// The `T` at kernel address `base + offset`; `None` when it cannot be read.
#[inline(always)]
fn kernel_field<T>(base: u64, offset: u32) -> Option<T> {
    crate::layout::read(base + u64::from(offset))
}

// TP_PROTO(int fd, void *ctx, u32 sq_entries, u32 cq_entries, u32 flags)
#[btf_tracepoint(function = "io_uring_create")]
pub fn io_uring_create(ctx: BtfTracePointContext) -> i32 {
    let Some(process) = current_process() else {
        return 0;
    };
    let fd: i32 = ctx.arg(0);
    let sq_entries: u32 = ctx.arg(2);
    let cq_entries: u32 = ctx.arg(3);
    let flags: u32 = ctx.arg(4);
    send::<IoUringSetupEvent>(EventKind::IoUringSetup, Some(&process), |e| {
        e.fd = fd;
        e.sq_entries = sq_entries;
        e.cq_entries = cq_entries;
        e.flags = flags;
    });
    0
}

// TP_PROTO(struct io_kiocb *req)
// Fires in io_submit_sqe() after io_init_req() prepared the request: for an open, the name is
// already in a `struct filename` (getname), which is what the open will use; for a connect, the
// address was copied from the user pointer the request keeps.
#[btf_tracepoint(function = "io_uring_submit_req")]
pub fn io_uring_submit_req(ctx: BtfTracePointContext) -> i32 {
    let Some(process) = current_process() else {
        return 0;
    };
    let layout = setting(setting::IO_URING_LAYOUT);
    if layout == 0 {
        return 0;
    }
    let req: u64 = ctx.arg(0);
    let Some(opcode) = kernel_field::<u8>(req, setting(setting::IO_URING_OPCODE)) else {
        return 0;
    };
    if layout & LAYOUT_SEND != 0 && is_send(opcode) {
        // SAFETY: jumps to `io_uring_send_req` (same program type, same tracepoint); returns
        // only when the slot is empty (the agent then clears `LAYOUT_SEND`).
        unsafe { IO_URING_SENDS.tail_call(&ctx, 0) };
        return 0;
    }
    if opcode == IORING_OP_CONNECT && layout & LAYOUT_CONNECT != 0 {
        // io_connect_prep() kept the user address (and copied it into the request's async
        // data, whose type differs between kernels; the user copy's place does not).
        let addr = kernel_field::<u64>(req, setting(setting::IO_URING_CONNECT_ADDR)).unwrap_or(0);
        let len =
            kernel_field::<i32>(req, setting(setting::IO_URING_CONNECT_ADDR_LEN)).unwrap_or(0);
        let fd = kernel_field::<i32>(req, setting(setting::IO_URING_FD)).unwrap_or(-1);
        io_uring_connect(&process, fd, addr, len as i64);
        return 0;
    }
    if matches!(
        opcode,
        IORING_OP_RENAMEAT | IORING_OP_LINKAT | IORING_OP_SYMLINKAT
    ) && layout & LAYOUT_PATHS != 0
    {
        paths(&process, req, opcode);
        return 0;
    }
    if (opcode != IORING_OP_OPENAT && opcode != IORING_OP_OPENAT2) || layout & LAYOUT_OPEN == 0 {
        return 0;
    }
    let name = name_at(req, setting(setting::IO_URING_OPEN_FILENAME));
    if name == 0 {
        return 0;
    }
    let dfd = kernel_field::<i32>(req, setting(setting::IO_URING_OPEN_DFD)).unwrap_or(0);
    let flags = kernel_field::<u64>(req, setting(setting::IO_URING_OPEN_FLAGS)).unwrap_or(0);
    kernel_file(
        &process,
        EventKind::FileOpen,
        (dfd, name),
        (0, 0),
        flags as u32,
    );
    0
}

/// Slot 0: `io_uring_send_req`, put there by the agent before it attaches the request probe.
#[map]
static IO_URING_SENDS: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// The requests that send bytes on a descriptor (a splice: from a pipe).
#[inline(always)]
fn is_send(opcode: u8) -> bool {
    matches!(
        opcode,
        IORING_OP_WRITE
            | IORING_OP_WRITE_FIXED
            | IORING_OP_WRITEV
            | IORING_OP_WRITEV_FIXED
            | IORING_OP_SEND
            | IORING_OP_SEND_ZC
            | IORING_OP_SENDMSG
            | IORING_OP_SENDMSG_ZC
            | IORING_OP_SPLICE
    )
}

// TP_PROTO(struct io_kiocb *req), reached by tail call from `io_uring_submit_req` (never
// attached) for a job process's write or send request: a job's container request on a
// runtime's socket is read as the syscalls' (`containers::io_uring_send`). A program apart is
// verified alone: in one program the container request parser took the verifier to its limit.
// A process outside jobs never gets here.
//
// VERIFIER: inlined into the macro's entry point, which drops its result: left a function of
// its own (LLVM does not inline one this long), it returns whatever its last instruction left in
// r0, and a stack pointer there is refused ("cannot return stack pointer to the caller").
#[btf_tracepoint(function = "io_uring_submit_req")]
#[inline(always)]
pub fn io_uring_send_req(ctx: BtfTracePointContext) -> i32 {
    let Some(process) = current_process() else {
        return 0;
    };
    let req: u64 = ctx.arg(0);
    let Some(opcode) = kernel_field::<u8>(req, setting(setting::IO_URING_OPCODE)) else {
        return 0;
    };
    if is_send(opcode) {
        sent(&process, req, opcode);
    }
    0
}

/// A write or send request. The fd is the submitter's (`cqe.fd`), or with `IOSQE_FIXED_FILE`
/// a registered file's index: then the file is looked up in the ring's table (`LAYOUT_FIXED`),
/// never taken for the descriptor of the same number. Flags that cannot be read count as fixed.
#[inline(always)]
fn sent(process: &runner_monitor_common::ProcessJob, req: u64, opcode: u8) {
    let fd = kernel_field::<i32>(req, setting(setting::IO_URING_FD)).unwrap_or(-1);
    if fd < 0 {
        return;
    }
    let flags =
        kernel_field::<u8>(req, setting(setting::IO_URING_REQ_FLAGS)).unwrap_or(REQ_F_FIXED_FILE);
    let socket = if flags & REQ_F_FIXED_FILE == 0 {
        Socket::Fd(fd as u64)
    } else if setting(setting::IO_URING_LAYOUT) & LAYOUT_FIXED != 0 {
        match registered_file(req, fd as u32) {
            Some(file) => Socket::File(file),
            None => return,
        }
    } else {
        return;
    };
    let what = match opcode {
        // The buffer is picked from the ring's provided buffers when the request runs: the
        // SQE's `addr` may name anything (a harmless decoy), so nothing is read.
        _ if flags & REQ_F_BUFFER_SELECT != 0 => Sent::Unreadable {
            len: RUNTIME_SENT_MORE,
            via: SENT_BY_PROVIDED_BUFFER,
        },
        // Into the request's descriptor (the SQE's `fd` is the splice's output).
        IORING_OP_SPLICE => {
            let at = setting(setting::IO_URING_SPLICE_LEN);
            let len = if at == 0 {
                None
            } else {
                kernel_field::<u64>(req, at)
            };
            Sent::Unreadable {
                len: len.unwrap_or(RUNTIME_SENT_MORE),
                via: SENT_BY_SPLICE,
            }
        }
        IORING_OP_WRITE | IORING_OP_WRITE_FIXED | IORING_OP_WRITEV | IORING_OP_WRITEV_FIXED => {
            let addr = kernel_field::<u64>(req, setting(setting::IO_URING_RW_ADDR)).unwrap_or(0);
            // WRITEV: the number of iovecs.
            let len = kernel_field::<u32>(req, setting(setting::IO_URING_RW_LEN)).unwrap_or(0);
            if opcode == IORING_OP_WRITEV || opcode == IORING_OP_WRITEV_FIXED {
                Sent::Vectors {
                    iov: addr,
                    count: u64::from(len),
                }
            } else {
                Sent::Buffer {
                    buf: addr,
                    len: u64::from(len),
                }
            }
        }
        _ => {
            let buf = kernel_field::<u64>(req, setting(setting::IO_URING_SEND_BUF)).unwrap_or(0);
            if opcode == IORING_OP_SENDMSG || opcode == IORING_OP_SENDMSG_ZC {
                Sent::Message(buf)
            } else {
                let flags =
                    kernel_field::<u16>(req, setting(setting::IO_URING_SEND_FLAGS)).unwrap_or(0);
                // A vectorized SEND: the number of iovecs.
                let len = kernel_field::<i32>(req, setting(setting::IO_URING_SEND_LEN))
                    .unwrap_or(0)
                    .max(0) as u64;
                if flags & IORING_SEND_VECTORIZED != 0 {
                    Sent::Vectors {
                        iov: buf,
                        count: len,
                    }
                } else {
                    Sent::Buffer { buf, len }
                }
            }
        }
    };
    io_uring_send(process, socket, what);
}

/// The `struct file *` registered at `index` in the ring of request `req`; `None` for an empty
/// slot, an index past the table, or a regular file (no socket: `FFS_ISREG`).
#[inline(always)]
fn registered_file(req: u64, index: u32) -> Option<u64> {
    let ctx = kernel_field::<u64>(req, setting(setting::IO_URING_REQ_CTX))?;
    if index >= kernel_field::<u32>(ctx, setting(setting::IO_URING_FILES_NR))? {
        return None;
    }
    let entry = kernel_field::<u64>(ctx, setting(setting::IO_URING_FILES))? + 8 * u64::from(index);
    let node_file = setting(setting::IO_URING_NODE_FILE);
    let file_ptr = if node_file == 0 {
        kernel_field::<u64>(entry, 0)?
    } else {
        let node = kernel_field::<u64>(entry, 0)?;
        if node == 0 {
            return None;
        }
        kernel_field::<u64>(node, node_file - 1)?
    };
    if file_ptr & FILE_PTR_REGULAR != 0 {
        return None;
    }
    Some(file_ptr & !FILE_PTR_FLAGS).filter(|file| *file != 0)
}

/// The name (a kernel string) of the `struct filename *` at `req + offset`; 0 when there is none.
#[inline(always)]
fn name_at(req: u64, offset: u32) -> u64 {
    match kernel_field::<u64>(req, offset) {
        Some(filename) if filename != 0 => {
            kernel_field::<u64>(filename, setting(setting::IO_URING_FILENAME_NAME)).unwrap_or(0)
        }
        _ => 0,
    }
}

/// A rename, hard link or symbolic link request (`struct io_rename`, `struct io_link`): the
/// same file events as the syscalls'. A symbolic link's first path is its target as written,
/// not a path opened (`LINK_SYMBOLIC`), as for `symlinkat`.
#[inline(always)]
fn paths(process: &runner_monitor_common::ProcessJob, req: u64, opcode: u8) {
    let old = name_at(req, setting(setting::IO_URING_PATHS_OLD));
    let new = name_at(req, setting(setting::IO_URING_PATHS_NEW));
    if old == 0 || new == 0 {
        return;
    }
    let new_dfd = kernel_field::<i32>(req, setting(setting::IO_URING_PATHS_NEW_DFD)).unwrap_or(0);
    let (kind, old_dfd, flags) = if opcode == IORING_OP_SYMLINKAT {
        (EventKind::FileLink, AT_FDCWD, LINK_SYMBOLIC)
    } else {
        let old_dfd =
            kernel_field::<i32>(req, setting(setting::IO_URING_PATHS_OLD_DFD)).unwrap_or(0);
        let flags = kernel_field::<i32>(req, setting(setting::IO_URING_PATHS_FLAGS)).unwrap_or(0);
        let kind = if opcode == IORING_OP_RENAMEAT {
            EventKind::FileRename
        } else {
            EventKind::FileLink
        };
        (kind, old_dfd, flags as u32)
    };
    kernel_file(process, kind, (old_dfd, old), (new_dfd, new), flags);
}
