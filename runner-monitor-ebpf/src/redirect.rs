//! Block mode's DNS: a job process in block mode that sends to port 53 (UDP `connect`,
//! `sendto`/`sendmsg`, TCP `connect`; IPv4) is sent, in the kernel, to the agent's resolver on
//! 127.0.0.1 instead. The socket's source becomes `127.1.0.0` + the job's policy id
//! (`dns_source`), so the resolver knows whose allowlist judges the query without a lookup that
//! could race the job: `bpf_bind` for a connect, `msg_src_ip4` for an unconnected send. The
//! resolver writes the addresses of an allowed name into the job's allowlist before it answers.
//!
//! Answers come back from 127.0.0.1 and the resolver's port; clients check that an answer comes
//! from the server they asked (glibc, musl), so `dns_recvmsg4` gives the answer the address the
//! process wrote, kept per socket in `DNS_REDIRECTS`.

use aya_ebpf::{
    EbpfContext,
    helpers::generated::{bpf_bind, bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map},
    maps::LruHashMap,
    programs::SockAddrContext,
};
use runner_monitor_common::{AF_INET, CONNECT_DNS_REDIRECTED, MAX_DNS_PORTS, dns_source, setting};

use crate::{
    maps::{PENDING_CONNECTS, current_process},
    names,
};

/// Where a redirected socket's queries were going: address and port as the process wrote them
/// (network byte order).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Redirected {
    pub ip4: u32,
    pub port: u32,
}

/// How many redirected sockets are remembered at once (LRU: closed sockets age out).
const MAX_REDIRECTED: u32 = 8192;

/// socket cookie -> the server the process addressed.
#[map]
pub static DNS_REDIRECTS: LruHashMap<u64, Redirected> =
    LruHashMap::with_max_entries(MAX_REDIRECTED, 0);

/// Local port -> policy id, for a socket bound to the wildcard address and a port before its
/// connect (`bpf_bind` cannot give it a source address): its queries come from 127.0.0.1 and
/// that port, and the resolver looks the port up here. Written before the connect returns, so
/// before any query.
#[map]
pub static DNS_PORTS: LruHashMap<u16, u32> = LruHashMap::with_max_entries(MAX_DNS_PORTS, 0);

const DNS_PORT: u16 = 53;

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

/// sockaddr_in.
#[repr(C)]
struct SockaddrIn {
    family: u16,
    port: u16,
    addr: u32,
    zero: [u8; 8],
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
    if u16::from_be(user_port as u16) != DNS_PORT {
        return false;
    }
    let Some(process) = current_process() else {
        return false;
    };
    let Some(job) = crate::egress::blocking(&process) else {
        return false;
    };
    // Another network namespace's loopback is not the agent's: its DNS is left to the verdict.
    let netns = (u64::from(names::setting(setting::DNS_NETNS_HI)) << 32)
        | u64::from(names::setting(setting::DNS_NETNS_LO));
    // SAFETY: the context is a socket-address context.
    if unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != netns {
        return false;
    }
    let source = dns_source(job.policy).to_be();
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
        // SAFETY: a sockaddr_in on the stack; port 0 binds the address only (the port is
        // picked at connect).
        let rc = unsafe {
            bpf_bind(
                sa,
                (&mut bind_to as *mut SockaddrIn).cast(),
                core::mem::size_of::<SockaddrIn>() as i32,
            )
        };
        if rc != 0 {
            // Bound already. To the wildcard address and a port (`bind(0.0.0.0:0)` before the
            // connect): the queries will come from 127.0.0.1 and that port, which says whose
            // they are. To anything else: the resolver could not tell, left to the verdict.
            // SAFETY: reads of the socket the context carries.
            let (src_ip4, src_port) = unsafe {
                let sk = (*sa).__bindgen_anon_1.sk;
                ((*sk).src_ip4, (*sk).src_port)
            };
            if src_ip4 != 0 || src_port == 0 || src_port > 0xffff {
                return false;
            }
            if DNS_PORTS.insert(src_port as u16, job.policy, 0).is_err() {
                return false;
            }
        }
    }
    // SAFETY: the context is a socket-address context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = DNS_REDIRECTS.insert(
        cookie,
        Redirected {
            ip4,
            port: user_port,
        },
        0,
    );
    // SAFETY: context field writes the connect4/sendmsg4 programs may make.
    unsafe {
        (*sa).user_ip4 = resolver_ip4();
        (*sa).user_port = port;
    }
    if !send {
        let tid = aya_ebpf::helpers::bpf_get_current_pid_tgid() as u32;
        if let Some(event) = PENDING_CONNECTS.get_ptr_mut(tid) {
            // SAFETY: the entry belongs to this thread, which is the only one that touches it.
            unsafe { (*event).flags |= CONNECT_DNS_REDIRECTED };
        }
    }
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
