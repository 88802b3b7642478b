//! The host's path of a file a process opened in a mount namespace of its own (a container):
//! `/h/.aws/credentials` in a container started with `-v $HOME:/h` is `$HOME/.aws/credentials`
//! on the host. From the process's mount table (`/proc/<pid>/mountinfo`) the mount that holds
//! the path gives its device and the path within that file system; the host's mount table
//! (the agent's own) gives where that part of the file system is mounted on the host. The
//! answer is kept only when the host path leads to the very file the process reaches (same
//! device and inode through `/proc/<pid>/root`). A process already gone leaves the path as it
//! was seen, unless its container's table was read for an earlier event (kept per cgroup).

use std::{
    os::unix::fs::MetadataExt as _,
    time::{Duration, Instant},
};

use crate::bounded::BoundedMap;

/// One line of a mountinfo file: the file system's device, the mounted part of it, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Mount {
    device: String,
    root: String,
    point: String,
}

/// How long a mount table read is used before it is read again.
const FRESH: Duration = Duration::from_secs(2);

/// How long whether a process shares the agent's mounts is trusted before it is looked at again:
/// a process changes its mount namespace rarely (`unshare`, `setns`), and looking costs a
/// `statx` of its `/proc/<pid>/ns/mnt` per event, which was half the agent's CPU per event
/// under a job opening credentials as fast as it can.
const SHARES_FRESH: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct HostPaths {
    host: Option<(Instant, Vec<Mount>)>,
    /// cgroup id -> its processes' mount table, for events of processes already gone.
    containers: Option<BoundedMap<u64, (Instant, Vec<Mount>)>>,
    /// (pid, cgroup id) -> whether the process shares the agent's mount namespace, and when that
    /// was looked at.
    shares: Option<BoundedMap<(u32, u64), (Instant, bool)>>,
}

impl HostPaths {
    /// `path` as process `pid` (in cgroup `cgroup`) opened it, on the host; `None` when it is
    /// the same path there (the process shares the host's mounts) or cannot be told.
    /// `ppid`, its parent, answers for it when it is gone (a `cat` exits within a millisecond
    /// of its read) and the parent is still in the same cgroup: the container's shell.
    pub fn host_path(&mut self, pid: u32, ppid: u32, cgroup: u64, path: &str) -> Option<String> {
        if !path.starts_with('/') {
            return None;
        }
        // The process, else its parent in the same cgroup: the first whose mount namespace can
        // be read (a process that just exited, a zombie included, has none).
        let opener = match self.shares_mounts(pid, cgroup) {
            Some(shared) => Some((pid, shared)),
            None if ppid > 1
                && cgroup > 0
                && crate::cgroups::cgroup_of(ppid).is_ok_and(|c| c.id == cgroup) =>
            {
                self.shares_mounts(ppid, cgroup)
                    .map(|shared| (ppid, shared))
            }
            None => None,
        };
        let pid = match opener {
            Some((_, true)) => {
                // `/proc/<n>/root/...` opened on the host: the file as process `n` sees it.
                let (n, rest) = through_proc_root(path)?;
                return match self.shares_mounts(n, 0)? {
                    true => Some(rest.to_owned()),
                    false => self.translate(n, 0, rest),
                };
            }
            Some((reader, false)) => reader,
            // Neither: only a container whose table was read before can tell.
            None if self.knows(cgroup) => pid,
            None => return None,
        };
        self.translate(pid, cgroup, path)
    }

    /// Where the agent reaches the file process `pid` (in cgroup `cgroup`) reaches at `path`
    /// (a socket it connected to): `path` when the process shares the agent's mounts or cannot
    /// be looked at any more (gone: what it reached cannot be told), or when the same file is
    /// there; the file's host path when the process's own mounts put another file at `path` (a
    /// daemon's socket bound over `/var/run/docker.sock` in a container); `None` when the agent
    /// reaches that file nowhere, so that no other file (another daemon's socket) stands for it.
    pub fn reachable(&mut self, pid: u32, cgroup: u64, path: &str) -> Option<String> {
        if self.shares_mounts(pid, cgroup) != Some(false) {
            return Some(path.to_owned());
        }
        let Ok(theirs) = stat_in_root(pid, path) else {
            return Some(path.to_owned());
        };
        let here = |p: &str| std::fs::metadata(p).is_ok_and(|m| (m.dev(), m.ino()) == theirs);
        if here(path) {
            return Some(path.to_owned());
        }
        self.translate(pid, cgroup, path).filter(|host| here(host))
    }

