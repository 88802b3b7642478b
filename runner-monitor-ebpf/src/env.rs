//! Job identity from the environment a program is executed with.
//!
//! At `execve` entry of a process outside any job (or of a job root), the new environment (the
//! `envp` argument) is scanned for the variables the policy names: job markers
//! (`GITHUB_RUN_ID`, `CI_JOB_ID`, `BUILDKITE_JOB_ID`, ...) and identity fields. A marker makes
//! the process a job root when the exec succeeds (`process::sched_process_exec`), and the values
//! of the identity fields (only those: never any other variable, whatever it holds) go to the
//! agent in a `JobEnvEvent` sent just before the exec event.
//!
//! Cost, per variable: one 16-byte string read and one hash lookup of its first 15 bytes
//! (`ENV_PREFIXES`). Only a variable that passes that filter is read in full (64 bytes of its
//! name, then its value if it is an identity field).

use aya_ebpf::{
    cty::c_void,
    helpers::generated::{bpf_loop, bpf_probe_read_user, bpf_probe_read_user_str},
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use runner_monitor_common::{
    HEADER_TRUNCATED, JOB_ENV_MARKER, JOB_ENV_MAX_CANDIDATES, JOB_ENV_MAX_VALUES, JOB_ENV_MAX_VARS,
    JOB_ENV_VALUE, JOB_ENV_VALUE_LEN, JobEnvEvent, NAME_KIND_ENV_VAR, NAME_LEN, NameKey, counter,
};

use crate::{maps::count, names::NAMES};

/// First 15 bytes of each configured variable's `NAME=` (see `env_prefix_key`) -> 1.
#[map]
static ENV_PREFIXES: HashMap<[u64; 2], u32> = HashMap::with_max_entries(256, 0);

/// thread id -> identity values found at `execve` entry, sent when the exec succeeds.
#[map]
pub static PENDING_ENVS: HashMap<u32, JobEnvEvent> = HashMap::with_max_entries(256, 0);

const NAME_WORDS: usize = NAME_LEN / 8;

/// The scan's state. VERIFIER: counters live in map memory (read and written volatile), not in
/// registers, so that the loops' early exits meet in one verifier state (see `names::SLASHES`).
#[repr(C)]
struct EnvScan {
    ptrs: [u64; CHUNK],
    candidates: [u64; JOB_ENV_MAX_CANDIDATES as usize],
    ncand: u32,
    flags: u32,
    prefix: [u64; 2],
    prefix_key: [u64; 2],
    name: [u64; NAME_WORDS],
    key: NameKey,
    event: JobEnvEvent,
}

#[map]
static ENV_SCRATCH: PerCpuArray<EnvScan> = PerCpuArray::with_max_entries(1, 0);

const SCAN_DONE: u32 = 1;
const SCAN_TRUNCATED: u32 = 2;

/// Where the first `=` of a little-endian word is: `(found, bytes before it)`, `found` 0 or 1;
/// `(0, 8)` when there is none.
///
/// VERIFIER: without a branch. Each branch here ran once per variable scanned and gave the
/// verifier a different constant per path, so no two paths of the scan loop could be pruned
/// into one (a million instructions before the 512th variable).
#[inline(always)]
fn eq_at(w: u64) -> (u64, u64) {
    let x = w ^ 0x3d3d_3d3d_3d3d_3d3d;
    // The lowest 0x80 bit marks the first zero byte of x (higher ones may be false).
    let t = x.wrapping_sub(0x0101_0101_0101_0101) & !x & 0x8080_8080_8080_8080;
    let found = (t | t.wrapping_neg()) >> 63;
    // 1 << 8i for the first `=` at byte i (0 when none); times 0x0001020304050607, whose byte
    // 7 - i is i, it puts i in the top byte.
    let b = (t & t.wrapping_neg()) >> 7;
    let i = (b.wrapping_mul(0x0001_0203_0405_0607) >> 56) & 7;
    // found: i; none: 8.
    (found, i | (found ^ 1) << 3)
}

/// A mask of the first `n` bytes of a word, `n` in 0..=8.
#[inline(always)]
fn first_bytes(n: u64) -> u64 {
    // (1 << 8n) - 1 without shifting by 64: shifted in two steps, 1 << 64 becomes 0.
    ((1u64 << ((n & 7) * 8)) << ((n >> 3) * 32) << ((n >> 3) * 32)).wrapping_sub(1)
}

/// The `ENV_PREFIXES` key of a variable whose first bytes (at most 15, NUL-terminated, zero
/// padded) are `w`: up to and with its `=` when that comes first.
#[inline(always)]
fn prefix_key(w: [u64; 2]) -> [u64; 2] {
    let (found0, at0) = eq_at(w[0]);
    let (_, at1) = eq_at(w[1]);
    // Byte 15 is always the NUL, so at1 + 1 <= 8 unless there is no `=` (then all of w[1]).
    // min(at + 1, 8), branch-free.
    let k0 = w[0] & first_bytes(at0 + 1 - (at0 >> 3));
    let k1 = w[1] & first_bytes(at1 + 1 - (at1 >> 3)) & found0.wrapping_sub(1);
    [k0, k1]
}

/// Volatile access to a scan field (map memory).
#[inline(always)]
fn vol_get<T: Copy>(place: &T) -> T {
    // SAFETY: a valid reference.
    unsafe { core::ptr::read_volatile(place) }
}
#[inline(always)]
fn vol_set<T>(place: &mut T, value: T) {
    // SAFETY: a valid exclusive reference.
    unsafe { core::ptr::write_volatile(place, value) }
}
macro_rules! get {
    ($place:expr) => {
        vol_get(&$place)
    };
}
macro_rules! set {
    ($place:expr, $value:expr) => {
        vol_set(&mut $place, $value)
    };
}

/// Scans `envp` of the exec by thread `tid`. When a configured variable is found, keeps the
/// identity values in `PENDING_ENVS` and returns whether a job marker was among them.
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values stay in the per-CPU scratch; by value they would be copied onto the 512-byte BPF stack"
)]
pub fn scan(envp: u64, tid: u32) -> bool {
    if envp == 0 {
        return false;
    }
    let Some(scan) = ENV_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU scratch owned by this program run.
    let scan = unsafe { &mut *scan };
    set!(scan.ncand, 0);
    set!(scan.flags, 0);
    set!(scan.event.count, 0);
    set!(scan.event.markers, 0);
    set!(scan.event.header.flags, 0);
    // VERIFIER: bpf_loop, so that each step is verified once instead of once per variable (a
    // bounded loop over 512 variables took the verifier past a million instructions).
    let mut walk = Walk { envp };
    // SAFETY: helper call; the callbacks are static functions, the context is on this stack.
    unsafe {
        bpf_loop(
            JOB_ENV_MAX_VARS / CHUNK as u32,
            collect_one as *mut c_void,
            (&mut walk as *mut Walk).cast(),
            0,
        );
    }
    if get!(scan.flags) & SCAN_DONE == 0 {
        // More variables than are scanned.
        set!(scan.flags, SCAN_TRUNCATED);
    }
    // The last variable's first bytes, whatever it holds, do not stay behind.
    set!(scan.prefix[0], 0);
    set!(scan.prefix[1], 0);
    if get!(scan.ncand) == 0 {
        return false;
    }
    // SAFETY: as above.
    unsafe {
        bpf_loop(
            JOB_ENV_MAX_CANDIDATES,
            look_one as *mut c_void,
            core::ptr::null_mut(),
            0,
        );
    }
    forget_name(scan);
    if get!(scan.flags) & SCAN_TRUNCATED != 0 {
        set!(scan.event.header.flags, HEADER_TRUNCATED);
    }
    if get!(scan.event.count) == 0 {
        return false;
    }
    if PENDING_ENVS.insert(tid, &scan.event, 0).is_err() {
        count(counter::PENDING_MAP_FULL);
        return false;
    }
    get!(scan.event.markers) > 0
}

