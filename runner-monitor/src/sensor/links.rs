//! Probes that outlive the agent: every attachment pinned on bpffs under `<pin dir>/links/`, one
//! pin per program and hook.
//!
//! The links stay with their programs (aya's); each new link is found among this process's
//! descriptors (`/proc/self/fd`, by its program's id) and pinned through that descriptor, which
//! needs no capability beyond the agent's. A link whose pin stays keeps its program attached after
//! the agent's process is gone. So:
//! - an agent that crashes (or is killed) leaves its probes recording into the pinned ring
//!   buffer, and block mode enforcing, until the next agent takes over;
//! - an agent that hands over (`SIGUSR2`) does the same on purpose;
//! - an agent that stops (`SIGTERM`) removes the pins: every probe detaches with it.
//!
//! The next agent attaches each of its own programs first and then removes the pin of the one it
//! replaces (the old program detaches), so no hook is ever without a program; for the moment
//! between the two an event can be reported twice, never missed. Pins of programs this build
//! does not have are removed once every probe is attached.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

/// The links of one agent's probes (pinned when it has a pin directory), and the pins an earlier
/// agent left.
#[derive(Debug, Default)]
pub struct LinkPins {
    /// `None`: nothing is pinned, the links live and die with this sensor (tests).
    dir: Option<PathBuf>,
    /// Pins made.
    pinned: Vec<PathBuf>,
    /// Links already pinned (or found not pinnable), by id.
    known: BTreeSet<u32>,
    /// Links that could not be pinned: attached for this agent's life only; and the first reason.
    unpinned: usize,
    refusal: Option<String>,
    /// Pins found at start (an earlier agent's), by file name; removed as they are replaced.
    earlier: BTreeSet<String>,
    /// How many of the earlier agent's probes this one took over.
    replaced: usize,
    /// Maps the pinned probes need (tail-call tables), pinned beside them.
    maps: Vec<PathBuf>,
}

impl LinkPins {
    /// The `links` directory of `pin_dir` (made when missing), and what an earlier agent left.
    pub fn open(pin_dir: &Path) -> std::io::Result<Self> {
        let dir = pin_dir.join("links");
        std::fs::create_dir_all(&dir)?;
        let earlier = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        Ok(Self {
            dir: Some(dir),
            earlier,
            ..Self::default()
        })
    }

    /// Whether an earlier agent's probes were still attached at start.
    pub fn took_over(&self) -> bool {
        self.replaced > 0 || !self.earlier.is_empty()
    }

    /// Pins the link program `program` (id `program_id`) just got for its hook number `hook`,
    /// in place of the earlier agent's pin of the same probe, which detaches. A link that cannot
    /// be pinned stays attached for this agent's life only (`refused` says why).
    pub fn pin_new(&mut self, program: &str, hook: usize, program_id: Option<u32>) {
        let Some(dir) = &self.dir else {
            return;
        };
        // No dots: bpffs refuses them in names (EPERM).
        let name = format!("{program}-{hook}");
        let path = dir.join(&name);
        if self.earlier.remove(&name) {
            match std::fs::remove_file(&path) {
                Ok(()) => self.replaced += 1,
                Err(e) => tracing::warn!(path = %path.display(), error = %e,
                    "an earlier agent's probe could not be detached"),
            }
        }
        let found = program_id
            .ok_or_else(|| "its program id is unknown".to_owned())
            .and_then(|id| {
                new_link(id, &self.known).ok_or_else(|| {
                    "no bpf_link for it (attached without one: a kernel before 5.15 for \
                     tracepoints?)"
                        .to_owned()
                })
            });
        let pinned = found.and_then(|(fd, link_id)| {
            self.known.insert(link_id);
            pin(fd, &path)
        });
        match pinned {
            Ok(()) => self.pinned.push(path),
            Err(reason) => {
                self.unpinned += 1;
                self.refusal
                    .get_or_insert_with(|| format!("{program}: {reason}"));
            }
        }
    }

    /// Pins a map the probes need while no agent runs: a tail-call table loses its entries once
    /// no process holds it, and the probes that jump through it would see nothing. Named
    /// `<name>-<map id>`, which no later agent's map has: to the next agent it is an earlier pin
    /// of a program it does not have, removed (`finish`) once its own probes replaced these.
    pub fn pin_map(&mut self, name: &str, fd: i32, map_id: u32) {
        let Some(dir) = &self.dir else {
            return;
        };
        let path = dir.join(format!("{name}-{map_id}"));
        match pin(fd, &path) {
            Ok(()) => self.maps.push(path),
            Err(reason) => {
                self.unpinned += 1;
                self.refusal
                    .get_or_insert_with(|| format!("{name}: {reason}"));
            }
        }
    }

