//! runner-monitor's kernel programs.
//!
//! Every program first asks the process map whether the current process belongs to a CI job and
//! returns at once when it does not: processes outside jobs produce no events, except signals and
//! memory access aimed at the agent itself (tamper).
#![no_std]
#![no_main]

mod args;
mod budget;
mod builds;
mod chdir;
mod container_refs;
mod containers;
mod egress;
mod emit;
mod env;
mod file_open;
mod files;
mod io_uring;
mod layout;
mod maps;
mod memory;
mod names;
mod net;
mod owner;
mod packet;
mod process;
mod redirect;
mod runtime_requests;
mod runtime_sent;
mod sockets;
mod tamper;
mod task_layout;
mod tls;
mod unix_peer;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // VERIFIER: a BPF program cannot panic; the loop makes the verifier reject any path that
    // could reach here, so a panic is a load error, never a runtime one.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
