//! Block mode's DNS: a job process in block mode that sends to port 53 (UDP `connect`,
//! `sendto`/`sendmsg`, TCP `connect` over IPv4 and IPv6) is sent, in the kernel, to the agent's
//! resolver on 127.0.0.1 instead (an IPv6 socket's connect through the v4-mapped
//! `::ffff:127.0.0.1`). The socket's source becomes `127.1.0.0` + the job's policy id
//! (`dns_source`), so the resolver knows whose allowlist judges the query without a lookup that
//! could race the job: `bpf_bind` for a connect, `msg_src_ip4` for an unconnected send. The
//! resolver writes the addresses of an allowed name into the job's allowlist before it answers.
//!
//! Answers come back from 127.0.0.1 and the resolver's port; clients check that an answer comes
//! from the server they asked (glibc, musl), so `dns_recvmsg4` gives the answer the address the
//! process wrote, kept per socket in `DNS_REDIRECTS` (`dns_recvmsg6` for IPv6 sockets).
//!
//! An unconnected IPv6 send (`sendto` on an AF_INET6 socket to an IPv6 server, as musl's resolver
//! does) cannot go to a v4-mapped address (the kernel refuses that rewrite in a `sendmsg6`
//! program: `ENOTSUPP`) and IPv6 has one loopback address, so no source address can name the
//! job: it goes to the resolver's `[::1]` socket (same port, when the agent could bind it:
//! `DNS_NETNS_V6`), and its local port (bound before the program runs: the kernel binds an
//! unbound socket before its first send) names the policy in `DNS_PORTS`.
//!
//! Loopback is the network namespace's own, so the resolver listens, on the same port, in every
//! namespace it serves (`DNS_NETNS`: the agent's, and those of job processes: a job's containers,
//! `ip netns exec`). A job process in block mode in a namespace it does not serve yet is named
//! in `DNS_NETNS_WANTED` at its `setns` into it, at its exec and at its DNS, and the agent opens
//! the resolver's sockets in that namespace (or says it will not: `DNS_NETNS_PASS`, left to the
//! verdict). A UDP query that comes before the agent did either is redirected all the same and
//! parked: `packet_egress` drops it without an error (`PARK`) while the namespace has no
//! `DNS_NETNS` entry, so the client's retry (on the same socket, after its timeout) reaches the
//! resolver. Nothing leaves in the meantime. A TCP connect then is left to the verdict (refused
//! unless the server's address is allowed).

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task,
        generated::{bpf_bind, bpf_get_netns_cookie, bpf_get_socket_cookie},
    },
    macros::{cgroup_sock_addr, map, tracepoint},
    maps::{HashMap, LruHashMap, RingBuf},
    programs::{SockAddrContext, TracePointContext},
};
use runner_monitor_common::{
    AF_INET, AF_INET6, CONNECT_DNS_REDIRECTED, DNS_NETNS_EARLY, DNS_NETNS_LOCAL, DNS_NETNS_OWN,
    DNS_NETNS_PASS, DNS_NETNS_V6, DNS_NETNS_WANTED_BYTES, DNS_NETNS_WANTED_EXEC,
    DNS_NETNS_WANTED_QUERY, DNS_NETNS_WANTED_SETNS, DNS_PORT, DnsRedirected, MAX_DNS_ASKED,
    MAX_DNS_NETNS, MAX_DNS_PORTS, ProcessJob, dns_port_key, dns_source, dns_source_policy, setting,
};

use crate::{
    args::syscall_ret_direct,
    egress::{set_user_ip6, user_ip6},
    layout::{layout, read},
    maps::{current_process, pending_connect},
    names,
};

/// What `packet_egress` returns for a parked query: drop it, and tell the sender "congestion",
/// which a UDP send takes for success (`ENOBUFS`, not reported without `IP_RECVERR`).
pub const PARK: i32 = 2;

