//! Which program goes where, and attaching them with a clear report of what did not.

use std::{
    fs::File,
    os::fd::{AsFd as _, AsRawFd as _},
    path::PathBuf,
};

use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, TracePoint,
    },
};

use super::links::LinkPins;
use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "reason")]
pub enum ProbeState {
    Attached,
    /// The hook does not exist on this kernel or architecture (e.g. `open` on arm64).
    Absent(String),
    Failed(String),
}

#[derive(Clone, Debug, Serialize)]
pub struct ProbeStatus {
    /// What the probe sees, e.g. "file access".
    pub sensor: &'static str,
    pub program: String,
    /// Tracepoint `category/name`, or `cgroup:<path>:<attach type>`.
    pub target: String,
    /// Without it the agent does not start.
    pub required: bool,
    pub state: ProbeState,
}

use super::probes::{Hook, PROBES};

/// Where tracefs can be, in the order it is looked for.
pub const TRACEFS_DIRS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// Where tracefs is; mounts it when nothing has.
pub fn ensure_tracefs() -> Result<PathBuf, String> {
    for dir in TRACEFS_DIRS {
        match std::fs::metadata(std::path::Path::new(dir).join("events")) {
            Ok(meta) if meta.is_dir() => return Ok(dir.into()),
            // tracefs is root-only: mounted, but this unprivileged agent cannot look in.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(format!(
                    "tracefs at {dir} is not readable ({e}): CAP_DAC_READ_SEARCH is needed"
                ));
            }
            _ => {}
        }
    }
    let target = c"/sys/kernel/tracing";
    // SAFETY: mount(2) with static NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            c"tracefs".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "tracefs is not mounted and mounting it at /sys/kernel/tracing failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok("/sys/kernel/tracing".into())
}

pub use crate::cgroups::cgroup2_root;

/// Offset of `group_dead` in the `sched:sched_process_exit` record, from its tracefs `format`
/// (`field:bool group_dead;\toffset:32;\tsize:1;\tsigned:0;`); `None` when the kernel's record
/// has no such field (before Linux 6.16 or so: Debian 12's 6.1 and 6.12 have none).
pub fn exit_group_dead_offset() -> Option<u32> {
    let tracefs = ensure_tracefs().ok()?;
    let format =
        std::fs::read_to_string(tracefs.join("events/sched/sched_process_exit/format")).ok()?;
    format_field_offset(&format, "group_dead")
}

fn format_field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let mut parts = line.trim().split(';');
        let decl = parts.next()?.strip_prefix("field:")?;
        if decl.split_whitespace().last()? != field {
            return None;
        }
        parts.find_map(|p| p.trim().strip_prefix("offset:")?.parse().ok())
    })
}

fn tracepoint_exists(tracefs: &std::path::Path, category: &str, name: &str) -> bool {
    tracefs.join("events").join(category).join(name).is_dir()
}

/// The file syscalls' entry programs: each jumps to `file_enter` (a tail call through the map
/// `FILE_ENTER`), which does their work; one verification of it instead of thirteen.
const FILE_ENTRY_PROGRAMS: [&str; 13] = [
    "sys_enter_openat",
    "sys_enter_openat2",
    "sys_enter_open",
    "sys_enter_creat",
    "sys_enter_rename",
    "sys_enter_renameat",
    "sys_enter_renameat2",
    "sys_enter_unlink",
    "sys_enter_unlinkat",
    "sys_enter_link",
    "sys_enter_linkat",
    "sys_enter_symlink",
    "sys_enter_symlinkat",
];

/// The program the file syscalls' entry programs jump to, and the table they jump through.
const FILE_ENTER_PROGRAM: &str = "file_enter";
const FILE_ENTER_MAP: &str = "FILE_ENTER";

