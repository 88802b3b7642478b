//! Containers a job started, as the kernel programs see them (`runner-monitor-ebpf/src/containers.rs`).

use crate::EventHeader;

/// Length of a container id (Docker, containerd, CRI): 64 hex digits.
pub const CONTAINER_ID_LEN: usize = 64;
/// Capacity of the kernel's container maps (requested ids, container cgroups), which are pinned
/// like the process map so that a job's containers stay its own across an agent restart.
pub const MAX_CONTAINERS: u32 = 4096;
/// Capacity of the kernel's map of job processes' connections to a runtime's socket (LRU, so
/// closed sockets age out); pinned too, so a connection made before an agent restart is read
/// after it.
pub const MAX_UNIX_CONNS: u32 = 4096;
/// Words of the kernel's bitmap of processes with a runtime connection (`RUNTIME_TGIDS`, bit
/// `tgid % 64` of word `tgid / 64`): room for every pid up to Linux's highest `pid_max` (2^22).
pub const RUNTIME_TGID_WORDS: u32 = 1 << 16;
/// Bytes of one buffer a job sends on a runtime connection that the kernel copies for the agent
/// (`RuntimeSentEvent`); the rest of a longer buffer is a gap the agent skips as a body, or
/// reports where a request could hide. 8 KiB holds any head a Docker client sends in one buffer
/// (Go's client writes through a 4 KiB buffer; docker-py sends a head whole, with a registry's
/// `X-Registry-Auth`, ECR's over 4 KiB).
pub const RUNTIME_SENT_BYTES: usize = 8192;
const _: () = assert!(RUNTIME_SENT_BYTES.is_power_of_two());
/// `RuntimeSentEvent::len` of the marker sent after the last buffer read of a send with more
/// buffers than the kernel reads: the stream has a gap of unknown length there.
pub const RUNTIME_SENT_MORE: u64 = u64::MAX;

/// `RuntimeSentEvent::via`: from a buffer of the sender's memory (`write`, `send*`,
/// io_uring's writes and sends), copied up to `RUNTIME_SENT_BYTES`.
pub const SENT_BY_BUFFER: u16 = 0;
/// `sendfile`: from a file, nothing the kernel programs can copy.
pub const SENT_BY_SENDFILE: u16 = 1;
/// `splice`: from a pipe, nothing the kernel programs can copy (io_uring's `IORING_OP_SPLICE`
/// too, its header flagged `HEADER_IO_URING`).
pub const SENT_BY_SPLICE: u16 = 2;
/// The marker (`RUNTIME_SENT_MORE`) of a `sendmmsg`'s messages after its first: none is read,
/// and no HTTP client sends a stream's requests as several messages of one call.
pub const SENT_BY_SENDMMSG: u16 = 3;
/// An io_uring send from the ring's provided buffers (`IOSQE_BUFFER_SELECT`): the buffer is
/// picked when the request runs, so there is none to read at submission.
pub const SENT_BY_PROVIDED_BUFFER: u16 = 4;

/// The Docker API request line the kernel reads where a send's first buffer begins
/// (`runner-monitor-ebpf/src/runtime_requests.rs` and `container_refs.rs`); the agent mirrors
/// it on the bytes the kernel saw (`enrich/runtime_streams.rs`, `kernel_reads`).
pub mod request {
    pub const POST: &[u8; 6] = b"POST /";
    pub const CONTAINERS: &[u8; 12] = b"/containers/";
    pub const START: &[u8; 6] = b"/start";
    /// `docker exec` creates its command with `POST .../containers/<ref>/exec`.
    pub const EXEC: &[u8; 5] = b"/exec";
    /// The docker CLI's `run` attaches before it starts; podman's Docker API makes the
    /// container's cgroup at the attach (it initialises the container there), before the start
    /// request. Read by full id only.
    pub const ATTACH: &[u8; 7] = b"/attach";
    /// The request line's first bytes: `POST /v1.47/containers/`, with room for a longer
    /// version.
    pub const PREFIX_LEN: usize = 32;
    /// Where `/containers/` may begin: unversioned, or after `/v1.9`, `/v1.47`, `/v1.100`.
    pub const CONTAINERS_AT: [usize; 4] = [5, 10, 11, 12];
}

