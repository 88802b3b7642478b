//! Containers a job starts belong to the job, in the kernel, from their first instruction.
//!
//! A container's processes descend from containerd-shim, not from the job, so fork inheritance
//! cannot reach them. The link is made in three steps, each before the next can happen:
//!
//! 1. a job process's successful `connect` to a container runtime's unix socket (bound at
//!    `.../docker.sock` or `.../podman.sock`, served by a live process outside jobs:
//!    `unix_peer.rs`) remembers (tgid, fd) (`net.rs`);
//! 2. a `write`, `sendto`, `writev`, `sendmsg` or `sendmmsg` (its first message's first buffer),
//!    or the same submitted through io_uring (`io_uring_send`), on such a socket that starts an
//!    HTTP request `POST [/vN.NN]/containers/<64 hex id>/start` (what the docker CLI, compose
//!    and the SDKs send after create) or `.../attach` (the CLI's `run` attaches first; podman's
//!    API makes the cgroup there) records the id as the job's, at the syscall's entry (or the
//!    request's submission): before the daemon can read the request (`runtime_requests.rs`);
//! 3. when the runtime makes the container's cgroup (`cgroup:cgroup_mkdir` in the cgroup v2
//!    hierarchy, `.../<id>` or `.../docker-<id>.scope`), the cgroup id becomes the job's.
//!
//! A container cgroup a Docker daemon makes with no request, while a job's `docker build` is
//! open, is a step of that build (`builds.rs`), and so are BuildKit's step cgroups.
//!
//! A container cgroup that a job process makes itself is the job's too, with no request: the
//! runtime is the job's (podman's conmon and runc descend from the job's `podman run`; so do a
//! dockerd's the job started). Its processes are the job's by fork already; the map makes a
//! process exec'd into it later from outside (`podman exec`) the job's as well.
//!
//! A process outside any job that execs inside such a cgroup (runc init exec'ing the entrypoint,
//! or a `docker exec`'d program) joins the job at `sched_process_exec` (`process.rs`), before
//! the new program's first instruction; its children inherit at fork as always.
//!
//! A job's `docker exec` into a container that is not its own (a host service's, another
//! job's): `POST .../containers/<ref>/exec` names the container. Every container cgroup made is
//! remembered by its id (`CONTAINER_IDS`; the agent adds those made before it started), so a
//! request by the 64-digit id marks the container's cgroup at once (`EXEC_TARGETS`); a name or
//! short id is resolved by the agent at the daemon (`enrich/name_starts.rs`), which marks it
//! the same way, while the daemon is still creating the exec. The next runc init (comm
//! `runc:[2:INIT]`) that execs in a marked cgroup joins the job at its exec's entry
//! (`process.rs`): the command, not the container, is the job's.

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_probe_read_kernel_buf,
        generated::bpf_probe_read_kernel_str,
    },
    macros::{map, tracepoint},
    maps::{Array, LruHashMap},
    programs::TracePointContext,
};
use runner_monitor_common::{
    CONTAINER_ID_LEN, ContainerEvent, EventKind, ExecTarget, ProcessJob,
    container::{
        CGROUP_PATH_LEN, MATCHED_BY_CREATOR, MATCHED_BY_EXEC, MATCHED_BY_ID, MAX_CONTAINERS,
        MAX_UNIX_CONNS, RUNTIME_TGID_WORDS,
    },
    counter,
};

use crate::{
    args::field,
    container_refs::{Matched, is_hex, take_pending},
    emit::send,
    maps::{PROCESSES, count, current_process, now_ns},
};

/// (tgid << 32 | fd) -> job, for runtime sockets a job process connected to; LRU, so closed
/// sockets age out. Pinned by the agent with the container maps: a connection made before an
/// agent restart is still read after it.
#[map]
pub static UNIX_CONNS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(MAX_UNIX_CONNS, 0);

/// The processes in `UNIX_CONNS`, and the children they forked (an inherited descriptor is
/// checked at its first send: `runtime_requests::adopt`), as a bitmap (bit `tgid % 64` of word
/// `tgid / 64`): every write on the host asks it first, and an array's look-up is a load, where
/// the hash map's is a call. A bit is never cleared (a pid reused costs that process two hash
/// look-ups per write).
/// Pinned with `UNIX_CONNS`.
#[map]
pub static RUNTIME_TGIDS: Array<u64> = Array::with_max_entries(RUNTIME_TGID_WORDS, 0);

