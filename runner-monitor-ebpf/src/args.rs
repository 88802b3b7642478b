//! Fields of tracepoint records, read at named offsets.
//!
//! Every `syscalls:sys_enter_*` and `syscalls:sys_exit_*` record has the same layout (see
//! `/sys/kernel/tracing/events/syscalls/*/format`):
//!
//! ```text
//! u16 common_type; u8 common_flags; u8 common_preempt_count; i32 common_pid;  // 0..8
//! i32 __syscall_nr;                                                          // 8
//! sys_enter_*: unsigned long args[6];                                        // 16, 24, .. 56
//! sys_exit_*:  long ret;                                                     // 16
//! ```
//!
//! The other tracepoints name their fields' offsets beside their programs.

use aya_ebpf::{EbpfContext as _, programs::TracePointContext};

/// Offset of `args[0]` in a `sys_enter_*` record; each argument is one 8-byte slot.
const SYSCALL_ARGS: usize = 16;
/// Offset of `ret` in a `sys_exit_*` record.
const SYSCALL_RET: usize = 16;

/// The field of type `T` at `offset` of the tracepoint record; `T::default()` if the read fails.
#[inline(always)]
pub fn field<T: Default>(ctx: &TracePointContext, offset: usize) -> T {
    // SAFETY: a checked kernel read (`bpf_probe_read_kernel`) of the record at a fixed offset.
    unsafe { ctx.read_at::<T>(offset).unwrap_or_default() }
}

/// Argument `index` (0-based, as in the syscall's prototype, below 6) of a `sys_enter_*` record,
/// read as a `T` of at most 8 bytes: `i64` for a signed integer (fds, pids), `u64` for a pointer
/// or flags.
#[inline(always)]
pub fn syscall_arg<T: Default>(ctx: &TracePointContext, index: usize) -> T {
    const { assert!(core::mem::size_of::<T>() <= 8) };
    field(ctx, SYSCALL_ARGS + 8 * index)
}

/// Argument `index` (below 6) of a `sys_enter_*` record, loaded from the context itself: a
/// tracepoint program may read its record, so this costs a load where `syscall_arg` costs a
/// helper call. For probes that run on every call of a frequent syscall (`write`).
#[inline(always)]
pub fn syscall_arg_direct(ctx: &TracePointContext, index: usize) -> u64 {
    // SAFETY: a sys_enter record holds six 8-byte arguments from SYSCALL_ARGS; the load is at a
    // constant offset of the context, which the verifier checks against the record.
    unsafe {
        core::ptr::read_volatile(
            (ctx.as_ptr() as *const u8).add(SYSCALL_ARGS + 8 * index) as *const u64
        )
    }
}

/// The result of the syscall, from a `sys_exit_*` record: a value, or a negative errno.
#[inline(always)]
pub fn syscall_ret(ctx: &TracePointContext) -> i64 {
    field(ctx, SYSCALL_RET)
}

/// The result of the syscall, loaded from a `sys_exit_*` record (a load, not a helper call, as
/// `syscall_arg_direct`).
#[inline(always)]
pub fn syscall_ret_direct(ctx: &TracePointContext) -> i64 {
    // SAFETY: a sys_exit record holds the 8-byte result at SYSCALL_RET; a constant offset of the
    // context, which the verifier checks against the record.
    unsafe { core::ptr::read_volatile((ctx.as_ptr() as *const u8).add(SYSCALL_RET) as *const i64) }
}
