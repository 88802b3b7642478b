//! `systemctl restart` without a blind moment: the probes' links and the ring buffer also live in
//! systemd's file descriptor store (`FileDescriptorStoreMax=` in the unit).
//!
//! A stopping agent (`SIGTERM`) always removes its bpffs pins. What keeps the probes attached
//! then is the store: systemd keeps it while the service restarts (a restart job, or an automatic
//! restart) and closes it once the service is stopped with no job queued (`systemctl stop`). So
//! the agent need not tell a restart from a stop: systemd does. A starting agent gets the stored
//! descriptors back (`LISTEN_FDS`), pins them where a crashed agent would have left its pins, and
//! takes them over the same way (`links.rs`); then it replaces them in the store with its own.
//! Outside systemd (no `NOTIFY_SOCKET`, or no store), this does nothing.

use std::{
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

use sd_notify::NotifyState;

/// Stored names: `link-<program>-<hook>` and the ring buffer's pin name (`events-<hash>`).
const LINK: &str = "link-";

/// Stored descriptors are not watched. systemd drops a stored descriptor that polls `EPOLLERR`,
/// and a BPF map without its own poll (the tail-call table, `file_enter_calls-<id>`) always does:
/// the store lost it at once, the table emptied when the stopping agent exited, and the file
/// probes saw nothing until the next agent started (systemd 246 and later).
const NO_POLL: &str = "FDPOLL=0";

/// Pins what systemd handed back (`LISTEN_FDS`, named) under `pin_dir`, unless something is
/// already pinned there (a crashed agent's pins); the ring buffer only when it is `events` (this
/// build's). Returns the names it got, to remove from the store once replaced.
pub fn restore(pin_dir: &Path, events: &str) -> Vec<String> {
    let Ok(fds) = sd_notify::listen_fds_with_names() else {
        return Vec::new();
    };
    let mut names = Vec::new();
    for (fd, name) in fds {
        // SAFETY: systemd passed this descriptor to this process; it is ours to close.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let path = if let Some(link) = name.strip_prefix(LINK) {
            Some(pin_dir.join("links").join(link))
        } else if name == events {
            Some(pin_dir.join(events))
        } else {
            None
        };
        if let Some(path) = path
            && !path.exists()
        {
            let _ = std::fs::create_dir_all(path.parent().unwrap_or(pin_dir));
            if let Err(error) = super::links::pin(fd.as_raw_fd(), &path) {
                tracing::warn!(%name, %error, "a stored probe could not be pinned back");
            }
        }
        names.push(name);
    }
    if !names.is_empty() {
        tracing::info!(
            descriptors = names.len(),
            "systemd handed back the probes of the agent before the restart"
        );
    }
    names
}

/// Replaces `earlier` (names `restore` returned) in systemd's store with this agent's probes and
/// ring buffer, opened from their pins under `pin_dir`. Nothing outside systemd.
pub fn store(pin_dir: &Path, events: &str, earlier: &[String]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    for name in earlier {
        let _ = sd_notify::notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(name)]);
    }
    let links = std::fs::read_dir(pin_dir.join("links"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            (
                format!("{LINK}{}", e.file_name().to_string_lossy()),
                e.path(),
            )
        });
    let mut stored = 0;
    for (name, path) in links.chain([(events.to_owned(), pin_dir.join(events))]) {
        let Some(fd) = open_pin(&path) else {
            continue;
        };
        // SAFETY: `fd` is open for the duration of the call.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) };
        match sd_notify::notify_with_fds(
            &[
                NotifyState::FdStore,
                NotifyState::FdName(&name),
                NotifyState::Custom(NO_POLL),
            ],
            &[borrowed],
        ) {
            Ok(()) => stored += 1,
            Err(error) => {
                tracing::warn!(%error, "systemd's file descriptor store refused the probes: \
                    `systemctl restart` leaves a blind moment");
                return;
            }
        }
    }
    tracing::info!(
        stored,
        "probes kept in systemd's file descriptor store: a restart keeps them attached"
    );
}

/// `bpf(BPF_OBJ_GET)` of the object pinned at `path`.
fn open_pin(path: &Path) -> Option<OwnedFd> {
    const BPF_OBJ_GET: libc::c_long = 7;
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    let mut attr = [0u64; 8];
    attr[0] = c_path.as_ptr() as u64;
    // SAFETY: bpf(2) reads `attr`, which we own; `c_path` outlives the call; the returned
    // descriptor is owned below.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            attr.as_mut_ptr(),
            size_of_val(&attr),
        )
    };
    // SAFETY: a new descriptor the kernel just gave us.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