    /// How many probes could not be pinned, and the first reason.
    pub fn refused(&self) -> Option<(usize, &str)> {
        self.refusal.as_deref().map(|r| (self.unpinned, r))
    }

    /// Removes the pins of the earlier agent's probes this build has not replaced (programs it
    /// no longer has): they detach. Returns how many of the earlier agent's probes were taken
    /// over and how many removed.
    pub fn finish(&mut self) -> (usize, usize) {
        let mut removed = 0;
        let Some(dir) = &self.dir else {
            return (0, 0);
        };
        for name in std::mem::take(&mut self.earlier) {
            let path = dir.join(&name);
            match std::fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(error) => tracing::warn!(path = %path.display(), %error,
                    "an earlier agent's probe could not be detached"),
            }
        }
        (self.replaced, removed)
    }

    /// Removes every pin: the probes detach once this agent's programs are closed.
    pub fn unpin_all(&mut self) -> usize {
        let mut n = 0;
        for path in self.pinned.drain(..) {
            match std::fs::remove_file(&path) {
                Ok(()) => n += 1,
                Err(error) => tracing::warn!(path = %path.display(), %error,
                    "a probe's pin could not be removed"),
            }
        }
        for path in self.maps.drain(..) {
            if let Err(error) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), %error, "a map's pin could not be removed");
            }
        }
        n
    }

    /// How many links are pinned.
    pub fn len(&self) -> usize {
        self.pinned.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pinned.is_empty()
    }
}

/// Removes every link pin under `pin_dir` (`--fresh-state`, uninstall): their probes detach.
pub fn remove(pin_dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(pin_dir.join("links")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// `bpf(2)`'s `BPF_OBJ_PIN` (uapi `enum bpf_cmd`).
const BPF_OBJ_PIN: libc::c_long = 6;

/// A `bpf_link` descriptor of this process for program `program_id` whose link id is not in
/// `known`: (descriptor, link id). From `/proc/self/fdinfo` (`link_id:`, `prog_id:`).
fn new_link(program_id: u32, known: &BTreeSet<u32>) -> Option<(i32, u32)> {
    let field = |info: &str, name: &str| -> Option<u32> {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    std::fs::read_dir("/proc/self/fd")
        .ok()?
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path())
                .is_ok_and(|target| target.as_os_str() == "anon_inode:bpf_link")
        })
        .find_map(|e| {
            let fd: i32 = e.file_name().to_str()?.parse().ok()?;
            let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
            let link = field(&info, "link_id:")?;
            (field(&info, "prog_id:")? == program_id && !known.contains(&link))
                .then_some((fd, link))
        })
}

/// Pins the link open as descriptor `fd` (aya's, borrowed) at `path`.
pub(super) fn pin(fd: i32, path: &Path) -> Result<(), String> {
    let c_path =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // `union bpf_attr` for BPF_OBJ_PIN: pathname, then bpf_fd; the rest zero.
    let mut attr = [0u64; 8];
    attr[0] = c_path.as_ptr() as u64;
    attr[1] = u64::from(fd as u32);
    // SAFETY: bpf(2) reads `size` bytes of `attr`, which we own; `c_path` outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_PIN,
            attr.as_mut_ptr(),
            size_of_val(&attr),
        )
    };
    if rc < 0 {
        return Err(format!("BPF_OBJ_PIN: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Detaches every program's links, several programs at a time. Each syscall tracepoint's detach
/// waits out the kernel's RCU grace periods (`tracepoint_synchronize_unregister`); one after the
/// other, ~60 probes made a clean stop take seconds.
pub(super) fn detach_all(ebpf: &mut aya::Ebpf) {
    use aya::programs::Program;
    let started = std::time::Instant::now();
    let mut programs: Vec<&mut Program> = ebpf.programs_mut().map(|(_, p)| p).collect();
    let per_thread = programs.len().div_ceil(DETACH_THREADS).max(1);
    std::thread::scope(|scope| {
        for part in programs.chunks_mut(per_thread) {
            scope.spawn(move || {
                for program in part {
                    // Errors say the program was not loaded or a link is already gone: either
                    // way nothing of it stays attached.
                    let _ = match program {
                        Program::TracePoint(p) => p.unload(),
                        Program::BtfTracePoint(p) => p.unload(),
                        Program::RawTracePoint(p) => p.unload(),
                        Program::CgroupSkb(p) => p.unload(),
                        Program::CgroupSock(p) => p.unload(),
                        Program::CgroupSockAddr(p) => p.unload(),
                        Program::FEntry(p) => p.unload(),
                        Program::Lsm(p) => p.unload(),
                        // Dropped with the object.
                        _ => Ok(()),
                    };
                }
            });
        }
    });
    tracing::debug!(elapsed = ?started.elapsed(), "every program detached");
}

/// Threads that detach programs at a stop.
const DETACH_THREADS: usize = 16;
