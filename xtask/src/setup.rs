//! `setup`: make the machine ready to build and test, idempotently, saying what it installs:
//! nightly rust-src, bpf-linker, cargo-fuzz, cargo-deb, the Debian packages the tests use, and
//! the Kubernetes manifests' validator, in-toto and the OCSF findings' validator.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::common::{is_root, output, run_cmd, say};

/// bpf-linker version the build is known to work with.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// cargo-fuzz version `cargo xtask fuzz` is known to work with.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// cargo-deb version `cargo xtask package` is known to work with.
const CARGO_DEB_VERSION: &str = "3.8.0";
/// kubernetes-validate (PyPI) checks the Kubernetes manifests against the API's own schemas, strict
/// (unknown fields fail), for every Kubernetes version it ships schemas for, offline: the schema
/// sets are inside the package. `runner-monitor/tests/kubernetes.rs` runs it. This version ships
/// 1.25 to 1.37.
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
/// in-toto (PyPI, with its securesystemslib) verifies the agent's signed job attestations
/// independently of our own `attest verify`: `tests/tests/attestation.rs` runs
/// `tests/python/verify_attestation.py` with it.
const IN_TOTO_VERSION: &str = "3.1.0";
/// ocsf-json-schema (PyPI) generates JSON Schemas (draft 2020-12, unknown fields refused) for OCSF
/// classes from the OCSF schema exports it ships (1.0.0 to 1.8.0), offline; `jsonschema` (PyPI)
/// validates the agent's OCSF findings against them (`runner-monitor/tests/ocsf.rs`).
const OCSF_JSON_SCHEMA_VERSION: &str = "1.2.0";
const JSONSCHEMA_VERSION: &str = "4.26.0";
/// Debian packages the tests use: `ip` for network namespaces, `unshare`/`mount` for a private
/// resolv.conf, `getent` for glibc lookups, bpftool to inspect what is loaded, a real Prometheus
/// (and promtool) to scrape the agent and check the rules, a real Alertmanager to receive its
/// alerts, curl to query them, systemd for `systemd-analyze` and to boot a systemd that runs
/// the hardened unit (`unshare`/`nsenter` from util-linux), lintian to check the Debian package,
/// and a headless Chromium to render the agent's `/jobs` pages (`tests/tests/job_report.rs`).
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "util-linux",
    "systemd",
    "mount",
    "libc-bin",
    "bpftool",
    "prometheus",
    "prometheus-alertmanager",
    "curl",
    "lintian",
    "chromium",
    // tests/tests/steps_ends.rs runs a JavaScript action with `node`, as the runner does.
    "nodejs",
    // The fleet stream's broker (JetStream), for tests/tests/fleet.rs and the NATS benchmark.
    "nats-server",
    // gitlab-ci-local (tests/tests/gitlab_ci_local.rs) copies the project with rsync. It runs
    // on the host's Node (20 or later, with its npm; Debian's npm conflicts with NodeSource's).
    "rsync",
    // tests/tests/io_uring.rs builds tests/c/uring-cat.c against liburing: opens and reads
    // through io_uring only, which syscall tracepoints do not see.
    "liburing-dev",
    // tests/tests/containers.rs starts its own Docker engine (dockerd, containerd, runc) and
    // builds its image from Debian's static busybox (`docker import`: nothing is pulled).
    // tests/tests/pods.rs starts the same containerd (a dependency of docker.io) with its CRI
    // plugin, as the kubelet's runtime, and imports its image with containerd's `ctr`.
    "docker.io",
    "busybox-static",
    // tests/tests/containers_podman.rs runs podman (daemonless: conmon and runc descend from the
    // job) with its own roots, and imports the same busybox image.
    "podman",
    // tests/tests/containers_start.rs runs `docker-compose` (Compose v1, Python, Debian's; the
    // v2 plugin is not packaged in Debian 12) from a job.
    "docker-compose",
    // The kernel matrix (`cargo xtask test --kernels`, xtask/src/guest.rs): QEMU, busybox as the
    // guest's init, and Debian's 6.1 and 6.12 kernels with their modules.
    "qemu-system-x86",
    "linux-image-amd64",
    "linux-image-6.12-amd64",
];

