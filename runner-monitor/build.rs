//! Builds the kernel programs (runner-monitor-ebpf) for the bpf target with aya-build, so that
//! `include_bytes_aligned!` in `sensor/mod.rs` embeds them and the agent is one binary.
//! Needs the nightly toolchain with rust-src and bpf-linker: `cargo xtask setup` installs both.
//!
//! `RUNNER_MONITOR_SKIP_EBPF=1` embeds an empty object instead, so that clippy and the unit tests
//! run with the stable toolchain alone; such an agent refuses to load its sensors.

use anyhow::anyhow;
use aya_build::{Package, Toolchain};

/// `1` or `true`: build without the kernel programs (aya-build's own `AYA_BUILD_SKIP` leaves no
/// object at all, which `include_bytes_aligned!` cannot embed).
const SKIP_EBPF: &str = "RUNNER_MONITOR_SKIP_EBPF";

fn main() -> anyhow::Result<()> {
    // cargo fuzz builds with `--cfg fuzzing`: the fuzz targets exercise the parsers and never load
    // the kernel programs, so an empty object stands in for them (saves a nightly bpf build of
    // about a minute and a half in every fuzz build). RUNNER_MONITOR_SKIP_EBPF does the same for
    // clippy and unit tests on a machine without the nightly and bpf-linker. `Sensor::load`
    // refuses the empty object with a message saying how to build the agent properly.
    println!("cargo:rerun-if-env-changed=CARGO_CFG_FUZZING");
    println!("cargo:rerun-if-env-changed={SKIP_EBPF}");
    let skip =
        std::env::var_os(SKIP_EBPF).is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        println!("cargo:warning={SKIP_EBPF} is set: the agent is built without kernel programs");
    }
    if skip || std::env::var_os("CARGO_CFG_FUZZING").is_some() {
        let out_dir = std::env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?;
        std::fs::write(std::path::Path::new(&out_dir).join("runner-monitor"), [])?;
        return Ok(());
    }
    let ebpf_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("no workspace directory"))?
        .join("runner-monitor-ebpf");
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [Package {
            name: "runner-monitor-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
