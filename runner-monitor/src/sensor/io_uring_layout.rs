//! Where the io_uring request probe reads each kind of request, for the running kernel: offsets
//! into `struct io_kiocb` and the request structs in its command area, read member by member from
//! the kernel's BTF (aya-ebpf has no CO-RE field relocations) and handed to the programs in the
//! `SETTINGS` map with `LAYOUT_*` bits saying which are known (`io_uring.rs` attaches).

use aya::maps::{Array, MapData};
use runner_monitor_common::{
    io_uring::{LAYOUT_CONNECT, LAYOUT_FIXED, LAYOUT_OPEN, LAYOUT_PATHS, LAYOUT_SEND},
    setting,
};

use super::btf::{BtfError, KernelBtf};

/// Checked member lookups in the kernel's BTF: each error names the member that is missing or
/// not what the probe reads.
struct Members<'a>(&'a KernelBtf);

impl Members<'_> {
    fn offset(&self, ty: &str, name: &str) -> Result<u32, String> {
        self.0
            .member(ty, name)
            .map(|m| m.offset)
            .map_err(|e: BtfError| e.to_string())
    }

    fn sized(&self, ty: &str, name: &str, size: u32) -> Result<u32, String> {
        let m = self.0.member(ty, name).map_err(|e| e.to_string())?;
        match self.0.size_of(m.type_id) {
            Some(s) if s == size => Ok(m.offset),
            other => Err(format!("{ty}.{name} is {other:?} bytes, not {size}")),
        }
    }

    fn pointer(&self, ty: &str, name: &str) -> Result<u32, String> {
        let m = self.0.member(ty, name).map_err(|e| e.to_string())?;
        if self.0.is_pointer(m.type_id) {
            Ok(m.offset)
        } else {
            Err(format!("{ty}.{name} is not a pointer"))
        }
    }

    /// `io_kiocb.cmd`, checked to hold the request struct `op` (the kernel asserts it fits).
    fn command_area(&self, op: &str) -> Result<u32, String> {
        let cmd = self.offset("io_kiocb", "cmd")?;
        let size = |ty| self.0.struct_id(ty).and_then(|id| self.0.size_of(id));
        match (size(op), size("io_cmd_data")) {
            (Some(o), Some(area)) if o <= area => Ok(cmd),
            (o, area) => Err(format!(
                "struct {op} ({o:?} bytes) is not in io_kiocb's command area ({area:?} bytes)"
            )),
        }
    }
}

/// Where the request probe reads an open request, in bytes from the start of `struct io_kiocb`
/// (and of `struct filename`), for the running kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct OpenLayout {
    /// `io_kiocb.opcode`.
    pub opcode: u32,
    /// `io_kiocb.cmd` + `io_open.dfd`.
    pub open_dfd: u32,
    /// `io_kiocb.cmd` + `io_open.filename`.
    pub open_filename: u32,
    /// `io_kiocb.cmd` + `io_open.how` + `open_how.flags`.
    pub open_flags: u32,
    /// `filename.name`.
    pub filename_name: u32,
}

impl OpenLayout {
    pub fn from_btf(btf: &KernelBtf) -> Result<Self, String> {
        let m = Members(btf);
        let cmd = m.command_area("io_open")?;
        Ok(Self {
            opcode: m.sized("io_kiocb", "opcode", 1)?,
            open_dfd: cmd + m.sized("io_open", "dfd", 4)?,
            open_filename: cmd + m.pointer("io_open", "filename")?,
            open_flags: cmd + m.offset("io_open", "how")? + m.sized("open_how", "flags", 8)?,
            filename_name: m.pointer("filename", "name")?,
        })
    }
}

/// Where the request probe reads a connect request, from the start of `struct io_kiocb`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ConnectLayout {
    /// `io_kiocb.opcode`.
    pub opcode: u32,
    /// `io_kiocb.cqe` + `io_cqe.fd`: the socket's fd.
    pub fd: u32,
    /// `io_kiocb.cmd` + `io_connect.addr`: the user address.
    pub addr: u32,
    /// `io_kiocb.cmd` + `io_connect.addr_len`.
    pub addr_len: u32,
}

