//! The fleet's fingerprint ledger: which job, on which host, materialised each credential, and
//! the cross-host reuse it reveals. Pure: messages in (with the caller's wall-clock time), findings
//! out; no I/O and no clock of its own, so the correlator, its tests and the benchmark run the
//! same code.
//!
//! Memory is bounded: an entry is a 16-byte digest, a 4-byte origin-job handle, a 2-byte key
//! handle and the 8-byte time; the origin jobs (host and job identity) are interned and counted,
//! so a job that materialised many credentials is stored once. The ledger holds at most
//! `max_entries` fingerprints (the oldest go first) and forgets each `ttl` after it was
//! materialised; both evictions are counted.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
};

use sha2::{Digest as _, Sha256};

use super::keys::KeyRing;
use super::message::{CredentialUse, FingerprintMessage};
use crate::{
    engine::finding::{CredentialRef, Finding, FindingJob},
    event::{JobInfo, JobKey},
    rule::{RuleId, Severity},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LedgerConfig {
    /// Fingerprints kept at most; past it the oldest is evicted.
    pub max_entries: usize,
    /// A fingerprint is forgotten this long after it was materialised.
    pub ttl_ns: u64,
    /// An old key id is still accepted this long after a newer one was first seen.
    pub key_grace_ns: u64,
}

/// 128 bits of the keyed hash: enough that two credentials never share one by chance, half the
/// memory of the full 256.
type Digest = [u64; 2];

/// Who materialised a fingerprint.
#[derive(Clone, Copy, Debug)]
struct Origin {
    job: u32,
    key: u16,
    time_unix_ns: u64,
}

/// A job on a host, as the ledger remembers it (interned: one copy per job).
#[derive(Debug, PartialEq, Eq, Hash)]
struct OriginJob {
    host: String,
    job: JobInfo,
}

/// Interned origin jobs, counted by the entries that refer to them and freed with the last one.
#[derive(Default)]
struct Jobs {
    slots: Vec<Option<(Arc<OriginJob>, u32)>>,
    index: HashMap<Arc<OriginJob>, u32>,
    free: Vec<u32>,
}

impl Jobs {
    fn acquire(&mut self, job: OriginJob) -> u32 {
        if let Some(&id) = self.index.get(&job) {
            if let Some((_, refs)) = &mut self.slots[id as usize] {
                *refs += 1;
            }
            return id;
        }
        let job = Arc::new(job);
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = Some((job.clone(), 1));
                id
            }
            None => {
                self.slots.push(Some((job.clone(), 1)));
                (self.slots.len() - 1) as u32
            }
        };
        self.index.insert(job, id);
        id
    }

    fn release(&mut self, id: u32) {
        let slot = &mut self.slots[id as usize];
        if let Some((job, refs)) = slot {
            *refs -= 1;
            if *refs == 0 {
                self.index.remove(&**job);
                *slot = None;
                self.free.push(id);
            }
        }
    }

    fn get(&self, id: u32) -> &OriginJob {
        &self.slots[id as usize].as_ref().expect("live origin job").0
    }

    fn len(&self) -> usize {
        self.index.len()
    }
}

/// What happened to one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A materialisation, now in the ledger.
    Recorded,
    /// A materialisation of a fingerprint the ledger already has: the first origin stays.
    Known,
    /// A read of a fingerprint nobody materialised (that the ledger still knows).
    Unknown,
    /// A read of a fingerprint the same job materialised, or a job on the same host (the
    /// agent's own engine reports that one).
    SameHost,
    /// A read of a fingerprint another job materialised on another host: a finding.
    Reuse,
    /// A read the ledger already raised for this job and host.
    AlreadyRaised,
    /// Made with a key id past its grace period: neither recorded nor compared.
    StaleKey,
    /// The message's fields are unusable (no fingerprint).
    Invalid,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Recorded => "recorded",
            Outcome::Known => "known",
            Outcome::Unknown => "unknown",
            Outcome::SameHost => "same_host",
            Outcome::Reuse => "reuse",
            Outcome::AlreadyRaised => "already_raised",
            Outcome::StaleKey => "stale_key",
            Outcome::Invalid => "invalid",
        }
    }

    pub const ALL: [Outcome; 8] = [
        Outcome::Recorded,
        Outcome::Known,
        Outcome::Unknown,
        Outcome::SameHost,
        Outcome::Reuse,
        Outcome::AlreadyRaised,
        Outcome::StaleKey,
        Outcome::Invalid,
    ];
}

