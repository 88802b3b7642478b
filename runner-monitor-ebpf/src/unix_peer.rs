//! Whether a unix socket a job process just connected is a container runtime's API: the
//! container requests a job writes (`runtime_requests.rs`) are read only on those. Otherwise a job
//! could write `POST /containers/<id>/exec` on any socket (one it serves itself, journald's,
//! the system bus) and mark any container for itself: the host's next exec there would join the
//! job.
//!
//! A runtime's socket is one whose other end
//! - was bound at a path whose last component is a runtime socket's name in `NAMES`
//!   (`NAME_KIND_RUNTIME_SOCKET`: those of the policy's `docker` secret sockets, `docker.sock`
//!   and `podman.sock` in the built-in one; the listener's own address, so a symlink or a bind
//!   mount of it counts, a job's file named so does not unless served as below), and
//! - is served by a live process outside jobs: the process that called `listen` (the socket's
//!   `sk_peer_pid`), still running (a job's listener that exited after handing the socket to a
//!   child is not outside jobs, nor is one exiting or a zombie: it has left `PROCESSES`
//!   already), and not in `PROCESSES` (a job's, or an earlier job's survivor).
//!   dockerd, podman's service, and systemd holding an activated socket are.
//!
//! The kernel's structs are read through the connecting process's descriptor table, at
//! offsets of the running kernel the agent sets at load from its BTF
//! (`runner-monitor/src/sensor/socket_layout.rs`), in frozen `.rodata` as in `task_layout.rs`.
//! All 0: not known, and every connected socket is read as before. Known, anything that cannot
//! be read is not a runtime's socket.

use aya_ebpf::{
    helpers::{bpf_get_current_task, generated::bpf_probe_read_kernel},
    macros::map,
    maps::PerCpuArray,
};
use runner_monitor_common::{NAME_KIND_RUNTIME_SOCKET, PATH_LEN};

use crate::{
    layout::{layout as get, read},
    maps::PROCESSES,
    names::{NAMES, key_of, split},
};

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
/// `struct pid.tasks[PIDTYPE_TGID].first`: the thread group's leader, null once it exited.
#[unsafe(no_mangle)]
static PID_TGID_TASK: u32 = 0;
/// `struct task_struct.pid_links[PIDTYPE_TGID]`: where `PID_TGID_TASK` points into the task.
#[unsafe(no_mangle)]
static TASK_TGID_LINK: u32 = 0;
/// `struct task_struct.flags`.
#[unsafe(no_mangle)]
static TASK_FLAGS: u32 = 0;
/// `struct task_struct.exit_state`.
#[unsafe(no_mangle)]
static TASK_EXIT_STATE: u32 = 0;
/// `struct unix_sock.peer`.
#[unsafe(no_mangle)]
static UNIX_SOCK_PEER: u32 = 0;
/// `struct unix_sock.addr`.
#[unsafe(no_mangle)]
static UNIX_SOCK_ADDR: u32 = 0;
/// `struct unix_address.len`.
#[unsafe(no_mangle)]
static UNIX_ADDRESS_LEN: u32 = 0;
/// `struct unix_address.name[0].sun_path`.
#[unsafe(no_mangle)]
static UNIX_ADDRESS_PATH: u32 = 0;
/// Non-zero when the values above were written.
#[unsafe(no_mangle)]
static SOCKET_LAYOUT_KNOWN: u32 = 0;

/// `PF_EXITING` in `task_struct.flags`.
const PF_EXITING: u32 = 0x4;

/// The listener's path, read to look its last component up.
#[map]
static SOCKET_PATH: PerCpuArray<[u8; PATH_LEN]> = PerCpuArray::with_max_entries(1, 0);

/// `offsetof(struct sockaddr_un, sun_path)` plus the NUL a path address's length counts.
const ADDRESS_OVERHEAD: i32 = 3;
/// `sizeof(sun_path)`.
const SUN_PATH: i32 = 108;

/// Whether the current process's just-connected unix socket `fd` is a container runtime's API
/// (above), `None` when the kernel's layout is not known.
#[inline(always)]
pub fn is_runtime_api(fd: i32) -> Option<bool> {
    if get(&SOCKET_LAYOUT_KNOWN) == 0 {
        return None;
    }
    Some(runtime_api(fd).unwrap_or(false))
}

#[inline(always)]
fn runtime_api(fd: i32) -> Option<bool> {
    if fd < 0 {
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
    runtime_file(file)
}

/// Whether the offsets above were written: without them no socket can be checked.
#[inline(always)]
pub fn layout_known() -> bool {
    get(&SOCKET_LAYOUT_KNOWN) != 0
}

/// Whether unix socket file `file` (a `struct file *`: an io_uring request's registered file)
/// is connected to a container runtime's API, as `is_runtime_api`.
#[inline(always)]
pub fn is_runtime_file(file: u64) -> Option<bool> {
    if !layout_known() {
        return None;
    }
    Some(runtime_file(file).unwrap_or(false))
}

#[inline(always)]
fn runtime_file(file: u64) -> Option<bool> {
    if file == 0 {
        return None;
    }
    let socket: u64 = read(file + get(&FILE_PRIVATE_DATA))?;
    let sk: u64 = read(socket + get(&SOCKET_SK))?;
    // Who listens: alive, and outside jobs.
    let pid: u64 = read(sk + get(&SOCK_PEER_PID))?;
    if pid == 0 {
        return Some(false);
    }
    let link: u64 = read(pid + get(&PID_TGID_TASK))?;
    if link == 0 {
        return Some(false);
    }
    // Exiting or a zombie: gone from `PROCESSES` already, but not outside jobs.
    let leader = link - get(&TASK_TGID_LINK);
    let flags: u32 = read(leader + get(&TASK_FLAGS))?;
    let exit_state: i32 = read(leader + get(&TASK_EXIT_STATE))?;
    let tgid: u32 = read(pid + get(&PID_NR))?;
    // SAFETY: a map lookup; the value is not kept.
    if flags & PF_EXITING != 0 || exit_state != 0 || unsafe { PROCESSES.get(tgid) }.is_some() {
        return Some(false);
    }
    // Where it listens: the address the other end was bound to.
    let peer: u64 = read(sk + get(&UNIX_SOCK_PEER))?;
    let address: u64 = read(peer + get(&UNIX_SOCK_ADDR))?;
    let len: i32 = read(address + get(&UNIX_ADDRESS_LEN))?;
    let path_len = len - ADDRESS_OVERHEAD;
    if !(1..=SUN_PATH).contains(&path_len) {
        return Some(false);
    }
    let path = SOCKET_PATH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch, used by this program run only.
    let path = unsafe { &mut *path };
    // VERIFIER: the length masked into 1..=128, within the 256-byte scratch; `path_len` is at
    // most 108, so unchanged.
    let n = ((path_len as u32 - 1) & 127) + 1;
    // SAFETY: a checked read of kernel memory into the scratch.
    let read = unsafe {
        bpf_probe_read_kernel(
            path.as_mut_ptr().cast(),
            n,
            (address + get(&UNIX_ADDRESS_PATH)) as *const _,
        )
    };
    if read != 0 {
        return None;
    }
    let parts = split(path, n as usize + 1)?;
    let key = key_of(NAME_KIND_RUNTIME_SOCKET, path, parts.base_start, parts.len)?;
    // SAFETY: a map lookup; the value is not kept.
    Some(unsafe { NAMES.get(key) }.is_some())
}
