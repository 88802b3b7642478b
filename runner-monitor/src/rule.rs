//! The detections: stable rule ids, default severities and MITRE ATT&CK techniques.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RuleId {
    CredentialAfterJobEnd,
    ProcessSurvivedJob,
    CredentialLeftBehind,
    CrossJobCredentialReuse,
    UnexpectedEgress,
    ProcessMemoryAccess,
    SecretSocketAccess,
    MetadataEndpointAccess,
    RunnerCredentialAccess,
    CredentialHarvesting,
    AgentTamper,
    SensorDegraded,
    BaselineDeviation,
    PersistencePlanted,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "info" => Severity::Info,
            "low" => Severity::Low,
            "medium" => Severity::Medium,
            "high" => Severity::High,
            "critical" => Severity::Critical,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
}

/// A MITRE ATT&CK technique.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Technique {
    pub id: &'static str,
    pub name: &'static str,
}

impl RuleId {
    pub const ALL: [RuleId; 14] = [
        RuleId::CredentialAfterJobEnd,
        RuleId::ProcessSurvivedJob,
        RuleId::CredentialLeftBehind,
        RuleId::CrossJobCredentialReuse,
        RuleId::UnexpectedEgress,
        RuleId::ProcessMemoryAccess,
        RuleId::SecretSocketAccess,
        RuleId::MetadataEndpointAccess,
        RuleId::RunnerCredentialAccess,
        RuleId::CredentialHarvesting,
        RuleId::AgentTamper,
        RuleId::SensorDegraded,
        RuleId::BaselineDeviation,
        RuleId::PersistencePlanted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RuleId::CredentialAfterJobEnd => "credential-after-job-end",
            RuleId::ProcessSurvivedJob => "process-survived-job",
            RuleId::CredentialLeftBehind => "credential-left-behind",
            RuleId::CrossJobCredentialReuse => "cross-job-credential-reuse",
            RuleId::UnexpectedEgress => "unexpected-egress",
            RuleId::ProcessMemoryAccess => "process-memory-access",
            RuleId::SecretSocketAccess => "secret-socket-access",
            RuleId::MetadataEndpointAccess => "metadata-endpoint-access",
            RuleId::RunnerCredentialAccess => "runner-credential-access",
            RuleId::CredentialHarvesting => "credential-harvesting",
            RuleId::AgentTamper => "agent-tamper",
            RuleId::SensorDegraded => "sensor-degraded",
            RuleId::BaselineDeviation => "baseline-deviation",
            RuleId::PersistencePlanted => "persistence-planted",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == text)
    }

    /// Severity when the policy says nothing else.
    pub fn default_severity(self) -> Severity {
        match self {
            RuleId::CredentialAfterJobEnd => Severity::Critical,
            RuleId::ProcessSurvivedJob => Severity::High,
            RuleId::CredentialLeftBehind => Severity::Medium,
            RuleId::CrossJobCredentialReuse => Severity::High,
            RuleId::UnexpectedEgress => Severity::Medium,
            RuleId::ProcessMemoryAccess => Severity::Critical,
            RuleId::SecretSocketAccess => Severity::High,
            RuleId::MetadataEndpointAccess => Severity::High,
            RuleId::RunnerCredentialAccess => Severity::Critical,
            RuleId::CredentialHarvesting => Severity::High,
            RuleId::AgentTamper => Severity::Critical,
            RuleId::SensorDegraded => Severity::High,
            // Something new, not necessarily hostile: a new dependency mirror is a deviation too.
            // The rules that know what is dangerous (secret sockets, metadata, egress) raise
            // their own findings beside it.
            RuleId::BaselineDeviation => Severity::Medium,
            // Critical for the runner's own files (a `runner = true` persistence kind).
            RuleId::PersistencePlanted => Severity::High,
        }
    }

    pub fn technique(self) -> Technique {
        let (id, name) = match self {
            RuleId::CredentialAfterJobEnd => {
                ("T1552.001", "Unsecured Credentials: Credentials In Files")
            }
            RuleId::ProcessSurvivedJob => ("T1543", "Create or Modify System Process"),
            RuleId::CredentialLeftBehind => {
                ("T1552.001", "Unsecured Credentials: Credentials In Files")
            }
            RuleId::CrossJobCredentialReuse => ("T1550", "Use Alternate Authentication Material"),
            RuleId::UnexpectedEgress => ("T1041", "Exfiltration Over C2 Channel"),
            RuleId::ProcessMemoryAccess => ("T1003.007", "OS Credential Dumping: Proc Filesystem"),
            RuleId::SecretSocketAccess => ("T1552", "Unsecured Credentials"),
            RuleId::MetadataEndpointAccess => (
                "T1552.005",
                "Unsecured Credentials: Cloud Instance Metadata API",
            ),
            RuleId::RunnerCredentialAccess => {
                ("T1552.001", "Unsecured Credentials: Credentials In Files")
            }
            RuleId::CredentialHarvesting => ("T1552", "Unsecured Credentials"),
            RuleId::AgentTamper => ("T1562.001", "Impair Defenses: Disable or Modify Tools"),
            RuleId::SensorDegraded => ("T1562", "Impair Defenses"),
            // The rule's technique; each finding names the one of what deviated
            // (`engine/detect/baseline.rs`): egress T1041, a secret socket T1552, a credential
            // kind T1552.001. Two of the three are credential access, and a baseline exists to narrow
            // a job's reach to credentials.
            RuleId::BaselineDeviation => ("T1552", "Unsecured Credentials"),
            // The rule's technique; each finding names its persistence kind's (`technique` of a
            // `[[persistence]]` entry): cron T1053.003, systemd T1543.002, ld.so.preload
            // T1574.006, ...
            RuleId::PersistencePlanted => ("T1053", "Scheduled Task/Job"),
        };
        Technique { id, name }
    }
}

impl std::fmt::Display for RuleId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_ids_round_trip_through_text_and_json() {
        for rule in RuleId::ALL {
            assert_eq!(RuleId::parse(rule.as_str()), Some(rule));
            let json = serde_json::to_string(&rule).unwrap();
            assert_eq!(json, format!("\"{}\"", rule.as_str()));
        }
        assert_eq!(RuleId::parse("no-such-rule"), None);
    }
}
