//! `floor-egress`: programs that do nothing, on the hooks a job's connect and its packets meet in
//! the agent, attached as the agent attaches its own (tracepoints through perf events, cgroup
//! programs through links on the cgroup v2 root). What a connect costs with them is what the
//! kernel charges for running any program there: the part of the agent's cost no change to its
//! programs can remove.
//!
//! Loaded with the `bpf(2)` syscall directly: two instructions (`r0 = verdict; exit`) need no
//! object file, and nothing here is the agent's.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;

const PROG_TYPE_TRACEPOINT: u32 = 5;
const PROG_TYPE_CGROUP_SKB: u32 = 8;
const PROG_TYPE_CGROUP_SOCK: u32 = 9;
const PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;

const CGROUP_INET_INGRESS: u32 = 0;
const CGROUP_INET_EGRESS: u32 = 1;
const CGROUP_INET_SOCK_CREATE: u32 = 2;
const CGROUP_INET4_CONNECT: u32 = 10;
const CGROUP_INET6_CONNECT: u32 = 11;
const CGROUP_UDP4_SENDMSG: u32 = 14;
const CGROUP_UDP6_SENDMSG: u32 = 15;
const CGROUP_UDP4_RECVMSG: u32 = 19;
const CGROUP_UDP6_RECVMSG: u32 = 20;

/// The syscall tracepoints of the agent's that a connect, an HTTP request on it and its close
/// meet (`runner-monitor/src/sensor/probes.rs`).
const TRACEPOINTS: &[&str] = &[
    "sys_enter_socket",
    "sys_enter_connect",
    "sys_exit_connect",
    "sys_enter_write",
    "sys_enter_writev",
    "sys_enter_sendto",
    "sys_enter_sendmsg",
];

/// The agent's cgroup hooks, one program each as the agent has, with the verdict that lets
/// everything through.
const CGROUP_HOOKS: &[(u32, u32)] = &[
    (PROG_TYPE_CGROUP_SOCK_ADDR, CGROUP_INET4_CONNECT),
    (PROG_TYPE_CGROUP_SOCK_ADDR, CGROUP_INET6_CONNECT),
    (PROG_TYPE_CGROUP_SOCK_ADDR, CGROUP_UDP4_SENDMSG),
    (PROG_TYPE_CGROUP_SOCK_ADDR, CGROUP_UDP6_SENDMSG),
    (PROG_TYPE_CGROUP_SOCK_ADDR, CGROUP_UDP4_RECVMSG),
    (PROG_TYPE_CGROUP_SOCK_ADDR, CGROUP_UDP6_RECVMSG),
    (PROG_TYPE_CGROUP_SOCK, CGROUP_INET_SOCK_CREATE),
    (PROG_TYPE_CGROUP_SKB, CGROUP_INET_EGRESS),
    (PROG_TYPE_CGROUP_SKB, CGROUP_INET_INGRESS),
];

/// `union bpf_attr` for `BPF_PROG_LOAD`, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` for `BPF_LINK_CREATE`, without the per-type part.
#[repr(C)]
struct LinkCreate {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// `struct perf_event_attr` as of its first version (`PERF_ATTR_SIZE_VER0`, 64 bytes).
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    type_: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

const PERF_TYPE_TRACEPOINT: u32 = 2;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;

fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a `union bpf_attr` prefix the kernel reads `size_of::<T>()` bytes of; the
    // returned descriptor is new and ours.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A program of `prog_type` that returns `verdict` at once.
fn load(prog_type: u32, attach_type: u32, verdict: i32) -> io::Result<OwnedFd> {
    // BPF_MOV64_IMM(R0, verdict); BPF_EXIT_INSN()
    let insns: [u64; 2] = [0xb7 | (u64::from(verdict as u32) << 32), 0x95];
    let mut name = [0u8; 16];
    name[..5].copy_from_slice(b"floor");
    let attr = ProgLoad {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: c"GPL".as_ptr() as u64,
        prog_name: name,
        expected_attach_type: attach_type,
        ..Default::default()
    };
    bpf(BPF_PROG_LOAD, &attr)
}

fn tracepoint(tracefs: &std::path::Path, name: &str) -> io::Result<OwnedFd> {
    let id_path = tracefs.join(format!("events/syscalls/{name}/id"));
    let id: u64 = std::fs::read_to_string(&id_path)?
        .trim()
        .parse()
        .map_err(|e| io::Error::other(format!("{}: {e}", id_path.display())))?;
    let attr = PerfEventAttr {
        type_: PERF_TYPE_TRACEPOINT,
        size: std::mem::size_of::<PerfEventAttr>() as u32,
        config: id,
        sample_period: 1,
        wakeup_events: 1,
        ..Default::default()
    };
    // SAFETY: a perf_event_attr of the size it says; the descriptor returned is ours.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &attr as *const PerfEventAttr,
            -1,
            0,
            -1,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as in `bpf`.
    let event = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let prog = load(PROG_TYPE_TRACEPOINT, 0, 0)?;
    for (request, arg) in [
        (PERF_EVENT_IOC_SET_BPF, prog.as_raw_fd()),
        (PERF_EVENT_IOC_ENABLE, 0),
    ] {
        // SAFETY: ioctls on the perf event we own, with an int argument.
        if unsafe { libc::ioctl(event.as_raw_fd(), request, arg) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // The event holds the program; closing the event detaches it.
    Ok(event)
}

/// Attaches the floor's programs, prints "attached", and holds them until stdin closes.
pub fn egress() {
    let tracefs = runner_monitor::sensor::attach::ensure_tracefs().expect("tracefs");
    let root = runner_monitor::cgroups::cgroup2_root().expect("a cgroup v2 hierarchy");
    let cgroup = std::fs::File::open(&root).expect("opening the cgroup v2 root");
    let mut held = Vec::new();
    for name in TRACEPOINTS {
        held.push(tracepoint(&tracefs, name).unwrap_or_else(|e| panic!("{name}: {e}")));
    }
    for &(prog_type, attach_type) in CGROUP_HOOKS {
        let prog = load(prog_type, attach_type, 1)
            .unwrap_or_else(|e| panic!("loading for attach type {attach_type}: {e}"));
        let link = LinkCreate {
            prog_fd: prog.as_raw_fd() as u32,
            target_fd: cgroup.as_raw_fd() as u32,
            attach_type,
            flags: 0,
        };
        let link = bpf(BPF_LINK_CREATE, &link)
            .unwrap_or_else(|e| panic!("attaching to attach type {attach_type}: {e}"));
        held.push(link);
    }
    println!("attached");
    let _ = io::Read::read_to_end(&mut io::stdin(), &mut Vec::new());
    drop(held);
}
