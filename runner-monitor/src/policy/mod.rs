//! Policy: which paths are credentials, which sockets are secret, where jobs may connect, and the
//! per-repository rules. TOML, with a built-in default (`default.toml`) that works with no file.
//!
//! Every error names the file, the line and column, and the field.

mod file;

pub use file::JobIdentity;
pub mod sensor;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
};

use globset::{Glob, GlobBuilder, GlobMatcher, GlobSet, GlobSetBuilder};
use ipnet::IpNet;
pub use sensor::SensorPolicy;
use toml::Spanned;

use runner_monitor_common::COMM_LEN;

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
    pub repository: GlobMatcher,
    pub workflow: GlobMatcher,
    pub allow_egress: Vec<AllowedDestination>,
    pub secret_sockets: BTreeSet<String>,
    pub grace_period_seconds: Option<u64>,
    pub severity: BTreeMap<RuleId, Severity>,
    /// rule -> reason.
    pub suppress: BTreeMap<RuleId, String>,
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
    credential_cache: std::sync::Mutex<std::collections::HashMap<String, Option<usize>>>,
    pub secret_socket_kinds: Vec<String>,
    socket_set: GlobSet,
    socket_owner: Vec<usize>,
    pub metadata_endpoints: Vec<IpAddr>,
    pub egress_allow: Vec<AllowedDestination>,
    pub rules: Vec<JobRule>,
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
}

impl Source<'_> {
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
        (Some(_), None) if line.trim_start().starts_with('[') => line
            .trim()
            .trim_matches(|c| c == '[' || c == ']')
            .to_owned(),
        _ => "-".to_owned(),
    }
}

fn path_glob(pattern: &str) -> Result<Glob, globset::Error> {
    GlobBuilder::new(pattern).literal_separator(true).build()
}

