//! Probes that outlive the agent: every attachment pinned on bpffs under `<pin dir>/links/`, one
//! pin per program and hook.
//!
//! A link whose pin stays keeps its program attached after the agent's process is gone. So:
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

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use aya::programs::links::FdLink;

/// The links of one agent's probes (pinned when it has a pin directory), and the pins an earlier
/// agent left.
#[derive(Debug, Default)]
pub struct LinkPins {
    /// `None`: nothing is pinned, the links live and die with this sensor (tests).
    dir: Option<PathBuf>,
    /// Held links with their pins.
    pinned: Vec<(FdLink, PathBuf)>,
    /// Links that could not be pinned (or without a pin directory): attached for this agent's
    /// life only; and the first reason.
    unpinned: Vec<FdLink>,
    refusal: Option<String>,
    /// Pins found at start (an earlier agent's), by file name; removed as they are replaced.
    earlier: BTreeSet<String>,
    /// How many of the earlier agent's probes this one took over.
    replaced: usize,
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

    /// Pins `link` (program `program`, its hook number `hook`) in place of the earlier agent's
    /// pin of the same probe, which detaches. A link that cannot be pinned stays attached for
    /// this agent's life only (`refused` says why).
    pub fn pin(&mut self, program: &str, hook: usize, link: Result<FdLink, String>) {
        let Some(dir) = &self.dir else {
            self.unpinned.extend(link.ok());
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
        let pinned = link.and_then(|link| match pin(&link, &path) {
            Ok(()) => {
                self.pinned.push((link, path));
                Ok(())
            }
            Err(reason) => {
                self.unpinned.push(link);
                Err(reason)
            }
        });
        if let Err(reason) = pinned {
            self.refusal
                .get_or_insert_with(|| format!("{program}: {reason}"));
        }
    }

    /// How many probes could not be pinned, and the first reason.
    pub fn refused(&self) -> Option<(usize, &str)> {
        let n = self.unpinned.len();
        self.refusal.as_deref().map(|r| (n, r))
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

    /// Removes every pin: the probes detach once this agent's handles are closed.
    pub fn unpin_all(&mut self) -> usize {
        let mut n = 0;
        for (_, path) in self.pinned.drain(..) {
            match std::fs::remove_file(&path) {
                Ok(()) => n += 1,
                Err(error) => tracing::warn!(path = %path.display(), %error,
                    "a probe's pin could not be removed"),
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

/// `bpf(2)` commands used here (uapi `enum bpf_cmd`).
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;

/// Pins `link` at `path` through a descriptor of its own (by the link's id), so that `link` is
/// still held when the kernel refuses: aya's `FdLink::pin` consumes the link, and a refused pin
/// would detach the probe.
fn pin(link: &FdLink, path: &Path) -> Result<(), String> {
    let id = link
        .info()
        .map_err(|e| format!("link id: {}", super::attach::error_chain(&e)))?
        .id();
    // `union bpf_attr`, zeroed: the fields of each command at their uapi offsets.
    let mut attr = [0u64; 8];
    attr[0] = u64::from(id);
    // SAFETY: bpf(2) reads `size` bytes of `attr`, which we own; the returned fd is owned below.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_GET_FD_BY_ID,
            attr.as_mut_ptr(),
            size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(format!(
            "BPF_LINK_GET_FD_BY_ID: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: a new descriptor the kernel just gave us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let c_path =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    let mut attr = [0u64; 8];
    attr[0] = c_path.as_ptr() as u64;
    attr[1] = fd.as_raw_fd() as u32 as u64;
    // SAFETY: as above; `c_path` outlives the call.
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
