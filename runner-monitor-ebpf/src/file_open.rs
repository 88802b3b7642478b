//! File opens seen where the kernel opens the file: the BPF LSM hook `file_open` or, on kernels
//! with fentry but without BPF in their LSM list, an fentry program on `security_file_open`.
//!
//! Either sees every open of a file (`open`, `openat`, `openat2`, `creat`, io_uring's
//! `IORING_OP_OPENAT`, `open_by_handle_at`, the file an exec runs) with the `struct file` the
//! kernel made, so what is matched is the file the kernel opened, not the string the process
//! passed: symlinks, `..`, bind mounts and `/proc/<pid>/root/...` are already resolved. The
//! agent loads these instead of the open syscall tracepoints when the kernel allows
//! (`runner-monitor/src/sensor/file_hooks.rs`); both send the same `FileOpen` event, with
//! `HEADER_KERNEL_PATH` set here and `result` 0 (the hook runs before the open returns).
//!
//! Per open of a job process: the file's name and its parent directory's name are read from its
//! dentry and matched in the kernel (`names.rs`, as for the tracepoints); only a match (or a
//! `mem`, `environ` or `maps` file, which may be another process's memory) pays for
//! `bpf_d_path`, which writes the file's whole path as the opening process sees it.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::path,
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{bpf_d_path, bpf_probe_read_kernel_str},
    },
    macros::{fentry, lsm, map},
    maps::PerCpuArray,
    programs::{FEntryContext, LsmContext},
};
use runner_monitor_common::{
    AT_FDCWD, EventKind, FileEvent, HEADER_KERNEL_PATH, HEADER_TRUNCATED, NAME_LEN, PATH_LEN,
};

use crate::{
    budget::within_budget,
    emit::{fill_header, send_file},
    layout::{layout, read},
    maps::current_process,
    names::{match_credential, match_proc_memory, split},
};

// Struct member offsets of the running kernel, from its BTF, set by the agent at load
// (`FileLayout` in the agent). Globals in `.rodata`, which the loader freezes: the verifier reads
// them as constants, which `bpf_d_path` needs (its argument must be a `struct path` the verifier
// can type: `file` plus a known offset). All 0: not known, the programs send nothing.

/// `struct file.f_path`.
#[unsafe(no_mangle)]
static FILE_F_PATH: u32 = 0;
/// `struct file.f_flags`.
#[unsafe(no_mangle)]
static FILE_F_FLAGS: u32 = 0;
/// `struct file.f_mode`.
#[unsafe(no_mangle)]
static FILE_F_MODE: u32 = 0;
/// `struct path.dentry`.
#[unsafe(no_mangle)]
static PATH_DENTRY: u32 = 0;
/// `struct dentry.d_parent`.
#[unsafe(no_mangle)]
static DENTRY_D_PARENT: u32 = 0;
/// `struct dentry.d_name` + `struct qstr.name`.
#[unsafe(no_mangle)]
static DENTRY_D_NAME: u32 = 0;
/// Non-zero when the offsets above were written.
#[unsafe(no_mangle)]
static FILE_LAYOUT_KNOWN: u32 = 0;

/// `FMODE_NOACCOUNT` (the same bit in 6.1 and 6.12; `#define`s are not in BTF): a file the kernel
/// opens for itself. `security_file_open` runs twice for an open on overlayfs: for the overlay's
/// file, then, nested in it, for the file of the layer beneath, which the kernel allocates
/// without accounting (6.1 `open_with_fake_path`; 6.6 and later a backing file, also
/// `FMODE_BACKING`). The first is what the process opened and is sent; the second is skipped by
/// this bit, with nothing else such a file may be (cachefiles' own files).
const FMODE_NOACCOUNT: u32 = 1 << 29;

/// Per-CPU room to build the event (too large for the BPF stack).
#[map]
static OPEN_SCRATCH: PerCpuArray<FileEvent> = PerCpuArray::with_max_entries(1, 0);

/// Whether `path[start..len]` is `mem`, `environ` or `maps`: perhaps another process's memory,
/// which only the whole path (`/proc/<pid>/...`) tells.
#[inline(always)]
fn proc_memory_name(path: &[u8; PATH_LEN], start: usize, len: usize) -> bool {
    let is = |name: &[u8]| -> bool {
        if len.wrapping_sub(start) != name.len() {
            return false;
        }
        for (j, c) in name.iter().enumerate() {
            // VERIFIER: masked index.
            if path[(start + j) & (PATH_LEN - 1)] != *c {
                return false;
            }
        }
        true
    };
    is(b"mem") || is(b"environ") || is(b"maps")
}