impl ConnectLayout {
    pub fn from_btf(btf: &KernelBtf) -> Result<Self, String> {
        let m = Members(btf);
        let cmd = m.command_area("io_connect")?;
        Ok(Self {
            opcode: m.sized("io_kiocb", "opcode", 1)?,
            fd: m.offset("io_kiocb", "cqe")? + m.sized("io_cqe", "fd", 4)?,
            addr: cmd + m.pointer("io_connect", "addr")?,
            addr_len: cmd + m.sized("io_connect", "addr_len", 4)?,
        })
    }
}

/// Where the request probe reads a rename or link request (`struct io_rename` and
/// `struct io_link`, which must be laid out alike), from the start of `struct io_kiocb`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PathsLayout {
    pub opcode: u32,
    pub old_dfd: u32,
    pub new_dfd: u32,
    pub oldpath: u32,
    pub newpath: u32,
    pub flags: u32,
    /// `filename.name`.
    pub filename_name: u32,
}

impl PathsLayout {
    pub fn from_btf(btf: &KernelBtf) -> Result<Self, String> {
        let m = Members(btf);
        let of = |ty: &str| -> Result<[u32; 5], String> {
            let cmd = m.command_area(ty)?;
            Ok([
                cmd + m.sized(ty, "old_dfd", 4)?,
                cmd + m.sized(ty, "new_dfd", 4)?,
                cmd + m.pointer(ty, "oldpath")?,
                cmd + m.pointer(ty, "newpath")?,
                cmd + m.sized(ty, "flags", 4)?,
            ])
        };
        let rename = of("io_rename")?;
        if of("io_link")? != rename {
            return Err("struct io_link is not laid out as struct io_rename".to_owned());
        }
        let [old_dfd, new_dfd, oldpath, newpath, flags] = rename;
        Ok(Self {
            opcode: m.sized("io_kiocb", "opcode", 1)?,
            old_dfd,
            new_dfd,
            oldpath,
            newpath,
            flags,
            filename_name: m.pointer("filename", "name")?,
        })
    }
}

/// Where the request probe reads what a write or a send request sends, from the start of
/// `struct io_kiocb`: a job's container start request through io_uring (`containers.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SendLayout {
    pub opcode: u32,
    /// `io_kiocb.cqe` + `io_cqe.fd`: the descriptor written to.
    pub fd: u32,
    /// `io_kiocb.cmd` + `io_rw.addr` (u64) and `io_rw.len` (u32).
    pub rw_addr: u32,
    pub rw_len: u32,
    /// `io_kiocb.cmd` + `io_sr_msg.buf` (the union with `umsg`), `.len` (i32), `.flags` (u16).
    pub send_buf: u32,
    pub send_len: u32,
    pub send_flags: u32,
    /// `io_kiocb.flags` (u32 or u64; its low byte holds `REQ_F_FIXED_FILE`): a request on a
    /// registered file is never read as one on the descriptor of the same number.
    pub req_flags: u32,
    /// `io_kiocb.cmd` + `io_splice.len` (u64); 0 when not known: a splice is then reported
    /// with its length unknown, and the sends are still read.
    pub splice_len: u32,
}

impl SendLayout {
    pub fn from_btf(btf: &KernelBtf) -> Result<Self, String> {
        let m = Members(btf);
        let rw = m.command_area("io_rw")?;
        let sr = m.command_area("io_sr_msg")?;
        // `umsg` shares `buf`'s place (an anonymous union): checked, as the probe reads both there.
        let buf = m.pointer("io_sr_msg", "buf")?;
        if m.pointer("io_sr_msg", "umsg")? != buf {
            return Err("io_sr_msg.umsg is not at io_sr_msg.buf".to_owned());
        }
        Ok(Self {
            opcode: m.sized("io_kiocb", "opcode", 1)?,
            fd: m.offset("io_kiocb", "cqe")? + m.sized("io_cqe", "fd", 4)?,
            rw_addr: rw + m.sized("io_rw", "addr", 8)?,
            rw_len: rw + m.sized("io_rw", "len", 4)?,
            send_buf: sr + buf,
            send_len: sr + m.sized("io_sr_msg", "len", 4)?,
            send_flags: sr + m.sized("io_sr_msg", "flags", 2)?,
            req_flags: {
                let flags = m.0.member("io_kiocb", "flags").map_err(|e| e.to_string())?;
                match m.0.size_of(flags.type_id) {
                    Some(4 | 8) => flags.offset,
                    other => return Err(format!("io_kiocb.flags is {other:?} bytes, not 4 or 8")),
                }
            },
            splice_len: m
                .command_area("io_splice")
                .and_then(|area| Ok(area + m.sized("io_splice", "len", 8)?))
                .unwrap_or(0),
        })
    }
}

