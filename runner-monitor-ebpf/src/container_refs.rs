//! Starts by name or short id (`docker start web`, `docker start 3f2a9c`, the API's `POST
//! /containers/web/start`): the request does not carry the container's id, and the kernel
//! cannot ask the daemon which container a name is. The job's request is remembered as a
//! pending start, and the next container cgroup made whose id no job requested takes it:
//!
//! - a short id is exact: a cgroup whose id starts with it takes the oldest such start;
//! - a name is a guess: the cgroup takes the oldest pending name start, first in, first out,
//!   within `WINDOW_NS`. The daemon handles requests as they come, so the first container made
//!   after a job's start of a name is that container unless another start (by anyone, by id,
//!   outside jobs) slipped in between. The agent checks every guess against the daemon's name
//!   for the container (`enrich/containers.rs`) and reports a mismatch.
//!
//! A start by the 64-digit id never comes here (`runtime_requests.rs` matches it exactly).

use aya_ebpf::{
    macros::map,
    maps::{Array, PerCpuArray},
};
use runner_monitor_common::{
    CONTAINER_ID_LEN, ContainerStartEvent, EventKind, PendingStart, ProcessJob,
    container::{
        MATCHED_BY_NAME, MATCHED_BY_SHORT_ID,
        request::{EXEC, START},
    },
};

use crate::{
    emit::send,
    maps::{current_process, now_ns},
};

/// How many starts by reference may be pending at once (across all jobs): more than a host
/// starts at the same instant; the oldest is overwritten when full.
const SLOTS: u32 = 8;
// `take_pending` visits the slots one by one, written out.
const _: () = assert!(SLOTS == 8);
/// A pending start older than this has no container: the daemon refused it (an unknown name, a
/// container already running) or it was matched the other way round. A start makes its cgroup
/// within tens of milliseconds (docs/containers.md).
const WINDOW_NS: u64 = 5_000_000_000;

#[map]
static PENDING_STARTS: Array<PendingStart> = Array::with_max_entries(SLOTS, 0);

/// A match of a new container cgroup to a pending start.
pub struct Matched {
    pub job: u64,
    pub how: u32,
    pub waited_ns: u64,
    pub reference: [u8; CONTAINER_ID_LEN],
}

/// A docker name byte (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`).
#[inline(always)]
fn name_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-'
}

/// The next slot to write (round robin: a pending start is overwritten by the eighth start by
/// reference after it). Two CPUs may take the same slot at the same instant; one start is then
/// lost, never misattributed.
#[map]
static NEXT_SLOT: Array<u32> = Array::with_max_entries(1, 0);

/// `tail` follows `/containers/` in a job's request, of which `avail` bytes were sent from
/// there: `<ref>/start` then a space or `?`, with `ref` shorter than an id. Remembers the start
/// for `job`.
#[inline(always)]
pub fn start_by_reference(tail: &[u8; CONTAINER_ID_LEN + 8], avail: u64, job: u64) {
    // One pass, no loop after it: the verifier follows each length the scan can end with.
    let mut reference = [0u8; CONTAINER_ID_LEN];
    let mut hex = 1u32;
    let mut len = 0usize;
    let mut i = 0usize;
    while i < CONTAINER_ID_LEN {
        let c = tail[i];
        if c == b'/' {
            len = i;
            break;
        }
        if !name_byte(c) {
            return;
        }
        hex &= u32::from(is_hex(c));
        reference[i] = c;
        i += 1;
    }
    if len == 0 {
        return;
    }
    let Some(after) = tail.get(len..len + 7) else {
        return;
    };
    if after[..5] == *EXEC && (after[5] == b' ' || after[5] == b'?') && (len + 6) as u64 <= avail {
        exec_by_reference(job, len, hex, reference);
        return;
    }
    if (len + 7) as u64 > avail || after[..6] != *START || (after[6] != b' ' && after[6] != b'?') {
        return;
    }
    let Some(next) = NEXT_SLOT.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a pointer into the array map's only value.
    let slot = unsafe {
        let slot = *next % SLOTS;
        *next = slot + 1;
        slot
    };
    let Some(p) = PENDING_STARTS.get_ptr_mut(slot) else {
        return;
    };
    keep(p, job, len, hex, reference);
    announce(p, slot, EventKind::ContainerStart);
}

/// A job's `docker exec` by name or short id, kept here for `announce` (see there).
#[map]
static EXEC_REFERENCE: PerCpuArray<PendingStart> = PerCpuArray::with_max_entries(1, 0);

/// A job's `docker exec` names its container by `reference` (`len` bytes; `hex`: a short id):
/// the agent resolves it at the daemon and marks the container's cgroup for the job
/// (`containers.rs`). The kernel cannot: only the full id is in its map.
#[inline(always)]
fn exec_by_reference(job: u64, len: usize, hex: u32, reference: [u8; CONTAINER_ID_LEN]) {
    let Some(p) = EXEC_REFERENCE.get_ptr_mut(0) else {
        return;
    };
    keep(p, job, len, hex, reference);
    announce(p, u32::MAX, EventKind::ContainerExec);
}

/// Writes job `job`'s request by `reference` (`len` bytes; `hex`: a short id), made now, into
/// the map value `p`, whole.
#[inline(always)]
fn keep(p: *mut PendingStart, job: u64, len: usize, hex: u32, reference: [u8; CONTAINER_ID_LEN]) {
    // SAFETY: `p` points into a map value this program run writes (a pending start's slot, or
    // the per-CPU scratch of an exec).
    unsafe {
        *p = PendingStart {
            job,
            ts_ns: now_ns(),
            len: len as u32,
            hex,
            reference,
        };
    }
}