/// Bytes of the cgroup path kept (the end of it, which holds the id, is what matters).
pub const CGROUP_PATH_LEN: usize = 128;

/// How a container was matched to a job's start request (`ContainerEvent::matched`): by its
/// 64-digit id (exact), by a short id it starts with (exact), or by a name (the oldest pending
/// start by name of any job: a guess the agent checks against the daemon).
pub const MATCHED_BY_ID: u32 = 1;
pub const MATCHED_BY_SHORT_ID: u32 = 2;
pub const MATCHED_BY_NAME: u32 = 3;
/// No request: a job process made the container's cgroup (a runtime the job runs itself,
/// podman's runc).
pub const MATCHED_BY_CREATOR: u32 = 4;
/// Not the job's container: a job's `docker exec` ran a process in it, and that process (not
/// the container) is the job's. The event names the container for findings about it.
pub const MATCHED_BY_EXEC: u32 = 5;
/// No request: a step of a `docker build` a job asked for (its connection still open), made by
/// the daemon (the classic builder's containers, BuildKit's step cgroups).
pub const MATCHED_BY_BUILD: u32 = 6;
/// The same, while builds of more than one job were open: the oldest build's job, a guess.
pub const MATCHED_BY_BUILD_CONTESTED: u32 = 7;

/// How many `docker build`s may be open at once (across all jobs); the oldest is overwritten
/// when full.
pub const BUILD_SLOTS: u32 = 8;
/// An open build whose connection the agent has not seen alive for this long is over: the agent
/// refreshes `OpenBuild::seen_ns` every second while the job's connection lives
/// (`enrich/builds.rs`), so a stopped agent leaves no build open for long.
pub const BUILD_QUIET_NS: u64 = 30_000_000_000;

/// A job's `docker build` request (`POST [/vN.NN]/build`), in the kernel's `BUILDS` slots
/// (`runner-monitor-ebpf/src/builds.rs`), which the agent writes: while it is open, a container
/// cgroup a Docker daemon makes with no start request is a step of it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenBuild {
    /// The job; 0: a free slot.
    pub job: u64,
    /// When the request was sent (ktime ns).
    pub ts_ns: u64,
    /// When its connection was last seen alive (the request, then the agent's checks).
    pub seen_ns: u64,
    /// The process that sent it and the descriptor (-1: sent through io_uring on a registered
    /// file).
    pub tgid: u32,
    pub fd: i32,
}

const _: () = assert!(core::mem::size_of::<OpenBuild>() == 32);

impl OpenBuild {
    #[inline(always)]
    pub fn open(&self, now_ns: u64) -> bool {
        self.job != 0 && now_ns.saturating_sub(self.seen_ns) <= BUILD_QUIET_NS
    }

    /// A new build request takes the slot of lowest rank: the same connection's, then
    /// a closed slot, then the oldest open build.
    #[inline(always)]
    pub fn replace_rank(&self, now_ns: u64, tgid: u32, fd: i32) -> u64 {
        if !self.open(now_ns) {
            1
        } else if self.tgid == tgid && self.fd == fd {
            0
        } else {
            self.ts_ns.saturating_add(2)
        }
    }
}

#[cfg(feature = "user")]
// SAFETY: plain `#[repr(C)]` data without padding (size asserted above); every bit pattern is a
// valid value.
unsafe impl aya::Pod for OpenBuild {}

/// How long a job's exec request waits for its process (`EXEC_TARGETS`): the runtime starts it
/// within tens of milliseconds (40-53 ms measured here, docs/containers.md). Short, because a
/// mark no process of the job takes (an exec the daemon refused) goes to the next runc init in
/// that container, whoever asked for it.
pub const EXEC_WINDOW_NS: u64 = 1_000_000_000;