/// The scan's context on the stack (bpf_loop takes a stack pointer).
#[repr(C)]
struct Walk {
    envp: u64,
}

/// `envp` pointers read per helper call (and per callback).
const CHUNK: usize = 8;

/// Phase 1, variables `index * CHUNK ..`: their first bytes against `ENV_PREFIXES`; the ones
/// that pass go to `scan.candidates`. Returns 1 (stop) at the end of the array.
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values stay in the per-CPU scratch; by value they would be copied onto the 512-byte BPF stack"
)]
extern "C" fn collect_one(index: u64, walk: *mut c_void) -> i64 {
    let Some(scan) = ENV_SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: per-CPU scratch owned by this program run; `walk` is the caller's `Walk`.
    let (scan, envp) = unsafe { (&mut *scan, (*(walk as *const Walk)).envp) };
    let at = envp + (index & 0xffff) * (CHUNK as u64) * 8;
    // One read for 8 pointers; the array may end just before an unmapped page, then one by one.
    // SAFETY: checked reads of user memory into the scratch.
    if unsafe {
        bpf_probe_read_user(
            scan.ptrs.as_mut_ptr().cast(),
            (CHUNK * 8) as u32,
            at as *const _,
        )
    } != 0
    {
        for j in 0..CHUNK {
            // SAFETY: as above.
            let r = unsafe {
                bpf_probe_read_user(
                    scan.ptrs.as_mut_ptr().add(j).cast(),
                    8,
                    (at + (j * 8) as u64) as *const _,
                )
            };
            if r != 0 {
                set!(scan.ptrs[j], 0);
            }
        }
    }
    for j in 0..CHUNK {
        let ptr = get!(scan.ptrs[j]);
        if ptr == 0 {
            set!(scan.flags, SCAN_DONE);
            return 1;
        }
        set!(scan.prefix[0], 0);
        set!(scan.prefix[1], 0);
        // SAFETY: checked read of at most 16 bytes (15 and a NUL) into the scratch.
        let n = unsafe {
            bpf_probe_read_user_str(scan.prefix.as_mut_ptr().cast(), 16, ptr as *const _)
        };
        if n <= 0 {
            continue;
        }
        let key = prefix_key([get!(scan.prefix[0]), get!(scan.prefix[1])]);
        set!(scan.prefix_key[0], key[0]);
        set!(scan.prefix_key[1], key[1]);
        if ENV_PREFIXES.get_ptr(&scan.prefix_key).is_none() {
            continue;
        }
        let c = get!(scan.ncand);
        if c >= JOB_ENV_MAX_CANDIDATES {
            set!(scan.flags, SCAN_TRUNCATED);
            continue;
        }
        set!(
            scan.candidates[(c & (JOB_ENV_MAX_CANDIDATES - 1)) as usize],
            ptr
        );
        set!(scan.ncand, c + 1);
    }
    0
}