fn name_glob(pattern: &str) -> Result<GlobMatcher, globset::Error> {
    Ok(GlobBuilder::new(pattern).build()?.compile_matcher())
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
        Self::parse(&text, &origin)
    }

    /// Parses and checks policy text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, PolicyError> {
        let src = Source { origin, text };
        let parsed: file::PolicyFile = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            let message = e.message().to_owned();
            src.error(span.clone(), &field_at(text, span.start), message)
        })?;
        Self::compile(parsed, &src)
    }

    fn compile(f: file::PolicyFile, src: &Source<'_>) -> Result<Self, PolicyError> {
        let err =
            |s: &std::ops::Range<usize>, field: String, m: String| src.error(s.clone(), &field, m);

        let mut job_root_executables = Vec::new();
        for (i, exe) in f.agent.job_root_executables.iter().enumerate() {
            let name = exe.get_ref();
            if name.is_empty() || name.contains('/') || name.len() > runner_monitor_common::NAME_LEN
            {
                return Err(err(
                    &exe.span(),
                    format!("agent.job_root_executables[{i}]"),
                    format!(
                        "an executable basename of 1 to {} bytes without '/'",
                        runner_monitor_common::NAME_LEN
                    ),
                ));
            }
            job_root_executables.push(name.clone());
        }
        let mut job_parent_executables = Vec::new();
        for (i, comm) in f.agent.job_parent_executables.iter().enumerate() {
            let name = comm.get_ref();
            if name.is_empty() || name.len() >= COMM_LEN || name.contains('/') {
                return Err(err(
                    &comm.span(),
                    format!("agent.job_parent_executables[{i}]"),
                    format!(
                        "a process name (comm) of 1 to {} bytes without '/'",
                        COMM_LEN - 1
                    ),
                ));
            }
            job_parent_executables.push(name.clone());
        }
        if f.agent.harvesting_kinds < 2 {
            return Err(src.error(0..0, "agent.harvesting_kinds", "must be at least 2"));
        }

        let mut credentials = Vec::new();
        let mut builder = GlobSetBuilder::new();
        let mut credential_owner = Vec::new();
        for (i, c) in f.credentials.iter().enumerate() {
            let kind = c.kind.get_ref().trim();
            if kind.is_empty() {
                return Err(err(
                    &c.kind.span(),
                    format!("credentials[{i}].kind"),
                    "empty".into(),
                ));
            }
            if c.paths.is_empty() {
                return Err(err(
                    &c.kind.span(),
                    format!("credentials[{i}].paths"),
                    "no paths".into(),
                ));
            }
            let mut patterns = Vec::new();
            for (j, p) in c.paths.iter().enumerate() {
                let field = format!("credentials[{i}].paths[{j}]");
                let glob = path_glob(p.get_ref())
                    .map_err(|e| err(&p.span(), field.clone(), e.to_string()))?;
                if !p.get_ref().starts_with('/') && !p.get_ref().starts_with("**/") {
                    return Err(err(
                        &p.span(),
                        field,
                        "must be absolute or start with **/".into(),
                    ));
                }
                sensor::kernel_name(p.get_ref()).map_err(|m| err(&p.span(), field, m))?;
                builder.add(glob);
                credential_owner.push(credentials.len());
                patterns.push(p.get_ref().clone());
            }
            credentials.push(CredentialKind {
                kind: kind.to_owned(),
                runner: c.runner,
                patterns,
            });
        }
        let credential_set = builder
            .build()
            .map_err(|e| src.error(0..0, "credentials", e.to_string()))?;

        let mut secret_socket_kinds = Vec::new();
        let mut builder = GlobSetBuilder::new();
        let mut socket_owner = Vec::new();
        for (i, s) in f.secret_sockets.iter().enumerate() {
            for (j, p) in s.paths.iter().enumerate() {
                let field = format!("secret_sockets[{i}].paths[{j}]");
                let glob =
                    path_glob(p.get_ref()).map_err(|e| err(&p.span(), field, e.to_string()))?;
                builder.add(glob);
                socket_owner.push(secret_socket_kinds.len());
            }
            secret_socket_kinds.push(s.kind.get_ref().clone());
        }
        let socket_set = builder
            .build()
            .map_err(|e| src.error(0..0, "secret_sockets", e.to_string()))?;

        let mut metadata_endpoints = Vec::new();
        for (i, e) in f.metadata.endpoints.iter().enumerate() {
            let ip: IpAddr = e.get_ref().parse().map_err(|_| {
                err(
                    &e.span(),
                    format!("metadata.endpoints[{i}]"),
                    format!("not an IP address: {:?}", e.get_ref()),
                )
            })?;
            metadata_endpoints.push(ip);
        }

        let destinations = |list: &[Spanned<file::DestinationEntry>],
                            at: &str|
         -> Result<Vec<AllowedDestination>, PolicyError> {
            list.iter()
                .enumerate()
                .map(|(i, d)| destination(d, &format!("{at}[{i}]"), src))
                .collect()
        };
        let egress_allow = destinations(&f.egress.allow, "egress.allow")?;

        let mut rules = Vec::new();
        let known_sockets: BTreeSet<&str> =
            secret_socket_kinds.iter().map(String::as_str).collect();
        for (i, r) in f.rules.iter().enumerate() {
            let at = format!("rules[{i}]");
            let selector =
                |g: &Option<Spanned<String>>, field: &str| -> Result<GlobMatcher, PolicyError> {
                    match g {
                        None => Ok(name_glob("*").expect("valid")),
                        Some(g) => name_glob(g.get_ref())
                            .map_err(|e| err(&g.span(), format!("{at}.{field}"), e.to_string())),
                    }
                };
            let repository = selector(&r.repository, "repository")?;
            let workflow = selector(&r.workflow, "workflow")?;
            let allow_egress = destinations(&r.allow_egress, &format!("{at}.allow_egress"))?;
            let mut secret_sockets = BTreeSet::new();
            for (j, s) in r.secret_sockets.iter().enumerate() {
                if !known_sockets.contains(s.get_ref().as_str()) {
                    return Err(err(
                        &s.span(),
                        format!("{at}.secret_sockets[{j}]"),
                        format!(
                            "no secret socket kind {:?} (known: {:?})",
                            s.get_ref(),
                            known_sockets
                        ),
                    ));
                }
                secret_sockets.insert(s.get_ref().clone());
            }
            let mut severity = BTreeMap::new();
            for (rule, level) in &r.severity {
                let field = format!("{at}.severity.{rule}");
                let rule_id = RuleId::parse(rule).ok_or_else(|| {
                    err(&level.span(), field.clone(), format!("no rule {rule:?}"))
                })?;
                let level_value = Severity::parse(level.get_ref()).ok_or_else(|| {
                    err(
                        &level.span(),
                        field,
                        format!(
                            "severity must be info, low, medium, high or critical, not {:?}",
                            level.get_ref()
                        ),
                    )
                })?;
                severity.insert(rule_id, level_value);
            }
            let mut suppress = BTreeMap::new();
            for (j, s) in r.suppress.iter().enumerate() {
                let field = format!("{at}.suppress[{j}]");
                let entry = s.get_ref();
                let rule_id = RuleId::parse(&entry.rule).ok_or_else(|| {
                    err(
                        &s.span(),
                        format!("{field}.rule"),
                        format!("no rule {:?}", entry.rule),
                    )
                })?;
                if entry.reason.trim().is_empty() {
                    return Err(err(
                        &s.span(),
                        format!("{field}.reason"),
                        "a suppression needs a reason".into(),
                    ));
                }
                suppress.insert(rule_id, entry.reason.clone());
            }
            rules.push(JobRule {
                repository,
                workflow,
                allow_egress,
                secret_sockets,
                grace_period_seconds: r.grace_period_seconds,
                severity,
                suppress,
            });
        }

        for (i, id) in f.job_identity.iter().enumerate() {
            if id.id.is_empty() || id.detect.is_empty() {
                return Err(src.error(
                    0..0,
                    &format!("job_identity[{i}]"),
                    "needs `detect` and at least one `id` variable",
                ));
            }
        }
        Ok(Self {
            job_root_executables,
            job_parent_executables,
            stage_gap_seconds: f.agent.stage_gap_seconds,
            job_identity: f.job_identity,
            grace_period_seconds: f.agent.grace_period_seconds,
            dedup_window_seconds: f.agent.dedup_window_seconds,
            harvesting_kinds: f.agent.harvesting_kinds,
            max_processes: f.limits.processes.max(16),
            max_jobs: f.limits.jobs.max(4),
            max_credentials: f.limits.credentials.max(16),
            max_dns_addresses: f.limits.dns_addresses.max(16),
            job_events_per_second: f.limits.job_events_per_second,
            credentials,
            credential_set,
            credential_owner,
            credential_cache: Default::default(),
            secret_socket_kinds,
            socket_set,
            socket_owner,
            metadata_endpoints,
            egress_allow,
            rules,
        })
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

    /// The secret-socket kind of a unix socket path.
    pub fn secret_socket_of(&self, path: &str) -> Option<&str> {
        let hit = self.socket_set.matches(path).into_iter().next()?;
        self.secret_socket_kinds
            .get(self.socket_owner[hit])
            .map(String::as_str)
    }

    pub fn is_metadata_endpoint(&self, ip: IpAddr) -> bool {
        self.metadata_endpoints.contains(&ip)
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

    /// What the kernel prefilter needs.
    pub fn sensor_policy(&self) -> SensorPolicy {
        let mut p = SensorPolicy::from_credentials(
            self.credentials
                .iter()
                .flat_map(|c| c.patterns.iter().map(String::as_str)),
            &self.job_root_executables,
            &self.job_parent_executables,
        );
        p.job_events_per_second = self.job_events_per_second;
        p
    }
}

fn destination(
    d: &Spanned<file::DestinationEntry>,
    field: &str,
    src: &Source<'_>,
) -> Result<AllowedDestination, PolicyError> {
    let entry = d.get_ref();
    let destination = match (&entry.cidr, &entry.name) {
        (Some(cidr), None) => {
            let net: IpNet = cidr
                .parse()
                .or_else(|_| cidr.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    src.error(
                        d.span(),
                        &format!("{field}.cidr"),
                        format!("not a CIDR or IP: {cidr:?}"),
                    )
                })?;
            Destination::Net(net)
        }
        (None, Some(name)) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            let bare = name.strip_prefix("*.").unwrap_or(&name);
            if bare.is_empty()
                || bare.contains('*')
                || bare.contains(|c: char| c.is_whitespace() || c == '/')
            {
                return Err(src.error(
                    d.span(),
                    &format!("{field}.name"),
                    format!("a DNS name, optionally starting with '*.', not {name:?}"),
                ));
            }
            Destination::Name(name)
        }
        _ => {
            return Err(src.error(d.span(), field, "exactly one of `cidr` or `name`"));
        }
    };
    Ok(AllowedDestination {
        destination,
        ports: entry.ports.clone(),
    })
}

#[cfg(test)]
mod tests;
