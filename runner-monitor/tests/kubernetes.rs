//! The Kubernetes manifests (`packaging/kubernetes/`): every file and every kustomize variant,
//! rendered by a real kustomize (kubectl's), is checked by an independent validator against the
//! Kubernetes API's own schemas, strictly (an unknown field fails), for the oldest Kubernetes the
//! manifests claim and the newest the validator knows. Then what the schemas cannot see: the
//! ConfigMap carries exactly the built-in policy, and the DaemonSet grants exactly the
//! capabilities the agent checks for.
//!
//! The tools come from `cargo xtask setup`: `kubernetes-validate` (PyPI, with its schema sets and
//! PyYAML) in a virtualenv under `~/.cache/runner-monitor/`, and `kubectl kustomize`.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
};

use runner_monitor::{
    policy::DEFAULT_POLICY,
    privilege::{REQUIREMENTS, When},
};
use serde_json::Value;

/// The oldest Kubernetes the manifests are for (`appArmorProfile` is 1.30+), and the newest the
/// validator has schemas for.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

/// Where `cargo xtask setup` puts the validator's virtualenv (xtask/src/setup.rs).
fn venv() -> PathBuf {
    if let Some(dir) = std::env::var_os("RUNNER_MONITOR_KUBE_VENV") {
        return dir.into();
    }
    let home = std::env::var_os("HOME").map_or("/root".into(), PathBuf::from);
    home.join(".cache/runner-monitor/kubernetes-validate")
}

fn tool(name: &str) -> PathBuf {
    let path = venv().join("bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask setup` (it installs kubernetes-validate)",
        path.display()
    );
    path
}

fn kubernetes_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/kubernetes")
}

/// A fresh file name in this run's scratch directory (the tests run in parallel).
fn scratch(name: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!("rm-kube-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("creating a scratch directory");
    dir.join(format!("{}-{name}", NEXT.fetch_add(1, Ordering::Relaxed)))
}

/// Every YAML file under `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("reading packaging/kubernetes") {
        let path = entry.expect("reading packaging/kubernetes").path();
        if path.is_dir() {
            out.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// Kubernetes objects (everything but kustomize's own files).
fn manifest_files() -> Vec<PathBuf> {
    yaml_files(&kubernetes_dir())
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n != "kustomization.yaml"))
        .collect()
}

/// Directories kustomize builds: the base and each overlay.
fn variants() -> Vec<PathBuf> {
    yaml_files(&kubernetes_dir())
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "kustomization.yaml"))
        .map(|p| {
            p.parent()
                .expect("a kustomization's directory")
                .to_path_buf()
        })
        .collect()
}

