//! What the task hooks (`memory.rs`'s `ptrace_access_check`, `tamper.rs`'s `task_kill`) read of
//! kernel structs and of the syscall the current task is in: offsets and syscall numbers of the
//! running kernel and architecture, set by the agent at load (`TaskLayout` in
//! `runner-monitor/src/sensor/task_hooks.rs`). Globals in frozen `.rodata`, as in `file_open.rs`.
//! All 0: not known, the hooks send nothing (and the agent does not attach them).

use aya_ebpf::helpers::generated::{bpf_get_current_task_btf, bpf_task_pt_regs};

use crate::layout::{layout, read};

/// `struct task_struct.tgid`.
#[unsafe(no_mangle)]
static TASK_TGID: u32 = 0;
/// The syscall number in `struct pt_regs` (x86-64 `orig_ax`, arm64 `syscallno`).
#[unsafe(no_mangle)]
static PT_REGS_SYSCALL_NR: u32 = 0;
/// The syscall's first argument in `struct pt_regs` (x86-64 `di`, arm64 `orig_x0`).
#[unsafe(no_mangle)]
static PT_REGS_ARG0: u32 = 0;
/// `__NR_ptrace` of the architecture.
#[unsafe(no_mangle)]
static NR_PTRACE: u32 = 0;
/// `__NR_process_vm_readv` of the architecture.
#[unsafe(no_mangle)]
static NR_PROCESS_VM_READV: u32 = 0;
/// Non-zero when the values above were written.
#[unsafe(no_mangle)]
static TASK_LAYOUT_KNOWN: u32 = 0;

#[inline(always)]
pub fn known() -> bool {
    layout(&TASK_LAYOUT_KNOWN) != 0
}

#[inline(always)]
pub fn nr_ptrace() -> u32 {
    layout(&NR_PTRACE) as u32
}

#[inline(always)]
pub fn nr_process_vm_readv() -> u32 {
    layout(&NR_PROCESS_VM_READV) as u32
}

/// The thread group (process) id of `task` (a `struct task_struct *`), as the kernel sees it (the
/// initial pid namespace's).
#[inline(always)]
pub fn task_tgid(task: u64) -> Option<u32> {
    read(task + layout(&TASK_TGID))
}

/// The user registers the current task entered the kernel with (`bpf_task_pt_regs`, 5.15+).
#[inline(always)]
fn current_regs() -> u64 {
    // SAFETY: helpers without preconditions: the current task's BTF pointer, and its pt_regs.
    unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) as u64 }
}

/// The number of the syscall the current task is in (`u32::MAX` when unreadable). In a task
/// that is not in a syscall (an io_uring worker) it is whatever its registers hold.
#[inline(always)]
pub fn current_syscall_nr() -> u32 {
    read(current_regs() + layout(&PT_REGS_SYSCALL_NR)).unwrap_or(u32::MAX)
}

/// The current syscall's first argument (0 when unreadable).
#[inline(always)]
pub fn current_syscall_arg0() -> u64 {
    read(current_regs() + layout(&PT_REGS_ARG0)).unwrap_or(0)
}
