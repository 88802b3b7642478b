//! Sockets: `connect` by job processes, and the DNS messages their sockets send and receive.
//!
//! DNS is seen without any syscall hook: `cgroup_sock_addr` programs (connect4/6, sendmsg4/6),
//! which run in the calling process, remember which sockets of job processes talk to port 53;
//! `cgroup_skb` programs then copy the DNS messages those sockets send and receive. That covers
//! `sendto`, `sendmsg`, glibc's `sendmmsg`, `write` on a connected socket and io_uring alike, and
//! taxes no syscall.

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_user,
        generated::{
            bpf_get_socket_cookie, bpf_probe_read_user as read_user_raw, bpf_skb_load_bytes,
        },
    },
    macros::{cgroup_skb, cgroup_sock_addr, map, tracepoint},
    maps::{LruHashMap, PerCpuArray},
    programs::{SkBuffContext, SockAddrContext, TracePointContext},
};
use runner_monitor_common::{
    AF_INET, AF_INET6, AF_UNIX, ConnectEvent, DNS_DIRECTION_ANSWER, DNS_LEN, DNS_PORT, DnsEvent,
    EventKind, HEADER_IO_URING, ProcessJob, UNIX_PATH_LEN, counter,
};

use crate::{
    args::{syscall_arg_direct, syscall_ret_direct},
    budget::{within_budget, within_budget_at},
    emit::{fill_header, send_built},
    maps::{PENDING_CONNECTS, PendingConnect, count, current_process},
    owner::SocketOwner,
    packet::{self, IPPROTO_TCP, IPPROTO_UDP},
};

/// Per-CPU room to build a connect record (too large for the BPF stack): a thread's first
/// connect, before its insert, and io_uring connects.
#[map]
static CONNECT_SCRATCH: PerCpuArray<PendingConnect> = PerCpuArray::with_max_entries(1, 0);

/// How many sockets that talk to port 53 are remembered at once.
const MAX_DNS_SOCKETS: u32 = 8192;

/// socket cookie -> owner, for sockets of job processes that sent to or connected to port 53.
/// LRU: a closed socket's entry simply ages out.
#[map]
static DNS_SOCKETS: LruHashMap<u64, SocketOwner> = LruHashMap::with_max_entries(MAX_DNS_SOCKETS, 0);

#[map]
static DNS_SCRATCH: PerCpuArray<DnsEvent> = PerCpuArray::with_max_entries(1, 0);

/// Builds, in `event`, the connect event of the current job process for the user address
/// `addr` (`addrlen` bytes); false, with `event` untouched, when the address is not one the
/// agent reports (inet, inet6, unix) or cannot be read.
#[inline(always)]
fn connect_event(
    process: &ProcessJob,
    fd: i32,
    addr: u64,
    addrlen: i64,
    event: &mut ConnectEvent,
) -> bool {
    if addr == 0 {
        return false;
    }
    // The first 8 bytes in one read: an inet address's family, port and IPv4 address (a
    // `sockaddr_in` is 16 bytes). Each user read is a helper call on every connect of a job; a
    // shorter buffer (a unix address of one byte at the end of a page) is read as before.
    // SAFETY: checked reads of user memory.
    let head = unsafe { bpf_probe_read_user(addr as *const [u8; 8]) }.ok();
    let family = match head {
        Some(head) => u16::from_ne_bytes([head[0], head[1]]),
        // SAFETY: as above.
        None => match unsafe { bpf_probe_read_user(addr as *const u16) } {
            Ok(family) => family,
            Err(_) => {
                count(counter::USER_READ_ERRORS);
                return false;
            }
        },
    };
    if family != AF_INET && family != AF_INET6 && family != AF_UNIX {
        return false;
    }
    fill_header(&mut event.header, EventKind::Connect, Some(process));
    event.result = 0;
    event.fd = fd;
    event.family = family;
    event.port = 0;
    event.addr = [0; 16];
    event.unix_path_len = 0;
    event.flags = 0;
    event.unix_path[0] = 0;
    // SAFETY: checked reads of user memory at the sockaddr's fixed offsets.
    unsafe {
        match family {
            // struct sockaddr_in { u16 family; be16 port; be32 addr; }
            // struct sockaddr_in6 { u16 family; be16 port; u32 flowinfo; u8 addr[16]; ... }
            // An inet address of fewer than 8 bytes is refused by the syscall: reported with
            // port and address 0, as when they cannot be read.
            AF_INET | AF_INET6 => {
                let head = head.unwrap_or([0; 8]);
                event.port = u16::from_be_bytes([head[2], head[3]]);
                if family == AF_INET {
                    event.addr[..4].copy_from_slice(&head[4..]);
                } else {
                    event.addr =
                        bpf_probe_read_user((addr + 8) as *const [u8; 16]).unwrap_or([0; 16]);
                }
            }
            _ => {
                // struct sockaddr_un { u16 family; char sun_path[108]; }
                let len = (addrlen - 2).clamp(0, UNIX_PATH_LEN as i64) as u32;
                if len > 0
                    && read_user_raw(
                        event.unix_path.as_mut_ptr().cast(),
                        UNIX_PATH_LEN as u32,
                        (addr + 2) as *const _,
                    ) < 0
                {
                    // The address may end before a full sun_path: read what addrlen says.
                    let _ = read_user_raw(
                        event.unix_path.as_mut_ptr().cast(),
                        len & 0x7f,
                        (addr + 2) as *const _,
                    );
                }
                event.unix_path_len = len;
            }
        }
    }
    true
}

