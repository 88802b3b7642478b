//! File access by job processes: opens of credential paths and of other processes' memory, and
//! renames, unlinks and links onto watched paths.
//!
//! Each syscall is seen twice: at entry the path is read from user memory and matched; a match is
//! kept per thread until the exit, which adds the result and sends the event.
//!
//! Every file syscall's entry program only takes its arguments (for a job process) and jumps to
//! one program, `file_enter`, which reads and matches the paths (a tail call through
//! `FILE_ENTER`): the kernel's verifier checks the path matching once, not once per syscall. It
//! took about half a second per program, most of an agent's start.

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_user,
        generated::{bpf_probe_read_kernel_str, bpf_probe_read_user_str},
    },
    macros::{map, tracepoint},
    maps::{HashMap, PerCpuArray, ProgramArray},
    programs::TracePointContext,
};
use runner_monitor_common::{
    AT_FDCWD, EventKind, FileEvent, HEADER_IO_URING, HEADER_TRUNCATED, LINK_SYMBOLIC,
    MATCH_SECOND_PATH, PATH_LEN, ProcessJob, counter,
};

use crate::{
    args::{syscall_arg, syscall_ret},
    budget::within_budget,
    emit::{fill_header, fill_task, send_file},
    maps::{PRIVATE_MAP_ENTRIES, count, current_process, current_tgid},
    names::{mark, match_credential, match_proc_memory, split},
};

/// A matched file event waiting for its syscall's result, with the user pointers of its paths:
/// a path not yet paged in cannot be read at entry, but the kernel has faulted it in by the exit,
/// so the exit reads it again.
#[repr(C)]
struct PendingFile {
    event: FileEvent,
    path: u64,
    path2: u64,
    /// `IDLE`, `MATCHED`, or `RETRY` when the paths still have to be read and matched at the exit.
    state: u32,
    _pad: u32,
}

const IDLE: u32 = 0;
const MATCHED: u32 = 1;
const RETRY: u32 = 2;

/// Per-CPU room to build a file event (too large for the BPF stack).
#[map]
static FILE_SCRATCH: PerCpuArray<PendingFile> = PerCpuArray::with_max_entries(1, 0);

/// thread id -> file event waiting for its syscall's result.
///
/// A thread's entry stays (`IDLE`) after its event is sent and is written over in place by its
/// next match, so a thread that keeps opening credentials does not pay a map insert and delete
/// per open; entries go when their thread exits (`forget_thread`).
#[map]
static PENDING_FILES: HashMap<u32, PendingFile> = HashMap::with_max_entries(PRIVATE_MAP_ENTRIES, 0);

/// Slot 0: `file_enter`, put there by the agent before it attaches the entry programs.
#[map]
static FILE_ENTER: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Copies a `PendingFile` between two places in map memory, a word at a time.
///
/// Plain loads and stores: `bpf_probe_read_kernel` checks and fault-protects every word
/// (`copy_from_kernel_nofault`), the largest single cost of a reported open's entry in `perf`;
/// `copy_nonoverlapping` would be compiler-builtins' byte loop, which the verifier walks byte by
/// byte.
///
/// # Safety
/// `dst` and `src` point to `PendingFile`s in map memory that nothing else writes meanwhile.
#[inline(always)]
unsafe fn copy_words(dst: *mut PendingFile, src: *const PendingFile) {
    const WORDS: usize = core::mem::size_of::<PendingFile>() / 8;
    const _: () = assert!(core::mem::size_of::<PendingFile>().is_multiple_of(8));
    let (dst, src) = (dst.cast::<u64>(), src.cast::<u64>());
    for w in 0..WORDS {
        // SAFETY: `w` < WORDS, inside both (8-aligned) values.
        unsafe { core::ptr::write_volatile(dst.add(w), core::ptr::read_volatile(src.add(w))) };
    }
}

