//! The control socket's tests: requests, peers, limits and counted outcomes.

use super::*;

#[test]
fn requests_parse_and_reject_unknown_fields() {
    let r: Request = serde_json::from_str(
        r#"{"op":"job_start","pid":42,"id":"9001/build","repository":"acme/app"}"#,
    )
    .unwrap();
    let Request::JobStart { pid, info } = r else {
        panic!()
    };
    assert_eq!(pid, 42);
    assert_eq!(info.id, "9001/build");
    assert_eq!(info.repository.as_deref(), Some("acme/app"));
    assert!(serde_json::from_str::<Request>(r#"{"op":"job_end","id":"x","extra":1}"#).is_err());
    assert!(serde_json::from_str::<Request>(r#"{"op":"rename","id":"x"}"#).is_err());
    // The agent's own request (a GitLab container from Docker's events) is no peer's to send.
    assert!(
        parse_request(br#"{"op":"container_job","container":"ab","created_ns":1,"id":"555"}"#)
            .is_err()
    );
}

fn encode(registry: &Registry) -> String {
    let mut out = Vec::new();
    prometheus::Encoder::encode(
        &prometheus::TextEncoder::new(),
        &registry.gather(),
        &mut out,
    )
    .unwrap();
    String::from_utf8(out).unwrap()
}

fn count(registry: &Registry, request: &str, result: &str) -> u64 {
    let series = format!(
        "runner_monitor_control_requests_total{{request=\"{request}\",result=\"{result}\"}} "
    );
    let text = encode(registry);
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .unwrap_or_else(|| panic!("no series {series}in\n{text}"))
        .parse()
        .unwrap()
}

async fn answer(path: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(path).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).await.unwrap();
    answer
}

#[test]
fn malformed_request_errors_quote_the_peers_bytes_escaped() {
    for line in [
        &br#"{"op":"\u001b]0;pwn\u0007"}"#[..],
        br#"{"op":"job_end","id":"x","\u001b[2J\n\u009b":1}"#,
        br#"{"op":"job_start","pid":"\u001b[31m"}"#,
    ] {
        let message = parse_request(line).unwrap_err();
        assert!(message.starts_with("malformed request: "), "{message}");
        assert!(!message.contains(char::is_control), "{message:?}");
        assert!(message.contains("\\u{1b}"), "{message:?}");
    }
    assert!(parse_request(&vec![b' '; MAX_REQUEST + 1]).is_err());
    assert_eq!(
        parse_request(b"{\"op\":\"job_end\",\"id\":\"7\"}\n"),
        Ok(Request::JobEnd { id: "7".into() })
    );
}

#[tokio::test]
async fn socket_round_trip_with_peer_credentials_limits_and_counted_outcomes() {
    let dir = std::env::temp_dir().join(format!("rm-control-{}", std::process::id()));
    let path = dir.join("control.sock");
    let listener = bind(&path, None).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let (tx, mut rx) = mpsc::channel(4);
    let registry = Registry::new();
    let metrics = ControlMetrics::register(&registry);
    // Whoever runs the test is admitted as the "runner user".
    // SAFETY: getuid has no preconditions.
    let me = unsafe { libc::getuid() };
    tokio::spawn(serve_with_timeout(
        listener,
        Some(me),
        tx,
        metrics,
        Duration::from_millis(300),
    ));
    // The main loop's stand-in: ends jobs, and takes every start for a replay.
    tokio::spawn(async move {
        while let Some(cmd) = rx.recv().await {
            let Command {
                peer,
                request,
                reply,
            } = cmd;
            assert_eq!(peer.pid, std::process::id());
            let _ = reply.send(match request {
                Request::JobEnd { id } => Reply::ok(format!("ended {id}")),
                Request::JobStart { .. } => Reply::refused(Outcome::Replayed, "again"),
                Request::JobReport { id } => {
                    Reply::report(id, serde_json::json!({ "processes": [] }))
                }
                Request::Status => {
                    Reply::status(serde_json::json!({ "egress": { "mode": "block" } }))
                }
                Request::ContainerJob { .. } => unreachable!("no peer can send it"),
            });
        }
    });
    for outcome in Outcome::ALL {
        for request in REQUEST_NAMES {
            let expected = (request == "unknown") != outcome.of_parsed_request();
            let exists = encode(&registry).contains(&format!(
                "runner_monitor_control_requests_total{{request=\"{request}\",result=\"{}\"}} 0",
                outcome.as_str()
            ));
            assert_eq!(exists, expected, "{request} {outcome:?} pre-created");
        }
    }

    let r = send(&path, &Request::JobEnd { id: "7".into() })
        .await
        .unwrap();
    assert_eq!(r, Response::ok("ended 7".into()));
    let r = send(
        &path,
        &Request::JobStart {
            pid: 1,
            info: Box::default(),
        },
    )
    .await
    .unwrap();
    assert_eq!(r, Response::error("again"));
    // A report comes back whole in the answer.
    let r = send(&path, &Request::JobReport { id: "7".into() })
        .await
        .unwrap();
    assert_eq!(r.report, Some(serde_json::json!({ "processes": [] })));
    // So does the agent's status, as `{"op":"status"}`.
    let status = answer(&path, b"{\"op\":\"status\"}\n").await;
    assert!(
        status.contains(r#""status":{"egress":{"mode":"block"}}"#),
        "{status}"
    );

    // Malformed, oversized and silent requests get an error, not a hang.
    let malformed = answer(&path, b"{not json}\n").await;
    assert!(malformed.contains("malformed request"), "{malformed}");
    let mut big = vec![b'x'; MAX_REQUEST + 10];
    big.push(b'\n');
    let oversized = answer(&path, &big).await;
    assert!(oversized.contains("larger than"), "{oversized}");
    let silent = answer(&path, b"").await;
    assert!(silent.contains("timed out"), "{silent}");

    for (request, result) in [
        ("job_end", "ok"),
        ("job_start", "replayed"),
        ("job_report", "ok"),
        ("unknown", "malformed"),
        ("unknown", "oversized"),
        ("unknown", "timeout"),
    ] {
        assert_eq!(count(&registry, request, result), 1, "{request} {result}");
    }
    assert_eq!(count(&registry, "job_start", "ok"), 0);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn only_root_and_the_runner_user_are_admitted() {
    assert!(admitted(0, None));
    assert!(admitted(0, Some(1000)));
    assert!(admitted(1000, Some(1000)));
    assert!(!admitted(1000, None));
    assert!(!admitted(1001, Some(1000)));
}
