//! Learning a baseline: recorded traces of a repository's normal jobs, replayed through the same
//! pipeline and engine the agent runs, give what each job used (`engine::usage`); per repository
//! and workflow that becomes a `[[rules]]` entry with `baseline = true` that allows exactly it.
//! Against the policy in force, the same record shows the entitlements no job used.
//!
//! No I/O but reading the traces: the caller writes the text this returns.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::IpAddr,
    path::Path,
    sync::Arc,
};

use crate::{
    engine::usage::Used,
    event::Event,
    output::{Outputs, alerts::AlertWriter},
    pipeline::Pipeline,
    policy::{AllowedDestination, Destination, JobRule, Policy},
};

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: not an event: {message}")]
    Event {
        path: String,
        line: usize,
        message: String,
    },
}

/// The events of a recorded trace (`run --events-out`): JSON lines; blank lines and `#` comments
/// are skipped.
pub fn read_trace(path: &Path) -> Result<Vec<Event>, TraceError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| TraceError::Read {
        path: shown.clone(),
        source,
    })?;
    let mut events = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        events.push(serde_json::from_str(line).map_err(|e| TraceError::Event {
            path: shown.clone(),
            line: n + 1,
            message: e.to_string(),
        })?);
    }
    Ok(events)
}

/// One recorded job and what it used.
#[derive(Debug, Clone)]
pub struct LearnedJob {
    /// The trace it was recorded in.
    pub trace: String,
    pub id: String,
    pub repository: String,
    pub workflow: Option<String>,
    /// Each use once.
    pub used: Vec<Used>,
}

impl LearnedJob {
    fn selected_by(&self, rule: &JobRule) -> bool {
        rule.repository.is_match(&self.repository)
            && rule
                .workflow
                .is_match(self.workflow.as_deref().unwrap_or(""))
    }

    fn reached(&self, allowed: &AllowedDestination) -> bool {
        self.used.iter().any(|u| match u {
            Used::Egress { ip, port, names } => allowed.allows(*ip, *port, names),
            _ => false,
        })
    }

    fn used_socket(&self, kind: &str) -> bool {
        self.used
            .iter()
            .any(|u| matches!(u, Used::SecretSocket { kind: k, .. } if k == kind))
    }

    fn used_credential(&self, kind: &str) -> bool {
        self.used
            .iter()
            .any(|u| matches!(u, Used::Credential { kind: k, .. } if k == kind))
    }
}

/// What the recorded jobs used, trace after trace, judged under one policy.
pub struct Learner {
    policy: Arc<Policy>,
    traces: Vec<String>,
    jobs: Vec<LearnedJob>,
    /// Jobs without a repository: no rule can select them, so nothing is learned from them.
    pub unidentified: usize,
}

impl Learner {
    /// `policy` says what is a credential, a secret socket, and (for `unused`) what is granted.
    pub fn new(policy: Arc<Policy>) -> Self {
        Self {
            policy,
            traces: Vec::new(),
            jobs: Vec::new(),
            unidentified: 0,
        }
    }

    pub fn jobs(&self) -> &[LearnedJob] {
        &self.jobs
    }

    /// Replays one trace, as `replay` does, in a pipeline of its own (job keys are only unique
    /// within one agent's run), and records the jobs in it and what they used.
    pub fn learn(&mut self, trace: &str, events: impl IntoIterator<Item = Event>) {
        let alerts = AlertWriter::to_writer(Box::new(std::io::sink()), None);
        let outputs = Outputs::new(alerts, None).expect("no files to open");
        let mut pipeline = Pipeline::new(self.policy.clone(), None, outputs);
        pipeline.record_usage();
        let mut last = 0;
        for event in events {
            last = last.max(event.time_ns);
            // Writing to a sink cannot fail.
            let _ = pipeline.run([event]);
        }
        let _ = pipeline.advance(last);
        let mut used: BTreeMap<_, Vec<Used>> = BTreeMap::new();
        for u in pipeline.take_usage() {
            let list = used.entry(u.job).or_default();
            if !list.contains(&u.used) {
                list.push(u.used);
            }
        }
        let mut jobs: Vec<_> = pipeline.engine().jobs().collect();
        jobs.sort_by_key(|(key, _)| *key);
        for (key, info) in jobs {
            let Some(repository) = info.repository.clone() else {
                self.unidentified += 1;
                continue;
            };
            self.jobs.push(LearnedJob {
                trace: trace.to_owned(),
                id: info.id.clone(),
                repository,
                workflow: info.workflow.clone(),
                used: used.remove(&key).unwrap_or_default(),
            });
        }
        self.traces.push(trace.to_owned());
    }

