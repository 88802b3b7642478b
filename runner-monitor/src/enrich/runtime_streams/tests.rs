use super::*;

const JOB: JobKey = JobKey(7);
const ID: &str = "3f2a9c3f2a9c3f2a9c3f2a9c3f2a9c3f2a9c3f2a9c3f2a9c3f2a9c3f2a9c3f2a";

fn start(reference: &str) -> Found {
    Found {
        job: JOB,
        reference: reference.to_owned(),
        action: Action::Start,
    }
}

/// Sends `pieces` as writes (one buffer each) on one connection; all that was found.
fn writes(pieces: &[&[u8]]) -> Vec<Found> {
    let mut streams = RuntimeStreams::default();
    pieces
        .iter()
        .flat_map(|p| streams.sent(JOB, 1, 0, Some(p.len() as u64), p).found)
        .collect()
}

#[test]
fn a_request_the_kernel_reads_where_it_is_sent_is_not_found_again() {
    let whole = format!("POST /v1.47/containers/{ID}/start HTTP/1.1\r\nHost: d\r\n\r\n");
    assert_eq!(writes(&[whole.as_bytes()]), vec![]);
    let by_name = b"POST /containers/web/start HTTP/1.1\r\nHost: d\r\n\r\n";
    assert_eq!(writes(&[by_name]), vec![]);
}

#[test]
fn a_request_line_cut_across_writes_is_found_once_its_head_is_whole() {
    let line = format!("POST /containers/{ID}/start HTTP/1.1\r\nHost: d\r\n\r\n");
    for cut in [1, 6, 20, 40] {
        let (a, b) = line.as_bytes().split_at(cut);
        assert_eq!(writes(&[a, b]), vec![start(ID)], "cut at {cut}");
    }
    // Cut after the request line: the kernel read it in the first write.
    let (a, b) = line.as_bytes().split_at(line.len() - 3);
    assert_eq!(writes(&[a, b]), vec![]);
    // Cut after the id, before its suffix: the kernel saw the start but not the request.
    let (a, b) = line.as_bytes().split_at(17 + 64);
    assert_eq!(writes(&[a, b]), vec![start(ID)]);
    // Byte by byte.
    let bytes: Vec<&[u8]> = line.as_bytes().chunks(1).collect();
    assert_eq!(writes(&bytes), vec![start(ID)]);
}

#[test]
fn a_request_pipelined_after_another_and_its_body_is_found() {
    let two = "POST /containers/create HTTP/1.1\r\nContent-Length: 5\r\n\r\n{}abc\
         POST /containers/web/start HTTP/1.1\r\n\r\n";
    assert_eq!(writes(&[two.as_bytes()]), vec![start("web")]);
    // The body ends in the next write, which goes on with the request.
    let (a, b) = two.as_bytes().split_at(58);
    assert_eq!(writes(&[a, b]), vec![start("web")]);
    // The request begins the next write: the kernel read it there.
    let (a, b) = two.as_bytes().split_at(60);
    assert_eq!(writes(&[a, b]), vec![]);
}

#[test]
fn a_chunked_body_is_skipped_by_its_chunk_sizes() {
    let s = format!(
        "POST /build HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
         4\r\nPOST\r\n3;x=y\r\nabc\r\n0\r\n\r\nPOST /containers/{ID}/exec HTTP/1.1\r\n\r\n"
    );
    let found = writes(&[s.as_bytes()]);
    assert_eq!(
        found,
        vec![Found {
            job: JOB,
            reference: ID.into(),
            action: Action::Exec
        }]
    );
}

#[test]
fn an_encoded_or_absolute_target_is_read_as_the_daemon_routes_it() {
    let encoded = b"POST /containers/%77eb/start HTTP/1.1\r\n\r\n";
    assert_eq!(writes(&[encoded]), vec![start("web")]);
    let absolute = b"POST http://docker/v1.47/containers/web/start HTTP/1.1\r\n\r\n";
    assert_eq!(writes(&[absolute]), vec![start("web")]);
    let long_version = b"POST /v1.0000047/containers/web/start?x=1 HTTP/1.1\r\n\r\n";
    assert_eq!(writes(&[long_version]), vec![start("web")]);
    // Not a container request: a path below it, another method, a stopped one.
    for other in [
        &b"POST /containers/web/stop HTTP/1.1\r\n\r\n"[..],
        b"GET /containers/web/start HTTP/1.1\r\n\r\n",
        b"POST /containers/a/b/start HTTP/1.1\r\n\r\n",
        b"POST /containers/../start HTTP/1.1\r\n\r\n",
    ] {
        assert_eq!(writes(&[other]), vec![]);
    }
}

#[test]
fn a_request_in_a_later_buffer_of_a_send_is_found() {
    let mut streams = RuntimeStreams::default();
    let line = b"POST /containers/web/start HTTP/1.1\r\n\r\n";
    let found = streams.sent(JOB, 1, 1, Some(line.len() as u64), line).found;
    assert_eq!(found, vec![start("web")]);
}

