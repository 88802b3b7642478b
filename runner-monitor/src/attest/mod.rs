//! Signed runtime attestations: at a job's end (once its survivors were looked for, after the
//! grace period) the live agent writes an in-toto Statement about what the job did, built from
//! its report (`crate::report`), signed in a DSSE envelope with an ed25519 key, to
//! `<state>/attestations/<key>-<id>.intoto.json` (the key in hex, as `/jobs/KEY`).
//!
//! Live only, like `enrich`: the engine and the report stage do no I/O, so what needs the file
//! system is here. Executables are hashed (SHA-256) when a job execs them, bounded
//! (`MAX_EXE_BYTES`) and cached by file identity, so a compiler run a thousand times costs a stat
//! each time after the first; credentials left behind are looked for again when the statement is
//! made (were they removed?).
//!
//! Never a secret: the statement holds what the report holds (paths, addresses, names, command
//! lines, findings); credential contents are neither read nor hashed here.
//!
//! Fleet stream: every envelope written is kept in `Attestor::take_written` for the pipeline,
//! which hands it to the write stage (`Outputs::attestation`: the NATS sink's spool, when the
//! agent publishes to a fleet stream).

pub mod dsse;
pub mod statement;
#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    io::{Read, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use ed25519_dalek::SigningKey;
use sha2::{Digest, Sha256};

use crate::{
    bounded::BoundedMap,
    engine::Engine,
    event::{Event, EventDetail, JobKey},
    report::{JobReport, JobReports},
};
pub use statement::{Context, ExeDigest};

/// Executables larger than this are not hashed (named, with the reason, in the statement).
pub const MAX_EXE_BYTES: u64 = 128 << 20;
/// Executables remembered by identity.
const EXE_CACHE: usize = 4096;
/// Distinct executables remembered per job (the report keeps 512 processes).
const EXES_PER_JOB: usize = 512;
/// Jobs with executables remembered; jobs remembered as attested.
const JOBS: usize = crate::report::MAX_JOBS * 2;

/// An envelope written, for whoever publishes it further.
#[derive(Clone, Debug)]
pub struct Written {
    pub job: JobKey,
    pub path: PathBuf,
    /// The envelope's JSON.
    pub envelope: Vec<u8>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        }
    }
}

pub struct Attestor {
    key: SigningKey,
    dir: PathBuf,
    host: String,
    /// path -> the file's identity and digest.
    cache: BoundedMap<String, (Stamp, ExeDigest)>,
    /// job -> executable path -> digest when it ran.
    executables: BoundedMap<JobKey, HashMap<String, ExeDigest>>,
    attested: BoundedMap<JobKey, ()>,
    written: Vec<Written>,
    /// Executables hashed (cache misses), for the tests and the log.
    pub hashed: u64,
}

