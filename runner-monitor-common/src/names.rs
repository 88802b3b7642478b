//! The kernel's name tables: their keys (`NameKey` for `NAMES`, `file_name_hash` for
//! `FILE_NAMES`) and the environment prefilter's (`env_prefix_key`).

use crate::{NAME_LEN, tls};

/// Key of the name pattern map: a basename, a directory name, a basename prefix, or a job-root
/// executable name, zero padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NameKey {
    /// `NAME_KIND_*`.
    pub kind: u32,
    /// Length of the name in bytes.
    pub len: u32,
    pub name: [u8; NAME_LEN],
}

pub const NAME_KIND_BASENAME: u32 = 1;
pub const NAME_KIND_DIRNAME: u32 = 2;
pub const NAME_KIND_PREFIX: u32 = 3;
pub const NAME_KIND_JOB_ROOT_EXE: u32 = 4;
/// A process with this comm that is in no job starts a new job for each child it forks (GitLab
/// Runner's shell executor: one child shell per stage).
pub const NAME_KIND_JOB_PARENT_COMM: u32 = 5;
/// An environment variable name (a job marker or identity field); the value holds `JOB_ENV_*`.
pub const NAME_KIND_ENV_VAR: u32 = 6;
/// The file name a container runtime's API socket is bound at (`docker.sock`): the policy's
/// `[[secret_sockets]]` of kind `docker`.
pub const NAME_KIND_RUNTIME_SOCKET: u32 = 7;

/// Key of `FILE_NAMES`, the kernel's set of credential basenames, directory names and basename
/// prefixes: the name hashed from its first byte to its last (FNV-1a, 64 bits), then its kind.
/// One pass over a basename gives the hashes of its prefixes on the way. An 8-byte key hashes
/// and compares in a few nanoseconds where a 72-byte `NameKey` (built with a helper copy) cost
/// most of a reported open's matching; a collision only sends an event that the agent then
/// matches against the policy's real patterns.
pub fn file_name_hash(kind: u32, name: &[u8]) -> u64 {
    let hash = name
        .iter()
        .fold(FILE_NAME_SEED, |h, b| file_name_step(h, *b));
    file_name_key(hash, kind)
}

/// `file_name_hash` before the name's first byte.
pub const FILE_NAME_SEED: u64 = tls::FNV_OFFSET;

/// One byte of `file_name_hash`.
#[inline(always)]
pub fn file_name_step(hash: u64, byte: u8) -> u64 {
    (hash ^ u64::from(byte)).wrapping_mul(tls::FNV_PRIME)
}

/// The key of a name of `kind` whose bytes hashed to `hash`.
#[inline(always)]
pub fn file_name_key(hash: u64, kind: u32) -> u64 {
    (hash ^ (u64::from(kind) << 56)).wrapping_mul(tls::FNV_PRIME)
}

/// Bytes of a variable's start that `ENV_PREFIXES` keys hold (the 16th byte is the NUL of the
/// kernel's string read).
pub const JOB_ENV_PREFIX_LEN: usize = 15;

/// Key of `ENV_PREFIXES`: the first 15 bytes of `NAME=` (up to and with the `=` when shorter),
/// zero padded, as two little-endian words. A variable whose start is not in it is skipped after
/// one 16-byte read and one lookup.
pub fn env_prefix_key(name: &[u8]) -> [u64; 2] {
    let mut bytes = [0u8; 16];
    for (i, b) in name
        .iter()
        .chain(b"=".iter())
        .take(JOB_ENV_PREFIX_LEN)
        .enumerate()
    {
        bytes[i] = *b;
    }
    let (lo, hi) = bytes.split_at(8);
    [
        u64::from_le_bytes(lo.try_into().unwrap_or([0; 8])),
        u64::from_le_bytes(hi.try_into().unwrap_or([0; 8])),
    ]
}

impl NameKey {
    /// Builds a key; `None` when the name does not fit.
    pub fn new(kind: u32, name: &[u8]) -> Option<Self> {
        if name.is_empty() || name.len() > NAME_LEN {
            return None;
        }
        let mut key = NameKey {
            kind,
            len: name.len() as u32,
            name: [0; NAME_LEN],
        };
        key.name[..name.len()].copy_from_slice(name);
        Some(key)
    }
}
