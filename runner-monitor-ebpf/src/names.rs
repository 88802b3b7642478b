//! In-kernel path matching: only opens of interesting paths cross the ring buffer.
//!
//! The agent loads credential basenames (`config.json`, `credentials`), directory names (`.ssh`,
//! `.aws`) and basename prefixes (`id_`) into `FILE_NAMES`, by hash, and job-root executable
//! names (`Runner.Worker`), job parents and identity variables into `NAMES`. A path matches when
//! its basename, its last directory name or a prefix of its basename is in the set. This is a
//! prefilter: the agent resolves the full path and applies the real policy.

use aya_ebpf::{
    helpers::generated::bpf_probe_read_kernel,
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use runner_monitor_common::{
    COMM_LEN, FILE_NAME_SEED, MATCH_BASENAME, MATCH_DIRNAME, MATCH_PREFIX, MATCH_PROC_MEMORY,
    MAX_PREFIX_LEN, NAME_KIND_BASENAME, NAME_KIND_DIRNAME, NAME_KIND_PREFIX, NAME_LEN, NameKey,
    PATH_LEN, file_name_key, file_name_step, setting,
};

#[map]
pub static NAMES: HashMap<NameKey, u32> = HashMap::with_max_entries(1024, 0);

/// Credential basenames, directory names and basename prefixes, by `file_name_hash`: what every
/// file syscall of a job process is matched against.
#[map]
static FILE_NAMES: HashMap<u64, u32> = HashMap::with_max_entries(1024, 0);

/// Settings the agent writes (`runner_monitor_common::setting`): at load and on policy reload.
#[map]
static SETTINGS: Array<u32> = Array::with_max_entries(setting::SLOTS, 0);

#[inline(always)]
pub fn setting(index: u32) -> u32 {
    SETTINGS.get(index).copied().unwrap_or(0)
}

/// Where the last two components of a path start and end.
pub struct PathParts {
    /// Index of the first byte of the basename.
    pub base_start: usize,
    /// Index of the first byte of the last directory name (== `base_start` when there is none).
    pub dir_start: usize,
    /// Length of the path without its NUL.
    pub len: usize,
}

/// Positions of the last two slashes seen while scanning a path, and the path's length.
#[repr(C)]
pub struct SlashPositions {
    last: u32,
    before: u32,
    len: u32,
}

/// VERIFIER: the scan keeps its state in map memory, not in registers. The verifier tracks
/// registers exactly, so a slash position that takes a new constant at every slash, or a length
/// narrowed at every step of a loop that may stop at any step, turns the code after the loop into
/// hundreds of separate states; a value read back from a map is just "some u32" to it.
#[map]
static SLASHES: PerCpuArray<SlashPositions> = PerCpuArray::with_max_entries(1, 0);

const NONE: u32 = u32::MAX;

/// Splits a NUL-terminated path of `len_with_nul` bytes.
#[inline(always)]
pub fn split(path: &[u8; PATH_LEN], len_with_nul: usize) -> Option<PathParts> {
    let slashes = SLASHES.get_ptr_mut(0)?;
    // SAFETY: per-CPU scratch owned by this program run; volatile keeps every access in memory.
    unsafe {
        let len = if len_with_nul > 0 {
            len_with_nul - 1
        } else {
            0
        };
        core::ptr::write_volatile(&mut (*slashes).len, len as u32);
        core::ptr::write_volatile(&mut (*slashes).last, NONE);
        core::ptr::write_volatile(&mut (*slashes).before, NONE);
        // Backwards from the end, stopping at the second slash: only the last two components
        // are wanted, so a typical path costs a few dozen steps instead of PATH_LEN.
        // VERIFIER: the loop counter is the only register that changes; the position and the
        // slashes found so far are read back from map memory, so the two sides of each
        // comparison meet again in one state and the early exits leave no live difference.
        for k in 0..PATH_LEN {
            let len = core::ptr::read_volatile(&(*slashes).len) as usize;
            if k >= len {
                break;
            }
            let i = (len - 1 - k) & (PATH_LEN - 1);
            if path[i] == b'/' {
                if core::ptr::read_volatile(&(*slashes).last) == NONE {
                    core::ptr::write_volatile(&mut (*slashes).last, i as u32);
                } else {
                    core::ptr::write_volatile(&mut (*slashes).before, i as u32);
                    break;
                }
            }
        }
        let len = core::ptr::read_volatile(&(*slashes).len) as usize;
        let last = core::ptr::read_volatile(&(*slashes).last);
        let before = core::ptr::read_volatile(&(*slashes).before);
        let base_start = if last == NONE {
            0
        } else {
            (last as usize + 1) & (PATH_LEN - 1)
        };
        let dir_start = if last == NONE {
            0
        } else if before == NONE {
            if path[0] == b'/' { 1 } else { 0 }
        } else {
            (before as usize + 1) & (PATH_LEN - 1)
        };
        Some(PathParts {
            base_start,
            dir_start,
            len: len & (PATH_LEN - 1),
        })
    }
}

/// Builds a name key from `path[start..end]`; `None` when it is empty or longer than `NAME_LEN`.
#[inline(always)]
pub fn key_of(kind: u32, path: &[u8; PATH_LEN], start: usize, end: usize) -> Option<NameKey> {
    if end <= start || end - start > NAME_LEN {
        return None;
    }
    let len = end - start;
    let mut key = core::mem::MaybeUninit::<NameKey>::uninit();
    let p = key.as_mut_ptr().cast::<u64>();
    // VERIFIER: word-by-word volatile zeroing. `[0; NAME_LEN]` becomes a call to the byte loop of
    // compiler-builtins' memset, which the verifier walks byte by byte at every call site.
    // SAFETY: NameKey is 8-aligned and a whole number of u64 words.
    unsafe {
        core::ptr::write_volatile(p, (kind as u64) | ((len as u64) << 32));
        for w in 1..core::mem::size_of::<NameKey>() / 8 {
            core::ptr::write_volatile(p.add(w), 0);
        }
        // VERIFIER: one helper copy of a length the verifier can bound, instead of a byte loop.
        let n = ((len - 1) & (NAME_LEN - 1)) as u32 + 1;
        bpf_probe_read_kernel(
            (*key.as_mut_ptr()).name.as_mut_ptr().cast(),
            n,
            path.as_ptr().add(start & (PATH_LEN - 1)).cast(),
        );
        Some(key.assume_init())
    }
}

/// A name key from a task's comm (NUL-padded, at most 15 bytes).
#[inline(always)]
pub fn comm_key(kind: u32, comm: &[u8; COMM_LEN]) -> NameKey {
    let mut len = 0u64;
    for c in comm.iter() {
        if *c == 0 {
            break;
        }
        len += 1;
    }
    let mut key = core::mem::MaybeUninit::<NameKey>::uninit();
    let p = key.as_mut_ptr().cast::<u64>();
    // VERIFIER: word-by-word volatile zeroing (see key_of); the comm's padding is already zero.
    // SAFETY: NameKey is 8-aligned and a whole number of u64 words.
    unsafe {
        core::ptr::write_volatile(p, (kind as u64) | (len << 32));
        for w in 1..core::mem::size_of::<NameKey>() / 8 {
            core::ptr::write_volatile(p.add(w), 0);
        }
        let words = comm.as_ptr().cast::<[u8; 8]>();
        core::ptr::write_volatile(
            p.add(1),
            u64::from_ne_bytes(core::ptr::read_unaligned(words)),
        );
        core::ptr::write_volatile(
            p.add(2),
            u64::from_ne_bytes(core::ptr::read_unaligned(words.add(1))),
        );
        key.assume_init()
    }
}

/// Sets `bit` in `out`, which lives in map memory.
///
/// VERIFIER: match results go to memory at once. Kept in a register, each combination of bits is
/// a separate state the verifier carries through all the code that follows.
#[inline(always)]
pub fn mark(out: &mut u32, bit: u32) {
    // SAFETY: `out` is a valid, exclusive reference.
    unsafe { core::ptr::write_volatile(out, core::ptr::read_volatile(out) | bit) }
}

/// ORs into `out` the `MATCH_*` bits of a path: its basename, its last directory name and its
/// basename's prefixes of the lengths in use, each looked up in `FILE_NAMES` by its
/// `file_name_hash`. One pass over the basename hashes it and its prefixes.
#[inline(always)]
pub fn match_credential(path: &[u8; PATH_LEN], parts: &PathParts, out: &mut u32) {
    let prefixes = setting(setting::PREFIX_LENGTHS);
    let (start, len) = (parts.base_start, parts.len.wrapping_sub(parts.base_start));
    let mut hash = FILE_NAME_SEED;
    for j in 0..NAME_LEN {
        if j >= len {
            break;
        }
        // VERIFIER: masked index.
        hash = file_name_step(hash, path[(start + j) & (PATH_LEN - 1)]);
        if j < MAX_PREFIX_LEN
            && prefixes & (1 << j) != 0
            && in_file_names(file_name_key(hash, NAME_KIND_PREFIX))
        {
            mark(out, MATCH_PREFIX);
        }
    }
    if (1..=NAME_LEN).contains(&len) && in_file_names(file_name_key(hash, NAME_KIND_BASENAME)) {
        mark(out, MATCH_BASENAME);
    }
    // A directory name of at least one byte before the basename's slash.
    if parts.dir_start + 1 < parts.base_start {
        let (start, len) = (parts.dir_start, parts.base_start - 1 - parts.dir_start);
        let mut hash = FILE_NAME_SEED;
        for j in 0..NAME_LEN {
            if j >= len {
                break;
            }
            // VERIFIER: masked index.
            hash = file_name_step(hash, path[(start + j) & (PATH_LEN - 1)]);
        }
        if len <= NAME_LEN && in_file_names(file_name_key(hash, NAME_KIND_DIRNAME)) {
            mark(out, MATCH_DIRNAME);
        }
    }
}

#[inline(always)]
fn in_file_names(key: u64) -> bool {
    FILE_NAMES.get_ptr(key).is_some()
}

/// Whether `path[at..base_start]` is `task/<tid>/`.
#[inline(always)]
fn is_task_dir(path: &[u8; PATH_LEN], at: usize, base_start: usize) -> bool {
    const TASK: &[u8; 5] = b"task/";
    for (j, c) in TASK.iter().enumerate() {
        // VERIFIER: masked index.
        if path[(at + j) & (PATH_LEN - 1)] != *c {
            return false;
        }
    }
    let mut digits = 0usize;
    for j in 0..10 {
        // VERIFIER: masked index.
        let c = path[(at + 5 + j) & (PATH_LEN - 1)];
        if c == b'/' {
            break;
        }
        if !c.is_ascii_digit() {
            return false;
        }
        digits += 1;
    }
    digits > 0 && at + 5 + digits + 1 == base_start
}

/// For `/proc/<pid>/mem`, `/proc/<pid>/environ` and `/proc/<pid>/maps` (or the same files of one
/// of its threads, `/proc/<pid>/task/<tid>/...`) of a process other than `own_tgid`: marks
/// `MATCH_PROC_MEMORY` in `out` and stores the pid in `target`. `/proc/self/...` and the
/// process's own pid are not reported: every runtime reads its own maps.
#[inline(always)]
pub fn match_proc_memory(
    path: &[u8; PATH_LEN],
    parts: &PathParts,
    own_tgid: u32,
    out: &mut u32,
    target: &mut u32,
) {
    const PREFIX: &[u8; 6] = b"/proc/";
    for i in 0..6 {
        if path[i] != PREFIX[i] {
            return;
        }
    }
    // The pid: digits from index 6 up to the basename's slash.
    let mut pid: u32 = 0;
    let mut digits = 0usize;
    #[expect(
        clippy::needless_range_loop,
        reason = "an index loop is what the verifier checks"
    )]
    for i in 6..17 {
        let c = path[i];
        if c == b'/' {
            break;
        }
        if !c.is_ascii_digit() {
            return;
        }
        pid = pid.wrapping_mul(10).wrapping_add((c - b'0') as u32);
        digits += 1;
    }
    if digits == 0 || pid == own_tgid {
        return;
    }
    // `/proc/<pid>/<name>`, or one of its threads' `/proc/<pid>/task/<tid>/<name>`.
    let after_pid = 6 + digits + 1;
    if after_pid != parts.base_start && !is_task_dir(path, after_pid, parts.base_start) {
        return;
    }
    let base_len = parts.len.wrapping_sub(parts.base_start);
    let start = parts.base_start & (PATH_LEN - 1);
    let is = |name: &[u8]| -> bool {
        if base_len != name.len() {
            return false;
        }
        for (j, c) in name.iter().enumerate() {
            // VERIFIER: masked index.
            if path[(start + j) & (PATH_LEN - 1)] != *c {
                return false;
            }
        }
        true
    };
    if is(b"mem") || is(b"environ") || is(b"maps") {
        mark(out, MATCH_PROC_MEMORY);
        // SAFETY: valid exclusive reference into map memory.
        unsafe { core::ptr::write_volatile(target, pid) };
    }
}
