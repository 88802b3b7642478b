//! Cgroups in the v2 hierarchy: where it is mounted, a process's cgroup, and the containers'
//! cgroups (a name ending in a runtime's 64-digit id), found by id, by walking the hierarchy,
//! or by the cgroup id alone (`open_by_handle_at`).

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

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

#[cfg(test)]
mod tests {
    use super::*;

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
