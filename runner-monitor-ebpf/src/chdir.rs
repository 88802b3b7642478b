//! The working directory of job processes (`chdir`, `fchdir`), followed so that relative paths
//! resolve after the process has exited.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{map, tracepoint},
    maps::{HashMap, PerCpuArray},
    programs::TracePointContext,
};
use runner_monitor_common::{ChdirEvent, EventKind, HEADER_TRUNCATED, PATH_LEN, counter};

use crate::{
    args::{syscall_arg, syscall_ret},
    emit::{fill_header, send_built},
    files::read_user_path,
    maps::{PRIVATE_EVENT_MAP_ENTRIES, count, current_process},
};

#[map]
static CHDIR_SCRATCH: PerCpuArray<ChdirEvent> = PerCpuArray::with_max_entries(1, 0);

/// thread id -> chdir waiting for its result.
#[map]
static PENDING_CHDIRS: HashMap<u32, ChdirEvent> =
    HashMap::with_max_entries(PRIVATE_EVENT_MAP_ENTRIES, 0);

#[inline(always)]
fn enter_chdir(fd: i32, path: u64) {
    let Some(process) = current_process() else {
        return;
    };
    let Some(event) = CHDIR_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU scratch owned by this program run.
    let event = unsafe { &mut *event };
    fill_header(&mut event.header, EventKind::Chdir, Some(&process));
    event.fd = fd;
    event.path_len = 0;
    event.path[0] = 0;
    if path != 0 {
        let n = read_user_path(&mut event.path, path);
        if n == 0 {
            count(counter::USER_READ_ERRORS);
            return;
        }
        event.path_len = (n - 1) as u32;
        if n >= PATH_LEN {
            event.header.flags |= HEADER_TRUNCATED;
        }
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    if PENDING_CHDIRS.insert(tid, event, 0).is_err() {
        count(counter::PENDING_MAP_FULL);
    }
}

// long sys_chdir(const char __user *filename)
#[tracepoint]
pub fn sys_enter_chdir(ctx: TracePointContext) -> u32 {
    enter_chdir(-1, syscall_arg(&ctx, 0));
    0
}

// long sys_fchdir(unsigned int fd)
#[tracepoint]
pub fn sys_enter_fchdir(ctx: TracePointContext) -> u32 {
    let fd: u64 = syscall_arg(&ctx, 0);
    enter_chdir(fd as i32, 0);
    0
}

/// A successful chdir is sent; a failed one changed nothing.
#[tracepoint]
pub fn sys_exit_chdir(ctx: TracePointContext) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    let Some(event) = PENDING_CHDIRS.get_ptr(tid) else {
        return 0;
    };
    if syscall_ret(&ctx) == 0 {
        // SAFETY: the entry belongs to this thread, which is the only one that touches it.
        send_built::<ChdirEvent>(unsafe { &*event });
    }
    let _ = PENDING_CHDIRS.remove(tid);
    0
}
