//! The io_uring probes: `tp_btf` programs on `io_uring:io_uring_create` (a job process sets up a
//! ring) and `io_uring:io_uring_submit_req` (the opens, paths and connects it submits; and, a
//! program of its own, the writes and sends, for container requests), with the request layouts
//! they need read from the running kernel's BTF (`io_uring_layout.rs`).
//!
//! What they cover, and what not, is in `docs/sensors.md` ("io_uring") and in `coverage`, which
//! `runner-monitor check` prints.

use aya::{
    Ebpf,
    maps::{Array, MapData},
    programs::BtfTracePoint,
};
use runner_monitor_common::{
    io_uring::{LAYOUT_OPEN, LAYOUT_SEND},
    setting,
};

use super::io_uring_layout::Layouts;
use super::{ProbeState, ProbeStatus, attach::error_chain, btf::KernelBtf};

/// (program, the tracepoints it attaches to, first one the kernel has). Before Linux 6.2 the
/// request tracepoint was `io_uring_submit_sqe(struct io_kiocb *req, bool force_nonblock)`, at the
/// same place in `io_submit_sqe()` (after `io_init_req()`) and with the request as its first
/// argument too (Debian 12's 6.1 has it, not `io_uring_submit_req`).
const PROBES: [(&str, &[&str]); 2] = [
    ("io_uring_create", &["io_uring_create"]),
    (
        "io_uring_submit_req",
        &["io_uring_submit_req", "io_uring_submit_sqe"],
    ),
];

/// The program the request probe jumps to for a job's write and send requests, and its table.
const SENDS_PROGRAM: &str = "io_uring_send_req";
const SENDS_MAP: &str = "IO_URING_SENDS";

/// Loads `io_uring_send_req` for `tracepoint` and puts it in `IO_URING_SENDS`, before the
/// request probe is attached (an empty slot: no write or send is read), as the file probes'
/// table is filled.
fn fill_sends(
    ebpf: &mut Ebpf,
    tracepoint: &str,
    btf: &aya::Btf,
    links: &mut super::links::LinkPins,
) -> Result<(), String> {
    let program: &mut BtfTracePoint = ebpf
        .program_mut(SENDS_PROGRAM)
        .ok_or_else(|| format!("program {SENDS_PROGRAM} is not in the object"))?
        .try_into()
        .map_err(|e| format!("{SENDS_PROGRAM}: {e}"))?;
    if program.fd().is_err() {
        program
            .load(tracepoint, btf)
            .map_err(|e| super::attach::verifier_reason(SENDS_PROGRAM, &e))?;
    }
    let fd = program
        .fd()
        .and_then(|fd| fd.try_clone().map_err(Into::into))
        .map_err(|e| format!("{SENDS_PROGRAM}: {e}"))?;
    super::attach::fill_table(ebpf, SENDS_MAP, "io_uring_send_calls", &fd, links)
}

/// The write and send reader, reached by tail call from the request probe: a program apart,
/// verified alone (in one program the container request parser took the verifier to its limit),
/// that only a job process's write or send request runs. Without it the request probe is told
/// not to jump (`LAYOUT_SEND` cleared).
fn sends(
    ebpf: &mut Ebpf,
    settings: &mut Array<MapData, u32>,
    layouts: &Layouts,
    tracepoint: &str,
    btf: &aya::Btf,
    links: &mut super::links::LinkPins,
) -> ProbeStatus {
    let state = match &layouts.send {
        Err(reason) => ProbeState::Failed(format!(
            "not loaded: the io_uring write and send layouts are not in the kernel's BTF ({reason})"
        )),
        Ok(_) => match fill_sends(ebpf, tracepoint, btf, links) {
            Ok(()) => ProbeState::Attached,
            Err(reason) => ProbeState::Failed(reason),
        },
    };
    if state != ProbeState::Attached {
        let layout = settings.get(&setting::IO_URING_LAYOUT, 0).unwrap_or(0);
        let _ = settings.set(setting::IO_URING_LAYOUT, layout & !LAYOUT_SEND, 0);
    }
    ProbeStatus {
        sensor: "io_uring",
        program: SENDS_PROGRAM.to_owned(),
        target: format!("tail call: tp_btf:io_uring/{tracepoint} ({SENDS_MAP})"),
        required: false,
        state,
    }
}

/// Tells the request probe to leave opens alone: a file-open hook (LSM or fentry) sees them when
/// they run, with the file's own path, and each would be sent twice.
pub(super) fn leave_opens(settings: &mut Array<MapData, u32>) {
    let layout = settings.get(&setting::IO_URING_LAYOUT, 0).unwrap_or(0);
    if let Err(error) = settings.set(setting::IO_URING_LAYOUT, layout & !LAYOUT_OPEN, 0) {
        tracing::warn!(%error, "io_uring opens will be sent twice");
    }
}

