//! From the policy file to `Policy`: one function per TOML section, checked in file order, each
//! error naming the field it is about.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use globset::{GlobMatcher, GlobSet, GlobSetBuilder};
use ipnet::IpNet;
use toml::Spanned;

use runner_monitor_common::{COMM_LEN, NAME_LEN};

use super::{
    AllowedDestination, CredentialKind, Destination, JobIdentity, JobRule, Policy, PolicyError,
    Source, file,
    glob::{name_glob, path_glob},
    sensor,
};
use crate::rule::{RuleId, Severity};

impl Policy {
    /// Checks a parsed policy file and compiles its globs and addresses.
    pub(super) fn compile(f: file::PolicyFile, src: &Source<'_>) -> Result<Self, PolicyError> {
        let (job_root_executables, job_parent_executables) = compile_agent(&f.agent, src)?;
        let (credentials, credential_set, credential_owner) =
            compile_credentials(&f.credentials, src)?;
        let (secret_socket_kinds, socket_set, socket_owner) =
            compile_secret_sockets(&f.secret_sockets, src)?;
        let runtime_sockets = super::sensor::runtime_socket_names(&f.secret_sockets, src)?;
        let secret_socket_paths = f
            .secret_sockets
            .iter()
            .flat_map(|s| s.paths.iter().map(|p| p.get_ref().clone()))
            .filter(|p| !p.contains(['*', '?', '[', '{']))
            .collect();
        let persistence = super::persistence::compile(&f.persistence, src)?;
        let metadata_endpoints = compile_metadata(&f.metadata, src)?;
        let egress_allow = destinations(&f.egress.allow, "egress.allow", src)?;
        let egress = super::egress::compile(&f.egress, src)?;
        let rules = compile_rules(&f.rules, &secret_socket_kinds, &credentials, src)?;
        check_job_identity(&f.job_identity, src)?;
        let fleet = super::fleet::compile(&f.fleet, src)?;
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
            persistence: persistence.kinds,
            persistence_set: persistence.set,
            persistence_owner: persistence.owner,
            secret_socket_kinds,
            socket_set,
            socket_owner,
            secret_socket_paths,
            runtime_sockets,
            metadata_endpoints,
            egress_allow,
            egress,
            rules,
            fleet,
        })
    }
}

/// `[agent]`: the job root executables and job parent process names, checked; and the
/// harvesting threshold, checked.
fn compile_agent(
    agent: &file::AgentSection,
    src: &Source<'_>,
) -> Result<(Vec<String>, Vec<String>), PolicyError> {
    let mut job_root_executables = Vec::new();
    for (i, exe) in agent.job_root_executables.iter().enumerate() {
        let name = exe.get_ref();
        if name.is_empty() || name.contains('/') || name.len() > NAME_LEN {
            return Err(src.error(
                exe.span(),
                &format!("agent.job_root_executables[{i}]"),
                format!("an executable basename of 1 to {NAME_LEN} bytes without '/'"),
            ));
        }
        job_root_executables.push(name.clone());
    }
    let mut job_parent_executables = Vec::new();
    for (i, comm) in agent.job_parent_executables.iter().enumerate() {
        let name = comm.get_ref();
        if name.is_empty() || name.len() >= COMM_LEN || name.contains('/') {
            return Err(src.error(
                comm.span(),
                &format!("agent.job_parent_executables[{i}]"),
                format!(
                    "a process name (comm) of 1 to {} bytes without '/'",
                    COMM_LEN - 1
                ),
            ));
        }
        job_parent_executables.push(name.clone());
    }
    if agent.harvesting_kinds < 2 {
        return Err(src.error(0..0, "agent.harvesting_kinds", "must be at least 2"));
    }
    Ok((job_root_executables, job_parent_executables))
}

