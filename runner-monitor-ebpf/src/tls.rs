//! TLS server names: the ClientHello a job's TCP socket sends first, read in the kernel.
//!
//! `connect4`/`connect6` (net.rs) remember a job process's TCP socket (`note_socket`): when the
//! job's plan enforces server names (`sni = true` in block mode), in socket-local storage
//! (`TLS_SOCKETS`); otherwise, where only a report is at stake, in `TLS_WATCHES`, an array slot its
//! socket cookie names: a few stores, where the storage's allocation took ~0.9 us of a connect's
//! ~1.3 us in `dns_connect4`. The `cgroup_skb` egress program (`packet_egress`, which hands TCP
//! segments to `egress_segment`) asks each data segment's socket for its storage (a socket without
//! storage answers from a pointer in the socket), and a socket's first data segment for its watch.
//! That segment is parsed (`runner_monitor_common::tls::find_server_name`), reported, and the
//! socket let go; when the job's plan at that moment enforces names and the name is not allowed
//! (`TLS_NAMES`), the socket is refused: this segment and every later one (its retransmissions too)
//! are dropped, and a watched socket gets storage then, to stay refused.
//!
//! The storage lives and dies with its socket (`BPF_MAP_TYPE_SK_STORAGE`): nothing to remove
//! when a socket is closed, and no capacity a job could fill to evict its own refused socket. A
//! job whose TLS is enforced cannot connect when the kernel cannot allocate the storage (fails
//! closed, EPERM). A watch lasts until a later socket's cookie names its slot (after about
//! `MAX_TLS_WATCHES` more connects of jobs): a job that connects that many sockets between one
//! socket's connect and its first data loses that socket's server name (its connect is still
//! reported). Both maps are pinned with the process maps (`sensor/pins.rs`): the next agent's
//! programs see the sockets this one watched or refused. The plan is not kept with the socket
//! but read at the first data segment: policy ids are the agent's, and differ after a reload or
//! a restart.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_SK_STORAGE_GET_F_CREATE, bpf_sock},
    btf_maps::SkStorage,
    helpers::generated::{
        bpf_get_socket_cookie, bpf_sk_fullsock, bpf_sk_storage_get, bpf_skb_load_bytes,
        bpf_tcp_sock,
    },
    macros::{btf_map, map},
    maps::{Array, HashMap, PerCpuArray},
    programs::{SkBuffContext, SockAddrContext},
};
use runner_monitor_common::{
    AF_INET, EGRESS_BLOCK, EGRESS_SNI, EgressJob, EventKind, MAX_TLS_NAMES, MAX_TLS_WATCHES,
    ProcessJob, SNI_HASH_SEED, SNI_LEN, TLS_BLOCKED, TLS_NAME_EXACT, TLS_NAME_WILDCARD, TLS_NO_SNI,
    TLS_SNI_TRUNCATED, TLS_SOCKET_BYTES, TLS_WATCH_BYTES, TlsEvent, counter,
    tls::{ClientHello, TlsBytes, TlsNameKey, find_server_name, sni_hash_step},
};

use crate::{budget::within_budget, emit::send_built, maps::count, owner::SocketOwner, packet};

/// A job TCP socket's state (its storage, or in its watch): watched until its first data
/// segment, then done (or refused).
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

/// A watch: the socket's cookie (0: the slot is free), then its state.
#[repr(C)]
#[derive(Clone, Copy)]
struct TlsWatch {
    cookie: u64,
    socket: TlsSocket,
}

const _: () = assert!(size_of::<TlsWatch>() == TLS_WATCH_BYTES as usize);

/// The watches of job TCP sockets whose server name is only reported, each in the slot of its
/// cookie (`watch_slot`): an array, so a watch is written with stores, no lock, no allocation.
/// A socket's first data segment frees its slot; a later socket may take it before.
#[map]
static TLS_WATCHES: Array<TlsWatch> = Array::with_max_entries(MAX_TLS_WATCHES, 0);

#[inline(always)]
fn watch_slot(cookie: u64) -> u32 {
    cookie as u32 & (MAX_TLS_WATCHES - 1)
}

/// (policy id, exact or wildcard, hash of the name or of the suffix after `*.`) -> 1: the
/// names a policy with `sni = true` allows (written by the agent, `sensor::egress`).
#[map]
static TLS_NAMES: HashMap<TlsNameKey, u32> = HashMap::with_max_entries(MAX_TLS_NAMES, 0);

#[map]
static TLS_SCRATCH: PerCpuArray<TlsEvent> = PerCpuArray::with_max_entries(1, 0);

const SOCK_STREAM: u32 = 1;

/// Remembers job process `process`'s TCP socket at its (allowed) connect; loopback is left
/// alone. `job` is the process's block-mode plan (`egress::blocking`). Returns 0 when the
/// connect must be refused: its TLS is enforced and the socket's storage could not be
/// allocated.
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
    if !job.is_some_and(|job| enforces_names(*job)) {
        // SAFETY: the context is a socket-address context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if let Some(slot) = TLS_WATCHES.get_ptr_mut(watch_slot(cookie)) {
            // The cookie last, cleared first: a segment of the slot's earlier socket, read on
            // another CPU meanwhile, does not find its cookie beside this socket's owner
            // (`watched` reads it again after its copy).
            // SAFETY: an array slot.
            unsafe {
                core::ptr::write_volatile(&raw mut (*slot).cookie, 0);
                (*slot).socket = socket;
                core::ptr::write_volatile(&raw mut (*slot).cookie, cookie);
            }
        }
        return 1;
    }
    // SAFETY: the context is a socket-address context; the storage is this socket's.
    let stored = unsafe { TLS_SOCKETS.get_or_insert_ptr_mut(ctx, Some(&mut socket)) };
    if !stored.is_null() {
        // A socket that connects again (after a failed connect) keeps its storage: renewed.
        // SAFETY: the socket's storage, valid for this program run.
        unsafe { *stored = socket };
        return 1;
    }
    // No storage for a socket whose name is enforced: refused (fails closed).
    count(counter::EGRESS_BLOCKED);
    0
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

