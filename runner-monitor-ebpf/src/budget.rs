//! The per-job event budget: one job's flood of file, connect or DNS events cannot fill the ring
//! buffer and crowd out the other jobs' events.

use aya_ebpf::{macros::map, maps::LruHashMap};
use runner_monitor_common::{
    BUDGET_WINDOW_NS, EVENT_KIND_SLOTS, JobBudget, MAX_JOBS, counter, setting,
};

use crate::maps::{count, now_ns};

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
                (*b).count = 1;
                return true;
            }
            (*b).count += 1;
            if (*b).count <= per_window {
                return true;
            }
            (*b).dropped += 1;
            count(counter::JOB_BUDGET_DROPPED);
            count(counter::LOST + (kind & (EVENT_KIND_SLOTS - 1)));
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
