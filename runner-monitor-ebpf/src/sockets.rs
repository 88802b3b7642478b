//! Sockets the address hooks cannot judge: raw IP sockets, packet sockets and ICMP ("ping")
//! sockets send without `connect`/`sendmsg` passing the cgroup `sock_addr` programs of
//! `egress.rs`, so a job process could reach any host through them. A job process creating one
//! is reported; in block mode the IP ones are refused (`EPERM`) by `cgroup/sock_create`, which
//! the kernel runs for `AF_INET`/`AF_INET6` sockets only. Packet sockets are seen by the BPF LSM
//! hook `socket_create` where the kernel allows it, which refuses them in block mode too; else by
//! fentry on `security_socket_create` or the `socket()` syscall's tracepoint, which report but
//! cannot refuse (`sensor/hook_sets.rs` picks one).

use aya_ebpf::{
    macros::{cgroup_sock, fentry, lsm, tracepoint},
    programs::{FEntryContext, LsmContext, SockContext, TracePointContext},
};
use runner_monitor_common::{
    AF_INET, AF_INET6, AF_PACKET, CONNECT_BLOCKED, CONNECT_RAW_SOCKET, ConnectEvent, EventKind,
    IPPROTO_ICMP, IPPROTO_ICMPV6, SOCK_DGRAM, SOCK_RAW, UNIX_PATH_LEN, counter,
};

use crate::{
    args::syscall_arg_direct,
    budget::within_budget,
    emit::send,
    maps::{count, current_process},
};

/// Runs in the task calling `socket()`: 1 lets the socket be created, 0 refuses it (EPERM).
#[cgroup_sock(sock_create)]
pub fn raw_socket_create(ctx: SockContext) -> i32 {
    // Every inet socket of the host comes here: its kind is checked from the context first, and
    // only a raw or ping socket pays the process look-up.
    // SAFETY: context field reads.
    let (family, kind, protocol) = unsafe {
        let sk = ctx.sock;
        (
            (*sk).family as u16,
            (*sk).type_ as u16,
            (*sk).protocol as u16,
        )
    };
    let inet = family == AF_INET || family == AF_INET6;
    let ping = kind == SOCK_DGRAM && (protocol == IPPROTO_ICMP || protocol == IPPROTO_ICMPV6);
    if !(inet && (kind == SOCK_RAW || ping)) {
        return 1;
    }
    let Some(process) = current_process() else {
        return 1;
    };
    let refuse = crate::egress::blocks(&process);
    if refuse {
        count(counter::EGRESS_BLOCKED);
    }
    report(&process, family, kind, protocol, refuse);
    if refuse { 0 } else { 1 }
}

/// A packet socket being created (`kern`: by the kernel itself, not a process's `socket()`):
/// reported for a job process. True when it is refused: in block mode when `can_refuse` (the LSM
/// hook).
#[inline(always)]
fn packet_socket(family: i32, kind: i32, protocol: i32, kern: i32, can_refuse: bool) -> bool {
    if kern != 0 || family as u16 != AF_PACKET {
        return false;
    }
    let Some(process) = current_process() else {
        return false;
    };
    let refuse = can_refuse && crate::egress::blocks(&process);
    if refuse {
        count(counter::EGRESS_BLOCKED);
    }
    report(
        &process,
        AF_PACKET,
        (kind & 0xf) as u16,
        protocol as u16,
        refuse,
    );
    refuse
}

/// `-EPERM`.
const REFUSED: i32 = -1;

// int security_socket_create(int family, int type, int protocol, int kern), as the LSM hook
// `socket_create`; its last argument is the verdict of the LSM programs before it, kept.
// VERIFIER: an LSM program must return a constant the kernel can bound to [-4095, 0], so the
// earlier verdict is clamped and the refusal is a literal, not a negated flag.
#[lsm(hook = "socket_create")]
pub fn lsm_socket_create(ctx: LsmContext) -> i32 {
    let earlier: i32 = ctx.arg(4);
    if earlier != 0 {
        return if (-4095..0).contains(&earlier) {
            earlier
        } else {
            REFUSED
        };
    }
    if packet_socket(ctx.arg(0), ctx.arg(1), ctx.arg(2), ctx.arg(3), true) {
        return REFUSED;
    }
    0
}

// int security_socket_create(...): for kernels with fentry but no BPF LSM. Reports only.
#[fentry(function = "security_socket_create")]
pub fn fentry_socket_create(ctx: FEntryContext) -> i32 {
    packet_socket(ctx.arg(0), ctx.arg(1), ctx.arg(2), ctx.arg(3), false);
    0
}

// long sys_socket(int family, int type, int protocol): where neither hook loads. Reports only.
// SOCK_NONBLOCK and SOCK_CLOEXEC share the type argument (`packet_socket` masks them off).
#[tracepoint]
pub fn sys_enter_socket(ctx: TracePointContext) -> u32 {
    // Every socket() of the host: loads from the record, the family first.
    let arg = |n| syscall_arg_direct(&ctx, n) as i32;
    let family = arg(0);
    if family as u16 == AF_PACKET {
        packet_socket(family, arg(1), arg(2), 0, false);
    }
    0
}

#[inline(always)]
fn report(
    process: &runner_monitor_common::ProcessJob,
    family: u16,
    kind: u16,
    protocol: u16,
    refuse: bool,
) {
    if within_budget(process.job, EventKind::Connect as u32) {
        send::<ConnectEvent>(EventKind::Connect, Some(process), |e| {
            e.result = if refuse { -1 } else { 0 };
            e.fd = -1;
            e.family = family;
            e.port = protocol;
            e.addr = [0; 16];
            e.addr[0] = kind as u8;
            e.unix_path_len = 0;
            e.unix_path = [0; UNIX_PATH_LEN];
            e.flags = CONNECT_RAW_SOCKET | if refuse { CONNECT_BLOCKED } else { 0 };
            e._pad2 = [0; 4];
        });
    }
}