/// Container id (64 hex digits) -> job, for containers a job asked a runtime API to start.
#[map]
pub static REQUESTED_CONTAINERS: LruHashMap<[u8; CONTAINER_ID_LEN], u64> =
    LruHashMap::with_max_entries(MAX_CONTAINERS, 0);

/// cgroup v2 id -> job, for the cgroups of a job's containers.
#[map]
pub static CONTAINER_CGROUPS: LruHashMap<u64, u64> =
    LruHashMap::with_max_entries(MAX_CONTAINERS, 0);

/// Container id (64 hex digits) -> its cgroup v2 id, for every container cgroup made on the
/// host while the programs run, a job's or not; the agent adds the ones it finds at start.
#[map]
pub static CONTAINER_IDS: LruHashMap<[u8; CONTAINER_ID_LEN], u64> =
    LruHashMap::with_max_entries(MAX_CONTAINERS, 0);

/// cgroup v2 id -> a job's pending `docker exec` into that container (`ExecTarget`).
#[map]
pub static EXEC_TARGETS: LruHashMap<u64, ExecTarget> = LruHashMap::with_max_entries(1024, 0);

/// The job of a process that is not in one but runs in a job's container cgroup.
#[inline(always)]
pub fn container_job(cgroup_id: u64) -> Option<u64> {
    // SAFETY: the value is copied out at once.
    unsafe { CONTAINER_CGROUPS.get(cgroup_id).copied() }
}

/// What runc calls its process that becomes a container's command (`nsexec`'s last stage).
const RUNC_INIT: &[u8; 14] = b"runc:[2:INIT]\0";

/// A process outside any job enters exec: when it is a runc init in a container a job's `docker
/// exec` waits for, it joins that job now, before the command's first instruction, and the
/// agent is told which container it runs in. The exec's own event follows as a job process's.
#[inline(always)]
pub fn join_by_exec(tgid: u32) -> Option<ProcessJob> {
    // SAFETY: helper without arguments.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    let target = EXEC_TARGETS.get_ptr_mut(cgroup)?;
    // SAFETY: a pointer into the map's value.
    let target = unsafe { &mut *target };
    if !target.open(now_ns()) {
        return None;
    }
    // The container's own processes exec too: only runc's init is a new command.
    let comm = bpf_get_current_comm().ok()?;
    if comm[..RUNC_INIT.len()] != *RUNC_INIT {
        return None;
    }
    target.count -= 1;
    let job = target.job;
    let entry = member(job);
    if PROCESSES.insert(tgid, entry, 0).is_err() {
        count(counter::PROCESS_MAP_FULL);
        return None;
    }
    // An exec into the job's own container: the container event came at its cgroup's making.
    if container_job(cgroup) == Some(job) {
        return Some(entry);
    }
    let id = target.id;
    send(
        EventKind::Container,
        Some(&entry),
        |e: &mut ContainerEvent| {
            e.cgroup_id = cgroup;
            e.matched = MATCHED_BY_EXEC;
            e.waited_ns = 0;
            e.id = id;
            e.reference = [0; CONTAINER_ID_LEN];
            e.path = [0; CGROUP_PATH_LEN];
            e.path_len = 0;
        },
    );
    Some(entry)
}

/// Offsets of `cgroup:cgroup_mkdir` fields (see its `format` file).
mod offsets {
    /// `int root`: the hierarchy; 0 is the cgroup v2 one.
    pub const ROOT: usize = 8;
    /// `u64 id`.
    pub const ID: usize = 16;
    /// `__data_loc char[] path`: offset in the low 16 bits, length (with the NUL) in the high.
    pub const PATH: usize = 24;
}

/// What may follow the id at the end of a cgroup's name: nothing (`/docker/<id>`, kubepods,
/// cgroupfs drivers) or `.scope` (`docker-<id>.scope`, `cri-containerd-<id>.scope`: systemd
/// drivers).
const SUFFIXES: [u32; 2] = [0, 6];

/// What comes before the id in the name of the scope podman's systemd cgroup manager makes for
/// a container's monitor (`libpod-conmon-<id>.scope`, before `libpod-<id>.scope`): not the
/// container, though named by its id.
const MONITOR: &[u8; 7] = b"conmon-";