    /// `path` as process `pid` (whose mount table is cached under `cgroup`, when above 1) sees
    /// it, on the host.
    fn translate(&mut self, pid: u32, cgroup: u64, path: &str) -> Option<String> {
        let theirs = self.table_of(pid, cgroup)?;
        let (device, within) = locate(&theirs, path)?;
        let host = self.host_table()?;
        let host_path = place(host, &device, &within)?;
        if host_path == path {
            return None;
        }
        // The same file, or nothing: a host path shadowed by another mount is not it.
        let seen = stat_in_root(pid, path).ok();
        let there = std::fs::metadata(&host_path).ok()?;
        match seen {
            Some(seen) if seen != (there.dev(), there.ino()) => None,
            _ => Some(host_path),
        }
    }

    /// `same_mounts(pid)`, remembered for `SHARES_FRESH` (a process that cannot be looked at is
    /// not remembered).
    fn shares_mounts(&mut self, pid: u32, cgroup: u64) -> Option<bool> {
        let shares = self.shares.get_or_insert_with(|| BoundedMap::new(4096));
        if let Some((at, shared)) = shares.get(&(pid, cgroup))
            && at.elapsed() < SHARES_FRESH
        {
            return Some(*shared);
        }
        let shared = same_mounts(pid)?;
        shares.insert((pid, cgroup), (Instant::now(), shared));
        Some(shared)
    }

    fn knows(&self, cgroup: u64) -> bool {
        cgroup > 1
            && self
                .containers
                .as_ref()
                .is_some_and(|c| c.contains_key(&cgroup))
    }

    fn table_of(&mut self, pid: u32, cgroup: u64) -> Option<Vec<Mount>> {
        let containers = self.containers.get_or_insert_with(|| BoundedMap::new(1024));
        if let Some((at, table)) = containers.get(&cgroup)
            && at.elapsed() < FRESH
        {
            return Some(table.clone());
        }
        match std::fs::read_to_string(format!("/proc/{pid}/mountinfo")) {
            Ok(text) => {
                let table = parse(&text);
                if cgroup > 1 {
                    containers.insert(cgroup, (Instant::now(), table.clone()));
                }
                Some(table)
            }
            // Gone: an older read of its container's table still says where things were.
            Err(_) => containers.get(&cgroup).map(|(_, t)| t.clone()),
        }
    }

    fn host_table(&mut self) -> Option<&[Mount]> {
        let stale = self
            .host
            .as_ref()
            .is_none_or(|(at, _)| at.elapsed() > FRESH);
        if stale {
            let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
            self.host = Some((Instant::now(), parse(&text)));
        }
        self.host.as_ref().map(|(_, t)| t.as_slice())
    }
}

/// `/proc/<n>/root/<rest>`: `n` and `/<rest>`.
fn through_proc_root(path: &str) -> Option<(u32, &str)> {
    let rest = path.strip_prefix("/proc/")?;
    let (n, rest) = rest.split_once('/')?;
    let rest = rest.strip_prefix("root")?;
    (rest.starts_with('/')).then_some(())?;
    Some((n.parse().ok()?, rest))
}

/// The device and inode of the file process `pid` reaches at `path`, resolved in its root
/// (`openat2` with `RESOLVE_IN_ROOT`): its absolute symlinks (`/var/run` -> `/run`) lead into its
/// own file system, where a path through `/proc/<pid>/root` would follow them into the agent's.
pub fn stat_in_root(pid: u32, path: &str) -> std::io::Result<(u64, u64)> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let root = std::fs::File::open(format!("/proc/{pid}/root"))?;
    let path = std::ffi::CString::new(path)?;
    // SAFETY: a plain C struct, all zero is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT;
    // SAFETY: openat2 with a directory we hold open, a NUL-terminated path and `how`'s size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            path.as_ptr(),
            &raw const how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor openat2 just gave us, owned from here.
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    let meta = file.metadata()?;
    Ok((meta.dev(), meta.ino()))
}

