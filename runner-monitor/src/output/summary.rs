//! `replay --summary`: what a trace raises under a policy, per rule and repository, with the
//! severities, so a detection engineer sees the effect of a policy change before rolling it out.

use std::{collections::BTreeMap, fmt::Write as _};

use crate::{
    engine::Finding,
    rule::{RuleId, Severity},
};

/// Findings counted by rule, repository and severity.
#[derive(Debug, Default)]
pub struct FindingSummary {
    counts: BTreeMap<(RuleId, String), BTreeMap<Severity, u64>>,
}

impl FindingSummary {
    pub fn add(&mut self, findings: &[Finding]) {
        for f in findings {
            let repository = match &f.job {
                None => "-".to_owned(),
                Some(j) => j
                    .info
                    .repository
                    .clone()
                    .unwrap_or_else(|| format!("(job {})", j.info.id)),
            };
            *self
                .counts
                .entry((f.rule, repository))
                .or_default()
                .entry(f.severity)
                .or_default() += 1;
        }
    }

    /// A table, one line per rule and repository: rules in the order of `RuleId::ALL`,
    /// repositories by name (`-`: findings of no job), severities most severe first.
    pub fn table(&self) -> String {
        let rows: Vec<[String; 4]> = self
            .counts
            .iter()
            .map(|((rule, repository), severities)| {
                [
                    rule.to_string(),
                    repository.clone(),
                    severities.values().sum::<u64>().to_string(),
                    severities
                        .iter()
                        .rev()
                        .map(|(s, n)| format!("{} {n}", s.as_str()))
                        .collect::<Vec<_>>()
                        .join(", "),
                ]
            })
            .collect();
        let header = [
            "rule".to_owned(),
            "repository".to_owned(),
            "findings".to_owned(),
            "severity".to_owned(),
        ];
        let width = |i: usize| {
            rows.iter()
                .chain([&header])
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
        };
        let (w0, w1, w2) = (width(0), width(1), width(2));
        if rows.is_empty() {
            return "(no findings)\n".to_owned();
        }
        let mut out = String::new();
        for r in [&header].into_iter().chain(&rows) {
            let _ = writeln!(out, "{:<w0$}  {:<w1$}  {:>w2$}  {}", r[0], r[1], r[2], r[3]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{engine::finding::FindingJob, event::JobInfo, event::JobKey};

    fn finding(rule: RuleId, repository: Option<&str>, severity: Severity) -> Finding {
        let mut f = Finding::new(rule, 1, "test".into());
        f.severity = severity;
        f.job = repository.map(|r| FindingJob {
            key: JobKey(1),
            info: JobInfo {
                id: "run-1".into(),
                repository: Some(r.into()),
                ..JobInfo::default()
            },
            ended: false,
            ended_ns: None,
            host: None,
        });
        f
    }

    #[test]
    fn summary_counts_per_rule_and_repository_in_a_stable_order() {
        let mut s = FindingSummary::default();
        s.add(&[
            finding(RuleId::UnexpectedEgress, Some("zeta/app"), Severity::Medium),
            finding(RuleId::SensorDegraded, None, Severity::High),
            finding(RuleId::UnexpectedEgress, Some("acme/app"), Severity::Medium),
            finding(RuleId::UnexpectedEgress, Some("acme/app"), Severity::Low),
            finding(
                RuleId::CredentialAfterJobEnd,
                Some("acme/app"),
                Severity::Critical,
            ),
        ]);
        assert_eq!(
            s.table(),
            "rule                      repository  findings  severity\n\
             credential-after-job-end  acme/app           1  critical 1\n\
             unexpected-egress         acme/app           2  medium 1, low 1\n\
             unexpected-egress         zeta/app           1  medium 1\n\
             sensor-degraded           -                  1  high 1\n"
        );
    }

    #[test]
    fn summary_of_nothing_says_so() {
        assert_eq!(FindingSummary::default().table(), "(no findings)\n");
    }
}
