//! Connections: secret sockets, metadata endpoints, egress outside the allowlist, use after the
//! job ended.

use std::net::IpAddr;

use runner_monitor_common::QUIC_PORT;

use super::{Engine, baseline, is_ended};
use crate::{
    engine::{
        finding::{DestinationRef, Finding, SocketRef},
        usage::Used,
    },
    event::{Connect, Event, JobKey, RawSocket, SocketFamily, TlsHello},
    policy::egress_address,
    rule::RuleId,
};

pub(super) fn connect(engine: &mut Engine, event: &Event, c: &Connect, out: &mut Vec<Finding>) {
    let Some(job) = event.job.as_ref().map(|j| j.key) else {
        return;
    };
    if c.family == SocketFamily::Unix {
        let Some(path) = &c.unix_path else { return };
        let Some(kind) = engine.policy.secret_socket_of(path).map(str::to_owned) else {
            return;
        };
        let socket = SocketRef {
            path: path.clone(),
            kind: kind.clone(),
            used_path: c.via.clone(),
        };
        out.extend(after_end(engine, event, c));
        let entitled = engine
            .policy
            .rules_for(engine.job_selector(Some(job)))
            .any(|r| r.secret_sockets.contains(&kind));
        if !entitled {
            let mut f = engine.raise(
                RuleId::SecretSocketAccess,
                event,
                format!(
                    "connected to the {kind} socket {path}{}, which its policy does not entitle \
                     it to",
                    c.via
                        .as_ref()
                        .map(|via| format!(" (through {via})"))
                        .unwrap_or_default()
                ),
            );
            f.socket = Some(socket);
            out.push(f);
        }
        if baseline::wanted(engine) {
            let used = Used::SecretSocket {
                kind,
                path: path.clone(),
            };
            baseline::used(engine, event, job, used, out);
        }
        return;
    }
    if let Some(raw) = c.raw_socket {
        raw_socket(engine, event, raw, c.blocked, out);
        return;
    }
    let (Some(ip), Some(port)) = (c.ip, c.port) else {
        return;
    };
    if ip.is_unspecified() {
        return;
    }
    let names = engine.dns.get(&(job, ip)).cloned().unwrap_or_default();
    let destination = DestinationRef {
        ip,
        port,
        dns_name: names.first().cloned(),
        sni: None,
    };
    let shown = shown(&destination);
    out.extend(after_end(engine, event, c));
    if c.dns_redirected {
        // It went to the agent's resolver, which judges the names asked: the DNS events say
        // which.
        return;
    }
    let metadata = engine.policy.is_metadata_endpoint(ip);
    // As the kernel judges it: an IPv4-mapped or NAT64 address is its IPv4 address.
    let allowed = !metadata
        && (egress_allowed(engine, job, ip, port, &names)
            || egress_allowed(engine, job, egress_address(ip), port, &names));
    let verdict = if c.blocked {
        "blocked"
    } else if metadata {
        "metadata"
    } else if allowed {
        "allowed"
    } else {
        "unexpected"
    };
    *engine.stats.egress.entry(verdict.to_owned()).or_default() += 1;
    if baseline::wanted(engine) {
        baseline::used(engine, event, job, Used::Egress { ip, port, names }, out);
    }
    let what = if c.udp_send {
        "sent UDP to"
    } else {
        "connected to"
    };
    let refused = if c.udp_send {
        "a UDP send to"
    } else {
        "a connection to"
    };
    if metadata {
        let entitled = engine
            .policy
            .rules_for(engine.job_selector(Some(job)))
            .any(|r| r.metadata);
        if entitled && !c.blocked {
            return;
        }
        let summary = if c.blocked {
            format!(
                "was refused {refused} the cloud metadata endpoint {ip} port {port} (block mode)"
            )
        } else {
            format!("{what} the cloud metadata endpoint {ip} port {port}")
        };
        let mut f = engine.raise(RuleId::MetadataEndpointAccess, event, summary);
        f.destination = Some(destination);
        f.blocked = c.blocked;
        out.push(f);
        return;
    }
    if c.blocked || !allowed {
        // A refusal of what the engine allows is a name-only allowance the kernel did not
        // have: the job did not resolve the address through the agent's resolver (another
        // network namespace, a resolver it reached some other way), or its TTL ran out.
        let summary = match (c.blocked, allowed) {
            (true, _) if c.quic && port == QUIC_PORT => format!(
                "was refused QUIC (UDP) to {shown} (block mode): its rule checks TLS server names \
                 (sni = true), which QUIC encrypts; the client can fall back to TCP"
            ),
            (true, _) if c.quic => format!(
                "was refused UDP to {shown} (block mode): its rule checks TLS server names \
                 (sni = true), and only a name admits this address, which UDP does not name \
                 (QUIC encrypts it); the client can fall back to TCP"
            ),
            (true, false) => {
                format!("was refused {refused} {shown} (block mode), outside its egress allowlist")
            }
            (true, true) => format!(
                "was refused {refused} {shown} (block mode): its allowlist admits it by name only, \
                 and the address was not resolved through the agent's resolver (or its TTL ran out)"
            ),
            _ => format!("{what} {shown}, outside its egress allowlist"),
        };
        let mut f = engine.raise(RuleId::UnexpectedEgress, event, summary);
        f.destination = Some(destination);
        f.blocked = c.blocked;
        out.push(f);
    }
}

