//! The agent's state on disk: the engine's and the job directory's tables, so that a restarted
//! agent (crash, upgrade, `systemctl restart`) carries on judging the jobs it was watching.
//!
//! The state directory also holds a lock: two agents on one host would fight over the kernel's
//! pinned maps, so the second one refuses to start. The snapshot is written atomically (temporary
//! file, fsync, rename) at shutdown and every few seconds while events arrive; it is tied to the
//! boot it was taken in, since after a reboot none of its processes exist.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize, ser::SerializeStruct as _};

use crate::{
    engine::{Engine, snapshot::EngineSnapshot},
    job::{DirectorySnapshot, JobDirectory},
};

/// Bumped when the snapshot's shape changes; an older snapshot is set aside, not misread.
const VERSION: u32 = 1;
const SNAPSHOT: &str = "state.json";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "another runner-monitor is running with state directory {0} (only one agent per host: \
         they would share the kernel's job maps)"
    )]
    Locked(PathBuf),
}

/// A restored snapshot.
#[derive(Deserialize)]
pub struct Saved {
    pub version: u32,
    pub boot_id: String,
    /// CLOCK_MONOTONIC when it was written.
    pub saved_ns: u64,
    pub engine: EngineSnapshot,
    pub directory: DirectorySnapshot,
}

/// The state directory, locked for this agent.
pub struct StateDir {
    path: PathBuf,
    _lock: File,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// This boot's id: a snapshot from another boot describes processes that are gone.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

impl StateDir {
    /// Creates (mode 0700) and locks `path`.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(io(path))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(io(path))?;
        let lock_path = path.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(StateError::Locked(path.to_path_buf()));
        }
        Ok(Self {
            path: path.to_path_buf(),
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Forgets the saved snapshot (`run --fresh-state`).
    pub fn discard(&self) -> Result<(), StateError> {
        let file = self.path.join(SNAPSHOT);
        match std::fs::remove_file(&file) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&file)(e)),
        }
    }

    /// The snapshot left by the previous agent of this boot, if any. A snapshot that cannot be
    /// read is moved aside (`state.json.unreadable`) with a warning, never fatal.
    pub fn load(&self) -> Option<Saved> {
        let file = self.path.join(SNAPSHOT);
        let text = match std::fs::read(&file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(error) => {
                tracing::warn!(path = %file.display(), %error, "state snapshot unreadable: starting afresh");
                return None;
            }
        };
        let saved: Saved = match serde_json::from_slice(&text) {
            Ok(saved) => saved,
            Err(error) => {
                let aside = self.path.join("state.json.unreadable");
                let _ = std::fs::rename(&file, &aside);
                tracing::warn!(path = %file.display(), %error, moved_to = %aside.display(),
                    "state snapshot unreadable: starting afresh");
                return None;
            }
        };
        if saved.version != VERSION {
            tracing::warn!(
                version = saved.version,
                "state snapshot from another version: starting afresh"
            );
            return None;
        }
        if saved.boot_id != boot_id() {
            tracing::info!("state snapshot is from before a reboot: starting afresh");
            return None;
        }
        Some(saved)
    }

    /// Writes the snapshot: `encode`, then `write`, in the calling thread (shutdown).
    pub fn save(
        &self,
        engine: &Engine,
        directory: &JobDirectory,
        now_ns: u64,
    ) -> Result<(), StateError> {
        let bytes = Self::encode(engine, directory, now_ns).map_err(io(&self.path))?;
        self.writer().write(&bytes)
    }

    /// The snapshot's bytes. Taken on the event loop (the tables must not move meanwhile); the
    /// slow part, writing them out and syncing, is `SnapshotWriter::write`, which can run on
    /// another thread.
    pub fn encode(
        engine: &Engine,
        directory: &JobDirectory,
        now_ns: u64,
    ) -> std::io::Result<Vec<u8>> {
        let snapshot = SavedRef {
            boot_id: boot_id(),
            saved_ns: now_ns,
            engine,
            directory,
        };
        serde_json::to_vec(&snapshot).map_err(std::io::Error::other)
    }

    /// Where snapshots go, to hand to a blocking thread.
    pub fn writer(&self) -> SnapshotWriter {
        SnapshotWriter(self.path.clone())
    }
}

/// Writes encoded snapshots into a state directory.
#[derive(Clone, Debug)]
pub struct SnapshotWriter(PathBuf);

