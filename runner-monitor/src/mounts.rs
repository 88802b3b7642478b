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
    path::{Path, PathBuf},
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
            None if ppid > 1 && cgroup > 0 && cgroup_of(ppid).is_ok_and(|c| c.id == cgroup) => self
                .shares_mounts(ppid, cgroup)
                .map(|shared| (ppid, shared)),
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

/// A process's cgroup in the unified (v2) hierarchy.
pub struct ProcessCgroup {
    /// Its path in the hierarchy (`/docker/<id>`).
    pub path: String,
    /// Its directory here.
    pub dir: std::path::PathBuf,
    /// Its id: the directory's inode number (what the kernel's events carry).
    pub id: u64,
}

/// The v2 cgroup of process `pid`, or why not.
pub fn cgroup_of(pid: u32) -> Result<ProcessCgroup, &'static str> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map_err(|_| "no /proc/<pid>/cgroup")?;
    let path = cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("no cgroup v2 path")?;
    let mount = cgroup2_root().ok_or("no cgroup2 mount")?;
    let dir = mount.join(path.trim_start_matches('/'));
    let id = std::fs::metadata(&dir)
        .map_err(|_| "its cgroup is gone")?
        .ino();
    Ok(ProcessCgroup {
        path: path.to_owned(),
        dir,
        id,
    })
}

/// How deep container cgroups sit below the root: `/docker/<id>` is 2,
/// `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope`
/// is 4; below the container nothing is looked at.
const CONTAINER_CGROUP_DEPTH: usize = 6;

/// The container id a cgroup directory's name ends with (`<id>`, `docker-<id>.scope`,
/// `cri-containerd-<id>.scope`, `libpod-<id>.scope`), as the kernel's `cgroup_mkdir` reads it.
pub fn container_id(name: &str) -> Option<[u8; runner_monitor_common::CONTAINER_ID_LEN]> {
    // Podman's conmon gets a scope named by the container's id too, beside the container's.
    if name.starts_with("libpod-conmon-") {
        return None;
    }
    let stem = name.strip_suffix(".scope").unwrap_or(name);
    let id = stem.get(
        stem.len()
            .checked_sub(runner_monitor_common::CONTAINER_ID_LEN)?..,
    )?;
    let hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
    if !id.bytes().all(hex) {
        return None;
    }
    id.as_bytes().try_into().ok()
}

/// The cgroup of container `id` (64 hex digits) in the v2 hierarchy, when its runtime made it.
pub fn container_cgroup(id: &str) -> Option<ProcessCgroup> {
    find_container_cgroup(|cid, _| cid.eq_ignore_ascii_case(id.as_bytes()))
}

/// The first container cgroup `wanted` (given its container id and cgroup id) says is it.
fn find_container_cgroup(
    mut wanted: impl FnMut(&[u8; runner_monitor_common::CONTAINER_ID_LEN], u64) -> bool,
) -> Option<ProcessCgroup> {
    let root = cgroup2_root()?;
    let mut found = None;
    walk(&root, |cid, ino, dir| {
        if !wanted(&cid, ino) {
            return false;
        }
        found = dir.strip_prefix(&root).ok().map(|p| ProcessCgroup {
            path: format!("/{}", p.display()),
            dir: dir.to_path_buf(),
            id: ino,
        });
        true
    });
    found
}

/// Every container cgroup of the host: its id and its cgroup id (the directory's inode).
pub fn container_cgroups() -> Vec<([u8; runner_monitor_common::CONTAINER_ID_LEN], u64)> {
    let mut found = Vec::new();
    let Some(root) = cgroup2_root() else {
        return found;
    };
    walk(&root, |id, ino, _| {
        found.push((id, ino));
        false
    });
    found
}

/// The path in the v2 hierarchy (`/docker/<id>`) of the cgroup `cgroup_id`, a container's.
pub fn container_cgroup_path(cgroup_id: u64) -> Option<String> {
    cgroup_path(cgroup_id)
        .or_else(|| find_container_cgroup(|_, ino| ino == cgroup_id).map(|c| c.path))
}