/// The TLS ClientHello a job's connection sent first: `unexpected-egress` when block mode refused
/// it (a rule says `sni = true` and the server name is not allowed), or, in audit mode, when a
/// rule says `sni = true` and the name is outside the allowlist.
pub(super) fn tls_hello(engine: &mut Engine, event: &Event, t: &TlsHello, out: &mut Vec<Finding>) {
    let Some(job) = event.job.as_ref().map(|j| j.key) else {
        return;
    };
    let (ip, port) = (t.ip, t.port);
    let destination = destination(engine, job, ip, port, t.sni.clone());
    let named = match &t.sni {
        Some(name) => format!("TLS for server name {name} to {ip} port {port}"),
        None => format!("TLS without a readable server name to {ip} port {port}"),
    };
    let summary = if t.blocked {
        *engine.stats.egress.entry("blocked".to_owned()).or_default() += 1;
        format!("was refused {named} (block mode, sni = true): outside its egress allowlist")
    } else {
        let checks_sni = engine
            .policy
            .rules_for(engine.job_selector(Some(job)))
            .any(|r| r.sni);
        if !checks_sni || sni_allowed(engine, job, t) {
            return;
        }
        format!("sent {named}, outside its egress allowlist (sni = true)")
    };
    let mut f = engine.raise(RuleId::UnexpectedEgress, event, summary);
    f.destination = Some(destination);
    f.blocked = t.blocked;
    out.push(f);
}

/// Whether the allowlist of the job (global and its rules') has the ClientHello's server name,
/// as the kernel judges it: a name it had to cut, or none, is not allowed.
fn sni_allowed(engine: &Engine, job: JobKey, t: &TlsHello) -> bool {
    let Some(name) = t.sni.as_deref().filter(|_| !t.sni_truncated) else {
        return false;
    };
    // Ports are the address check's business: a name is allowed on any port here.
    let allows = |a: &crate::policy::AllowedDestination| match &a.destination {
        crate::policy::Destination::Name(pattern) => crate::policy::name_matches(pattern, name),
        crate::policy::Destination::Net(_) => false,
    };
    engine.policy.egress_allow.iter().any(allows)
        || engine
            .policy
            .rules_for(engine.job_selector(Some(job)))
            .any(|r| r.allow_egress.iter().any(allows))
}

/// A raw, packet or ICMP socket sends to any address without passing the cgroup address hooks
/// that enforce the allowlist: `unexpected-egress` for every job, refused in block mode.
fn raw_socket(
    engine: &mut Engine,
    event: &Event,
    raw: RawSocket,
    blocked: bool,
    out: &mut Vec<Finding>,
) {
    let verdict = if blocked { "blocked" } else { "unexpected" };
    *engine.stats.egress.entry(verdict.to_owned()).or_default() += 1;
    let what = raw.kind.describe();
    let summary = if blocked {
        format!(
            "was refused {what} (protocol {}) in block mode: it would send past the egress \
             allowlist",
            raw.protocol
        )
    } else {
        format!(
            "opened {what} (protocol {}), which sends past the egress allowlist",
            raw.protocol
        )
    };
    let mut f = engine.raise(RuleId::UnexpectedEgress, event, summary);
    f.blocked = blocked;
    f.raw_socket = Some(raw);
    out.push(f);
}

/// `credential-after-job-end` for a connection by a process of an ended job: to a secret socket,
/// or to a remote (not loopback) address.
pub(super) fn after_end(engine: &Engine, event: &Event, c: &Connect) -> Option<Finding> {
    if !is_ended(event) {
        return None;
    }
    let job = event.job.as_ref()?.key;
    if c.family == SocketFamily::Unix {
        let path = c.unix_path.as_ref()?;
        let kind = engine.policy.secret_socket_of(path)?;
        let mut f = engine.raise(
            RuleId::CredentialAfterJobEnd,
            event,
            format!(
                "connected to the {kind} socket {path} {}",
                engine.after_end_text(event)
            ),
        );
        f.socket = Some(SocketRef {
            path: path.clone(),
            kind: kind.to_owned(),
            used_path: c.via.clone(),
        });
        return Some(f);
    }
    let (ip, port) = (c.ip?, c.port?);
    if ip.is_unspecified() || ip.is_loopback() {
        return None;
    }
    let destination = destination(engine, job, ip, port, None);
    let shown = shown(&destination);
    let mut f = engine.raise(
        RuleId::CredentialAfterJobEnd,
        event,
        format!("connected to {shown} {}", engine.after_end_text(event)),
    );
    f.destination = Some(destination);
    Some(f)
}

fn egress_allowed(engine: &Engine, job: JobKey, ip: IpAddr, port: u16, names: &[String]) -> bool {
    engine
        .policy
        .egress_allow
        .iter()
        .any(|a| a.allows(ip, port, names))
        || engine
            .policy
            .rules_for(engine.job_selector(Some(job)))
            .any(|r| r.allow_egress.iter().any(|a| a.allows(ip, port, names)))
}

/// `ip` port `port` as job `job` reached it: named by the first DNS name it resolved for `ip`.
fn destination(
    engine: &Engine,
    job: JobKey,
    ip: IpAddr,
    port: u16,
    sni: Option<String>,
) -> DestinationRef {
    DestinationRef {
        ip,
        port,
        dns_name: engine
            .dns
            .get(&(job, ip))
            .and_then(|names| names.first().cloned()),
        sni,
    }
}

/// A destination in a summary: `name (ip) port N`, or `ip port N`.
fn shown(d: &DestinationRef) -> String {
    match &d.dns_name {
        Some(name) => format!("{name} ({}) port {}", d.ip, d.port),
        None => format!("{} port {}", d.ip, d.port),
    }
}