#[test]
fn a_long_body_past_the_copy_is_skipped_and_a_head_there_loses_the_thread() {
    let mut streams = RuntimeStreams::default();
    let head = b"POST /containers/create HTTP/1.1\r\nContent-Length: 1000\r\n\r\n";
    assert!(
        streams
            .sent(JOB, 1, 0, Some(head.len() as u64), head)
            .found
            .is_empty()
    );
    // 1000 body bytes sent, 10 copied.
    assert!(
        streams
            .sent(JOB, 1, 0, Some(1000), &[b'x'; 10])
            .found
            .is_empty()
    );
    // The next request, in a send's second buffer (the kernel reads only the first).
    let line = b"POST /containers/web/start HTTP/1.1\r\n\r\n";
    assert_eq!(
        streams.sent(JOB, 1, 1, Some(line.len() as u64), line).found,
        vec![start("web")]
    );
    // A send whose uncopied part goes past the body: lost, then picked up again at the
    // next request line at a line's start.
    assert!(
        streams
            .sent(JOB, 1, 0, Some(head.len() as u64), head)
            .found
            .is_empty()
    );
    assert!(
        streams
            .sent(JOB, 1, 0, Some(2000), &[b'x'; 10])
            .found
            .is_empty()
    );
    let mut resumed = b"junk\r\n".to_vec();
    resumed.extend_from_slice(line);
    assert_eq!(
        streams
            .sent(JOB, 1, 0, Some(resumed.len() as u64), &resumed)
            .found,
        vec![start("web")]
    );
}

#[test]
fn after_a_request_that_may_take_the_connection_over_the_next_request_line_is_read() {
    let s = format!(
        "POST /containers/{ID}/attach?stream=1 HTTP/1.1\r\nUpgrade: tcp\r\n\r\n\
         raw stdin\nPOST /containers/web/start HTTP/1.1\r\n\r\n"
    );
    // The attach begins the send: the kernel reads it; the start after it is found.
    assert_eq!(writes(&[s.as_bytes()]), vec![start("web")]);
}

#[test]
fn a_new_connection_on_the_same_descriptor_starts_afresh() {
    let mut streams = RuntimeStreams::default();
    assert!(
        streams
            .sent(JOB, 1, 0, Some(8), b"POST /co")
            .found
            .is_empty()
    );
    streams.connected(1);
    let whole = format!("POST /containers/{ID}/start HTTP/1.1\r\n\r\n");
    // Read by the kernel where it was sent: not found again.
    assert!(
        streams
            .sent(JOB, 1, 0, Some(whole.len() as u64), whole.as_bytes())
            .found
            .is_empty()
    );
}

#[test]
fn bytes_nothing_could_copy_are_unread_unless_a_body_holds_them() {
    let mut streams = RuntimeStreams::default();
    // Between requests: a request could be among them.
    assert_eq!(
        streams.sent(JOB, 1, 0, Some(100), b""),
        Read {
            found: vec![],
            unread: true
        }
    );
    // Lost: so could one.
    assert!(streams.sent(JOB, 1, 0, Some(100), b"").unread);
    // Picked up again at a request (in a later buffer: the kernel did not read it).
    let line = b"POST /containers/web/start HTTP/1.1\r\n\r\n";
    assert_eq!(
        streams.sent(JOB, 1, 1, Some(line.len() as u64), line).found,
        vec![start("web")]
    );
    // A body sent from a file: its length is known, nothing can hide there.
    let head = b"POST /images/load HTTP/1.1\r\nContent-Length: 5000\r\n\r\n";
    assert!(
        !streams
            .sent(JOB, 1, 0, Some(head.len() as u64), head)
            .unread
    );
    assert!(!streams.sent(JOB, 1, 0, Some(5000), b"").unread);
    // Past the body's end: unread.
    assert!(
        !streams
            .sent(JOB, 1, 0, Some(head.len() as u64), head)
            .unread
    );
    assert!(streams.sent(JOB, 1, 0, Some(5001), b"").unread);
    // Bytes copied in part (a long buffer): skipped as today, not unread.
    let mut streams = RuntimeStreams::default();
    assert!(!streams.sent(JOB, 1, 0, Some(2000), &[b'x'; 512]).unread);
}

#[test]
fn the_kernels_grammar_is_mirrored() {
    let kernel = |s: &str| kernel_reads(s.as_bytes());
    assert!(kernel(&format!(
        "POST /v1.47/containers/{ID}/attach?x HTTP/1.1\r\n\r\n"
    )));
    assert!(kernel("POST /v1.9/containers/web/exec HTTP/1.1\r\n\r\n"));
    assert!(kernel(
        "POST /v1.100/containers/3f2a/start HTTP/1.1\r\n\r\n"
    ));
    // The kernel does not read these: an attach by name, a long version, an encoding.
    assert!(!kernel("POST /containers/web/attach HTTP/1.1\r\n\r\n"));
    assert!(!kernel(
        "POST /v1.00047/containers/web/start HTTP/1.1\r\n\r\n"
    ));
    assert!(!kernel("POST /containers/%77eb/start HTTP/1.1\r\n\r\n"));
}
