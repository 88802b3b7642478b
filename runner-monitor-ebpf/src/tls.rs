//! TLS server names: the ClientHello a job's TCP socket sends first, read in the kernel.
//!
//! `connect4`/`connect6` (net.rs) give a job process's TCP socket socket-local storage
//! (`note_socket`); the `cgroup_skb` egress program then asks every packet's socket for it once
//! (`tls_egress`): a socket without storage (every socket outside jobs) answers from a pointer
//! in the socket, with no map look-up. The first segment with a payload is parsed
//! (`runner_monitor_common::tls::find_server_name`), reported, and the socket marked done; when
//! the job's plan at that moment says `sni = true` in block mode and the name is not allowed
//! (`TLS_NAMES`), the socket is marked refused, and this segment and every later one (its
//! retransmissions too) are dropped.
//!
//! The storage lives and dies with its socket (`BPF_MAP_TYPE_SK_STORAGE`): nothing to remove
//! when a socket is closed, no capacity a job could fill to evict its own refused socket, and no
//! look-up by cookie for each packet of every socket on the host. A job whose TLS is enforced
//! cannot connect when the kernel cannot allocate the storage (fails closed, EPERM). The map is
//! pinned with the process maps (`sensor/pins.rs`): the next agent's programs see the sockets
//! this one watched or refused. The plan is not kept in the storage but read at the first data
//! segment: policy ids are the agent's, and differ after a reload or a restart.

use aya_ebpf::{
    EbpfContext,
    btf_maps::SkStorage,
    helpers::generated::{bpf_sk_fullsock, bpf_sk_storage_get, bpf_skb_load_bytes},
    macros::{btf_map, cgroup_skb, map},
    maps::{HashMap, PerCpuArray},
    programs::{SkBuffContext, SockAddrContext},
};
use runner_monitor_common::{
    AF_INET, EGRESS_BLOCK, EGRESS_SNI, EgressJob, EventKind, MAX_TLS_NAMES, ProcessJob,
    SNI_HASH_SEED, SNI_LEN, TLS_BLOCKED, TLS_NAME_EXACT, TLS_NAME_WILDCARD, TLS_NO_SNI,
    TLS_SNI_TRUNCATED, TLS_SOCKET_BYTES, TlsEvent, counter,
    tls::{ClientHello, TlsBytes, TlsNameKey, find_server_name, sni_hash_step},
};

use crate::{
    budget::within_budget,
    emit::send_built,
    maps::count,
    owner::SocketOwner,
    packet::{self, IPPROTO_TCP},
};

/// A job TCP socket's storage: watched until its first data segment, then done (or refused).
#[repr(C)]
#[derive(Clone, Copy)]
struct TlsSocket {
    owner: SocketOwner,
    /// `WATCHING`, `DONE` or `REFUSED` (every segment is dropped).
    state: u32,
    _pad: u32,
}

const _: () = assert!(size_of::<TlsSocket>() == TLS_SOCKET_BYTES as usize);

const WATCHING: u32 = 0;
const DONE: u32 = 1;
const REFUSED: u32 = 2;

#[btf_map]
static TLS_SOCKETS: SkStorage<TlsSocket> = SkStorage::new();

/// (policy id, exact or wildcard, hash of the name or of the suffix after `*.`) -> 1: the
/// names a policy with `sni = true` allows (written by the agent, `sensor::egress`).
#[map]
static TLS_NAMES: HashMap<TlsNameKey, u32> = HashMap::with_max_entries(MAX_TLS_NAMES, 0);

#[map]
static TLS_SCRATCH: PerCpuArray<TlsEvent> = PerCpuArray::with_max_entries(1, 0);

const SOCK_STREAM: u32 = 1;

