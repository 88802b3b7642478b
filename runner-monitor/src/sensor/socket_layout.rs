//! Where the kernel keeps who serves a unix socket: the offsets the connect probe follows from a
//! job process's socket descriptor to the listener's process (`runner-monitor-ebpf/src/
//! unix_peer.rs`), so container requests are read only on sockets served outside jobs.

use aya::EbpfLoader;
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
}

impl SocketLayout {
    pub fn from_btf(btf: &KernelBtf) -> Result<Self, String> {
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
        })
    }

    /// Sets the connect probe's layout globals (`unix_peer.rs`).
    pub(super) fn set_globals<'a>(&'a self, loader: &mut EbpfLoader<'a>) {
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
    }
}
