use super::*;

const S: u64 = 1_000_000_000;
const T0: u64 = 1_800_000_000 * S;
const FP: &str = "hmac-sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn config() -> LedgerConfig {
    LedgerConfig {
        max_entries: 1000,
        ttl_ns: 3600 * S,
        key_grace_ns: 600 * S,
    }
}

fn message(
    host: &str,
    job: &str,
    repo: &str,
    usage: CredentialUse,
    fp: &str,
    key: &str,
    at: u64,
) -> FingerprintMessage {
    FingerprintMessage {
        host: host.into(),
        key_id: key.into(),
        fingerprint: fp.into(),
        usage,
        credential_kind: Some("docker".into()),
        path: "/home/runner/.docker/config.json".into(),
        job: JobInfo {
            id: job.into(),
            repository: Some(repo.into()),
            ..JobInfo::default()
        },
        pid: 42,
        time: String::new(),
        time_unix_ns: at,
    }
}

/// One correlator seeing the stream: every message learnt, reads judged.
fn run(ledger: &mut Ledger, messages: &[FingerprintMessage]) -> Vec<(Outcome, Option<Raised>)> {
    messages
        .iter()
        .map(|m| {
            let learnt = ledger.learn(m, m.time_unix_ns);
            if m.usage == CredentialUse::Read {
                let judged = ledger.judge(m, m.time_unix_ns);
                if let Some(raised) = &judged.1 {
                    ledger.commit(raised);
                }
                judged
            } else {
                (learnt, None)
            }
        })
        .collect()
}

use CredentialUse::{Materialised, Read};

/// A distinct fingerprint per number (the ledger keys on the first 128 bits).
fn numbered(n: u64) -> String {
    format!("hmac-sha256:{n:032x}{:032x}", 0)
}

#[test]
fn read_on_another_host_of_another_repository_is_critical_and_names_both_sides() {
    let mut l = Ledger::new(config());
    let out = run(
        &mut l,
        &[
            message("host-a", "1/build", "acme/app", Materialised, FP, "k1", T0),
            message("host-b", "2/test", "evil/fork", Read, FP, "k1", T0 + 5 * S),
        ],
    );
    assert_eq!(out[0].0, Outcome::Recorded);
    assert_eq!(out[1].0, Outcome::Reuse);
    let raised = out[1].1.as_ref().unwrap();
    let f = &raised.finding;
    assert_eq!(f.rule, RuleId::CrossJobCredentialReuse);
    assert_eq!(f.severity, Severity::Critical);
    let job = f.job.as_ref().unwrap();
    let origin = f.origin_job.as_ref().unwrap();
    assert_eq!(job.host.as_deref(), Some("host-b"));
    assert_eq!(job.info.id, "2/test");
    assert_eq!(job.info.repository.as_deref(), Some("evil/fork"));
    assert_eq!(origin.host.as_deref(), Some("host-a"));
    assert_eq!(origin.info.id, "1/build");
    assert_eq!(origin.info.repository.as_deref(), Some("acme/app"));
    assert_eq!(
        f.credential.as_ref().unwrap().fingerprint.as_deref(),
        Some(FP)
    );
    assert!(f.summary.contains("host-a") && f.summary.contains("host-b"));
    assert!(raised.message_id.starts_with("fleet:"));
}

#[test]
fn same_repository_across_hosts_keeps_the_rules_severity() {
    let mut l = Ledger::new(config());
    let out = run(
        &mut l,
        &[
            message("a", "1", "acme/app", Materialised, FP, "k1", T0),
            message("b", "2", "acme/app", Read, FP, "k1", T0 + S),
        ],
    );
    assert_eq!(
        out[1].1.as_ref().unwrap().finding.severity,
        RuleId::CrossJobCredentialReuse.default_severity()
    );
}

#[test]
fn same_host_reuse_is_left_to_the_agent() {
    let mut l = Ledger::new(config());
    let out = run(
        &mut l,
        &[
            message("a", "1", "acme/app", Materialised, FP, "k1", T0),
            message("a", "2", "evil/fork", Read, FP, "k1", T0 + S),
        ],
    );
    assert_eq!(out[1], (Outcome::SameHost, None));
}

#[test]
fn fingerprints_made_with_different_keys_never_match() {
    let mut l = Ledger::new(config());
    let out = run(
        &mut l,
        &[
            message("a", "1", "acme/app", Materialised, FP, "k1", T0),
            message("b", "2", "evil/fork", Read, FP, "k2", T0 + S),
        ],
    );
    assert_eq!(out[1], (Outcome::Unknown, None));
}

