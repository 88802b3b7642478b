//! The policy file's form (TOML), as written by people. Unknown fields are errors: a typo must not
//! silently turn a rule off.

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    #[serde(default)]
    pub agent: AgentSection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub job_identity: Vec<JobIdentity>,
    #[serde(default)]
    pub credentials: Vec<CredentialSection>,
    #[serde(default)]
    pub secret_sockets: Vec<SecretSocketSection>,
    #[serde(default)]
    pub persistence: Vec<PersistenceSection>,
    #[serde(default)]
    pub metadata: MetadataSection,
    #[serde(default)]
    pub egress: EgressSection,
    #[serde(default)]
    pub rules: Vec<Spanned<RuleSection>>,
    #[serde(default)]
    pub fleet: FleetSection,
}

/// A baseline file (`[[rules]] baseline = "FILE"`): learned rules, nothing else.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaselineFile {
    #[serde(default)]
    pub rules: Vec<Spanned<RuleSection>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSection {
    pub job_root_executables: Vec<Spanned<String>>,
    pub job_parent_executables: Vec<Spanned<String>>,
    pub stage_gap_seconds: u64,
    pub grace_period_seconds: u64,
    pub dedup_window_seconds: u64,
    pub harvesting_kinds: usize,
}

impl Default for AgentSection {
    fn default() -> Self {
        Self {
            job_root_executables: Vec::new(),
            job_parent_executables: Vec::new(),
            stage_gap_seconds: 10,
            grace_period_seconds: 30,
            dedup_window_seconds: 600,
            harvesting_kinds: 3,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    pub processes: usize,
    pub jobs: usize,
    pub credentials: usize,
    pub dns_addresses: usize,
    pub job_events_per_second: u32,
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            processes: 65536,
            jobs: 4096,
            credentials: 16384,
            dns_addresses: 65536,
            job_events_per_second: 200_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialSection {
    pub kind: Spanned<String>,
    pub paths: Vec<Spanned<String>>,
    /// The runner's own registration credentials.
    #[serde(default)]
    pub runner: bool,
}

/// `[[persistence]]`: paths that something outside the job runs or reads later (cron, systemd,
/// `ld.so.preload`, shell profiles, the runner's own files, ...).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersistenceSection {
    pub kind: Spanned<String>,
    /// The MITRE ATT&CK technique of planting work here, one `policy::persistence` knows.
    pub technique: Spanned<String>,
    pub paths: Vec<Spanned<String>>,
    /// The runner's own files: critical.
    #[serde(default)]
    pub runner: bool,
    /// Only other users' files count: a process writing under its own home (`/root` for root;
    /// a non-root process cannot write another user's home anyway) is a tool installer at work.
    #[serde(default)]
    pub other_users_only: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSocketSection {
    pub kind: Spanned<String>,
    pub paths: Vec<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetadataSection {
    #[serde(default)]
    pub endpoints: Vec<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressSection {
    #[serde(default)]
    pub allow: Vec<Spanned<DestinationEntry>>,
    /// `audit` (report only; the default) or `block` (refuse in the kernel what the allowlist
    /// does not admit).
    pub mode: Option<Spanned<String>>,
    /// What a crashed agent leaves behind: `open` (enforcement goes with it) or `closed`.
    pub on_agent_failure: Option<Spanned<String>>,
    /// Where the agent's resolver forwards job queries in block mode (`ip` or `ip:port`).
    #[serde(default)]
    pub dns_upstream: Vec<Spanned<String>>,
}

/// One allowed destination: a CIDR or a DNS name (wildcards allowed), optionally limited to ports.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationEntry {
    pub cidr: Option<String>,
    pub name: Option<String>,
    #[serde(default)]
    pub ports: Vec<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSection {
    /// Glob over `owner/name` (GitHub) or the project path (GitLab). Default: every repository.
    pub repository: Option<Spanned<String>>,
    /// Glob over the workflow (GitHub) or job name (GitLab). Default: every workflow.
    pub workflow: Option<Spanned<String>>,
    #[serde(default)]
    pub allow_egress: Vec<Spanned<DestinationEntry>>,
    /// `audit` or `block`: the egress mode of these jobs, over `[egress] mode`.
    pub mode: Option<Spanned<String>>,
    /// These jobs may reach the cloud metadata endpoints (in block mode too; no
    /// metadata-endpoint-access).
    pub metadata: Option<bool>,
    /// `true`: these jobs' TLS must name (SNI) a server in the DNS names of the allowlist;
    /// refused in the kernel in block mode (docs/policy.md, "TLS server names").
    pub sni: Option<Spanned<bool>>,
    /// Secret-socket kinds these jobs may use.
    #[serde(default)]
    pub secret_sockets: Vec<Spanned<String>>,
    pub grace_period_seconds: Option<u64>,
    /// rule id -> severity.
    #[serde(default)]
    pub severity: std::collections::BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    pub suppress: Vec<Spanned<SuppressEntry>>,
    /// `true`: a learned baseline (what these jobs normally use; anything else is
    /// `baseline-deviation`). A string: a file of learned rules to include here, relative to
    /// this file's directory; the entry then holds nothing else.
    pub baseline: Option<Spanned<toml::Value>>,
    /// Credential kinds these jobs read or write (baselines only).
    #[serde(default)]
    pub credential_kinds: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuppressEntry {
    pub rule: String,
    /// Why: required, so every silenced detection is explained.
    pub reason: String,
}

/// Environment variables that identify a job of one CI platform.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct JobIdentity {
    pub platform: String,
    /// Set in every job process of this platform.
    pub detect: String,
    pub id: Vec<String>,
    pub repository: Option<String>,
    pub workflow: Option<String>,
    pub run: Option<String>,
    pub attempt: Option<String>,
    pub runner: Option<String>,
    pub actor: Option<String>,
    pub git_ref: Option<String>,
    pub event: Option<String>,
    pub tracking_id: Option<String>,
    /// The job runs as several process trees (GitLab's stages) that share its id: they are one
    /// job, which ends `stage_gap_seconds` after the last stage unless a hook ends it first.
    #[serde(default)]
    pub stages: bool,
}

/// `[fleet]`: the fleet's NATS JetStream stream (`run --nats URL` turns publishing on).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSection {
    /// `nats://HOST:PORT` or `tls://HOST:PORT`; `--nats` takes precedence.
    pub url: Option<Spanned<String>>,
    pub stream: Option<Spanned<String>>,
    pub subject_prefix: Option<Spanned<String>>,
    /// The host name in subjects and messages; default: the kernel's host name.
    pub host: Option<Spanned<String>>,
    /// A NATS credentials file (`.creds`: user JWT and NKey seed).
    pub credentials: Option<Spanned<String>>,
    /// PEM file of the CA(s) the server's certificate must chain to (TLS).
    pub tls_ca: Option<Spanned<String>>,
    /// PEM client certificate and key, for servers that verify clients.
    pub tls_cert: Option<Spanned<String>>,
    pub tls_key: Option<Spanned<String>>,
    /// JetStream's duplicate window when the agent creates the stream.
    pub duplicate_window_seconds: Option<Spanned<u64>>,
}

impl JobIdentity {
    /// The variables whose values make the job's identity (what the kernel may copy out).
    pub fn value_vars(&self) -> impl Iterator<Item = &String> {
        self.id.iter().chain(
            [
                &self.repository,
                &self.workflow,
                &self.run,
                &self.attempt,
                &self.runner,
                &self.actor,
                &self.git_ref,
                &self.event,
                &self.tracking_id,
            ]
            .into_iter()
            .flatten(),
        )
    }
}
