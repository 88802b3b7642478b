//! Who serves a unix socket a job process just connected: the process that called `listen` on
//! the other end (the kernel's `sk_peer_pid` of the connected socket, set from the listener at
//! connect). The container requests a job writes (`containers.rs`) are read only on sockets
//! served outside jobs: a Docker or podman daemon, or systemd holding an activated socket. A
//! socket a job process serves itself is not a container runtime the job asks; requests written
//! there would otherwise let the job mark any container for itself.
//!
//! Offsets of the running kernel, set by the agent at load from its BTF
//! (`runner-monitor/src/sensor/socket_layout.rs`), in frozen `.rodata` as in `task_layout.rs`.
//! All 0: not known, and every connected socket is read as before.

use aya_ebpf::helpers::{bpf_get_current_task, bpf_probe_read_kernel};

use crate::maps::PROCESSES;

/// `struct task_struct.files`.
#[unsafe(no_mangle)]
static TASK_FILES: u32 = 0;
/// `struct files_struct.fdt`.
#[unsafe(no_mangle)]
static FILES_FDT: u32 = 0;
/// `struct fdtable.max_fds`.
#[unsafe(no_mangle)]
static FDTABLE_MAX_FDS: u32 = 0;
/// `struct fdtable.fd`.
#[unsafe(no_mangle)]
static FDTABLE_FD: u32 = 0;
/// `struct file.private_data` (a socket file's `struct socket`).
#[unsafe(no_mangle)]
static FILE_PRIVATE_DATA: u32 = 0;
/// `struct socket.sk`.
#[unsafe(no_mangle)]
static SOCKET_SK: u32 = 0;
/// `struct sock.sk_peer_pid`.
#[unsafe(no_mangle)]
static SOCK_PEER_PID: u32 = 0;
/// `struct pid.numbers[0].nr`: the pid in the initial namespace.
#[unsafe(no_mangle)]
static PID_NR: u32 = 0;
/// Non-zero when the values above were written.
#[unsafe(no_mangle)]
static SOCKET_LAYOUT_KNOWN: u32 = 0;

#[inline(always)]
fn get(field: &'static u32) -> u64 {
    // SAFETY: a read of a global the loader fills in; volatile so it is not constant-folded.
    u64::from(unsafe { core::ptr::read_volatile(field) })
}

/// Reads a `T` of kernel memory at `addr`.
#[inline(always)]
fn read<T>(addr: u64) -> Option<T> {
    // SAFETY: a checked read of kernel memory.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
}

/// The process (thread group id, initial namespace) serving the other end of the current
/// process's connected unix socket `fd`: `Some(0)` when the socket has no listener's credentials
/// (a datagram socket), `None` when not known (no layout, or unreadable).
#[inline(always)]
fn server_tgid(fd: i32) -> Option<u32> {
    if get(&SOCKET_LAYOUT_KNOWN) == 0 || fd < 0 {
        return None;
    }
    // SAFETY: a helper without preconditions.
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = read(task + get(&TASK_FILES))?;
    let fdt: u64 = read(files + get(&FILES_FDT))?;
    let max_fds: u32 = read(fdt + get(&FDTABLE_MAX_FDS))?;
    if fd as u32 >= max_fds {
        return None;
    }
    let fds: u64 = read(fdt + get(&FDTABLE_FD))?;
    let file: u64 = read(fds + 8 * fd as u64)?;
    let socket: u64 = read(file + get(&FILE_PRIVATE_DATA))?;
    let sk: u64 = read(socket + get(&SOCKET_SK))?;
    let pid: u64 = read(sk + get(&SOCK_PEER_PID))?;
    if pid == 0 {
        return Some(0);
    }
    read(pid + get(&PID_NR))
}

/// Whether requests written on the current process's just-connected unix socket `fd` may be
/// read as container requests: its server is a process outside jobs (a job's survivor counts as
/// a job's), or it is not known who serves it (kernels without BTF: as before).
#[inline(always)]
pub fn served_outside_jobs(fd: i32) -> bool {
    match server_tgid(fd) {
        None => true,
        Some(0) => false,
        // SAFETY: a map lookup; the value is not kept.
        Some(tgid) => unsafe { PROCESSES.get(&tgid) }.is_none(),
    }
}
