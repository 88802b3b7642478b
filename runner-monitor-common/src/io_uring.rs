//! io_uring as the kernel programs see it: rings set up by job processes, and the requests they
//! submit (the `io_uring:*` tracepoints, attached as `tp_btf`).

use crate::EventHeader;

/// `IORING_OP_OPENAT` (UAPI `enum io_uring_op`, stable numbers).
pub const IORING_OP_OPENAT: u8 = 18;
/// `IORING_OP_OPENAT2`.
pub const IORING_OP_OPENAT2: u8 = 28;
/// `IORING_SETUP_SQPOLL`: a kernel thread of the ring's creator polls the submission queue, so
/// requests are submitted without any syscall.
pub const IORING_SETUP_SQPOLL: u32 = 1 << 1;

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
