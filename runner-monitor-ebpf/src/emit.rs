//! The event header, and the counted path onto the ring buffer.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::bpf_get_current_cgroup_id,
    },
    macros::map,
    maps::RingBuf,
};
use runner_monitor_common::{
    EventHeader, EventKind, HEADER_JOB_ENDED, HEADER_JOB_ROOT, PROCESS_JOB_ROOT, ProcessJob,
    RING_BUFFER_BYTES, WAKEUP_BYTES, counter,
};

use crate::maps::{count, job_ended, now_ns};

/// Every event, in one ring buffer, so the agent sees them in the order they were reserved.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BUFFER_BYTES, 0);

/// Fills the header for an event of the current task.
#[inline(always)]
pub fn fill_header(header: &mut EventHeader, kind: EventKind, process: Option<&ProcessJob>) {
    let pid_tgid = bpf_get_current_pid_tgid();
    header.kind = kind as u32;
    header.ts_ns = now_ns();
    header.pid = pid_tgid as u32;
    header.tgid = (pid_tgid >> 32) as u32;
    header.uid = bpf_get_current_uid_gid() as u32;
    // SAFETY: helper without arguments.
    header.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    header.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    fill_job(header, process);
}

#[inline(always)]
pub fn fill_job(header: &mut EventHeader, process: Option<&ProcessJob>) {
    header.flags = 0;
    match process {
        Some(p) => {
            header.job = p.job;
            header.ppid = p.ppid;
            if p.flags & PROCESS_JOB_ROOT != 0 {
                header.flags |= HEADER_JOB_ROOT;
            }
            if job_ended(p.job) {
                header.flags |= HEADER_JOB_ENDED;
            }
        }
        None => {
            header.job = 0;
            header.ppid = 0;
        }
    }
}

/// Wake-up flags for a record of `size` bytes once it is in the ring buffer.
///
/// The agent is not woken for each record: it polls the ring buffer on a short timer
/// (`WAKEUP_POLL_MS`), and is woken early only by the record that takes the backlog past
/// `WAKEUP_BYTES`. A wake-up is an inter-processor interrupt sent from the traced syscall; one
/// per event cost a reported `openat` more than all the probes together (measured: ~3 µs of a
/// 6 µs overhead on this VM).
#[inline(always)]
pub fn wakeup_flags(size: u64) -> u64 {
    let backlog = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    if backlog >= WAKEUP_BYTES && backlog < WAKEUP_BYTES + size + 8 {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// Sends an event built elsewhere (per-CPU scratch or a pending map), counting it as sent or lost.
#[inline(always)]
pub fn submit_copy<T: 'static>(kind: u32, event: *const T) {
    // VERIFIER: keeps the counter index provably inside the per-kind range.
    let kind = kind & (runner_monitor_common::EVENT_KIND_SLOTS - 1);
    let size = core::mem::size_of::<T>() as u64;
    // The backlog before this record: it crosses the mark when it ends past it.
    let backlog = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    let flags = if backlog < WAKEUP_BYTES && backlog + size + 8 >= WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    };
    // SAFETY: `event` points at a live `T` in map memory; the helper copies it.
    match EVENTS.output::<T>(unsafe { &*event }, flags) {
        Ok(()) => count(counter::EMITTED + kind),
        Err(_) => count(counter::LOST + kind),
    }
}

/// Reserves room for an event, counting a loss when the ring buffer is full.
#[inline(always)]
pub fn reserve<T: 'static>(kind: EventKind) -> Option<aya_ebpf::maps::ring_buf::RingBufEntry<T>> {
    let entry = EVENTS.reserve::<T>(0);
    if entry.is_none() {
        count(counter::LOST + kind as u32);
    }
    entry
}

#[inline(always)]
pub fn submitted(kind: EventKind) {
    count(counter::EMITTED + kind as u32);
}
