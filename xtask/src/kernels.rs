//! `test --kernel NAME|PATH` and `test --kernels`: the sensor integration tests on other kernels,
//! each in a fresh QEMU guest (`guest.rs`), with `runner-monitor check`'s report of what attached.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    common::{run_cmd, say, workspace_root},
    guest::{self, Kernel},
};

/// The test binaries the guests run. Built in release: under emulation a debug build's BTF
/// parsing makes every program load take seconds.
const BINARIES: [&str; 6] = [
    "sensors",
    "io_uring",
    "handover",
    "kernel_opens",
    "process_access",
    "egress_kernel",
];

/// What `cargo xtask test` runs in each guest after the host suite: the sensor tests that prove
/// the programs load and attach (the shared harness asserts every probe attached) and a core
/// event of each family (credential open and the kernel's name matching, exec and exit, a
/// daemonised survivor's read after its job's root exited, connect, DNS through the cgroup
/// programs, tamper, process memory by each hook set's way). The io_uring tests are left out: ~100 s each in a guest
/// (uring-cat is compiled there); `--kernels` runs them.
pub(crate) const CI_SUBSET: [&str; 17] = [
    "job_process_reading_credential_by_absolute_path_gives_one_event",
    "kernel_matches_basename_dirname_and_prefix_and_ignores_other_files",
    "exec_and_exit_carry_arguments_and_status",
    "daemonised_grandchild_stays_in_the_job_and_its_late_read_says_the_job_ended",
    "connect_to_loopback_tcp_listener_is_decoded",
    "glibc_lookup_gives_the_query_name_and_the_answer_addresses",
    "a_signal_to_the_agent_is_reported_as_tamper",
    "reading_another_process_environment_is_reported_with_its_pid",
    "probes_outlive_a_crashed_agent_and_the_next_reads_what_they_recorded",
    // The file-open hooks the guests' kernels allow (LSM): what the tracepoints cannot see.
    "a_credential_read_through_a_symlink_made_before_the_job_is_reported_as_itself",
    "a_credential_read_through_proc_pid_root_is_reported_under_its_own_path",
    // Process memory and signals: each set's events, and what only the LSM set sees.
    "ptrace_seize_of_another_process_is_reported_with_its_pid",
    "process_vm_readv_of_another_process_is_reported_with_its_pid",
    "process_vm_writev_is_reported_where_the_access_check_is_hooked",
    "pidfd_send_signal_to_the_agent_is_reported_where_task_kill_is_hooked",
    // Block mode's packet sockets: refused where LSM `socket_create` is hooked.
    "a_packet_socket_is_refused_in_block_mode_where_socket_create_is_hooked",
    // io_uring's registered-file table, whose shape these kernels have (before 6.13) and the
    // host has not (no uring-cat: job-step sends).
    "a_start_request_on_a_registered_file_marks_the_container_for_the_job",
];

/// One test binary's result on one kernel.
struct BinaryResult {
    name: String,
    /// libtest's "test result: ..." line, or why there is none.
    summary: String,
    ok: bool,
}

struct KernelResult {
    name: String,
    release: String,
    elapsed: Duration,
    binaries: Vec<BinaryResult>,
    /// The guest died or hung: no exit status.
    crashed: bool,
}

