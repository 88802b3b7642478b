//! Policy: which paths are credentials, which sockets are secret, where jobs may connect, and the
//! per-repository rules. TOML, with a built-in default (`default.toml`) that works with no file.
//!
//! Every error names the file, the line and column, and the field.

mod compile;
mod egress;
mod file;
pub mod fleet;
mod glob;
mod persistence;

pub use egress::{AgentFailure, EgressMode, EgressPlan, EgressSettings, egress_address};
pub use file::JobIdentity;
pub use persistence::{PersistenceKind, TECHNIQUES, technique_name};
pub mod sensor;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
};

pub use fleet::FleetConfig;
use globset::{GlobMatcher, GlobSet};
use ipnet::IpNet;
pub use sensor::SensorPolicy;

use crate::rule::{RuleId, Severity};

/// The built-in policy text.
pub const DEFAULT_POLICY: &str = include_str!("default.toml");

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{origin}:{line}:{column}: {field}: {message}")]
pub struct PolicyError {
    /// The file (or "built-in").
    pub origin: String,
    pub line: usize,
    pub column: usize,
    /// Dotted path of the field, e.g. `rules[2].allow_egress[0].cidr`.
    pub field: String,
    pub message: String,
}

/// A credential kind and the globs of its files.
#[derive(Debug, Clone)]
pub struct CredentialKind {
    pub kind: String,
    /// The runner's own registration credentials.
    pub runner: bool,
    pub patterns: Vec<String>,
}

/// An allowed destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Net(IpNet),
    /// Lowercase, without the trailing dot; `*.example.com` matches any subdomain depth.
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedDestination {
    pub destination: Destination,
    /// Empty: every port.
    pub ports: Vec<u16>,
}

impl AllowedDestination {
    /// Whether a connection to `ip:port`, whose address the job resolved from `names`, is allowed.
    pub fn allows(&self, ip: IpAddr, port: u16, names: &[String]) -> bool {
        if !self.ports.is_empty() && !self.ports.contains(&port) {
            return false;
        }
        match &self.destination {
            Destination::Net(net) => net.contains(&ip),
            Destination::Name(pattern) => names.iter().any(|n| name_matches(pattern, n)),
        }
    }
}

/// `*.example.com` matches `a.example.com` and `a.b.example.com`, not `example.com`.
pub fn name_matches(pattern: &str, name: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(suffix) => name.len() > suffix.len() + 1 && name.ends_with(&format!(".{suffix}")),
        None => name == pattern,
    }
}

/// A per-repository / per-workflow rule.
#[derive(Debug)]
pub struct JobRule {
    /// Where it was written: `FILE:LINE`.
    pub origin: String,
    pub repository: GlobMatcher,
    pub workflow: GlobMatcher,
    pub allow_egress: Vec<AllowedDestination>,
    /// `mode`: the egress mode of the jobs it selects, over `[egress] mode`.
    pub mode: Option<EgressMode>,
    /// `metadata = true`: the jobs may reach the cloud metadata endpoints.
    pub metadata: bool,
    /// `sni = true`: TLS server names must be in the allowlist's DNS names.
    pub sni: bool,
    pub secret_sockets: BTreeSet<String>,
    pub grace_period_seconds: Option<u64>,
    pub severity: BTreeMap<RuleId, Severity>,
    /// rule -> reason.
    pub suppress: BTreeMap<RuleId, String>,
    /// A learned baseline: its allowances and `credential_kinds` are what the jobs it selects
    /// normally use, and anything else they use is `baseline-deviation`.
    pub baseline: bool,
    /// Credential kinds the jobs read or write (baselines only).
    pub credential_kinds: BTreeSet<String>,
}

/// Paths whose credential kind `Policy::credential_of` remembers.
const CREDENTIAL_CACHE: usize = 8192;

