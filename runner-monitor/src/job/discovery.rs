//! Who a job is, from its processes' environment (`GITHUB_*`, `CI_*`, as the policy says).
//!
//! A process environment holds secrets. Only the variables the policy names are looked at; every
//! other value is skipped without being copied, logged or kept.

use crate::{event::JobInfo, policy::JobIdentity};

/// Longest identity value kept; longer ones are cut (they are names, not payloads).
const MAX_VALUE: usize = 256;

/// The value of `name` in a NUL-separated environment block.
pub fn var<'a>(environ: &'a [u8], name: &str) -> Option<&'a [u8]> {
    environ.split(|b| *b == 0).find_map(|entry| {
        let rest = entry.strip_prefix(name.as_bytes())?;
        rest.strip_prefix(b"=")
    })
}

fn text(value: &[u8]) -> String {
    let cut = &value[..value.len().min(MAX_VALUE)];
    String::from_utf8_lossy(cut).into_owned()
}

/// The job an environment belongs to, by the first identity whose `detect` variable is set.
pub fn identify(environ: &[u8], identities: &[JobIdentity]) -> Option<JobInfo> {
    let identity = identities
        .iter()
        .find(|i| var(environ, &i.detect).is_some())?;
    let get = |name: &Option<String>| name.as_deref().and_then(|n| var(environ, n)).map(text);
    let id: Vec<String> = identity
        .id
        .iter()
        .filter_map(|n| var(environ, n).map(text))
        .collect();
    if id.is_empty() {
        return None;
    }
    Some(JobInfo {
        id: id.join("/"),
        platform: Some(identity.platform.clone()),
        repository: get(&identity.repository),
        workflow: get(&identity.workflow),
        run: get(&identity.run),
        runner: get(&identity.runner),
        attempt: get(&identity.attempt),
        actor: get(&identity.actor),
        git_ref: get(&identity.git_ref),
        event: get(&identity.event),
        tracking_id: get(&identity.tracking_id),
    })
}

/// The job the kernel's identity values of one exec name (`EventDetail::JobEnv`): each value
/// with the `NAMES` value of its variable, resolved through `vars` (`Policy::job_env_vars`).
/// Marker-only variables count as set, with an empty value.
pub fn identify_values(
    values: &[(u32, String)],
    vars: &[(String, u32)],
    identities: &[JobIdentity],
) -> Option<JobInfo> {
    let mut environ = Vec::new();
    for (var, value) in values {
        let Some((name, bits)) = vars.get((var & runner_monitor_common::JOB_ENV_INDEX) as usize)
        else {
            continue;
        };
        environ.extend_from_slice(name.as_bytes());
        environ.push(b'=');
        // Only what the policy calls an identity field has a value (the kernel copies no other).
        if bits & runner_monitor_common::JOB_ENV_VALUE != 0 {
            environ.extend_from_slice(value.as_bytes());
        }
        environ.push(0);
    }
    identify(&environ, identities)
}

