//! The io_uring probes: `tp_btf` programs on `io_uring:io_uring_create` (a job process sets up a
//! ring) and `io_uring:io_uring_submit_req` (the opens it submits), with the request layout they
//! need read from the running kernel's BTF.
//!
//! What they cover, and what not, is in `docs/sensors.md` ("io_uring") and in `coverage`, which
//! `runner-monitor check` prints.

use aya::{
    Ebpf,
    maps::{Array, MapData},
    programs::BtfTracePoint,
};
use runner_monitor_common::setting;

use super::{
    ProbeState, ProbeStatus,
    attach::error_chain,
    btf::{BtfError, KernelBtf},
};

/// Where the request probe reads an open request, in bytes from the start of `struct io_kiocb`
/// (and of `struct filename`), for the running kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RequestLayout {
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

impl RequestLayout {
    /// The layout from `btf`, checked member by member (sizes and pointers as the probe reads
    /// them); the error names the member that is missing or not what the probe expects.
    pub fn from_btf(btf: &KernelBtf) -> Result<Self, String> {
        let member =
            |ty: &str, name: &str| btf.member(ty, name).map_err(|e: BtfError| e.to_string());
        let sized = |ty: &str, name: &str, size: u32| -> Result<u32, String> {
            let m = member(ty, name)?;
            match btf.size_of(m.type_id) {
                Some(s) if s == size => Ok(m.offset),
                other => Err(format!("{ty}.{name} is {other:?} bytes, not {size}")),
            }
        };
        let pointer = |ty: &str, name: &str| -> Result<u32, String> {
            let m = member(ty, name)?;
            if btf.is_pointer(m.type_id) {
                Ok(m.offset)
            } else {
                Err(format!("{ty}.{name} is not a pointer"))
            }
        };
        let cmd = member("io_kiocb", "cmd")?.offset;
        let how = member("io_open", "how")?.offset;
        let layout = Self {
            opcode: sized("io_kiocb", "opcode", 1)?,
            open_dfd: cmd + sized("io_open", "dfd", 4)?,
            open_filename: cmd + pointer("io_open", "filename")?,
            open_flags: cmd + how + sized("open_how", "flags", 8)?,
            filename_name: pointer("filename", "name")?,
        };
        // The command area holds the request's own struct (the kernel asserts it fits).
        let area = btf
            .struct_id("io_cmd_data")
            .and_then(|id| btf.size_of(id))
            .unwrap_or(64);
        let open = btf
            .struct_id("io_open")
            .and_then(|id| btf.size_of(id))
            .unwrap_or(u32::MAX);
        if open > area {
            return Err(format!(
                "struct io_open ({open} bytes) is not in io_kiocb's {area}-byte command area"
            ));
        }
        Ok(layout)
    }
}

/// (program, tracepoint)
const PROBES: [(&str, &str); 2] = [
    ("io_uring_create", "io_uring_create"),
    ("io_uring_submit_req", "io_uring_submit_req"),
];

/// Loads and attaches the io_uring probes, after writing the request layout into `settings`.
/// Never fails as a whole: each probe reports its state. The request probe is not attached
/// when the layout cannot be read from the kernel's BTF.
pub fn attach(ebpf: &mut Ebpf, settings: &mut Array<MapData, u32>) -> Vec<ProbeStatus> {
    let kernel_btf = KernelBtf::vmlinux().map_err(|e| e.to_string());
    let layout = kernel_btf
        .as_ref()
        .map_err(Clone::clone)
        .and_then(RequestLayout::from_btf);
    if let Ok(l) = &layout {
        for (index, value) in [
            (setting::IO_URING_OPCODE, l.opcode),
            (setting::IO_URING_OPEN_DFD, l.open_dfd),
            (setting::IO_URING_OPEN_FILENAME, l.open_filename),
            (setting::IO_URING_OPEN_FLAGS, l.open_flags),
            (setting::IO_URING_FILENAME_NAME, l.filename_name),
            (setting::IO_URING_LAYOUT, 1),
        ] {
            if let Err(e) = settings.set(index, value, 0) {
                tracing::warn!(error = %e, "io_uring request layout not written");
            }
        }
    }
    let btf = kernel_btf.and_then(|k| {
        aya::Btf::from_sys_fs()
            .map(|aya_btf| (k, aya_btf))
            .map_err(|e| format!("kernel BTF: {}", error_chain(&e)))
    });
    let mut out = Vec::new();
    for (program, tracepoint) in PROBES {
        let state = match (&btf, &layout) {
            (Err(reason), _) => ProbeState::Failed(reason.clone()),
            (Ok((k, _)), _) if !k.has_typedef(&format!("btf_trace_{tracepoint}")) => {
                ProbeState::Absent(format!(
                    "no tracepoint io_uring/{tracepoint} on this kernel (io_uring not built in)"
                ))
            }
            (Ok(_), Err(reason)) if program == "io_uring_submit_req" => {
                ProbeState::Failed(format!(
                    "not attached: the io_uring request layout is not in the kernel's BTF ({reason})"
                ))
            }
            (Ok((_, aya_btf)), _) => attach_one(ebpf, program, tracepoint, aya_btf),
        };
        match &state {
            ProbeState::Attached => tracing::debug!(program, "attached"),
            ProbeState::Absent(reason) => tracing::info!(program, %reason, "hook absent"),
            ProbeState::Failed(reason) => tracing::warn!(program, %reason, "probe not attached"),
        }
        out.push(ProbeStatus {
            sensor: "io_uring",
            program: program.to_owned(),
            target: format!("tp_btf:io_uring/{tracepoint}"),
            required: false,
            state,
        });
    }
    out
}

