//! A report as text for a terminal (a tree drawn with box-drawing characters) and as Markdown for
//! a GitHub job summary or a merge-request comment. Job-supplied strings (names, paths, command
//! lines) are untrusted: control characters are written escaped (`\u{1b}`), so they cannot
//! colour a terminal or forge lines; in Markdown, markup and HTML characters are escaped too.

use std::fmt::Write as _;

use super::{Access, CredentialUse, Egress, JobReport, ProcessNode};
use crate::engine::{Finding, step};

/// Control characters escaped, the rest as given.
pub(super) fn plain(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

/// `plain`, with every character Markdown or HTML would read as markup escaped.
fn md(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in plain(s).chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '\\' | '`' | '*' | '_' | '[' | ']' | '(' | ')' | '{' | '}' | '#' | '!' | '|' | '~'
            | '+' | '-' | '.' | '"' | '\'' | '=' | ':' | '@' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

/// `+1.234s` after the job's first event.
pub(super) fn offset(report: &JobReport, time_ns: u64) -> String {
    let ns = time_ns.saturating_sub(report.start_ns);
    format!(
        "+{}.{:03}s",
        ns / 1_000_000_000,
        ns % 1_000_000_000 / 1_000_000
    )
}

/// The job in one line: `acme/app, workflow CI, run 9001, github, runner r1`.
pub(super) fn who(report: &JobReport) -> Vec<(&'static str, String)> {
    let j = &report.job;
    let mut out = Vec::new();
    for (name, value) in [
        ("repository", &j.repository),
        ("workflow", &j.workflow),
        ("run", &j.run),
        ("platform", &j.platform),
        ("runner", &j.runner),
        ("ref", &j.git_ref),
        ("actor", &j.actor),
    ] {
        if let Some(v) = value {
            out.push((name, v.clone()));
        }
    }
    out
}

pub(super) fn status(report: &JobReport) -> String {
    match report.end_ns {
        Some(end) => format!("ended at {}", offset(report, end)),
        None => "running (or its end not seen)".to_owned(),
    }
}

/// The processes as a tree: (depth, process), depth-first in the order they appeared. A
/// process's parent is the process with its ppid that appeared before it (pids are reused).
pub(super) fn tree(report: &JobReport) -> Vec<(usize, &ProcessNode)> {
    let n = report.processes.len();
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut roots = Vec::new();
    let mut latest: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
    for (i, p) in report.processes.iter().enumerate() {
        match latest.get(&p.ppid) {
            Some(&parent) if p.ppid != p.pid => children[parent].push(i),
            _ => roots.push(i),
        }
        latest.insert(p.pid, i);
    }
    let mut out = Vec::with_capacity(n);
    let mut stack: Vec<(usize, usize)> = roots.iter().rev().map(|&r| (0, r)).collect();
    while let Some((depth, i)) = stack.pop() {
        out.push((depth, &report.processes[i]));
        stack.extend(children[i].iter().rev().map(|&c| (depth + 1, c)));
    }
    out
}

/// `comm (pid N) command line`, and how it ended.
pub(super) fn process_line(report: &JobReport, p: &ProcessNode) -> (String, String) {
    let what = match (&p.argv, &p.exe) {
        (Some(argv), _) if !argv.is_empty() => argv.clone(),
        (_, Some(exe)) => exe.clone(),
        _ => String::new(),
    };
    let head = format!("{} (pid {}) {what}", p.comm, p.pid);
    let mut tail = match (p.exit_ns, p.exit_code, p.signal) {
        (Some(t), Some(code), _) => format!("exit {code} at {}", offset(report, t)),
        (Some(t), None, Some(signal)) => {
            format!("killed by signal {signal} at {}", offset(report, t))
        }
        (Some(t), None, None) => format!("killed at {}", offset(report, t)),
        (None, ..) => "running".to_owned(),
    };
    if p.io_uring {
        tail.push_str(", set up io_uring");
    }
    if p.survivor {
        tail.push_str(", SURVIVED THE JOB");
    }
    if let Some(s) = p.step.and_then(|s| report.steps.get(s))
        && s.pid == p.pid
    {
        tail = format!("starts {}; {tail}", step::label(&s.step));
    }
    (head.trim_end().to_owned(), tail)
}

/// A finding's summary, with the step it names: `... (step 2: action evil-org/x@v1)`.
pub(super) fn finding_what(f: &Finding) -> String {
    match &f.step {
        Some(s) => format!("{} ({})", f.summary, step::label(s)),
        None => f.summary.clone(),
    }
}

/// The job's steps, one line each: `step 2: action evil-org/x@v1 (pid 7) from +1.000s`.
pub(super) fn step_lines(report: &JobReport) -> Vec<String> {
    report
        .steps
        .iter()
        .map(|s| {
            format!(
                "{} (pid {}) from {}",
                step::label(&s.step),
                s.pid,
                offset(report, s.start_ns)
            )
        })
        .collect()
}

pub(super) fn credential_counts(c: &CredentialUse) -> String {
    let mut parts = Vec::new();
    let verb = if c.access == Access::Socket {
        "connections"
    } else {
        "reads"
    };
    for (n, what) in [(c.reads, verb), (c.writes, "writes"), (c.failed, "failed")] {
        if n > 0 {
            parts.push(format!("{n} {what}"));
        }
    }
    if c.after_end {
        parts.push("after the job ended".into());
    }
    parts.join(", ")
}

pub(super) fn egress_counts(e: &Egress) -> String {
    let mut parts = vec![format!("{} connections", e.connections)];
    if !e.sni.is_empty() {
        parts.push(format!("TLS to {}", e.sni.join(", ")));
    }
    if e.failed > 0 {
        parts.push(format!("{} failed", e.failed));
    }
    if e.after_end {
        parts.push("after the job ended".into());
    }
    parts.join(", ")
}

pub(super) fn pids(pids: &[u32]) -> String {
    pids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) fn access_name(a: Access) -> &'static str {
    match a {
        Access::File => "file",
        Access::Socket => "socket",
        Access::Memory => "memory",
    }
}

pub(super) fn omitted_line(report: &JobReport) -> Option<String> {
    let o = &report.omitted;
    o.any().then(|| {
        format!(
            "not shown (over the report's bounds): {} processes, {} credentials, {} destinations, {} findings, {} steps",
            o.processes, o.credentials, o.egress, o.findings, o.steps
        )
    })
}

pub(super) fn not_tracked_line(report: &JobReport) -> String {
    format!(
        "Not tracked by the agent yet, so not in this report: {}.",
        report.not_tracked.join(", ")
    )
}

/// The report for a terminal.
pub fn text(report: &JobReport) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "Job {} (key {})", plain(&report.job.id), report.key);
    for (name, value) in who(report) {
        let _ = writeln!(o, "  {name}: {}", plain(&value));
    }
    let _ = writeln!(o, "  {}", status(report));
    let _ = writeln!(o, "  {}", not_tracked_line(report));

    let _ = writeln!(o, "\nSteps ({})", report.steps.len());
    for line in step_lines(report) {
        let _ = writeln!(o, "  {}", plain(&line));
    }

    let _ = writeln!(o, "\nProcesses ({})", report.processes.len());
    // Whether the ancestor at each depth has siblings still to come: `│` or blank.
    let lines = tree(report);
    let mut open: Vec<bool> = Vec::new();
    for (i, (depth, p)) in lines.iter().enumerate() {
        let last = !lines[i + 1..]
            .iter()
            .take_while(|(d, _)| d >= depth)
            .any(|(d, _)| d == depth);
        open.truncate(*depth);
        let mut prefix = String::new();
        for &more in open.iter().skip(1) {
            prefix.push_str(if more { "│  " } else { "   " });
        }
        if *depth > 0 {
            prefix.push_str(if last { "└─ " } else { "├─ " });
        }
        open.push(!last);
        let (head, tail) = process_line(report, p);
        let _ = writeln!(o, "  {prefix}{}  [{}]", plain(&head), plain(&tail));
    }

    let _ = writeln!(o, "\nCredentials ({})", report.credentials.len());
    for c in &report.credentials {
        let _ = writeln!(
            o,
            "  {:<8} {:<6} {}  {} (pids {}) from {}",
            plain(&c.kind),
            access_name(c.access),
            plain(&c.path),
            credential_counts(c),
            pids(&c.pids),
            offset(report, c.first_ns)
        );
    }

    let _ = writeln!(o, "\nEgress ({})", report.egress.len());
    for e in &report.egress {
        let name = e
            .dns_name
            .as_deref()
            .map(plain)
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            o,
            "  {name} {}:{}  {} (pids {}) from {}",
            e.ip,
            e.port,
            egress_counts(e),
            pids(&e.pids),
            offset(report, e.first_ns)
        );
    }

    let _ = writeln!(o, "\nSurvivors ({})", report.survivors.len());
    for s in &report.survivors {
        let _ = writeln!(
            o,
            "  pid {} {}  ({})",
            s.pid,
            plain(s.cmdline.as_deref().or(s.exe.as_deref()).unwrap_or("")),
            s.escape.join(", ")
        );
    }

    let _ = writeln!(o, "\nFindings ({})", report.findings.len());
    for f in &report.findings {
        let _ = writeln!(
            o,
            "  {}  {:<8} {}  {}",
            offset(report, f.time_ns),
            f.severity.as_str(),
            f.rule,
            plain(&finding_what(f))
        );
    }
    if let Some(line) = omitted_line(report) {
        let _ = writeln!(o, "\n{line}");
    }
    o
}