/// `[[credentials]]`: the credential kinds, one glob set over all their paths, and for each glob
/// the index of its kind.
fn compile_credentials(
    sections: &[file::CredentialSection],
    src: &Source<'_>,
) -> Result<(Vec<CredentialKind>, GlobSet, Vec<usize>), PolicyError> {
    let mut credentials = Vec::new();
    let mut builder = GlobSetBuilder::new();
    let mut credential_owner = Vec::new();
    for (i, c) in sections.iter().enumerate() {
        let kind = c.kind.get_ref().trim();
        if kind.is_empty() {
            return Err(src.error(c.kind.span(), &format!("credentials[{i}].kind"), "empty"));
        }
        if c.paths.is_empty() {
            return Err(src.error(
                c.kind.span(),
                &format!("credentials[{i}].paths"),
                "no paths",
            ));
        }
        let mut patterns = Vec::new();
        for (j, p) in c.paths.iter().enumerate() {
            let field = format!("credentials[{i}].paths[{j}]");
            let glob =
                path_glob(p.get_ref()).map_err(|e| src.error(p.span(), &field, e.to_string()))?;
            if !p.get_ref().starts_with('/') && !p.get_ref().starts_with("**/") {
                return Err(src.error(p.span(), &field, "must be absolute or start with **/"));
            }
            sensor::kernel_name(p.get_ref()).map_err(|m| src.error(p.span(), &field, m))?;
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
    Ok((credentials, credential_set, credential_owner))
}

/// `[[secret_sockets]]`: the secret socket kinds, one glob set over all their paths, and for each
/// glob the index of its kind.
fn compile_secret_sockets(
    sections: &[file::SecretSocketSection],
    src: &Source<'_>,
) -> Result<(Vec<String>, GlobSet, Vec<usize>), PolicyError> {
    let mut secret_socket_kinds = Vec::new();
    let mut builder = GlobSetBuilder::new();
    let mut socket_owner = Vec::new();
    for (i, s) in sections.iter().enumerate() {
        for (j, p) in s.paths.iter().enumerate() {
            let field = format!("secret_sockets[{i}].paths[{j}]");
            let glob =
                path_glob(p.get_ref()).map_err(|e| src.error(p.span(), &field, e.to_string()))?;
            builder.add(glob);
            socket_owner.push(secret_socket_kinds.len());
        }
        secret_socket_kinds.push(s.kind.get_ref().clone());
    }
    let socket_set = builder
        .build()
        .map_err(|e| src.error(0..0, "secret_sockets", e.to_string()))?;
    Ok((secret_socket_kinds, socket_set, socket_owner))
}

/// `[metadata]`: the cloud metadata endpoints, as IP addresses.
fn compile_metadata(
    metadata: &file::MetadataSection,
    src: &Source<'_>,
) -> Result<Vec<IpAddr>, PolicyError> {
    let mut metadata_endpoints = Vec::new();
    for (i, e) in metadata.endpoints.iter().enumerate() {
        let ip: IpAddr = e.get_ref().parse().map_err(|_| {
            src.error(
                e.span(),
                &format!("metadata.endpoints[{i}]"),
                format!("not an IP address: {:?}", e.get_ref()),
            )
        })?;
        metadata_endpoints.push(ip);
    }
    Ok(metadata_endpoints)
}

/// What a rule may name: the secret socket kinds and credential kinds the policy defines.
struct Kinds<'a> {
    sockets: BTreeSet<&'a str>,
    credentials: BTreeSet<&'a str>,
}

/// `[[rules]]`: the per-repository rules, whose secret sockets and credential kinds must be
/// kinds the policy defines; a `baseline = "FILE"` entry stands for the rules of that file.
fn compile_rules(
    sections: &[Spanned<file::RuleSection>],
    secret_socket_kinds: &[String],
    credentials: &[CredentialKind],
    src: &Source<'_>,
) -> Result<Vec<JobRule>, PolicyError> {
    let kinds = Kinds {
        sockets: secret_socket_kinds.iter().map(String::as_str).collect(),
        credentials: credentials
            .iter()
            .filter(|c| !c.runner)
            .map(|c| c.kind.as_str())
            .collect(),
    };
    let mut rules = Vec::new();
    for (i, r) in sections.iter().enumerate() {
        let at = format!("rules[{i}]");
        match baseline_of(r.get_ref(), &at, src)? {
            Baseline::File(path, span) => rules.extend(include_baseline(
                r.get_ref(),
                &path,
                span,
                &at,
                &kinds,
                src,
            )?),
            Baseline::Learned(learned) => {
                rules.push(compile_rule(r, &at, learned, &kinds, src)?);
            }
        }
    }
    Ok(rules)
}

/// A rule's `baseline`: absent or `false` (an ordinary rule), `true` (a learned baseline), or a
/// file of learned rules.
enum Baseline {
    Learned(bool),
    File(String, std::ops::Range<usize>),
}

fn baseline_of(r: &file::RuleSection, at: &str, src: &Source<'_>) -> Result<Baseline, PolicyError> {
    let Some(value) = &r.baseline else {
        return Ok(Baseline::Learned(false));
    };
    match value.get_ref() {
        toml::Value::Boolean(b) => Ok(Baseline::Learned(*b)),
        toml::Value::String(path) if !path.trim().is_empty() => {
            Ok(Baseline::File(path.clone(), value.span()))
        }
        other => Err(src.error(
            value.span(),
            &format!("{at}.baseline"),
            format!(
                "`true` (this rule is a learned baseline) or the name of a baseline file, not {other}"
            ),
        )),
    }
}

/// The rules of baseline file `path`, named by entry `at` of `src`: every rule in it is a
/// baseline. Errors inside the file name the file, its line and field, and the entry that
/// included it.
fn include_baseline(
    entry: &file::RuleSection,
    path: &str,
    span: std::ops::Range<usize>,
    at: &str,
    kinds: &Kinds<'_>,
    src: &Source<'_>,
) -> Result<Vec<JobRule>, PolicyError> {
    let field = format!("{at}.baseline");
    let Some(dir) = src.dir else {
        return Err(src.error(
            span,
            &field,
            "a baseline file can only be referenced from a policy file, not from policy text",
        ));
    };
    let others = entry.repository.is_some()
        || entry.workflow.is_some()
        || !entry.allow_egress.is_empty()
        || entry.mode.is_some()
        || entry.metadata.is_some()
        || entry.sni.is_some()
        || !entry.secret_sockets.is_empty()
        || !entry.credential_kinds.is_empty()
        || entry.grace_period_seconds.is_some()
        || !entry.severity.is_empty()
        || !entry.suppress.is_empty();
    if others {
        return Err(src.error(
            span,
            &field,
            "an entry with `baseline = \"FILE\"` holds nothing else: the repository, workflow \
             and allowances are in the file; severities and suppressions go in an entry of their own",
        ));
    }
    let file_path = dir.join(path);
    let shown = file_path.display().to_string();
    let text = std::fs::read_to_string(&file_path)
        .map_err(|e| src.error(span.clone(), &field, format!("cannot read {shown}: {e}")))?;
    let included_at = src.place(span);
    let inner = Source {
        origin: &shown,
        text: &text,
        dir: None,
    };
    let in_file = |mut e: PolicyError| {
        e.message = format!("{} (baseline included by {included_at})", e.message);
        e
    };
    let parsed: file::BaselineFile = toml::from_str(&text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        in_file(inner.error(
            span.clone(),
            &super::field_at(&text, span.start),
            e.message(),
        ))
    })?;
    parsed
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            if let Some(v) = &r.get_ref().baseline
                && v.get_ref().as_bool() != Some(true)
            {
                return Err(in_file(inner.error(
                    v.span(),
                    &format!("rules[{i}].baseline"),
                    "every rule of a baseline file is a baseline: `true` or nothing",
                )));
            }
            compile_rule(r, &format!("rules[{i}]"), true, kinds, &inner).map_err(in_file)
        })
        .collect()
}

