//! `test`: the unit tests, then (as root) the Debian package and the integration tests with the
//! real probes, then a subset of the sensor tests on other kernels (`kernels.rs`).

use std::process::Command;

use anyhow::bail;

use crate::{
    common::{is_root, run_cmd, say},
    guest, kernels, package,
};

pub(crate) fn test(args: &[String]) -> anyhow::Result<()> {
    say("unit tests");
    run_cmd(
        Command::new("cargo")
            .args([
                "test",
                "-p",
                "runner-monitor",
                "-p",
                "runner-monitor-common",
                "-p",
                "xtask",
            ])
            .arg("--")
            .args(args),
    )?;
    if !is_root() {
        bail!(
            "the integration tests load eBPF programs and need root: run `sudo cargo xtask test`"
        );
    }
    say("integration tests (real probes, real processes, the real agent binary)");
    run_cmd(Command::new("cargo").args(["build", "-p", "runner-monitor"]))?;
    // tests/tests/package.rs installs the Debian package of this tree.
    say("the Debian package, for tests/tests/package.rs");
    let deb = package::package()?;
    run_cmd(
        Command::new("cargo")
            .args(["test", "-p", "integration-tests", "--", "--nocapture"])
            .args(args)
            .env("RM_PACKAGE", deb),
    )?;
    if !args.is_empty() {
        say("a test filter was given: the kernel matrix's guests are left out");
        return Ok(());
    }
    // The host ran everything; the guests run a subset (each guest emulates its CPU, and CI has
    // to stay under 30 minutes): the load and attach of every probe and a core event per family.
    say("the sensor tests' CI subset on Debian's 6.1 and 6.12 kernels, in QEMU guests");
    let kernels = guest::MATRIX.map(str::to_owned);
    let subset = kernels::CI_SUBSET.map(str::to_owned);
    kernels::test(&kernels, &subset)
}