#[test]
fn an_old_key_stops_counting_after_the_grace_period() {
    let mut l = Ledger::new(config());
    let fp2 = FP.replace("0123", "4567");
    let out = run(
        &mut l,
        &[
            message("a", "1", "acme/app", Materialised, FP, "k1", T0),
            // The fleet moves to k2 ...
            message("a", "3", "acme/app", Materialised, &fp2, "k2", T0 + 10 * S),
            // ... an agent still on k1 within the grace: compared.
            message("b", "2", "evil/fork", Read, FP, "k1", T0 + 300 * S),
            // ... past the grace: neither compared nor recorded.
            message("c", "4", "evil/fork", Read, FP, "k1", T0 + 700 * S),
            message("c", "5", "evil/fork", Materialised, FP, "k1", T0 + 700 * S),
        ],
    );
    assert_eq!(out[2].0, Outcome::Reuse);
    assert_eq!(out[3], (Outcome::StaleKey, None));
    assert_eq!(out[4].0, Outcome::StaleKey);
}

#[test]
fn a_job_reading_a_stolen_credential_again_is_one_finding() {
    let mut l = Ledger::new(config());
    let read = message("b", "2", "evil/fork", Read, FP, "k1", T0 + S);
    let out = run(
        &mut l,
        &[
            message("a", "1", "acme/app", Materialised, FP, "k1", T0),
            read.clone(),
            read,
        ],
    );
    assert_eq!(out[1].0, Outcome::Reuse);
    assert_eq!(out[2], (Outcome::AlreadyRaised, None));
}

#[test]
fn a_finding_not_delivered_is_raised_again_on_redelivery() {
    let mut l = Ledger::new(config());
    let read = message("b", "2", "evil/fork", Read, FP, "k1", T0 + S);
    run(
        &mut l,
        &[message("a", "1", "acme/app", Materialised, FP, "k1", T0)],
    );
    let first = l.judge(&read, T0 + S);
    // Not committed (publishing failed): the redelivered read raises it again, same id.
    let again = l.judge(&read, T0 + 2 * S);
    assert_eq!(first.0, Outcome::Reuse);
    assert_eq!(again.0, Outcome::Reuse);
    assert_eq!(
        first.1.as_ref().unwrap().message_id,
        again.1.as_ref().unwrap().message_id
    );
}

#[test]
fn the_first_origin_stays_when_another_host_materialises_it_again() {
    let mut l = Ledger::new(config());
    let out = run(
        &mut l,
        &[
            message("a", "1", "acme/app", Materialised, FP, "k1", T0),
            message("b", "2", "evil/fork", Materialised, FP, "k1", T0 + S),
            message("b", "2", "evil/fork", Read, FP, "k1", T0 + 2 * S),
        ],
    );
    assert_eq!(out[1].0, Outcome::Known);
    let f = &out[2].1.as_ref().unwrap().finding;
    assert_eq!(f.origin_job.as_ref().unwrap().host.as_deref(), Some("a"));
}

#[test]
fn ledger_is_bounded_and_ages_out_and_counts_both() {
    let mut l = Ledger::new(LedgerConfig {
        max_entries: 3,
        ..config()
    });
    for i in 0..5u64 {
        let fp = numbered(i + 1);
        let m = message("a", "1", "acme/app", Materialised, &fp, "k1", T0 + i * S);
        assert_eq!(l.learn(&m, T0 + i * S), Outcome::Recorded);
    }
    assert_eq!(l.len(), 3);
    assert_eq!(l.stats().evicted_full, 2);
    // One job behind all of them: interned once.
    assert_eq!(l.origin_jobs(), 1);
    // The oldest is gone: a read of it finds nothing.
    let gone = message("b", "2", "x/y", Read, &numbered(1), "k1", T0 + 10 * S);
    assert_eq!(l.judge(&gone, T0 + 10 * S).0, Outcome::Unknown);
    // An hour later everything has aged out, and the interned job with it.
    l.expire(T0 + 3 * S + 3601 * S);
    assert_eq!(l.len(), 1);
    l.expire(T0 + 5 * S + 3601 * S);
    assert!(l.is_empty());
    assert_eq!(l.stats().evicted_expired, 3);
    assert_eq!(l.origin_jobs(), 0);
}

#[test]
fn a_read_replayed_in_a_new_order_is_judged_the_same() {
    // A restarted correlator rebuilds the ledger from the stream, then is given the reads it
    // had not acknowledged: same finding, same message id (so JetStream drops a duplicate).
    let messages = [
        message("a", "1", "acme/app", Materialised, FP, "k1", T0),
        message("b", "2", "evil/fork", Read, FP, "k1", T0 + S),
    ];
    let first = run(&mut Ledger::new(config()), &messages);
    let again = run(&mut Ledger::new(config()), &messages);
    assert_eq!(first, again);
}

#[test]
fn fingerprints_in_another_form_are_still_compared() {
    assert_eq!(digest("opaque-token-id"), digest("opaque-token-id"));
    assert_ne!(digest("opaque-token-id"), digest("opaque-token-id2"));
    assert_eq!(digest(""), None);
    assert_eq!(digest(FP), Some([0x0123456789abcdef, 0x0123456789abcdef]));
}
