//! The maps every probe family shares, and the lookups of the current task in them.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, generated::bpf_ktime_get_ns},
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use runner_monitor_common::{
    CONNECT_BLOCKED, ConnectEvent, JOB_ENDED, JobState, MAX_JOBS, MAX_TRACKED_PROCESSES,
    ProcessJob, counter,
};

/// Capacity of each kernel-private map keyed by thread, process or (process, target) pair:
/// syscalls waiting for their exit, exit codes waiting for the last thread, rate-limit pairs.
/// The agent never reads these maps; a full one is counted (`counter::PENDING_MAP_FULL`) or, for
/// the LRU ones, forgets its oldest entries.
pub const PRIVATE_MAP_ENTRIES: u32 = 4096;

/// Capacity of the kernel-private maps whose values are whole exec or chdir events (about 1 KiB
/// and 330 bytes): execs and chdirs between their syscall's entry and exit.
pub const PRIVATE_EVENT_MAP_ENTRIES: u32 = 1024;

/// A thread's connect record: the event of its connect, and whether that connect is still
/// waiting for its result (`armed` 1) or was sent (0).
#[repr(C)]
pub struct PendingConnect {
    pub event: ConnectEvent,
    pub armed: u32,
    pub _pad: u32,
}

/// thread id -> connect waiting for its result (`net.rs`), which block mode may mark refused
/// (`egress.rs`).
///
/// A thread's entry stays (disarmed) after its event is sent and is written over in place by its
/// next connect, so a thread that keeps connecting does not pay a map insert and delete per
/// connect (~0.4 us of one); entries go when their thread exits (`forget_connect`).
#[map]
pub static PENDING_CONNECTS: HashMap<u32, PendingConnect> =
    HashMap::with_max_entries(PRIVATE_MAP_ENTRIES, 0);

/// The connect this thread is in, seen by `sys_enter_connect` and not yet sent.
#[inline(always)]
pub fn pending_connect(tid: u32) -> Option<*mut ConnectEvent> {
    let pending = PENDING_CONNECTS.get_ptr_mut(tid)?;
    // SAFETY: the entry belongs to this thread, which is the only one that touches it.
    unsafe { ((*pending).armed != 0).then(|| &raw mut (*pending).event) }
}

/// Drops the connect record of an exiting thread.
#[inline(always)]
pub fn forget_connect(tid: u32) {
    let _ = PENDING_CONNECTS.remove(tid);
}

/// Marks the connect this thread is in (seen by `sys_enter_connect`) as refused by block mode,
/// with `reason` (0, or a `CONNECT_*` bit saying why); false when there is none (io_uring, or
/// the connect tracepoints are not attached).
#[inline(always)]
pub fn mark_pending_blocked(tid: u32, reason: u32) -> bool {
    match pending_connect(tid) {
        Some(event) => {
            // SAFETY: the entry belongs to this thread, which is the only one that touches it.
            unsafe { (*event).flags |= CONNECT_BLOCKED | reason };
            true
        }
        None => false,
    }
}

/// Per-CPU counters, indexed by `runner_monitor_common::counter`.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::SLOTS, 0);

/// tgid -> job of every process that belongs to a job. Children inherit at fork, in the kernel.
#[map]
pub static PROCESSES: HashMap<u32, ProcessJob> =
    HashMap::with_max_entries(MAX_TRACKED_PROCESSES, 0);

/// job key -> job state. Kept after the job ends, so that survivors' events say so.
#[map]
pub static JOBS: HashMap<u64, JobState> = HashMap::with_max_entries(MAX_JOBS, 0);

/// The agent's own tgid, set at load: signals and memory access aimed at it are tamper.
#[unsafe(no_mangle)]
static AGENT_TGID: u32 = 0;

#[inline(always)]
pub fn agent_tgid() -> u32 {
    // SAFETY: a read of a global the loader fills in; volatile so it is not constant-folded.
    unsafe { core::ptr::read_volatile(&AGENT_TGID) }
}

#[inline(always)]
pub fn count(index: u32) {
    count_by(index, 1);
}

/// Adds `n` to counter `index`.
#[inline(always)]
pub fn count_by(index: u32, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no other writer while this program runs on this CPU.
        unsafe { *slot += n }
    }
}

#[inline(always)]
pub fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// The job of the current process, if it belongs to one.
#[inline(always)]
pub fn current_process() -> Option<ProcessJob> {
    process_of(current_tgid())
}

#[inline(always)]
pub fn process_of(tgid: u32) -> Option<ProcessJob> {
    // SAFETY: the value is copied out at once.
    unsafe { PROCESSES.get(tgid).copied() }
}

#[inline(always)]
pub fn job_ended(job: u64) -> bool {
    // SAFETY: the value is copied out at once.
    match unsafe { JOBS.get(job) } {
        Some(state) => state.flags & JOB_ENDED != 0,
        None => false,
    }
}
