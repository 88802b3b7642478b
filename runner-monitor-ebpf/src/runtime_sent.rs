//! Copies of what a job sends on a container runtime's API connection, for the agent's stream
//! (`runner-monitor/src/enrich/runtime_streams.rs`): every buffer of a send, its first
//! `RUNTIME_SENT_BYTES`, as a `RuntimeSentEvent`; a marker where bytes were sent that nothing
//! could copy. `runtime_requests.rs` decides what is such a send.

use aya_ebpf::{
    cty::c_void,
    helpers::generated::{self, bpf_loop},
    macros::map,
    maps::PerCpuArray,
};
use runner_monitor_common::{
    EventKind, ProcessJob,
    container::{RUNTIME_SENT_BYTES, RUNTIME_SENT_MORE, RuntimeSentEvent, SENT_BY_BUFFER},
};

use crate::emit::{fill_header, send_runtime_sent};

/// How many buffers of one send go to the agent's stream: every one a `writev` or `sendmsg` can
/// have (`UIO_MAXIOV`); a marker would say more were sent.
pub const STREAM_BUFFERS: u64 = 1024;

/// What `stream_one` needs of a vectored send, and the iovec it reads.
struct Vectors {
    iov: u64,
    /// The connection (`RuntimeSentEvent::conn`).
    conn: u64,
    job: u64,
    iovec: [u64; 2],
}

/// The send `stream_one` copies, per CPU. VERIFIER: in a map, not on the stack: a stack slot
/// the loop is given makes the caller's states after it differ from those of its other paths
/// (the io_uring request program then went past a million instructions), and 6.1's verifier
/// refuses a callback whose stack and its caller's pass 512 bytes together.
#[map]
static VECTORS: PerCpuArray<Vectors> = PerCpuArray::with_max_entries(1, 0);

/// Every buffer (up to `STREAM_BUFFERS`) of `count` iovecs at `iov`, one `bpf_loop` step each,
/// then a marker when there were more. Until 2026-12-07 the first four were copied and the
/// rest marked: a start request in a send's fifth buffer started a container that was not the
/// job's. The job's event budget is charged for all of them at once, before: over it, none is
/// sent (the agent's thread on the connection is lost, as for any record dropped).
#[inline(always)]
pub fn stream_vectors(iov: u64, count: u64, conn: u64, job: u64) {
    let buffers = count.min(STREAM_BUFFERS);
    let marker = u64::from(count > STREAM_BUFFERS);
    if !crate::budget::within_budget_for(job, EventKind::RuntimeSent as u32, buffers + marker) {
        return;
    }
    let Some(vectors) = VECTORS.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's value, used by this program run only.
    unsafe {
        (*vectors).iov = iov;
        (*vectors).conn = conn;
        (*vectors).job = job;
    }
    // VERIFIER: bpf_loop, so that one step is verified once, not once per buffer.
    // SAFETY: helper call; the callback is a static function.
    unsafe {
        bpf_loop(
            buffers as u32,
            stream_one as *mut c_void,
            core::ptr::null_mut(),
            0,
        );
    }
    if marker != 0 {
        record(
            conn,
            job,
            0,
            RUNTIME_SENT_MORE,
            STREAM_BUFFERS as u32,
            SENT_BY_BUFFER,
            0,
        );
    }
}

/// Buffer `index` of the send in `VECTORS` (its budget charged). An empty one sends nothing;
/// one whose iovec cannot be read ends the copy with a marker (the agent's thread is lost
/// there).
extern "C" fn stream_one(index: u64, _: *mut c_void) -> i64 {
    let Some(vectors) = VECTORS.get_ptr_mut(0) else {
        return 1;
    };
    let index = index & (STREAM_BUFFERS - 1);
    // SAFETY: this CPU's value, written before the loop; the iovec is read into it (a checked
    // read of user memory).
    let (conn, job, read, [base, len]) = unsafe {
        let read = generated::bpf_probe_read_user(
            (&raw mut (*vectors).iovec).cast(),
            16,
            ((*vectors).iov + 16 * index) as *const _,
        );
        ((*vectors).conn, (*vectors).job, read, (*vectors).iovec)
    };
    if read != 0 {
        record(
            conn,
            job,
            0,
            RUNTIME_SENT_MORE,
            index as u32,
            SENT_BY_BUFFER,
            0,
        );
        return 1;
    }
    if len != 0 {
        record(conn, job, base, len, index as u32, SENT_BY_BUFFER, 0);
    }
    0
}

