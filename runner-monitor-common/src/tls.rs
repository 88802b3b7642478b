//! TLS server names: the ClientHello parser the kernel runs on a job socket's first data segment
//! (`runner-monitor-ebpf/src/tls.rs`), the event it sends, and the map of names a policy with
//! `sni = true` allows.
//!
//! The parser is written once, over `TlsBytes`, so the kernel runs it on the socket buffer
//! (`bpf_skb_load_bytes` at each offset) and the agent's unit tests on real ClientHello bytes.

use crate::EventHeader;

/// Bytes of the server name copied into the event (longer names are cut and flagged).
pub const SNI_LEN: usize = 128;
/// Extensions walked before the server name is given up (real ClientHellos carry 10 to 20).
pub const MAX_TLS_EXTENSIONS: u32 = 32;

/// `TlsEvent::flags`: block mode refused the connection (its policy has `sni = true` and the
/// server name is not allowed, or unreadable); the segment and every later one were dropped.
pub const TLS_BLOCKED: u32 = 1;
/// `TlsEvent::flags`: a TLS handshake record with no server name the kernel could read in the
/// first segment (no `server_name` extension, or a ClientHello cut by the segment's end).
pub const TLS_NO_SNI: u32 = 1 << 1;
/// `TlsEvent::flags`: the name was longer than `SNI_LEN` and was cut.
pub const TLS_SNI_TRUNCATED: u32 = 1 << 2;

/// The first TLS record a job's TCP socket sent: its destination and server name.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TlsEvent {
    pub header: EventHeader,
    pub family: u16,
    /// Destination port, host byte order.
    pub port: u16,
    /// `TLS_*` bits.
    pub flags: u32,
    /// Destination address, network byte order (IPv4 in the first 4 bytes).
    pub addr: [u8; 16],
    /// Bytes of `sni` used.
    pub sni_len: u32,
    pub _pad: u32,
    pub sni: [u8; SNI_LEN],
}

const _: () = assert!(core::mem::size_of::<TlsEvent>() == 64 + 8 + 16 + 8 + SNI_LEN);

/// Key of `TLS_NAMES`: a name a policy allows as a TLS server name, hashed (`sni_hash`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TlsNameKey {
    pub policy: u32,
    /// `TLS_NAME_EXACT` or `TLS_NAME_WILDCARD`.
    pub kind: u32,
    pub hash: u64,
}

const _: () = assert!(core::mem::size_of::<TlsNameKey>() == 16);

/// `TlsNameKey::kind`: the hash is of the whole name.
pub const TLS_NAME_EXACT: u32 = 1;
/// `TlsNameKey::kind`: the hash is of the suffix after `*.`: any name with at least one more
/// label before it matches.
pub const TLS_NAME_WILDCARD: u32 = 2;
/// Size of a job TCP socket's storage in `TLS_SOCKETS` (its owner and state,
/// `runner-monitor-ebpf/src/tls.rs`): the pinned map's shape the agent checks.
pub const TLS_SOCKET_BYTES: u32 = 64;

/// Slots of `TLS_WATCHES`: job TCP sockets whose server name is only reported, each watched
/// from its connect to its first data segment in the slot its socket cookie's low bits name (a
/// power of two).
pub const MAX_TLS_WATCHES: u32 = 32768;
const _: () = assert!(MAX_TLS_WATCHES.is_power_of_two());
/// Size of a `TLS_WATCHES` slot (the cookie, then the socket's state).
pub const TLS_WATCH_BYTES: u32 = 8 + TLS_SOCKET_BYTES;

/// Capacity of `TLS_NAMES` (names over all policies).
pub const MAX_TLS_NAMES: u32 = 16384;

pub(crate) const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
pub(crate) const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The hash before any byte.
pub const SNI_HASH_SEED: u64 = FNV_OFFSET;

/// One step of the name hash, which runs from the name's last byte to its first, ASCII letters
/// folded to lower case: the kernel then has the hash of every suffix on its way, and looks up
/// each one that starts at a label boundary (FNV-1a, 64 bits).
#[inline(always)]
pub fn sni_hash_step(hash: u64, byte: u8) -> u64 {
    (hash ^ u64::from(byte.to_ascii_lowercase())).wrapping_mul(FNV_PRIME)
}

