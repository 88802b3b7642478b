//! Which hooks see file opens: the BPF LSM hook `file_open`, an fentry program on
//! `security_file_open`, or the open syscall tracepoints (`openat`, `openat2`, `open`, `creat`).
//!
//! The first two see the file the kernel opened (`runner-monitor-ebpf/src/file_open.rs`), by any
//! way of opening it, and cost one hook inside the open instead of a tracepoint at its entry and
//! exit; the tracepoints are the fallback where neither loads (this project's 6.18 host refuses
//! both with EPERM). The choice is made at start-up (`--hooks auto|tracepoint|fast`, default
//! `auto`); `runner-monitor check` prints it with its reason.

use aya::{
    Btf, Ebpf, EbpfLoader,
    programs::{FEntry, Lsm},
};
use serde::Serialize;

use super::{
    ProbeState, ProbeStatus,
    attach::{error_chain, verifier_reason},
    btf::KernelBtf,
};

/// What the operator asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HookChoice {
    /// LSM, else fentry, else the tracepoints.
    #[default]
    Auto,
    /// The open syscall tracepoints, even where the kernel allows more (tests, benchmarks).
    Tracepoint,
    /// LSM or fentry; the agent does not start without one.
    Fast,
    /// fentry only, even where LSM loads (to test the fentry programs on kernels with both).
    Fentry,
}

impl std::str::FromStr for HookChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "tracepoint" => Ok(Self::Tracepoint),
            "fast" => Ok(Self::Fast),
            "fentry" => Ok(Self::Fentry),
            other => Err(format!(
                "unknown hook set {other:?}: auto, tracepoint, fast or fentry"
            )),
        }
    }
}

/// The hook set in use for file opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileOpenSet {
    /// `lsm/file_open`.
    Lsm,
    /// `fentry/security_file_open`.
    Fentry,
    /// `syscalls/sys_{enter,exit}_{openat,openat2,open,creat}`.
    Tracepoint,
}

/// The set chosen and why, for `check` and the log.
#[derive(Clone, Debug, Serialize)]
pub struct FileOpenHooks {
    pub set: FileOpenSet,
    pub reason: String,
}

impl FileOpenHooks {
    /// "lsm file_open (bpf in /sys/kernel/security/lsm)".
    pub fn describe(&self) -> String {
        let set = match self.set {
            FileOpenSet::Lsm => "lsm file_open",
            FileOpenSet::Fentry => "fentry security_file_open",
            FileOpenSet::Tracepoint => "tracepoints openat, openat2, open, creat",
        };
        format!("{set} ({})", self.reason)
    }
}

