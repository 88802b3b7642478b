use runner_monitor_common::container::RUNTIME_SENT_BYTES;

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

/// A send from the sender's memory (`write`, `send*`, `writev`'s buffers).
trait Buffers {
    fn buffer(&mut self, job: JobKey, conn: u64, i: u32, len: Option<u64>, data: &[u8]) -> Read;
}

impl Buffers for RuntimeStreams {
    fn buffer(&mut self, job: JobKey, conn: u64, i: u32, len: Option<u64>, data: &[u8]) -> Read {
        self.sent(job, conn, i, len, data)
    }
}

/// The requests found in a write of `len` bytes on connection 1, `data` the kernel's copy.
fn found_in(streams: &mut RuntimeStreams, len: u64, data: &[u8]) -> Vec<Found> {
    streams.buffer(JOB, 1, 0, Some(len), data).found
}

/// Sends `pieces` as writes (one buffer each) on one connection; all that was found.
fn writes(pieces: &[&[u8]]) -> Vec<Found> {
    let mut streams = RuntimeStreams::default();
    pieces
        .iter()
        .flat_map(|p| streams.buffer(JOB, 1, 0, Some(p.len() as u64), p).found)
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
        vec![
            Found {
                job: JOB,
                reference: String::new(),
                action: Action::Build
            },
            Found {
                job: JOB,
                reference: ID.into(),
                action: Action::Exec
            }
        ]
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
    let found = streams
        .buffer(JOB, 1, 1, Some(line.len() as u64), line)
        .found;
    assert_eq!(found, vec![start("web")]);
}

