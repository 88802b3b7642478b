//! Which hooks see file opens: the BPF LSM hook `file_open`, an fentry program on
//! `security_file_open`, or the open syscall tracepoints (`openat`, `openat2`, `open`, `creat`).
//!
//! The first two see the file the kernel opened (`runner-monitor-ebpf/src/file_open.rs`), by any
//! way of opening it, and cost one hook inside the open instead of a tracepoint at its entry and
//! exit; the tracepoints are the fallback where neither loads (this project's 6.18 host refuses
//! both with EPERM). The choice is made at start-up for every family alike (`hook_sets.rs`);
//! `runner-monitor check` prints it with its reason.

use super::btf::KernelLayout;
use serde::Serialize;

use super::{
    btf::KernelBtf,
    hook_sets::{Family, HookFamily},
};

/// File opens' hooks (`hook_sets.rs`).
pub(super) const FILE_OPENS: Family = Family {
    family: HookFamily::FileOpens,
    sensor: "file access",
    lsm: ("lsm_file_open", "file_open"),
    fentry: ("fentry_file_open", "security_file_open"),
    tracepoints: &OPEN_TRACEPOINTS,
    syscalls: "openat, openat2, open, creat",
};

/// The open tracepoints the fast set replaces (the rename, unlink and link ones stay).
const OPEN_TRACEPOINTS: [&str; 8] = [
    "sys_enter_openat",
    "sys_enter_openat2",
    "sys_enter_open",
    "sys_enter_creat",
    "sys_exit_openat",
    "sys_exit_openat2",
    "sys_exit_open",
    "sys_exit_creat",
];

/// Where the programs read a file's path, name and flags: byte offsets for the running kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct FileLayout {
    pub file_f_path: u32,
    pub file_f_flags: u32,
    pub file_f_mode: u32,
    pub path_dentry: u32,
    pub dentry_d_parent: u32,
    /// `dentry.d_name` + `qstr.name`.
    pub dentry_d_name: u32,
}

impl KernelLayout for FileLayout {
    fn from_btf(btf: &KernelBtf) -> Result<Self, String> {
        let offset = |ty: &str, m: &str| btf.member(ty, m).map_err(|e| e.to_string());
        let pointer = |ty: &str, m: &str| -> Result<u32, String> {
            let member = btf.member(ty, m).map_err(|e| e.to_string())?;
            if btf.is_pointer(member.type_id) {
                Ok(member.offset)
            } else {
                Err(format!("{ty}.{m} is not a pointer"))
            }
        };
        Ok(Self {
            file_f_path: offset("file", "f_path")?.offset,
            file_f_flags: offset("file", "f_flags")?.offset,
            file_f_mode: offset("file", "f_mode")?.offset,
            path_dentry: pointer("path", "dentry")?,
            dentry_d_parent: pointer("dentry", "d_parent")?,
            dentry_d_name: offset("dentry", "d_name")?.offset + pointer("qstr", "name")?,
        })
    }

    /// Sets the programs' layout globals (read by the verifier as constants: frozen `.rodata`).
    fn set_globals<'a>(&'a self, loader: &mut aya::EbpfLoader<'a>) {
        super::btf::set_layout(
            loader,
            &[
                ("FILE_F_PATH", &self.file_f_path),
                ("FILE_F_FLAGS", &self.file_f_flags),
                ("FILE_F_MODE", &self.file_f_mode),
                ("PATH_DENTRY", &self.path_dentry),
                ("DENTRY_D_PARENT", &self.dentry_d_parent),
                ("DENTRY_D_NAME", &self.dentry_d_name),
            ],
            "FILE_LAYOUT_KNOWN",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a kernel with BTF, the layout is found and `f_path` is a struct inside `struct file`.
    #[test]
    fn the_running_kernels_file_layout_is_found() {
        let Ok(btf) = KernelBtf::vmlinux() else {
            eprintln!("no kernel BTF: skipped");
            return;
        };
        let layout = FileLayout::from_btf(&btf).unwrap();
        assert_eq!(
            layout.path_dentry, 8,
            "struct path {{ mnt; dentry; }}: {layout:?}"
        );
        assert_ne!(layout.file_f_path, layout.file_f_flags, "{layout:?}");
        assert!(layout.dentry_d_name > layout.dentry_d_parent, "{layout:?}");
    }
}