/// Phase 2, candidate `index`. Returns 1 (stop) after the last one or when no value fits.
extern "C" fn look_one(index: u64, _: *mut c_void) -> i64 {
    let Some(scan) = ENV_SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: per-CPU scratch owned by this program run.
    let scan = unsafe { &mut *scan };
    if index >= u64::from(get!(scan.ncand)) {
        return 1;
    }
    let ptr = get!(scan.candidates[(index as usize) & (JOB_ENV_MAX_CANDIDATES as usize - 1)]);
    if look_at(scan, ptr) { 0 } else { 1 }
}

/// Phase 2: one candidate variable. Its name is looked up exactly; for an identity field its
/// value is copied. Returns false when no more values fit.
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values stay in the per-CPU scratch; by value they would be copied onto the 512-byte BPF stack"
)]
fn look_at(scan: &mut EnvScan, ptr: u64) -> bool {
    for w in 0..NAME_WORDS {
        set!(scan.name[w], 0);
    }
    // SAFETY: checked read of at most NAME_LEN bytes into the scratch.
    let n = unsafe {
        bpf_probe_read_user_str(
            scan.name.as_mut_ptr().cast(),
            NAME_LEN as u32,
            ptr as *const _,
        )
    };
    if n <= 0 {
        return true;
    }
    // The name's length (up to the first `=`) and its key, zero padded, without a branch
    // (VERIFIER: see `eq_at`): `alive` is all ones until the word with the `=`.
    let key = scan.key.name.as_mut_ptr().cast::<u64>();
    let mut alive = u64::MAX;
    let mut len = 0u64;
    for w in 0..NAME_WORDS {
        let word = get!(scan.name[w]);
        let (found, at) = eq_at(word);
        // SAFETY: NameKey::name is NAME_WORDS whole words, 8-aligned (after two u32).
        unsafe { core::ptr::write_volatile(key.add(w), word & first_bytes(at) & alive) };
        len += at & alive;
        alive &= found.wrapping_sub(1);
    }
    // No `=` in NAME_LEN bytes (alive still set), or an empty name: not a variable of ours.
    if alive != 0 || len == 0 {
        forget_name(scan);
        return true;
    }
    let len = (len as usize) & (NAME_LEN - 1);
    // The bytes read behind the name may be the start of any variable's value (CI_JOB_TOKEN
    // passes the prefix filter as CI_JOB_ID does): gone before anything else happens.
    forget_name(scan);
    set!(scan.key.kind, NAME_KIND_ENV_VAR);
    set!(scan.key.len, len as u32);
    // SAFETY: copied out at once.
    let Some(var) = (unsafe { NAMES.get(&scan.key).copied() }) else {
        return true;
    };
    let k = get!(scan.event.count);
    if k as usize >= JOB_ENV_MAX_VALUES {
        set!(scan.flags, SCAN_TRUNCATED);
        return false;
    }
    let slot = &mut scan.event.values[(k as usize) & (JOB_ENV_MAX_VALUES - 1)];
    set!(slot.var, var);
    set!(slot.len, 0);
    set!(slot.value[0], 0);
    if var & JOB_ENV_VALUE != 0 {
        // SAFETY: checked read of at most JOB_ENV_VALUE_LEN bytes into the slot.
        let n = unsafe {
            bpf_probe_read_user_str(
                slot.value.as_mut_ptr().cast(),
                JOB_ENV_VALUE_LEN as u32,
                (ptr + len as u64 + 1) as *const _,
            )
        };
        if n > 0 {
            set!(slot.len, (n - 1) as u32);
            if n as usize >= JOB_ENV_VALUE_LEN {
                set!(scan.flags, SCAN_TRUNCATED);
            }
        }
    }
    if var & JOB_ENV_MARKER != 0 {
        let markers = get!(scan.event.markers);
        set!(scan.event.markers, markers + 1);
    }
    set!(scan.event.count, k + 1);
    true
}

#[inline(always)]
fn forget_name(scan: &mut EnvScan) {
    for w in 0..NAME_WORDS {
        set!(scan.name[w], 0);
    }
}