/// gitlab-ci-local, a real GitLab CI runner for workstations, for the job-discovery tests.
const GITLAB_CI_LOCAL_VERSION: &str = "4.70.0";

pub(crate) fn setup() -> anyhow::Result<()> {
    // 1. The nightly toolchain builds the kernel programs (-Z build-std needs rust-src).
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .map(|s| PathBuf::from(s.trim()))
        .context(
            "no nightly Rust toolchain: install it with `rustup toolchain install nightly` \
             (the kernel programs need it)",
        )?;
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        say("adding rust-src to the nightly toolchain");
        run_cmd(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    // 2. bpf-linker, built against the nightly's own LLVM (no LLVM download needed).
    // Under `rustup run nightly`, as aya-build runs it: that puts the nightly's libLLVM on the
    // library path.
    let linker_ok =
        output(Command::new("rustup").args(["run", "nightly", "bpf-linker", "--version"]))
            .is_some_and(|v| v.contains(BPF_LINKER_VERSION));
    if !linker_ok {
        install_bpf_linker(&sysroot)?;
    }

    // 3. cargo-fuzz, for `cargo xtask fuzz`, built from crates.io like bpf-linker.
    let fuzz_ok = output(Command::new("cargo").args(["fuzz", "--version"]))
        .is_some_and(|v| v.contains(CARGO_FUZZ_VERSION));
    if !fuzz_ok {
        say(&format!(
            "installing cargo-fuzz {CARGO_FUZZ_VERSION} (about two minutes, once)"
        ));
        run_cmd(Command::new("cargo").args([
            "install",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
            "--locked",
        ]))?;
    }

    // 4. cargo-deb, for `cargo xtask package`, from crates.io the same way.
    let deb_ok = output(Command::new("cargo").args(["deb", "--version"]))
        .is_some_and(|v| v.contains(CARGO_DEB_VERSION));
    if !deb_ok {
        say(&format!(
            "installing cargo-deb {CARGO_DEB_VERSION} (about two minutes, once)"
        ));
        run_cmd(Command::new("cargo").args([
            "install",
            "cargo-deb",
            "--version",
            CARGO_DEB_VERSION,
            "--locked",
        ]))?;
    }

    // 5. Debian packages the tests use.
    if is_root() && Path::new("/usr/bin/apt-get").exists() {
        let missing: Vec<&str> = DEBIAN_PACKAGES
            .iter()
            .copied()
            .filter(|p| {
                !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                    .is_some_and(|s| s.contains("install ok installed"))
            })
            .collect();
        if !missing.is_empty() {
            say(&format!(
                "installing Debian packages: {}",
                missing.join(" ")
            ));
            run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
            run_cmd(
                Command::new("apt-get")
                    .args(["install", "-y", "-qq", "--no-install-recommends"])
                    .args(&missing)
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )?;
        }
    }

    // 6. The kernel matrix's guests: each kernel of it must be there (a missing one is an
    // error, not a skipped kernel), its vmlinux extracted and its initramfs made, once.
    if is_root() {
        for name in crate::guest::MATRIX {
            let kernel = crate::guest::resolve(name)
                .with_context(|| format!("the kernel matrix needs Debian's kernel {name}"))?;
            crate::guest::prepare(&kernel)?;
        }
    }

    // 7. The Kubernetes manifests' validator and renderer.
    install_kubernetes_validate()?;
    install_in_toto()?;
    install_ocsf_validator()?;
    install_gitlab_ci_local()?;
    let kustomize = output(Command::new("kubectl").args(["version", "--client"]))
        .is_some_and(|v| v.contains("Kustomize Version: v5"));
    if !kustomize {
        // kubectl comes with this project's machine image; Debian's own kubectl (1.20) has a
        // kustomize too old for the overlays, and there is no other packaged kustomize to take.
        say(
            "kubectl with kustomize v5 is not on PATH: the Kubernetes manifest tests will fail \
             (install kubectl 1.27 or newer)",
        );
    }
    Ok(())
}

/// Where the validator's virtualenv lives; `runner-monitor/tests/kubernetes.rs` looks there too.
fn kubernetes_validate_venv() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or("/root".into());
    home.join(".cache/runner-monitor/kubernetes-validate")
}