/// Where the send reader finds a registered (fixed) file: from `struct io_kiocb` to its ring,
/// and in `struct io_ring_ctx` the table of registered files, whose shape changed in Linux 6.13.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FixedLayout {
    /// `io_kiocb.ctx`.
    pub ctx: u32,
    /// The table (a pointer to 8-byte entries) in `struct io_ring_ctx`: `file_table.files` (an
    /// array of `struct io_fixed_file`) before 6.13, `file_table.data.nodes` (an array of
    /// `struct io_rsrc_node *`) since.
    pub files: u32,
    /// How many entries: `nr_user_files` before 6.13, `file_table.data.nr` since (u32).
    pub files_nr: u32,
    /// 0 before 6.13 (an entry is `{ unsigned long file_ptr; }`); since, 1 + the offset of
    /// `io_rsrc_node.file_ptr`.
    pub node_file: u32,
}

impl FixedLayout {
    pub fn from_btf(btf: &KernelBtf) -> Result<Self, String> {
        let m = Members(btf);
        let ctx = m.pointer("io_kiocb", "ctx")?;
        let table = m.offset("io_ring_ctx", "file_table")?;
        if let Ok(data) = m.offset("io_file_table", "data") {
            return Ok(Self {
                ctx,
                files: table + data + m.pointer("io_rsrc_data", "nodes")?,
                files_nr: table + data + m.sized("io_rsrc_data", "nr", 4)?,
                node_file: 1 + m.sized("io_rsrc_node", "file_ptr", 8)?,
            });
        }
        // Before 6.13: an array of `struct io_fixed_file { unsigned long file_ptr; }`.
        if m.sized("io_fixed_file", "file_ptr", 8)? != 0
            || btf
                .struct_id("io_fixed_file")
                .and_then(|id| btf.size_of(id))
                != Some(8)
        {
            return Err("struct io_fixed_file is not { unsigned long file_ptr; }".to_owned());
        }
        Ok(Self {
            ctx,
            files: table + m.pointer("io_file_table", "files")?,
            files_nr: m.sized("io_ring_ctx", "nr_user_files", 4)?,
            node_file: 0,
        })
    }
}

/// The request layouts of the running kernel, each with the reason it is not known.
pub struct Layouts {
    pub open: Result<OpenLayout, String>,
    pub connect: Result<ConnectLayout, String>,
    pub paths: Result<PathsLayout, String>,
    pub send: Result<SendLayout, String>,
    pub fixed: Result<FixedLayout, String>,
}

impl Layouts {
    pub fn of(btf: &Result<KernelBtf, String>) -> Self {
        match btf {
            Ok(btf) => Self {
                open: OpenLayout::from_btf(btf),
                connect: ConnectLayout::from_btf(btf),
                paths: PathsLayout::from_btf(btf),
                send: SendLayout::from_btf(btf),
                fixed: FixedLayout::from_btf(btf),
            },
            Err(e) => Self {
                open: Err(e.clone()),
                connect: Err(e.clone()),
                paths: Err(e.clone()),
                send: Err(e.clone()),
                fixed: Err(e.clone()),
            },
        }
    }

