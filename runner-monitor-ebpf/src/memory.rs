//! Access to another process's memory: `ptrace` and `process_vm_readv`. (Opens of
//! `/proc/<pid>/mem|environ|maps` are file events, see `files.rs`.)

use aya_ebpf::{
    macros::{map, tracepoint},
    maps::LruHashMap,
    programs::TracePointContext,
};
use runner_monitor_common::{
    EventKind, PTRACE_ATTACH, PTRACE_PEEKDATA, PTRACE_PEEKTEXT, PTRACE_PEEKUSER, PTRACE_SEIZE,
    ProcessAccessEvent, counter,
};

use crate::{
    args::syscall_arg,
    emit::send,
    maps::{PRIVATE_MAP_ENTRIES, agent_tgid, count, current_process, current_tgid, now_ns},
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
