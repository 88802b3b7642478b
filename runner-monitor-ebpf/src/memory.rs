//! Access to another process's memory: `ptrace` and `process_vm_readv`. (Opens of
//! `/proc/<pid>/mem|environ|maps` are file events, see `files.rs` and `file_open.rs`.)
//!
//! Two hook sets send the same events (the agent picks one at start-up,
//! `runner-monitor/src/sensor/task_hooks.rs`): the `ptrace` and `process_vm_readv` syscall
//! tracepoints, or the BPF LSM hook `ptrace_access_check` (fentry on
//! `security_ptrace_access_check` where the kernel has no BPF LSM), which runs for every
//! ptrace-mode access check with the target task resolved.

use core::ffi::c_void;

use aya_ebpf::{
    macros::{fentry, lsm, map, tracepoint},
    maps::LruHashMap,
    programs::{FEntryContext, LsmContext, TracePointContext},
};
use runner_monitor_common::{
    ACCESS_BY_SYSCALL, EventKind, PTRACE_ATTACH, PTRACE_PEEKDATA, PTRACE_PEEKTEXT, PTRACE_PEEKUSER,
    PTRACE_SEIZE, ProcessAccessEvent, counter,
};

use crate::{
    args::syscall_arg,
    emit::send,
    maps::{PRIVATE_MAP_ENTRIES, agent_tgid, count, current_process, current_tgid, now_ns},
    task_layout,
};

/// (tgid << 32 | target) -> when the last peek or read was sent. A memory dump is millions of
/// calls; one event per pair and second is enough, and the rest are counted.
#[map]
static LAST_ACCESS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(PRIVATE_MAP_ENTRIES, 0);

const RATE_LIMIT_NS: u64 = 1_000_000_000;

#[inline(always)]
fn access(kind: EventKind, request: u64, target: u32, rate_limited: bool) {
    let own = current_tgid();
    if target == own || target == 0 {
        return;
    }
    let agent = agent_tgid();
    let targets_agent = agent != 0 && target == agent;
    let process = current_process();
    if process.is_none() && !targets_agent {
        return;
    }
    if rate_limited {
        let key = ((own as u64) << 32) | target as u64;
        let now = now_ns();
        // SAFETY: copied out at once.
        if let Some(last) = unsafe { LAST_ACCESS.get(key).copied() }
            && now.wrapping_sub(last) < RATE_LIMIT_NS
        {
            count(counter::RATE_LIMITED);
            return;
        }
        let _ = LAST_ACCESS.insert(key, now, 0);
    }
    send(kind, process.as_ref(), |e: &mut ProcessAccessEvent| {
        e.request = request;
        e.target_pid = target;
        e.targets_agent = targets_agent as u32;
    });
}

// long sys_ptrace(long request, long pid, unsigned long addr, unsigned long data)
#[tracepoint]
pub fn sys_enter_ptrace(ctx: TracePointContext) -> u32 {
    let request: u64 = syscall_arg(&ctx, 0);
    let pid: i64 = syscall_arg(&ctx, 1);
    match request {
        PTRACE_ATTACH | PTRACE_SEIZE => access(EventKind::Ptrace, request, pid as u32, false),
        PTRACE_PEEKTEXT | PTRACE_PEEKDATA | PTRACE_PEEKUSER => {
            access(EventKind::Ptrace, request, pid as u32, true)
        }
        _ => {}
    }
    0
}

// long sys_process_vm_readv(pid_t pid, const struct iovec __user *lvec, unsigned long liovcnt,
//                           const struct iovec __user *rvec, unsigned long riovcnt,
//                           unsigned long flags)
#[tracepoint]
pub fn sys_enter_process_vm_readv(ctx: TracePointContext) -> u32 {
    let pid: i64 = syscall_arg(&ctx, 0);
    access(EventKind::ProcessVmRead, 0, pid as u32, true);
    0
}

/// `PTRACE_MODE_*` (include/linux/ptrace.h: `#define`s, not in BTF; unchanged since 4.5).
const PTRACE_MODE_ATTACH: u32 = 0x02;
const PTRACE_MODE_REALCREDS: u32 = 0x10;

/// A ptrace-mode access check of `child` (a `struct task_struct *`) by the current task, which
/// the kernel's own checks (same user or capability) passed. Only attach checks with the
/// caller's real credentials are syscalls that reach into another process: `ptrace`
/// `PTRACE_ATTACH`/`PTRACE_SEIZE`, `process_vm_readv`/`writev`, `pidfd_getfd`. The others are
/// `/proc/<pid>/...` opens and reads (`FSCREDS`: `mem`, `environ`, `maps` are reported by the
/// file probes with their path; `stat` and the like by every `ps`) and `PTRACE_MODE_READ` checks
/// (`kcmp`, `perf_event_open`, `get_robust_list`), which read no memory.
#[inline(always)]
fn access_checked(child: *const c_void, mode: u32) {
    const WANTED: u32 = PTRACE_MODE_ATTACH | PTRACE_MODE_REALCREDS;
    if mode & WANTED != WANTED || !task_layout::known() {
        return;
    }
    let Some(target) = task_layout::task_tgid(child as u64) else {
        return;
    };
    // Cheap filter before reading registers: `access` repeats it.
    let agent = agent_tgid();
    if !(agent != 0 && target == agent) && current_process().is_none() {
        return;
    }
    let nr = task_layout::current_syscall_nr();
    if nr == task_layout::nr_ptrace() {
        // The request (PTRACE_ATTACH or PTRACE_SEIZE: the only ones that check access here).
        let request = task_layout::current_syscall_arg0();
        access(EventKind::Ptrace, request, target, false);
    } else if nr == task_layout::nr_process_vm_readv() {
        access(EventKind::ProcessVmRead, 0, target, true);
    } else {
        access(
            EventKind::Ptrace,
            ACCESS_BY_SYSCALL | u64::from(nr),
            target,
            true,
        );
    }
}

// int security_ptrace_access_check(struct task_struct *child, unsigned int mode), as the LSM
// hook `ptrace_access_check`. Monitoring only: always 0, never a denial.
#[lsm(hook = "ptrace_access_check")]
pub fn lsm_ptrace_access_check(ctx: LsmContext) -> i32 {
    access_checked(ctx.arg(0), ctx.arg::<u64>(1) as u32);
    0
}

// int security_ptrace_access_check(struct task_struct *child, unsigned int mode): for kernels
// with fentry but no BPF LSM.
#[fentry(function = "security_ptrace_access_check")]
pub fn fentry_ptrace_access_check(ctx: FEntryContext) -> i32 {
    access_checked(ctx.arg(0), ctx.arg::<u64>(1) as u32);
    0
}