// cgroup:cgroup_mkdir: int root; int level; u64 id; __data_loc char[] path
#[tracepoint]
pub fn cgroup_mkdir(ctx: TracePointContext) -> u32 {
    let root: i32 = field(&ctx, offsets::ROOT);
    if root != 0 {
        return 0;
    }
    let data_loc: u32 = field(&ctx, offsets::PATH);
    let offset = data_loc & 0xffff;
    let len = data_loc >> 16;
    for suffix in SUFFIXES {
        // Without the NUL and the suffix, the name ends with the id.
        let Some(end) = len.checked_sub(1 + suffix) else {
            continue;
        };
        let Some(start) = end.checked_sub(CONTAINER_ID_LEN as u32) else {
            continue;
        };
        let mut id = [0u8; CONTAINER_ID_LEN];
        // SAFETY: a checked kernel read inside the tracepoint record.
        let at = unsafe { (ctx.as_ptr() as *const u8).add((offset + start) as usize) };
        // SAFETY: as above.
        if unsafe { bpf_probe_read_kernel_buf(at, &mut id) }.is_err() {
            continue;
        }
        // SAFETY: the value is copied out at once.
        let requested = unsafe { REQUESTED_CONTAINERS.get(id).copied() };
        // Not the name of a container (`.../<64 hex>`): try the next suffix.
        if requested.is_none() && !id.iter().all(|c| is_hex(*c)) {
            continue;
        }
        if before(at, start, MONITOR) {
            return 0;
        }
        let cgroup: u64 = field(&ctx, offsets::ID);
        // Every container's, for a job's `docker exec` into it later.
        let _ = CONTAINER_IDS.insert(id, cgroup, 0);
        let mut creator_ppid = 0;
        let matched = match requested {
            Some(job) => Matched {
                job,
                how: MATCHED_BY_ID,
                waited_ns: 0,
                reference: [0; CONTAINER_ID_LEN],
            },
            None => match take_pending(&id) {
                Some(m) => m,
                // Nobody asked a daemon for it, but a job process makes it: a runtime the job
                // runs itself (podman's runc, a dockerd in the job).
                None => match current_process() {
                    Some(creator) => {
                        // Its parent (podman's conmon) names the container for the agent.
                        creator_ppid = creator.ppid;
                        Matched {
                            job: creator.job,
                            how: MATCHED_BY_CREATOR,
                            waited_ns: 0,
                            reference: [0; CONTAINER_ID_LEN],
                        }
                    }
                    // A Docker daemon's container nobody asked to start: a step of a job's
                    // build, while one is open.
                    None if docker_named(at, start, suffix) => match crate::builds::open_build() {
                        Some(m) => m,
                        None => return 0,
                    },
                    None => return 0,
                },
            },
        };
        link(&ctx, cgroup, id, &matched, creator_ppid, offset, len);
        return 0;
    }
    if let Some(id) = buildkit_step(&ctx, offset, len) {
        // A BuildKit of a dockerd the job runs itself: the creator's job, as above.
        let matched = match current_process() {
            Some(creator) => Matched {
                job: creator.job,
                how: MATCHED_BY_CREATOR,
                waited_ns: 0,
                reference: [0; CONTAINER_ID_LEN],
            },
            None => match crate::builds::open_build() {
                Some(m) => m,
                None => return 0,
            },
        };
        let cgroup: u64 = field(&ctx, offsets::ID);
        link(&ctx, cgroup, id, &matched, 0, offset, len);
    }
    0
}

/// The cgroup `cgroup` of container `id` is `matched.job`'s; the agent learns it (to name the
/// container in findings): the event's process is the creator's parent `creator_ppid` (when a
/// job process made it), and it carries the cgroup's path (at `offset`, `len` bytes with the
/// NUL, in the record).
#[inline(always)]
fn link(
    ctx: &TracePointContext,
    cgroup: u64,
    id: [u8; CONTAINER_ID_LEN],
    matched: &Matched,
    creator_ppid: u32,
    offset: u32,
    len: u32,
) {
    if CONTAINER_CGROUPS.insert(cgroup, matched.job, 0).is_err() {
        count(counter::PENDING_MAP_FULL);
        return;
    }
    let skip = len.saturating_sub(CGROUP_PATH_LEN as u32);
    // SAFETY: a pointer inside the tracepoint record; read with a checked helper below.
    let path = unsafe { (ctx.as_ptr() as *const u8).add((offset + skip) as usize) };
    send(
        EventKind::Container,
        Some(&ProcessJob {
            ppid: creator_ppid,
            ..member(matched.job)
        }),
        |e: &mut ContainerEvent| {
            e.cgroup_id = cgroup;
            e.matched = matched.how;
            e.waited_ns = matched.waited_ns;
            e.id = id;
            e.reference = matched.reference;
            // SAFETY: the helper bounds the copy to the buffer.
            let n = unsafe {
                bpf_probe_read_kernel_str(
                    e.path.as_mut_ptr().cast(),
                    CGROUP_PATH_LEN as u32,
                    path.cast(),
                )
            };
            e.path_len = if n > 0 { (n - 1) as u32 } else { 0 };
        },
    );
}

