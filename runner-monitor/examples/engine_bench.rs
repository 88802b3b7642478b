//! Engine throughput and memory, without the kernel: a synthetic trace of CI jobs through
//! `Engine::handle`. Prints one JSON object. `cargo xtask bench` runs it.
//!
//! engine_bench throughput [EVENTS]     events/s through the engine
//! engine_bench memory                  RSS with 0, 1k and 10k tracked processes

use std::{net::IpAddr, sync::Arc, time::Instant};

use runner_monitor::{
    engine::Engine,
    event::{Connect, Dns, Event, EventDetail, FileAccess, JobInfo, JobKey, JobRef, ProcessRef},
    policy::Policy,
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

fn event(t: u64, job: u64, pid: u32, ppid: u32, detail: EventDetail) -> Event {
    Event {
        time_ns: t,
        job: Some(JobRef {
            key: JobKey(job),
            ended: false,
            root: false,
        }),
        process: ProcessRef {
            pid,
            tid: pid,
            ppid,
            uid: 1001,
            comm: "bench".into(),
            cgroup_id: 1,
        },
        truncated: false,
        detail,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("memory") => memory(),
        _ => throughput(
            args.get(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(1_000_000),
        ),
    }
}

fn throughput(total: u64) {
    let mut engine = Engine::new(Arc::new(Policy::builtin()));
    let t = 1_000_000_000u64;
    let paths = [
        "/home/ci/.aws/credentials",
        "/home/ci/.docker/config.json",
        "/home/ci/.npmrc",
        "/home/ci/src/main.rs",
    ];
    let ip: IpAddr = "140.82.112.5".parse().unwrap();

    // Throughput: 100 jobs, each with 50 processes, then reads, connects and DNS answers.
    let mut events = Vec::with_capacity(total as usize);
    for job in 1..=100u64 {
        let root = (job * 1000) as u32;
        events.push(event(
            t,
            job,
            root,
            1,
            EventDetail::JobStart(JobInfo {
                id: format!("{job}/build"),
                platform: Some("github".into()),
                repository: Some("acme/app".into()),
                ..JobInfo::default()
            }),
        ));
        for c in 1..=50 {
            events.push(event(
                t,
                job,
                root,
                1,
                EventDetail::Fork {
                    child_pid: root + c,
                },
            ));
        }
    }
    let mut i = 0u64;
    while (events.len() as u64) < total {
        i += 1;
        let job = 1 + i % 100;
        let pid = (job * 1000 + 1 + i % 50) as u32;
        let ppid = (job * 1000) as u32;
        let detail = match i % 4 {
            0 | 1 => EventDetail::FileOpen(FileAccess {
                result: 3,
                matched: vec!["basename".into()],
                ..FileAccess::at(paths[(i % 4) as usize])
            }),
            2 => EventDetail::Connect(Connect::inet(ip, 443)),
            _ => EventDetail::DnsAnswer(Dns::answer_a("api.github.com", &ip.to_string())),
        };
        events.push(event(t + i, job, pid, ppid, detail));
    }
    let start = Instant::now();
    let mut findings = 0usize;
    for e in &events {
        findings += engine.handle(e).len();
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "events": total,
            "seconds": elapsed,
            "events_per_second": total as f64 / elapsed,
            "ns_per_event": elapsed * 1e9 / total as f64,
            "findings": findings,
        })
    );
}

/// RSS with 0, 1k and 10k tracked processes, in a process that did nothing else.
fn memory() {
    let t = 1_000_000_000u64;
    let mut engine = Engine::new(Arc::new(Policy::builtin()));
    engine.handle(&event(
        t,
        1,
        10,
        1,
        EventDetail::JobStart(JobInfo {
            id: "m".into(),
            ..JobInfo::default()
        }),
    ));
    let mut rss = Vec::new();
    let mut pid = 100u32;
    for target in [0usize, 1_000, 10_000] {
        while engine.tracked_processes() < target {
            pid += 1;
            engine.handle(&event(t, 1, 10, 1, EventDetail::Fork { child_pid: pid }));
            engine.handle(&event(
                t,
                1,
                pid,
                10,
                EventDetail::Exec {
                    filename: "/usr/bin/cargo".into(),
                    argv: vec!["cargo".into(), "build".into(), "--release".into()],
                    argc: 3,
                },
            ));
        }
        rss.push((target, rss_bytes()));
    }
    let per_process = (rss[2].1 as f64 - rss[0].1 as f64) / 10_000.0;
    println!(
        "{}",
        serde_json::json!({
            "rss_bytes": rss.iter().map(|(n, b)| serde_json::json!({"processes": n, "rss": b})).collect::<Vec<_>>(),
            "bytes_per_process": per_process,
        })
    );
}