/// Copies buffer `buffer` of a send on a job's runtime connection (`len` bytes at `buf`; `len`
/// `RUNTIME_SENT_MORE`: the marker of unread buffers) for the agent's stream. The agent is
/// woken at once: it may have a start to register before the daemon makes the container.
/// Within the job's event budget, as its file and connect events: a job that floods its Docker
/// socket with tiny writes is dropped and reported over budget, not every job's events with it.
#[inline(always)]
pub fn stream(conn: u64, job: u64, buf: u64, len: u64, buffer: u32) {
    sent_record(conn, job, buf, len, buffer, SENT_BY_BUFFER, 0);
}

/// The record of `stream`, for bytes sent `via` any way (`SENT_BY_*`): from a buffer, its
/// first bytes are copied; from a file or pipe (`buf` 0) none are, and the agent knows the
/// stream has bytes it cannot read. `flags` go into the header (`HEADER_IO_URING`: sent by an
/// io_uring operation, not a syscall).
#[inline(always)]
pub fn sent_record(conn: u64, job: u64, buf: u64, len: u64, buffer: u32, via: u16, flags: u32) {
    if crate::budget::within_budget(job, EventKind::RuntimeSent as u32) {
        record(conn, job, buf, len, buffer, via, flags);
    }
}

/// `sent_record` once the budget is charged.
#[inline(always)]
fn record(conn: u64, job: u64, buf: u64, len: u64, buffer: u32, via: u16, flags: u32) {
    let n = if buf == 0 {
        0
    } else if len > RUNTIME_SENT_BYTES as u64 {
        RUNTIME_SENT_BYTES as u32
    } else {
        len as u32
    };
    let process = ProcessJob {
        job,
        ppid: 0,
        flags: 0,
        start_ns: 0,
    };
    let Some(e) = SENT_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch value, used by this program run only.
    let e = unsafe { &mut *e };
    fill_header(&mut e.header, EventKind::RuntimeSent, Some(&process));
    e.header.flags |= flags;
    e.conn = conn;
    e.len = len;
    e.buffer = buffer as u16;
    e.via = via;
    e.captured = 0;
    if n > 0 {
        // VERIFIER: 6.1's verifier loses the bound above at 8 KiB. Read back from memory
        // (volatile: the compiler knows nothing of it, so keeps the mask), `n` is in
        // 1..=RUNTIME_SENT_BYTES (a power of two) where the helper takes it, and unchanged.
        // SAFETY: a field of this CPU's scratch.
        let n = unsafe {
            core::ptr::write_volatile(&mut e.captured, n);
            core::ptr::read_volatile(&e.captured)
        };
        e.captured = 0;
        if n != 0 {
            let n = ((n - 1) & (RUNTIME_SENT_BYTES as u32 - 1)) + 1;
            // SAFETY: a checked read of user memory into the scratch, `n` within its buffer.
            let read = unsafe {
                generated::bpf_probe_read_user(e.data.as_mut_ptr().cast(), n, buf as *const _)
            };
            if read == 0 {
                e.captured = n;
            }
        }
    }
    send_runtime_sent(e);
}

/// A `RuntimeSentEvent` is built here and sent cut after the bytes read (`send_runtime_sent`):
/// most sends are far shorter than the 8 KiB kept.
#[map]
static SENT_SCRATCH: PerCpuArray<RuntimeSentEvent> = PerCpuArray::with_max_entries(1, 0);
