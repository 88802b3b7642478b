//! Signals aimed at the agent (from any process) and `bpf()` calls by job processes.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use runner_monitor_common::{
    BpfEvent, EventKind, SIGNAL_SYSCALL_KILL, SIGNAL_SYSCALL_TGKILL, SIGNAL_SYSCALL_TKILL,
    SignalEvent,
};

use crate::{
    args::syscall_arg,
    emit::send,
    maps::{agent_tgid, current_process},
};

#[inline(always)]
fn signal(target: i64, signal: i64, syscall: u32) {
    let agent = agent_tgid();
    if agent == 0 || target != agent as i64 {
        return;
    }
    let process = current_process();
    send(
        EventKind::Signal,
        process.as_ref(),
        |e: &mut SignalEvent| {
            e.target_pid = target as u32;
            e.signal = signal as u32;
            e.syscall = syscall;
            e._pad = 0;
        },
    );
}

// long sys_kill(pid_t pid, int sig)
#[tracepoint]
pub fn sys_enter_kill(ctx: TracePointContext) -> u32 {
    let pid: i64 = syscall_arg(&ctx, 0);
    let sig: i64 = syscall_arg(&ctx, 1);
    signal(pid, sig, SIGNAL_SYSCALL_KILL);
    0
}

// long sys_tkill(pid_t pid, int sig): a thread id; the agent's main thread has the agent's pid.
#[tracepoint]
pub fn sys_enter_tkill(ctx: TracePointContext) -> u32 {
    let pid: i64 = syscall_arg(&ctx, 0);
    let sig: i64 = syscall_arg(&ctx, 1);
    signal(pid, sig, SIGNAL_SYSCALL_TKILL);
    0
}

// long sys_tgkill(pid_t tgid, pid_t pid, int sig)
#[tracepoint]
pub fn sys_enter_tgkill(ctx: TracePointContext) -> u32 {
    let tgid: i64 = syscall_arg(&ctx, 0);
    let sig: i64 = syscall_arg(&ctx, 2);
    signal(tgid, sig, SIGNAL_SYSCALL_TGKILL);
    0
}

// long sys_bpf(int cmd, union bpf_attr __user *uattr, unsigned int size)
#[tracepoint]
pub fn sys_enter_bpf(ctx: TracePointContext) -> u32 {
    let Some(process) = current_process() else {
        return 0;
    };
    let cmd: i64 = syscall_arg(&ctx, 0);
    send(EventKind::Bpf, Some(&process), |e: &mut BpfEvent| {
        e.cmd = cmd as u32;
        e._pad = 0;
    });
    0
}
