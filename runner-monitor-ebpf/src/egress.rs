//! Block mode: the cgroup `sock_addr` programs of `net.rs` (connect4/6, sendmsg4/6) ask here
//! whether a job process may reach the address it gave to `connect`, `sendto` or `sendmsg` (or
//! that io_uring gave on its behalf); a refusal makes the syscall fail with EPERM before any
//! packet exists.
//!
//! The agent compiles each job's policy into the maps below: `EGRESS_JOBS` says which policy id
//! judges the job and whether it blocks; `EGRESS_ALLOW4/6` are LPM tries keyed by
//! (policy id, port or 0 for any, address); entries carry an expiry so that addresses a job
//! resolves for an allowed name can be admitted for their TTL. Processes outside jobs, loopback
//! and the unspecified address are never refused.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::map,
    maps::{HashMap, LpmTrie, lpm_trie::Key},
    programs::SockAddrContext,
};
use runner_monitor_common::{
    AF_INET, AF_INET6, CONNECT_BLOCKED, CONNECT_QUIC, CONNECT_UDP_SEND, ConnectEvent, DNS_PORT,
    EGRESS_BLOCK, EGRESS_GLOBAL_POLICY, EGRESS_KEY_FIXED_BITS, EGRESS_METADATA_ENTITLED,
    EGRESS_NO_POLICY, EGRESS_SNI, EgressAllow, EgressJob, EgressKey4, EgressKey6, EventKind,
    MAX_EGRESS_ENTRIES, MAX_JOBS, MAX_METADATA_ENDPOINTS, ProcessJob, QUIC_PORT, UNIX_PATH_LEN,
    counter, egress_key, setting,
};

use crate::{
    budget::within_budget,
    emit::send,
    maps::{count, current_process, now_ns},
    names,
};

/// job key -> its policy id and mode. A job without an entry is judged by the global policy
/// when `setting::EGRESS_MODE` says block.
#[map]
static EGRESS_JOBS: HashMap<u64, EgressJob> = HashMap::with_max_entries(MAX_JOBS, 0);

#[map]
static EGRESS_ALLOW4: LpmTrie<EgressKey4, EgressAllow> =
    LpmTrie::with_max_entries(MAX_EGRESS_ENTRIES, 0);

#[map]
static EGRESS_ALLOW6: LpmTrie<EgressKey6, EgressAllow> =
    LpmTrie::with_max_entries(MAX_EGRESS_ENTRIES, 0);

/// Cloud metadata endpoints, IPv4 ones in their mapped form (`::ffff:a.b.c.d`).
#[map]
static EGRESS_METADATA: HashMap<[u8; 16], u32> =
    HashMap::with_max_entries(MAX_METADATA_ENDPOINTS, 0);

/// A destination, IPv4-mapped and NAT64 addresses already turned into their IPv4 address.
struct Destination {
    v4: bool,
    /// Written as a NAT64 address: it goes to the translator, so an IPv4 loopback or
    /// unspecified address inside it is not this host.
    nat64: bool,
    /// IPv4 in the last 4 bytes (mapped form), or IPv6.
    addr: [u8; 16],
}

/// The sock_addr program's verdict: 1 lets the connection or send through, 0 refuses it (EPERM).
#[inline(always)]
pub fn verdict(ctx: &SockAddrContext, v6: bool, udp_send: bool) -> i32 {
    let Some(process) = current_process() else {
        return 1;
    };
    verdict_of(ctx, &process, blocking(&process).as_ref(), v6, udp_send)
}