/// A cross-host reuse, with the `Nats-Msg-Id` its finding is published under: the same for the
/// same credential, reading host and job, so a redelivered read is not a second finding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Raised {
    pub finding: Finding,
    pub message_id: String,
    /// Its entry in the set of reuses raised ([`Ledger::commit`]).
    dedup: u64,
}

/// Counters since the ledger was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LedgerStats {
    pub evicted_full: u64,
    pub evicted_expired: u64,
}

pub struct Ledger {
    config: LedgerConfig,
    entries: HashMap<Digest, Origin>,
    /// Digests in the order they were recorded (entries are never updated, so this is also
    /// the order they expire in, give or take clock skew between agents).
    order: VecDeque<Digest>,
    jobs: Jobs,
    keys: KeyRing,
    /// Reuses raised (digest, host, job), so a job reading a stolen credential ten times is one
    /// finding; bounded like the ledger.
    raised: HashSet<u64>,
    raised_order: VecDeque<u64>,
    stats: LedgerStats,
}

/// The digest of a fingerprint (`hmac-sha256:<hex>`): its first 128 bits; any other form is
/// hashed to 128 bits.
fn digest(fingerprint: &str) -> Option<Digest> {
    if fingerprint.is_empty() {
        return None;
    }
    let hex = fingerprint.rsplit(':').next().unwrap_or("");
    if hex.len() >= 32 && hex.is_ascii() {
        let hi = u64::from_str_radix(&hex[..16], 16);
        let lo = u64::from_str_radix(&hex[16..32], 16);
        if let (Ok(hi), Ok(lo)) = (hi, lo) {
            return Some([hi, lo]);
        }
    }
    let h = Sha256::digest(fingerprint.as_bytes());
    Some([
        u64::from_be_bytes(h[..8].try_into().expect("8 bytes")),
        u64::from_be_bytes(h[8..16].try_into().expect("8 bytes")),
    ])
}

/// The identity of a raised reuse: credential (digest and key), reading host and job.
fn reuse_id(digest: Digest, key_id: &str, host: &str, job: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [
        &digest[0].to_be_bytes()[..],
        &digest[1].to_be_bytes(),
        key_id.as_bytes(),
        b"\0",
        host.as_bytes(),
        b"\0",
        job.as_bytes(),
    ] {
        h.update(part);
    }
    h.finalize().into()
}

fn finding_job(host: &str, job: &JobInfo) -> FindingJob {
    FindingJob {
        // Agents' job keys mean nothing across hosts: the job is its CI identity and host.
        key: JobKey(0),
        info: job.clone(),
        ended: false,
        ended_ns: None,
        host: Some(host.to_owned()),
    }
}

fn label(job: &JobInfo) -> String {
    match &job.repository {
        Some(repo) => format!("{repo} job {}", job.id),
        None => format!("job {}", job.id),
    }
}

impl Ledger {
    pub fn new(config: LedgerConfig) -> Self {
        Self {
            config,
            entries: HashMap::new(),
            order: VecDeque::new(),
            jobs: Jobs::default(),
            keys: KeyRing::new(config.key_grace_ns),
            raised: HashSet::new(),
            raised_order: VecDeque::new(),
            stats: LedgerStats::default(),
        }
    }

    /// Fingerprints in the ledger.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Distinct origin jobs the entries refer to.
    pub fn origin_jobs(&self) -> usize {
        self.jobs.len()
    }

    pub fn stats(&self) -> LedgerStats {
        self.stats
    }

    /// A message seen in stream order by this correlator's view of the stream (every instance
    /// sees every message): learns key ids and records materialisations. Reads are judged by
    /// [`Ledger::judge`], on the instance the shared consumer gave them to.
    pub fn learn(&mut self, m: &FingerprintMessage, now_unix_ns: u64) -> Outcome {
        self.expire(now_unix_ns);
        self.keys.seen(&m.key_id, m.time_unix_ns.min(now_unix_ns));
        if m.usage != CredentialUse::Materialised {
            return Outcome::Unknown;
        }
        let Some(digest) = digest(&m.fingerprint) else {
            return Outcome::Invalid;
        };
        let Some(key) = self.keys.accepted(&m.key_id, now_unix_ns) else {
            return Outcome::StaleKey;
        };
        if let Some(origin) = self.entries.get(&digest)
            && origin.key == key
        {
            return Outcome::Known;
        }
        if now_unix_ns.saturating_sub(m.time_unix_ns) > self.config.ttl_ns {
            // Replayed from before the ledger's horizon: would be expired at once.
            return Outcome::Unknown;
        }
        while self.entries.len() >= self.config.max_entries.max(1) {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if self.evict(&old) {
                self.stats.evicted_full += 1;
            }
        }
        let job = self.jobs.acquire(OriginJob {
            host: m.host.clone(),
            job: m.job.clone(),
        });
        if let Some(previous) = self.entries.insert(
            digest,
            Origin {
                job,
                key,
                time_unix_ns: m.time_unix_ns,
            },
        ) {
            // Same digest under an older key: the newer key's origin replaces it.
            self.jobs.release(previous.job);
        }
        self.order.push_back(digest);
        Outcome::Recorded
    }

