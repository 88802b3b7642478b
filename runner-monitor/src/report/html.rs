//! A report as a web page (the HTTP endpoint's `/jobs` and `/jobs/ID`), rendered on the server.
//! Read-only: no form, no script, nothing loaded from anywhere (inline CSS; the endpoint also
//! sends a Content-Security-Policy that forbids the rest). Every job-supplied string is
//! HTML-escaped, its control characters written escaped.

use std::fmt::Write as _;

use super::{
    JobReport, JobSummary,
    text::{
        access_name, credential_counts, egress_counts, finding_what, not_tracked_line, offset,
        omitted_line, pids, plain, process_line, status, step_lines, tree, who,
    },
};

/// HTML-escaped, control characters written escaped.
fn h(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in plain(s).chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A URL path segment: everything but unreserved characters percent-encoded.
fn segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1b1f24}\
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.4em;border-bottom:1px solid #d0d7de}\
table{border-collapse:collapse}td,th{border:1px solid #d0d7de;padding:.25em .5em;text-align:left;vertical-align:top}\
code,.tree{font-family:ui-monospace,monospace;font-size:13px}.tree ul{list-style:none;padding-left:1.2em;border-left:1px solid #d0d7de;margin:0}\
.tree>ul{border:0;padding:0}.muted{color:#656d76}.critical{color:#fff;background:#a40e26}.high{color:#fff;background:#bc4c00}\
.medium{background:#fff1a8}.low,.info{background:#ddf4ff}.sev{padding:0 .4em;border-radius:3px}\
.survivor{color:#a40e26;font-weight:bold}ol.timeline{padding-left:1.5em}";

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\"><title>{}</title>\
         <style>{STYLE}</style></head><body>\n{body}</body></html>\n",
        h(title)
    )
}

fn severity(s: crate::rule::Severity) -> String {
    format!("<span class=\"sev {0}\">{0}</span>", s.as_str())
}

/// `/jobs`: the recent jobs, most recent first.
pub fn jobs_page(jobs: &[JobSummary]) -> String {
    let mut b = String::from("<h1>runner-monitor: recent jobs</h1>\n");
    if jobs.is_empty() {
        b.push_str("<p class=\"muted\">No job seen since the agent started.</p>\n");
    } else {
        b.push_str(
            "<table><tr><th>job</th><th>repository</th><th>workflow</th><th>run</th>\
             <th>state</th><th>processes</th><th>findings</th></tr>\n",
        );
        for j in jobs {
            let _ = writeln!(
                b,
                "<tr><td><a href=\"/jobs/{}\">{}</a></td><td>{}</td><td>{}</td><td>{}</td>\
                 <td>{}</td><td>{}</td><td>{} {}</td></tr>",
                segment(&j.key.to_string()),
                h(&j.job.id),
                h(j.job.repository.as_deref().unwrap_or("")),
                h(j.job.workflow.as_deref().unwrap_or("")),
                h(j.job.run.as_deref().unwrap_or("")),
                if j.end_ns.is_some() {
                    "ended"
                } else {
                    "running"
                },
                j.processes,
                j.findings,
                j.worst.map(severity).unwrap_or_default()
            );
        }
        b.push_str("</table>\n");
    }
    page("runner-monitor: jobs", &b)
}

/// `/jobs/ID`: one job's report.
pub fn job_page(report: &JobReport) -> String {
    let mut b = String::new();
    let _ = writeln!(
        b,
        "<p><a href=\"/jobs\">all jobs</a></p><h1>Job {}</h1>",
        h(&report.job.id)
    );
    b.push_str("<table>");
    for (name, value) in who(report) {
        let _ = write!(b, "<tr><th>{name}</th><td>{}</td></tr>", h(&value));
    }
    let _ = writeln!(
        b,
        "<tr><th>key</th><td><code>{}</code></td></tr><tr><th>state</th><td>{}</td></tr></table>",
        report.key,
        status(report)
    );
    let _ = writeln!(b, "<p class=\"muted\">{}</p>", h(&not_tracked_line(report)));

    let _ = writeln!(
        b,
        "<h2 id=\"findings\">Findings ({})</h2>",
        report.findings.len()
    );
    if !report.findings.is_empty() {
        b.push_str("<ol class=\"timeline\">\n");
        for f in &report.findings {
            let _ = writeln!(
                b,
                "<li><code>{}</code> {} <code>{}</code> {}</li>",
                offset(report, f.time_ns),
                severity(f.severity),
                f.rule,
                h(&finding_what(f))
            );
        }
        b.push_str("</ol>\n");
    }

    let _ = writeln!(b, "<h2 id=\"steps\">Steps ({})</h2>", report.steps.len());
    if !report.steps.is_empty() {
        b.push_str("<ol class=\"steps\">\n");
        for line in step_lines(report) {
            let _ = writeln!(b, "<li>{}</li>", h(&line));
        }
        b.push_str("</ol>\n");
    }

    let _ = writeln!(
        b,
        "<h2 id=\"processes\">Processes ({})</h2><div class=\"tree\">",
        report.processes.len()
    );
    let mut depth_open = 0;
    for (depth, p) in tree(report) {
        // A child opens a list in its parent's item; a sibling closes the item before it (and
        // the lists of that item's descendants).
        if depth_open > depth {
            while depth_open > depth + 1 {
                b.push_str("</li></ul>");
                depth_open -= 1;
            }
            b.push_str("</li>");
        } else {
            while depth_open <= depth {
                b.push_str("<ul>");
                depth_open += 1;
            }
        }
        let (head, tail) = process_line(report, p);
        let class = if p.survivor {
            " class=\"survivor\""
        } else {
            ""
        };
        let _ = write!(
            b,
            "<li><span{class}>{}</span> <span class=\"muted\">[{}]</span>",
            h(&head),
            h(&tail)
        );
    }
    while depth_open > 0 {
        b.push_str("</li></ul>");
        depth_open -= 1;
    }
    b.push_str("</div>\n");

    let _ = writeln!(
        b,
        "<h2 id=\"credentials\">Credentials ({})</h2>",
        report.credentials.len()
    );
    if !report.credentials.is_empty() {
        b.push_str("<table><tr><th>kind</th><th>how</th><th>path</th><th>use</th><th>pids</th><th>first</th></tr>\n");
        for c in &report.credentials {
            let _ = writeln!(
                b,
                "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                h(&c.kind),
                access_name(c.access),
                h(&c.path),
                credential_counts(c),
                pids(&c.pids),
                offset(report, c.first_ns)
            );
        }
        b.push_str("</table>\n");
    }

    let _ = writeln!(b, "<h2 id=\"egress\">Egress ({})</h2>", report.egress.len());
    if !report.egress.is_empty() {
        b.push_str("<table><tr><th>name</th><th>address</th><th>port</th><th>connections</th><th>pids</th><th>first</th></tr>\n");
        for e in &report.egress {
            let _ = writeln!(
                b,
                "<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                h(e.dns_name.as_deref().unwrap_or("")),
                e.ip,
                e.port,
                egress_counts(e),
                pids(&e.pids),
                offset(report, e.first_ns)
            );
        }
        b.push_str("</table>\n");
    }

    let _ = writeln!(
        b,
        "<h2 id=\"survivors\">Survivors ({})</h2>",
        report.survivors.len()
    );
    if !report.survivors.is_empty() {
        b.push_str("<ul>\n");
        for s in &report.survivors {
            let _ = writeln!(
                b,
                "<li>pid {} <code>{}</code> ({})</li>",
                s.pid,
                h(s.cmdline.as_deref().or(s.exe.as_deref()).unwrap_or("")),
                h(&s.escape.join(", "))
            );
        }
        b.push_str("</ul>\n");
    }
    if let Some(line) = omitted_line(report) {
        let _ = writeln!(b, "<p class=\"muted\">{line}</p>");
    }
    page(&format!("runner-monitor: job {}", report.job.id), &b)
}