impl Attestor {
    /// Attestations go to `dir` (created); `host` names the host in every subject.
    pub fn new(key: SigningKey, dir: PathBuf, host: String) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            key,
            dir,
            host,
            cache: BoundedMap::new(EXE_CACHE),
            executables: BoundedMap::new(JOBS),
            attested: BoundedMap::new(JOBS),
            written: Vec::new(),
            hashed: 0,
        })
    }

    /// The host's name (`/proc/sys/kernel/hostname`).
    pub fn host_name() -> String {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    }

    /// Before the engine: an exec of a job's process has its executable hashed.
    pub fn event(&mut self, event: &Event) {
        let (Some(job), EventDetail::Exec { filename, .. }) = (&event.job, &event.detail) else {
            return;
        };
        let known = self
            .executables
            .get(&job.key)
            .is_some_and(|m| m.contains_key(filename.as_str()));
        if known {
            return;
        }
        let digest = self.digest(filename, event.process.pid);
        let per_job = self.executables.get_or_insert_with(job.key, HashMap::new);
        if per_job.len() < EXES_PER_JOB {
            per_job.insert(filename.clone(), digest);
        }
    }

    /// The digest of the executable `path` that `pid` ran (a relative path through
    /// `/proc/<pid>/exe`).
    fn digest(&mut self, path: &str, pid: u32) -> ExeDigest {
        let open = if path.starts_with('/') {
            path.to_owned()
        } else {
            format!("/proc/{pid}/exe")
        };
        let meta = match std::fs::metadata(&open) {
            Ok(m) => m,
            Err(e) => return ExeDigest::Unhashed(format!("unreadable: {e}")),
        };
        if let Some((stamp, digest)) = self.cache.get(path)
            && *stamp == Stamp::of(&meta)
        {
            return digest.clone();
        }
        let digest = hash_file(&open, &meta);
        if path.starts_with('/') {
            self.cache
                .insert(path.to_owned(), (Stamp::of(&meta), digest.clone()));
        }
        self.hashed += 1;
        digest
    }

    /// After time moved: every ended job whose survivors were looked for gets its statement.
    pub fn attest_due(&mut self, reports: &JobReports, engine: &Engine, now_ns: u64) {
        let due: Vec<JobReport> = reports
            .reports()
            .filter(|r| r.end_ns.is_some() && !self.attested.contains_key(&r.key))
            .filter(|r| engine.survivors_checked(r.key) != Some(false))
            .cloned()
            .collect();
        for report in due {
            self.attested.insert(report.key, ());
            match self.attest(&report, now_ns) {
                Ok(w) => {
                    tracing::info!(job = %report.job.id, path = %w.path.display(), "attestation written");
                    self.written.push(w);
                }
                Err(error) => {
                    tracing::error!(job = %report.job.id, %error, "writing the job's attestation")
                }
            }
            self.executables.remove(&report.key);
        }
        // Taken after each call by the pipeline; bounded all the same.
        let excess = self.written.len().saturating_sub(JOBS);
        self.written.drain(..excess);
    }

    /// Signs and writes the statement about `report`'s job.
    pub fn attest(&self, report: &JobReport, now_ns: u64) -> std::io::Result<Written> {
        let none = HashMap::new();
        let executables = self.executables.get(&report.key).unwrap_or(&none);
        let still_present = report
            .findings
            .iter()
            .filter_map(|f| f.credential.as_ref())
            .map(|c| (c.path.clone(), Path::new(&c.path).exists()))
            .collect();
        let cx = Context {
            host: &self.host,
            epoch: SystemTime::now() - Duration::from_nanos(crate::clock::monotonic_ns()),
            now_ns,
            executables,
            still_present: &still_present,
        };
        let statement = statement::statement(report, &cx);
        let payload = serde_json::to_vec(&statement).map_err(std::io::Error::other)?;
        let envelope = dsse::sign(&self.key, &payload);
        let mut bytes = serde_json::to_vec(&envelope).map_err(std::io::Error::other)?;
        bytes.push(b'\n');
        let path = self.dir.join(file_name(report));
        write_atomically(&path, &bytes)?;
        Ok(Written {
            job: report.key,
            path,
            envelope: bytes,
        })
    }

    /// The envelopes written since the last call (the fleet stream's hook).
    pub fn take_written(&mut self) -> Vec<Written> {
        std::mem::take(&mut self.written)
    }
}

fn hash_file(path: &str, meta: &std::fs::Metadata) -> ExeDigest {
    if !meta.is_file() {
        return ExeDigest::Unhashed("not a regular file".to_owned());
    }
    if meta.len() > MAX_EXE_BYTES {
        return ExeDigest::Unhashed(format!("larger than {MAX_EXE_BYTES} bytes"));
    }
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return ExeDigest::Unhashed(format!("unreadable: {e}")),
    };
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0u64;
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                total += n as u64;
                if total > MAX_EXE_BYTES {
                    return ExeDigest::Unhashed(format!("larger than {MAX_EXE_BYTES} bytes"));
                }
                hasher.update(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return ExeDigest::Unhashed(format!("unreadable: {e}")),
        }
    }
    ExeDigest::Sha256(dsse::hex(&hasher.finalize()))
}

/// `<key>-<id>.intoto.json`: the kernel's job key (unique) and the CI's id with every byte outside
/// `[A-Za-z0-9._-]` made `_`, cut to 64 characters (job ids come from the job's environment).
pub fn file_name(report: &JobReport) -> String {
    let id: String = report
        .job
        .id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    format!("{}-{id}.intoto.json", report.key)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}