/// Whether process `pid` shares the agent's mount namespace; `None` when it cannot be told.
fn same_mounts(pid: u32) -> Option<bool> {
    // The agent's own namespace does not change.
    static OURS: std::sync::OnceLock<Option<(u64, u64)>> = std::sync::OnceLock::new();
    let ours = (*OURS.get_or_init(|| {
        let m = std::fs::metadata("/proc/self/ns/mnt").ok()?;
        Some((m.dev(), m.ino()))
    }))?;
    let theirs = std::fs::metadata(format!("/proc/{pid}/ns/mnt")).ok()?;
    Some((theirs.dev(), theirs.ino()) == ours)
}

/// Parses a mountinfo file: `id parent major:minor root point options ... - type source ...`.
fn parse(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let device = fields.nth(2)?.to_owned();
            let root = unescape(fields.next()?);
            let point = unescape(fields.next()?);
            Some(Mount {
                device,
                root,
                point,
            })
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|o| o.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(o)) => {
                out.push((o[0] - b'0') * 64 + (o[1] - b'0') * 8 + (o[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `rest` of `path` below `prefix`, component-wise (`/h` holds `/h/x`, not `/hx`).
fn below<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    if prefix == "/" {
        return Some(path);
    }
    let rest = path.strip_prefix(prefix)?;
    (rest.is_empty() || rest.starts_with('/')).then_some(rest)
}

fn join(base: &str, rest: &str) -> String {
    match (base.trim_end_matches('/'), rest.trim_start_matches('/')) {
        ("", r) => format!("/{r}"),
        (b, "") => b.to_owned(),
        (b, r) => format!("{b}/{r}"),
    }
}

/// The device of the mount that holds `path` in `table` (the last mounted of the deepest mount
/// points above it) and the path within that file system.
fn locate(table: &[Mount], path: &str) -> Option<(String, String)> {
    let mount = table
        .iter()
        .filter(|m| below(path, &m.point).is_some())
        .max_by_key(|m| m.point.len())?;
    let rest = below(path, &mount.point)?;
    Some((mount.device.clone(), join(&mount.root, rest)))
}

/// Where `within` of device `device` is on the host: the host mount of that device whose root
/// holds it most closely, at the shallowest mount point.
fn place(host: &[Mount], device: &str, within: &str) -> Option<String> {
    let mount = host
        .iter()
        .filter(|m| m.device == device && below(within, &m.root).is_some())
        .max_by(|a, b| {
            a.root
                .len()
                .cmp(&b.root.len())
                .then(b.point.len().cmp(&a.point.len()))
        })?;
    Some(join(&mount.point, below(within, &mount.root)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTAINER: &str = "\
1063 955 0:77 / / rw,relatime master:480 - overlay overlay rw,lowerdir=/x
1064 1063 0:80 / /proc rw,nosuid - proc proc rw
1075 1063 254:1 /root /h rw,relatime - ext4 /dev/vda rw
1076 1063 254:1 /var/lib/docker/containers/abc/hosts /etc/hosts rw - ext4 /dev/vda rw
1077 1063 254:1 /home/a\\040b /spaced rw - ext4 /dev/vda rw
";
    const HOST: &str = "\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
23 22 0:21 / /proc rw - proc proc rw
400 22 254:1 /var/lib/docker /var/lib/docker rw - ext4 /dev/vda rw
480 22 0:77 / /var/lib/docker/overlay2/abc/merged rw - overlay overlay rw
";

    fn host_of(path: &str) -> Option<String> {
        let (device, within) = locate(&parse(CONTAINER), path)?;
        place(&parse(HOST), &device, &within)
    }

    /// A file reached through this process's root is the file at that path.
    #[test]
    fn a_file_in_a_process_root_is_the_file_there() {
        let me = std::process::id();
        let meta = std::fs::metadata("/etc/hostname").unwrap();
        assert_eq!(
            stat_in_root(me, "/etc/hostname").unwrap(),
            (meta.dev(), meta.ino())
        );
        assert!(stat_in_root(me, "/no/such/file").is_err());
        let mut paths = HostPaths::default();
        assert_eq!(
            paths.reachable(me, 0, "/etc/hostname").as_deref(),
            Some("/etc/hostname")
        );
    }

    /// A process in a root of its own (`chroot`), where `/var/run` is an absolute symlink to
    /// `/run`: its `/var/run/x` is its own `/run/x`, not the host's `/run/x` that a path through
    /// `/proc/<pid>/root` leads to. Needs root (`chroot`).
    #[test]
    fn an_absolute_symlink_in_a_process_root_stays_in_that_root() {
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let dir = std::env::temp_dir().join(format!("rm-stat-in-root-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("run")).unwrap();
        std::fs::create_dir_all(dir.join("var")).unwrap();
        std::os::unix::fs::symlink("/run", dir.join("var/run")).unwrap();
        std::fs::write(dir.join("run/x"), b"").unwrap();
        let root = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
        // SAFETY: the child calls only chroot, sleep and _exit (async-signal-safe).
        let child = unsafe { libc::fork() };
        if child == 0 {
            unsafe {
                libc::chroot(root.as_ptr());
                libc::sleep(10);
                libc::_exit(0);
            }
        }
        assert!(child > 0);
        let pid = child as u32;
        let theirs = std::fs::metadata(dir.join("run/x")).unwrap();
        let mut found = Err(std::io::Error::other("not yet"));
        for _ in 0..100 {
            found = stat_in_root(pid, "/var/run/x");
            if found.is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // SAFETY: our own child.
        unsafe {
            libc::kill(child, libc::SIGKILL);
            libc::waitpid(child, std::ptr::null_mut(), 0);
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(found.unwrap(), (theirs.dev(), theirs.ino()));
    }

    #[test]
    fn a_bind_mounted_file_is_found_where_the_host_has_it() {
        assert_eq!(
            host_of("/h/.aws/credentials").as_deref(),
            Some("/root/.aws/credentials")
        );
        assert_eq!(host_of("/h").as_deref(), Some("/root"));
        assert_eq!(
            host_of("/etc/hosts").as_deref(),
            Some("/var/lib/docker/containers/abc/hosts")
        );
        assert_eq!(host_of("/spaced/k").as_deref(), Some("/home/a b/k"));
        // The container's own files are in its root file system's mount on the host.
        assert_eq!(
            host_of("/etc/passwd").as_deref(),
            Some("/var/lib/docker/overlay2/abc/merged/etc/passwd")
        );
        // `/hx` is not under `/h`.
        assert_eq!(
            host_of("/hx/y").as_deref(),
            Some("/var/lib/docker/overlay2/abc/merged/hx/y")
        );
    }

    #[test]
    fn a_path_through_another_process_root_names_that_process_and_the_rest() {
        assert_eq!(
            through_proc_root("/proc/1234/root/h/.aws/credentials"),
            Some((1234, "/h/.aws/credentials"))
        );
        assert_eq!(through_proc_root("/proc/1234/rootx/y"), None);
        assert_eq!(through_proc_root("/proc/self/root/etc/shadow"), None);
        assert_eq!(through_proc_root("/proc/1234/cwd/x"), None);
    }

    /// A process of this host reading through `/proc/self`'s pid, as a number: the host's own
    /// mounts, so the rest is the host path.
    #[test]
    fn a_host_process_root_is_the_host() {
        let me = std::process::id();
        let mut paths = HostPaths::default();
        let path = format!("/proc/{me}/root/etc/hostname");
        assert_eq!(
            paths.host_path(me, 0, 0, &path).as_deref(),
            Some("/etc/hostname")
        );
        // The agent's own mounts: nothing to translate.
        assert_eq!(paths.host_path(me, 0, 0, "/etc/hostname"), None);
    }

    #[test]
    fn a_device_the_host_does_not_mount_has_no_host_path() {
        let (device, within) = locate(&parse(CONTAINER), "/proc/1/environ").unwrap();
        assert_eq!(place(&parse(HOST), &device, &within), None);
    }
}