/// The path in the v2 hierarchy of the cgroup `cgroup_id`, at any depth: the cgroup opened by
/// its handle (cgroupfs takes the id as a kernfs file handle, as `bpftool cgroup` does) and its
/// descriptor's path read back.
fn cgroup_path(cgroup_id: u64) -> Option<String> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    /// `struct file_handle` with kernfs's 8-byte handle.
    #[repr(C)]
    struct KernfsHandle {
        bytes: u32,
        kind: i32,
        id: u64,
    }
    /// `FILEID_KERNFS`.
    const KERNFS: i32 = 0xfe;
    let root = cgroup2_root()?;
    let mount = std::fs::File::open(&root).ok()?;
    let mut handle = KernfsHandle {
        bytes: 8,
        kind: KERNFS,
        id: cgroup_id,
    };
    // SAFETY: a file handle of the size it says, and a directory we hold open.
    let fd = unsafe {
        libc::open_by_handle_at(
            mount.as_raw_fd(),
            (&raw mut handle).cast(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: a descriptor the kernel just gave us, owned from here.
    let dir = unsafe { OwnedFd::from_raw_fd(fd) };
    let path = std::fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd())).ok()?;
    let within = path.strip_prefix(&root).ok()?;
    Some(format!("/{}", within.display()))
}

/// Visits the container cgroups under `root` until `visit` (given the id, the cgroup id and
/// the directory) says stop.
fn walk(
    root: &Path,
    mut visit: impl FnMut([u8; runner_monitor_common::CONTAINER_ID_LEN], u64, &Path) -> bool,
) {
    let mut dirs = vec![(root.to_path_buf(), 0)];
    while let Some((dir, depth)) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name();
            match container_id(&name.to_string_lossy()) {
                Some(id) => {
                    if let Ok(meta) = entry.metadata()
                        && visit(id, meta.ino(), &entry.path())
                    {
                        return;
                    }
                }
                None if depth + 1 < CONTAINER_CGROUP_DEPTH => dirs.push((entry.path(), depth + 1)),
                None => {}
            }
        }
    }
}

/// Mount point of the cgroup v2 hierarchy (`/sys/fs/cgroup` on unified systems,
/// `/sys/fs/cgroup/unified` on hybrid ones): a mount of its root, else the first cgroup2 mount.
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // "<id> <parent> <dev> <root> <mount point> <options> ... - <fstype> <source> <super options>"
    let cgroup2: Vec<(&str, &str)> = mounts
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            if right.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            let mut fields = left.split_whitespace();
            Some((fields.nth(3)?, fields.next()?))
        })
        .collect();
    let whole = cgroup2.iter().find(|(root, _)| *root == "/");
    whole
        .or(cgroup2.first())
        .map(|(_, point)| PathBuf::from(point))
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

    /// This process's own cgroup, found by its id alone (run as root: opening by handle needs
    /// `CAP_DAC_READ_SEARCH`).
    #[test]
    fn a_cgroup_is_found_by_its_id() {
        let Ok(mine) = cgroup_of(std::process::id()) else {
            return;
        };
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        assert_eq!(cgroup_path(mine.id).as_deref(), Some(mine.path.as_str()));
        assert_eq!(cgroup_path(u64::MAX), None);
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

#[cfg(test)]
mod container_cgroup_tests {
    use super::*;

    fn walked(root: &Path) -> Vec<([u8; 64], u64)> {
        let mut found = Vec::new();
        walk(root, |id, ino, _| {
            found.push((id, ino));
            false
        });
        found
    }

    #[test]
    fn the_id_at_the_end_of_each_runtimes_cgroup_name() {
        let id = "0123456789abcdef".repeat(4);
        for name in [
            id.clone(),
            format!("docker-{id}.scope"),
            format!("cri-containerd-{id}.scope"),
            format!("libpod-{id}.scope"),
        ] {
            assert_eq!(
                container_id(&name),
                Some(id.as_bytes().try_into().unwrap()),
                "{name}"
            );
        }
        for name in [
            "system.slice",
            "docker",
            &id[1..],
            &format!("{}X", &id[1..]),
            &format!("libpod-conmon-{id}.scope"),
            &id.to_uppercase(),
        ] {
            assert_eq!(container_id(name), None, "{name}");
        }
    }

    #[test]
    fn the_walk_finds_container_cgroups_at_their_depths_with_their_inodes() {
        let root = std::env::temp_dir().join(format!("rm-cids-{}", std::process::id()));
        let id = "ab".repeat(32);
        let docker = root.join("docker").join(&id);
        let scope = root
            .join("system.slice")
            .join(format!("docker-{}.scope", "cd".repeat(32)));
        // Below a container nothing is looked at.
        let inner = docker.join("ef".repeat(32));
        std::fs::create_dir_all(&inner).unwrap();
        std::fs::create_dir_all(&scope).unwrap();
        let mut found = walked(&root);
        found.sort();
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        let want = vec![
            (
                *b"abababababababababababababababababababababababababababababababab",
                ino(&docker),
            ),
            (
                *b"cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd",
                ino(&scope),
            ),
        ];
        assert_eq!(found, want);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