    /// The learned rules: a policy TOML fragment, one `[[rules]]` entry per repository and
    /// workflow, each allowance with a comment saying how many of its jobs used it.
    pub fn rules(&self) -> String {
        let mut groups: BTreeMap<(&str, Option<&str>), Vec<&LearnedJob>> = BTreeMap::new();
        for job in &self.jobs {
            groups
                .entry((&job.repository, job.workflow.as_deref()))
                .or_default()
                .push(job);
        }
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# Baseline learned by `runner-monitor baseline learn` from {} trace(s) ({}): {} job(s).",
            self.traces.len(),
            self.traces.join(", "),
            self.jobs.len()
        );
        out.push_str(
            "# Each entry allows what the jobs of one repository and workflow used, and nothing\n\
             # else: reference this file from a policy (`[[rules]] baseline = \"FILE\"`) or paste\n\
             # the entries into one. A job they select that uses anything else raises\n\
             # baseline-deviation.\n",
        );
        for ((repository, workflow), jobs) in groups {
            out.push('\n');
            render_group(&mut out, repository, workflow, &jobs);
        }
        out
    }

    /// The entitlements of the policy that no recorded job used: allowed destinations (global
    /// and per rule), secret sockets and credential kinds rules grant; one line each, in policy
    /// order.
    pub fn unused(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for (i, allowed) in self.policy.egress_allow.iter().enumerate() {
            if !self.jobs.iter().any(|j| j.reached(allowed)) {
                lines.push(format!(
                    "egress.allow[{i}]: {} (no recorded job reached it)",
                    show_destination(allowed)
                ));
            }
        }
        for (i, rule) in self.policy.rules.iter().enumerate() {
            let selected: Vec<&LearnedJob> =
                self.jobs.iter().filter(|j| j.selected_by(rule)).collect();
            let who = format!("rules[{i}] ({}, {})", show_selector(rule), rule.origin);
            let of = match selected.len() {
                0 => "no recorded job is of this repository and workflow".to_owned(),
                n => format!("none of the {n} recorded job(s) it selects used it"),
            };
            for (j, allowed) in rule.allow_egress.iter().enumerate() {
                if !selected.iter().any(|job| job.reached(allowed)) {
                    lines.push(format!(
                        "{who}: allow_egress[{j}] {}: {of}",
                        show_destination(allowed)
                    ));
                }
            }
            for kind in &rule.secret_sockets {
                if !selected.iter().any(|job| job.used_socket(kind)) {
                    lines.push(format!("{who}: secret socket {kind}: {of}"));
                }
            }
            for kind in &rule.credential_kinds {
                if !selected.iter().any(|job| job.used_credential(kind)) {
                    lines.push(format!("{who}: credential kind {kind}: {of}"));
                }
            }
        }
        lines
    }
}

fn show_selector(rule: &JobRule) -> String {
    format!(
        "repository {}, workflow {}",
        rule.repository.glob().glob(),
        rule.workflow.glob().glob()
    )
}

