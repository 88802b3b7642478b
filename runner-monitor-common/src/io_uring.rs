//! io_uring as the kernel programs see it: rings set up by job processes, and the requests they
//! submit (the `io_uring:*` tracepoints, attached as `tp_btf`).

use crate::EventHeader;

/// `IORING_OP_OPENAT` (UAPI `enum io_uring_op`, stable numbers).
pub const IORING_OP_OPENAT: u8 = 18;
/// `IORING_OP_OPENAT2`.
pub const IORING_OP_OPENAT2: u8 = 28;
/// `IORING_OP_CONNECT`.
pub const IORING_OP_CONNECT: u8 = 16;
/// `IORING_OP_RENAMEAT`, `IORING_OP_SYMLINKAT`, `IORING_OP_LINKAT`.
pub const IORING_OP_RENAMEAT: u8 = 35;
pub const IORING_OP_SYMLINKAT: u8 = 38;
pub const IORING_OP_LINKAT: u8 = 39;
/// The requests that send bytes on a descriptor, as `write`, `writev`, `send` and `sendmsg` do:
/// a job's container start request may be one of them (`IORING_OP_WRITE_FIXED` and the
/// zero-copy sends name user memory too).
pub const IORING_OP_WRITEV: u8 = 2;
pub const IORING_OP_WRITE_FIXED: u8 = 5;
pub const IORING_OP_SENDMSG: u8 = 9;
pub const IORING_OP_WRITE: u8 = 23;
pub const IORING_OP_SEND: u8 = 26;
pub const IORING_OP_SEND_ZC: u8 = 47;
pub const IORING_OP_SENDMSG_ZC: u8 = 48;
/// `IORING_OP_WRITEV_FIXED` (Linux 6.15+): a `WRITEV` whose iovecs lie in a registered buffer,
/// user memory all the same.
pub const IORING_OP_WRITEV_FIXED: u8 = 61;
/// `IORING_OP_SPLICE`: bytes from a pipe (or into one) that no program can copy, as `splice`'s.
pub const IORING_OP_SPLICE: u8 = 30;
/// `io_sr_msg.flags` (the SQE's `ioprio`): a send whose buffer is an iovec array (Linux 6.17+).
pub const IORING_SEND_VECTORIZED: u16 = 1 << 5;
/// `IORING_SETUP_SQPOLL`: a kernel thread of the ring's creator polls the submission queue, so
/// requests are submitted without any syscall.
pub const IORING_SETUP_SQPOLL: u32 = 1 << 1;

