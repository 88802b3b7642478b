//! Findings per second through the NATS sink (`output::nats`), against a running nats-server
//! with JetStream. Prints one JSON object. `cargo xtask bench` starts the server and runs it.
//!
//! nats_bench URL FINDINGS SPOOL_DIR
//!
//! - publish: a spool already holding FINDINGS findings (an agent restarted after an outage)
//!   drained to the stream: the sink's publish + acknowledgement + cursor rate.
//! - end to end: FINDINGS findings sent one by one while the sink runs (each spooled with an
//!   fsync, as the agent does), until the last is acknowledged.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use runner_monitor::{
    output::{
        delivery::Spool,
        metrics::Metrics,
        nats::{NatsSink, NatsTarget, SINK},
    },
    policy::FleetConfig,
};

/// A finding of the usual size (about 1 KiB, as the agent writes them).
fn finding(n: usize) -> String {
    format!(
        r#"{{"time":"2026-12-03T00:00:00.000Z","rule":"credential-after-job-end","severity":"critical","mitre":{{"id":"T1552.001","name":"Unsecured Credentials: Credentials In Files"}},"time_ns":{n},"job":{{"key":4097,"id":"4097/build","platform":"github","repository":"acme/app","workflow":"CI","run":"4097","runner":"runner-1","ended":true}},"process":{{"pid":{pid},"exe":"/usr/bin/cat","cmdline":"cat /home/runner/.aws/credentials","ancestry":[{{"pid":100,"exe":"/bin/sh"}},{{"pid":99,"exe":"/home/runner/actions-runner/bin/Runner.Worker"}}]}},"credential":{{"path":"/home/runner/.aws/credentials","kind":"aws","fingerprint":"hmac-sha256:0123456789ab:00112233445566778899aabbccddeeff"}},"summary":"a process of job 4097/build (acme/app) that ended read aws credential /home/runner/.aws/credentials"}}"#,
        pid = 1000 + n
    )
}

async fn drained(sink: &NatsSink) {
    let left = sink
        .drain(tokio::time::Instant::now() + Duration::from_secs(600))
        .await;
    assert_eq!(left, 0, "the sink did not drain");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let url = args.next().expect("URL");
    let count: usize = args.next().and_then(|n| n.parse().ok()).expect("FINDINGS");
    let dir = PathBuf::from(args.next().expect("SPOOL_DIR"));
    let target = |host: &str| NatsTarget {
        url: url.clone(),
        fleet: FleetConfig::default(),
        host: host.to_owned(),
    };
    let metrics = Arc::new(Metrics::new());
    let bytes = finding(0).len();

    // Publish: from a full spool.
    {
        let mut spool = Spool::open(&dir.join("publish"), SINK).expect("spool");
        for n in 0..count {
            spool
                .append(format!("findings\t{}", finding(n)).as_bytes())
                .expect("spooling");
        }
    }
    let start = Instant::now();
    let sink = NatsSink::start(
        target("bench-publish"),
        &dir.join("publish"),
        metrics.clone(),
    )
    .expect("sink");
    drained(&sink).await;
    let publish = start.elapsed().as_secs_f64();

    // End to end: sent while the sink runs.
    let sink =
        NatsSink::start(target("bench-live"), &dir.join("live"), metrics.clone()).expect("sink");
    let start = Instant::now();
    for n in 0..count {
        sink.finding(finding(n).as_bytes()).expect("spooling");
    }
    let spooled = start.elapsed().as_secs_f64();
    drained(&sink).await;
    let end_to_end = start.elapsed().as_secs_f64();

    println!(
        "{}",
        serde_json::json!({
            "findings": count,
            "finding_bytes": bytes,
            "publish_findings_per_second": count as f64 / publish,
            "spool_findings_per_second": count as f64 / spooled,
            "end_to_end_findings_per_second": count as f64 / end_to_end,
        })
    );
}
