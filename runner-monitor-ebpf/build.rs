use which::which;

/// Rebuild the kernel programs when bpf-linker changes: a new linker can produce a different
/// object even when no source changed.
fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
