//! Hook sets: for each probe family that has one, a BPF LSM hook, else an fentry program on the
//! same `security_*` function, else the family's syscall tracepoints, chosen at start-up per
//! family (`--hooks auto|tracepoint|fast|fentry`, default `auto`). Both sets of a family send the
//! same events; `runner-monitor check` prints the set of each family with its reason.
//!
//! The families: file opens (`file_hooks.rs`), process memory access and signals
//! (`task_hooks.rs`), packet sockets (`PACKET_SOCKETS`). The LSM and fentry programs watch and
//! return 0, but for one: the LSM `socket_create` refuses a packet socket to a job in block mode
//! (the tracepoint and fentry sets can only report it).

use aya::{
    Btf, Ebpf,
    programs::{FEntry, Lsm},
};
use serde::Serialize;

use super::{
    ProbeState, ProbeStatus,
    attach::{error_chain, verifier_reason},
};

/// What the operator asked for, for every family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HookChoice {
    /// LSM, else fentry, else the tracepoints.
    #[default]
    Auto,
    /// The syscall tracepoints, even where the kernel allows more (tests, benchmarks).
    Tracepoint,
    /// LSM or fentry for every family; the agent does not start without them.
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

/// The probe families that have a hook set to choose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HookFamily {
    FileOpens,
    ProcessMemory,
    Signals,
    PacketSockets,
}

impl HookFamily {
    /// As `check` prints it.
    pub fn label(self) -> &'static str {
        match self {
            Self::FileOpens => "file opens",
            Self::ProcessMemory => "process memory",
            Self::Signals => "signals",
            Self::PacketSockets => "packet sockets",
        }
    }

    /// The key in `check --json`'s `hook_sets`.
    pub fn key(self) -> &'static str {
        match self {
            Self::FileOpens => "file_opens",
            Self::ProcessMemory => "process_memory",
            Self::Signals => "signals",
            Self::PacketSockets => "packet_sockets",
        }
    }
}

/// The hook set in use for a family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HookSet {
    /// The family's BPF LSM hook.
    Lsm,
    /// fentry on the family's `security_*` function.
    Fentry,
    /// The family's syscall tracepoints.
    Tracepoint,
}

/// A family's hooks: its programs and what they attach to.
pub(super) struct Family {
    pub family: HookFamily,
    /// `ProbeStatus::sensor` of its programs.
    pub sensor: &'static str,
    /// (program, LSM hook).
    pub lsm: (&'static str, &'static str),
    /// (program, kernel function).
    pub fentry: (&'static str, &'static str),
    /// The tracepoints (names under `syscalls/`) the fast set replaces.
    pub tracepoints: &'static [&'static str],
    /// Their syscalls, as `check` names the tracepoint set: "ptrace, process_vm_readv".
    pub syscalls: &'static str,
}

/// Packet sockets (`AF_PACKET`, which no address hook sees): LSM `socket_create`, which can
/// refuse them in block mode (`runner-monitor-ebpf/src/sockets.rs`).
pub(super) const PACKET_SOCKETS: Family = Family {
    family: HookFamily::PacketSockets,
    sensor: "connect",
    lsm: ("lsm_socket_create", "socket_create"),
    fentry: ("fentry_socket_create", "security_socket_create"),
    tracepoints: &["sys_enter_socket"],
    syscalls: "socket",
};

/// The set chosen for a family and why, for `check` and the log.
#[derive(Clone, Debug, Serialize)]
pub struct FamilyHooks {
    #[serde(skip)]
    pub family: HookFamily,
    pub set: HookSet,
    pub reason: String,
    /// "lsm file_open", "fentry security_file_open", "tracepoints openat, ...".
    #[serde(skip)]
    what: String,
}

impl FamilyHooks {
    /// "lsm file_open (bpf in /sys/kernel/security/lsm)".
    pub fn describe(&self) -> String {
        format!("{} ({})", self.what, self.reason)
    }
}

/// Where the fast programs read kernel structs: known, or why not (then the family keeps its
/// tracepoints).
pub(super) type Prerequisite = Result<(), String>;

const LSM_LIST: &str = "/sys/kernel/security/lsm";

/// Whether `bpf` is among the active LSMs. Without it an LSM program loads and attaches and never
/// runs.
pub fn bpf_lsm_active() -> Result<(), String> {
    match std::fs::read_to_string(LSM_LIST) {
        Ok(list) if list.trim().split(',').any(|l| l == "bpf") => Ok(()),
        Ok(list) => Err(format!("bpf not in {LSM_LIST}: {}", list.trim())),
        Err(e) => Err(format!("{LSM_LIST}: {e}")),
    }
}