/// `verdict` for job process `process`, whose block-mode plan (`blocking`) is `job`.
#[inline(always)]
pub fn verdict_of(
    ctx: &SockAddrContext,
    process: &ProcessJob,
    job: Option<&EgressJob>,
    v6: bool,
    udp_send: bool,
) -> i32 {
    let Some(job) = job else {
        return 1;
    };
    // SAFETY: context field reads.
    let port = u16::from_be(unsafe { (*ctx.sock_addr).user_port } as u16);
    let written = written_address(ctx, v6);
    let dest = normalise(&written, v6);
    if is_local(&dest) {
        return 1;
    }
    let names_checked = job.flags & EGRESS_SNI != 0 && is_udp(ctx, udp_send);
    let admitted = admission(job, &dest, port, names_checked);
    let reason = if admitted == Admitted::No {
        0
    } else if names_checked
        && (port == QUIC_PORT || (admitted == Admitted::ByName && port != DNS_PORT))
    {
        // QUIC: its ClientHello is encrypted, so `sni = true` cannot read the server name; the
        // client falls back to TCP, where it can. On another port (an `Alt-Svc` may name one),
        // UDP to an address only a name admitted carries no name to check either.
        CONNECT_QUIC
    } else {
        return 1;
    };
    count(counter::EGRESS_BLOCKED);
    report(process, &written, v6, port, udp_send, reason);
    0
}

/// Whether the socket is UDP: a send (the sendmsg programs run for UDP only) or a datagram
/// socket's connect.
#[inline(always)]
pub fn is_udp(ctx: &SockAddrContext, udp_send: bool) -> bool {
    /// `SOCK_DGRAM`.
    const DATAGRAM: u32 = 2;
    // SAFETY: a context field read.
    udp_send || unsafe { (*ctx.sock_addr).type_ } == DATAGRAM
}

/// Whether block mode refuses job process `process` the address `written` (as the process wrote
/// it: IPv4 in its first 4 bytes) and `port`.
#[inline(always)]
pub fn refuses(process: &ProcessJob, written: &[u8; 16], v6: bool, port: u16) -> bool {
    let Some(job) = blocking(process) else {
        return false;
    };
    let dest = normalise(written, v6);
    !(is_local(&dest) || allowed(&job, &dest, port))
}

/// Whether the address a sock_addr program sees is loopback or unspecified: never refused.
#[inline(always)]
pub fn local(ctx: &SockAddrContext, v6: bool) -> bool {
    is_local(&normalise(&written_address(ctx, v6), v6))
}

/// Whether job process `process` is in block mode.
#[inline(always)]
pub fn blocks(process: &ProcessJob) -> bool {
    blocking(process).is_some()
}

/// The plan that judges job process `process`, when it is in block mode.
#[inline(always)]
pub fn blocking(process: &ProcessJob) -> Option<EgressJob> {
    blocking_job(process.job)
}

/// The plan that judges the processes of `job` now, when it is in block mode.
#[inline(always)]
pub fn blocking_job(job: u64) -> Option<EgressJob> {
    match agent_gone() {
        None => {}
        // No plan: the policy id no allowlist entry has, so only loopback gets through.
        Some(true) => {
            return Some(EgressJob {
                policy: EGRESS_NO_POLICY,
                flags: EGRESS_BLOCK,
            });
        }
        Some(false) => return None,
    }
    // SAFETY: the value is copied out at once.
    let job = match unsafe { EGRESS_JOBS.get(job) } {
        Some(job) => *job,
        None if names::setting(setting::EGRESS_MODE) != 0 => EgressJob {
            policy: EGRESS_GLOBAL_POLICY,
            flags: EGRESS_BLOCK,
        },
        None => return None,
    };
    (job.flags & EGRESS_BLOCK != 0).then_some(job)
}

/// `Some(closed)` when the agent has been silent for `AGENT_STALE_SECONDS` (it crashed and these
/// programs outlive it, their links pinned): `closed` from `[egress] on_agent_failure`.
#[inline(always)]
fn agent_gone() -> Option<bool> {
    let beat = names::setting(setting::AGENT_HEARTBEAT);
    if beat == 0 {
        return None;
    }
    let now = (now_ns() / 1_000_000_000) as u32;
    if now <= beat.saturating_add(setting::AGENT_STALE_SECONDS) {
        return None;
    }
    Some(names::setting(setting::AGENT_FAILURE_CLOSED) != 0)
}