/// The hash of `name` as the kernel computes it (`sni_hash_step` from the last byte).
pub fn sni_hash(name: &[u8]) -> u64 {
    name.iter()
        .rev()
        .fold(SNI_HASH_SEED, |h, b| sni_hash_step(h, *b))
}

/// Random access to the bytes of a segment: the kernel's socket buffer, or a slice.
pub trait TlsBytes {
    fn u8_at(&self, offset: u32) -> Option<u8>;
    fn u16_at(&self, offset: u32) -> Option<u16>;
}

impl TlsBytes for [u8] {
    fn u8_at(&self, offset: u32) -> Option<u8> {
        self.get(offset as usize).copied()
    }

    fn u16_at(&self, offset: u32) -> Option<u16> {
        let o = offset as usize;
        Some(u16::from_be_bytes([
            *self.get(o)?,
            *self.get(o.checked_add(1)?)?,
        ]))
    }
}

/// What the first data segment of a socket holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientHello {
    /// Not a TLS handshake record.
    NotTls,
    /// A TLS handshake record without a server name in this segment.
    NoServerName,
    /// The host name's bytes: at `offset`, `len` long (all inside the segment).
    ServerName { offset: u32, len: u32 },
}

const RECORD_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXTENSION_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST_NAME: u8 = 0;

/// Finds the server name of the ClientHello that starts at `start` (a TCP payload): record type
/// 0x16, handshake type 1, then past the session id, cipher suites and compression methods, the
/// extensions up to `server_name` (type 0) and its first `host_name` entry.
#[inline(always)]
pub fn find_server_name<B: TlsBytes + ?Sized>(b: &B, start: u32) -> ClientHello {
    // TLSPlaintext: type(1) version(2, major 3) length(2).
    if b.u8_at(start) != Some(RECORD_HANDSHAKE) || b.u8_at(start + 1) != Some(3) {
        return ClientHello::NotTls;
    }
    match server_name(b, start) {
        Some((offset, len)) => ClientHello::ServerName { offset, len },
        None => ClientHello::NoServerName,
    }
}

#[inline(always)]
fn server_name<B: TlsBytes + ?Sized>(b: &B, start: u32) -> Option<(u32, u32)> {
    // Handshake: type(1) length(3); ClientHello: version(2) random(32) session_id<0..32>.
    if b.u8_at(start + 5)? != HANDSHAKE_CLIENT_HELLO {
        return None;
    }
    let mut at = start + 9 + 34;
    at += 1 + u32::from(b.u8_at(at)?);
    // cipher_suites<2..2^16-2>, compression_methods<1..2^8-1>, extensions<8..2^16-1>.
    at += 2 + u32::from(b.u16_at(at)?);
    at += 1 + u32::from(b.u8_at(at)?);
    let end = at + 2 + u32::from(b.u16_at(at)?);
    at += 2;
    // VERIFIER: a loop with a constant bound; every offset is checked by the load, not by the
    // verifier.
    for _ in 0..MAX_TLS_EXTENSIONS {
        if at + 4 > end {
            return None;
        }
        let kind = b.u16_at(at)?;
        let len = u32::from(b.u16_at(at + 2)?);
        // An extension longer than the extensions block is malformed: servers refuse it, and a
        // name read from it would not be the one they see.
        if at + 4 + len > end {
            return None;
        }
        if kind == EXTENSION_SERVER_NAME {
            // server_name_list<1..2^16-1> of (name_type(1), host_name<1..2^16-1>), filling the
            // extension.
            let list_len = u32::from(b.u16_at(at + 4)?);
            if list_len + 2 != len || b.u8_at(at + 6)? != NAME_TYPE_HOST_NAME {
                return None;
            }
            let name_len = u32::from(b.u16_at(at + 7)?);
            let offset = at + 9;
            if name_len == 0 || offset + name_len > at + 4 + len {
                return None;
            }
            // The whole name must be in the segment.
            b.u8_at(offset + name_len - 1)?;
            return Some((offset, name_len));
        }
        at += 4 + len;
    }
    None
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: plain `#[repr(C)]` data without padding (size asserted above); every bit pattern
    // is a valid value.
    unsafe impl aya::Pod for TlsNameKey {}
}