/// One `[[rules]]` entry, `at` naming it in errors.
fn compile_rule(
    entry: &Spanned<file::RuleSection>,
    at: &str,
    baseline: bool,
    kinds: &Kinds<'_>,
    src: &Source<'_>,
) -> Result<JobRule, PolicyError> {
    let r = entry.get_ref();
    let repository = rule_selector(&r.repository, &format!("{at}.repository"), src)?;
    let workflow = rule_selector(&r.workflow, &format!("{at}.workflow"), src)?;
    let allow_egress = destinations(&r.allow_egress, &format!("{at}.allow_egress"), src)?;
    let secret_sockets = rule_kinds(
        &r.secret_sockets,
        &format!("{at}.secret_sockets"),
        "secret socket",
        &kinds.sockets,
        src,
    )?;
    if !baseline && let Some(first) = r.credential_kinds.first() {
        return Err(src.error(
            first.span(),
            &format!("{at}.credential_kinds"),
            "credential kinds belong to a learned baseline: add `baseline = true`",
        ));
    }
    let credential_kinds = rule_kinds(
        &r.credential_kinds,
        &format!("{at}.credential_kinds"),
        "credential",
        &kinds.credentials,
        src,
    )?;
    let severity = rule_severity(&r.severity, at, src)?;
    let suppress = rule_suppress(&r.suppress, at, src)?;
    let mode = match &r.mode {
        Some(m) => Some(super::egress::mode(m, &format!("{at}.mode"), src)?),
        None => None,
    };
    let sni = super::egress::sni(r.sni.as_ref(), &allow_egress, at, src)?;
    Ok(JobRule {
        origin: src.place(entry.span()),
        repository,
        workflow,
        allow_egress,
        mode,
        metadata: r.metadata.unwrap_or(false),
        sni,
        secret_sockets,
        grace_period_seconds: r.grace_period_seconds,
        severity,
        suppress,
        baseline,
        credential_kinds,
    })
}

