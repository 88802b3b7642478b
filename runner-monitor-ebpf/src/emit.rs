//! The maps every probe family shares, the event header, and the counted path onto the ring
//! buffer.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{bpf_get_current_cgroup_id, bpf_ktime_get_ns},
    },
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use runner_monitor_common::{
    BUDGET_WINDOW_NS, EventHeader, EventKind, HEADER_JOB_ENDED, HEADER_JOB_ROOT, JOB_ENDED,
    JobBudget, JobState, MAX_JOBS, MAX_TRACKED_PROCESSES, PROCESS_JOB_ROOT, ProcessJob,
    RING_BUFFER_BYTES, WAKEUP_BYTES, counter, setting,
};

/// Every event, in one ring buffer, so the agent sees them in the order they were reserved.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BUFFER_BYTES, 0);

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

/// job key -> its use of the event budget. LRU: jobs long gone make room by themselves.
#[map]
pub static JOB_BUDGETS: LruHashMap<u64, JobBudget> = LruHashMap::with_max_entries(MAX_JOBS, 0);

/// Whether one more file, connect or DNS event of `job` fits its budget
/// (`setting::JOB_EVENTS_PER_WINDOW` per `BUDGET_WINDOW_NS`). Over it, the event is dropped and
/// counted, per kind with the ring buffer's losses and per job in `JOB_BUDGETS`: one job's flood
/// cannot fill the ring buffer and crowd out the other jobs' events.
#[inline(always)]
pub fn within_budget(job: u64, kind: u32) -> bool {
    let per_window = u64::from(crate::names::setting(setting::JOB_EVENTS_PER_WINDOW));
    if per_window == 0 {
        return true;
    }
    let now = now_ns();
    match JOB_BUDGETS.get_ptr_mut(job) {
        // SAFETY: a map value; concurrent updates from other CPUs only make the counts inexact.
        Some(b) => unsafe {
            if now.wrapping_sub((*b).window_ns) >= BUDGET_WINDOW_NS {
                (*b).window_ns = now;
                (*b).count = 1;
                return true;
            }
            (*b).count += 1;
            if (*b).count <= per_window {
                return true;
            }
            (*b).dropped += 1;
            count(counter::JOB_BUDGET_DROPPED);
            count(counter::LOST + (kind & (runner_monitor_common::EVENT_KIND_SLOTS - 1)));
            false
        },
        None => {
            let fresh = JobBudget {
                window_ns: now,
                count: 1,
                dropped: 0,
            };
            let _ = JOB_BUDGETS.insert(job, fresh, 0);
            true
        }
    }
}

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
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no other writer while this program runs on this CPU.
        unsafe { *slot += 1 }
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
