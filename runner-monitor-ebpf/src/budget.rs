//! The per-job event budget: one job's flood of file, connect or DNS events cannot fill the ring
//! buffer and crowd out the other jobs' events.

use aya_ebpf::{macros::map, maps::LruHashMap};
use runner_monitor_common::{
    BUDGET_WINDOW_NS, EVENT_KIND_SLOTS, JobBudget, MAX_JOBS, counter, setting,
};

use crate::maps::{count_by, now_ns};

/// job key -> its use of the event budget. LRU: jobs long gone make room by themselves.
#[map]
static JOB_BUDGETS: LruHashMap<u64, JobBudget> = LruHashMap::with_max_entries(MAX_JOBS, 0);

/// Whether one more file, connect or DNS event of `job` fits its budget
/// (`setting::JOB_EVENTS_PER_WINDOW` per `BUDGET_WINDOW_NS`). Over it, the event is dropped and
/// counted, per kind with the ring buffer's losses and per job in `JOB_BUDGETS`.
#[inline(always)]
pub fn within_budget(job: u64, kind: u32) -> bool {
    within_budget_at(job, kind, now_ns())
}

/// `within_budget`, with the clock already read (`now`, from `bpf_ktime_get_ns`): an event
/// whose header holds its time spares the budget a clock read.
#[inline(always)]
pub fn within_budget_at(job: u64, kind: u32, now: u64) -> bool {
    charge(job, kind, now, 1)
}

/// Whether `events` more events of `job` fit its budget, all or none: the records of one send's
/// buffers (`runtime_sent::stream_vectors`), charged once before they are made.
#[inline(always)]
pub fn within_budget_for(job: u64, kind: u32, events: u64) -> bool {
    charge(job, kind, now_ns(), events)
}

/// Adds `events` to `job`'s count in the window `now` falls in; false when that takes it over
/// the budget (the events are dropped, and counted).
#[inline(always)]
fn charge(job: u64, kind: u32, now: u64, events: u64) -> bool {
    let per_window = u64::from(crate::names::setting(setting::JOB_EVENTS_PER_WINDOW));
    if per_window == 0 {
        return true;
    }
    match JOB_BUDGETS.get_ptr_mut(job) {
        // SAFETY: a map value; concurrent updates from other CPUs only make the counts inexact.
        Some(b) => unsafe {
            // A time older than the window's start (a long connect's, read at its entry) counts
            // in the window: it never moves the window back.
            if now.saturating_sub((*b).window_ns) >= BUDGET_WINDOW_NS {
                (*b).window_ns = now;
                (*b).count = 0;
            }
            (*b).count += events;
            if (*b).count <= per_window {
                return true;
            }
            (*b).dropped += events;
        },
        None => {
            let fresh = JobBudget {
                window_ns: now,
                count: events,
                dropped: if events <= per_window { 0 } else { events },
            };
            let _ = JOB_BUDGETS.insert(job, fresh, 0);
            if events <= per_window {
                return true;
            }
        }
    }
    count_by(counter::JOB_BUDGET_DROPPED, events);
    count_by(counter::LOST + (kind & (EVENT_KIND_SLOTS - 1)), events);
    false
}