/// Remembers job process `process`'s TCP socket at its (allowed) connect; loopback is left
/// alone. `job` is the process's block-mode plan (`egress::blocking`). Returns 0 when the
/// connect must be refused: its TLS is enforced and the socket could not be remembered (map
/// full).
#[inline(always)]
pub fn note_socket(
    ctx: &SockAddrContext,
    process: &ProcessJob,
    job: Option<&EgressJob>,
    v6: bool,
) -> i32 {
    // SAFETY: context field read.
    if unsafe { (*ctx.sock_addr).type_ } != SOCK_STREAM {
        return 1;
    }
    if crate::egress::local(ctx, v6) {
        return 1;
    }
    let mut socket = TlsSocket {
        owner: SocketOwner::current(process),
        state: WATCHING,
        _pad: 0,
    };
    // SAFETY: the context is a socket-address context; the storage is this socket's.
    let stored = unsafe { TLS_SOCKETS.get_or_insert_ptr_mut(ctx, Some(&mut socket)) };
    if !stored.is_null() {
        // A socket that connects again (after a failed connect) keeps its storage: renewed.
        // SAFETY: the socket's storage, valid for this program run.
        unsafe { *stored = socket };
        return 1;
    }
    // No storage: only the server name is lost, unless the name is enforced.
    if job.is_some_and(|job| enforces_names(*job)) {
        count(counter::EGRESS_BLOCKED);
        return 0;
    }
    1
}

/// The socket buffer as `find_server_name` reads it.
struct Segment<'a>(&'a SkBuffContext);

impl TlsBytes for Segment<'_> {
    #[inline(always)]
    fn u8_at(&self, offset: u32) -> Option<u8> {
        self.0.load::<u8>(offset as usize).ok()
    }

    #[inline(always)]
    fn u16_at(&self, offset: u32) -> Option<u16> {
        self.0.load::<u16>(offset as usize).ok().map(u16::from_be)
    }
}

/// A TCP segment's destination address, as the event holds it.
#[inline(always)]
fn destination(ctx: &SkBuffContext, family: u16) -> Option<[u8; 16]> {
    let mut addr = [0u8; 16];
    if family == AF_INET {
        addr[..4].copy_from_slice(&ctx.load::<[u8; 4]>(16).ok()?);
    } else {
        addr = ctx.load::<[u8; 16]>(24).ok()?;
    }
    Some(addr)
}

/// Every packet a socket in the cgroup tree sends: 1 passes it, 0 drops it (a refused socket's).
/// A program of its own beside `dns_egress` (the kernel passes a packet only when both say
/// so): each is verified alone, and a kernel that refuses one keeps the other.
#[cgroup_skb(egress)]
pub fn tls_egress(ctx: SkBuffContext) -> i32 {
    egress_segment(&ctx)
}