/// What the families chose: their sets, the fast programs' statuses, and the tracepoints that
/// are left alone because a fast set replaces them.
pub(super) struct Chosen {
    pub sets: Vec<FamilyHooks>,
    pub probes: Vec<ProbeStatus>,
    pub skip: Vec<&'static str>,
}

/// Attaches each family's hooks per `choice`: LSM if `bpf` is an active LSM and the program
/// loads, else fentry, else neither (the caller attaches the tracepoints).
pub(super) fn attach(
    ebpf: &mut Ebpf,
    choice: HookChoice,
    families: &[(&Family, Prerequisite)],
    links: &mut super::links::LinkPins,
) -> Chosen {
    let mut chosen = Chosen {
        sets: Vec::new(),
        probes: Vec::new(),
        skip: Vec::new(),
    };
    // Parsed once for all families (slow in a debug build).
    let btf = (choice != HookChoice::Tracepoint)
        .then(|| Btf::from_sys_fs().map_err(|e| format!("kernel BTF: {}", error_chain(&e))));
    let lsm_active = match choice {
        HookChoice::Fentry => Err("not tried: --hooks fentry".to_owned()),
        _ => bpf_lsm_active(),
    };
    for (family, prerequisite) in families {
        let (set, probe) = attach_family(
            ebpf,
            choice,
            family,
            prerequisite,
            btf.as_ref(),
            &lsm_active,
            links,
        );
        tracing::info!(hooks = %set.describe(), "{}", family.family.label());
        if set.set != HookSet::Tracepoint {
            chosen.skip.extend(family.tracepoints.iter().copied());
        }
        chosen.sets.push(set);
        chosen.probes.extend(probe);
    }
    chosen
}

fn attach_family(
    ebpf: &mut Ebpf,
    choice: HookChoice,
    family: &Family,
    prerequisite: &Prerequisite,
    btf: Option<&Result<Btf, String>>,
    lsm_active: &Result<(), String>,
    links: &mut super::links::LinkPins,
) -> (FamilyHooks, Option<ProbeStatus>) {
    let tracepoints = |reason: String| {
        (
            FamilyHooks {
                family: family.family,
                set: HookSet::Tracepoint,
                reason,
                what: format!("tracepoints {}", family.syscalls),
            },
            None,
        )
    };
    let btf = match (btf, prerequisite) {
        (None, _) => return tracepoints("asked for: --hooks tracepoint".into()),
        (_, Err(reason)) => {
            return tracepoints(format!("kernel layout not in its BTF: {reason}"));
        }
        (Some(Err(reason)), _) => return tracepoints(reason.clone()),
        (Some(Ok(btf)), Ok(())) => btf,
    };
    let (lsm_program, hook) = family.lsm;
    let lsm = lsm_active.clone().and_then(|()| {
        attach_program(ebpf, lsm_program, btf, links, |p: &mut Lsm, btf| {
            p.load(hook, btf)
        })
    });
    if lsm.is_ok() {
        return (
            FamilyHooks {
                family: family.family,
                set: HookSet::Lsm,
                reason: format!("bpf in {LSM_LIST}"),
                what: format!("lsm {hook}"),
            },
            Some(status(family.sensor, lsm_program, &format!("lsm:{hook}"))),
        );
    }
    let (fentry_program, function) = family.fentry;
    let fentry = attach_program(ebpf, fentry_program, btf, links, |p: &mut FEntry, btf| {
        p.load(function, btf)
    });
    let lsm_reason = lsm.err().unwrap_or_default();
    match fentry {
        Ok(()) => (
            FamilyHooks {
                family: family.family,
                set: HookSet::Fentry,
                reason: format!("fentry loads; lsm: {lsm_reason}"),
                what: format!("fentry {function}"),
            },
            Some(status(
                family.sensor,
                fentry_program,
                &format!("fentry:{function}"),
            )),
        ),
        Err(fentry_reason) => {
            let (mut hooks, _) = tracepoints(format!("lsm: {lsm_reason}; fentry: {fentry_reason}"));
            if matches!(choice, HookChoice::Fast | HookChoice::Fentry) {
                hooks.reason = format!("--hooks fast, but neither loads: {}", hooks.reason);
            }
            (hooks, None)
        }
    }
}

fn status(sensor: &'static str, program: &str, target: &str) -> ProbeStatus {
    ProbeStatus {
        sensor,
        program: program.to_owned(),
        target: target.to_owned(),
        required: false,
        state: ProbeState::Attached,
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
        assert_eq!("fentry".parse(), Ok(HookChoice::Fentry));
        let err = "lsm".parse::<HookChoice>().unwrap_err();
        assert!(err.contains("auto, tracepoint, fast or fentry"), "{err}");
    }
}
