use super::*;
use crate::docker_api::fake::{answering, answering_each};

const LIST: &str = "HTTP/1.0 200 OK\r\n\r\n[\
    {\"Id\":\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\",\"Names\":[\"/web.2\"]},\
    {\"Id\":\"bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\",\"Names\":[\"/web\"]}]";

#[test]
fn a_name_is_asked_as_an_anchored_pattern_and_only_the_exact_name_is_taken() {
    let (_guard, socket, request) = answering(LIST);
    let id = container_named(&socket, "web").unwrap();
    assert_eq!(id.as_deref(), Some("b".repeat(64).as_str()));
    let request = request.recv().unwrap();
    assert!(
        request.starts_with(
            "GET /containers/json?all=1&filters=%7B%22name%22%3A%5B%22%5E%2F%3Fweb%24%22%5D%7D "
        ),
        "{request}"
    );

    // A dot is escaped: `web.2` must not match `webx2`.
    let (_guard, socket, request) = answering(LIST);
    let id = container_named(&socket, "web.2").unwrap();
    assert_eq!(id.as_deref(), Some("a".repeat(64).as_str()));
    let request = request.recv().unwrap();
    assert!(request.contains("%5E%2F%3Fweb%5C.2%24"), "{request}");
}

#[test]
fn an_exec_reference_is_a_name_first_then_an_unambiguous_id_prefix() {
    // A name: the daemon's list by name answers, and nothing else is asked.
    let (_guard, socket, requests) = answering_each(&[LIST]);
    let id = container_referenced(&socket, "web").unwrap();
    assert_eq!(id.as_deref(), Some("b".repeat(64).as_str()));
    assert!(requests.recv().unwrap().contains("%22name%22"));
    assert!(requests.try_recv().is_err());

    // A short id no container is named: the list by id prefix, which must be unique.
    const NONE: &str = "HTTP/1.0 200 OK\r\n\r\n[]";
    let (_guard, socket, requests) = answering_each(&[NONE, LIST]);
    let id = container_referenced(&socket, "aaaa").unwrap();
    assert_eq!(id.as_deref(), Some("a".repeat(64).as_str()));
    let _ = requests.recv().unwrap();
    assert!(
        requests
            .recv()
            .unwrap()
            .starts_with("GET /containers/json?all=1&filters=%7B%22id%22%3A%5B%22aaaa%22%5D%7D ")
    );
    const TWO: &str = "HTTP/1.0 200 OK\r\n\r\n[\
        {\"Id\":\"abababababababababababababababababababababababababababababababab\",\"Names\":[\"/x\"]},\
        {\"Id\":\"abcdabcdabcdabcdabcdabcdabcdabcdabcdabcdabcdabcdabcdabcdabcdabcd\",\"Names\":[\"/y\"]}]";
    let (_guard, socket, _requests) = answering_each(&[NONE, TWO]);
    assert_eq!(container_referenced(&socket, "ab").unwrap(), None);
    // Not hex, not a name: no second question.
    let (_guard, socket, requests) = answering_each(&[NONE]);
    assert_eq!(container_referenced(&socket, "postgres").unwrap(), None);
    let _ = requests.recv().unwrap();
    assert!(requests.try_recv().is_err());
}

/// `exec` for job 7's exec of `web` at `socket`: the ids `register` was given, in order,
/// each with how many requests the daemon (`requests`) had had by then.
fn exec_marks(
    socket: &Path,
    looked_up: &mut LookedUp,
    requests: mpsc::Receiver<String>,
) -> Vec<(String, usize)> {
    let marks = Arc::new(Mutex::new(Vec::new()));
    let seen = marks.clone();
    let mut asked = 0;
    let mut register: Register = Box::new(move |id, job, _| {
        assert_eq!(job, JobKey(7));
        asked += requests.try_iter().count();
        seen.lock().unwrap().push((id.to_owned(), asked));
        Ok(true)
    });
    let start = Start {
        socket: socket.into(),
        reference: "web".into(),
        job: JobKey(7),
        asked: Asked::Exec { requested_ns: 1 },
    };
    exec(&start, monotonic_ns(), &mut register, looked_up);
    marks.lock().unwrap().clone()
}

#[test]
fn an_exec_is_marked_from_the_jobs_inspect_before_the_daemon_is_asked_again() {
    let (b, a) = ("b".repeat(64), "a".repeat(64));
    // Inspected just before, and the daemon still names the same container: one mark, made
    // before the daemon's second answer.
    let (_guard, socket, requests) = answering_each(&[LIST]);
    let mut looked_up = LookedUp::new(4);
    let key = |socket: &Path| (socket.to_owned(), JobKey(7), "web".to_owned());
    looked_up.insert(key(&socket), (b.clone(), monotonic_ns()));
    assert_eq!(
        exec_marks(&socket, &mut looked_up, requests),
        vec![(b.clone(), 0)]
    );
    assert!(looked_up.is_empty(), "an inspect's answer serves one exec");

    // Renamed in between: the container the daemon names now is marked too.
    let (_guard, socket, requests) = answering_each(&[LIST]);
    looked_up.insert(key(&socket), (a.clone(), monotonic_ns()));
    let marks = exec_marks(&socket, &mut looked_up, requests);
    assert_eq!(marks, vec![(a.clone(), 0), (b.clone(), 1)]);

    // Another job's inspect, or one too old, is not taken: the daemon is asked.
    for (job, at) in [(8, monotonic_ns()), (7, 1)] {
        let (_guard, socket, requests) = answering_each(&[LIST]);
        let mut looked_up = LookedUp::new(4);
        looked_up.insert((socket.clone(), JobKey(job), "web".into()), (a.clone(), at));
        let marks = exec_marks(&socket, &mut looked_up, requests);
        assert_eq!(marks, vec![(b.clone(), 1)], "job {job}, looked up at {at}");
    }
}

#[test]
fn an_inspects_answer_is_kept_for_the_job_and_reference() {
    let (_guard, socket, _requests) = answering_each(&[LIST]);
    let mut looked_up = LookedUp::new(4);
    look_up(&mut looked_up, (socket.clone(), JobKey(7), "web".into()));
    let kept = looked_up.get(&(socket, JobKey(7), "web".to_owned()));
    assert_eq!(
        kept.map(|(id, _)| id.as_str()),
        Some("b".repeat(64).as_str())
    );
}

#[test]
fn a_reference_the_kernel_would_not_pass_is_not_asked() {
    for name in ["", "a b", "../x", "x%22"] {
        assert_eq!(
            container_named(Path::new("/nonexistent"), name).unwrap(),
            None
        );
    }
}
