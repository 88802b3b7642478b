//! The Grafana dashboards and Prometheus rules in `dashboards/`: the rules pass promtool's unit
//! tests, every query parses (promtool's PromQL parser), and every metric a panel or a rule asks
//! for is one the agent exports.

use std::{path::PathBuf, process::Command};

use runner_monitor::{
    fleet::metrics::{FLEET_METRIC_NAMES, FleetMetrics},
    output::metrics::{METRIC_NAMES, Metrics},
};
use serde_json::Value;

fn dashboards_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../dashboards")
}

fn promtool(args: &[&str], dir: &std::path::Path) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool (Debian package prometheus) is installed by `cargo xtask setup`");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// Every PromQL expression of every dashboard panel, with Grafana's variables filled in.
fn dashboard_queries() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let dir = dashboards_dir().join("grafana");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert_eq!(
        files.len(),
        4,
        "fleet, credentials, egress and agent-health dashboards"
    );
    for file in files {
        let d: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let vars = d["templating"]["list"].as_array().expect("templating");
        assert!(
            vars.iter()
                .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
            "{}: a Prometheus datasource variable",
            file.display()
        );
        let panels = d["panels"].as_array().expect("panels");
        assert!(!panels.is_empty());
        for p in panels {
            if p["type"] == "row" {
                continue; // a row header (the fleet correlator's row): no query
            }
            let targets = p["targets"].as_array().expect("targets");
            if p["datasource"]["type"] == "loki" {
                // Alert-stream panels: LogQL over the JSON alert lines, from the Loki variable.
                assert_eq!(p["datasource"]["uid"], "${alerts}", "{}", file.display());
                assert!(
                    vars.iter()
                        .any(|v| v["name"] == "alerts" && v["query"] == "loki"),
                    "{}: a Loki datasource variable for the alert stream",
                    file.display()
                );
                for t in targets {
                    let expr = t["expr"].as_str().expect("expr");
                    assert!(expr.contains("| json") && expr.contains("rule="), "{expr}");
                }
                continue;
            }
            assert_eq!(
                p["datasource"]["uid"],
                "${datasource}",
                "{}: {}",
                file.display(),
                p["title"]
            );
            assert!(
                !targets.is_empty(),
                "{}: panel {} has no query",
                file.display(),
                p["title"]
            );
            for t in targets {
                let expr = t["expr"].as_str().expect("expr");
                let filled = expr
                    .replace("$__rate_interval", "1m")
                    .replace("$__range", "1h")
                    .replace("$instance", ".*");
                out.push((format!("{} / {}", file.display(), p["title"]), filled));
            }
        }
    }
    out
}

fn rule_queries() -> Vec<String> {
    let text =
        std::fs::read_to_string(dashboards_dir().join("prometheus/runner-monitor.rules.yml"))
            .unwrap();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .map(|e| e.trim().to_owned())
        .collect()
}

/// `runner_monitor_*` names a query uses, without histogram suffixes.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("runner_monitor_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.push(base.to_owned());
        rest = &tail[end..];
    }
    names
}

#[test]
fn alert_rules_pass_promtool_checks_and_unit_tests() {
    let dir = dashboards_dir().join("prometheus");
    let check = promtool(&["check", "rules", "runner-monitor.rules.yml"], &dir);
    assert!(check.contains("7 rules found"), "{check}");
    promtool(&["test", "rules", "runner-monitor.rules.test.yml"], &dir);
}

#[test]
fn every_dashboard_query_parses() {
    // Each query as a recording rule: promtool parses the PromQL without a server.
    let queries = dashboard_queries();
    let mut rules = String::from("groups:\n  - name: dashboard-queries\n    rules:\n");
    for (i, (_, expr)) in queries.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(expr).unwrap()
        ));
    }
    let dir = std::env::temp_dir().join(format!("rm-dash-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("queries.yml"), rules).unwrap();
    let out = promtool(&["check", "rules", "queries.yml"], &dir);
    assert!(
        out.contains(&format!("{} rules found", queries.len())),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn every_metric_a_dashboard_or_rule_uses_is_exported_by_the_agent() {
    let metrics = Metrics::new();
    // The control socket registers its own metric, as the agent does.
    runner_monitor::job::control::ControlMetrics::register(metrics.registry());
    // The fleet correlator registers its own beside the agent's, as `runner-monitor fleet` does.
    FleetMetrics::register(metrics.registry());
    let declared: Vec<&str> = METRIC_NAMES
        .iter()
        .chain(FLEET_METRIC_NAMES)
        .copied()
        .collect();
    metrics.credential_kinds(
        runner_monitor::policy::Policy::builtin()
            .credentials
            .iter()
            .map(|c| c.kind.as_str()),
    );
    let exported = metrics.encode();
    let mut used = Vec::new();
    for (where_, expr) in dashboard_queries() {
        used.extend(metric_names(&expr).into_iter().map(|n| (where_.clone(), n)));
    }
    for expr in rule_queries() {
        used.extend(
            metric_names(&expr)
                .into_iter()
                .map(|n| ("rules".to_owned(), n)),
        );
    }
    assert!(used.len() > 20, "queries found: {used:?}");
    for (where_, name) in &used {
        assert!(
            declared.contains(&name.as_str()),
            "{where_} uses {name}, which neither the agent nor the correlator declares"
        );
        // Declared and really in the exposition (probe_attached has series once probes exist).
        if name != "runner_monitor_probe_attached" {
            assert!(
                exported.contains(&format!("# TYPE {name} ")),
                "{where_} uses {name}, not in /metrics"
            );
        }
    }
    // And each dashboard family is covered: every declared metric is shown somewhere.
    for name in &declared {
        assert!(
            used.iter().any(|(_, n)| n == name),
            "no dashboard or rule shows {name}"
        );
    }
}
