//! Where the kernel keeps who serves a unix socket and where: the offsets the connect probe
//! follows from a job process's socket descriptor to the listener's process and bound path
//! (`runner-monitor-ebpf/src/unix_peer.rs`), so container requests are read only on a container
//! runtime's API socket.

use super::btf::KernelLayout;
use serde::Serialize;

use super::btf::KernelBtf;

/// Byte offsets of the running kernel, from its BTF.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SocketLayout {
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_max_fds: u32,
    pub fdtable_fd: u32,
    pub file_private_data: u32,
    pub socket_sk: u32,
    pub sock_peer_pid: u32,
    /// `struct pid.numbers` plus `struct upid.nr`: the pid in the initial namespace.
    pub pid_nr: u32,
    /// `struct pid.tasks[PIDTYPE_TGID]` (one `hlist_head`, a pointer, per pid type).
    pub pid_tgid_task: u32,
    /// `struct task_struct.pid_links[PIDTYPE_TGID]` (one `hlist_node`, two pointers, per type).
    pub task_tgid_link: u32,
    pub task_flags: u32,
    pub task_exit_state: u32,
    pub unix_sock_peer: u32,
    pub unix_sock_addr: u32,
    pub unix_address_len: u32,
    /// `struct unix_address.name` plus `struct sockaddr_un.sun_path`.
    pub unix_address_path: u32,
}

/// `PIDTYPE_TGID` in `enum pid_type`.
const PIDTYPE_TGID: u32 = 1;

impl KernelLayout for SocketLayout {
    fn from_btf(btf: &KernelBtf) -> Result<Self, String> {
        let offset = |ty: &str, m: &str| btf.offset(ty, m);
        Ok(Self {
            task_files: offset("task_struct", "files")?,
            files_fdt: offset("files_struct", "fdt")?,
            fdtable_max_fds: offset("fdtable", "max_fds")?,
            fdtable_fd: offset("fdtable", "fd")?,
            file_private_data: offset("file", "private_data")?,
            socket_sk: offset("socket", "sk")?,
            sock_peer_pid: offset("sock", "sk_peer_pid")?,
            pid_nr: offset("pid", "numbers")? + offset("upid", "nr")?,
            pid_tgid_task: offset("pid", "tasks")? + 8 * PIDTYPE_TGID,
            task_tgid_link: offset("task_struct", "pid_links")? + 16 * PIDTYPE_TGID,
            task_flags: offset("task_struct", "flags")?,
            task_exit_state: offset("task_struct", "exit_state")?,
            unix_sock_peer: offset("unix_sock", "peer")?,
            unix_sock_addr: offset("unix_sock", "addr")?,
            unix_address_len: offset("unix_address", "len")?,
            unix_address_path: offset("unix_address", "name")? + offset("sockaddr_un", "sun_path")?,
        })
    }

    /// Sets the connect probe's layout globals (`unix_peer.rs`).
    fn set_globals<'a>(&'a self, loader: &mut aya::EbpfLoader<'a>) {
        super::btf::set_layout(
            loader,
            &[
                ("TASK_FILES", &self.task_files),
                ("FILES_FDT", &self.files_fdt),
                ("FDTABLE_MAX_FDS", &self.fdtable_max_fds),
                ("FDTABLE_FD", &self.fdtable_fd),
                ("FILE_PRIVATE_DATA", &self.file_private_data),
                ("SOCKET_SK", &self.socket_sk),
                ("SOCK_PEER_PID", &self.sock_peer_pid),
                ("PID_NR", &self.pid_nr),
                ("PID_TGID_TASK", &self.pid_tgid_task),
                ("TASK_TGID_LINK", &self.task_tgid_link),
                ("TASK_FLAGS", &self.task_flags),
                ("TASK_EXIT_STATE", &self.task_exit_state),
                ("UNIX_SOCK_PEER", &self.unix_sock_peer),
                ("UNIX_SOCK_ADDR", &self.unix_sock_addr),
                ("UNIX_ADDRESS_LEN", &self.unix_address_len),
                ("UNIX_ADDRESS_PATH", &self.unix_address_path),
            ],
            "SOCKET_LAYOUT_KNOWN",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_kernels_socket_layout_is_found() {
        let Ok(btf) = KernelBtf::vmlinux() else {
            eprintln!("no kernel BTF: skipped");
            return;
        };
        let layout = SocketLayout::from_btf(&btf).unwrap();
        // `struct pid` holds a reference count, a level and a lock before its numbers.
        assert!(layout.pid_nr >= 12, "{layout:?}");
        assert!(
            layout.task_files > 0 && layout.sock_peer_pid > 0,
            "{layout:?}"
        );
        assert_ne!(layout.fdtable_fd, layout.fdtable_max_fds, "{layout:?}");
        // `struct unix_address { refcount_t refcnt; int len; struct sockaddr_un name[]; }`,
        // `sun_path` after the 2-byte family.
        assert_eq!(
            (layout.unix_address_len, layout.unix_address_path),
            (4, 10),
            "{layout:?}"
        );
    }
}
