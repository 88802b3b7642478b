//! `test`: the unit tests, then (as root) the Debian package and the integration tests with the
//! real probes.

use std::process::Command;

use anyhow::bail;

use crate::{
    common::{is_root, run_cmd, say},
    package,
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
    )
}