// long sys_connect(int fd, struct sockaddr __user *uservaddr, int addrlen)
#[tracepoint]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    let Some(process) = current_process() else {
        return 0;
    };
    // Loads from the record, not helper calls: this runs for every connect of a job.
    let fd = syscall_arg_direct(&ctx, 0) as i32;
    let addr = syscall_arg_direct(&ctx, 1);
    let addrlen = syscall_arg_direct(&ctx, 2) as i64;
    let tid = bpf_get_current_pid_tgid() as u32;
    if let Some(pending) = PENDING_CONNECTS.get_ptr_mut(tid) {
        // SAFETY: the entry belongs to this thread, which is the only one that touches it.
        let pending = unsafe { &mut *pending };
        pending.armed = u32::from(connect_event(
            &process,
            fd,
            addr,
            addrlen,
            &mut pending.event,
        ));
        return 0;
    }
    let Some(pending) = CONNECT_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU scratch owned by this program run.
    let pending = unsafe { &mut *pending };
    if !connect_event(&process, fd, addr, addrlen, &mut pending.event) {
        return 0;
    }
    pending.armed = 1;
    pending._pad = 0;
    if PENDING_CONNECTS.insert(tid, pending, 0).is_err() {
        count(counter::PENDING_MAP_FULL);
    }
    0
}

/// An io_uring `IORING_OP_CONNECT` request of a job process, at its submission: the address is
/// read from the user memory the request names (as the syscall's is; the kernel copied it a
/// moment before, in the same task), and the event is sent at once, flagged `HEADER_IO_URING`,
/// with `result` 0: the connect runs later.
#[inline(always)]
pub fn io_uring_connect(process: &ProcessJob, fd: i32, addr: u64, addrlen: i64) {
    let Some(pending) = CONNECT_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU scratch owned by this program run.
    let event = unsafe { &mut (*pending).event };
    if !connect_event(process, fd, addr, addrlen, event) {
        return;
    }
    // A connect block mode will refuse is reported by the sock_addr program when the request
    // runs, as refused; reported here too it would be one connection seen twice, the first time
    // as if it had gone through.
    if event.family != AF_UNIX
        && crate::egress::refuses(process, &event.addr, event.family == AF_INET6, event.port)
    {
        return;
    }
    event.header.flags |= HEADER_IO_URING;
    if within_budget(event.header.job, EventKind::Connect as u32) {
        send_built::<ConnectEvent>(event);
    }
}

#[tracepoint]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    let Some(pending) = PENDING_CONNECTS.get_ptr_mut(tid) else {
        return 0;
    };
    // SAFETY: the entry belongs to this thread, which is the only one that touches it.
    let pending = unsafe { &mut *pending };
    if pending.armed == 0 {
        return 0;
    }
    pending.armed = 0;
    let event = &mut pending.event;
    event.result = syscall_ret_direct(&ctx);
    if event.family == AF_UNIX
        && event.result == 0
        && crate::unix_peer::is_runtime_api(event.fd).unwrap_or(true)
    {
        crate::runtime_requests::unix_connected(event.header.tgid, event.fd, event.header.job);
    }
    // The budget's clock: the connect's start, read at its entry, for one clock read less.
    if within_budget_at(
        event.header.job,
        EventKind::Connect as u32,
        event.header.ts_ns,
    ) {
        send_built::<ConnectEvent>(event);
    }
    0
}