/// Reads `/proc/<pid>/environ` and identifies the job; `None` when the process is gone or
/// carries no identity.
pub fn identify_process(pid: u32, identities: &[JobIdentity]) -> Option<JobInfo> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    identify(&environ, identities)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;

    #[test]
    fn github_step_environment_identifies_the_job_and_nothing_else_is_kept() {
        let env = b"PATH=/usr/bin\0GITHUB_TOKEN=ghs_rmcanarySECRET\0GITHUB_RUN_ID=9001\0GITHUB_JOB=build\0\
GITHUB_REPOSITORY=acme/app\0GITHUB_WORKFLOW=CI\0RUNNER_NAME=runner-7\0GITHUB_RUN_ATTEMPT=2\0\
GITHUB_ACTOR=octocat\0GITHUB_REF=refs/heads/main\0GITHUB_EVENT_NAME=push\0RUNNER_TRACKING_ID=github_1f2e\0";
        let info = identify(env, &Policy::builtin().job_identity).unwrap();
        assert_eq!(info.id, "9001/build");
        assert_eq!(info.platform.as_deref(), Some("github"));
        assert_eq!(info.repository.as_deref(), Some("acme/app"));
        assert_eq!(info.workflow.as_deref(), Some("CI"));
        assert_eq!(info.run.as_deref(), Some("9001"));
        assert_eq!(info.attempt.as_deref(), Some("2"));
        assert_eq!(info.runner.as_deref(), Some("runner-7"));
        assert_eq!(info.actor.as_deref(), Some("octocat"));
        assert_eq!(info.git_ref.as_deref(), Some("refs/heads/main"));
        assert_eq!(info.event.as_deref(), Some("push"));
        assert_eq!(info.tracking_id.as_deref(), Some("github_1f2e"));
        let json = serde_json::to_string(&info).unwrap();
        assert!(!json.contains("rmcanary"), "{json}");
    }

    #[test]
    fn gitlab_environment_and_unrelated_processes() {
        let ids = Policy::builtin().job_identity;
        let env = b"CI_JOB_ID=555\0CI_PROJECT_PATH=group/proj\0CI_JOB_NAME=test\0CI_PIPELINE_ID=77\0CI_RUNNER_ID=3\0";
        let info = identify(env, &ids).unwrap();
        assert_eq!(
            (info.id.as_str(), info.platform.as_deref()),
            ("555", Some("gitlab"))
        );
        assert_eq!(info.repository.as_deref(), Some("group/proj"));
        assert!(identify(b"HOME=/root\0GITHUB_RUN_IDX=1\0", &ids).is_none());
        assert!(identify(b"", &ids).is_none());
    }

    #[test]
    fn kernel_values_name_the_job_and_only_identity_fields_count() {
        let policy = Policy::builtin();
        let vars = policy.job_env_vars();
        let var = |name: &str| -> u32 {
            let i = vars.iter().position(|(n, _)| n == name).unwrap();
            i as u32 | vars[i].1
        };
        // As the kernel sends them: a marker-only variable with a value it never copies (made
        // up here to show it is ignored), and identity fields.
        let values = vec![
            (
                var("JENKINS_SERVER_COOKIE"),
                "rmcanary-not-copied".to_owned(),
            ),
            (var("JOB_NAME"), "acme/app".to_owned()),
            (var("BUILD_NUMBER"), "42".to_owned()),
            (var("NODE_NAME"), "agent-3".to_owned()),
            // An index the policy does not have (reloaded meanwhile): skipped.
            (0xfff0, "x".to_owned()),
        ];
        let info = identify_values(&values, &vars, &policy.job_identity).unwrap();
        assert_eq!(info.id, "acme/app/42");
        assert_eq!(info.platform.as_deref(), Some("jenkins"));
        assert_eq!(info.runner.as_deref(), Some("agent-3"));
        let json = serde_json::to_string(&info).unwrap();
        assert!(!json.contains("rmcanary"), "{json}");
        // Without the marker, no job.
        assert!(identify_values(&values[1..], &vars, &policy.job_identity).is_none());
    }

    #[test]
    fn no_secret_or_url_variable_is_an_identity_field_of_the_builtin_policy() {
        use runner_monitor_common::{JOB_ENV_MARKER, JOB_ENV_VALUE};
        let vars = Policy::builtin().job_env_vars();
        for (name, bits) in &vars {
            assert!(bits & (JOB_ENV_MARKER | JOB_ENV_VALUE) != 0, "{name}");
            for word in ["TOKEN", "SECRET", "PASSWORD", "KEY", "_URL", "COOKIE"] {
                // A marker's value never leaves the kernel; only identity fields' do.
                assert!(
                    !(name.contains(word) && bits & JOB_ENV_VALUE != 0),
                    "{name} would be copied out of the kernel"
                );
            }
        }
        for marker in [
            "GITHUB_RUN_ID",
            "CI_JOB_ID",
            "JENKINS_SERVER_COOKIE",
            "BUILDKITE_JOB_ID",
            "TF_BUILD",
            "CIRCLE_WORKFLOW_JOB_ID",
            "DRONE_BUILD_NUMBER",
            "CI_PIPELINE_NUMBER",
        ] {
            assert!(
                vars.iter()
                    .any(|(n, b)| n == marker && b & JOB_ENV_MARKER != 0),
                "{marker} is not a marker"
            );
        }
    }

    #[test]
    fn prefix_keys_are_the_first_15_bytes_of_name_and_equals() {
        use runner_monitor_common::env_prefix_key;
        let key = |s: &[u8]| {
            let mut b = [0u8; 16];
            b[..s.len()].copy_from_slice(s);
            [
                u64::from_le_bytes(b[..8].try_into().unwrap()),
                u64::from_le_bytes(b[8..].try_into().unwrap()),
            ]
        };
        assert_eq!(env_prefix_key(b"CI_JOB_ID"), key(b"CI_JOB_ID="));
        assert_eq!(
            env_prefix_key(b"GITHUB_REPOSITORY"),
            key(b"GITHUB_REPOSITO")
        );
        assert_eq!(env_prefix_key(b"ABCDEFGHIJKLMN"), key(b"ABCDEFGHIJKLMN="));
        assert_eq!(env_prefix_key(b"TF_BUILD"), key(b"TF_BUILD="));
    }
}