fn attach_one(ebpf: &mut Ebpf, program: &str, tracepoint: &str, btf: &aya::Btf) -> ProbeState {
    let Some(p) = ebpf.program_mut(program) else {
        return ProbeState::Failed(format!("program {program} is not in the object"));
    };
    let p: &mut BtfTracePoint = match p.try_into() {
        Ok(p) => p,
        Err(e) => return ProbeState::Failed(format!("{program}: {e}")),
    };
    if let Err(e) = p.load(tracepoint, btf) {
        return ProbeState::Failed(super::attach::verifier_reason(program, &e));
    }
    match p.attach() {
        Ok(_) => ProbeState::Attached,
        Err(e) => ProbeState::Failed(error_chain(&e)),
    }
}

/// What the io_uring probes in `probes` cover on this kernel, one line per kind of request, for
/// `runner-monitor check`.
pub fn coverage(probes: &[ProbeStatus]) -> Vec<(&'static str, String)> {
    let state = |program: &str| {
        probes
            .iter()
            .find(|p| p.program == program)
            .map(|p| p.state.clone())
    };
    let why = |s: Option<ProbeState>| match s {
        Some(ProbeState::Attached) => None,
        Some(ProbeState::Absent(r) | ProbeState::Failed(r)) => Some(r),
        None => Some("probe not loaded".to_owned()),
    };
    let setup = match why(state("io_uring_create")) {
        None => "seen: io_uring_setup by a job process is an io_uring_setup event".to_owned(),
        Some(r) => format!("NOT seen: {r}"),
    };
    let opens = match why(state("io_uring_submit_req")) {
        None => "seen at submission, matched like openat (file_open, via io_uring; the open's \
                 result is not known: reported as 0); SQPOLL rings too, as their creator's"
            .to_owned(),
        Some(r) => format!("NOT seen: {r}"),
    };
    vec![
        ("ring setup", setup),
        ("OPENAT, OPENAT2", opens),
        (
            "READ, READV, WRITE, ...",
            "not matched by name: the file's open is (syscall or io_uring); a registered \
             (fixed) file or an fd received from elsewhere is judged where it was opened"
                .to_owned(),
        ),
        (
            "CONNECT, RENAMEAT, UNLINKAT, LINKAT, ...",
            "NOT seen on the tracepoint set (DNS over UDP is, by the cgroup programs)".to_owned(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_without_the_request_structs_gets_no_layout_and_the_reason() {
        // A valid BTF blob with no types: a header and the empty string.
        let mut blob = vec![0x9f, 0xeb, 1, 0];
        for v in [24u32, 0, 0, 0, 1] {
            blob.extend(v.to_le_bytes());
        }
        blob.push(0);
        let btf = KernelBtf::parse(blob).unwrap();
        let reason = RequestLayout::from_btf(&btf).unwrap_err();
        assert!(reason.contains("io_kiocb"), "{reason}");
        let attached = |state| ProbeStatus {
            sensor: "io_uring",
            program: "io_uring_submit_req".into(),
            target: String::new(),
            required: false,
            state,
        };
        let lines = coverage(&[attached(ProbeState::Failed(reason.clone()))]);
        assert!(lines[1].1.starts_with("NOT seen") && lines[1].1.contains(&reason));
        assert!(
            coverage(&[])
                .iter()
                .take(2)
                .all(|(_, how)| how.starts_with("NOT"))
        );
    }

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
        let layout = RequestLayout::from_btf(&btf).unwrap();
        assert!(layout.open_filename < layout.opcode, "{layout:?}");
        assert!(layout.open_dfd < layout.open_filename, "{layout:?}");
        assert_eq!(layout.filename_name, 0, "{layout:?}");
    }
}
