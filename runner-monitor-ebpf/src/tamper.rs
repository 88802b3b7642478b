//! Signals aimed at the agent (from any process) and `bpf()` calls by job processes.
//!
//! Signals are seen by one of two hook sets (the agent picks one at start-up,
//! `runner-monitor/src/sensor/task_hooks.rs`): the `kill`, `tkill` and `tgkill` syscall
//! tracepoints, or the BPF LSM hook `task_kill` (fentry on `security_task_kill` where the kernel
//! has no BPF LSM), which runs for every signal a task sends, by any syscall, with the target
//! task resolved. Both send the same `SignalEvent`.

use core::ffi::c_void;

use aya_ebpf::{
    macros::{fentry, lsm, tracepoint},
    programs::{FEntryContext, LsmContext, TracePointContext},
};
use runner_monitor_common::{
    BpfEvent, EventKind, SIGNAL_SYSCALL_KILL, SIGNAL_SYSCALL_NR, SIGNAL_SYSCALL_TGKILL,
    SIGNAL_SYSCALL_TKILL, SignalEvent,
};

use crate::{
    args::syscall_arg,
    emit::send,
    maps::{agent_tgid, current_process},
    task_layout,
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

/// A signal `sig` sent to `task` (a `struct task_struct *`), which the kernel's permission
/// check passed: reported when the task is one of the agent's threads. `syscall` is the number
/// of the syscall that sent it (`kill`, `tkill`, `tgkill`, `pidfd_send_signal`,
/// `rt_sigqueueinfo`, ...), for the agent to name.
#[inline(always)]
fn task_killed(task: *const c_void, sig: u64) {
    let agent = agent_tgid();
    if agent == 0 || !task_layout::known() {
        return;
    }
    if task_layout::task_tgid(task as u64) != Some(agent) {
        return;
    }
    let nr = task_layout::current_syscall_nr() & !SIGNAL_SYSCALL_NR;
    signal(i64::from(agent), sig as i32 as i64, SIGNAL_SYSCALL_NR | nr);
}

// int security_task_kill(struct task_struct *p, struct kernel_siginfo *info, int sig,
//                        const struct cred *cred), as the LSM hook `task_kill`. Monitoring only:
// always 0, never a denial.
#[lsm(hook = "task_kill")]
pub fn lsm_task_kill(ctx: LsmContext) -> i32 {
    task_killed(ctx.arg(0), ctx.arg(2));
    0
}

// int security_task_kill(...): for kernels with fentry but no BPF LSM.
#[fentry(function = "security_task_kill")]
pub fn fentry_task_kill(ctx: FEntryContext) -> i32 {
    task_killed(ctx.arg(0), ctx.arg(2));
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