/// The policy, checked and compiled.
#[derive(Debug)]
pub struct Policy {
    pub job_root_executables: Vec<String>,
    pub job_parent_executables: Vec<String>,
    /// A job whose identity has `stages` ends this long after its last stage's root exited,
    /// unless another stage starts.
    pub stage_gap_seconds: u64,
    pub job_identity: Vec<JobIdentity>,
    pub grace_period_seconds: u64,
    pub dedup_window_seconds: u64,
    pub harvesting_kinds: usize,
    pub max_processes: usize,
    pub max_jobs: usize,
    pub max_credentials: usize,
    pub max_dns_addresses: usize,
    /// Per-job event budget the kernel enforces (0: none).
    pub job_events_per_second: u32,
    pub credentials: Vec<CredentialKind>,
    credential_set: GlobSet,
    /// For each glob of `credential_set`, its index in `credentials`.
    credential_owner: Vec<usize>,
    /// path -> its credential kind's index: the paths the kernel lets through repeat (a job reads
    /// the same files again and again), and a glob-set match costs more than the rest of an
    /// event's handling. Emptied when it reaches `CREDENTIAL_CACHE` entries.
    credential_cache:
        std::sync::Mutex<std::collections::HashMap<String, Option<usize>, crate::bounded::Hasher>>,
    /// `[[persistence]]`: paths something outside the job runs later.
    pub persistence: Vec<PersistenceKind>,
    persistence_set: GlobSet,
    /// For each glob of `persistence_set`, its index in `persistence`.
    persistence_owner: Vec<usize>,
    pub secret_socket_kinds: Vec<String>,
    socket_set: GlobSet,
    socket_owner: Vec<usize>,
    /// The secret socket paths that are not globs: the agent compares what a job connects to
    /// with the sockets at these paths (`identity`).
    pub secret_socket_paths: Vec<String>,
    /// The file names of the `docker` kind's socket paths (`sensor::runtime_socket_names`).
    pub runtime_sockets: Vec<String>,
    pub metadata_endpoints: Vec<IpAddr>,
    pub egress_allow: Vec<AllowedDestination>,
    /// `[egress] mode` and `on_agent_failure`.
    pub egress: EgressSettings,
    pub rules: Vec<JobRule>,
    /// `[fleet]`: where and how the fleet stream is reached.
    pub fleet: FleetConfig,
}

/// What a job is, as far as rule selection needs it.
#[derive(Debug, Clone, Copy, Default)]
pub struct JobSelector<'a> {
    pub repository: Option<&'a str>,
    pub workflow: Option<&'a str>,
}

/// Offsets -> line and column.
struct Source<'a> {
    origin: &'a str,
    text: &'a str,
    /// The policy file's directory, against which baseline files resolve; `None` for policy
    /// text, which may not reference files.
    dir: Option<&'a Path>,
}

