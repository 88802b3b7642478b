//! Slots of the `SETTINGS` array: what the agent tells the kernel programs.

/// Bit n-1 set when some credential basename prefix of length n is in `NAMES`.
pub const PREFIX_LENGTHS: u32 = 0;
/// Non-zero when some job-parent names are in `NAMES`.
pub const JOB_PARENTS: u32 = 1;
/// File, connect and DNS events one job may send per `BUDGET_WINDOW_NS`; 0: no limit.
pub const JOB_EVENTS_PER_WINDOW: u32 = 2;
/// Non-zero when some job marker variables are in `NAMES`: execs outside jobs scan their
/// environment.
pub const JOB_ENV: u32 = 3;
/// Slots 4 to 17 and 27 to 36: the io_uring request layout (`io_uring::slot`).
pub use crate::io_uring::slot::*;
/// The global `[egress] mode`: 1 block, 0 audit. Judges jobs without an `EGRESS_JOBS` entry.
pub const EGRESS_MODE: u32 = 18;
/// The port of the agent's DNS resolver on 127.0.0.1, the same in every network namespace it
/// listens in (`DNS_NETNS`); 0: job DNS is not redirected. (Slots 21 and 26 are free.)
pub const DNS_RESOLVER_PORT: u32 = 19;
/// Non-zero while the agent's event reader sleeps (nothing came for a while): a record then
/// wakes it when the reader has read everything before it (the ring buffer's own rule). 0: it
/// polls every `WAKEUP_POLL_MS` and is woken only past `WAKEUP_BYTES`.
pub const READER_ASLEEP: u32 = 20;
/// Byte offset of `task_struct.exit_code` plus one, from the kernel's BTF; 0: unknown (the
/// exit status of a process killed by a signal is then unknown).
pub const TASK_EXIT_CODE: u32 = 22;
/// Byte offset of `bool group_dead` in the `sched:sched_process_exit` record, 0 when the
/// kernel's record has none (the field is newer than Debian 12's 6.1 and 6.12): then the
/// thread-group leader's exit stands for the process's.
pub const EXIT_GROUP_DEAD: u32 = 23;
/// Monotonic seconds at which the agent last said it is alive (every second); 0: not written
/// (a sensor loaded without an agent loop, tests). Programs that outlive a crashed agent (their
/// links pinned) see it go stale after `AGENT_STALE_SECONDS`.
pub const AGENT_HEARTBEAT: u32 = 24;
/// `[egress] on_agent_failure`: 1 `closed` (a job's egress is refused while the agent is gone),
/// 0 `open` (not judged, and DNS not redirected, while the agent is gone).
pub const AGENT_FAILURE_CLOSED: u32 = 25;
pub const SLOTS: u32 = 40;

/// How long the heartbeat may be silent before the agent is taken for gone.
pub const AGENT_STALE_SECONDS: u32 = 5;
