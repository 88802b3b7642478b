//! Live-only additions to events and findings that need the file system or `/proc` (so they are
//! not in the engine, which does no I/O): token fingerprints and the survivors' runner tracking id.
//!
//! Fingerprints: with a per-host secret key, the keyed hash (HMAC-SHA256, RustCrypto's `hmac` and
//! `sha2`) of a credential file's content, so the same token copied to another path or host is
//! still recognised. Only the hash is kept or shown; the content is dropped as soon as it is
//! hashed. A fingerprint reads `hmac-sha256:KEYID:HASH`: `KEYID` names the key (a one-way hash of
//! it, `key_id`), so that the agents of a fleet, which share one key, can tell fingerprints of an
//! old key from the current one's while a key is rotated (docs/fleet.md).

use std::{io::Read, os::unix::fs::PermissionsExt, path::Path};

mod builds;
mod containers;
pub mod cri;
pub mod kube;
mod name_starts;
mod pods;
mod runtime_streams;
pub mod workflow_pods;
pub use builds::BuildSlots;
pub use containers::{ContainerNamer, of_job_root};
pub use name_starts::Register as NameStartRegister;
pub use pods::{DEFAULT_CRI_SOCKET, PodContainer, PodNamer, gitlab_job};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::{
    bounded::BoundedMap,
    engine::Finding,
    event::{Event, EventDetail, JobKey},
    job::{JobDirectory, discovery},
    policy::Policy,
    rule::RuleId,
};

/// Credential files larger than this are not hashed (they are not tokens).
const MAX_CREDENTIAL_FILE: u64 = 1 << 20;
/// Shortest key accepted.
const MIN_KEY: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("fingerprint key {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("fingerprint key {path} is readable by group or others (mode {mode:o}); chmod 600 it")]
    Exposed { path: String, mode: u32 },
    #[error("fingerprint key {path} has {len} bytes; at least {MIN_KEY} are needed")]
    Short { path: String, len: usize },
}

pub struct Fingerprinter {
    key: Vec<u8>,
    /// `key_id(key)`.
    key_id: String,
    /// pid -> credential files it opened for writing: hashed when it exits (the content is
    /// complete then).
    pending: BoundedMap<u32, Vec<(String, JobKey)>>,
    /// path -> the file's identity and its fingerprint: a credential read again unchanged costs a
    /// stat, not a read and a hash (a job reading one file in a loop must not slow the agent).
    cache: BoundedMap<String, (FileStamp, String)>,
}

/// What changes when a file's content may have: device, inode, size, and the modification and
/// status-change times (a write, truncate, rename over or chmod moves ctime).
#[derive(Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }
}

impl Fingerprinter {
    pub fn new(key: Vec<u8>) -> Self {
        Self {
            key_id: key_id(&key),
            key,
            pending: BoundedMap::new(4096),
            cache: BoundedMap::new(4096),
        }
    }

    /// Reads the key file, which must be private to its owner.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let shown = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|source| KeyError::Read {
            path: shown.clone(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Exposed { path: shown, mode });
        }
        let key = std::fs::read(path).map_err(|source| KeyError::Read {
            path: shown.clone(),
            source,
        })?;
        if key.len() < MIN_KEY {
            return Err(KeyError::Short {
                path: shown,
                len: key.len(),
            });
        }
        Ok(Self::new(key))
    }

    pub fn fingerprint(&self, content: &[u8]) -> String {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key)
            .expect("HMAC takes keys of any length");
        mac.update(content);
        let digest = mac.finalize().into_bytes();
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        format!("hmac-sha256:{}:{hex}", self.key_id)
    }

    /// The key's id, as in every fingerprint it makes.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    fn fingerprint_file(&mut self, path: &str) -> Option<String> {
        if let Ok(meta) = std::fs::metadata(path)
            && let Some((stamp, fingerprint)) = self.cache.get(path)
            && *stamp == FileStamp::of(&meta)
        {
            return Some(fingerprint.clone());
        }
        let file = std::fs::File::open(path).ok()?;
        let meta = file.metadata().ok()?;
        if meta.len() > MAX_CREDENTIAL_FILE {
            return None;
        }
        let mut content = Vec::new();
        file.take(MAX_CREDENTIAL_FILE)
            .read_to_end(&mut content)
            .ok()?;
        if content.is_empty() {
            return None;
        }
        let fingerprint = self.fingerprint(&content);
        // The stamp from before the read: a change during it shows at the next stat.
        self.cache
            .insert(path.to_owned(), (FileStamp::of(&meta), fingerprint.clone()));
        Some(fingerprint)
    }

    fn fingerprint_event(&mut self, event: &Event, job: JobKey, path: &str) -> Option<Event> {
        let fingerprint = self.fingerprint_file(path)?;
        let mut e = event.clone();
        e.job = Some(crate::event::JobRef {
            key: job,
            ended: event.job.as_ref().is_some_and(|j| j.ended),
            root: false,
        });
        e.detail = EventDetail::CredentialFingerprint {
            path: path.to_owned(),
            fingerprint,
        };
        Some(e)
    }

    /// Before the engine sees `event`: fingerprints credential reads in place; returns the
    /// fingerprints of credentials written by a process that exits now (to feed after it).
    pub fn process(&mut self, event: &mut Event, policy: &Policy) -> Vec<Event> {
        let Some(job) = event.job.as_ref().map(|j| j.key) else {
            return Vec::new();
        };
        let pid = event.process.pid;
        let mut out = Vec::new();
        match &mut event.detail {
            EventDetail::FileOpen(f)
                if f.result >= 0 && policy.credential_of_access(f).is_some() =>
            {
                if f.write {
                    let list = self.pending.get_or_insert_with(pid, Vec::new);
                    if list.len() < 64 && !list.iter().any(|(p, _)| p == &f.path) {
                        list.push((f.path.clone(), job));
                    }
                } else {
                    f.fingerprint = self.fingerprint_file(&f.path);
                }
            }
            EventDetail::FileRename(f) | EventDetail::FileLink(f) if f.result >= 0 => {
                if let Some(new_path) = f.new_path.clone()
                    && policy.credential_of(&new_path).is_some()
                {
                    let snapshot = event.clone();
                    out.extend(self.fingerprint_event(&snapshot, job, &new_path));
                }
            }
            EventDetail::Exit { .. } => {
                if let Some(written) = self.pending.remove(&pid) {
                    for (path, job) in written {
                        out.extend(self.fingerprint_event(event, job, &path));
                    }
                }
            }
            _ => {}
        }
        out
    }
}