#[test]
fn a_long_body_past_the_copy_is_skipped_and_a_head_there_loses_the_thread() {
    let mut streams = RuntimeStreams::default();
    let head = b"POST /containers/create HTTP/1.1\r\nContent-Length: 1000\r\n\r\n";
    assert!(found_in(&mut streams, head.len() as u64, head).is_empty());
    // 1000 body bytes sent, 10 copied.
    assert!(found_in(&mut streams, 1000, &[b'x'; 10]).is_empty());
    // The next request, in a send's second buffer (the kernel reads only the first).
    let line = b"POST /containers/web/start HTTP/1.1\r\n\r\n";
    assert_eq!(
        streams
            .buffer(JOB, 1, 1, Some(line.len() as u64), line)
            .found,
        vec![start("web")]
    );
    // A send whose uncopied part goes past the body: lost, then picked up again at the
    // next request line at a line's start.
    assert!(found_in(&mut streams, head.len() as u64, head).is_empty());
    assert!(found_in(&mut streams, 2000, &[b'x'; 10]).is_empty());
    let mut resumed = b"junk\r\n".to_vec();
    resumed.extend_from_slice(line);
    assert_eq!(
        found_in(&mut streams, resumed.len() as u64, &resumed),
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
    assert!(found_in(&mut streams, 8, b"POST /co").is_empty());
    streams.connected(1);
    let whole = format!("POST /containers/{ID}/start HTTP/1.1\r\n\r\n");
    // Read by the kernel where it was sent: not found again.
    assert!(
        streams
            .buffer(JOB, 1, 0, Some(whole.len() as u64), whole.as_bytes())
            .found
            .is_empty()
    );
}

#[test]
fn bytes_nothing_could_copy_are_unread_unless_a_body_holds_them() {
    let mut streams = RuntimeStreams::default();
    // Between requests: a request could be among them.
    assert_eq!(
        streams.buffer(JOB, 1, 0, Some(100), b""),
        Read {
            found: vec![],
            unread: true,
            heads: 0,
        }
    );
    // Lost: so could one.
    assert!(streams.buffer(JOB, 1, 0, Some(100), b"").unread);
    // Picked up again at a request (in a later buffer: the kernel did not read it).
    let line = b"POST /containers/web/start HTTP/1.1\r\n\r\n";
    assert_eq!(
        streams
            .buffer(JOB, 1, 1, Some(line.len() as u64), line)
            .found,
        vec![start("web")]
    );
    // A body sent from a file: its length is known, nothing can hide there.
    let head = b"POST /images/load HTTP/1.1\r\nContent-Length: 5000\r\n\r\n";
    assert!(
        !streams
            .buffer(JOB, 1, 0, Some(head.len() as u64), head)
            .unread
    );
    assert!(!streams.buffer(JOB, 1, 0, Some(5000), b"").unread);
    // Past the body's end: unread.
    assert!(
        !streams
            .buffer(JOB, 1, 0, Some(head.len() as u64), head)
            .unread
    );
    assert!(streams.buffer(JOB, 1, 0, Some(5001), b"").unread);
}

#[test]
fn a_long_buffer_copied_in_part_is_unread_where_a_request_could_hide_past_the_copy() {
    let copy = RUNTIME_SENT_BYTES;
    // A head longer than the copy, then a start pipelined after it in the same buffer.
    let mut padded = b"GET /_ping HTTP/1.1\r\nX-Pad: ".to_vec();
    padded.resize(copy + 100, b'a');
    padded.extend_from_slice(b"\r\n\r\nPOST /containers/web/start HTTP/1.1\r\n\r\n");
    let mut streams = RuntimeStreams::default();
    let read = streams.buffer(JOB, 1, 0, Some(padded.len() as u64), &padded[..copy]);
    assert_eq!(
        read,
        Read {
            found: vec![],
            unread: true,
            heads: 0,
        }
    );
    // A start found in the copy still counts when the gap after it is unread.
    let mut two = b"POST /containers/web/start HTTP/1.1\r\n\r\nGET /x HTTP/1.1\r\nX: ".to_vec();
    two.resize(copy + 10, b'a');
    let mut streams = RuntimeStreams::default();
    let read = streams.buffer(JOB, 1, 1, Some(copy as u64 + 10), &two[..copy]);
    assert_eq!(read.found, vec![start("web")]);
    assert!(read.unread);
    // A long body, or a chunk's data ending with the buffer, is only a body.
    let mut streams = RuntimeStreams::default();
    let head = b"POST /containers/create HTTP/1.1\r\nContent-Length: 20000\r\n\r\n";
    let mut body = head.to_vec();
    body.resize(head.len() + 20000, b'{');
    let read = streams.buffer(JOB, 1, 0, Some(body.len() as u64), &body[..copy]);
    assert_eq!(
        read,
        Read {
            heads: 1,
            ..Read::default()
        }
    );
    let chunked = b"PUT /containers/x/archive HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
    let mut streams = RuntimeStreams::default();
    assert!(
        !streams
            .buffer(JOB, 1, 0, Some(chunked.len() as u64), chunked)
            .unread
    );
    let size = b"4e20\r\n";
    assert!(
        !streams
            .buffer(JOB, 1, 0, Some(size.len() as u64), size)
            .unread
    );
    // 20000 bytes of data and the CRLF after them, as one long write.
    let data = vec![b'x'; copy];
    assert!(!streams.buffer(JOB, 1, 0, Some(20002), &data).unread);
    let last = b"0\r\n\r\nPOST /containers/web/start HTTP/1.1\r\n\r\n";
    let read = streams.buffer(JOB, 1, 0, Some(last.len() as u64), last);
    assert_eq!(read.found, vec![start("web")]);
    // An attached stdin comes in long writes after its request: not a finding.
    let mut streams = RuntimeStreams::default();
    let attach = format!("POST /containers/{ID}/attach?stdin=1 HTTP/1.1\r\n\r\n");
    assert!(
        !streams
            .buffer(JOB, 1, 0, Some(attach.len() as u64), attach.as_bytes())
            .unread
    );
    let stdin = vec![b'y'; copy];
    assert!(!streams.buffer(JOB, 1, 0, Some(32768), &stdin).unread);
}

#[test]
fn bytes_nothing_read_are_unread_with_their_length_or_without() {
    // Without: a `sendmmsg`'s later messages, iovecs the kernel could not read, an io_uring
    // splice where the kernel's layout did not give the length, an io_uring send from a
    // provided buffer. With: a splice or sendfile of 90 bytes.
    for (buffer, len) in [(5, None), (4, None), (0, None), (0, Some(90))] {
        let mut streams = RuntimeStreams::default();
        assert!(streams.sent(JOB, 1, buffer, len, b"").unread, "{len:?}");
    }
}

#[test]
fn any_upper_case_method_is_a_request_and_an_upgrade_header_alone_takes_nothing_over() {
    // A made-up method and an Upgrade header: the daemon answers both and reads on.
    let s = "GET /_ping HTTP/1.1\r\nUpgrade: tcp\r\n\r\n\
             OPTIONS /x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc\
             POST /containers/web/start HTTP/1.1\r\n\r\n";
    assert_eq!(writes(&[s.as_bytes()]), vec![start("web")]);
    // Where the thread was lost, a line is a request only whole and ending in HTTP/1.x.
    assert!(is_request_line(b"PATCH /containers/x HTTP/1.1\r\n"));
    assert!(!is_request_line(b"GET /etc/passwd\n"));
    assert!(!is_request_line(b"cd /tmp HTTP/1.1\n"));
    assert!(!is_request_line(b"POST /containers/x/start HTTP/1.1"));
    // An upgraded session is taken over: a line after it is read only at a line's start.
    let session = "POST /session HTTP/1.1\r\nUpgrade: h2c\r\n\r\n\
                   POST /containers/web/start HTTP/1.1\r\n\r\n";
    assert_eq!(writes(&[session.as_bytes()]), vec![start("web")]);
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

#[test]
fn a_build_request_is_found_however_it_is_sent_and_only_a_post() {
    let build = Found {
        job: JOB,
        reference: String::new(),
        action: Action::Build,
    };
    // The docker CLI's, whole in one write (the kernel does not read builds).
    let cli = b"POST /v1.41/build?buildargs=%7B%7D&t=x HTTP/1.1\r\nHost: d\r\n\
                Content-Type: application/x-tar\r\nContent-Length: 3\r\n\r\nabc";
    assert_eq!(writes(&[cli]), vec![build.clone()]);
    // Unversioned, percent-encoded, cut across writes.
    let line = b"POST /b%75ild HTTP/1.1\r\nHost: d\r\n\r\n";
    let (a, b) = line.split_at(9);
    assert_eq!(writes(&[a, b]), vec![build]);
    // buildx's docker driver: BuildKit's gRPC API over an upgraded connection.
    let grpc = b"POST /grpc HTTP/1.1\r\nHost: d\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n";
    let mut streams = RuntimeStreams::default();
    let read = streams.buffer(JOB, 1, 0, Some(grpc.len() as u64), grpc);
    assert_eq!((read.found.len(), read.heads), (1, 1));
    assert_eq!(read.found[0].action, Action::Build);
    // Not a build: another method, another path.
    assert_eq!(writes(&[b"GET /build HTTP/1.1\r\nHost: d\r\n\r\n"]), vec![]);
    assert_eq!(
        writes(&[b"POST /builds HTTP/1.1\r\nHost: d\r\n\r\n"]),
        vec![]
    );
}

#[test]
fn an_inspect_by_name_or_short_id_is_found_for_the_exec_after_it() {
    let inspect = |reference: &str| Found {
        job: JOB,
        reference: reference.to_owned(),
        action: Action::Inspect,
    };
    // What `docker exec web` sends before its exec (Docker 20.10's CLI).
    let cli = b"HEAD /_ping HTTP/1.1\r\nHost: docker\r\n\r\n\
        GET /v1.41/containers/web/json HTTP/1.1\r\nHost: docker\r\n\r\n";
    assert_eq!(writes(&[cli]), vec![inspect("web")]);
    let short = b"GET /containers/3f2a9c/json HTTP/1.1\r\n\r\n";
    assert_eq!(writes(&[short]), vec![inspect("3f2a9c")]);
    // A full id needs no look-up; other paths and methods are not inspects.
    let by_id = format!("GET /containers/{ID}/json HTTP/1.1\r\n\r\n");
    for other in [
        by_id.as_bytes(),
        b"GET /containers/web/top HTTP/1.1\r\n\r\n",
        b"GET /containers/json HTTP/1.1\r\n\r\n",
        b"POST /containers/web/json HTTP/1.1\r\n\r\n",
        b"GET /containers/a%2Fb/json HTTP/1.1\r\n\r\n",
    ] {
        assert_eq!(
            writes(&[other]),
            vec![],
            "{}",
            String::from_utf8_lossy(other)
        );
    }
}