/// Builds the agent and the test binaries (release), then runs `filters` of them on each of
/// `kernels` (`host` runs natively), prints each kernel's `check` report and test output, and a
/// table at the end. Fails if any kernel failed.
pub(crate) fn test(kernels: &[String], filters: &[String]) -> anyhow::Result<()> {
    let resolved: Vec<Option<Kernel>> = kernels
        .iter()
        .map(|k| (k != "host").then(|| guest::resolve(k)).transpose())
        .collect::<anyhow::Result<_>>()?;
    say("building the agent and the sensor tests (release) for the kernel matrix");
    // One selection for both builds: the agent alone unifies its dependencies' features
    // differently, and the next build of the tests would rebuild it (and the agent after them).
    run_cmd(Command::new("cargo").args([
        "build",
        "--release",
        "-p",
        "runner-monitor",
        "-p",
        "integration-tests",
    ]))?;
    let binaries = build_tests()?;
    let root = workspace_root();
    let script = script(&root, &binaries, filters);
    // The host runs first, alone (its tests time things). Then the guests side by side: each is
    // one single-threaded TCG process, so two take two host cores and the matrix takes as long
    // as its slowest kernel. Reports print in the matrix's order.
    let mut results = Vec::new();
    let pairs: Vec<(&String, &Option<Kernel>)> = kernels.iter().zip(&resolved).collect();
    let (host, guests): (Vec<_>, Vec<_>) = pairs.into_iter().partition(|(_, k)| k.is_none());
    for (name, _) in host {
        let (result, report) = run_one(name, None, &root, &script, &binaries)?;
        print!("{report}");
        results.push(result);
    }
    let runs: Vec<anyhow::Result<(KernelResult, String)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = guests
            .iter()
            .map(|(name, kernel)| {
                let (root, script, binaries) = (&root, &script, &binaries);
                scope.spawn(move || run_one(name, kernel.as_ref(), root, script, binaries))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a guest's runner panicked")))
            })
            .collect()
    });
    for run in runs {
        let (result, report) = run?;
        print!("{report}");
        results.push(result);
    }
    let table = table(&results);
    print!("{table}");
    std::fs::write(root.join("target/guest/matrix.txt"), &table)?;
    let failed: Vec<&str> = results
        .iter()
        .filter(|r| r.crashed || r.binaries.iter().any(|b| !b.ok))
        .map(|r| r.name.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("kernel matrix: failed on {}", failed.join(", "));
    }
    Ok(())
}

/// Runs the script on one kernel (`None`: natively on the host) and returns its result and the
/// report to print: its `check`, the console tail if the guest died, each binary's output.
fn run_one(
    name: &str,
    kernel: Option<&Kernel>,
    root: &Path,
    script: &str,
    binaries: &[(String, PathBuf)],
) -> anyhow::Result<(KernelResult, String)> {
    let dir = root.join("target/guest").join(name.replace('/', "_"));
    let mut report = String::new();
    let start = Instant::now();
    let (status, console) = match kernel {
        None => {
            say("kernel host: running natively");
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("run.sh"), script)?;
            let status = Command::new("bash")
                .arg(dir.join("run.sh"))
                .env("RESULTS", &dir)
                .current_dir("/")
                .status()?;
            (status.code(), String::new())
        }
        Some(kernel) => {
            say(&format!(
                "kernel {} ({}): booting a guest",
                kernel.name, kernel.release
            ));
            let run = guest::run(kernel, &dir, script, Duration::from_secs(900))?;
            say(&format!(
                "kernel {}: guest done in {:.0} s",
                kernel.name,
                start.elapsed().as_secs_f64()
            ));
            report.push_str(&run.output);
            (run.status, run.console)
        }
    };
    let elapsed = start.elapsed();
    let check = std::fs::read_to_string(dir.join("check.txt")).unwrap_or_default();
    let _ = writeln!(report, "---- runner-monitor check on {name}\n{check}");
    let mut result = KernelResult {
        name: name.to_owned(),
        release: kernel.map_or_else(host_release, |k| k.release.clone()),
        elapsed,
        binaries: Vec::new(),
        crashed: status.is_none(),
    };
    // Every probe `check` lists must load and attach on every kernel of the matrix: a program
    // the verifier of one kernel refuses is a probe missing there, which no test binary may
    // notice (the container probes run in no guest test).
    let refused: Vec<&str> = check
        .lines()
        .filter(|l| l.contains(" FAILED ("))
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    result.binaries.push(BinaryResult {
        name: "check".into(),
        summary: if refused.is_empty() {
            "every probe attached".into()
        } else {
            format!("refused: {}", refused.join(", "))
        },
        ok: !check.is_empty() && refused.is_empty(),
    });
    if result.crashed {
        let tail: Vec<&str> = console.lines().rev().take(40).collect();
        let _ = writeln!(
            report,
            "---- the {name} guest died before its script ended; console (last 40 lines):"
        );
        for line in tail.iter().rev() {
            let _ = writeln!(report, "{line}");
        }
    }
    for (binary, _) in binaries {
        let out = std::fs::read_to_string(dir.join(format!("{binary}.out"))).unwrap_or_default();
        let rc = std::fs::read_to_string(dir.join(format!("{binary}.rc")))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        let _ = writeln!(report, "---- {binary} on {name}\n{out}");
        let summary = out
            .lines()
            .rfind(|l| l.starts_with("test result:"))
            .map_or_else(|| format!("no result (exit {rc:?})"), str::to_owned);
        result.binaries.push(BinaryResult {
            name: binary.clone(),
            summary,
            ok: rc == Some(0),
        });
    }
    Ok((result, report))
}