    /// Writes the known offsets and the `LAYOUT_*` bits saying which they are.
    pub(super) fn write(
        &self,
        settings: &mut Array<MapData, u32>,
    ) -> Result<(), aya::maps::MapError> {
        let mut bits = 0;
        if let Ok(l) = &self.open {
            settings.set(setting::IO_URING_OPCODE, l.opcode, 0)?;
            settings.set(setting::IO_URING_OPEN_DFD, l.open_dfd, 0)?;
            settings.set(setting::IO_URING_OPEN_FILENAME, l.open_filename, 0)?;
            settings.set(setting::IO_URING_OPEN_FLAGS, l.open_flags, 0)?;
            settings.set(setting::IO_URING_FILENAME_NAME, l.filename_name, 0)?;
            bits |= LAYOUT_OPEN;
        }
        if let Ok(l) = &self.connect {
            settings.set(setting::IO_URING_OPCODE, l.opcode, 0)?;
            settings.set(setting::IO_URING_FD, l.fd, 0)?;
            settings.set(setting::IO_URING_CONNECT_ADDR, l.addr, 0)?;
            settings.set(setting::IO_URING_CONNECT_ADDR_LEN, l.addr_len, 0)?;
            bits |= LAYOUT_CONNECT;
        }
        if let Ok(l) = &self.paths {
            settings.set(setting::IO_URING_OPCODE, l.opcode, 0)?;
            settings.set(setting::IO_URING_FILENAME_NAME, l.filename_name, 0)?;
            settings.set(setting::IO_URING_PATHS_OLD_DFD, l.old_dfd, 0)?;
            settings.set(setting::IO_URING_PATHS_NEW_DFD, l.new_dfd, 0)?;
            settings.set(setting::IO_URING_PATHS_OLD, l.oldpath, 0)?;
            settings.set(setting::IO_URING_PATHS_NEW, l.newpath, 0)?;
            settings.set(setting::IO_URING_PATHS_FLAGS, l.flags, 0)?;
            bits |= LAYOUT_PATHS;
        }
        if let Ok(l) = &self.send {
            settings.set(setting::IO_URING_OPCODE, l.opcode, 0)?;
            settings.set(setting::IO_URING_FD, l.fd, 0)?;
            settings.set(setting::IO_URING_RW_ADDR, l.rw_addr, 0)?;
            settings.set(setting::IO_URING_RW_LEN, l.rw_len, 0)?;
            settings.set(setting::IO_URING_SEND_BUF, l.send_buf, 0)?;
            settings.set(setting::IO_URING_SEND_LEN, l.send_len, 0)?;
            settings.set(setting::IO_URING_SEND_FLAGS, l.send_flags, 0)?;
            settings.set(setting::IO_URING_REQ_FLAGS, l.req_flags, 0)?;
            settings.set(setting::IO_URING_SPLICE_LEN, l.splice_len, 0)?;
            bits |= LAYOUT_SEND;
        }
        if let Ok(l) = &self.fixed {
            settings.set(setting::IO_URING_REQ_CTX, l.ctx, 0)?;
            settings.set(setting::IO_URING_FILES, l.files, 0)?;
            settings.set(setting::IO_URING_FILES_NR, l.files_nr, 0)?;
            settings.set(setting::IO_URING_NODE_FILE, l.node_file, 0)?;
            bits |= LAYOUT_FIXED;
        }
        settings.set(setting::IO_URING_LAYOUT, bits, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a kernel with BTF and io_uring (this project's test hosts), the layout is found and
    /// the open request's fields lie in the command area, before the opcode.
    #[test]
    fn the_running_kernels_open_request_layout_is_found() {
        let Ok(btf) = KernelBtf::vmlinux() else {
            eprintln!("no kernel BTF: skipped");
            return;
        };
        if btf.struct_id("io_kiocb").is_none() {
            eprintln!("kernel without io_uring: skipped");
            return;
        }
        let layout = OpenLayout::from_btf(&btf).unwrap();
        assert!(layout.open_filename < layout.opcode, "{layout:?}");
        assert!(layout.open_dfd < layout.open_filename, "{layout:?}");
        assert_eq!(layout.filename_name, 0, "{layout:?}");
        let connect = ConnectLayout::from_btf(&btf).unwrap();
        assert!(
            connect.addr < connect.opcode && connect.fd > connect.opcode,
            "{connect:?}"
        );
        let paths = PathsLayout::from_btf(&btf).unwrap();
        assert!(
            paths.oldpath < paths.newpath && paths.newpath < paths.opcode,
            "{paths:?}"
        );
        let send = SendLayout::from_btf(&btf).unwrap();
        assert!(
            send.rw_addr < send.rw_len && send.send_buf < send.send_len,
            "{send:?}"
        );
        assert!(
            send.rw_len < send.opcode && send.send_flags < send.opcode,
            "{send:?}"
        );
        assert!(
            send.splice_len != 0 && send.splice_len < send.opcode,
            "{send:?}"
        );
        let fixed = FixedLayout::from_btf(&btf).unwrap();
        assert!(fixed.files != fixed.files_nr, "{fixed:?}");
    }
}