/// Loads `file_enter` and puts it in `FILE_ENTER` before any entry program is attached (an
/// empty slot would make them see nothing), pinned beside the probes (`links.rs`).
fn fill_file_enter(ebpf: &mut Ebpf, links: &mut LinkPins) -> Result<(), String> {
    let program: &mut TracePoint = ebpf
        .program_mut(FILE_ENTER_PROGRAM)
        .ok_or_else(|| format!("program {FILE_ENTER_PROGRAM} is not in the object"))?
        .try_into()
        .map_err(|e| format!("{FILE_ENTER_PROGRAM}: {e}"))?;
    if program.fd().is_err() {
        program
            .load()
            .map_err(|e| verifier_reason(FILE_ENTER_PROGRAM, &e))?;
    }
    let fd = program
        .fd()
        .and_then(|fd| fd.try_clone().map_err(Into::into))
        .map_err(|e| format!("{FILE_ENTER_PROGRAM}: {e}"))?;
    fill_table(ebpf, FILE_ENTER_MAP, "file_enter_calls", &fd, links)
}

/// Puts the loaded program `fd` in slot 0 of the tail-call table `map_name`, pinned beside the
/// probes as `pin` (`links.rs`): a table loses its entries once no process holds it, and the
/// programs that jump through it would see nothing while no agent runs.
pub(super) fn fill_table(
    ebpf: &mut Ebpf,
    map_name: &str,
    pin: &str,
    fd: &aya::programs::ProgramFd,
    links: &mut LinkPins,
) -> Result<(), String> {
    use aya::maps::{Map, ProgramArray};
    let map = ebpf
        .map_mut(map_name)
        .ok_or_else(|| format!("map {map_name} is not in the object"))?;
    if let Map::ProgramArray(data) = &*map {
        let id = data.info().map(|i| i.id()).unwrap_or(0);
        links.pin_map(pin, data.fd().as_fd().as_raw_fd(), id);
    }
    let mut table = ProgramArray::try_from(map).map_err(|e| format!("{map_name}: {e}"))?;
    table.set(0, fd, 0).map_err(|e| format!("{map_name}: {e}"))
}

/// Loads the programs `attach_all` is about to attach, several at a time: the kernel's verifier
/// takes most of an agent's start (about half a second for each file-syscall program here, 9 s
/// for all of them one after the other) and runs on the calling CPU, so loads on every CPU
/// divide it. Best effort: a program that fails to load here is loaded again by `attach_one`,
/// which reports why.
fn preload(ebpf: &mut Ebpf, skip: &[&str], tracefs: &Result<PathBuf, String>, cgroup: bool) {
    use aya::programs::Program;
    let ready = |hook: &Hook| match hook {
        Hook::Tracepoint(category, name) | Hook::OptionalTracepoint(category, name) => {
            !skip.contains(name)
                && tracefs
                    .as_ref()
                    .is_ok_and(|dir| tracepoint_exists(dir, category, name))
        }
        Hook::SockAddr | Hook::SockCreate | Hook::Skb(_) => cgroup,
    };
    let mut wanted: Vec<&str> = PROBES
        .iter()
        .filter(|probe| probe.hooks.iter().any(ready))
        .map(|probe| probe.program)
        .collect();
    if wanted.iter().any(|p| FILE_ENTRY_PROGRAMS.contains(p)) {
        wanted.push(FILE_ENTER_PROGRAM);
    }
    let started = std::time::Instant::now();
    let programs: Vec<&mut Program> = ebpf
        .programs_mut()
        .filter(|(name, _)| wanted.contains(name))
        .map(|(_, p)| p)
        .collect();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8));
    // A queue, not fixed shares: a few programs take most of the time.
    let queue = std::sync::Mutex::new(programs.into_iter());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let next = queue
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .next();
                    let Some(program) = next else { break };
                    // Errors are reported by `attach_one`, which loads it again.
                    let _ = match program {
                        Program::TracePoint(p) => p.load(),
                        Program::CgroupSkb(p) => p.load(),
                        Program::CgroupSock(p) => p.load(),
                        Program::CgroupSockAddr(p) => p.load(),
                        _ => Ok(()),
                    };
                }
            });
        }
    });
    tracing::debug!(elapsed = ?started.elapsed(), programs = wanted.len(), threads, "programs loaded");
}