/// The context's `user_ip6`, network byte order per word.
#[inline(always)]
pub fn user_ip6(ctx: &SockAddrContext) -> [u32; 4] {
    let sa = ctx.sock_addr;
    // VERIFIER: the context's user_ip6 is read as four 4-byte loads, the access size the kernel
    // allows at every word (volatile keeps LLVM from merging them).
    // SAFETY: context field reads.
    unsafe {
        [
            core::ptr::read_volatile(&(*sa).user_ip6[0]),
            core::ptr::read_volatile(&(*sa).user_ip6[1]),
            core::ptr::read_volatile(&(*sa).user_ip6[2]),
            core::ptr::read_volatile(&(*sa).user_ip6[3]),
        ]
    }
}

/// Writes the context's `user_ip6` (the program types that may: connect6, sendmsg6, recvmsg6),
/// one 4-byte store per word.
#[inline(always)]
pub fn set_user_ip6(ctx: &SockAddrContext, addr: [u32; 4]) {
    let sa = ctx.sock_addr;
    // SAFETY: context field writes.
    unsafe {
        core::ptr::write_volatile(&mut (*sa).user_ip6[0], addr[0]);
        core::ptr::write_volatile(&mut (*sa).user_ip6[1], addr[1]);
        core::ptr::write_volatile(&mut (*sa).user_ip6[2], addr[2]);
        core::ptr::write_volatile(&mut (*sa).user_ip6[3], addr[3]);
    }
}

/// The address as the process wrote it.
#[inline(always)]
fn written_address(ctx: &SockAddrContext, v6: bool) -> [u8; 16] {
    let mut addr = [0u8; 16];
    if v6 {
        for (i, word) in user_ip6(ctx).iter().enumerate() {
            addr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
    } else {
        let sa = ctx.sock_addr;
        // SAFETY: a context field read; user_ip4 holds the address in network byte order.
        let ip = unsafe { core::ptr::read_volatile(&(*sa).user_ip4) };
        addr[0..4].copy_from_slice(&ip.to_ne_bytes());
    }
    addr
}

/// IPv4-mapped (`::ffff:0:0/96`) and NAT64 (`64:ff9b::/96`) addresses are their IPv4 address.
#[inline(always)]
fn normalise(written: &[u8; 16], v6: bool) -> Destination {
    let mut addr = [0u8; 16];
    addr[10] = 0xff;
    addr[11] = 0xff;
    if !v6 {
        addr[12..16].copy_from_slice(&written[0..4]);
        return Destination {
            v4: true,
            nat64: false,
            addr,
        };
    }
    let hi = u64::from_be_bytes([
        written[0], written[1], written[2], written[3], written[4], written[5], written[6],
        written[7],
    ]);
    let mid = u32::from_be_bytes([written[8], written[9], written[10], written[11]]);
    let mapped = hi == 0 && mid == 0x0000_ffff;
    let nat64 = hi == 0x0064_ff9b_0000_0000 && mid == 0;
    if mapped || nat64 {
        addr[12..16].copy_from_slice(&written[12..16]);
        Destination {
            v4: true,
            nat64,
            addr,
        }
    } else {
        Destination {
            v4: false,
            nat64: false,
            addr: *written,
        }
    }
}

/// Loopback, and the unspecified address (which reaches the host itself).
#[inline(always)]
fn is_local(dest: &Destination) -> bool {
    if dest.v4 {
        return !dest.nat64 && (dest.addr[12] == 127 || dest.addr[12..16] == [0; 4]);
    }
    let hi = u64::from_be_bytes([
        dest.addr[0],
        dest.addr[1],
        dest.addr[2],
        dest.addr[3],
        dest.addr[4],
        dest.addr[5],
        dest.addr[6],
        dest.addr[7],
    ]);
    let lo = u64::from_be_bytes([
        dest.addr[8],
        dest.addr[9],
        dest.addr[10],
        dest.addr[11],
        dest.addr[12],
        dest.addr[13],
        dest.addr[14],
        dest.addr[15],
    ]);
    hi == 0 && lo <= 1
}

#[inline(always)]
fn allowed(job: &EgressJob, dest: &Destination, port: u16) -> bool {
    admission(job, dest, port, false) != Admitted::No
}

/// What admits a destination, the weakest first.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Admitted {
    No,
    /// Only an address a job resolved for an allowed name (an entry with an expiry). The agent
    /// writes none where the plan's networks admit the address on that port already, so a
    /// name's entry (a /32 or /128) never hides a network's from the longest-prefix match.
    ByName,
    /// A network of the plan (never expires), or a metadata endpoint the job is entitled to.
    ByNet,
}