impl SnapshotWriter {
    /// To a temporary file, flushed to disk, then renamed over the old one.
    pub fn write(&self, bytes: &[u8]) -> Result<(), StateError> {
        let tmp = self.0.join("state.json.tmp");
        let mut file = File::create(&tmp).map_err(io(&tmp))?;
        std::io::Write::write_all(&mut file, bytes).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
        let dest = self.0.join(SNAPSHOT);
        std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
        File::open(&self.0)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.0))?;
        Ok(())
    }
}

struct SavedRef<'a> {
    boot_id: String,
    saved_ns: u64,
    engine: &'a Engine,
    directory: &'a JobDirectory,
}

struct EngineTables<'a>(&'a Engine);
struct DirectoryTables<'a>(&'a JobDirectory);

impl Serialize for EngineTables<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.save(s)
    }
}

impl Serialize for DirectoryTables<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.save(s)
    }
}

impl Serialize for SavedRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Saved", 5)?;
        st.serialize_field("version", &VERSION)?;
        st.serialize_field("boot_id", &self.boot_id)?;
        st.serialize_field("saved_ns", &self.saved_ns)?;
        st.serialize_field("engine", &EngineTables(self.engine))?;
        st.serialize_field("directory", &DirectoryTables(self.directory))?;
        st.end()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        event::{Event, EventDetail, FileAccess, JobInfo, JobKey, JobRef, ProcessRef},
        policy::Policy,
        rule::RuleId,
    };

    fn event(time_ns: u64, pid: u32, job: JobKey, ended: bool, detail: EventDetail) -> Event {
        Event {
            time_ns,
            job: Some(JobRef {
                key: job,
                ended,
                root: false,
            }),
            process: ProcessRef {
                pid,
                tid: pid,
                ppid: 1,
                uid: 0,
                comm: "sh".into(),
                cgroup_id: 0,
            },
            truncated: false,
            detail,
        }
    }

    #[test]
    fn a_restored_engine_judges_a_survivor_of_a_job_started_before_the_restart() {
        let dir = std::env::temp_dir().join(format!("rm-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let policy = Arc::new(Policy::builtin());
        let job = JobKey(7);
        let mut engine = Engine::new(policy.clone());
        let mut start = event(
            1_000,
            100,
            job,
            false,
            EventDetail::JobStart(JobInfo {
                id: "run-1/build".into(),
                ..JobInfo::default()
            }),
        );
        start.job.as_mut().unwrap().root = true;
        engine.handle(&start);
        engine.handle(&event(
            2_000,
            100,
            job,
            false,
            EventDetail::Fork { child_pid: 101 },
        ));
        let mut directory = JobDirectory::default();
        // The Docker socket the job used before the name: both are kept.
        directory.set_docker_socket(job, "/run/docker.sock");
        directory.set_explicit(job, "run-1/build");

        let state = StateDir::open(&dir).unwrap();
        assert!(
            matches!(StateDir::open(&dir), Err(StateError::Locked(_))),
            "a second agent is refused"
        );
        state.save(&engine, &directory, 3_000).unwrap();
        drop(engine);
        drop(state);

        let state = StateDir::open(&dir).unwrap();
        let saved = state.load().expect("the snapshot is read back");
        assert_eq!(saved.saved_ns, 3_000);
        let directory = JobDirectory::restore(saved.directory);
        assert_eq!(directory.key_of("run-1/build"), Some(job));
        // Containers the job starts after the restart are named at its Docker socket.
        assert_eq!(directory.docker_socket(job), Some("/run/docker.sock"));
        let mut engine = Engine::restore(policy, saved.engine);
        // After the restart the survivor reads a credential after its job ended.
        let mut end = event(
            10_000,
            100,
            job,
            true,
            EventDetail::Exit {
                exit_code: Some(0),
                signal: None,
            },
        );
        end.job.as_mut().unwrap().root = true;
        engine.handle(&end);
        let findings = engine.handle(&event(
            20_000,
            101,
            job,
            true,
            EventDetail::FileOpen(FileAccess::at("/root/.docker/config.json")),
        ));
        assert!(
            findings
                .iter()
                .any(|f| f.rule == RuleId::CredentialAfterJobEnd
                    && f.job.as_ref().is_some_and(|j| j.info.id == "run-1/build")),
            "{findings:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