/// Whether a query of a socket redirected as `redirected` waits for the resolver (`PARK`).
#[inline(always)]
pub fn parked(redirected: &DnsRedirected) -> bool {
    // SAFETY: a lookup; only its presence is read.
    redirected.parked != 0 && unsafe { DNS_NETNS.get(redirected.netns) }.is_none()
}

/// How many redirected sockets are remembered at once (LRU: closed sockets age out).
const MAX_REDIRECTED: u32 = 8192;

/// socket cookie -> the server the process addressed.
#[map]
pub static DNS_REDIRECTS: LruHashMap<u64, DnsRedirected> =
    LruHashMap::with_max_entries(MAX_REDIRECTED, 0);

/// Local address and port (`dns_port_key`) -> policy id, for a socket bound before its connect
/// (`bpf_bind` cannot give it a source address naming its policy), whose queries come from
/// 127.0.0.1 (bound to the wildcard) or the address it is bound to, and that port, and for an
/// IPv6 socket's unconnected sends, which come from `[::1]` and its port; the resolver looks the
/// address and port up here. Written before the connect returns or the
/// datagram is sent, so before any query.
#[map]
pub static DNS_PORTS: LruHashMap<[u64; 2], u32> = LruHashMap::with_max_entries(MAX_DNS_PORTS, 0);

/// Source address and port of a redirected UDP query (`dns_port_key`) -> the server the process
/// addressed, written as the query leaves (`packet_egress`), so before the resolver reads it.
#[map]
pub static DNS_ASKED: LruHashMap<[u64; 2], DnsRedirected> =
    LruHashMap::with_max_entries(MAX_DNS_ASKED, 0);

/// Tells the resolver where a redirected UDP query from `addr` (host byte order; 0 for an IPv6
/// send, which comes from `[::1]`) and `port` was going.
#[inline(always)]
pub fn note_asked(redirected: &DnsRedirected, addr: u32, port: u16, v6: bool) {
    let key = dns_port_key(addr, port, v6, redirected.netns);
    let _ = DNS_ASKED.insert(key, redirected, 0);
}

/// Network namespace cookie -> the resolver listens there (flags: `DNS_NETNS_V6`), or will not
/// (`DNS_NETNS_PASS`). Written by the agent once it looked at the namespace.
#[map]
pub static DNS_NETNS: HashMap<u64, u32> = HashMap::with_max_entries(MAX_DNS_NETNS, 0);

/// `[tgid, why]` (`DNS_NETNS_WANTED_*`): a job process in block mode whose network namespace
/// the agent should serve, if it does not yet. A ring of its own, which wakes the agent at once
/// (the events ring wakes it only past a backlog): the agent races the program's first query.
#[map]
pub static DNS_NETNS_WANTED: RingBuf = RingBuf::with_byte_size(DNS_NETNS_WANTED_BYTES, 0);

/// `struct task_struct.nsproxy`, `struct nsproxy.net_ns`, `struct net.net_cookie`: offsets of the
/// running kernel the agent sets at load from its BTF (`NetnsLayout` in
/// `runner-monitor/src/sensor/dns_netns.rs`), frozen `.rodata` as in `task_layout.rs`. All 0: not
/// known, and every exec of a job process in block mode names it to the agent.
#[unsafe(no_mangle)]
static TASK_NSPROXY: u32 = 0;
#[unsafe(no_mangle)]
static NSPROXY_NET_NS: u32 = 0;
#[unsafe(no_mangle)]
static NET_COOKIE: u32 = 0;
#[unsafe(no_mangle)]
static NETNS_LAYOUT_KNOWN: u32 = 0;