/// Remembers the socket when a job process addresses port 53.
#[inline(always)]
fn note_dns_socket(ctx: &SockAddrContext) {
    // SAFETY: context field reads.
    let port = unsafe { (*ctx.sock_addr).user_port };
    if u16::from_be(port as u16) != DNS_PORT {
        return;
    }
    let Some(process) = current_process() else {
        return;
    };
    let owner = SocketOwner::current(&process);
    // SAFETY: the context is a socket-address context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if DNS_SOCKETS.insert(cookie, owner, 0).is_err() {
        count(counter::DNS_SOCKET_MAP_FULL);
    }
}

// The four sock_addr programs remember DNS sockets and, in block mode, refuse egress outside
// the job's allowlist (`egress::verdict`: 0 makes the syscall fail with EPERM). Their names
// stay those of the DNS sensor they started as.

// A connect looks the process and its block mode up once (`egress::verdict_of`), for the
// verdict and the TLS bookkeeping alike: the connect path runs for every connect of a job.

#[cgroup_sock_addr(connect4)]
pub fn dns_connect4(ctx: SockAddrContext) -> i32 {
    note_dns_socket(&ctx);
    if crate::redirect::redirect4(&ctx, false) {
        return 1;
    }
    connect_verdict(&ctx, false)
}

#[cgroup_sock_addr(connect6)]
pub fn dns_connect6(ctx: SockAddrContext) -> i32 {
    note_dns_socket(&ctx);
    if crate::redirect::redirect6(&ctx) {
        return 1;
    }
    connect_verdict(&ctx, true)
}