/// Runs the validator, strict, against one Kubernetes version: the combined output on failure.
fn validate(files: &[PathBuf], version: &str) -> Result<(), String> {
    let out = Command::new(tool("kubernetes-validate"))
        .args(["--strict", "--quiet", "-k", version])
        .args(files)
        .output()
        .expect("running kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // It exits non-zero on an invalid resource; a file it could not read as a resource at all is
    // an error line too.
    if out.status.success() && !text.contains("ERROR") {
        Ok(())
    } else {
        Err(text)
    }
}

fn assert_valid(files: &[PathBuf]) {
    for version in KUBERNETES_VERSIONS {
        if let Err(text) = validate(files, version) {
            panic!("not valid against Kubernetes {version}:\n{text}");
        }
    }
}

/// `kubectl kustomize DIR`, written to a file for the validator.
fn render(variant: &Path) -> PathBuf {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(variant)
        .output()
        .unwrap_or_else(|e| {
            panic!("running `kubectl kustomize` ({e}): `cargo xtask setup` checks that it is there")
        });
    assert!(
        out.status.success(),
        "kustomize could not build {}:\n{}",
        variant.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let name = variant
        .strip_prefix(kubernetes_dir())
        .expect("a variant under packaging/kubernetes")
        .to_string_lossy()
        .replace('/', "-");
    let file = scratch(&format!("{name}.yaml"));
    std::fs::write(&file, &out.stdout).expect("writing the rendered manifests");
    file
}

/// The documents of a YAML file as JSON, read by PyYAML (an independent YAML reader).
fn documents(file: &Path) -> Vec<Value> {
    let out = Command::new(tool("python"))
        .args([
            "-c",
            "import json, sys, yaml\n\
             json.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d], sys.stdout)",
        ])
        .arg(file)
        .output()
        .expect("running python");
    assert!(
        out.status.success(),
        "PyYAML could not read {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("PyYAML's JSON")
}

fn object<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The agent container's command-line arguments.
fn agent_args(docs: &[Value]) -> Vec<String> {
    object(docs, "DaemonSet", "runner-monitor")["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .expect("the agent's args")
        .iter()
        .map(|a| a.as_str().expect("a string argument").to_owned())
        .collect()
}

/// The ConfigMap file, generated from the built-in policy.
fn policy_configmap() -> String {
    let mut text = String::from(
        "# The built-in policy (`runner-monitor policy default`, runner-monitor/src/policy/default.toml)\n\
         # for the DaemonSet's --policy. Generated: do not edit here. When the built-in policy changes,\n\
         # `RUNNER_MONITOR_BLESS=1 cargo test -p runner-monitor --test kubernetes` rewrites this file;\n\
         # the test fails until then. Your own policy goes in an overlay (a configMapGenerator with\n\
         # `behavior: replace`); the agent reads it at start and on SIGHUP.\n\
         apiVersion: v1\n\
         kind: ConfigMap\n\
         metadata:\n\
         \x20 name: runner-monitor-policy\n\
         \x20 namespace: runner-monitor\n\
         \x20 labels:\n\
         \x20   app.kubernetes.io/name: runner-monitor\n\
         data:\n\
         \x20 policy.toml: |\n",
    );
    for line in DEFAULT_POLICY.lines() {
        if !line.is_empty() {
            text.push_str("    ");
            text.push_str(line);
        }
        text.push('\n');
    }
    text
}

#[test]
fn policy_configmap_is_the_built_in_policy() {
    let path = kubernetes_dir().join("base/policy-configmap.yaml");
    let expected = policy_configmap();
    if std::env::var_os("RUNNER_MONITOR_BLESS").is_some() {
        std::fs::write(&path, &expected).expect("writing the ConfigMap");
    }
    let actual = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        actual == expected,
        "{} has drifted from the built-in policy: \
         RUNNER_MONITOR_BLESS=1 cargo test -p runner-monitor --test kubernetes rewrites it",
        path.display()
    );
    // Read back by an independent YAML reader: the block scalar holds the policy byte for byte.
    let docs = documents(&path);
    assert_eq!(
        object(&docs, "ConfigMap", "runner-monitor-policy")["data"]["policy.toml"],
        DEFAULT_POLICY
    );
}

#[test]
fn every_manifest_is_valid_against_the_kubernetes_schemas_strictly() {
    let files = manifest_files();
    assert!(
        files.len() >= 5,
        "expected the base's manifests, found {files:?}"
    );
    assert_valid(&files);
}

#[test]
fn every_kustomize_variant_renders_and_is_valid_strictly() {
    let variants = variants();
    assert!(
        variants.len() >= 3,
        "expected the base and two overlays, found {variants:?}"
    );
    let rendered: Vec<PathBuf> = variants.iter().map(|v| render(v)).collect();
    assert_valid(&rendered);
    for (variant, file) in variants.iter().zip(&rendered) {
        let docs = documents(file);
        // Every variant carries the built-in policy and the placeholder image, not the bare name
        // kustomize substitutes.
        assert_eq!(
            object(&docs, "ConfigMap", "runner-monitor-policy")["data"]["policy.toml"],
            DEFAULT_POLICY,
            "{}",
            variant.display()
        );
        let image = &object(&docs, "DaemonSet", "runner-monitor")["spec"]["template"]["spec"]["containers"]
            [0]["image"];
        assert!(
            image.as_str().is_some_and(|i| i.contains('/')),
            "{}: image {image} is not a registry reference",
            variant.display()
        );
    }
}

#[test]
fn overlays_select_runner_nodes_and_deliver_to_alertmanager() {
    let dir = kubernetes_dir();
    let arc = documents(&render(&dir.join("overlays/actions-runner-controller")));
    assert_eq!(
        object(&arc, "DaemonSet", "runner-monitor")["spec"]["template"]["spec"]["nodeSelector"]["runner-monitor/ci-runner"],
        "true"
    );
    let base_args = agent_args(&documents(&render(&dir.join("base"))));
    let am_args = agent_args(&documents(&render(&dir.join("overlays/alertmanager"))));
    assert_eq!(am_args[..base_args.len()], base_args[..]);
    assert!(
        am_args[base_args.len()..]
            .iter()
            .any(|a| a.starts_with("--alertmanager=http://")),
        "{am_args:?}"
    );
}

#[test]
fn a_misspelled_field_is_rejected() {
    let daemonset = kubernetes_dir().join("base/daemonset.yaml");
    let text = std::fs::read_to_string(&daemonset).expect("reading the DaemonSet");
    // Two unknown fields (what a lax validator lets through) and a wrong type.
    let mistakes = [
        ("hostPID: true", "hostPid: true", "hostPid"),
        ("readinessProbe:", "readynessProbe:", "readynessProbe"),
        (
            "mountPropagation: HostToContainer",
            "mountPropagation: 7",
            "mountPropagation",
        ),
    ];
    let mut bad = Vec::new();
    for (right, wrong, _) in mistakes {
        assert!(text.contains(right), "the DaemonSet has no {right:?}");
        let file = scratch("bad-daemonset.yaml");
        std::fs::write(&file, text.replacen(right, wrong, 1)).expect("writing the bad manifest");
        bad.push(file);
    }
    for version in KUBERNETES_VERSIONS {
        let errors = validate(&bad, version)
            .expect_err(&format!("Kubernetes {version} accepted every mistake"));
        for ((_, wrong, field), file) in mistakes.iter().zip(&bad) {
            let file = file.display().to_string();
            assert!(
                errors
                    .lines()
                    .any(|l| l.starts_with("ERROR") && l.contains(&file) && l.contains(field)),
                "Kubernetes {version} accepted {wrong:?}:\n{errors}"
            );
        }
    }
}

#[test]
fn daemonset_grants_exactly_the_capabilities_the_agent_checks_for() {
    let docs = documents(&render(&kubernetes_dir().join("base")));
    let pod = &object(&docs, "DaemonSet", "runner-monitor")["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    let agent = &pod["containers"][0];
    let security = &agent["securityContext"];
    assert_ne!(security["privileged"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    // Always-needed and optional ones; CAP_SYS_ADMIN (tracefs is mounted from the host) and
    // CAP_CHOWN (no --runner-user) are conditions this DaemonSet does not meet.
    let mut expected: Vec<String> = REQUIREMENTS
        .iter()
        .filter(|r| matches!(r.when, When::Always | When::Optional))
        .map(|r| {
            r.capability
                .to_string()
                .trim_start_matches("CAP_")
                .to_owned()
        })
        .collect();
    let mut granted: Vec<String> = security["capabilities"]["add"]
        .as_array()
        .expect("added capabilities")
        .iter()
        .map(|c| c.as_str().expect("a capability name").to_owned())
        .collect();
    expected.sort();
    granted.sort();
    assert_eq!(granted, expected);
    let args = agent_args(&docs);
    assert!(!args.iter().any(|a| a.starts_with("--runner-user")));
    let mounts: Vec<&str> = agent["volumeMounts"]
        .as_array()
        .expect("volume mounts")
        .iter()
        .map(|m| m["mountPath"].as_str().expect("a mount path"))
        .collect();
    for dir in ["/sys/kernel/tracing", "/sys/fs/bpf", "/sys/fs/cgroup"] {
        assert!(mounts.contains(&dir), "{dir} is not mounted: {mounts:?}");
    }
    // Every directory the agent is told to use is on a volume, and the endpoint's port is the
    // one the probes and the Service use.
    for flag in [
        "--policy=",
        "--state-dir=",
        "--spool-dir=",
        "--pin-dir=",
        "--control-socket=",
    ] {
        let path = args
            .iter()
            .find_map(|a| a.strip_prefix(flag))
            .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
        assert!(
            mounts.iter().any(|m| Path::new(path).starts_with(m)),
            "{flag}{path} is on no volume: {mounts:?}"
        );
    }
    assert!(args.contains(&"--listen=0.0.0.0:9477".to_owned()));
    assert_eq!(agent["ports"][0]["containerPort"], 9477);
    assert_eq!(agent["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(agent["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(
        object(&docs, "Service", "runner-monitor-metrics")["spec"]["ports"][0]["port"],
        9477
    );
}

#[test]
fn the_agent_may_only_read_pods() {
    let docs = documents(&kubernetes_dir().join("base/rbac.yaml"));
    let rules = &object(&docs, "ClusterRole", "runner-monitor")["rules"];
    assert_eq!(
        rules,
        &serde_json::json!([{
            "apiGroups": [""],
            "resources": ["pods"],
            "verbs": ["get", "list", "watch"],
        }])
    );
}