/// The cookie of the current task's network namespace (what `SO_NETNS_COOKIE` and
/// `bpf_get_netns_cookie` give), if the layout is known and the task has one.
#[inline(always)]
fn current_netns_cookie() -> Option<u64> {
    if layout(&NETNS_LAYOUT_KNOWN) == 0 {
        return None;
    }
    // SAFETY: helper without arguments.
    let task = unsafe { bpf_get_current_task() };
    let nsproxy: u64 = read(task + layout(&TASK_NSPROXY))?;
    if nsproxy == 0 {
        return None;
    }
    let net: u64 = read(nsproxy + layout(&NSPROXY_NET_NS))?;
    if net == 0 {
        return None;
    }
    read(net + layout(&NET_COOKIE))
}

/// At the exec of job process `tgid` (`why`: `DNS_NETNS_WANTED_EXEC`), or when a thread `tid` of
/// one entered another namespace (`DNS_NETNS_WANTED_SETNS`): names it to the agent if DNS is
/// redirected, `process` is in block mode and its namespace is not served already. Looked at
/// again: a passed namespace, and at an exec one looked at only at a `setns`
/// (`DNS_NETNS_EARLY`).
#[inline(always)]
pub fn want_netns_unless_served(process: &ProcessJob, pid: u32, why: u32) {
    if resolver_port().is_none() || !crate::egress::blocks(process) {
        return;
    }
    let again = if why == DNS_NETNS_WANTED_EXEC {
        DNS_NETNS_PASS | DNS_NETNS_EARLY
    } else {
        DNS_NETNS_PASS
    };
    if let Some(cookie) = current_netns_cookie()
        // SAFETY: a lookup; the value is copied.
        && let Some(flags) = unsafe { DNS_NETNS.get(cookie) }
        && *flags & again == 0
    {
        return;
    }
    want_netns(pid, why);
}

/// A job thread in block mode that entered a network namespace by `setns` (a container runtime
/// joining the namespace a container will run in, `ip netns exec`, `nsenter`) is named at once,
/// not at its first exec or query there: the agent's resolver is listening before the container's
/// program starts. The thread's id, not its process's: `setns` moves one thread.
#[tracepoint]
pub fn sys_exit_setns(ctx: TracePointContext) -> u32 {
    if syscall_ret_direct(&ctx) == 0
        && let Some(process) = current_process()
    {
        let tid = bpf_get_current_pid_tgid() as u32;
        want_netns_unless_served(&process, tid, DNS_NETNS_WANTED_SETNS);
    }
    0
}

/// Names process `tgid` to the agent for a resolver in its network namespace.
#[inline(always)]
pub fn want_netns(tgid: u32, why: u32) {
    // Full: the agent is behind; a namespace it has not looked at parks the queries of non-glibc
    // resolvers until it does.
    let _ = DNS_NETNS_WANTED.output::<[u32; 2]>(&[tgid, why], 0);
}

/// 127.0.0.1 as `user_ip4` holds it.
#[inline(always)]
pub fn resolver_ip4() -> u32 {
    u32::from_ne_bytes([127, 0, 0, 1])
}

/// The resolver's port as `user_port` holds it (network byte order), if DNS is redirected.
#[inline(always)]
pub fn resolver_port() -> Option<u32> {
    let port = names::setting(setting::DNS_RESOLVER_PORT);
    (port != 0).then(|| u32::from((port as u16).to_be()))
}

/// `::1` as `user_ip6` holds it.
#[inline(always)]
fn loopback6() -> [u32; 4] {
    [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]
}

/// `addr` (an IPv4 address as `user_ip4` holds it) as the v4-mapped IPv6 address, as
/// `user_ip6` holds it.
#[inline(always)]
fn mapped(addr: u32) -> [u32; 4] {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), addr]
}

/// sockaddr_in.
#[repr(C)]
struct SockaddrIn {
    family: u16,
    port: u16,
    addr: u32,
    zero: [u8; 8],
}

/// sockaddr_in6.
#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    port: u16,
    flowinfo: u32,
    addr: [u32; 4],
    scope_id: u32,
}