/// Loads and attaches every probe; never fails as a whole: each probe reports its state. With
/// a pin directory in `links`, every attachment is pinned (`links.rs`) in place of an earlier agent's.
/// Tracepoints named in `skip` are left alone (the open ones, when `file_hooks` attached the
/// fast set); a probe with every hook skipped is not listed.
pub fn attach_all(ebpf: &mut Ebpf, links: &mut LinkPins, skip: &[&str]) -> Vec<ProbeStatus> {
    let tracefs = ensure_tracefs();
    let cgroup = cgroup2_root();
    let cgroup_name = cgroup
        .as_ref()
        .map_or("?".into(), |p| p.display().to_string());
    preload(ebpf, skip, &tracefs, cgroup.is_some());
    let file_enter = fill_file_enter(ebpf, links);
    let mut out = Vec::new();
    for probe in PROBES {
        let mut loaded: Result<(), String> = Ok(());
        for (index, hook) in probe.hooks.iter().enumerate() {
            if let Hook::Tracepoint(_, name) | Hook::OptionalTracepoint(_, name) = hook
                && skip.contains(name)
            {
                continue;
            }
            let target = match hook {
                Hook::Tracepoint(c, n) | Hook::OptionalTracepoint(c, n) => format!("{c}/{n}"),
                Hook::SockAddr => format!("cgroup:{cgroup_name}"),
                Hook::SockCreate => format!("cgroup:{cgroup_name}:sock_create"),
                Hook::Skb(CgroupSkbAttachType::Ingress) => format!("cgroup:{cgroup_name}:ingress"),
                Hook::Skb(CgroupSkbAttachType::Egress) => format!("cgroup:{cgroup_name}:egress"),
            };
            if let Err(reason) = &file_enter
                && FILE_ENTRY_PROGRAMS.contains(&probe.program)
            {
                loaded = Err(reason.clone());
            }
            let state = match &loaded {
                Err(reason) => ProbeState::Failed(reason.clone()),
                Ok(()) => {
                    match attach_one(ebpf, probe.program, hook, &tracefs, cgroup.as_deref()) {
                        Ok(Attached::Yes(program_id)) => {
                            links.pin_new(probe.program, index, program_id);
                            ProbeState::Attached
                        }
                        Ok(Attached::No(state)) => state,
                        Err(LoadError(reason)) => {
                            loaded = Err(reason.clone());
                            ProbeState::Failed(reason)
                        }
                    }
                }
            };
            match &state {
                ProbeState::Attached => {
                    tracing::debug!(program = probe.program, %target, "attached")
                }
                ProbeState::Absent(reason) => {
                    tracing::debug!(program = probe.program, %target, %reason, "hook absent")
                }
                ProbeState::Failed(reason) => {
                    tracing::warn!(program = probe.program, %target, %reason, "probe not attached")
                }
            }
            out.push(ProbeStatus {
                sensor: probe.sensor,
                program: probe.program.to_owned(),
                target,
                required: probe.required && !matches!(hook, Hook::OptionalTracepoint(..)),
                state,
            });
        }
    }
    out
}

/// The program did not load: every later hook of it fails with the same reason.
struct LoadError(String);

/// Attached (the program's id, to find its new link), or not, and why.
pub(super) enum Attached {
    Yes(Option<u32>),
    No(ProbeState),
}

/// Loads `program` (once) as a `$kind` and attaches it with `$attach`. The link stays with the
/// program; `LinkPins` pins it by its descriptor.
macro_rules! load_attach {
    ($program:expr, $name:expr, $kind:ty, |$p:ident| $attach:expr) => {{
        let $p: &mut $kind = $program
            .try_into()
            .map_err(|e| LoadError(format!("{}: {e}", $name)))?;
        if $p.fd().is_err() {
            $p.load()
                .map_err(|e| LoadError(verifier_reason($name, &e)))?;
        }
        match $attach {
            Ok(_) => Attached::Yes($p.info().map(|i| i.id()).ok()),
            Err(e) => Attached::No(ProbeState::Failed(error_chain(&e))),
        }
    }};
}

