use super::*;

#[test]
fn hostname_comes_from_the_kernel_without_reading_proc_sys() {
    let from_proc = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(hostname(), from_proc.trim());
}

#[test]
fn spool_keeps_order_survives_reopen_and_empties_when_delivered() {
    let dir = std::env::temp_dir().join(format!("rm-spool-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    {
        let mut s = Spool::open(&dir, "am").unwrap();
        for i in 0..5 {
            s.append(format!("{{\"n\":{i}}}").as_bytes()).unwrap();
        }
        let (batch, end) = s.next_batch(2).unwrap();
        assert_eq!(batch, [json!({"n": 0}), json!({"n": 1})]);
        s.commit(end).unwrap();
    }
    // A restart resumes after what was delivered.
    let mut s = Spool::open(&dir, "am").unwrap();
    let (batch, end) = s.next_batch(10).unwrap();
    assert_eq!(batch.len(), 3);
    assert_eq!(batch[0], json!({"n": 2}));
    s.commit(end).unwrap();
    assert_eq!(s.pending_bytes(), 0);
    assert_eq!(std::fs::metadata(dir.join("am.jsonl")).unwrap().len(), 0);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn absolute_offsets_never_repeat_across_emptying_and_reopen() {
    let dir = std::env::temp_dir().join(format!("rm-spool-abs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut seen = Vec::new();
    {
        let mut s = Spool::open(&dir, "nats").unwrap();
        s.append(b"{\"n\":0}").unwrap();
        s.append(b"{\"n\":1}").unwrap();
        let records = s.next_records(10).unwrap();
        assert_eq!(records[1].line, "{\"n\":1}");
        seen.extend(records.iter().map(|r| r.id));
        s.commit(records[1].end).unwrap();
        s.append(b"{\"n\":2}").unwrap();
    }
    let mut s = Spool::open(&dir, "nats").unwrap();
    let records = s.next_records(10).unwrap();
    assert_eq!(records.len(), 1);
    seen.extend(records.iter().map(|r| r.id));
    s.commit(records[0].end).unwrap();
    // A crash after the file was emptied but before the cursor said so.
    s.append(b"{\"n\":3}").unwrap();
    let records = s.next_records(10).unwrap();
    seen.extend(records.iter().map(|r| r.id));
    let end = records[0].end;
    std::fs::write(dir.join("nats.cursor"), format!("{end} {}", seen[3])).unwrap();
    s.file.set_len(0).unwrap();
    drop(s);
    let mut s = Spool::open(&dir, "nats").unwrap();
    s.append(b"{\"n\":4}").unwrap();
    let records = s.next_records(10).unwrap();
    seen.extend(records.iter().map(|r| r.id));
    let mut unique = seen.clone();
    unique.dedup();
    assert_eq!(seen, unique, "offsets repeat: {seen:?}");
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn alertmanager_form_keeps_findings_apart_and_carries_the_job() {
    let alert = json!({"rule": "credential-after-job-end", "severity": "critical", "mitre": {"id": "T1552.001"},
        "time": "2026-11-22T08:00:00.000Z", "time_ns": 5, "job": {"key": 7, "id": "9/build", "repository": "acme/app"},
        "process": {"pid": 42}, "credential": {"path": "/root/.aws/credentials", "kind": "aws"}, "summary": "s"});
    let a = alertmanager_alert(&alert, "runner-1");
    assert_eq!(a["labels"]["rule"], "credential-after-job-end");
    assert_eq!(a["labels"]["repository"], "acme/app");
    assert_eq!(a["labels"]["host"], "runner-1");
    assert_eq!(a["annotations"]["object"], "/root/.aws/credentials");
    assert_eq!(a["startsAt"], "2026-11-22T08:00:00.000Z");
    let mut other = alert.clone();
    other["time_ns"] = json!(6);
    assert_ne!(
        alertmanager_alert(&other, "runner-1")["labels"]["finding"],
        a["labels"]["finding"]
    );
    let planted = json!({"rule": "persistence-planted", "severity": "high", "mitre": {"id": "T1053.003"},
        "time_ns": 5, "job": {"key": 7, "id": "9/build"}, "process": {"pid": 42},
        "persistence": {"path": "/etc/cron.d/x", "kind": "cron", "how": "created or changed"}, "summary": "s"});
    assert_eq!(
        alertmanager_alert(&planted, "runner-1")["annotations"]["object"],
        "/etc/cron.d/x"
    );
}

/// A webhook receiver (axum) that records the alerts it gets.
async fn receiver(listener: tokio::net::TcpListener) -> Arc<Mutex<Vec<Value>>> {
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let store = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: String| {
            let store = store.clone();
            async move {
                let batch: Vec<Value> = serde_json::from_str(&body).unwrap();
                store.lock().unwrap().extend(batch);
                "ok"
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    got
}

#[tokio::test]
async fn webhook_gets_every_alert_in_order_after_an_outage() {
    let dir = std::env::temp_dir().join(format!("rm-hook-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // A port with nothing behind it yet: the receiver is down.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let metrics = Arc::new(Metrics::new());
    let sink = Sink::start(
        Receiver::Webhook(format!("http://{addr}/hook")),
        &dir,
        metrics.clone(),
    )
    .unwrap();
    for i in 0..3 {
        sink.send(format!("{{\"rule\":\"agent-tamper\",\"n\":{i}}}").as_bytes())
            .unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !metrics.encode().lines().any(|l| {
        l.starts_with(
            "runner_monitor_alert_delivery_failures_total{reason=\"connect\",sink=\"webhook\"}",
        ) && !l.ends_with(" 0")
    }) {
        assert!(std::time::Instant::now() < deadline, "no failure counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(sink.pending_bytes() > 0);
    // The receiver comes up: everything arrives, in order, once.
    let got = receiver(tokio::net::TcpListener::bind(addr).await.unwrap()).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while got.lock().unwrap().len() < 3 {
        assert!(std::time::Instant::now() < deadline, "alerts not delivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let n: Vec<i64> = got
        .lock()
        .unwrap()
        .iter()
        .map(|a| a["n"].as_i64().unwrap())
        .collect();
    assert_eq!(n, [0, 1, 2]);
    assert_eq!(sink.pending_bytes(), 0);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn http_and_https_receivers_are_accepted_and_nothing_else() {
    assert!(
        Receiver::Alertmanager("http://127.0.0.1:9093".into())
            .validate()
            .is_ok()
    );
    assert!(
        Receiver::Webhook("https://soc.example/hook".into())
            .validate()
            .is_ok()
    );
    assert!(
        Receiver::Webhook("ftp://soc.example/hook".into())
            .validate()
            .is_err()
    );
    assert!(Receiver::Webhook("not a url".into()).validate().is_err());
}
