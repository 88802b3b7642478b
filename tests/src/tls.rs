//! TLS for the server-name tests (`tests/tests/egress_tls.rs`): a real ClientHello from rustls,
//! and a server that answers one byte to whatever it receives first.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::Arc,
    time::Duration,
};

/// The first flight rustls sends for `server`: one ClientHello record. A host name is sent as
/// its SNI; an IP address (which TLS never names) gives a ClientHello without one.
pub fn client_hello(server: &str) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("rustls protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(server.to_owned()).expect("a server name");
    let mut connection =
        rustls::ClientConnection::new(Arc::new(config), name).expect("a TLS client");
    let mut out = Vec::new();
    while connection.wants_write() {
        connection
            .write_tls(&mut out)
            .expect("writing the ClientHello");
    }
    out
}

/// Connects to `addr`, sends `first` and waits up to 3 s for the server's one-byte answer:
/// `answered` (the server received the bytes), `silent` (nothing came back: the segment never
/// reached it) or `errno N`.
pub fn send_first(addr: SocketAddr, first: &[u8]) -> String {
    let attempt = || -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        stream.write_all(first)?;
        answer_within(&mut stream, 3)
    };
    attempt().unwrap_or_else(|e| errno(&e))
}

/// The server's one-byte answer on `stream` within `seconds`: `answered`, `closed`, or `silent`
/// (nothing came back).
fn answer_within(stream: &mut TcpStream, seconds: u64) -> std::io::Result<String> {
    stream.set_read_timeout(Some(Duration::from_secs(seconds)))?;
    let mut answer = [0u8; 1];
    match stream.read(&mut answer) {
        Ok(1) => Ok("answered".to_owned()),
        Ok(_) => Ok("closed".to_owned()),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Ok("silent".to_owned())
        }
        Err(e) => Err(e),
    }
}

fn errno(e: &std::io::Error) -> String {
    format!("errno {}", e.raw_os_error().unwrap_or(-1))
}

/// A connection that lives across an agent's restart: connects to `addr`, and sends `first`
/// before (`when` is `before`) or after (`after`) the file `go` appears; prints a line per phase:
/// `connected` or `sent` (and then `silent` or `answered` after waiting 2 s for the answer), and
/// once `go` is there (waited for up to 60 s), `answered`, `silent` (nothing within 10 s, the time
/// for a few TCP retransmissions) or `closed`.
pub fn held_across(addr: SocketAddr, first: &[u8], go: &std::path::Path, when: &str) {
    let say = |line: &str| {
        println!("{line}");
        let _ = std::io::stdout().flush();
    };
    let answer = |stream: &mut TcpStream, within: u64| {
        answer_within(stream, within).unwrap_or_else(|e| errno(&e))
    };
    let mut stream = match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
        Ok(stream) => stream,
        Err(e) => return say(&errno(&e)),
    };
    if when == "before" {
        stream.write_all(first).expect("sending");
        say("sent");
        say(&answer(&mut stream, 2));
    } else {
        say("connected");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !go.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if when != "before" {
        stream.write_all(first).expect("sending");
    }
    say(&answer(&mut stream, 10));
}

/// Accepts TCP connections on `addr` and answers `!` to the first bytes of each.
pub fn answer_first_bytes(addr: &str) {
    let listener = TcpListener::bind(addr).expect("bind tcp");
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                if matches!(stream.read(&mut buf), Ok(n) if n > 0) {
                    let _ = stream.write_all(b"!");
                }
                let _ = stream.read(&mut buf);
            });
        }
    });
}