/// Drops the pending-file entry of an exiting thread.
#[inline(always)]
pub fn forget_thread(tid: u32) {
    let _ = PENDING_FILES.remove(tid);
}

/// Reads a NUL-terminated user string into `dst`; returns its length with the NUL, 0 on error.
#[inline(always)]
pub fn read_user_path(dst: &mut [u8; PATH_LEN], src: u64) -> usize {
    if src == 0 {
        return 0;
    }
    // SAFETY: the helper writes at most PATH_LEN bytes into `dst` and checks the user address.
    let n = unsafe {
        bpf_probe_read_user_str(dst.as_mut_ptr().cast(), PATH_LEN as u32, src as *const _)
    };
    if n <= 0 { 0 } else { n as usize }
}

/// Reads a NUL-terminated kernel string into `dst`; returns its length with the NUL, 0 on error.
#[inline(always)]
fn read_kernel_path(dst: &mut [u8; PATH_LEN], src: u64) -> usize {
    if src == 0 {
        return 0;
    }
    // SAFETY: the helper writes at most PATH_LEN bytes into `dst` and checks the kernel address.
    let n = unsafe {
        bpf_probe_read_kernel_str(dst.as_mut_ptr().cast(), PATH_LEN as u32, src as *const _)
    };
    if n <= 0 { 0 } else { n as usize }
}

/// Whether the paths could be read, and matched.
#[derive(PartialEq, Eq)]
enum Outcome {
    Unreadable,
    NoMatch,
    Match,
}

/// Reads the path(s) of `pending` from user memory (kernel memory when `kernel`) and matches
/// them.
#[inline(always)]
fn read_and_match(pending: &mut PendingFile, kernel: bool) -> Outcome {
    let is_open = pending.event.header.kind == EventKind::FileOpen as u32;
    let event = &mut pending.event;
    event.matched = 0;
    event.target_pid = 0;
    event.path2_len = 0;
    event.path2[0] = 0;
    let n = if kernel {
        read_kernel_path(&mut event.path, pending.path)
    } else {
        read_user_path(&mut event.path, pending.path)
    };
    if n == 0 {
        event.path_len = 0;
        return Outcome::Unreadable;
    }
    event.path_len = (n - 1) as u32;
    if n >= PATH_LEN {
        event.header.flags |= HEADER_TRUNCATED;
    }
    if let Some(parts) = split(&event.path, n) {
        match_credential(&event.path, &parts, &mut event.matched);
        if is_open {
            let own = event.header.tgid;
            match_proc_memory(
                &event.path,
                &parts,
                own,
                &mut event.matched,
                &mut event.target_pid,
            );
        }
    }
    if pending.path2 != 0 {
        let n2 = if kernel {
            read_kernel_path(&mut event.path2, pending.path2)
        } else {
            read_user_path(&mut event.path2, pending.path2)
        };
        if n2 > 0 {
            event.path2_len = (n2 - 1) as u32;
            if n2 >= PATH_LEN {
                event.header.flags |= HEADER_TRUNCATED;
            }
            if let Some(parts2) = split(&event.path2, n2) {
                // The destination's own bits are folded into MATCH_SECOND_PATH; `_pad` serves as
                // map-memory scratch for them (see `mark`).
                event._pad = 0;
                match_credential(&event.path2, &parts2, &mut event._pad);
                // SAFETY: read back from map memory.
                if unsafe { core::ptr::read_volatile(&event._pad) } != 0 {
                    mark(&mut event.matched, MATCH_SECOND_PATH);
                }
                event._pad = 0;
            }
        }
    }
    // SAFETY: read back from map memory (see `mark`).
    if unsafe { core::ptr::read_volatile(&event.matched) } == 0 {
        Outcome::NoMatch
    } else {
        Outcome::Match
    }
}