fn install_kubernetes_validate() -> anyhow::Result<()> {
    let venv = kubernetes_validate_venv();
    let installed = output(Command::new(venv.join("bin/kubernetes-validate")).arg("--version"))
        .is_some_and(|v| v.trim() == KUBERNETES_VALIDATE_VERSION);
    if installed {
        return Ok(());
    }
    say(&format!(
        "installing kubernetes-validate {KUBERNETES_VALIDATE_VERSION} into {}",
        venv.display()
    ));
    run_cmd(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run_cmd(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"),
    ]))
}

/// Where in-toto's virtualenv lives; `tests/tests/attestation.rs` looks there too.
fn in_toto_venv() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or("/root".into());
    home.join(".cache/runner-monitor/in-toto")
}

fn install_in_toto() -> anyhow::Result<()> {
    let venv = in_toto_venv();
    let installed = output(Command::new(venv.join("bin/python")).args([
        "-c",
        "import importlib.metadata as m; print(m.version('in-toto'))",
    ]))
    .is_some_and(|v| v.trim() == IN_TOTO_VERSION);
    if installed {
        return Ok(());
    }
    say(&format!(
        "installing in-toto {IN_TOTO_VERSION} into {}",
        venv.display()
    ));
    run_cmd(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run_cmd(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &format!("in-toto=={IN_TOTO_VERSION}"),
    ]))
}

/// Where the OCSF validator's virtualenv lives; `runner-monitor/tests/ocsf.rs` looks there too.
fn ocsf_venv() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or("/root".into());
    home.join(".cache/runner-monitor/ocsf-json-schema")
}

fn install_ocsf_validator() -> anyhow::Result<()> {
    let venv = ocsf_venv();
    let wanted = [
        format!("ocsf-json-schema=={OCSF_JSON_SCHEMA_VERSION}"),
        format!("jsonschema=={JSONSCHEMA_VERSION}"),
    ];
    let installed = output(Command::new(venv.join("bin/pip")).arg("freeze"))
        .is_some_and(|f| wanted.iter().all(|w| f.lines().any(|l| l == w)));
    if installed {
        return Ok(());
    }
    say(&format!(
        "installing ocsf-json-schema {OCSF_JSON_SCHEMA_VERSION} and jsonschema \
         {JSONSCHEMA_VERSION} into {}",
        venv.display()
    ));
    run_cmd(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run_cmd(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(&wanted),
    )
}

/// Where gitlab-ci-local is installed (npm, under node_modules/.bin); the tests look there.
fn gitlab_ci_local_dir() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or("/root".into());
    home.join(".cache/runner-monitor/gitlab-ci-local")
}

fn install_gitlab_ci_local() -> anyhow::Result<()> {
    let dir = gitlab_ci_local_dir();
    let bin = dir.join("node_modules/.bin/gitlab-ci-local");
    let installed = output(Command::new(&bin).arg("--version"))
        .is_some_and(|v| v.trim() == GITLAB_CI_LOCAL_VERSION);
    if installed {
        return Ok(());
    }
    say(&format!(
        "installing gitlab-ci-local {GITLAB_CI_LOCAL_VERSION} into {}",
        dir.display()
    ));
    std::fs::create_dir_all(&dir)?;
    run_cmd(
        Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--silent"])
            .arg(format!("gitlab-ci-local@{GITLAB_CI_LOCAL_VERSION}"))
            .current_dir(&dir),
    )
}

fn install_bpf_linker(sysroot: &Path) -> anyhow::Result<()> {
    let lib = sysroot.join("lib");
    let libllvm = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        })
        .with_context(|| format!("no libLLVM.so.*-rust-* in {}", lib.display()))?;
    // A prefix that looks like an LLVM install to llvm-sys: an empty llvm-config and the
    // nightly's libLLVM under the name it links against.
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or("/root".into());
    let prefix = home.join(".cache/runner-monitor/llvm-prefix");
    std::fs::create_dir_all(prefix.join("bin"))?;
    std::fs::create_dir_all(prefix.join("lib"))?;
    let config = prefix.join("bin/llvm-config");
    std::fs::write(&config, "#!/bin/sh\n")?;
    run_cmd(Command::new("chmod").arg("+x").arg(&config))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)?;
    say(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against {} (about a minute)",
        libllvm.display()
    ));
    run_cmd(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", &prefix),
    )
}
