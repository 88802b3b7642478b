//! `baseline-deviation`: a job selected by a learned baseline (`[[rules]] baseline = true`, or
//! the rules of a baseline file) connects to a destination, opens a secret socket or touches a
//! credential kind that no baseline selecting it lists. Raised once per job and object, whether
//! the connection succeeded or was refused: it does not depend on the egress verdict, so it holds
//! the same in audit and in block mode.

use super::Engine;
use crate::{
    engine::{
        finding::{CredentialRef, DestinationRef, Finding, Mitre, SocketRef},
        usage::{Usage, Used},
    },
    event::{Event, JobKey},
    policy::JobRule,
    rule::RuleId,
};

/// Whether what a job uses is wanted at all: usage is being recorded (learning), or some rule is
/// a baseline. Callers ask first, so a policy without baselines costs no allocation per event.
pub(super) fn wanted(engine: &Engine) -> bool {
    engine.usage.is_some() || engine.policy.rules.iter().any(|r| r.baseline)
}

/// Job `job` used `used` in `event`: recorded when the engine records usage (learning), and
/// judged against the job's baselines.
pub(super) fn used(
    engine: &mut Engine,
    event: &Event,
    job: JobKey,
    used: Used,
    out: &mut Vec<Finding>,
) {
    if let Some(log) = &mut engine.usage {
        log.push(Usage {
            job,
            used: used.clone(),
        });
    }
    let deviates = {
        let mut baselines = engine
            .policy
            .rules_for(engine.job_selector(Some(job)))
            .filter(|r| r.baseline)
            .peekable();
        baselines.peek().is_some() && !baselines.any(|r| covers(r, &used))
    };
    if !deviates {
        return;
    }
    let Some(j) = engine.jobs.get_mut(&job) else {
        return;
    };
    if !j.deviations.insert(used.object()) {
        return;
    }
    out.push(deviation(engine, event, used));
}

/// Whether baseline `rule` lists what was used.
fn covers(rule: &JobRule, used: &Used) -> bool {
    match used {
        Used::Egress { ip, port, names } => rule
            .allow_egress
            .iter()
            .any(|a| a.allows(*ip, *port, names)),
        Used::SecretSocket { kind, .. } => rule.secret_sockets.contains(kind),
        Used::Credential { kind, .. } => rule.credential_kinds.contains(kind),
    }
}

/// The finding, with the technique of what deviated: egress is exfiltration's channel (T1041),
/// a secret socket and a credential file are unsecured credentials (T1552, T1552.001).
fn deviation(engine: &Engine, event: &Event, used: Used) -> Finding {
    let (what, technique) = match &used {
        Used::Egress { ip, port, names } => (
            match names.first() {
                Some(name) => format!("connected to {name} ({ip}) port {port}"),
                None => format!("connected to {ip} port {port}"),
            },
            ("T1041", "Exfiltration Over C2 Channel"),
        ),
        Used::SecretSocket { kind, path } => (
            format!("connected to the {kind} socket {path}"),
            ("T1552", "Unsecured Credentials"),
        ),
        Used::Credential { kind, path } => (
            format!("touched the {kind} credential {path}"),
            ("T1552.001", "Unsecured Credentials: Credentials In Files"),
        ),
    };
    let mut f = engine.raise(
        RuleId::BaselineDeviation,
        event,
        format!("{what}, which its baseline never saw"),
    );
    f.mitre = Mitre {
        id: technique.0.to_owned(),
        name: technique.1.to_owned(),
    };
    match used {
        Used::Egress { ip, port, names } => {
            f.destination = Some(DestinationRef {
                ip,
                port,
                dns_name: names.into_iter().next(),
                sni: None,
            });
        }
        Used::SecretSocket { kind, path } => {
            f.socket = Some(SocketRef {
                path,
                kind,
                used_path: None,
            })
        }
        Used::Credential { kind, path } => {
            f.credential = Some(CredentialRef {
                path,
                kind,
                fingerprint: None,
                used_path: None,
            });
        }
    }
    f
}
