//! The one way an event reaches the agent: header, fields, the ring buffer, the counters.
//!
//! Every probe family sends through this module, in one of two shapes that end the same way:
//!
//! - `send`: a small event, built in place in a ring-buffer reservation (reserve, header,
//!   fields, submit);
//! - `send_built`: an event too large for the BPF stack, built in per-CPU scratch or kept in a
//!   pending map between a syscall's entry and exit, and copied into the ring buffer.
//!
//! Both apply one wake-up rule (`wakeup_flags`) and count the event per kind as emitted or lost
//! (`counter::EMITTED`, `counter::LOST`). `EVENTS` is private to this module, so no probe can
//! write to the ring buffer any other way.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{bpf_get_current_cgroup_id, bpf_get_current_comm},
    },
    macros::map,
    maps::RingBuf,
};
use runner_monitor_common::{
    BpfEvent, ChdirEvent, ConnectEvent, ContainerEvent, DnsEvent, EVENT_KIND_SLOTS, EventHeader,
    EventKind, ExecEvent, ExitEvent, FileEvent, ForkEvent, HEADER_JOB_ENDED, HEADER_JOB_ROOT,
    IoUringSetupEvent, JobEnvEvent, PATH_LEN, PROCESS_JOB_ROOT, ProcessAccessEvent, ProcessJob,
    RING_BUFFER_BYTES, SignalEvent, WAKEUP_BYTES, counter, setting,
};

use crate::maps::{count, job_ended, now_ns};

/// Every event, in one ring buffer, so the agent sees them in the order they were reserved.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BUFFER_BYTES, 0);

/// The header the kernel puts before each ring-buffer record, in bytes.
const RECORD_HEADER_BYTES: u64 = 8;

/// An event of the wire format: a `#[repr(C)]` struct that starts with its `EventHeader`.
pub trait Event: 'static {
    fn header(&self) -> &EventHeader;
    fn header_mut(&mut self) -> &mut EventHeader;
}

macro_rules! events {
    ($($t:ty),* $(,)?) => {
        $(impl Event for $t {
            #[inline(always)]
            fn header(&self) -> &EventHeader {
                &self.header
            }
            #[inline(always)]
            fn header_mut(&mut self) -> &mut EventHeader {
                &mut self.header
            }
        })*
    };
}
events!(
    ForkEvent,
    ExecEvent,
    ExitEvent,
    ChdirEvent,
    FileEvent,
    ProcessAccessEvent,
    ConnectEvent,
    DnsEvent,
    SignalEvent,
    BpfEvent,
    JobEnvEvent,
    IoUringSetupEvent,
    ContainerEvent,
    runner_monitor_common::ContainerStartEvent,
    runner_monitor_common::TlsEvent,
    runner_monitor_common::container::RuntimeSentEvent,
);

/// Sends a small event of the current task: reserves its room in the ring buffer, fills the
/// header (`fill_header`), lets `fields` write every other field, and submits it. A full ring
/// buffer drops it, counted as lost.
#[inline(always)]
pub fn send<T: Event>(kind: EventKind, process: Option<&ProcessJob>, fields: impl FnOnce(&mut T)) {
    let slot = kind_slot(kind as u32);
    let Some(mut entry) = EVENTS.reserve::<T>(0) else {
        count(counter::LOST + slot);
        return;
    };
    // SAFETY: the reserved entry is ours until submit; the header and `fields` write all of it.
    let event = unsafe { &mut *entry.as_mut_ptr() };
    fill_header(event.header_mut(), kind, process);
    fields(event);
    let size = core::mem::size_of::<T>() as u64;
    // Asked after the reservation, the backlog includes this record; the rule wants the backlog
    // the record was written onto.
    let backlog = EVENTS
        .query(BPF_RB_AVAIL_DATA as u64)
        .wrapping_sub(size + RECORD_HEADER_BYTES);
    entry.submit(wakeup_flags(backlog, size));
    count(counter::EMITTED + slot);
}

/// Sends an event built elsewhere (per-CPU scratch or a pending map), with its header filled:
/// the ring buffer gets a copy. A full ring buffer drops it, counted as lost.
#[inline(always)]
pub fn send_built<T: Event>(event: &T) {
    let slot = kind_slot(event.header().kind);
    let backlog = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    let flags = wakeup_flags(backlog, core::mem::size_of::<T>() as u64);
    match EVENTS.output::<T>(event, flags) {
        Ok(()) => count(counter::EMITTED + slot),
        Err(_) => count(counter::LOST + slot),
    }
}