#[inline(always)]
fn connect_verdict(ctx: &SockAddrContext, v6: bool) -> i32 {
    let Some(process) = current_process() else {
        return 1;
    };
    let job = crate::egress::blocking(&process);
    if crate::egress::verdict_of(ctx, &process, job.as_ref(), v6, false) == 0 {
        return 0;
    }
    crate::tls::note_socket(ctx, &process, job.as_ref(), v6)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn dns_sendmsg4(ctx: SockAddrContext) -> i32 {
    note_dns_socket(&ctx);
    if crate::redirect::redirect4(&ctx, true) {
        return 1;
    }
    crate::egress::verdict(&ctx, false, true)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn dns_sendmsg6(ctx: SockAddrContext) -> i32 {
    note_dns_socket(&ctx);
    if crate::redirect::redirect6_send(&ctx) {
        return 1;
    }
    crate::egress::verdict(&ctx, true, true)
}

/// Copies a DNS message of a remembered socket into a DNS event; the egress verdict (1, or
/// `redirect::PARK` for a query parked until the resolver listens in its namespace).
#[inline(always)]
fn dns_packet(ctx: &SkBuffContext, transport: &packet::Transport, direction: u32) -> i32 {
    let packet::Transport {
        family,
        protocol,
        l4,
    } = *transport;
    if protocol != IPPROTO_UDP || l4 < 20 {
        return 1;
    }
    // The server's address: egress, the destination (IPv4 16, IPv6 24); ingress, the source.
    let server_at = match (family == AF_INET, direction == DNS_DIRECTION_ANSWER) {
        (true, true) => 12,
        (true, false) => 16,
        (false, true) => 8,
        (false, false) => 24,
    };
    // Both ports, source then destination.
    let Some(ports) = packet::ports(ctx, l4) else {
        return 1;
    };
    let at = if direction == DNS_DIRECTION_ANSWER {
        0
    } else {
        2
    };
    // As the packet holds it (big-endian), as `resolver_port` gives it.
    let server_port = u16::from_ne_bytes([ports[at], ports[at + 1]]);
    let to_resolver = u16::from_be(server_port) != DNS_PORT;
    // Redirected IPv6 sockets reach the resolver over IPv4 (v4-mapped), or at `[::1]` for
    // unconnected sends. Any other UDP packet of the host leaves here, before the cookie.
    if to_resolver && crate::redirect::resolver_port() != Some(u32::from(server_port)) {
        return 1;
    }
    // SAFETY: the context is a socket buffer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // A query block mode sent to the agent's resolver is reported with the server the process
    // addressed.
    let mut redirected = None;
    if to_resolver {
        // SAFETY: copied out at once.
        redirected = unsafe { crate::redirect::DNS_REDIRECTS.get(cookie).copied() };
        match &redirected {
            None => return 1,
            Some(r) if direction != DNS_DIRECTION_ANSWER && crate::redirect::parked(r) => {
                return crate::redirect::PARK;
            }
            Some(r) if direction != DNS_DIRECTION_ANSWER => {
                // Where it comes from: IPv4 from the address naming its policy (or the one
                // it was bound to), IPv6 from `[::1]`.
                let from = if family == AF_INET {
                    ctx.load::<u32>(12).map(u32::from_be).unwrap_or(0)
                } else {
                    0
                };
                let src_port = u16::from_be_bytes([ports[0], ports[1]]);
                crate::redirect::note_asked(r, from, src_port, family != AF_INET);
            }
            Some(_) => {}
        }
    }
    // SAFETY: copied out at once.
    let Some(owner) = (unsafe { DNS_SOCKETS.get(cookie).copied() }) else {
        return 1;
    };
    let Some(event) = DNS_SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: per-CPU scratch owned by this program run.
    let event = unsafe { &mut *event };
    let kind = if direction == DNS_DIRECTION_ANSWER {
        EventKind::DnsAnswer
    } else {
        EventKind::DnsQuery
    };
    owner.fill_header(&mut event.header, kind);
    event.family = family;
    event.server_port = u16::from_be(server_port);
    event._pad = 0;
    event.server_addr = [0; 16];
    if let Some(original) = redirected {
        event.server_port = u16::from_be(original.port as u16);
        if original.v6 != 0 {
            event.family = AF_INET6;
            for (i, word) in original.ip6.iter().enumerate() {
                event.server_addr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
            }
        } else {
            event.server_addr[..4].copy_from_slice(&original.ip4.to_ne_bytes());
        }
    } else if family == AF_INET {
        if let Ok(ip) = ctx.load::<[u8; 4]>(server_at) {
            event.server_addr[..4].copy_from_slice(&ip);
        }
    } else if let Ok(ip) = ctx.load::<[u8; 16]>(server_at) {
        event.server_addr = ip;
    }
    let udp_len = ctx.load::<u16>(l4 + 4).map(u16::from_be).unwrap_or(0) as u32;
    event.wire_len = udp_len.saturating_sub(8);
    let payload_at = l4 + 8;
    let available = (ctx.len() as usize).saturating_sub(payload_at);
    if available == 0 {
        event.len = 0;
    } else {
        // VERIFIER: the helper needs a length it can prove is in 1..=DNS_LEN.
        let len = ((available.min(DNS_LEN) - 1) & (DNS_LEN - 1)) + 1;
        // SAFETY: writes `len` <= DNS_LEN bytes into the payload buffer.
        let rc = unsafe {
            bpf_skb_load_bytes(
                ctx.as_ptr() as *const _,
                payload_at as u32,
                event.payload.as_mut_ptr().cast(),
                len as u32,
            )
        };
        event.len = if rc == 0 { len as u32 } else { 0 };
    }
    if within_budget(event.header.job, kind as u32) {
        send_built::<DnsEvent>(event);
    }
    1
}

/// Every packet a socket in the cgroup tree sends, its headers read once: a UDP datagram may be
/// a DNS query (`dns_packet`), a TCP segment a first ClientHello (`tls::egress_segment`). 1
/// passes it, 0 drops it (a refused TLS socket's), `redirect::PARK` parks a query. One program
/// for both: each program on a hook costs every packet of the host its run.
#[cgroup_skb(egress)]
pub fn packet_egress(ctx: SkBuffContext) -> i32 {
    // Every packet of the host comes here: what is neither UDP nor TCP goes at once.
    let Some(transport) = packet::transport(&ctx) else {
        return 1;
    };
    match transport.protocol {
        IPPROTO_UDP => dns_packet(&ctx, &transport, runner_monitor_common::DNS_DIRECTION_QUERY),
        IPPROTO_TCP => crate::tls::egress_segment(&ctx, &transport),
        _ => 1,
    }
}

#[cgroup_skb(ingress)]
pub fn dns_ingress(ctx: SkBuffContext) -> i32 {
    // What is not UDP goes at once, without a helper call.
    if let Some(transport) = packet::transport(&ctx) {
        dns_packet(&ctx, &transport, DNS_DIRECTION_ANSWER);
    }
    1
}
