//! A control-socket request line, as a peer (root or the runner user, possibly a job process
//! acting through a hook) writes it, through `job::control::parse_request`.
//!
//! Properties: an admitted request serialises and reads back equal (the client and the agent
//! agree on it), oversized lines are refused, and the error response the peer gets is one JSON
//! line with no raw control character.

#![no_main]

use libfuzzer_sys::fuzz_target;
use runner_monitor::{
    job::control::{MAX_REQUEST, Request, Response, parse_request},
    output::jsonl,
};

fuzz_target!(|line: &[u8]| {
    match parse_request(line) {
        Ok(request) => {
            assert!(line.len() <= MAX_REQUEST);
            let again = serde_json::to_vec(&request).expect("serialises");
            let back: Request = serde_json::from_slice(&again).expect("reads back");
            assert_eq!(back, request);
        }
        Err(message) => {
            let reply = jsonl::line_string(&Response::error(message.clone())).expect("JSON");
            assert!(
                !reply.contains(|c: char| c.is_control()),
                "raw control character in {reply:?}"
            );
            let back: Response = serde_json::from_str(&reply).expect("reads back");
            assert_eq!(back.error.as_deref(), Some(message.as_str()));
        }
    }
});
