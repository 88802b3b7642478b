//! The kernel prefilter's view of the policy: names, not globs. A path passes when its basename,
//! its last directory name, or a prefix of its basename is listed; the agent then applies the full
//! glob to the resolved path. Each credential glob is turned into one such name.

use runner_monitor_common::{MAX_PREFIX_LEN, NAME_LEN};

use super::{PolicyError, Source, file};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SensorPolicy {
    /// Exact basenames of credential files.
    pub credential_basenames: Vec<String>,
    /// Directories whose every file is a credential.
    pub credential_dirnames: Vec<String>,
    /// Basename prefixes of credential files (`id_` for SSH keys).
    pub credential_prefixes: Vec<String>,
    /// Executable basenames that start a job when executed (`Runner.Worker`).
    pub job_root_executables: Vec<String>,
    /// Process names (comm) whose every child outside a job starts a job (`gitlab-runner`).
    pub job_parent_executables: Vec<String>,
    /// File, connect and DNS events one job may send per second (0: no limit).
    pub job_events_per_second: u32,
    /// Environment variables of job identities, with `JOB_ENV_*` bits (`Policy::job_env_vars`).
    pub job_env_vars: Vec<(String, u32)>,
    /// What the kernel enforces for jobs it has no plan of their own for: the global mode and
    /// allowlist (`Policy::global_egress_plan`).
    pub egress: super::EgressPlan,
    /// The cloud metadata endpoints, refused in block mode unless a rule entitles the job.
    pub metadata_endpoints: Vec<std::net::IpAddr>,
    /// `[egress] on_agent_failure = "closed"`: programs that outlive a crashed agent refuse
    /// jobs' egress.
    pub failure_closed: bool,
    /// The file names of container runtime API sockets (`docker.sock`): a job's requests are
    /// read only on a socket whose listener was bound at such a name (`Policy::runtime_sockets`).
    pub runtime_socket_names: Vec<String>,
}

impl Default for SensorPolicy {
    /// The built-in policy's.
    fn default() -> Self {
        super::Policy::builtin().sensor_policy()
    }
}

/// What the kernel matches for one glob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelName {
    Basename(String),
    Dirname(String),
    Prefix(String),
}

fn is_literal(s: &str) -> bool {
    !s.contains(['*', '?', '[', ']', '{', '}'])
}

/// The kernel-side name of a credential glob, or why there is none.
pub fn kernel_name(pattern: &str) -> Result<KernelName, String> {
    let mut parts = pattern.rsplit('/');
    let base = parts.next().unwrap_or("");
    let parent = parts.next().unwrap_or("");
    let limit = runner_monitor_common::NAME_LEN;
    if is_literal(base) && !base.is_empty() {
        return if base.len() <= limit {
            Ok(KernelName::Basename(base.to_owned()))
        } else {
            Err(format!("file name longer than {limit} bytes"))
        };
    }
    if (base == "*" || base == "**") && is_literal(parent) && !parent.is_empty() {
        return if parent.len() <= limit {
            Ok(KernelName::Dirname(parent.to_owned()))
        } else {
            Err(format!("directory name longer than {limit} bytes"))
        };
    }
    let prefix: String = base
        .chars()
        .take_while(|c| !"*?[]{}".contains(*c))
        .collect();
    if !prefix.is_empty() {
        return Ok(KernelName::Prefix(
            prefix.chars().take(MAX_PREFIX_LEN).collect(),
        ));
    }
    Err("the kernel filter needs a literal file name, a literal prefix of it, or a literal directory \
         name before a final `*`"
        .to_owned())
}

impl SensorPolicy {
    pub fn from_credentials<'a>(
        patterns: impl IntoIterator<Item = &'a str>,
        job_root_executables: &[String],
        job_parent_executables: &[String],
    ) -> Self {
        let mut p = SensorPolicy {
            credential_basenames: Vec::new(),
            credential_dirnames: Vec::new(),
            credential_prefixes: Vec::new(),
            job_root_executables: job_root_executables.to_vec(),
            job_parent_executables: job_parent_executables.to_vec(),
            job_events_per_second: 0,
            job_env_vars: Vec::new(),
            egress: super::EgressPlan::default(),
            metadata_endpoints: Vec::new(),
            failure_closed: false,
            runtime_socket_names: Vec::new(),
        };
        for pattern in patterns {
            let (list, name) = match kernel_name(pattern) {
                Ok(KernelName::Basename(n)) => (&mut p.credential_basenames, n),
                Ok(KernelName::Dirname(n)) => (&mut p.credential_dirnames, n),
                Ok(KernelName::Prefix(n)) => (&mut p.credential_prefixes, n),
                // Policy::parse rejects such patterns; nothing to add.
                Err(_) => continue,
            };
            if !list.contains(&name) {
                list.push(name);
            }
        }
        p
    }
}

/// The file names of the `docker` kind's `[[secret_sockets]]` paths (Docker's API, and podman's
/// that speaks it): the kernel reads a job's container requests on sockets bound at those names
/// only, so each must be literal.
pub(super) fn runtime_socket_names(
    sections: &[file::SecretSocketSection],
    src: &Source<'_>,
) -> Result<Vec<String>, PolicyError> {
    let mut names = Vec::new();
    for (i, s) in sections.iter().enumerate() {
        if s.kind.get_ref() != "docker" {
            continue;
        }
        for (j, p) in s.paths.iter().enumerate() {
            let name = p.get_ref().rsplit('/').next().unwrap_or("");
            if name.is_empty() || !is_literal(name) || name.len() > NAME_LEN {
                return Err(src.error(
                    p.span(),
                    &format!("secret_sockets[{i}].paths[{j}]"),
                    format!(
                        "a Docker API socket's file name must be literal and at most {NAME_LEN} \
                         bytes: the kernel reads job requests on sockets bound at these names"
                    ),
                ));
            }
            if !names.iter().any(|n| n == name) {
                names.push(name.to_owned());
            }
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_become_kernel_names() {
        assert_eq!(
            kernel_name("**/.docker/config.json"),
            Ok(KernelName::Basename("config.json".into()))
        );
        assert_eq!(
            kernel_name("**/.ssh/id_*"),
            Ok(KernelName::Prefix("id_".into()))
        );
        assert_eq!(
            kernel_name("/etc/secrets/*"),
            Ok(KernelName::Dirname("secrets".into()))
        );
        assert!(kernel_name("**/*").is_err());
        assert!(kernel_name("**/*.pem").is_err());
    }

    #[test]
    fn builtin_sensor_policy_covers_every_credential_kind() {
        let p = SensorPolicy::default();
        for name in [
            "config.json",
            "credentials",
            ".git-credentials",
            ".credentials",
            "adc.json",
        ] {
            assert!(
                p.credential_basenames.iter().any(|b| b == name),
                "{name}: {p:?}"
            );
        }
        assert_eq!(p.credential_prefixes, ["id_"]);
        assert_eq!(p.job_root_executables, ["Runner.Worker"]);
        assert_eq!(p.job_parent_executables, ["gitlab-runner"]);
        assert_eq!(p.runtime_socket_names, ["docker.sock", "podman.sock"]);
    }
}