/// Entry of a file syscall by a job process: its arguments go to the per-CPU scratch, and
/// `file_enter` takes it from there.
#[inline(always)]
fn enter(
    ctx: &TracePointContext,
    kind: EventKind,
    dirfd: i32,
    path: u64,
    dirfd2: i32,
    path2: u64,
    flags: u32,
) {
    if current_process().is_none() {
        return;
    }
    let Some(pending) = FILE_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU scratch owned by this program run and the one it jumps to.
    let pending = unsafe { &mut *pending };
    pending.event.header.kind = kind as u32;
    pending.event.dirfd = dirfd;
    pending.event.dirfd2 = dirfd2;
    pending.event.flags = flags;
    pending.path = path;
    pending.path2 = path2;
    // SAFETY: jumps to `file_enter` (same program type, same context); returns only when the
    // slot is empty (the agent failed to fill it, and reported the file probes failed).
    unsafe { FILE_ENTER.tail_call(ctx, 0) };
}

/// Every file syscall's entry, reached by tail call from its entry program (never attached):
/// read and match the path(s), keep a match until the exit.
#[tracepoint]
pub fn file_enter(_ctx: TracePointContext) -> u32 {
    let Some(process) = current_process() else {
        return 0;
    };
    let Some(pending) = FILE_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU scratch owned by this program run.
    let pending = unsafe { &mut *pending };
    let event = &mut pending.event;
    // Only what matching needs; the rest of the header is filled for a match alone, since the
    // helpers behind it cost more than the match itself (measured ~330 ns of ~900 ns per open).
    event.header.tgid = current_tgid();
    event.header.flags = 0;
    event.result = 0;
    pending._pad = 0;
    pending.state = match read_and_match(pending, false) {
        Outcome::NoMatch => return 0,
        Outcome::Match => MATCHED,
        Outcome::Unreadable => RETRY,
    };
    // `read_and_match` may have flagged a truncated path: keep that flag.
    let truncated = pending.event.header.flags & HEADER_TRUNCATED;
    // The kind is the one the entry program wrote.
    fill_task(&mut pending.event.header, Some(&process));
    pending.event.header.flags |= truncated;
    let tid = bpf_get_current_pid_tgid() as u32;
    match PENDING_FILES.get_ptr_mut(tid) {
        // SAFETY: both are `PendingFile`s in map memory; the entry is this thread's alone.
        Some(slot) => unsafe { copy_words(slot, pending) },
        None => {
            if PENDING_FILES.insert(tid, pending, 0).is_err() {
                count(counter::PENDING_MAP_FULL);
            }
        }
    }
    0
}

/// Exit of a file syscall: add the result to the kept event and send it.
#[inline(always)]
fn exit(ctx: &TracePointContext) {
    let tid = bpf_get_current_pid_tgid() as u32;
    let Some(pending) = PENDING_FILES.get_ptr_mut(tid) else {
        return;
    };
    // SAFETY: the entry belongs to this thread, which is the only one that touches it.
    let pending = unsafe { &mut *pending };
    match pending.state {
        MATCHED => {}
        RETRY => {
            let outcome = read_and_match(pending, false);
            if outcome != Outcome::Match {
                if outcome == Outcome::Unreadable {
                    count(counter::USER_READ_ERRORS);
                }
                pending.state = IDLE;
                return;
            }
        }
        _ => return,
    }
    pending.state = IDLE;
    if !within_budget(pending.event.header.job, pending.event.header.kind) {
        return;
    }
    pending.event.result = syscall_ret(ctx);
    send_file(&pending.event);
}