/// A rule's repository or workflow glob; none matches everything.
fn rule_selector(
    glob: &Option<Spanned<String>>,
    field: &str,
    src: &Source<'_>,
) -> Result<GlobMatcher, PolicyError> {
    match glob {
        None => Ok(name_glob("*").expect("valid")),
        Some(g) => name_glob(g.get_ref()).map_err(|e| src.error(g.span(), field, e.to_string())),
    }
}

/// A rule's list of kinds (secret sockets, credentials), each one the policy defines.
fn rule_kinds(
    names: &[Spanned<String>],
    at: &str,
    what: &str,
    known: &BTreeSet<&str>,
    src: &Source<'_>,
) -> Result<BTreeSet<String>, PolicyError> {
    let mut kinds = BTreeSet::new();
    for (j, s) in names.iter().enumerate() {
        if !known.contains(s.get_ref().as_str()) {
            return Err(src.error(
                s.span(),
                &format!("{at}[{j}]"),
                format!("no {what} kind {:?} (known: {known:?})", s.get_ref()),
            ));
        }
        kinds.insert(s.get_ref().clone());
    }
    Ok(kinds)
}

/// A rule's severity overrides: rule -> severity.
fn rule_severity(
    levels: &BTreeMap<String, Spanned<String>>,
    at: &str,
    src: &Source<'_>,
) -> Result<BTreeMap<RuleId, Severity>, PolicyError> {
    let mut severity = BTreeMap::new();
    for (rule, level) in levels {
        let field = format!("{at}.severity.{rule}");
        let rule_id = RuleId::parse(rule)
            .ok_or_else(|| src.error(level.span(), &field, format!("no rule {rule:?}")))?;
        let level_value = Severity::parse(level.get_ref()).ok_or_else(|| {
            src.error(
                level.span(),
                &field,
                format!(
                    "severity must be info, low, medium, high or critical, not {:?}",
                    level.get_ref()
                ),
            )
        })?;
        severity.insert(rule_id, level_value);
    }
    Ok(severity)
}

/// A rule's suppressions: rule -> reason, which may not be empty.
fn rule_suppress(
    entries: &[Spanned<file::SuppressEntry>],
    at: &str,
    src: &Source<'_>,
) -> Result<BTreeMap<RuleId, String>, PolicyError> {
    let mut suppress = BTreeMap::new();
    for (j, s) in entries.iter().enumerate() {
        let field = format!("{at}.suppress[{j}]");
        let entry = s.get_ref();
        let rule_id = RuleId::parse(&entry.rule).ok_or_else(|| {
            src.error(
                s.span(),
                &format!("{field}.rule"),
                format!("no rule {:?}", entry.rule),
            )
        })?;
        if entry.reason.trim().is_empty() {
            return Err(src.error(
                s.span(),
                &format!("{field}.reason"),
                "a suppression needs a reason",
            ));
        }
        suppress.insert(rule_id, entry.reason.clone());
    }
    Ok(suppress)
}

/// `[[job_identity]]`: each needs a `detect` variable and at least one `id` variable; every
/// variable name must fit the kernel's scan (`NAME=` in `NAME_LEN - 1` bytes).
fn check_job_identity(identities: &[JobIdentity], src: &Source<'_>) -> Result<(), PolicyError> {
    let mut names = std::collections::BTreeSet::new();
    for (i, id) in identities.iter().enumerate() {
        if id.id.is_empty() || id.detect.is_empty() {
            return Err(src.error(
                0..0,
                &format!("job_identity[{i}]"),
                "needs `detect` and at least one `id` variable",
            ));
        }
        for name in std::iter::once(&id.detect).chain(id.value_vars()) {
            let bad = name.is_empty()
                || name.len() > NAME_LEN - 2
                || name.bytes().any(|b| b == b'=' || b == 0);
            if bad {
                return Err(src.error(
                    0..0,
                    &format!("job_identity[{i}]"),
                    format!(
                        "variable name {name:?}: 1 to {} bytes, without '=' or NUL",
                        NAME_LEN - 2
                    ),
                ));
            }
            names.insert(name.clone());
        }
    }
    if names.len() > 200 {
        return Err(src.error(
            0..0,
            "job_identity",
            format!("{} variables named; the kernel holds 200", names.len()),
        ));
    }
    Ok(())
}

/// A list of allowed destinations (`egress.allow`, a rule's `allow_egress`), `at` naming it.
fn destinations(
    list: &[Spanned<file::DestinationEntry>],
    at: &str,
    src: &Source<'_>,
) -> Result<Vec<AllowedDestination>, PolicyError> {
    list.iter()
        .enumerate()
        .map(|(i, d)| destination(d, &format!("{at}[{i}]"), src))
        .collect()
}

/// One allowed destination: a CIDR (or a single IP) or a DNS name, not both.
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