/// Binds the socket of a connect to `addr` (a `SockaddrIn` or `SockaddrIn6` on the stack, port
/// 0: the address only, the port is picked at connect); false when it is bound already.
#[inline(always)]
fn bind<T>(ctx: &SockAddrContext, addr: &mut T) -> bool {
    // SAFETY: `addr` is a sockaddr of `size_of::<T>()` bytes on the stack.
    let rc = unsafe {
        bpf_bind(
            ctx.sock_addr,
            (addr as *mut T).cast(),
            core::mem::size_of::<T>() as i32,
        )
    };
    rc == 0
}

/// A port-53 connect or send that goes to the agent's resolver: the job's policy id, the
/// socket's network namespace (cookie) and how the resolver listens there (`DNS_NETNS`), or
/// `parked` when the agent has not looked at the namespace yet.
#[derive(Clone, Copy)]
struct Served {
    policy: u32,
    netns: u32,
    cookie: u64,
    parked: bool,
}

/// Whose connect or send to `user_port` (network byte order) goes to the agent's resolver: a job
/// process in block mode, to port 53, in a network namespace the resolver listens in, or that
/// it has not looked at yet (`udp` only: parked). A `loopback` server outside the agent's
/// namespace is that namespace's own (Docker's embedded DNS): redirected only where the
/// resolver asks it itself (`DNS_NETNS_LOCAL`) or has not read the program's resolv.conf yet
/// (`DNS_NETNS_EARLY`), else left alone.
#[inline(always)]
fn redirected_policy(
    ctx: &SockAddrContext,
    user_port: u32,
    udp: bool,
    loopback: bool,
) -> Option<Served> {
    if u16::from_be(user_port as u16) != DNS_PORT {
        return None;
    }
    let process = current_process()?;
    let job = crate::egress::blocking(&process)?;
    // SAFETY: the context is a socket-address context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    match unsafe { DNS_NETNS.get(cookie).copied() } {
        // Until the first exec in a namespace looked at only at a `setns` has been read, its
        // loopback server may be the one its program's resolv.conf will name: the resolver
        // answers (from upstream) rather than no one judging.
        Some(netns)
            if loopback && netns & (DNS_NETNS_OWN | DNS_NETNS_LOCAL | DNS_NETNS_EARLY) == 0 =>
        {
            None
        }
        Some(netns) if netns & DNS_NETNS_PASS != 0 => None,
        Some(netns) => Some(Served {
            policy: job.policy,
            netns,
            cookie,
            parked: false,
        }),
        None => {
            let tgid = (aya_ebpf::helpers::bpf_get_current_pid_tgid() >> 32) as u32;
            want_netns(tgid, DNS_NETNS_WANTED_QUERY);
            udp.then_some(Served {
                policy: job.policy,
                netns: 0,
                cookie,
                parked: true,
            })
        }
    }
}

/// A socket bound to an address (host byte order, 0 for the wildcard) and a port before its
/// connect or send (`bpf_bind` refused: bound already): its queries will come from that address
/// (127.0.0.1 for the wildcard) and port, which say whose they are. False for an address that
/// names a policy itself (`dns_source`: the resolver would read that policy) or no port.
#[inline(always)]
fn bound_port_is(served: Served, addr: u32, src_port: u32, v6_send: bool) -> bool {
    if src_port == 0 || src_port > 0xffff || dns_source_policy(addr).is_some() {
        return false;
    }
    let key = dns_port_key(addr, src_port as u16, v6_send, served.cookie);
    DNS_PORTS.insert(key, served.policy, 0).is_ok()
}

/// The socket's local address is the wildcard (IPv6), and its local port.
#[inline(always)]
fn bound6(ctx: &SockAddrContext) -> (bool, u32) {
    // SAFETY: reads of the socket the context carries.
    unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        let src = (*sk).src_ip6;
        ((src[0] | src[1] | src[2] | src[3]) == 0, (*sk).src_port)
    }
}