/// The id of a fingerprint key: the first 6 bytes of SHA-256 over a fixed label and the key, in
/// hex. It names the key without revealing it (the key has at least 32 bytes), and every agent
/// with the same key file derives the same id, so nothing but the key is distributed.
pub fn key_id(key: &[u8]) -> String {
    use sha2::Digest as _;
    let mut hash = Sha256::new();
    hash.update(b"runner-monitor fingerprint key id\n");
    hash.update(key);
    hash.finalize()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The key id in a fingerprint (`hmac-sha256:KEYID:HASH`); `None` for one without (made before
/// key ids, e.g. in an old trace).
pub fn fingerprint_key_id(fingerprint: &str) -> Option<&str> {
    let rest = fingerprint.strip_prefix("hmac-sha256:")?;
    let (id, _) = rest.split_once(':')?;
    Some(id)
}

/// For a survivor: did it change `RUNNER_TRACKING_ID`, the tag the GitHub runner uses to kill a
/// job's leftover processes? Adds that to the finding's escape.
pub fn survivor_tracking_id(finding: &mut Finding, directory: &JobDirectory) {
    if finding.rule != RuleId::ProcessSurvivedJob {
        return;
    }
    let (Some(job), Some(process)) = (&finding.job, &finding.process) else {
        return;
    };
    let Some(expected) = directory.tracking_id_of(job.key) else {
        return;
    };
    let Ok(environ) = std::fs::read(format!("/proc/{}/environ", process.pid)) else {
        return;
    };
    let actual = discovery::var(&environ, "RUNNER_TRACKING_ID");
    if actual != Some(expected.as_bytes()) {
        finding.escape.push("RUNNER_TRACKING_ID changed".to_owned());
        finding.summary.push_str(" (RUNNER_TRACKING_ID changed)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_keyed_and_reveal_nothing() {
        let a = Fingerprinter::new(vec![1; 32]);
        let b = Fingerprinter::new(vec![2; 32]);
        let token = b"ghp_rmcanary0123456789";
        assert_eq!(a.fingerprint(token), a.fingerprint(token));
        assert_ne!(
            a.fingerprint(token),
            b.fingerprint(token),
            "another host key, another hash"
        );
        assert_ne!(
            a.fingerprint(token),
            a.fingerprint(b"ghp_rmcanary0123456788")
        );
        let f = a.fingerprint(token);
        assert!(
            f.starts_with(&format!("hmac-sha256:{}:", a.key_id())) && f.len() == 12 + 13 + 32,
            "{f}"
        );
        assert!(!f.contains("rmcanary"));
        assert_eq!(fingerprint_key_id(&f), Some(a.key_id()));
        assert_eq!(fingerprint_key_id("hmac-sha256:00ff"), None);
    }

    #[test]
    fn key_ids_are_stable_per_key_and_do_not_reveal_it() {
        let key = vec![0x41; 32];
        let id = key_id(&key);
        assert_eq!(id.len(), 12);
        assert_eq!(id, Fingerprinter::new(key.clone()).key_id());
        assert_ne!(id, key_id(&[0x42; 32]));
        assert!(!id.contains("4141"), "{id}");
    }

    #[test]
    fn a_changed_credential_is_fingerprinted_again_an_unchanged_one_from_the_cache() {
        let dir = std::env::temp_dir().join(format!("rm-fpcache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("credentials");
        let path = file.display().to_string();
        let mut f = Fingerprinter::new(vec![3; 32]);
        std::fs::write(&file, "token-one").unwrap();
        let first = f.fingerprint_file(&path).unwrap();
        assert_eq!(first, f.fingerprint(b"token-one"));
        assert_eq!(f.fingerprint_file(&path).unwrap(), first, "cached");
        // Same size, rewritten in place: ctime moves, the content is read again.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&file, "token-two").unwrap();
        assert_eq!(
            f.fingerprint_file(&path).unwrap(),
            f.fingerprint(b"token-two")
        );
        // Replaced by another file (another inode) of the same content and size.
        let other = dir.join("other");
        std::fs::write(&other, "token-3ne").unwrap();
        std::fs::rename(&other, &file).unwrap();
        assert_eq!(
            f.fingerprint_file(&path).unwrap(),
            f.fingerprint(b"token-3ne")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_key_file_readable_by_others_or_too_short_is_refused() {
        let dir = std::env::temp_dir().join(format!("rm-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("key");
        std::fs::write(&key, [7u8; 32]).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Fingerprinter::load(&key),
            Err(KeyError::Exposed { .. })
        ));
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Fingerprinter::load(&key).is_ok());
        std::fs::write(&key, [7u8; 8]).unwrap();
        assert!(matches!(
            Fingerprinter::load(&key),
            Err(KeyError::Short { len: 8, .. })
        ));
        let _ = std::fs::remove_dir_all(dir);
    }
}