/// An open of `file` (a `struct file *` the verifier knows as such) by the current task.
#[inline(always)]
fn file_opened(file: *const c_void) {
    let Some(process) = current_process() else {
        return;
    };
    if layout(&FILE_LAYOUT_KNOWN) == 0 {
        return;
    }
    let Some(event) = OPEN_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU scratch owned by this program run.
    let event = unsafe { &mut *event };
    let base = file as u64;
    // The layer's file beneath an overlayfs open (see FMODE_NOACCOUNT).
    if read::<u32>(base + layout(&FILE_F_MODE)).is_none_or(|mode| mode & FMODE_NOACCOUNT != 0) {
        return;
    }
    let Some(dentry) = read::<u64>(base + layout(&FILE_F_PATH) + layout(&PATH_DENTRY)) else {
        return;
    };
    let Some(parent) = read::<u64>(dentry + layout(&DENTRY_D_PARENT)) else {
        return;
    };
    let (Some(parent_name), Some(name)) = (
        read::<u64>(parent + layout(&DENTRY_D_NAME)),
        read::<u64>(dentry + layout(&DENTRY_D_NAME)),
    ) else {
        return;
    };
    // "parent/name": what the name matching needs (the basename and the last directory's name).
    // VERIFIER: lengths masked to the halves of the buffer they were read into.
    const HALF: usize = PATH_LEN / 2;
    // SAFETY: the helper writes at most NAME_LEN bytes into the buffer's first half.
    let n = unsafe {
        bpf_probe_read_kernel_str(
            event.path.as_mut_ptr().cast(),
            NAME_LEN as u32,
            parent_name as *const _,
        )
    };
    let dir_len = if n > 0 {
        (n as usize - 1) & (HALF - 1)
    } else {
        0
    };
    event.path[dir_len] = b'/';
    let at = (dir_len + 1) & (HALF - 1);
    // SAFETY: at most HALF bytes from `at` < HALF: inside the buffer.
    let n = unsafe {
        bpf_probe_read_kernel_str(
            event.path.as_mut_ptr().add(at).cast(),
            HALF as u32,
            name as *const _,
        )
    };
    if n <= 0 {
        return;
    }
    let len_with_nul = at + (n as usize & (HALF - 1));
    let Some(parts) = split(&event.path, len_with_nul) else {
        return;
    };
    event.matched = 0;
    event.target_pid = 0;
    match_credential(&event.path, &parts, &mut event.matched);
    // SAFETY: read back from map memory (see `names::mark`).
    let named = unsafe { core::ptr::read_volatile(&event.matched) } != 0;
    let proc_memory = proc_memory_name(&event.path, parts.base_start, parts.len);
    if !named && !proc_memory {
        return;
    }
    let mut truncated = 0;
    // SAFETY: `file` is the hook's typed `struct file *` and FILE_F_PATH a constant (frozen
    // .rodata) offset of its `f_path`, which the verifier checks is a `struct path`; the helper
    // writes at most PATH_LEN bytes into the map-memory buffer.
    let written = unsafe {
        bpf_d_path(
            file.cast::<u8>().add(layout(&FILE_F_PATH) as usize) as *mut path,
            event.path.as_mut_ptr().cast(),
            PATH_LEN as u32,
        )
    };
    let path_len = if written > 0 {
        (written as usize - 1) & (PATH_LEN - 1)
    } else {
        // Too long for the buffer (or unreachable): the name alone, flagged as cut.
        truncated = HEADER_TRUNCATED;
        // SAFETY: at most PATH_LEN bytes into the buffer.
        let n = unsafe {
            bpf_probe_read_kernel_str(
                event.path.as_mut_ptr().cast(),
                PATH_LEN as u32,
                name as *const _,
            )
        };
        if n <= 0 {
            0
        } else {
            (n as usize - 1) & (PATH_LEN - 1)
        }
    };
    if proc_memory && written > 0 {
        if let Some(parts) = split(&event.path, path_len + 1) {
            let own = process_tgid();
            match_proc_memory(
                &event.path,
                &parts,
                own,
                &mut event.matched,
                &mut event.target_pid,
            );
        }
        // SAFETY: read back from map memory (see `names::mark`).
        if unsafe { core::ptr::read_volatile(&event.matched) } == 0 {
            return;
        }
    } else if !named {
        return;
    }
    event.path_len = path_len as u32;
    event.path2_len = 0;
    event.path2[0] = 0;
    event._pad = 0;
    event.result = 0;
    event.dirfd = AT_FDCWD;
    event.dirfd2 = 0;
    event.flags = read::<u32>(base + layout(&FILE_F_FLAGS)).unwrap_or(0);
    fill_header(&mut event.header, EventKind::FileOpen, Some(&process));
    event.header.flags |= truncated | HEADER_KERNEL_PATH;
    if !within_budget(event.header.job, event.header.kind) {
        return;
    }
    send_file(event);
}

#[inline(always)]
fn process_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

// int security_file_open(struct file *file), as the LSM hook `file_open`. Monitoring only:
// always 0, never a denial.
#[lsm(hook = "file_open")]
pub fn lsm_file_open(ctx: LsmContext) -> i32 {
    file_opened(ctx.arg(0));
    0
}

// int security_file_open(struct file *file): for kernels with fentry but no BPF LSM (e.g.
// GitHub's hosted Ubuntu runners).
#[fentry(function = "security_file_open")]
pub fn fentry_file_open(ctx: FEntryContext) -> i32 {
    file_opened(ctx.arg(0));
    0
}