    /// A read, on the instance that was given it: a finding when another job on another host
    /// materialised the same credential (same key id).
    pub fn judge(&mut self, m: &FingerprintMessage, now_unix_ns: u64) -> (Outcome, Option<Raised>) {
        if m.usage != CredentialUse::Read {
            return (Outcome::Recorded, None);
        }
        let Some(digest) = digest(&m.fingerprint) else {
            return (Outcome::Invalid, None);
        };
        let Some(key) = self.keys.accepted(&m.key_id, now_unix_ns) else {
            return (Outcome::StaleKey, None);
        };
        let Some(origin) = self.entries.get(&digest).copied() else {
            return (Outcome::Unknown, None);
        };
        if origin.key != key {
            // Made with another key: not the same credential as far as anyone can tell.
            return (Outcome::Unknown, None);
        }
        let from = self.jobs.get(origin.job);
        if from.host == m.host {
            return (Outcome::SameHost, None);
        }
        let id = reuse_id(digest, &m.key_id, &m.host, &m.job.id);
        let short = u64::from_be_bytes(id[..8].try_into().expect("8 bytes"));
        if self.raised.contains(&short) {
            return (Outcome::AlreadyRaised, None);
        }
        let finding = self.finding(m, from, origin);
        let hex: String = id[..16].iter().map(|b| format!("{b:02x}")).collect();
        (
            Outcome::Reuse,
            Some(Raised {
                finding,
                message_id: format!("fleet:{hex}"),
                dedup: short,
            }),
        )
    }

    /// `raised` was delivered: the same job reading the same credential again is not raised
    /// again. (Not done by `judge`, so that a finding that could not be delivered is raised
    /// again when its message is redelivered.)
    pub fn commit(&mut self, raised: &Raised) {
        if !self.raised.insert(raised.dedup) {
            return;
        }
        self.raised_order.push_back(raised.dedup);
        while self.raised_order.len() > self.config.max_entries.max(1) {
            if let Some(old) = self.raised_order.pop_front() {
                self.raised.remove(&old);
            }
        }
    }

    fn finding(&self, m: &FingerprintMessage, from: &OriginJob, origin: Origin) -> Finding {
        let other_repo =
            matches!((&m.job.repository, &from.job.repository), (Some(a), Some(b)) if a != b);
        let kind = m
            .credential_kind
            .clone()
            .unwrap_or_else(|| "unknown".into());
        let mut finding = Finding::new(
            RuleId::CrossJobCredentialReuse,
            m.time_unix_ns,
            format!(
                "{} on {} read {kind} credential {} that {} materialised on {} at {}{}",
                label(&m.job),
                m.host,
                m.path,
                label(&from.job),
                from.host,
                humantime::format_rfc3339_millis(
                    std::time::UNIX_EPOCH + std::time::Duration::from_nanos(origin.time_unix_ns)
                ),
                if other_repo {
                    " (another repository)"
                } else {
                    ""
                }
            ),
        );
        if other_repo {
            finding.severity = Severity::Critical;
        }
        finding.job = Some(finding_job(&m.host, &m.job));
        finding.origin_job = Some(finding_job(&from.host, &from.job));
        finding.credential = Some(CredentialRef {
            path: m.path.clone(),
            kind,
            fingerprint: Some(m.fingerprint.clone()),
            used_path: None,
        });
        finding
    }

    /// Forgets what was materialised more than the TTL before `now`.
    pub fn expire(&mut self, now_unix_ns: u64) {
        let horizon = now_unix_ns.saturating_sub(self.config.ttl_ns);
        while let Some(front) = self.order.front().copied() {
            match self.entries.get(&front) {
                Some(origin) if origin.time_unix_ns >= horizon => break,
                _ => {
                    self.order.pop_front();
                    if self.evict(&front) {
                        self.stats.evicted_expired += 1;
                    }
                }
            }
        }
    }

    fn evict(&mut self, digest: &Digest) -> bool {
        match self.entries.remove(digest) {
            Some(origin) => {
                self.jobs.release(origin.job);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
#[path = "ledger_tests.rs"]
mod tests;