/// What admits `dest` on `port` for `job`: its entry for that port, or for every port. A name's
/// entry for the port ends the look-up unless `which` (what admits it matters: UDP under `sni =
/// true`; a network may still admit the address on every port), so a connect pays the second
/// look-up only when the first admits nothing, as before.
#[inline(always)]
fn admission(job: &EgressJob, dest: &Destination, port: u16, which: bool) -> Admitted {
    // SAFETY: the value is only tested.
    let metadata = unsafe { EGRESS_METADATA.get(dest.addr) }.is_some();
    if metadata {
        return if job.flags & EGRESS_METADATA_ENTITLED != 0 {
            Admitted::ByNet
        } else {
            Admitted::No
        };
    }
    let on_port = entry(job.policy, dest, port);
    if on_port == Admitted::ByNet || (on_port == Admitted::ByName && !which) {
        return on_port;
    }
    on_port.max(entry(job.policy, dest, 0))
}

/// What `policy`'s allowlist entry for `dest` on `port` (0: every port) admits.
#[inline(always)]
fn entry(policy: u32, dest: &Destination, port: u16) -> Admitted {
    if dest.v4 {
        let v4 = [dest.addr[12], dest.addr[13], dest.addr[14], dest.addr[15]];
        let bits = EGRESS_KEY_FIXED_BITS + 32;
        admits(EGRESS_ALLOW4.get(Key::new(bits, egress_key::<10>(policy, port, &v4))))
    } else {
        let bits = EGRESS_KEY_FIXED_BITS + 128;
        admits(EGRESS_ALLOW6.get(Key::new(bits, egress_key::<22>(policy, port, &dest.addr))))
    }
}

#[inline(always)]
fn admits(entry: Option<&EgressAllow>) -> Admitted {
    match entry {
        Some(e) if e.expires_ns == 0 => Admitted::ByNet,
        Some(e) if now_ns() < e.expires_ns => Admitted::ByName,
        _ => Admitted::No,
    }
}

/// The refusal, for the agent: a `connect()` seen by the connect tracepoints has its pending
/// event marked (sent at the syscall's exit with its -EPERM); anything else (a UDP send, an
/// io_uring connect) is sent now.
#[inline(always)]
fn report(
    process: &ProcessJob,
    written: &[u8; 16],
    v6: bool,
    port: u16,
    udp_send: bool,
    reason: u32,
) {
    let tid = bpf_get_current_pid_tgid() as u32;
    if !udp_send && crate::maps::mark_pending_blocked(tid, reason) {
        return;
    }
    if !within_budget(process.job, EventKind::Connect as u32) {
        return;
    }
    send::<ConnectEvent>(EventKind::Connect, Some(process), |e| {
        e.result = -1;
        e.fd = -1;
        e.family = if v6 { AF_INET6 } else { AF_INET };
        e.port = port;
        e.addr = *written;
        e.unix_path_len = 0;
        e.unix_path = [0; UNIX_PATH_LEN];
        e.flags = CONNECT_BLOCKED | reason | if udp_send { CONNECT_UDP_SEND } else { 0 };
        e._pad2 = [0; 4];
    });
}
