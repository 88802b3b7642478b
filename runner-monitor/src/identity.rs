//! Match the file, not the name (live only: it reads the file system). The kernel matches
//! credential files by name on the tracepoint hooks; a process that reaches a credential or a
//! secret socket under another name is brought back to what it reached here:
//!
//! - a symlink, hard link or rename whose source is a credential (the kernel reports it: the
//!   source's name matches) makes the new path an *alias* of that credential, remembered with
//!   the file's device and inode. Its basename is handed to the kernel's name table
//!   (`take_kernel_names`), so a later open of the alias is reported; an open whose path is an
//!   alias still leading to the same file (same device and inode) becomes an open of the
//!   credential's host path, with the path used in `via`.
//! - a unix connect to a path that is not a secret socket is compared with the secret sockets
//!   by device and inode (through the process's own root, `/proc/<pid>/root`): a symlink to the
//!   Docker socket, or the socket bind-mounted under another name, is the Docker socket.
//!
//! - a file opened in a container (another mount namespace) is given the path it has on the
//!   host (`mounts.rs`), with the path used in `via`: `/h/.aws/credentials` under `-v $HOME:/h`
//!   is the runner's `~/.aws/credentials`.
//!
//! What remains (docs/sensors.md): a link made by a process outside jobs or while no agent ran,
//! a link to a credential's directory (`ln -s ~/.aws /tmp/x`), and a link removed before the
//! agent looked at it (milliseconds) are not followed.

use std::{
    os::unix::fs::MetadataExt as _,
    time::{Duration, Instant},
};

use crate::{
    bounded::BoundedMap,
    event::{Bind, Connect, Event, EventDetail, FileAccess, SocketFamily},
    mounts::HostPaths,
    policy::Policy,
};

/// Aliases remembered at once.
const MAX_ALIASES: usize = 4096;

/// A path that leads to a credential under another name.
struct Alias {
    /// The credential's path on the host.
    credential: String,
    /// The file the alias led to when it was made.
    file: (u64, u64),
}

#[derive(Default)]
pub struct Identities {
    aliases: Option<BoundedMap<String, Alias>>,
    /// Basenames the kernel must report opens of from now on.
    kernel_names: Vec<String>,
    /// The secret sockets' device and inode, and when they were looked at.
    sockets: Option<(Instant, SocketFiles)>,
    /// Where files opened in containers are on the host (`mounts.rs`).
    host_paths: HostPaths,
}

/// The secret sockets found: (device, inode) and path.
type SocketFiles = Vec<((u64, u64), String)>;

/// How long the secret sockets' identities are trusted before they are looked at again.
const SOCKETS_FRESH: Duration = Duration::from_secs(1);

impl Identities {
    /// Learns aliases from links and renames, and brings opens and unix connects back to the
    /// credential or secret socket they reached.
    pub fn process(&mut self, event: &mut Event, policy: &Policy) {
        let (pid, ppid, cgroup) = (
            event.process.pid,
            event.process.ppid,
            event.process.cgroup_id,
        );
        match &mut event.detail {
            EventDetail::FileRename(f) | EventDetail::FileLink(f) if f.result >= 0 => {
                self.learn(f, policy)
            }
            EventDetail::FileOpen(f) if f.target_pid.is_none() => {
                self.resolve_file(f, policy);
                // Opened in a container: the path the file has on the host, and the one used.
                if f.via.is_none()
                    && let Some(host) = self.host_paths.host_path(pid, ppid, cgroup, &f.path)
                {
                    f.via = Some(std::mem::replace(&mut f.path, host));
                }
            }
            EventDetail::Connect(c) if c.family == SocketFamily::Unix => {
                self.resolve_socket(pid, c, policy)
            }
            EventDetail::Container(info) => self.learn_binds(&info.binds, policy),
            _ => {}
        }
    }

    /// The basenames of aliases learned since the last call, for the kernel's name table.
    pub fn take_kernel_names(&mut self) -> Vec<String> {
        std::mem::take(&mut self.kernel_names)
    }

    fn learn(&mut self, f: &FileAccess, policy: &Policy) {
        let Some(new) = &f.new_path else { return };
        if policy.credential_of(&f.path).is_none() || policy.credential_of(new).is_some() {
            return;
        }
        // The file the new name leads to now (a symlink is followed).
        let Ok(meta) = std::fs::metadata(new) else {
            return;
        };
        let credential = self
            .alias_of(&f.path)
            .map_or_else(|| f.path.clone(), |a| a.credential.clone());
        let aliases = self
            .aliases
            .get_or_insert_with(|| BoundedMap::new(MAX_ALIASES));
        aliases.insert(
            new.clone(),
            Alias {
                credential,
                file: (meta.dev(), meta.ino()),
            },
        );
        if let Some(base) = new.rsplit('/').next().filter(|b| !b.is_empty()) {
            self.kernel_names.push(base.to_owned());
        }
    }

    /// A credential file bound into a container under another name (`-v
    /// ~/.aws/credentials:/run/x`): the kernel reports opens of that name from now on, and an
    /// open of it is brought back to the host's path (`mounts.rs`).
    fn learn_binds(&mut self, binds: &[Bind], policy: &Policy) {
        for bind in binds {
            if policy.credential_of(&bind.source).is_none()
                || policy.credential_of(&bind.destination).is_some()
            {
                continue;
            }
            if let Some(base) = bind
                .destination
                .rsplit('/')
                .next()
                .filter(|b| !b.is_empty())
                && !self.kernel_names.iter().any(|n| n == base)
            {
                self.kernel_names.push(base.to_owned());
            }
        }
    }

