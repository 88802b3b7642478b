//! The fleet stream's wire contract, shared by the agents' NATS sink and the fleet correlator.
//!
//! Subjects, under a configurable prefix (default `runner-monitor`), all captured by one stream
//! (default `RUNNER_MONITOR`, subjects `<prefix>.>`):
//! - `<prefix>.findings.<host>`: one finding per message, the same JSON object as a line of the
//!   alert stream. The correlator publishes its own under `<prefix>.findings.fleet`.
//! - `<prefix>.fingerprints.<host>`: one [`FingerprintMessage`] per message.
//! - `<prefix>.attestations.<host>`: one signed job attestation per message, the DSSE envelope
//!   exactly as the agent wrote it to its state directory (see attestations), without its newline.
//!
//! Every message carries a `Nats-Msg-Id` header ([`message_id`]) that is the same when the same
//! spooled record is sent again, so JetStream's duplicate window drops a resend after a crash.
//! Host names are made subject-safe with [`subject_token`].

use serde::{Deserialize, Serialize};

use crate::event::JobInfo;

/// Default subject prefix and stream name (the policy's `[fleet]` defaults).
pub use crate::policy::fleet::{DEFAULT_PREFIX, DEFAULT_STREAM};
/// Host token the correlator publishes its findings under.
pub const CORRELATOR_HOST: &str = "fleet";

/// Whether the job made the credential (wrote it) or used one that was there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CredentialUse {
    Materialised,
    Read,
}

/// One credential fingerprint an agent computed. Keyed hash only: never the content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FingerprintMessage {
    /// The agent's host name (as in its findings).
    pub host: String,
    /// Id of the fleet fingerprint key that made `fingerprint` (fingerprints made with different
    /// keys never compare equal).
    pub key_id: String,
    /// The keyed hash, as in findings (`hmac-sha256:...`).
    pub fingerprint: String,
    #[serde(rename = "use")]
    pub usage: CredentialUse,
    /// Credential kind from the policy (`aws`, `docker`, ...), when the path is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_kind: Option<String>,
    /// Path of the credential file on the agent's host.
    pub path: String,
    /// The job that materialised or read it.
    pub job: JobInfo,
    pub pid: u32,
    /// When, RFC 3339 UTC, and as Unix nanoseconds.
    pub time: String,
    pub time_unix_ns: u64,
}

/// A subject token from a free-form name: NATS subjects split on `.` and treat `*`, `>` and
/// white space specially; everything outside `[A-Za-z0-9_-]` becomes `_`.
pub fn subject_token(name: &str) -> String {
    let token: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if token.is_empty() {
        "_".to_owned()
    } else {
        token
    }
}

pub fn findings_subject(prefix: &str, host: &str) -> String {
    format!("{prefix}.findings.{}", subject_token(host))
}

pub fn fingerprints_subject(prefix: &str, host: &str) -> String {
    format!("{prefix}.fingerprints.{}", subject_token(host))
}

pub fn attestations_subject(prefix: &str, host: &str) -> String {
    format!("{prefix}.attestations.{}", subject_token(host))
}

/// `Nats-Msg-Id` of the record at `offset` of the spool `spool` of `host`: stable across resends.
pub fn message_id(host: &str, spool: &str, offset: u64) -> String {
    format!("{}:{spool}:{offset}", subject_token(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_safe_whatever_the_host_name() {
        assert_eq!(
            findings_subject(DEFAULT_PREFIX, "runner-7.example.com"),
            "runner-monitor.findings.runner-7_example_com"
        );
        assert_eq!(fingerprints_subject("rm", "a b>*"), "rm.fingerprints.a_b__");
        assert_eq!(attestations_subject("rm", "h.1"), "rm.attestations.h_1");
        assert_eq!(subject_token(""), "_");
        assert_eq!(message_id("h.1", "nats", 42), "h_1:nats:42");
    }

    #[test]
    fn fingerprint_message_round_trips_with_use_as_the_field_name() {
        let m = FingerprintMessage {
            host: "a".into(),
            key_id: "k1".into(),
            fingerprint: "hmac-sha256:00".into(),
            usage: CredentialUse::Materialised,
            credential_kind: Some("aws".into()),
            path: "/home/r/.aws/credentials".into(),
            job: JobInfo {
                id: "1/build".into(),
                ..Default::default()
            },
            pid: 7,
            time: "2026-12-03T00:00:00Z".into(),
            time_unix_ns: 1,
        };
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["use"], "materialised");
        assert_eq!(
            serde_json::from_value::<FingerprintMessage>(json).unwrap(),
            m
        );
    }
}
