//! Builds the kernel programs (runner-monitor-ebpf) for the bpf target with aya-build, so that
//! `include_bytes_aligned!` in `sensor/mod.rs` embeds them and the agent is one binary.
//! Needs the nightly toolchain with rust-src and bpf-linker: `cargo xtask setup` installs both.

use anyhow::anyhow;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    // cargo fuzz builds with `--cfg fuzzing`: the fuzz targets exercise the parsers and never load
    // the kernel programs, so an empty object stands in for them (saves a nightly bpf build of
    // about a minute and a half in every fuzz build; `Sensor::load` would refuse the object).
    println!("cargo:rerun-if-env-changed=CARGO_CFG_FUZZING");
    if std::env::var_os("CARGO_CFG_FUZZING").is_some() {
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