/// A job's pending `docker exec` into a container that is not its own (`EXEC_TARGETS`, keyed by
/// the container's cgroup id): the next `count` runc inits that exec in that cgroup within
/// `EXEC_WINDOW_NS` of `ts_ns` are the job's. `job` 0: contested (two jobs asked within the
/// window), nobody's until the window passes with no request.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExecTarget {
    pub job: u64,
    /// When the last exec request came (ktime ns).
    pub ts_ns: u64,
    /// Requests not yet taken by a process.
    pub count: u32,
    pub _pad: u32,
    /// The container's id (64 hex digits), for the event that names it.
    pub id: [u8; CONTAINER_ID_LEN],
}

const _: () = assert!(core::mem::size_of::<ExecTarget>() == 24 + CONTAINER_ID_LEN);

impl ExecTarget {
    /// The target after job `job`'s exec request into container `id` at `now_ns`, given the one
    /// there (`self`, if any): the job's count goes up; another job's live target becomes
    /// contested, so that neither job's command is given to the other.
    #[inline(always)]
    pub fn after_request(
        current: Option<&ExecTarget>,
        job: u64,
        now_ns: u64,
        id: &[u8; CONTAINER_ID_LEN],
    ) -> ExecTarget {
        let fresh = ExecTarget {
            job,
            ts_ns: now_ns,
            count: 1,
            _pad: 0,
            id: *id,
        };
        match current.filter(|t| now_ns.saturating_sub(t.ts_ns) <= EXEC_WINDOW_NS) {
            None => fresh,
            Some(t) if t.job == job => ExecTarget {
                count: t.count.saturating_add(1),
                ..fresh
            },
            Some(_) => ExecTarget {
                job: 0,
                count: 0,
                ..fresh
            },
        }
    }

    /// A runc init in the target's container at `now_ns` may take it.
    #[inline(always)]
    pub fn open(&self, now_ns: u64) -> bool {
        self.job != 0 && self.count > 0 && now_ns.saturating_sub(self.ts_ns) <= EXEC_WINDOW_NS
    }
}

#[cfg(feature = "user")]
// SAFETY: plain `#[repr(C)]` data without padding (size asserted above); every bit pattern is a
// valid value.
unsafe impl aya::Pod for ExecTarget {}

/// The cgroup of a container job `header.job` asked a runtime to start was made: from now on,
/// a process outside jobs that execs in it joins the job. The header's process is whoever made
/// the cgroup (the runtime), not a job process.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ContainerEvent {
    pub header: EventHeader,
    /// The cgroup's id in the cgroup v2 hierarchy (what `bpf_get_current_cgroup_id` returns and
    /// every event header carries).
    pub cgroup_id: u64,
    /// Bytes of `path` used (the path's last bytes when it was longer).
    pub path_len: u32,
    /// `MATCHED_BY_ID`, `MATCHED_BY_SHORT_ID`, `MATCHED_BY_NAME`, `MATCHED_BY_CREATOR` or
    /// `MATCHED_BY_EXEC`.
    pub matched: u32,
    /// Nanoseconds from the job's start request to the cgroup (0 when matched by id).
    pub waited_ns: u64,
    pub id: [u8; CONTAINER_ID_LEN],
    /// The name or short id the job's start request gave, NUL-padded (zero when by id).
    pub reference: [u8; CONTAINER_ID_LEN],
    /// The cgroup's path in the v2 hierarchy (`/docker/<id>`, `/system.slice/docker-<id>.scope`).
    pub path: [u8; CGROUP_PATH_LEN],
}

