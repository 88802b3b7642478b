//! Indexes of the per-CPU counter array. Per-kind counters are at `base + kind`.

use super::EVENT_KIND_SLOTS;

/// Events submitted to the ring buffer, per kind.
pub const EMITTED: u32 = 0;
/// Events lost because the ring buffer was full, per kind.
pub const LOST: u32 = EVENT_KIND_SLOTS;
/// A user-memory string (path, argument, address) could not be read.
pub const USER_READ_ERRORS: u32 = 2 * EVENT_KIND_SLOTS;
/// A job process could not be added to the process map (map full): it is untracked.
pub const PROCESS_MAP_FULL: u32 = 2 * EVENT_KIND_SLOTS + 1;
/// A syscall's arguments could not be kept until its exit (pending map full): event lost.
pub const PENDING_MAP_FULL: u32 = 2 * EVENT_KIND_SLOTS + 2;
/// A job could not be added to the job map.
pub const JOB_MAP_FULL: u32 = 2 * EVENT_KIND_SLOTS + 3;
/// A DNS socket could not be remembered.
pub const DNS_SOCKET_MAP_FULL: u32 = 2 * EVENT_KIND_SLOTS + 4;
/// Rate-limited process-access events not sent (counted, not lost: the first one was sent).
pub const RATE_LIMITED: u32 = 2 * EVENT_KIND_SLOTS + 5;
/// Events of a job over its event budget, dropped (also counted in `LOST` by kind).
pub const JOB_BUDGET_DROPPED: u32 = 2 * EVENT_KIND_SLOTS + 6;
/// Connections and UDP sends refused by block mode.
pub const EGRESS_BLOCKED: u32 = 2 * EVENT_KIND_SLOTS + 7;
/// Size of the counter array.
pub const SLOTS: u32 = 2 * EVENT_KIND_SLOTS + 8;