/// The open tracepoints the fast set replaces (the rename, unlink and link ones stay).
pub(super) const OPEN_TRACEPOINTS: [&str; 8] = [
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

impl FileLayout {
    pub fn from_btf(btf: &KernelBtf) -> Result<Self, String> {
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
    pub(super) fn set_globals<'a>(&'a self, loader: &mut EbpfLoader<'a>) {
        static KNOWN: u32 = 1;
        let known = &KNOWN;
        for (name, value) in [
            ("FILE_F_PATH", &self.file_f_path),
            ("FILE_F_FLAGS", &self.file_f_flags),
            ("FILE_F_MODE", &self.file_f_mode),
            ("PATH_DENTRY", &self.path_dentry),
            ("DENTRY_D_PARENT", &self.dentry_d_parent),
            ("DENTRY_D_NAME", &self.dentry_d_name),
            ("FILE_LAYOUT_KNOWN", known),
        ] {
            loader.override_global(name, value, true);
        }
    }
}

const LSM_LIST: &str = "/sys/kernel/security/lsm";

/// Whether `bpf` is among the active LSMs. Without it an LSM program loads and attaches and never
/// runs.
fn bpf_lsm_active() -> Result<(), String> {
    match std::fs::read_to_string(LSM_LIST) {
        Ok(list) if list.trim().split(',').any(|l| l == "bpf") => Ok(()),
        Ok(list) => Err(format!("bpf not in {LSM_LIST}: {}", list.trim())),
        Err(e) => Err(format!("{LSM_LIST}: {e}")),
    }
}

/// Attaches the file-open hooks per `choice`: LSM if `bpf` is an active LSM and the program
/// loads, else fentry, else neither (the caller attaches the tracepoints). Returns the set (its
/// reason says why the others were not taken) and the status of the fast program attached.
pub(super) fn attach(
    ebpf: &mut Ebpf,
    choice: HookChoice,
    layout: &Result<FileLayout, String>,
    links: &mut super::links::LinkPins,
) -> (FileOpenHooks, Vec<ProbeStatus>) {
    let tracepoints = |reason: String| {
        (
            FileOpenHooks {
                set: FileOpenSet::Tracepoint,
                reason,
            },
            Vec::new(),
        )
    };
    if choice == HookChoice::Tracepoint {
        return tracepoints("asked for: --hooks tracepoint".into());
    }
    if let Err(reason) = layout {
        return tracepoints(format!(
            "struct file layout not in the kernel's BTF: {reason}"
        ));
    }
    let btf = match Btf::from_sys_fs() {
        Ok(btf) => btf,
        Err(e) => return tracepoints(format!("kernel BTF: {}", error_chain(&e))),
    };
    let lsm = if choice == HookChoice::Fentry {
        Err("not tried: --hooks fentry".to_owned())
    } else {
        bpf_lsm_active()
    }
    .and_then(|()| {
        attach_program(ebpf, "lsm_file_open", &btf, links, |p: &mut Lsm, btf| {
            p.load("file_open", btf)
        })
    });
    if lsm.is_ok() {
        return (
            FileOpenHooks {
                set: FileOpenSet::Lsm,
                reason: format!("bpf in {LSM_LIST}"),
            },
            vec![status("lsm_file_open", "lsm:file_open", &lsm)],
        );
    }
    let fentry = attach_program(
        ebpf,
        "fentry_file_open",
        &btf,
        links,
        |p: &mut FEntry, btf| p.load("security_file_open", btf),
    );
    let lsm_reason = lsm.err().unwrap_or_default();
    match fentry {
        Ok(()) => (
            FileOpenHooks {
                set: FileOpenSet::Fentry,
                reason: format!("fentry loads; lsm: {lsm_reason}"),
            },
            vec![status(
                "fentry_file_open",
                "fentry:security_file_open",
                &Ok(()),
            )],
        ),
        Err(fentry_reason) => {
            let (mut hooks, _) = tracepoints(format!("lsm: {lsm_reason}; fentry: {fentry_reason}"));
            if matches!(choice, HookChoice::Fast | HookChoice::Fentry) {
                hooks.reason = format!("--hooks fast, but neither loads: {}", hooks.reason);
            }
            (hooks, Vec::new())
        }
    }
}

fn status(program: &str, target: &str, result: &Result<(), String>) -> ProbeStatus {
    ProbeStatus {
        sensor: "file access",
        program: program.to_owned(),
        target: target.to_owned(),
        required: false,
        state: match result {
            Ok(()) => ProbeState::Attached,
            Err(reason) => ProbeState::Absent(reason.clone()),
        },
    }
}

/// Loads (with `load`) and attaches one BTF program; pins its link.
fn attach_program<P>(
    ebpf: &mut Ebpf,
    name: &str,
    btf: &Btf,
    links: &mut super::links::LinkPins,
    load: impl FnOnce(&mut P, &Btf) -> Result<(), aya::programs::ProgramError>,
) -> Result<(), String>
where
    P: AttachBtf,
    for<'a> &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| format!("program {name} is not in the object"))?;
    let p: &mut P = program.try_into().map_err(|e| format!("{name}: {e}"))?;
    load(p, btf).map_err(|e| verifier_reason(name, &e))?;
    p.attach_link().map_err(|e| error_chain(&e))?;
    links.pin_new(name, 0, p.program_id());
    Ok(())
}

/// The two BTF program kinds, attached alike.
pub(super) trait AttachBtf {
    fn attach_link(&mut self) -> Result<(), aya::programs::ProgramError>;
    fn program_id(&self) -> Option<u32>;
}

impl AttachBtf for Lsm {
    fn attach_link(&mut self) -> Result<(), aya::programs::ProgramError> {
        self.attach().map(|_| ())
    }
    fn program_id(&self) -> Option<u32> {
        self.info().map(|i| i.id()).ok()
    }
}

impl AttachBtf for FEntry {
    fn attach_link(&mut self) -> Result<(), aya::programs::ProgramError> {
        self.attach().map(|_| ())
    }
    fn program_id(&self) -> Option<u32> {
        self.info().map(|i| i.id()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_choices_parse_and_unknown_ones_say_what_is_allowed() {
        assert_eq!("auto".parse(), Ok(HookChoice::Auto));
        assert_eq!("tracepoint".parse(), Ok(HookChoice::Tracepoint));
        assert_eq!("fast".parse(), Ok(HookChoice::Fast));
        let err = "lsm".parse::<HookChoice>().unwrap_err();
        assert_eq!("fentry".parse(), Ok(HookChoice::Fentry));
        assert!(err.contains("auto, tracepoint, fast or fentry"), "{err}");
    }

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
