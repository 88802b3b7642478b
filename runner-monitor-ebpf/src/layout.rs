//! Reading kernel structs at offsets of the running kernel: the offsets are globals the agent
//! writes at load from the kernel's BTF (frozen `.rodata`: `file_open.rs`, `unix_peer.rs`,
//! `task_layout.rs`), or settings (`io_uring.rs`).

use aya_ebpf::helpers::bpf_probe_read_kernel;

/// The offset (or flag) in layout global `field`.
#[inline(always)]
pub fn layout(field: &'static u32) -> u64 {
    // SAFETY: a read of a global the loader fills in; volatile so it is not constant-folded.
    u64::from(unsafe { core::ptr::read_volatile(field) })
}

/// The `T` at kernel address `at`; `None` when it cannot be read.
#[inline(always)]
pub fn read<T>(at: u64) -> Option<T> {
    // SAFETY: a checked read of kernel memory (bpf_probe_read_kernel).
    unsafe { bpf_probe_read_kernel(at as *const T).ok() }
}