/// A start by name (`POST /containers/<name>/start`) a job sent, waiting for its container's
/// cgroup in slot `slot` of the kernel's pending starts (`container_refs.rs`). The agent asks
/// the daemon for the container's id and, when the answer comes before the cgroup, registers
/// the id as the job's and frees the slot (`enrich/name_starts.rs`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ContainerStartEvent {
    pub header: EventHeader,
    /// The slot's index, and its time (`PendingStart::ts_ns`): together they say whether the
    /// slot still holds this start.
    pub slot: u32,
    /// Bytes of `reference` used.
    pub len: u32,
    pub ts_ns: u64,
    pub reference: [u8; CONTAINER_ID_LEN],
}

const _: () = assert!(core::mem::size_of::<ContainerStartEvent>() == 64 + 16 + CONTAINER_ID_LEN);

/// A pending start by name or short id (`container_refs.rs`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PendingStart {
    /// The job that asked; 0: a free slot.
    pub job: u64,
    pub ts_ns: u64,
    /// Bytes of `reference` used.
    pub len: u32,
    /// Every byte is a lowercase hex digit: a short id, matched by prefix only.
    pub hex: u32,
    pub reference: [u8; CONTAINER_ID_LEN],
}

const _: () = assert!(core::mem::size_of::<PendingStart>() == 24 + CONTAINER_ID_LEN);

#[cfg(feature = "user")]
// SAFETY: plain `#[repr(C)]` data without padding (size asserted above); every bit pattern is a
// valid value.
unsafe impl aya::Pod for PendingStart {}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: [u8; CONTAINER_ID_LEN] = [b'a'; CONTAINER_ID_LEN];

    #[test]
    fn a_jobs_exec_requests_count_up_and_another_jobs_contest_the_container() {
        let first = ExecTarget::after_request(None, 7, 100, &ID);
        assert_eq!((first.job, first.count), (7, 1));
        assert!(first.open(100 + EXEC_WINDOW_NS));
        assert!(!first.open(101 + EXEC_WINDOW_NS));
        let second = ExecTarget::after_request(Some(&first), 7, 200, &ID);
        assert_eq!((second.job, second.count, second.ts_ns), (7, 2, 200));
        // Job 8 asks within the window: nobody's, and stays so while requests keep coming.
        let contested = ExecTarget::after_request(Some(&second), 8, 300, &ID);
        assert_eq!((contested.job, contested.count), (0, 0));
        assert!(!contested.open(300));
        let still = ExecTarget::after_request(Some(&contested), 7, 400, &ID);
        assert!(!still.open(400));
        // A request after the window starts afresh.
        let later = ExecTarget::after_request(Some(&still), 8, 401 + EXEC_WINDOW_NS, &ID);
        assert_eq!((later.job, later.count), (8, 1));
    }
}

/// One buffer a job process sent on its connection to a runtime's API socket, in the order
/// sent: the agent reads the HTTP stream from these (`enrich/runtime_streams.rs`). Never
/// written anywhere: the bytes may hold a registry password or a container's environment.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RuntimeSentEvent {
    pub header: EventHeader,
    /// The connection: `(tgid << 32) | fd`, or the `struct file` address of an io_uring
    /// registered file.
    pub conn: u64,
    /// Bytes of this buffer sent (`RUNTIME_SENT_MORE`: a marker, see there).
    pub len: u64,
    /// Bytes of `data` read: the buffer's first bytes, up to `RUNTIME_SENT_BYTES`; 0 when it
    /// could not be read.
    pub captured: u32,
    /// The buffer's index in its send (0 for a `write`, the iovec's for a `writev`).
    pub buffer: u16,
    /// How the bytes were sent: `SENT_BY_BUFFER`, or `SENT_BY_SENDFILE`/`SENT_BY_SPLICE`
    /// (from a file or a pipe: no buffer to copy, `captured` is 0), or `SENT_BY_SENDMMSG` (the
    /// marker of a `sendmmsg`'s later messages).
    pub via: u16,
    pub data: [u8; RUNTIME_SENT_BYTES],
}

const _: () = assert!(core::mem::size_of::<RuntimeSentEvent>() == 64 + 24 + RUNTIME_SENT_BYTES);