fn show_destination(allowed: &AllowedDestination) -> String {
    let what = match &allowed.destination {
        Destination::Net(net) => net.to_string(),
        Destination::Name(name) => name.clone(),
    };
    match allowed.ports.as_slice() {
        [] => format!("{what}, every port"),
        ports => format!(
            "{what} port {}",
            ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// One learned allowance: its TOML text, and the jobs that used it.
struct Allowance {
    text: String,
    jobs: BTreeSet<usize>,
    /// What a wildcard stands for.
    seen: Vec<String>,
}

/// A `[[rules]]` entry for the jobs of one repository and workflow.
fn render_group(out: &mut String, repository: &str, workflow: Option<&str>, jobs: &[&LearnedJob]) {
    let total = jobs.len();
    let _ = writeln!(
        out,
        "# {repository}{}: {total} job(s)",
        workflow.map(|w| format!(" / {w}")).unwrap_or_default()
    );
    out.push_str("[[rules]]\n");
    let _ = writeln!(out, "repository = {}", quote(&glob_literal(repository)));
    if let Some(w) = workflow {
        let _ = writeln!(out, "workflow = {}", quote(&glob_literal(w)));
    }
    out.push_str("baseline = true\n");
    // Destinations: by name when the job resolved one that a policy can hold, else by address.
    let mut names: BTreeMap<String, (BTreeSet<u16>, BTreeSet<usize>)> = BTreeMap::new();
    let mut addresses: BTreeMap<IpAddr, (BTreeSet<u16>, BTreeSet<usize>)> = BTreeMap::new();
    let mut sockets: BTreeMap<&str, BTreeSet<usize>> = BTreeMap::new();
    let mut credentials: BTreeMap<&str, BTreeSet<usize>> = BTreeMap::new();
    for (n, job) in jobs.iter().enumerate() {
        for used in &job.used {
            match used {
                Used::Egress {
                    ip,
                    port,
                    names: n_,
                } => {
                    let entry = match n_.first().map(|s| s.to_ascii_lowercase()) {
                        Some(name) if is_policy_name(&name) => names.entry(name).or_default(),
                        _ => addresses.entry(*ip).or_default(),
                    };
                    entry.0.insert(*port);
                    entry.1.insert(n);
                }
                Used::SecretSocket { kind, .. } => {
                    sockets.entry(kind).or_default().insert(n);
                }
                Used::Credential { kind, .. } => {
                    credentials.entry(kind).or_default().insert(n);
                }
            }
        }
    }
    let mut egress = name_allowances(names);
    for (ip, (ports, users)) in addresses {
        egress.push(Allowance {
            text: format!(
                "{{ cidr = {}, ports = {} }}",
                quote(&ip.to_string()),
                port_list(&ports)
            ),
            jobs: users,
            seen: Vec::new(),
        });
    }
    render_list(out, "allow_egress", &egress, total);
    let kinds = |map: BTreeMap<&str, BTreeSet<usize>>| -> Vec<Allowance> {
        map.into_iter()
            .map(|(kind, users)| Allowance {
                text: quote(kind),
                jobs: users,
                seen: Vec::new(),
            })
            .collect()
    };
    render_list(out, "secret_sockets", &kinds(sockets), total);
    render_list(out, "credential_kinds", &kinds(credentials), total);
}

/// Names as allowances: several subdomains of one parent domain (`a.example.com`,
/// `b.example.com`) become one wildcard (`*.example.com`); a single one stays as it is. A parent
/// of one label (`com`) never becomes a wildcard.
fn name_allowances(names: BTreeMap<String, (BTreeSet<u16>, BTreeSet<usize>)>) -> Vec<Allowance> {
    let mut by_parent: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for name in names.keys() {
        let parent = name
            .split_once('.')
            .map(|(_, p)| p)
            .filter(|p| p.contains('.'))
            .unwrap_or("");
        by_parent
            .entry(parent.to_owned())
            .or_default()
            .push(name.clone());
    }
    let mut allowances = Vec::new();
    for (parent, members) in by_parent {
        let wildcard = !parent.is_empty() && members.len() >= 2;
        let groups: Vec<(String, Vec<String>)> = if wildcard {
            vec![(format!("*.{parent}"), members)]
        } else {
            members.into_iter().map(|m| (m.clone(), vec![m])).collect()
        };
        for (pattern, members) in groups {
            let mut ports = BTreeSet::new();
            let mut users = BTreeSet::new();
            for m in &members {
                ports.extend(&names[m].0);
                users.extend(&names[m].1);
            }
            allowances.push(Allowance {
                text: format!(
                    "{{ name = {}, ports = {} }}",
                    quote(&pattern),
                    port_list(&ports)
                ),
                jobs: users,
                seen: if wildcard { members } else { Vec::new() },
            });
        }
    }
    allowances.sort_by(|a, b| a.text.cmp(&b.text));
    allowances
}

/// `key = [ ... ]`, one allowance a line with how many of the `total` jobs used it.
fn render_list(out: &mut String, key: &str, items: &[Allowance], total: usize) {
    if items.is_empty() {
        let _ = writeln!(out, "{key} = [] # none used");
        return;
    }
    let _ = writeln!(out, "{key} = [");
    for item in items {
        let _ = write!(
            out,
            "    {}, # used by {} of {total} jobs",
            item.text,
            item.jobs.len()
        );
        if !item.seen.is_empty() {
            let _ = write!(out, ": {}", item.seen.join(", "));
        }
        out.push('\n');
    }
    out.push_str("]\n");
}

fn port_list(ports: &BTreeSet<u16>) -> String {
    format!(
        "[{}]",
        ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// A name the policy accepts and a reader can trust: letters, digits, `-`, `_` and dots. Names
/// resolved by a job are untrusted; anything else is allowed by its address instead.
fn is_policy_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A TOML basic string.
fn quote(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

/// A glob that matches exactly `text` (workflow names are free text: `build [linux]`).
fn glob_literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '{' | '}' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests;