impl Source<'_> {
    /// `origin:line` of a span.
    fn place(&self, span: std::ops::Range<usize>) -> String {
        let e = self.error(span, "", "");
        format!("{}:{}", e.origin, e.line)
    }

    fn error(
        &self,
        span: std::ops::Range<usize>,
        field: &str,
        message: impl Into<String>,
    ) -> PolicyError {
        let before = &self.text[..span.start.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        PolicyError {
            origin: self.origin.to_owned(),
            line,
            column,
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

/// The dotted field a TOML parse error at byte `at` is about: the key on that line under the
/// nearest table header above it (`agent.grace_period_seconds`, `credentials.paths`); "-" when
/// the line holds no key (toml then names the field in its message, e.g. "missing field").
fn field_at(text: &str, at: usize) -> String {
    let at = at.min(text.len());
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    let line = &text[line_start..line_end];
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim())
        .filter(|k| !k.is_empty() && !k.starts_with('['));
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim());
    match (table, key) {
        (Some(t), Some(k)) => format!("{t}.{k}"),
        (None, Some(k)) => k.to_owned(),
        // A table header line (`[egress]`, `[[rules]]`); a header without a name (`[`) is "-".
        (Some(_), None) if line.trim_start().starts_with('[') => {
            let header = line.trim().trim_matches(|c| c == '[' || c == ']').trim();
            if header.is_empty() {
                "-".to_owned()
            } else {
                header.to_owned()
            }
        }
        _ => "-".to_owned(),
    }
}

impl Policy {
    /// The built-in policy.
    pub fn builtin() -> Self {
        Self::parse(DEFAULT_POLICY, "built-in").expect("the built-in policy is valid")
    }

    /// Reads and checks a policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError {
            origin: origin.clone(),
            line: 0,
            column: 0,
            field: "-".into(),
            message: format!("cannot read: {e}"),
        })?;
        let src = Source {
            origin: &origin,
            text: &text,
            dir: Some(path.parent().unwrap_or(Path::new("."))),
        };
        Self::parse_source(&src)
    }

    /// Parses and checks policy text; `origin` names it in errors. Text cannot reference
    /// baseline files (`Policy::load` can: they resolve against the policy file's directory).
    pub fn parse(text: &str, origin: &str) -> Result<Self, PolicyError> {
        Self::parse_source(&Source {
            origin,
            text,
            dir: None,
        })
    }

    fn parse_source(src: &Source<'_>) -> Result<Self, PolicyError> {
        let text = src.text;
        let parsed: file::PolicyFile = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            let message = e.message().to_owned();
            src.error(span.clone(), &field_at(text, span.start), message)
        })?;
        Self::compile(parsed, src)
    }

    /// The credential a file access reached: by the file's path on the host, or else by the
    /// path the process used (a pod's `/var/run/secrets/.../token` is bound from a file the
    /// kubelet names otherwise on the host; a container's `/h/.aws/credentials` from any file).
    pub fn credential_of_access(&self, f: &crate::event::FileAccess) -> Option<&CredentialKind> {
        self.credential_of(&f.path)
            .or_else(|| self.credential_of(f.via.as_deref()?))
    }

    /// The credential kind of a path, if it is a credential.
    pub fn credential_of(&self, path: &str) -> Option<&CredentialKind> {
        let mut cache = self
            .credential_cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let kind = match cache.get(path) {
            Some(kind) => *kind,
            None => {
                let kind = self
                    .credential_set
                    .matches(path)
                    .into_iter()
                    .next()
                    .map(|hit| self.credential_owner[hit]);
                if cache.len() >= CREDENTIAL_CACHE {
                    cache.clear();
                }
                cache.insert(path.to_owned(), kind);
                kind
            }
        };
        self.credentials.get(kind?)
    }

    /// The persistence kind of a path, if something outside the job runs or reads it later.
    pub fn persistence_of(&self, path: &str) -> Option<&PersistenceKind> {
        let hit = self.persistence_set.matches(path).into_iter().next()?;
        self.persistence.get(self.persistence_owner[hit])
    }

    /// The secret-socket kind of a unix socket path.
    pub fn secret_socket_of(&self, path: &str) -> Option<&str> {
        let hit = self.socket_set.matches(path).into_iter().next()?;
        self.secret_socket_kinds
            .get(self.socket_owner[hit])
            .map(String::as_str)
    }

    /// Also under its IPv4-mapped and NAT64 forms (`64:ff9b::a9fe:a9fe`).
    pub fn is_metadata_endpoint(&self, ip: IpAddr) -> bool {
        self.metadata_endpoints.contains(&ip)
            || self.metadata_endpoints.contains(&egress_address(ip))
    }

    /// The rules that apply to a job, in file order.
    pub fn rules_for<'a>(&'a self, job: JobSelector<'a>) -> impl Iterator<Item = &'a JobRule> + 'a {
        self.rules.iter().filter(move |r| {
            r.repository.is_match(job.repository.unwrap_or(""))
                && r.workflow.is_match(job.workflow.unwrap_or(""))
        })
    }

    /// Whether jobs of `platform` run as several process trees (stages) sharing one id.
    pub fn has_stages(&self, platform: Option<&str>) -> bool {
        platform.is_some_and(|p| {
            self.job_identity
                .iter()
                .any(|i| i.platform == p && i.stages)
        })
    }

    /// Every variable `[[job_identity]]` names, in a fixed order (its index is what the kernel
    /// reports), with `JOB_ENV_MARKER` for a `detect` variable and `JOB_ENV_VALUE` for an
    /// identity field: only those values ever leave the kernel.
    pub fn job_env_vars(&self) -> Vec<(String, u32)> {
        use runner_monitor_common::{JOB_ENV_MARKER, JOB_ENV_VALUE};
        let mut vars: Vec<(String, u32)> = Vec::new();
        let mut add = |name: &String, bits: u32| match vars.iter_mut().find(|(n, _)| n == name) {
            Some((_, b)) => *b |= bits,
            None => vars.push((name.clone(), bits)),
        };
        for identity in &self.job_identity {
            add(&identity.detect, JOB_ENV_MARKER);
            for name in identity.value_vars() {
                add(name, JOB_ENV_VALUE);
            }
        }
        vars
    }

    /// What the kernel prefilter needs.
    pub fn sensor_policy(&self) -> SensorPolicy {
        let mut p = SensorPolicy::from_credentials(
            // Persistence paths pass the same name filter: the agent tells them apart by glob.
            self.credentials
                .iter()
                .flat_map(|c| c.patterns.iter().map(String::as_str))
                .chain(
                    self.persistence
                        .iter()
                        .flat_map(|k| k.patterns.iter().map(String::as_str)),
                ),
            &self.job_root_executables,
            &self.job_parent_executables,
        );
        p.job_events_per_second = self.job_events_per_second;
        p.egress = self.global_egress_plan();
        p.metadata_endpoints = self.metadata_endpoints.clone();
        p.failure_closed = self.egress.on_agent_failure == AgentFailure::Closed;
        p.job_env_vars = self.job_env_vars();
        p.runtime_socket_names = self.runtime_sockets.clone();
        p
    }
}

#[cfg(test)]
mod tests;