/// The egress verdict for one packet: 1 passes it, 0 drops it.
#[inline(always)]
fn egress_segment(ctx: &SkBuffContext) -> i32 {
    // Most packets go here, for a few loads and no helper call: what is not TCP, and the TCP
    // segments without a payload (handshakes, ACKs, FIN, RST), which hold no ClientHello. A
    // refused socket's segments without payload pass too: they carry nothing out.
    let Some(tcp) = packet::transport(ctx).filter(|t| t.protocol == IPPROTO_TCP) else {
        return 1;
    };
    let Some(payload) = packet::tcp_payload(ctx, tcp.l4) else {
        return 1;
    };
    // SAFETY: a context field read.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return 1;
    }
    // SAFETY: a socket the verifier knows is not null; null back: not a full socket.
    let sk = unsafe { bpf_sk_fullsock(sk) };
    if sk.is_null() {
        return 1;
    }
    // SAFETY: `TLS_SOCKETS` is a socket storage map (its address is the map, as aya's own
    // wrapper passes it); no value, no flags: a look-up that creates nothing.
    let entry = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&TLS_SOCKETS).cast_mut().cast(),
            sk.cast(),
            core::ptr::null_mut(),
            0,
        )
    }
    .cast::<TlsSocket>();
    if entry.is_null() {
        return 1;
    }
    // SAFETY: the socket's storage, valid for this program run.
    let socket = unsafe { *entry };
    match socket.state {
        WATCHING => {}
        REFUSED => return 0,
        _ => return 1,
    }
    let (Some(ports), Some(addr)) = (packet::ports(ctx, tcp.l4), destination(ctx, tcp.family))
    else {
        return 1;
    };
    let hello = find_server_name(&Segment(ctx), payload as u32);
    if hello == ClientHello::NotTls {
        // SAFETY: as above.
        unsafe { (*entry).state = DONE };
        return 1;
    }
    let Some(event) = TLS_SCRATCH.get_ptr_mut(0) else {
        // SAFETY: as above.
        unsafe { (*entry).state = DONE };
        return 1;
    };
    // SAFETY: per-CPU scratch owned by this program run.
    let event = unsafe { &mut *event };
    socket
        .owner
        .fill_header(&mut event.header, EventKind::TlsClientHello);
    event.family = tcp.family;
    event.port = u16::from_be_bytes([ports[2], ports[3]]);
    event.addr = addr;
    event.flags = 0;
    event.sni_len = 0;
    event._pad = 0;
    match hello {
        ClientHello::ServerName { offset, len } => {
            if len as usize > SNI_LEN {
                event.flags |= TLS_SNI_TRUNCATED;
            }
            // VERIFIER: the helper needs a length it can prove is in 1..=SNI_LEN.
            let n = ((len as usize).min(SNI_LEN) - 1) & (SNI_LEN - 1);
            let n = n + 1;
            // SAFETY: writes `n` <= SNI_LEN bytes into the event's name buffer.
            let rc = unsafe {
                bpf_skb_load_bytes(
                    ctx.as_ptr() as *const _,
                    offset,
                    event.sni.as_mut_ptr().cast(),
                    n as u32,
                )
            };
            if rc == 0 {
                event.sni_len = n as u32;
            } else {
                event.flags |= TLS_NO_SNI;
            }
        }
        _ => event.flags |= TLS_NO_SNI,
    }
    // The job's plan now, not at its connect: a reload or the next agent may have changed it
    // (and its policy id).
    let plan = crate::egress::blocking_job(socket.owner.job()).filter(|job| enforces_names(*job));
    // A handshake whose name cannot be read, or was cut, cannot be shown to be allowed.
    let refuse = plan.is_some_and(|job| {
        event.flags & (TLS_NO_SNI | TLS_SNI_TRUNCATED) != 0
            || !name_allowed(job.policy, &event.sni, event.sni_len as usize)
    });
    if refuse {
        event.flags |= TLS_BLOCKED;
        // SAFETY: as above.
        unsafe { (*entry).state = REFUSED };
        count(counter::EGRESS_BLOCKED);
    } else {
        // SAFETY: as above.
        unsafe { (*entry).state = DONE };
    }
    if within_budget(socket.owner.job(), EventKind::TlsClientHello as u32) {
        send_built::<TlsEvent>(event);
    }
    if refuse { 0 } else { 1 }
}

/// Whether `job`'s plan checks TLS server names (`sni = true` in block mode).
#[inline(always)]
fn enforces_names(job: EgressJob) -> bool {
    job.flags & (EGRESS_BLOCK | EGRESS_SNI) == EGRESS_BLOCK | EGRESS_SNI
}

/// Whether `name` (its first `len` bytes) is allowed under `policy`: its whole hash is an exact
/// name, or the hash of a suffix that starts after a dot (with a label before the dot) is a
/// wildcard's. The hash runs from the last byte, so each suffix's hash is there on the way.
#[inline(always)]
fn name_allowed(policy: u32, name: &[u8; SNI_LEN], len: usize) -> bool {
    // A trailing dot names the same host (the policy's names have none).
    let len = if len > 1 && name[(len - 1) & (SNI_LEN - 1)] == b'.' {
        len - 1
    } else {
        len
    };
    let mut hash = SNI_HASH_SEED;
    // VERIFIER: a constant bound, and every index masked into the buffer.
    for i in 0..SNI_LEN {
        if i >= len {
            break;
        }
        let at = (len - 1 - i) & (SNI_LEN - 1);
        let byte = name[at];
        if byte == b'.' && i > 0 && at > 0 {
            let key = TlsNameKey {
                policy,
                kind: TLS_NAME_WILDCARD,
                hash,
            };
            // SAFETY: only tested.
            if unsafe { TLS_NAMES.get(key) }.is_some() {
                return true;
            }
        }
        hash = sni_hash_step(hash, byte);
    }
    let key = TlsNameKey {
        policy,
        kind: TLS_NAME_EXACT,
        hash,
    };
    // SAFETY: only tested.
    unsafe { TLS_NAMES.get(key) }.is_some()
}