/// Loads and attaches the io_uring probes, after writing the request layout into `settings`.
/// Never fails as a whole: each probe reports its state. The request probe is not attached
/// when no request layout can be read from the kernel's BTF.
pub fn attach(
    ebpf: &mut Ebpf,
    settings: &mut Array<MapData, u32>,
    kernel_btf: Result<KernelBtf, String>,
    links: &mut super::links::LinkPins,
) -> Vec<ProbeStatus> {
    let layouts = Layouts::of(&kernel_btf);
    if let Err(e) = layouts.write(settings) {
        tracing::warn!(error = %e, "io_uring request layout not written");
    }
    let btf = kernel_btf.and_then(|k| {
        aya::Btf::from_sys_fs()
            .map(|aya_btf| (k, aya_btf))
            .map_err(|e| format!("kernel BTF: {}", error_chain(&e)))
    });
    let mut out = Vec::new();
    for (program, tracepoints) in PROBES {
        let tracepoint = btf
            .as_ref()
            .ok()
            .and_then(|(k, _)| {
                tracepoints
                    .iter()
                    .find(|t| k.has_typedef(&format!("btf_trace_{t}")))
            })
            .copied();
        // Why the request program has nothing to read on this kernel, if so.
        let no_layout = match (program, &layouts) {
            (
                "io_uring_submit_req",
                Layouts {
                    open: Err(open),
                    connect: Err(connect),
                    paths: Err(paths),
                    send: Err(send),
                    ..
                },
            ) => Some(format!(
                "not attached: the io_uring request layouts are not in the kernel's BTF \
                 (open: {open}; connect: {connect}; rename and link: {paths}; write and \
                 send: {send})"
            )),
            _ => None,
        };
        let state = match (&btf, no_layout) {
            (Err(reason), _) => ProbeState::Failed(reason.clone()),
            _ if tracepoint.is_none() => ProbeState::Absent(format!(
                "no tracepoint io_uring/{} in the kernel's BTF (io_uring not built in?)",
                tracepoints.join(" or ")
            )),
            (Ok(_), Some(reason)) => ProbeState::Failed(reason),
            (Ok((_, aya_btf)), _) => {
                if program == "io_uring_submit_req" {
                    let tracepoint = tracepoint.unwrap_or_default();
                    out.push(sends(ebpf, settings, &layouts, tracepoint, aya_btf, links));
                }
                match attach_one(ebpf, program, tracepoint.unwrap_or_default(), aya_btf) {
                    Ok(program_id) => {
                        links.pin_new(program, 0, program_id);
                        ProbeState::Attached
                    }
                    Err(state) => state,
                }
            }
        };
        match &state {
            ProbeState::Attached => tracing::debug!(program, "attached"),
            ProbeState::Absent(reason) => tracing::info!(program, %reason, "hook absent"),
            ProbeState::Failed(reason) => tracing::warn!(program, %reason, "probe not attached"),
        }
        out.push(ProbeStatus {
            sensor: "io_uring",
            program: program.to_owned(),
            target: format!("tp_btf:io_uring/{}", tracepoint.unwrap_or(tracepoints[0])),
            required: false,
            state,
        });
    }
    out
}

/// Attached: the program's id (to pin its link); or why not.
fn attach_one(
    ebpf: &mut Ebpf,
    program: &str,
    tracepoint: &str,
    btf: &aya::Btf,
) -> Result<Option<u32>, ProbeState> {
    let Some(p) = ebpf.program_mut(program) else {
        return Err(ProbeState::Failed(format!(
            "program {program} is not in the object"
        )));
    };
    let p: &mut BtfTracePoint = p
        .try_into()
        .map_err(|e| ProbeState::Failed(format!("{program}: {e}")))?;
    p.load(tracepoint, btf)
        .map_err(|e| ProbeState::Failed(super::attach::verifier_reason(program, &e)))?;
    p.attach()
        .map_err(|e| ProbeState::Failed(error_chain(&e)))?;
    Ok(p.info().map(|i| i.id()).ok())
}

/// What the io_uring probes in `probes` cover on this kernel, one line per kind of request, for
/// `runner-monitor check`.
/// `kernel_opens`: the file-open hook set (LSM, fentry) is in use and sees io_uring's opens.
pub fn coverage(probes: &[ProbeStatus], kernel_opens: bool) -> Vec<(&'static str, String)> {
    let mut lines = coverage_with(
        probes,
        &Layouts::of(&KernelBtf::vmlinux().map_err(|e| e.to_string())),
    );
    if kernel_opens {
        lines[1].1 = "seen when they run, by the file-open hook: file_open with the file's own \
                      path (io_uring: false)"
            .to_owned();
    }
    lines
}

