//! Every probe: which program goes on which hook, and which sensor it serves.

use aya::programs::CgroupSkbAttachType;

pub(super) enum Hook {
    /// A tracepoint that must exist.
    Tracepoint(&'static str, &'static str),
    /// A syscall tracepoint that only some architectures have.
    OptionalTracepoint(&'static str, &'static str),
    SockAddr,
    /// `cgroup/sock_create`.
    SockCreate,
    Skb(CgroupSkbAttachType),
}

pub(super) struct Probe {
    pub(super) sensor: &'static str,
    pub(super) program: &'static str,
    pub(super) hooks: &'static [Hook],
    pub(super) required: bool,
}

use Hook::{OptionalTracepoint as Opt, Tracepoint as Tp};

/// Every probe. Syscall tracepoints only where nothing cheaper sees the event: DNS traffic is
/// seen by cgroup programs, which tax no syscall.
pub(super) const PROBES: &[Probe] = &[
    Probe {
        sensor: "process",
        program: "task_newtask",
        hooks: &[Tp("task", "task_newtask")],
        required: true,
    },
    Probe {
        sensor: "process",
        program: "sched_process_exec",
        hooks: &[Tp("sched", "sched_process_exec")],
        required: true,
    },
    Probe {
        sensor: "process",
        program: "sched_process_exit",
        hooks: &[Tp("sched", "sched_process_exit")],
        required: true,
    },
    Probe {
        sensor: "process",
        program: "sys_enter_execve",
        hooks: &[Tp("syscalls", "sys_enter_execve")],
        required: false,
    },
    Probe {
        sensor: "process",
        program: "sys_enter_execveat",
        hooks: &[Tp("syscalls", "sys_enter_execveat")],
        required: false,
    },
    Probe {
        sensor: "process",
        program: "sys_exit_exec",
        hooks: &[
            Tp("syscalls", "sys_exit_execve"),
            Tp("syscalls", "sys_exit_execveat"),
        ],
        required: false,
    },
    Probe {
        sensor: "process",
        program: "sys_enter_exit_group",
        hooks: &[Tp("syscalls", "sys_enter_exit_group")],
        required: false,
    },
    Probe {
        sensor: "working directory",
        program: "sys_enter_chdir",
        hooks: &[Tp("syscalls", "sys_enter_chdir")],
        required: false,
    },
    Probe {
        sensor: "working directory",
        program: "sys_enter_fchdir",
        hooks: &[Tp("syscalls", "sys_enter_fchdir")],
        required: false,
    },
    Probe {
        sensor: "working directory",
        program: "sys_exit_chdir",
        hooks: &[
            Tp("syscalls", "sys_exit_chdir"),
            Tp("syscalls", "sys_exit_fchdir"),
        ],
        required: false,
    },
    Probe {
        sensor: "file access",
        program: "sys_enter_openat",
        hooks: &[Tp("syscalls", "sys_enter_openat")],
        required: true,
    },
    Probe {
        sensor: "file access",
        program: "sys_enter_openat2",
        hooks: &[Tp("syscalls", "sys_enter_openat2")],
        required: false,
    },
    Probe {
        sensor: "file access",
        program: "sys_enter_open",
        hooks: &[Opt("syscalls", "sys_enter_open")],
        required: false,
    },
    Probe {
        sensor: "file access",
        program: "sys_enter_creat",
        hooks: &[Opt("syscalls", "sys_enter_creat")],
        required: false,
    },
    Probe {
        sensor: "file access",
        program: "sys_enter_rename",
        hooks: &[Opt("syscalls", "sys_enter_rename")],
        required: false,
    },
    Probe {
        sensor: "file access",
        program: "sys_enter_renameat",
        hooks: &[Opt("syscalls", "sys_enter_renameat")],
        required: false,
    },
    Probe {
        sensor: "file access",
        program: "sys_enter_renameat2",
        hooks: &[Tp("syscalls", "sys_enter_renameat2")],
        required: false,
    },
    Probe {
        sensor: "file access",
        program: "sys_enter_unlink",
        hooks: &[Opt("syscalls", "sys_enter_unlink")],
        required: false,
    },
    Probe {
        sensor: "file access",
        program: "sys_enter_unlinkat",
        hooks: &[Tp("syscalls", "sys_enter_unlinkat")],
        required: false,
    },
    Probe {
        sensor: "file access",
        program: "sys_enter_link",
        hooks: &[Opt("syscalls", "sys_enter_link")],
        required: false,
    },
    Probe {
        sensor: "file access",
        program: "sys_enter_linkat",
        hooks: &[Tp("syscalls", "sys_enter_linkat")],
        required: false,
    },
    Probe {
        sensor: "file access",
        program: "sys_enter_symlink",
        hooks: &[Opt("syscalls", "sys_enter_symlink")],
        required: false,
    },
    Probe {
        sensor: "file access",
        program: "sys_enter_symlinkat",
        hooks: &[Tp("syscalls", "sys_enter_symlinkat")],
        required: false,
    },
    Probe {
        sensor: "file access",
        program: "sys_exit_file",
        hooks: &[
            Tp("syscalls", "sys_exit_openat"),
            Tp("syscalls", "sys_exit_openat2"),
            Opt("syscalls", "sys_exit_open"),
            Opt("syscalls", "sys_exit_creat"),
            Opt("syscalls", "sys_exit_rename"),
            Opt("syscalls", "sys_exit_renameat"),
            Tp("syscalls", "sys_exit_renameat2"),
            Opt("syscalls", "sys_exit_unlink"),
            Tp("syscalls", "sys_exit_unlinkat"),
            Opt("syscalls", "sys_exit_link"),
            Tp("syscalls", "sys_exit_linkat"),
            Opt("syscalls", "sys_exit_symlink"),
            Tp("syscalls", "sys_exit_symlinkat"),
        ],
        required: true,
    },
    Probe {
        sensor: "process memory",
        program: "sys_enter_ptrace",
        hooks: &[Tp("syscalls", "sys_enter_ptrace")],
        required: false,
    },
    Probe {
        sensor: "process memory",
        program: "sys_enter_process_vm_readv",
        hooks: &[Tp("syscalls", "sys_enter_process_vm_readv")],
        required: false,
    },
    Probe {
        sensor: "connect",
        program: "sys_enter_connect",
        hooks: &[Tp("syscalls", "sys_enter_connect")],
        required: false,
    },
    Probe {
        sensor: "connect",
        program: "sys_exit_connect",
        hooks: &[Tp("syscalls", "sys_exit_connect")],
        required: false,
    },
    // Containers a job starts (runner-monitor-ebpf/src/runtime_requests.rs, containers.rs): the start request on a
    // job's unix socket, then the container's cgroup.
    Probe {
        sensor: "containers",
        program: "sys_enter_write",
        hooks: &[Tp("syscalls", "sys_enter_write")],
        required: false,
    },
    Probe {
        sensor: "containers",
        program: "sys_enter_sendto",
        hooks: &[Tp("syscalls", "sys_enter_sendto")],
        required: false,
    },
    Probe {
        sensor: "containers",
        program: "enter_writev",
        hooks: &[Tp("syscalls", "sys_enter_writev")],
        required: false,
    },
    Probe {
        sensor: "containers",
        program: "enter_sendmsg",
        hooks: &[Tp("syscalls", "sys_enter_sendmsg")],
        required: false,
    },
    Probe {
        sensor: "containers",
        program: "enter_sendmmsg",
        hooks: &[Tp("syscalls", "sys_enter_sendmmsg")],
        required: false,
    },
    Probe {
        sensor: "containers",
        program: "enter_sendfile",
        hooks: &[Tp("syscalls", "sys_enter_sendfile64")],
        required: false,
    },
    Probe {
        sensor: "containers",
        program: "enter_splice",
        hooks: &[Tp("syscalls", "sys_enter_splice")],
        required: false,
    },
    Probe {
        sensor: "containers",
        program: "cgroup_mkdir",
        hooks: &[Tp("cgroup", "cgroup_mkdir")],
        required: false,
    },
    Probe {
        sensor: "dns",
        program: "dns_connect4",
        hooks: &[Hook::SockAddr],
        required: false,
    },
    Probe {
        sensor: "dns",
        program: "dns_connect6",
        hooks: &[Hook::SockAddr],
        required: false,
    },
    Probe {
        sensor: "dns",
        program: "dns_sendmsg4",
        hooks: &[Hook::SockAddr],
        required: false,
    },
    Probe {
        sensor: "dns",
        program: "dns_sendmsg6",
        hooks: &[Hook::SockAddr],
        required: false,
    },
    Probe {
        sensor: "connect",
        program: "raw_socket_create",
        hooks: &[Hook::SockCreate],
        required: false,
    },
    Probe {
        sensor: "connect",
        program: "sys_enter_socket",
        hooks: &[Tp("syscalls", "sys_enter_socket")],
        required: false,
    },
    Probe {
        sensor: "dns",
        program: "dns_recvmsg4",
        hooks: &[Hook::SockAddr],
        required: false,
    },
    Probe {
        sensor: "dns",
        program: "dns_recvmsg6",
        hooks: &[Hook::SockAddr],
        required: false,
    },
    // Block mode's resolver in a namespace a job thread entered, before the program that will
    // run there starts.
    Probe {
        sensor: "dns",
        program: "sys_exit_setns",
        hooks: &[Tp("syscalls", "sys_exit_setns")],
        required: false,
    },
    // DNS queries and TLS ClientHellos, one program: each program on the hook costs every
    // packet the host sends a run.
    Probe {
        sensor: "dns",
        program: "packet_egress",
        hooks: &[Hook::Skb(CgroupSkbAttachType::Egress)],
        required: false,
    },
    Probe {
        sensor: "dns",
        program: "dns_ingress",
        hooks: &[Hook::Skb(CgroupSkbAttachType::Ingress)],
        required: false,
    },
    Probe {
        sensor: "tamper",
        program: "sys_enter_kill",
        hooks: &[Tp("syscalls", "sys_enter_kill")],
        required: false,
    },
    Probe {
        sensor: "tamper",
        program: "sys_enter_tkill",
        hooks: &[Tp("syscalls", "sys_enter_tkill")],
        required: false,
    },
    Probe {
        sensor: "tamper",
        program: "sys_enter_tgkill",
        hooks: &[Tp("syscalls", "sys_enter_tgkill")],
        required: false,
    },
    Probe {
        sensor: "tamper",
        program: "sys_enter_bpf",
        hooks: &[Tp("syscalls", "sys_enter_bpf")],
        required: false,
    },
];