/// What comes before a Docker container's id in its cgroup's name: its parent `docker` (the
/// cgroupfs driver: `/docker/<id>`), or `docker-` (the systemd driver: `docker-<id>.scope`).
const DOCKER_PARENT: &[u8; 8] = b"/docker/";
const DOCKER_SCOPE: &[u8; 7] = b"docker-";

/// Whether the container cgroup whose id is at `at` (`start` bytes into its path, followed by
/// `suffix` bytes) is named as a Docker daemon names its containers' (not kubepods',
/// containerd's or podman's).
#[inline(always)]
fn docker_named(at: *const u8, start: u32, suffix: u32) -> bool {
    if suffix == 0 {
        before(at, start, DOCKER_PARENT)
    } else {
        before(at, start, DOCKER_SCOPE)
    }
}

/// Whether the `N` bytes before `at` (`start` bytes into the path) are `want`.
#[inline(always)]
fn before<const N: usize>(at: *const u8, start: u32, want: &[u8; N]) -> bool {
    if (start as usize) < N {
        return false;
    }
    let mut got = [0u8; N];
    // SAFETY: a checked kernel read inside the tracepoint record (`start` bytes precede `at`).
    let read = unsafe { bpf_probe_read_kernel_buf(at.sub(N), &mut got) };
    read.is_ok() && got == *want
}

/// Length of BuildKit's ids (`identity.NewID`: 25 base-36 digits, zero-padded).
const BUILDKIT_ID_LEN: usize = 25;
/// The id of the BuildKit step whose cgroup the record at `offset` (`len` bytes with the NUL)
/// makes, NUL-padded; `None` when the cgroup is not one. dockerd names them
/// `<parent>/buildkit/<id>` (cgroupfs driver, measured here) or, with the systemd driver (its
/// cgroup parent `system.slice:docker:`, moby's `newCgroupParent`), `docker-<id>.scope`
/// (untested here: no systemd).
#[inline(always)]
fn buildkit_step(ctx: &TracePointContext, offset: u32, len: u32) -> Option<[u8; CONTAINER_ID_LEN]> {
    // VERIFIER: two calls, not a loop over a table of markers: a pointer kept in read-only data
    // is a scalar to the verifier.
    buildkit_named(ctx, offset, len, b"/buildkit/", b"")
        .or_else(|| buildkit_named(ctx, offset, len, b"/docker-", b".scope"))
}

/// The id of a BuildKit step's cgroup named `<marker><id><suffix>`.
#[inline(always)]
fn buildkit_named<const M: usize, const S: usize>(
    ctx: &TracePointContext,
    offset: u32,
    len: u32,
    marker: &[u8; M],
    suffix: &[u8; S],
) -> Option<[u8; CONTAINER_ID_LEN]> {
    let start = len.checked_sub(1 + (S + BUILDKIT_ID_LEN) as u32)?;
    let mut name = [0u8; BUILDKIT_ID_LEN];
    // SAFETY: a checked kernel read inside the tracepoint record.
    let at = unsafe { (ctx.as_ptr() as *const u8).add((offset + start) as usize) };
    // SAFETY: as above.
    unsafe { bpf_probe_read_kernel_buf(at, &mut name) }.ok()?;
    if !name
        .iter()
        .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase())
        || !before(at, start, marker)
    {
        return None;
    }
    if S != 0 {
        let mut after = [0u8; S];
        // SAFETY: as above: the suffix's bytes end the name.
        unsafe { bpf_probe_read_kernel_buf(at.add(BUILDKIT_ID_LEN), &mut after) }.ok()?;
        if after != *suffix {
            return None;
        }
    }
    let mut id = [0u8; CONTAINER_ID_LEN];
    id[..BUILDKIT_ID_LEN].copy_from_slice(&name);
    Some(id)
}

/// The process-map entry of a process that joins job `job` by its container's cgroup.
#[inline(always)]
pub fn member(job: u64) -> ProcessJob {
    ProcessJob {
        job,
        ppid: 0,
        flags: runner_monitor_common::PROCESS_CONTAINER,
        start_ns: 0,
    }
}