fn coverage_with(probes: &[ProbeStatus], layouts: &Layouts) -> Vec<(&'static str, String)> {
    let why = |program: &str| match probes.iter().find(|p| p.program == program) {
        Some(ProbeStatus {
            state: ProbeState::Attached,
            ..
        }) => None,
        Some(ProbeStatus {
            state: ProbeState::Absent(r) | ProbeState::Failed(r),
            ..
        }) => Some(r.clone()),
        None => Some("probe not loaded".to_owned()),
    };
    let request_of =
        |program: &str, layout: Result<(), &String>, seen: &str| match (why(program), layout) {
            (Some(r), _) => format!("NOT seen: {r}"),
            (None, Err(r)) => format!("NOT seen: {r}"),
            (None, Ok(())) => format!("seen at submission: {seen}"),
        };
    let request =
        |layout: Result<(), &String>, seen: &str| request_of("io_uring_submit_req", layout, seen);
    vec![
        (
            "ring setup",
            match why("io_uring_create") {
                None => "seen: an io_uring_setup event of the job process".to_owned(),
                Some(r) => format!("NOT seen: {r}"),
            },
        ),
        (
            "OPENAT, OPENAT2",
            request(
                layouts.open.as_ref().map(|_| ()),
                "file_open as for openat (io_uring: true, result 0: not known yet)",
            ),
        ),
        (
            "CONNECT",
            request(
                layouts.connect.as_ref().map(|_| ()),
                "connect as for the syscall (io_uring: true, result 0: not known yet)",
            ),
        ),
        (
            "RENAMEAT, LINKAT, SYMLINKAT",
            request(
                layouts.paths.as_ref().map(|_| ()),
                "file_rename, file_link as for the syscalls (io_uring: true, result 0)",
            ),
        ),
        (
            "WRITE(V), SEND(MSG), _FIXED, _ZC",
            request_of(
                "io_uring_send_req",
                layouts.send.as_ref().map(|_| ()),
                "on a container runtime's socket, a job's container start or exec request is \
                 read as for the syscalls (docs/containers.md); a send from the ring's provided \
                 buffers, bytes the monitor cannot read (agent-tamper)",
            ),
        ),
        (
            "SPLICE",
            request_of(
                "io_uring_send_req",
                layouts.send.as_ref().map(|_| ()),
                match &layouts.send {
                    Ok(l) if l.splice_len == 0 => {
                        "into a container runtime's socket, bytes the monitor cannot read \
                         (agent-tamper, as for splice; their number not known on this kernel)"
                    }
                    _ => {
                        "into a container runtime's socket, bytes the monitor cannot read \
                          (agent-tamper, as for splice)"
                    }
                },
            ),
        ),
        (
            "... on a registered (fixed) file",
            match (why("io_uring_send_req"), &layouts.send, &layouts.fixed) {
                (Some(r), _, _) => format!("NOT seen: {r}"),
                (None, Err(r), _) | (None, Ok(_), Err(r)) => format!("NOT seen: {r}"),
                (None, Ok(_), Ok(_)) => "seen: the file is looked up in the ring's table and \
                                         read as its descriptor would be"
                    .to_owned(),
            },
        ),
        (
            "READ, READV, WRITE, ... as file access",
            "not matched by name: the fd's open is (syscall or io_uring); a registered (fixed) \
             file or an fd received from elsewhere is judged where it was opened"
                .to_owned(),
        ),
        (
            "UNLINKAT, MKDIRAT, STATX, SEND(MSG) to an address",
            "NOT seen on the tracepoint set".to_owned(),
        ),
        (
            "SQPOLL rings",
            "requests are the ring creator's (its polling thread submits them)".to_owned(),
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
        let layouts = Layouts::of(&Ok(btf));
        let reason = layouts.open.clone().unwrap_err();
        assert!(reason.contains("io_kiocb"), "{reason}");
        assert!(layouts.connect.clone().unwrap_err().contains("io_kiocb"));
        assert!(layouts.paths.clone().unwrap_err().contains("io_kiocb"));
        assert!(layouts.send.clone().unwrap_err().contains("io_"));
        let both = |state: ProbeState| {
            ["io_uring_submit_req", "io_uring_send_req"].map(|program| ProbeStatus {
                sensor: "io_uring",
                program: program.into(),
                target: String::new(),
                required: false,
                state: state.clone(),
            })
        };
        // Not attached: every request kind says why.
        let lines = coverage_with(&both(ProbeState::Failed("EPERM".into())), &layouts);
        assert!(
            lines[1..5].iter().all(|(_, how)| how == "NOT seen: EPERM"),
            "{lines:?}"
        );
        // Attached, but without the layouts: not seen either, with the missing member.
        let lines = coverage_with(&both(ProbeState::Attached), &layouts);
        assert!(lines[1].1.starts_with("NOT seen") && lines[1].1.contains(&reason));
        assert!(lines[4].1.starts_with("NOT seen") && lines[4].1.contains("io_"));
        assert!(coverage_with(&[], &layouts)[0].1.starts_with("NOT seen"));
    }
}