/// Indexes of the kernel's `SETTINGS` array (re-exported in `setting`) holding the request
/// layout of the running kernel, which the agent reads from its BTF: aya-ebpf has no CO-RE field
/// relocations.
pub mod slot {
    /// `LAYOUT_*` bits: which of the offsets below are the running kernel's; a request whose
    /// layout is not known is not read.
    pub const IO_URING_LAYOUT: u32 = 4;
    /// Byte offsets from the start of a `struct io_kiocb`: its `opcode` (u8), and the open
    /// request's `dfd` (i32), `filename` (`struct filename *`) and `how.flags` (u64) in its
    /// command area.
    pub const IO_URING_OPCODE: u32 = 5;
    pub const IO_URING_OPEN_DFD: u32 = 6;
    pub const IO_URING_OPEN_FILENAME: u32 = 7;
    pub const IO_URING_OPEN_FLAGS: u32 = 8;
    /// Byte offset of `name` (`const char *`) in `struct filename`.
    pub const IO_URING_FILENAME_NAME: u32 = 9;
    /// From the start of a `struct io_kiocb`: the request's fd (`cqe.fd`, i32), and the connect
    /// request's user address (`struct sockaddr __user *`) and its length (i32).
    pub const IO_URING_FD: u32 = 10;
    pub const IO_URING_CONNECT_ADDR: u32 = 11;
    pub const IO_URING_CONNECT_ADDR_LEN: u32 = 12;
    /// From the start of a `struct io_kiocb`: a rename's or link's `old_dfd`, `new_dfd` (i32),
    /// `oldpath`, `newpath` (`struct filename *`) and `flags` (i32) in its command area
    /// (`struct io_rename` and `struct io_link`, laid out alike).
    pub const IO_URING_PATHS_OLD_DFD: u32 = 13;
    pub const IO_URING_PATHS_NEW_DFD: u32 = 14;
    pub const IO_URING_PATHS_OLD: u32 = 15;
    pub const IO_URING_PATHS_NEW: u32 = 16;
    pub const IO_URING_PATHS_FLAGS: u32 = 17;
    /// From the start of a `struct io_kiocb`: a write's user address and length (`struct io_rw`
    /// `addr`, u64, and `len`, u32: a buffer, or for `IORING_OP_WRITEV` an iovec array and its
    /// count), and a send's (`struct io_sr_msg`: `buf`, the `struct user_msghdr *` of a
    /// `sendmsg`, `len`, i32, and `flags`, u16).
    pub const IO_URING_RW_ADDR: u32 = 27;
    pub const IO_URING_RW_LEN: u32 = 28;
    pub const IO_URING_SEND_BUF: u32 = 29;
    pub const IO_URING_SEND_LEN: u32 = 30;
    pub const IO_URING_SEND_FLAGS: u32 = 31;
    /// From the start of a `struct io_kiocb`: its `flags`, whose low byte holds
    /// `REQ_F_FIXED_FILE` (bit 0, the uapi's `IOSQE_FIXED_FILE`: the request's fd is the index
    /// of a registered file), and `ctx` (`struct io_ring_ctx *`).
    pub const IO_URING_REQ_FLAGS: u32 = 32;
    pub const IO_URING_REQ_CTX: u32 = 33;
    /// From the start of a `struct io_ring_ctx`: the registered files' table (a pointer to
    /// 8-byte entries) and how many there are (u32).
    pub const IO_URING_FILES: u32 = 34;
    pub const IO_URING_FILES_NR: u32 = 35;
    /// 0: an entry is a `struct io_fixed_file` whose first member is `file_ptr` (before Linux
    /// 6.13); otherwise 1 + the offset of `file_ptr` in the `struct io_rsrc_node` an entry points
    /// at.
    pub const IO_URING_NODE_FILE: u32 = 36;
    /// From the start of a `struct io_kiocb`: a splice's length (`struct io_splice` `len`, u64);
    /// 0 when not known (the splice is then reported with its length unknown).
    pub const IO_URING_SPLICE_LEN: u32 = 37;
}

/// `IO_URING_LAYOUT` bit: the open request's offsets are known.
pub const LAYOUT_OPEN: u32 = 1;
/// `IO_URING_LAYOUT` bit: the connect request's offsets (and the fd's) are known.
pub const LAYOUT_CONNECT: u32 = 1 << 1;
/// `IO_URING_LAYOUT` bit: the rename and link requests' offsets (and `filename.name`) are known.
pub const LAYOUT_PATHS: u32 = 1 << 2;
/// `IO_URING_LAYOUT` bit: the write and send requests' offsets (and the fd's) are known.
pub const LAYOUT_SEND: u32 = 1 << 3;
/// `IO_URING_LAYOUT` bit: the registered files' table is known (`IO_URING_REQ_CTX` to
/// `IO_URING_NODE_FILE`): a write or send on a registered file is read as on its fd.
pub const LAYOUT_FIXED: u32 = 1 << 4;
/// `io_kiocb.flags`: the request's fd is a registered file's index.
pub const REQ_F_FIXED_FILE: u8 = 1;
/// `io_kiocb.flags` (the uapi's `IOSQE_BUFFER_SELECT`): the request's buffer is one the kernel
/// picks from the ring's provided buffers when it runs, not the SQE's `addr`.
pub const REQ_F_BUFFER_SELECT: u8 = 1 << 5;
/// The low bits of a registered file's `file_ptr` that are flags, not the `struct file *`
/// (`FFS_NOWAIT`, `FFS_ISREG`).
pub const FILE_PTR_FLAGS: u64 = 3;
/// `FFS_ISREG` in a registered file's `file_ptr`: a regular file (no socket).
pub const FILE_PTR_REGULAR: u64 = 2;

/// A job process set up an io_uring instance (`io_uring_setup`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IoUringSetupEvent {
    pub header: EventHeader,
    /// The ring's file descriptor.
    pub fd: i32,
    pub sq_entries: u32,
    pub cq_entries: u32,
    /// `IORING_SETUP_*` flags.
    pub flags: u32,
}

const _: () = assert!(core::mem::size_of::<IoUringSetupEvent>() == 64 + 16);