/// A file operation whose path(s) the kernel already holds (`name`, `name2`: kernel strings):
/// an io_uring `IORING_OP_OPENAT`/`OPENAT2`, `RENAMEAT`, `LINKAT` or `SYMLINKAT` request,
/// prepared (its names copied from user memory, `getname`) before it was submitted. Matched like
/// a syscall's paths, and a match is sent at once, flagged `HEADER_IO_URING`: the operation runs
/// later, so `result` is 0.
#[inline(always)]
pub fn kernel_file(
    process: &ProcessJob,
    kind: EventKind,
    (dirfd, name): (i32, u64),
    (dirfd2, name2): (i32, u64),
    flags: u32,
) {
    let Some(pending) = FILE_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU scratch owned by this program run.
    let pending = unsafe { &mut *pending };
    let event = &mut pending.event;
    event.header.kind = kind as u32;
    event.header.tgid = current_tgid();
    event.header.flags = 0;
    event.result = 0;
    event.dirfd = dirfd;
    event.dirfd2 = dirfd2;
    event.flags = flags;
    pending.path = name;
    pending.path2 = name2;
    pending._pad = 0;
    pending.state = IDLE;
    if read_and_match(pending, true) != Outcome::Match {
        return;
    }
    let truncated = pending.event.header.flags & HEADER_TRUNCATED;
    fill_header(&mut pending.event.header, kind, Some(process));
    pending.event.header.flags |= truncated | HEADER_IO_URING;
    if !within_budget(pending.event.header.job, pending.event.header.kind) {
        return;
    }
    send_file(&pending.event);
}

// long sys_openat(int dfd, const char __user *filename, int flags, umode_t mode)
#[tracepoint]
pub fn sys_enter_openat(ctx: TracePointContext) -> u32 {
    enter(
        &ctx,
        EventKind::FileOpen,
        syscall_arg::<i64>(&ctx, 0) as i32,
        syscall_arg(&ctx, 1),
        0,
        0,
        syscall_arg::<u64>(&ctx, 2) as u32,
    );
    0
}

// long sys_openat2(int dfd, const char __user *filename, struct open_how __user *how, size_t usize)
#[tracepoint]
pub fn sys_enter_openat2(ctx: TracePointContext) -> u32 {
    let how: u64 = syscall_arg(&ctx, 2);
    // struct open_how { __u64 flags; __u64 mode; __u64 resolve; }
    // SAFETY: a checked read of user memory.
    let flags = if how == 0 {
        0
    } else {
        unsafe { bpf_probe_read_user(how as *const u64).unwrap_or(0) }
    };
    enter(
        &ctx,
        EventKind::FileOpen,
        syscall_arg::<i64>(&ctx, 0) as i32,
        syscall_arg(&ctx, 1),
        0,
        0,
        flags as u32,
    );
    0
}

// long sys_open(const char __user *filename, int flags, umode_t mode)
#[tracepoint]
pub fn sys_enter_open(ctx: TracePointContext) -> u32 {
    enter(
        &ctx,
        EventKind::FileOpen,
        AT_FDCWD,
        syscall_arg(&ctx, 0),
        0,
        0,
        syscall_arg::<u64>(&ctx, 1) as u32,
    );
    0
}

// long sys_creat(const char __user *pathname, umode_t mode)
#[tracepoint]
pub fn sys_enter_creat(ctx: TracePointContext) -> u32 {
    // creat() is open(O_CREAT|O_WRONLY|O_TRUNC).
    enter(
        &ctx,
        EventKind::FileOpen,
        AT_FDCWD,
        syscall_arg(&ctx, 0),
        0,
        0,
        0o1101,
    );
    0
}

// long sys_rename(const char __user *oldname, const char __user *newname)
#[tracepoint]
pub fn sys_enter_rename(ctx: TracePointContext) -> u32 {
    enter(
        &ctx,
        EventKind::FileRename,
        AT_FDCWD,
        syscall_arg(&ctx, 0),
        AT_FDCWD,
        syscall_arg(&ctx, 1),
        0,
    );
    0
}