/// Sends a file event built elsewhere, cut after its first path when it has no second one: a
/// typical record is a fifth of the whole struct, and its copy into the ring buffer and the
/// ring buffer's room are what a reported open pays for. The agent reads a short record as the
/// struct with the rest zero (`decode::read_prefix`).
#[inline(always)]
pub fn send_file(event: &FileEvent) {
    const WHOLE: usize = core::mem::size_of::<FileEvent>();
    const PATH_AT: usize = core::mem::offset_of!(FileEvent, path);
    let size = if event.path2_len != 0 {
        WHOLE
    } else {
        PATH_AT + (event.path_len as usize + 1).min(PATH_LEN)
    };
    // VERIFIER: a bound it can see, whatever `path_len` says.
    let size = size.min(WHOLE);
    let slot = kind_slot(event.header.kind);
    let backlog = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    let flags = wakeup_flags(backlog, size as u64);
    // SAFETY: `size` bytes from the start of `event`, which is WHOLE bytes long.
    let bytes =
        unsafe { core::slice::from_raw_parts((event as *const FileEvent).cast::<u8>(), size) };
    match EVENTS.output::<[u8]>(bytes, flags) {
        Ok(()) => count(counter::EMITTED + slot),
        Err(_) => count(counter::LOST + slot),
    }
}

/// Sends the bytes of a job's send on a runtime connection, built elsewhere, cut after the bytes
/// read (the agent reads a short record as the struct with the rest zero), and wakes the agent
/// at once: it may have a container start to register before the daemon makes the container.
/// Only a job's sends on its runtime connections get here, within its event budget.
#[inline(always)]
pub fn send_runtime_sent(event: &runner_monitor_common::container::RuntimeSentEvent) {
    use runner_monitor_common::container::RuntimeSentEvent;
    const WHOLE: usize = core::mem::size_of::<RuntimeSentEvent>();
    const DATA_AT: usize = core::mem::offset_of!(RuntimeSentEvent, data);
    // VERIFIER: a bound it can see, whatever `captured` says.
    let size = (DATA_AT + event.captured as usize).min(WHOLE);
    let slot = kind_slot(event.header.kind);
    // SAFETY: `size` bytes from the start of `event`, which is WHOLE bytes long.
    let bytes = unsafe {
        core::slice::from_raw_parts((event as *const RuntimeSentEvent).cast::<u8>(), size)
    };
    match EVENTS.output::<[u8]>(bytes, BPF_RB_FORCE_WAKEUP as u64) {
        Ok(()) => count(counter::EMITTED + slot),
        Err(_) => count(counter::LOST + slot),
    }
}

/// An event kind as an index into the per-kind counters.
#[inline(always)]
fn kind_slot(kind: u32) -> u32 {
    // VERIFIER: keeps the counter index provably inside the per-kind range.
    kind & (EVENT_KIND_SLOTS - 1)
}

/// Wake-up flags for a record of `size` bytes written onto a backlog of `backlog` bytes.
///
/// The agent is not woken for each record: while events come it polls the ring buffer on a
/// short timer (`WAKEUP_POLL_MS`), and is woken early only by the record that takes the backlog
/// past `WAKEUP_BYTES`. A wake-up is an inter-processor interrupt sent from the traced syscall;
/// one per event cost a reported `openat` more than all the probes together (measured: ~3 µs of
/// a 6 µs overhead on this VM). Once nothing came for a while the agent sleeps
/// (`setting::READER_ASLEEP`, polling costs it CPU for nothing): then the ring buffer's own rule
/// applies, a record wakes it when it has read everything before.
#[inline(always)]
fn wakeup_flags(backlog: u64, size: u64) -> u64 {
    if backlog < WAKEUP_BYTES && backlog + size + RECORD_HEADER_BYTES >= WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP as u64
    } else if crate::names::setting(setting::READER_ASLEEP) != 0 {
        0
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// Fills the header for an event of the current task.
#[inline(always)]
pub fn fill_header(header: &mut EventHeader, kind: EventKind, process: Option<&ProcessJob>) {
    header.kind = kind as u32;
    fill_task(header, process);
}

/// Fills the header for an event of the current task whose kind it holds already.
#[inline(always)]
pub fn fill_task(header: &mut EventHeader, process: Option<&ProcessJob>) {
    let pid_tgid = bpf_get_current_pid_tgid();
    header.ts_ns = now_ns();
    header.pid = pid_tgid as u32;
    header.tgid = (pid_tgid >> 32) as u32;
    header.uid = bpf_get_current_uid_gid() as u32;
    // SAFETY: helper without arguments.
    header.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // Straight into the header (zeros when it fails), not through 16 bytes of the caller's
    // stack: a `bpf_loop` callback that sends events (`runtime_sent::stream_one`) must fit
    // beside its caller in the 512 bytes the verifier allows them together.
    // SAFETY: writes 16 bytes into the header's 16-byte `comm`.
    unsafe { bpf_get_current_comm(header.comm.as_mut_ptr().cast(), header.comm.len() as u32) };
    fill_job(header, process);
}

/// Fills the job part of a header (job, parent, `HEADER_JOB_*` flags) and clears its other flags.
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