/// Remembers where a redirected socket's queries were going, and marks a redirected connect.
#[inline(always)]
fn remember(ctx: &SockAddrContext, mut original: DnsRedirected, served: Served, send: bool) {
    original.parked = u32::from(served.parked);
    original.netns = served.cookie;
    // SAFETY: the context is a socket-address context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = DNS_REDIRECTS.insert(cookie, original, 0);
    if !send {
        let tid = aya_ebpf::helpers::bpf_get_current_pid_tgid() as u32;
        if let Some(event) = pending_connect(tid) {
            // SAFETY: the entry belongs to this thread, which is the only one that touches it.
            unsafe { (*event).flags |= CONNECT_DNS_REDIRECTED };
        }
    }
}

/// Sends a job's IPv4 port-53 connect (`send`: an unconnected UDP send) to the agent's resolver;
/// true when it did (the destination is then loopback: nothing to judge).
#[inline(always)]
pub fn redirect4(ctx: &SockAddrContext, send: bool) -> bool {
    let Some(port) = resolver_port() else {
        return false;
    };
    let sa = ctx.sock_addr;
    // SAFETY: context field reads.
    let (ip4, user_port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    let udp = send || crate::egress::is_udp(ctx, false);
    let loopback = ip4.to_ne_bytes()[0] == 127;
    let Some(served) = redirected_policy(ctx, user_port, udp, loopback) else {
        return false;
    };
    let source = dns_source(served.policy).to_be();
    if send {
        // SAFETY: sendmsg4 may write the datagram's source address.
        unsafe { (*sa).msg_src_ip4 = source };
    } else {
        let mut bind_to = SockaddrIn {
            family: AF_INET,
            port: 0,
            addr: source,
            zero: [0; 8],
        };
        if !bind(ctx, &mut bind_to) {
            // SAFETY: reads of the socket the context carries.
            let (src_ip4, src_port) = unsafe {
                let sk = (*sa).__bindgen_anon_1.sk;
                ((*sk).src_ip4, (*sk).src_port)
            };
            if !bound_port_is(served, u32::from_be(src_ip4), src_port, false) {
                return false;
            }
        }
    }
    remember(
        ctx,
        DnsRedirected {
            ip4,
            port: user_port,
            ip6: [0; 4],
            v6: 0,
            parked: 0,
            netns: 0,
        },
        served,
        send,
    );
    // SAFETY: context field writes the connect4/sendmsg4 programs may make.
    unsafe {
        (*sa).user_ip4 = resolver_ip4();
        (*sa).user_port = port;
    }
    true
}

/// An IPv6 port-53 connect or send of a job process in block mode: the resolver's port, the
/// address and port the process wrote, and the job's policy id.
struct Redirect6 {
    resolver_port: u32,
    ip6: [u32; 4],
    user_port: u32,
    served: Served,
}

#[inline(always)]
fn redirect6_of(ctx: &SockAddrContext, udp: bool) -> Option<Redirect6> {
    let resolver_port = resolver_port()?;
    let ip6 = user_ip6(ctx);
    // SAFETY: a context field read.
    let user_port = unsafe { (*ctx.sock_addr).user_port };
    let loopback =
        ip6 == loopback6() || (ip6[..3] == mapped(0)[..3] && ip6[3].to_ne_bytes()[0] == 127);
    let served = redirected_policy(ctx, user_port, udp, loopback)?;
    Some(Redirect6 {
        resolver_port,
        ip6,
        user_port,
        served,
    })
}

impl Redirect6 {
    /// Remembers where the socket's queries were going and sends them to the resolver at `to`.
    #[inline(always)]
    fn point_at(&self, ctx: &SockAddrContext, to: [u32; 4], send: bool) {
        remember(
            ctx,
            DnsRedirected {
                ip4: 0,
                port: self.user_port,
                ip6: self.ip6,
                v6: 1,
                parked: 0,
                netns: 0,
            },
            self.served,
            send,
        );
        set_user_ip6(ctx, to);
        // SAFETY: a context field write connect6 and sendmsg6 may make.
        unsafe { (*ctx.sock_addr).user_port = self.resolver_port };
    }
}

/// Sends a job's IPv6 port-53 connect (UDP or TCP) to the agent's resolver through
/// `::ffff:127.0.0.1`, the socket bound to `::ffff:` + its job's source address; true when it
/// did. A socket that cannot be bound to a v4-mapped address (`IPV6_V6ONLY`) is left to the
/// verdict.
#[inline(always)]
pub fn redirect6(ctx: &SockAddrContext) -> bool {
    let Some(r) = redirect6_of(ctx, crate::egress::is_udp(ctx, false)) else {
        return false;
    };
    let mut bind_to = SockaddrIn6 {
        family: AF_INET6,
        port: 0,
        flowinfo: 0,
        addr: mapped(dns_source(r.served.policy).to_be()),
        scope_id: 0,
    };
    if !bind(ctx, &mut bind_to) {
        // Bound to an IPv6 address: it cannot reach `::ffff:127.0.0.1`.
        let (wildcard, src_port) = bound6(ctx);
        if !wildcard || !bound_port_is(r.served, 0, src_port, false) {
            return false;
        }
    }
    r.point_at(ctx, mapped(resolver_ip4()), false);
    true
}

/// Sends a job's unconnected IPv6 port-53 send to the resolver's `[::1]` socket, its local port
/// naming its policy; true when it did. A socket bound to an address (not the wildcard) is left
/// to the verdict: its queries would not come from `[::1]`.
#[inline(always)]
pub fn redirect6_send(ctx: &SockAddrContext) -> bool {
    let Some(r) = redirect6_of(ctx, true) else {
        return false;
    };
    // Also when parked: the namespace's `[::1]` is not known yet.
    if r.served.netns & DNS_NETNS_V6 == 0 {
        return false;
    }
    let (wildcard, src_port) = bound6(ctx);
    if !wildcard || !bound_port_is(r.served, 0, src_port, true) {
        return false;
    }
    r.point_at(ctx, loopback6(), true);
    true
}

/// An answer from the resolver to a redirected socket says it comes from the server the process
/// addressed.
#[cgroup_sock_addr(recvmsg4)]
pub fn dns_recvmsg4(ctx: SockAddrContext) -> i32 {
    let Some(port) = resolver_port() else {
        return 1;
    };
    let sa = ctx.sock_addr;
    // SAFETY: context field reads.
    let (ip4, user_port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    if ip4 != resolver_ip4() || user_port != port {
        return 1;
    }
    // SAFETY: the context is a socket-address context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    if let Some(original) = unsafe { DNS_REDIRECTS.get(cookie).copied() } {
        // SAFETY: context field writes recvmsg4 may make.
        unsafe {
            (*sa).user_ip4 = original.ip4;
            (*sa).user_port = original.port;
        }
    }
    1
}

/// `dns_recvmsg4` for IPv6 sockets: their answers come from `::ffff:127.0.0.1` (connected) or
/// `::1` (unconnected sends).
#[cgroup_sock_addr(recvmsg6)]
pub fn dns_recvmsg6(ctx: SockAddrContext) -> i32 {
    let Some(port) = resolver_port() else {
        return 1;
    };
    let sa = ctx.sock_addr;
    // SAFETY: a context field read.
    let user_port = unsafe { (*sa).user_port };
    let from = user_ip6(&ctx);
    if (from != mapped(resolver_ip4()) && from != loopback6()) || user_port != port {
        return 1;
    }
    // SAFETY: the context is a socket-address context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    if let Some(original) = unsafe { DNS_REDIRECTS.get(cookie).copied() }
        && original.v6 != 0
    {
        set_user_ip6(&ctx, original.ip6);
        // SAFETY: a context field write recvmsg6 may make.
        unsafe { (*sa).user_port = original.port };
    }
    1
}