fn host_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn table(results: &[KernelResult]) -> String {
    let mut out = String::from("kernel matrix\n");
    for r in results {
        let _ = writeln!(
            out,
            "  {:<6} {:<24} {:>6.1} s{}",
            r.name,
            r.release,
            r.elapsed.as_secs_f64(),
            if r.crashed { "  GUEST DIED" } else { "" }
        );
        for b in &r.binaries {
            let _ = writeln!(
                out,
                "         {:<10} {} {}",
                b.name,
                if b.ok { "pass" } else { "FAIL" },
                b.summary
            );
        }
    }
    out
}

/// Builds the test binaries and returns (name, executable) of each of `BINARIES`.
fn build_tests() -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut cmd = Command::new("cargo");
    cmd.args(["test", "--release", "-p", "integration-tests", "--no-run"])
        .args(["--message-format", "json-render-diagnostics"]);
    for b in BINARIES {
        cmd.args(["--test", b]);
    }
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the sensor tests failed");
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(exe)) = (msg["target"]["name"].as_str(), msg["executable"].as_str())
        else {
            continue;
        };
        if msg["profile"]["test"].as_bool() == Some(true) && BINARIES.contains(&name) {
            found.push((name.to_owned(), PathBuf::from(exe)));
        }
    }
    if found.len() != BINARIES.len() {
        bail!("cargo built {found:?}, expected the test binaries {BINARIES:?}");
    }
    Ok(found)
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The script a guest (or the host) runs: `check`, then each test binary from the tests crate's
/// directory as cargo would, its output and exit status into `$RESULTS`.
fn script(root: &Path, binaries: &[(String, PathBuf)], filters: &[String]) -> String {
    let agent = root.join("target/release/runner-monitor");
    let mut s = String::from("uname -r > \"$RESULTS/uname\"\n");
    let _ = writeln!(
        s,
        "{} check > \"$RESULTS/check.txt\" 2>&1; echo \"check exited $?\"",
        quote(&agent.display().to_string())
    );
    // Which file-open hooks the tests' sensor uses (tests/src/lib.rs), passed on to the guest.
    if let Ok(hooks) = std::env::var("RUNNER_MONITOR_TEST_HOOKS") {
        let _ = writeln!(s, "export RUNNER_MONITOR_TEST_HOOKS={}", quote(&hooks));
    }
    let args: Vec<String> = filters.iter().map(|f| quote(f)).collect();
    for (name, exe) in binaries {
        let _ = writeln!(
            s,
            "cd {} && {} {} > \"$RESULTS/{name}.out\" 2>&1; echo $? > \"$RESULTS/{name}.rc\"",
            quote(&root.join("tests").display().to_string()),
            quote(&exe.display().to_string()),
            args.join(" ")
        );
    }
    s
}