fn attach_one(
    ebpf: &mut Ebpf,
    name: &str,
    hook: &Hook,
    tracefs: &Result<PathBuf, String>,
    cgroup: Option<&std::path::Path>,
) -> Result<Attached, LoadError> {
    let Some(program) = ebpf.program_mut(name) else {
        return Err(LoadError(format!("program {name} is not in the object")));
    };
    match hook {
        Hook::Tracepoint(category, tp) | Hook::OptionalTracepoint(category, tp) => {
            let tracefs = match tracefs {
                Ok(dir) => dir,
                Err(reason) => return Ok(Attached::No(ProbeState::Failed(reason.clone()))),
            };
            if !tracepoint_exists(tracefs, category, tp) {
                let reason = format!("no tracepoint {category}/{tp} on this kernel");
                return Ok(Attached::No(
                    if matches!(hook, Hook::OptionalTracepoint(..)) {
                        ProbeState::Absent(reason)
                    } else {
                        ProbeState::Failed(reason)
                    },
                ));
            }
            Ok(load_attach!(program, name, TracePoint, |p| p.attach(category, tp)))
        }
        Hook::SockAddr | Hook::SockCreate | Hook::Skb(_) => {
            let Some(cgroup) = cgroup else {
                return Ok(Attached::No(ProbeState::Failed(
                    "no cgroup v2 hierarchy is mounted".into(),
                )));
            };
            let file = match File::open(cgroup) {
                Ok(f) => f,
                Err(e) => {
                    return Ok(Attached::No(ProbeState::Failed(format!(
                        "{}: {e}",
                        cgroup.display()
                    ))));
                }
            };
            // Single: with a bpf_link (Linux 5.7+) the kernel always allows other programs
            // beside ours (an earlier agent's, being replaced); ALLOW_MULTI is rejected for links.
            let single = CgroupAttachMode::Single;
            Ok(match hook {
                Hook::Skb(attach_type) => load_attach!(program, name, CgroupSkb, |p| p.attach(
                    &file,
                    *attach_type,
                    single
                )),
                Hook::SockCreate => {
                    load_attach!(program, name, CgroupSock, |p| p.attach(&file, single))
                }
                _ => load_attach!(program, name, CgroupSockAddr, |p| p.attach(&file, single)),
            })
        }
    }
}

pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// A load error with the verifier's last lines, which say why.
pub(super) fn verifier_reason(name: &str, error: &aya::programs::ProgramError) -> String {
    if let aya::programs::ProgramError::LoadError {
        io_error,
        verifier_log,
    } = error
    {
        let log = verifier_log.to_string();
        if log.trim().is_empty() {
            return format!("{name} failed to load: {io_error}");
        }
        let tail: Vec<&str> = log.lines().rev().take(12).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return format!(
            "{name} failed to load: {io_error}; verifier: {}",
            tail.join(" | ")
        );
    }
    format!("{name} failed to load: {}", error_chain(error))
}

#[cfg(test)]
mod format_tests {
    #[test]
    fn group_dead_offset_is_read_from_the_format_and_absent_on_older_records() {
        let new = "\tfield:pid_t pid;\toffset:24;\tsize:4;\tsigned:1;\n\
                   \tfield:bool group_dead;\toffset:32;\tsize:1;\tsigned:0;\n";
        assert_eq!(super::format_field_offset(new, "group_dead"), Some(32));
        assert_eq!(super::format_field_offset(new, "pid"), Some(24));
        let old = "\tfield:pid_t pid;\toffset:24;\tsize:4;\tsigned:1;\n\
                   \tfield:int prio;\toffset:28;\tsize:4;\tsigned:1;\n";
        assert_eq!(super::format_field_offset(old, "group_dead"), None);
    }
}