    fn alias_of(&self, path: &str) -> Option<&Alias> {
        self.aliases.as_ref()?.get(path)
    }

    fn resolve_file(&mut self, f: &mut FileAccess, policy: &Policy) {
        let Some(alias) = self.alias_of(&f.path) else {
            return;
        };
        if policy.credential_of(&f.path).is_some() {
            return;
        }
        // Still the same file: a name reused for something else is not the credential.
        let same = std::fs::metadata(&f.path).is_ok_and(|m| (m.dev(), m.ino()) == alias.file);
        if same {
            f.via = Some(std::mem::replace(&mut f.path, alias.credential.clone()));
        }
    }
}

impl Identities {
    /// A unix connect to a path that is not a secret socket but is one of them under another
    /// name.
    fn resolve_socket(&mut self, pid: u32, c: &mut Connect, policy: &Policy) {
        let Some(path) = c.unix_path.as_deref() else {
            return;
        };
        if !path.starts_with('/') || policy.secret_socket_of(path).is_some() {
            return;
        }
        let stale = self
            .sockets
            .as_ref()
            .is_none_or(|(at, _)| at.elapsed() > SOCKETS_FRESH);
        if stale {
            let found = policy
                .secret_socket_paths
                .iter()
                .filter_map(|p| {
                    let m = std::fs::metadata(p).ok()?;
                    Some(((m.dev(), m.ino()), p.clone()))
                })
                .collect();
            self.sockets = Some((Instant::now(), found));
        }
        let Some((_, sockets)) = &self.sockets else {
            return;
        };
        if sockets.is_empty() {
            return;
        }
        // Resolved in the process's root: its absolute symlinks stay there.
        let reached = crate::mounts::stat_in_root(pid, path)
            .or_else(|_| std::fs::metadata(path).map(|m| (m.dev(), m.ino())));
        let Ok(reached) = reached else { return };
        if let Some((_, socket)) = sockets.iter().find(|(id, _)| *id == reached) {
            c.via = c.unix_path.replace(socket.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ProcessRef;

    fn event(detail: EventDetail) -> Event {
        Event {
            time_ns: 1,
            job: None,
            process: ProcessRef {
                // No such process: `/proc/<pid>/root` is not there, the host's view is used.
                pid: u32::MAX,
                tid: u32::MAX,
                ppid: 0,
                uid: 0,
                comm: "cat".into(),
                cgroup_id: 0,
            },
            truncated: false,
            detail,
        }
    }

    #[test]
    fn a_symlink_to_a_credential_is_the_credential_while_it_leads_there() {
        let dir = std::env::temp_dir().join(format!("rm-identity-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let aws = dir.join("home/.aws");
        std::fs::create_dir_all(&aws).unwrap();
        let credential = aws.join("credentials");
        std::fs::write(&credential, "x").unwrap();
        let link = dir.join("notes.txt");
        std::os::unix::fs::symlink(&credential, &link).unwrap();
        let policy = Policy::builtin();
        let (credential, link) = (
            credential.to_str().unwrap().to_owned(),
            link.to_str().unwrap().to_owned(),
        );
        let mut ids = Identities::default();
        let mut made = event(EventDetail::FileLink(FileAccess {
            new_path: Some(link.clone()),
            ..FileAccess::at(&credential)
        }));
        ids.process(&mut made, &policy);
        assert_eq!(ids.take_kernel_names(), ["notes.txt"]);
        let mut open = event(EventDetail::FileOpen(FileAccess::at(&link)));
        ids.process(&mut open, &policy);
        let EventDetail::FileOpen(f) = &open.detail else {
            unreachable!()
        };
        assert_eq!(
            (f.path.as_str(), f.via.as_deref()),
            (credential.as_str(), Some(link.as_str()))
        );
        // The name now leads elsewhere: an open of it is what it is.
        std::fs::remove_file(&link).unwrap();
        std::fs::write(&link, "innocent").unwrap();
        let mut open = event(EventDetail::FileOpen(FileAccess::at(&link)));
        ids.process(&mut open, &policy);
        let EventDetail::FileOpen(f) = &open.detail else {
            unreachable!()
        };
        assert_eq!((f.path.as_str(), f.via.as_deref()), (link.as_str(), None));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_symlink_to_a_secret_socket_is_that_socket() {
        let dir = std::env::temp_dir().join(format!("rm-identity-sock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("docker.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let link = dir.join("ipc.sock");
        std::os::unix::fs::symlink(&socket, &link).unwrap();
        let socket = socket.to_str().unwrap().to_owned();
        let toml = format!(
            "{}\n[[secret_sockets]]\nkind = \"test-docker\"\npaths = [\"{socket}\"]\n",
            crate::policy::DEFAULT_POLICY
        );
        let policy = Policy::parse(&toml, "t.toml").unwrap();
        let connect = |path: &str| event(EventDetail::Connect(Connect::unix(path)));
        let link = link.to_str().unwrap().to_owned();
        let mut ids = Identities::default();
        let mut e = connect(&link);
        ids.process(&mut e, &policy);
        let EventDetail::Connect(c) = &e.detail else {
            unreachable!()
        };
        assert_eq!(c.unix_path.as_deref(), Some(socket.as_str()));
        assert_eq!(c.via.as_deref(), Some(link.as_str()));
        let mut e = connect("/run/not-a-secret.sock");
        ids.process(&mut e, &policy);
        let EventDetail::Connect(c) = &e.detail else {
            unreachable!()
        };
        assert_eq!(
            (c.unix_path.as_deref(), c.via.as_deref()),
            (Some("/run/not-a-secret.sock"), None)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