/// The egress verdict for TCP segment `tcp` (from `net::packet_egress`): 1 passes it, 0 drops
/// it (a refused socket's).
#[inline(always)]
pub fn egress_segment(ctx: &SkBuffContext, tcp: &packet::Transport) -> i32 {
    // Most segments go here, for a few loads and no helper call: those without a payload
    // (handshakes, ACKs, FIN, RST), which hold no ClientHello. A refused socket's segments
    // without payload pass too: they carry nothing out.
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
    // No value, no flags: a look-up that creates nothing.
    let stored = storage(sk, core::ptr::null_mut(), 0);
    let (socket, home) = if stored.is_null() {
        // A watch is asked for once per socket, at its first data segment: a later one is not
        // a ClientHello, and a watched socket refused gets storage.
        if !first_data(ctx, sk) {
            return 1;
        }
        match watched(ctx) {
            Some((slot, socket)) => (socket, Home::Watch(slot)),
            None => return 1,
        }
    } else {
        // SAFETY: the socket's storage, valid for this program run.
        (unsafe { *stored }, Home::Storage(stored))
    };
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
        settle(&socket, home, sk, DONE);
        return 1;
    }
    let Some(event) = TLS_SCRATCH.get_ptr_mut(0) else {
        settle(&socket, home, sk, DONE);
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
        settle(&socket, home, sk, REFUSED);
        count(counter::EGRESS_BLOCKED);
    } else {
        settle(&socket, home, sk, DONE);
    }
    if within_budget(socket.owner.job(), EventKind::TlsClientHello as u32) {
        send_built::<TlsEvent>(event);
    }
    if refuse { 0 } else { 1 }
}

/// Where a socket's state is kept.
#[derive(Clone, Copy)]
enum Home {
    /// Its storage in `TLS_SOCKETS`.
    Storage(*mut TlsSocket),
    /// Its slot in `TLS_WATCHES`.
    Watch(*mut TlsWatch),
}

/// The watch of the packet's socket, with a copy of its state, when its slot holds it.
#[inline(always)]
fn watched(ctx: &SkBuffContext) -> Option<(*mut TlsWatch, TlsSocket)> {
    // SAFETY: the context is a socket buffer's.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let slot = TLS_WATCHES.get_ptr_mut(watch_slot(cookie))?;
    // SAFETY: an array slot; the cookie is read before and after the copy (`note_socket` writes
    // it last): a copy another socket's watch overwrote meanwhile is not taken.
    unsafe {
        if core::ptr::read_volatile(&raw const (*slot).cookie) != cookie {
            return None;
        }
        let socket = (*slot).socket;
        (core::ptr::read_volatile(&raw const (*slot).cookie) == cookie).then_some((slot, socket))
    }
}

/// Whether this data segment is the first its TCP socket sends (not a later one, nor the first
/// sent again): the kernel adds a segment to the socket's `data_segs_out` before the packet
/// reaches this hook, and `gso_segs` is how many segments the packet is.
#[inline(always)]
fn first_data(ctx: &SkBuffContext, sk: *mut bpf_sock) -> bool {
    // SAFETY: `sk` is a full socket; null back: not TCP.
    let tp = unsafe { bpf_tcp_sock(sk) };
    if tp.is_null() {
        return false;
    }
    // SAFETY: context and TCP socket field reads.
    let (sent, segments) = unsafe { ((*tp).data_segs_out, (*ctx.skb.skb).gso_segs) };
    sent <= segments.max(1)
}

/// `bpf_sk_storage_get` on `TLS_SOCKETS` for full socket `sk`.
#[inline(always)]
fn storage(sk: *mut bpf_sock, value: *mut TlsSocket, flags: u64) -> *mut TlsSocket {
    // SAFETY: `TLS_SOCKETS` is a socket storage map (its address is the map, as aya's own
    // wrapper passes it); `sk` is a full socket; `value` is null or a whole `TlsSocket`.
    unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&TLS_SOCKETS).cast_mut().cast(),
            sk.cast(),
            value.cast(),
            flags,
        )
    }
    .cast()
}

/// Leaves the socket's state `state` (`DONE` or `REFUSED`) after its first data segment, and
/// frees a watch's slot. A refused watch (its job's plan came to enforce names after its
/// connect) gets storage, which keeps its later segments and retransmissions refused; when the
/// kernel cannot allocate it, only this segment is dropped.
#[inline(always)]
fn settle(socket: &TlsSocket, home: Home, sk: *mut bpf_sock, state: u32) {
    let slot = match home {
        // SAFETY: the socket's storage, valid for this program run.
        Home::Storage(stored) => return unsafe { (*stored).state = state },
        Home::Watch(slot) => slot,
    };
    if state == REFUSED {
        let mut refused = TlsSocket { state, ..*socket };
        let stored = storage(sk, &mut refused, u64::from(BPF_SK_STORAGE_GET_F_CREATE));
        if !stored.is_null() {
            // SAFETY: the socket's storage, valid for this program run.
            unsafe { *stored = refused };
        }
    }
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(&raw mut (*slot).cookie, 0) };
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
