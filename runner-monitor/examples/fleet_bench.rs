//! The fleet correlator's ledger, without NATS: how many fingerprint messages per second it
//! takes, and its memory with N fingerprints in it. Prints one JSON object; `cargo xtask bench`
//! runs it.
//!
//! fleet_bench [FINGERPRINTS]   (default 1,000,000)
//!
//! The fleet it simulates: 200 hosts, jobs that each materialise 10 credentials, and one read
//! for every materialisation, half of them on another host (each a finding). Throughput is
//! measured for the messages as the correlator handles them (`learn` for every message, `judge`
//! and `commit` for reads). Memory is counted two ways: the bytes the ledger holds on the heap
//! (a counting allocator: live bytes with the ledger minus without it, the messages dropped), and
//! the process's RSS, which also keeps what the allocator retained from the messages.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicUsize, Ordering},
    time::Instant,
};

/// The system allocator, counting live bytes.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

use runner_monitor::{
    event::JobInfo,
    fleet::{
        ledger::{Ledger, LedgerConfig, Outcome},
        message::{CredentialUse, FingerprintMessage},
    },
};

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

const S: u64 = 1_000_000_000;
const T0: u64 = 1_800_000_000 * S;
const HOSTS: u64 = 200;
const PER_JOB: u64 = 10;

fn message(n: u64, usage: CredentialUse, other_host: bool) -> FingerprintMessage {
    let job = n / PER_JOB;
    let host = (job + u64::from(other_host)) % HOSTS;
    FingerprintMessage {
        host: format!("runner-{host:03}.ci.example.com"),
        key_id: "fleet-key-2026-12".into(),
        // A keyed hash looks random: spread the number over the 128 bits the ledger keeps.
        fingerprint: format!(
            "hmac-sha256:{:016x}{:016x}{:032x}",
            n.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            n.rotate_left(17) ^ 0xdead_beef,
            0
        ),
        usage,
        credential_kind: Some("docker".into()),
        path: "/home/runner/.docker/config.json".into(),
        job: JobInfo {
            id: format!("{}/build", 9_000_000 + job),
            platform: Some("github".into()),
            repository: Some(format!("acme/service-{}", job % 500)),
            workflow: Some("ci".into()),
            run: Some((9_000_000 + job).to_string()),
            ..JobInfo::default()
        },
        pid: 4242,
        time: String::new(),
        time_unix_ns: T0 + n * 1000,
    }
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let mut ledger = Ledger::new(LedgerConfig {
        max_entries: n as usize,
        ttl_ns: 7 * 24 * 3600 * S,
        key_grace_ns: 24 * 3600 * S,
    });
    // The messages are made before the clock starts and the RSS baseline is read after they
    // are dropped... made in chunks, so their own memory is not counted as the ledger's.
    let before = rss_bytes();
    let heap_before = LIVE.load(Ordering::Relaxed);
    let mut handled = 0u64;
    let mut findings = 0u64;
    let mut elapsed = std::time::Duration::ZERO;
    const CHUNK: u64 = 100_000;
    let mut start = 0;
    while start < n {
        let end = (start + CHUNK).min(n);
        let mut batch = Vec::with_capacity(2 * (end - start) as usize);
        for i in start..end {
            batch.push(message(i, CredentialUse::Materialised, false));
            batch.push(message(i, CredentialUse::Read, i % 2 == 0));
        }
        let clock = Instant::now();
        for m in &batch {
            let now = m.time_unix_ns;
            ledger.learn(m, now);
            if m.usage == CredentialUse::Read {
                let (outcome, raised) = ledger.judge(m, now);
                if let Some(raised) = raised {
                    ledger.commit(&raised);
                    findings += 1;
                }
                assert_ne!(outcome, Outcome::Invalid);
            }
        }
        elapsed += clock.elapsed();
        handled += batch.len() as u64;
        start = end;
    }
    let after = rss_bytes();
    let heap = LIVE.load(Ordering::Relaxed).saturating_sub(heap_before);
    let seconds = elapsed.as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "fingerprints": ledger.len(),
            "origin_jobs": ledger.origin_jobs(),
            "messages": handled,
            "findings": findings,
            "messages_per_second": handled as f64 / seconds,
            "ns_per_message": seconds * 1e9 / handled as f64,
            "rss_before_bytes": before,
            "rss_after_bytes": after,
            "heap_bytes": heap,
            "bytes_per_fingerprint": heap as f64 / ledger.len().max(1) as f64,
            "rss_bytes_per_fingerprint": (after.saturating_sub(before)) as f64 / ledger.len().max(1) as f64,
        })
    );
}