// long sys_renameat(int olddfd, const char __user *oldname, int newdfd, const char __user *newname)
#[tracepoint]
pub fn sys_enter_renameat(ctx: TracePointContext) -> u32 {
    enter(
        &ctx,
        EventKind::FileRename,
        syscall_arg::<i64>(&ctx, 0) as i32,
        syscall_arg(&ctx, 1),
        syscall_arg::<i64>(&ctx, 2) as i32,
        syscall_arg(&ctx, 3),
        0,
    );
    0
}

// long sys_renameat2(int olddfd, const char __user *oldname, int newdfd,
//                    const char __user *newname, unsigned int flags)
#[tracepoint]
pub fn sys_enter_renameat2(ctx: TracePointContext) -> u32 {
    enter(
        &ctx,
        EventKind::FileRename,
        syscall_arg::<i64>(&ctx, 0) as i32,
        syscall_arg(&ctx, 1),
        syscall_arg::<i64>(&ctx, 2) as i32,
        syscall_arg(&ctx, 3),
        syscall_arg::<u64>(&ctx, 4) as u32,
    );
    0
}

// long sys_unlink(const char __user *pathname)
#[tracepoint]
pub fn sys_enter_unlink(ctx: TracePointContext) -> u32 {
    enter(
        &ctx,
        EventKind::FileUnlink,
        AT_FDCWD,
        syscall_arg(&ctx, 0),
        0,
        0,
        0,
    );
    0
}

// long sys_unlinkat(int dfd, const char __user *pathname, int flag)
#[tracepoint]
pub fn sys_enter_unlinkat(ctx: TracePointContext) -> u32 {
    enter(
        &ctx,
        EventKind::FileUnlink,
        syscall_arg::<i64>(&ctx, 0) as i32,
        syscall_arg(&ctx, 1),
        0,
        0,
        syscall_arg::<u64>(&ctx, 2) as u32,
    );
    0
}

// long sys_link(const char __user *oldname, const char __user *newname)
#[tracepoint]
pub fn sys_enter_link(ctx: TracePointContext) -> u32 {
    enter(
        &ctx,
        EventKind::FileLink,
        AT_FDCWD,
        syscall_arg(&ctx, 0),
        AT_FDCWD,
        syscall_arg(&ctx, 1),
        0,
    );
    0
}

// long sys_linkat(int olddfd, const char __user *oldname, int newdfd,
//                 const char __user *newname, int flags)
#[tracepoint]
pub fn sys_enter_linkat(ctx: TracePointContext) -> u32 {
    enter(
        &ctx,
        EventKind::FileLink,
        syscall_arg::<i64>(&ctx, 0) as i32,
        syscall_arg(&ctx, 1),
        syscall_arg::<i64>(&ctx, 2) as i32,
        syscall_arg(&ctx, 3),
        syscall_arg::<u64>(&ctx, 4) as u32,
    );
    0
}

// long sys_symlink(const char __user *old, const char __user *new)
// A symlink onto a watched path plants it as surely as a write (`ln -s /tmp/x /etc/ld.so.preload`).
#[tracepoint]
pub fn sys_enter_symlink(ctx: TracePointContext) -> u32 {
    enter(
        &ctx,
        EventKind::FileLink,
        AT_FDCWD,
        syscall_arg(&ctx, 0),
        AT_FDCWD,
        syscall_arg(&ctx, 1),
        LINK_SYMBOLIC,
    );
    0
}

// long sys_symlinkat(const char __user *oldname, int newdfd, const char __user *newname)
#[tracepoint]
pub fn sys_enter_symlinkat(ctx: TracePointContext) -> u32 {
    enter(
        &ctx,
        EventKind::FileLink,
        AT_FDCWD,
        syscall_arg(&ctx, 0),
        syscall_arg::<i64>(&ctx, 1) as i32,
        syscall_arg(&ctx, 2),
        LINK_SYMBOLIC,
    );
    0
}

/// One exit program serves every file syscall above: the kept event already says its kind.
#[tracepoint]
pub fn sys_exit_file(ctx: TracePointContext) -> u32 {
    exit(&ctx);
    0
}
