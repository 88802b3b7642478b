//! The first data segment of a job's TCP socket, through the ClientHello parser the kernel's
//! `packet_egress` program runs (`runner_monitor_common::tls::find_server_name`), checked
//! against an independent TLS parser (rusticata's `tls-parser`). The first input byte is where
//! the record starts in the segment (the kernel passes the TCP payload's offset); the rest is
//! the segment.
//!
//! Properties: a server name found lies inside the segment, after the record's start, and is
//! not empty; a segment that does not start a TLS 1.x handshake record is `NotTls`; whenever
//! `tls-parser` reads a whole ClientHello record whose well-formed `server_name` extension is
//! among the first `MAX_TLS_EXTENSIONS` extensions, the kernel's parser finds exactly that host
//! name, and where it reads a well-formed extensions block without one, none.

#![no_main]

use libfuzzer_sys::fuzz_target;
use runner_monitor_common::tls::{ClientHello, MAX_TLS_EXTENSIONS, find_server_name};
use tls_parser::{
    SNIType, TlsExtension, TlsMessage, TlsMessageHandshake, parse_tls_extension,
    parse_tls_plaintext,
};

/// What `tls-parser` reads from a ClientHello record at the start of `record`: `Some(Some(name))`
/// for a well-formed `server_name` extension among the kernel's first `MAX_TLS_EXTENSIONS`,
/// `Some(None)` for a well-formed extensions block without one, `None` when it cannot judge (a
/// malformed extension before the name, where the kernel may differ by design: it skips what it
/// does not read).
fn reference(record: &[u8]) -> Option<Option<Vec<u8>>> {
    let (_, plaintext) = parse_tls_plaintext(record).ok()?;
    let Some(TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello))) =
        plaintext.msg.first()
    else {
        return None;
    };
    let mut rest = hello.ext?;
    for _ in 0..MAX_TLS_EXTENSIONS {
        if rest.is_empty() {
            return Some(None);
        }
        let (after, extension) = parse_tls_extension(rest).ok()?;
        let data_len = rest.len() - after.len() - 4;
        rest = after;
        if let TlsExtension::SNI(names) = extension {
            // RFC 6066 (and OpenSSL): the name list fills the extension. tls-parser tolerates
            // bytes after it; the kernel, like servers, reads no name from such an extension.
            let list: usize = names.iter().map(|(_, name)| 3 + name.len()).sum();
            if list + 2 != data_len {
                return None;
            }
            // The kernel takes the first entry, and only a host_name.
            return match names.first() {
                Some((kind, name)) if *kind == SNIType::HostName && !name.is_empty() => {
                    Some(Some(name.to_vec()))
                }
                _ => None,
            };
        }
    }
    None
}

fuzz_target!(|input: &[u8]| {
    let Some((&start, segment)) = input.split_first() else {
        return;
    };
    let start = u32::from(start);
    let found = find_server_name(segment, start);
    let record = segment.get(start as usize..).unwrap_or_default();
    match found {
        ClientHello::ServerName { offset, len } => {
            assert!(len > 0 && offset > start, "{offset} {len} from {start}");
            assert!((offset + len) as usize <= segment.len(), "past the segment");
        }
        ClientHello::NotTls => assert!(
            !(record.first() == Some(&0x16) && record.get(1) == Some(&3)),
            "a handshake record called not TLS"
        ),
        ClientHello::NoServerName => {}
    }
    if record.get(1) != Some(&3) {
        return;
    }
    if let Some(expected) = reference(record) {
        let got = match found {
            ClientHello::ServerName { offset, len } => {
                Some(segment[offset as usize..(offset + len) as usize].to_vec())
            }
            _ => None,
        };
        assert_eq!(got, expected, "the kernel's parser and tls-parser disagree");
    }
});
