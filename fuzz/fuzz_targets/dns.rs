//! A DNS message as the kernel copies it from a job's packet (at most `DNS_LEN` bytes are copied,
//! but any length is tried), through `sensor::dns::parse`.
//!
//! Properties: the transaction id is the first two bytes; the result's JSON has no raw control
//! character and reads back equal; a parse error leaves no half-parsed questions or answers.

#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use libfuzzer_sys::fuzz_target;
use runner_monitor::{event::Dns, output::jsonl, sensor::dns};

fuzz_target!(|payload: &[u8]| {
    let parsed = dns::parse(payload, IpAddr::V4(Ipv4Addr::new(127, 0, 0, 53)), 53);
    if let [a, b, ..] = payload {
        assert_eq!(parsed.id, u16::from_be_bytes([*a, *b]));
    }
    if parsed.parse_error.is_some() {
        assert!(parsed.questions.is_empty() && parsed.answers.is_empty() && parsed.rcode.is_none());
    }
    let line = jsonl::line_string(&parsed).expect("serialises");
    assert!(
        !line.contains(|c: char| c.is_control()),
        "raw control character in {line:?}"
    );
    let back: Dns = serde_json::from_str(&line).expect("reads back");
    assert_eq!(back, parsed);
});
