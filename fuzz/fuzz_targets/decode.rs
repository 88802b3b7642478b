//! One ring-buffer record, as the kernel would hand it to the agent, through `Decoder::decode`.
//!
//! Properties beyond "no panic": every string taken from a kernel buffer is no longer (in chars)
//! than that buffer, and the event's JSON line (`output::jsonl`, the `--events-out` format) has no
//! raw control character and reads back as the same event (bytes sent to a runtime's API read
//! back as none: they are written as their length).

#![no_main]

use libfuzzer_sys::fuzz_target;
use runner_monitor::{
    event::{Event, EventDetail},
    output::jsonl,
    sensor::{decode::Decoder, paths::WorkingDirectories},
};
use runner_monitor_common::{ARGV_LEN, COMM_LEN, PATH_LEN, UNIX_PATH_LEN};

fn at_most(what: &str, s: &str, limit: usize) {
    let chars = s.chars().count();
    assert!(chars <= limit, "{what}: {chars} chars > {limit}: {s:?}");
}

fuzz_target!(|record: &[u8]| {
    // No /proc: what the decoder knows comes from the record alone (deterministic).
    let mut decoder =
        Decoder::with_working_directories(WorkingDirectories::with_proc_root("/nonexistent"));
    let Ok(event) = decoder.decode(record) else {
        return;
    };
    at_most("comm", &event.process.comm, COMM_LEN);
    match &event.detail {
        EventDetail::Exec { filename, argv, .. } => {
            at_most("filename", filename, PATH_LEN);
            let total: usize = argv.iter().map(|a| a.chars().count() + 1).sum();
            assert!(total <= ARGV_LEN + 1, "argv of {total} chars: {argv:?}");
        }
        EventDetail::FileOpen(f)
        | EventDetail::FileRename(f)
        | EventDetail::FileUnlink(f)
        | EventDetail::FileLink(f) => {
            at_most("raw_path", &f.raw_path, PATH_LEN);
            // No working directory is known, so nothing is joined: resolving only shortens.
            at_most("path", &f.path, PATH_LEN);
            if let Some(new) = &f.new_path {
                at_most("new_path", new, PATH_LEN);
            }
            if f.resolved {
                assert!(
                    !f.path.contains("/../") && !f.path.ends_with("/.."),
                    "{f:?}"
                );
            }
        }
        EventDetail::Connect(c) => {
            if let Some(path) = &c.unix_path {
                at_most("unix_path", path, UNIX_PATH_LEN);
            }
        }
        EventDetail::Chdir { path, .. } => at_most("chdir", path, PATH_LEN),
        _ => {}
    }
    let line = jsonl::line_string(&event).expect("every event serialises");
    assert!(
        !line.contains(|c: char| c.is_control()),
        "raw control character in {line:?}"
    );
    let back: Event = serde_json::from_str(&line).expect("the JSON line reads back");
    // Bytes a job sent to a runtime are written as their length, never themselves: they read
    // back empty, and the line says how many there were.
    let mut expected = event.clone();
    if let EventDetail::RuntimeSent { data, .. } = &mut expected.detail {
        let len = data.0.len();
        assert!(
            line.contains(&format!("\"data\":{len}")),
            "sent bytes not written as their length: {line}"
        );
        *data = Default::default();
    }
    assert_eq!(back, expected, "JSON round trip changed the event: {line}");
});