/// The report as Markdown (GitHub job summary, merge-request comment).
pub fn markdown(report: &JobReport) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "## runner-monitor: job {}\n", md(&report.job.id));
    let mut facts: Vec<String> = who(report)
        .into_iter()
        .map(|(name, value)| format!("{name} {}", md(&value)))
        .collect();
    facts.push(status(report));
    let _ = writeln!(o, "{}\n", facts.join(" · "));
    let _ = writeln!(o, "_{}_\n", md(&not_tracked_line(report)));

    let _ = writeln!(o, "### Findings ({})\n", report.findings.len());
    if !report.findings.is_empty() {
        let _ = writeln!(o, "| time | severity | rule | what |\n|---|---|---|---|");
        for f in &report.findings {
            let _ = writeln!(
                o,
                "| {} | **{}** | `{}` | {} |",
                offset(report, f.time_ns),
                f.severity.as_str(),
                f.rule,
                md(&finding_what(f))
            );
        }
        o.push('\n');
    }

    let _ = writeln!(o, "### Steps ({})\n", report.steps.len());
    for line in step_lines(report) {
        let _ = writeln!(o, "1. {}", md(&line));
    }
    o.push('\n');

    let _ = writeln!(o, "### Processes ({})\n", report.processes.len());
    for (depth, p) in tree(report) {
        let (head, tail) = process_line(report, p);
        let _ = writeln!(o, "{}- {} — {}", "  ".repeat(depth), md(&head), md(&tail));
    }
    o.push('\n');

    let _ = writeln!(o, "### Credentials ({})\n", report.credentials.len());
    if !report.credentials.is_empty() {
        let _ = writeln!(
            o,
            "| kind | how | path | use | pids |\n|---|---|---|---|---|"
        );
        for c in &report.credentials {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} |",
                md(&c.kind),
                access_name(c.access),
                md(&c.path),
                credential_counts(c),
                pids(&c.pids)
            );
        }
        o.push('\n');
    }

    let _ = writeln!(o, "### Egress ({})\n", report.egress.len());
    if !report.egress.is_empty() {
        let _ = writeln!(
            o,
            "| name | address | port | connections | pids |\n|---|---|---|---|---|"
        );
        for e in &report.egress {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} |",
                e.dns_name.as_deref().map(md).unwrap_or_default(),
                e.ip,
                e.port,
                egress_counts(e),
                pids(&e.pids)
            );
        }
        o.push('\n');
    }

    let _ = writeln!(o, "### Survivors ({})\n", report.survivors.len());
    for s in &report.survivors {
        let _ = writeln!(
            o,
            "- pid {} {} ({})",
            s.pid,
            md(s.cmdline.as_deref().or(s.exe.as_deref()).unwrap_or("")),
            md(&s.escape.join(", "))
        );
    }
    if let Some(line) = omitted_line(report) {
        let _ = writeln!(o, "\n_{line}_");
    }
    o
}
