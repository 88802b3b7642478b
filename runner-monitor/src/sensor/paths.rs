//! Turning the paths processes pass to syscalls into absolute, normalised paths.
//!
//! The kernel reports the path as given: `config.json` after a `cd ~/.docker`, `../.aws/x`, or a
//! name relative to a directory fd. The agent follows each job process's working directory from
//! its fork and `chdir` events (a child starts where its parent was), so a relative path is
//! resolved even after the process has exited. `dirfd`-relative paths are resolved through
//! `/proc/<pid>/fd/<dirfd>` while the process still has it open; when nothing can resolve a path
//! it is reported as given, marked unresolved.

use std::{collections::HashMap, path::Path};

use runner_monitor_common::AT_FDCWD;

/// Lexical normalisation of an absolute path: no `.`, no `..`, no repeated or trailing `/`.
/// `..` at the root stays at the root, as the kernel does.
pub fn normalize(path: &str) -> String {
    if is_normal(path) {
        // Nearly every path a process opens: one copy, no parsing.
        return path.to_owned();
    }
    normalized(&[path])
}

/// `parts` one after the other, normalised in one pass into one string.
fn normalized(parts: &[&str]) -> String {
    let mut out = String::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for part in parts {
        push_normalized(&mut out, part);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// Whether `path` is absolute and already normal: every component non-empty and neither `.`
/// nor `..`, no trailing `/` (except the root itself).
fn is_normal(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    rest.is_empty()
        || rest
            .as_bytes()
            .split(|b| *b == b'/')
            .all(|part| !matches!(part, b"" | b"." | b".."))
}

/// Appends the components of `path` to `out`, which holds a normalised path without its
/// trailing `/` (empty for the root): one pass, no allocation beyond `out`'s.
fn push_normalized(out: &mut String, path: &str) {
    for part in path.split('/') {
        match part {
            "" | "." => {}
            // `out` is `/a/b/c`: the last `/` starts the component `..` removes.
            ".." => out.truncate(out.rfind('/').unwrap_or(0)),
            other => {
                out.push('/');
                out.push_str(other);
            }
        }
    }
}

/// `base` joined with `path` (absolute `path` wins), normalised.
pub fn join(base: &str, path: &str) -> String {
    if path.starts_with('/') {
        normalize(path)
    } else {
        normalized(&[base, path])
    }
}

/// The working directories of job processes, as far as the agent has seen them change.
#[derive(Default)]
pub struct WorkingDirectories {
    cwd: HashMap<u32, String>,
    /// Root of `/proc` (a test can point it elsewhere).
    proc_root: String,
}

/// At most this many processes are followed; the kernel tracks no more either.
const MAX_PROCESSES: usize = runner_monitor_common::MAX_TRACKED_PROCESSES as usize;

impl WorkingDirectories {
    pub fn new() -> Self {
        Self::with_proc_root("/proc")
    }

    pub fn with_proc_root(root: &str) -> Self {
        Self {
            cwd: HashMap::new(),
            proc_root: root.to_owned(),
        }
    }

    fn read_link(&self, pid: u32, what: &str) -> Option<String> {
        let link = format!("{}/{pid}/{what}", self.proc_root);
        let target = std::fs::read_link(Path::new(&link)).ok()?;
        let target = target.to_str()?.to_owned();
        // "/x (deleted)" and "socket:[..]" are not directories to resolve against.
        if !target.starts_with('/') || target.ends_with(" (deleted)") {
            return None;
        }
        Some(target)
    }

    /// The working directory of `pid`: followed, or read from `/proc` the first time.
    pub fn cwd(&mut self, pid: u32) -> Option<String> {
        if let Some(cwd) = self.cwd.get(&pid) {
            return Some(cwd.clone());
        }
        let cwd = self.read_link(pid, "cwd")?;
        self.remember(pid, cwd.clone());
        Some(cwd)
    }

    fn remember(&mut self, pid: u32, cwd: String) {
        if self.cwd.len() >= MAX_PROCESSES && !self.cwd.contains_key(&pid) {
            // Full: forget instead of growing; this process falls back to /proc.
            return;
        }
        self.cwd.insert(pid, cwd);
    }

    /// A child starts in its parent's working directory.
    pub fn fork(&mut self, parent: u32, child: u32) {
        if let Some(cwd) = self.cwd(parent) {
            self.remember(child, cwd);
        }
    }

    pub fn exit(&mut self, pid: u32) {
        self.cwd.remove(&pid);
    }

    /// A successful `chdir(path)` (`fd` < 0) or `fchdir(fd)`. Returns the new directory.
    pub fn chdir(&mut self, pid: u32, fd: i32, path: &str) -> Option<String> {
        let new = if fd >= 0 {
            self.read_link(pid, &format!("fd/{fd}"))
                .or_else(|| self.read_link(pid, "cwd"))
        } else if path.starts_with('/') {
            Some(normalize(path))
        } else {
            self.cwd(pid).map(|cwd| join(&cwd, path))
        };
        match &new {
            Some(dir) => self.remember(pid, dir.clone()),
            None => {
                self.cwd.remove(&pid);
            }
        }
        new
    }

    /// Resolves a path given to a syscall. Returns the path and whether it is fully resolved.
    pub fn resolve(&mut self, pid: u32, dirfd: i32, path: &str) -> (String, bool) {
        if path.starts_with('/') {
            return (normalize(path), true);
        }
        let base = if dirfd == AT_FDCWD {
            self.cwd(pid)
        } else {
            self.read_link(pid, &format!("fd/{dirfd}"))
        };
        match base {
            Some(base) => (join(&base, path), true),
            None => (path.to_owned(), false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_removes_dots_and_repeated_slashes() {
        assert_eq!(
            normalize("/root//.docker/./config.json"),
            "/root/.docker/config.json"
        );
        assert_eq!(
            normalize("/root/x/../.aws/credentials"),
            "/root/.aws/credentials"
        );
        assert_eq!(normalize("/../../etc/passwd"), "/etc/passwd");
        assert_eq!(normalize("/"), "/");
        assert_eq!(normalize("/a/b/"), "/a/b");
    }

    #[test]
    fn relative_paths_join_the_base() {
        assert_eq!(
            join("/root/.docker", "config.json"),
            "/root/.docker/config.json"
        );
        assert_eq!(
            join("/home/u/src", "../.aws/credentials"),
            "/home/u/.aws/credentials"
        );
        assert_eq!(join("/anything", "/etc/shadow"), "/etc/shadow");
    }

    /// The component-stack definition of normalisation, to check the one-pass version against.
    fn by_components(path: &str) -> String {
        let mut parts: Vec<&str> = Vec::new();
        for part in path.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    parts.pop();
                }
                other => parts.push(other),
            }
        }
        if parts.is_empty() {
            return "/".into();
        }
        parts.iter().map(|p| format!("/{p}")).collect()
    }

    #[test]
    fn one_pass_normalisation_agrees_with_the_component_stack() {
        let pieces = ["", ".", "..", "...", "a", "..b", "c.", "/"];
        let mut paths = vec![String::new()];
        for _ in 0..4 {
            paths = paths
                .iter()
                .flat_map(|p| pieces.iter().map(move |x| format!("{p}/{x}")))
                .collect();
            for p in &paths {
                assert_eq!(normalize(p), by_components(p), "{p:?}");
                for base in ["/", "/u/v", "/u/../v/"] {
                    let rel = p.trim_start_matches('/');
                    assert_eq!(
                        join(base, rel),
                        by_components(&format!("{base}/{rel}")),
                        "{base:?} + {rel:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn child_inherits_cwd_and_chdir_is_followed_without_proc() {
        // A /proc root that does not exist: everything must come from the events.
        let mut dirs = WorkingDirectories::with_proc_root("/nonexistent-proc");
        dirs.remember(10, "/home/u".into());
        dirs.fork(10, 11);
        assert_eq!(
            dirs.chdir(11, -1, ".docker"),
            Some("/home/u/.docker".into())
        );
        assert_eq!(
            dirs.resolve(11, AT_FDCWD, "config.json"),
            ("/home/u/.docker/config.json".into(), true)
        );
        // The parent did not move.
        assert_eq!(
            dirs.resolve(10, AT_FDCWD, "config.json"),
            ("/home/u/config.json".into(), true)
        );
        dirs.exit(11);
        assert_eq!(dirs.resolve(11, AT_FDCWD, "x"), ("x".into(), false));
    }

    #[test]
    fn unresolvable_dirfd_is_reported_as_given() {
        let mut dirs = WorkingDirectories::with_proc_root("/nonexistent-proc");
        assert_eq!(
            dirs.resolve(5, 7, "config.json"),
            ("config.json".into(), false)
        );
        assert_eq!(dirs.resolve(5, 7, "/a/../b"), ("/b".into(), true));
    }

    #[test]
    fn own_process_cwd_is_read_from_proc() {
        let pid = std::process::id();
        let mut dirs = WorkingDirectories::new();
        let expected = std::env::current_dir().unwrap();
        assert_eq!(
            dirs.resolve(pid, AT_FDCWD, "x/../y"),
            (format!("{}/y", expected.display()).replace("//", "/"), true)
        );
    }
}
