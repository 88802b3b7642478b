//! Hook sets of the two families that watch one task reaching into another: process memory
//! access (`ptrace`, `process_vm_readv`) and signals to the agent. Each has a BPF LSM hook that
//! sees every way of doing it, with the target task resolved, and the syscall tracepoints as the
//! fallback (`hook_sets.rs` chooses; kernel side `runner-monitor-ebpf/src/memory.rs`,
//! `tamper.rs`, `task_layout.rs`).
//!
//! The LSM hooks run inside the kernel's checks, so the syscall is not their argument: the
//! programs read its number (and, for `ptrace`, the request) from the registers the task entered
//! the kernel with (`bpf_task_pt_regs`), at offsets from the kernel's BTF, and send numbers of
//! this architecture, which the agent names (`syscall_name`).

use super::btf::KernelLayout;
use serde::Serialize;

use super::{
    btf::KernelBtf,
    hook_sets::{Family, HookFamily},
};

/// Process memory access: LSM `ptrace_access_check`.
pub(super) const PROCESS_MEMORY: Family = Family {
    family: HookFamily::ProcessMemory,
    sensor: "process memory",
    lsm: ("lsm_ptrace_access_check", "ptrace_access_check"),
    fentry: ("fentry_ptrace_access_check", "security_ptrace_access_check"),
    tracepoints: &["sys_enter_ptrace", "sys_enter_process_vm_readv"],
    syscalls: "ptrace, process_vm_readv",
};

/// Signals to the agent: LSM `task_kill`.
pub(super) const SIGNALS: Family = Family {
    family: HookFamily::Signals,
    sensor: "tamper",
    lsm: ("lsm_task_kill", "task_kill"),
    fentry: ("fentry_task_kill", "security_task_kill"),
    tracepoints: &["sys_enter_kill", "sys_enter_tkill", "sys_enter_tgkill"],
    syscalls: "kill, tkill, tgkill",
};

/// The `struct pt_regs` members that hold the syscall number and its first argument.
#[cfg(target_arch = "x86_64")]
const REGS: Option<(&str, &str)> = Some(("orig_ax", "di"));
#[cfg(target_arch = "aarch64")]
const REGS: Option<(&str, &str)> = Some(("syscallno", "orig_x0"));
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const REGS: Option<(&str, &str)> = None;

/// What the task hooks read: byte offsets for the running kernel, syscall numbers of this
/// architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct TaskLayout {
    pub task_tgid: u32,
    pub regs_syscall_nr: u32,
    pub regs_arg0: u32,
    pub nr_ptrace: u32,
    pub nr_process_vm_readv: u32,
}

impl KernelLayout for TaskLayout {
    fn from_btf(btf: &KernelBtf) -> Result<Self, String> {
        let offset = |ty: &str, m: &str| btf.offset(ty, m);
        let (nr, arg0) = REGS.ok_or("no pt_regs layout known for this architecture")?;
        Ok(Self {
            task_tgid: offset("task_struct", "tgid")?,
            regs_syscall_nr: offset("pt_regs", nr)?,
            regs_arg0: offset("pt_regs", arg0)?,
            nr_ptrace: libc::SYS_ptrace as u32,
            nr_process_vm_readv: libc::SYS_process_vm_readv as u32,
        })
    }

    /// Sets the programs' layout globals (`task_layout.rs`).
    fn set_globals<'a>(&'a self, loader: &mut aya::EbpfLoader<'a>) {
        super::btf::set_layout(
            loader,
            &[
                ("TASK_TGID", &self.task_tgid),
                ("PT_REGS_SYSCALL_NR", &self.regs_syscall_nr),
                ("PT_REGS_ARG0", &self.regs_arg0),
                ("NR_PTRACE", &self.nr_ptrace),
                ("NR_PROCESS_VM_READV", &self.nr_process_vm_readv),
            ],
            "TASK_LAYOUT_KNOWN",
        );
    }
}

/// The name of syscall `nr` of this architecture, for those that send signals or reach into
/// another process; `None` for the rest.
pub fn syscall_name(nr: u32) -> Option<&'static str> {
    let nr = i64::from(nr);
    [
        (libc::SYS_kill, "kill"),
        (libc::SYS_tkill, "tkill"),
        (libc::SYS_tgkill, "tgkill"),
        (libc::SYS_rt_sigqueueinfo, "rt_sigqueueinfo"),
        (libc::SYS_rt_tgsigqueueinfo, "rt_tgsigqueueinfo"),
        (libc::SYS_pidfd_send_signal, "pidfd_send_signal"),
        (libc::SYS_ptrace, "ptrace"),
        (libc::SYS_process_vm_readv, "process_vm_readv"),
        (libc::SYS_process_vm_writev, "process_vm_writev"),
        (libc::SYS_pidfd_getfd, "pidfd_getfd"),
    ]
    .into_iter()
    .find(|(n, _)| *n == nr)
    .map(|(_, name)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_kernels_task_layout_is_found() {
        let Ok(btf) = KernelBtf::vmlinux() else {
            eprintln!("no kernel BTF: skipped");
            return;
        };
        let layout = TaskLayout::from_btf(&btf).unwrap();
        assert!(layout.task_tgid > 0, "{layout:?}");
        assert_ne!(layout.regs_syscall_nr, layout.regs_arg0, "{layout:?}");
    }

    #[test]
    fn syscalls_are_named_by_this_architectures_numbers() {
        assert_eq!(syscall_name(libc::SYS_kill as u32), Some("kill"));
        assert_eq!(
            syscall_name(libc::SYS_pidfd_send_signal as u32),
            Some("pidfd_send_signal")
        );
        assert_eq!(syscall_name(libc::SYS_read as u32), None);
    }
}