/// Tells the agent of the pending start by name in slot `slot` (`p`): it asks the daemon which
/// container the name is while the start is under way (`enrich/name_starts.rs`). A short id is
/// matched exactly by prefix and needs no answer. An exec (`kind` `ContainerExec`, no slot) is
/// told by name and by short id alike.
///
/// VERIFIER: everything is read back from the map value, not taken from the caller's scan: the
/// scan ends with one of 64 lengths, and a send that carried its registers and stack on would be
/// verified once per length (Linux 6.1 gave up at a million instructions). Values loaded from a
/// map are unknown to the verifier, so the 64 paths meet here as one.
#[inline(always)]
fn announce(p: *mut PendingStart, slot: u32, kind: EventKind) {
    // SAFETY: `p` points into the array map's value, just written; read back field by field
    // (a whole copy would not fit the stack beside the scan's buffers).
    let (hex, job) = unsafe {
        (
            core::ptr::read_volatile(&(*p).hex),
            core::ptr::read_volatile(&(*p).job),
        )
    };
    if (hex != 0 && kind == EventKind::ContainerStart) || job == 0 {
        return;
    }
    let process = current_process().unwrap_or(ProcessJob {
        job,
        ppid: 0,
        flags: 0,
        start_ns: 0,
    });
    send(kind, Some(&process), |e: &mut ContainerStartEvent| {
        e.slot = slot;
        // SAFETY: as above; the name is copied from the map value into the record.
        unsafe {
            e.len = core::ptr::read_volatile(&(*p).len);
            e.ts_ns = core::ptr::read_volatile(&(*p).ts_ns);
            core::ptr::copy_nonoverlapping(
                (*p).reference.as_ptr(),
                e.reference.as_mut_ptr(),
                CONTAINER_ID_LEN,
            );
        }
    });
}

/// `$visit!(slot)` for slots 0 to 7, written out (see `take_pending`); also `builds.rs`'s.
macro_rules! each_slot {
    ($visit:ident) => {
        $visit!(0);
        $visit!(1);
        $visit!(2);
        $visit!(3);
        $visit!(4);
        $visit!(5);
        $visit!(6);
        $visit!(7);
    };
}
pub(crate) use each_slot;

/// The job whose pending start the new container cgroup of `id`, which no job requested by
/// id, takes: a short id it starts with, else the oldest pending name. The slot is freed.
///
/// VERIFIER: the slots are visited by a written-out sequence, not a loop: Linux 6.1's verifier
/// refuses the loop LLVM made of `for slot in 0..SLOTS` here (a back-edge reached by fall-through,
/// which kernels before 6.2 reject even for bounded loops).
#[inline(always)]
#[expect(
    unused_assignments,
    reason = "the last written-out slot's `oldest` is not read again"
)]
pub fn take_pending(id: &[u8; CONTAINER_ID_LEN]) -> Option<Matched> {
    let now = now_ns();
    // First a short id (exact), then the oldest name: two passes, so that the verifier does not
    // follow every combination of the two.
    macro_rules! short_id {
        ($slot:expr) => {
            if short_id_matches($slot, now, id) {
                return take($slot, MATCHED_BY_SHORT_ID, now);
            }
        };
    }
    each_slot!(short_id);
    let mut pick = SLOTS;
    let mut oldest = u64::MAX;
    macro_rules! oldest_name {
        ($slot:expr) => {
            if let Some(ts) = pending_name($slot, now)
                && ts < oldest
            {
                oldest = ts;
                pick = $slot;
            }
        };
    }
    each_slot!(oldest_name);
    take(pick, MATCHED_BY_NAME, now)
}

/// Slot `slot` holds a live pending start by short id that `id` starts with.
#[inline(always)]
fn short_id_matches(slot: u32, now: u64, id: &[u8; CONTAINER_ID_LEN]) -> bool {
    PENDING_STARTS.get(slot).is_some_and(|p| {
        p.job != 0
            && p.hex != 0
            && now.saturating_sub(p.ts_ns) <= WINDOW_NS
            && is_prefix(&p.reference, id)
    })
}

/// The time of slot `slot`'s live pending start by name.
#[inline(always)]
fn pending_name(slot: u32, now: u64) -> Option<u64> {
    let p = PENDING_STARTS.get(slot)?;
    (p.job != 0 && p.hex == 0 && now.saturating_sub(p.ts_ns) <= WINDOW_NS).then_some(p.ts_ns)
}

/// Frees slot `slot` and returns its start.
#[inline(always)]
fn take(slot: u32, how: u32, now: u64) -> Option<Matched> {
    let p = PENDING_STARTS.get_ptr_mut(slot)?;
    // SAFETY: a pointer into the array map's value; the slot is freed by zeroing its job.
    let p = unsafe { &mut *p };
    let job = p.job;
    p.job = 0;
    if job == 0 {
        return None;
    }
    Some(Matched {
        job,
        how,
        waited_ns: now.saturating_sub(p.ts_ns),
        reference: p.reference,
    })
}

/// `id` starts with the NUL-padded `reference` (NUL from its end on: it is written whole).
/// Branch-free, with no early exit, so that it is a straight run of compares.
#[inline(always)]
fn is_prefix(reference: &[u8; CONTAINER_ID_LEN], id: &[u8; CONTAINER_ID_LEN]) -> bool {
    let mut differ = 0u8;
    let mut i = 0usize;
    while i < CONTAINER_ID_LEN {
        let r = reference[i];
        differ |= u8::from(r != 0 && r != id[i]);
        i += 1;
    }
    differ == 0
}

/// A lowercase hex digit: what container ids are made of.
#[inline(always)]
pub fn is_hex(c: u8) -> bool {
    c.is_ascii_digit() || (b'a'..=b'f').contains(&c)
}
