//! A tiny authoritative DNS server and a DNS client for the block-mode DNS tests
//! (`job-step dns-serve`, `job-step dns`), built on hickory-proto like the agent.
//!
//! The zone: `allowed.test` and `glibc.allowed.test` have an address each, `www.allowed.test`
//! is a CNAME to `edge.cdn.test` (a name no allowlist holds) which has one, `denied.test` has
//! one; `whoami.allowed.test` has the address of the server that answers (which server a query
//! reached); every other name is NXDOMAIN.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, Query, ResponseCode},
    rr::{Name, RData, Record, RecordType, rdata},
};

pub const ALLOWED: Ipv4Addr = Ipv4Addr::new(10, 215, 0, 3);
pub const DENIED: Ipv4Addr = Ipv4Addr::new(10, 215, 0, 4);
pub const CNAME_TARGET: Ipv4Addr = Ipv4Addr::new(10, 215, 0, 5);
pub const GLIBC: Ipv4Addr = Ipv4Addr::new(10, 215, 0, 6);
/// TTL of every record: shorter than the agent's floor, so the floor is what admits.
const TTL: u32 = 1;

fn name(s: &str) -> Name {
    Name::from_ascii(s).expect("a DNS name")
}

/// The answer of the test zone to `query`, given by the server at `server`.
pub fn zone_answer(query: &[u8], server: IpAddr) -> Option<Vec<u8>> {
    let query = Message::from_vec(query).ok()?;
    let question = query.queries().first()?.clone();
    let mut response = Message::new();
    response
        .set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_recursion_desired(query.recursion_desired())
        .set_authoritative(true);
    response.add_query(question.clone());
    let asked = question.name().to_lowercase().to_utf8();
    let a =
        |owner: &str, ip: Ipv4Addr| Record::from_rdata(name(owner), TTL, RData::A(rdata::A(ip)));
    let records: Vec<Record> = match asked.as_str() {
        "allowed.test." => vec![a("allowed.test.", ALLOWED)],
        "glibc.allowed.test." => vec![a("glibc.allowed.test.", GLIBC)],
        "denied.test." => vec![a("denied.test.", DENIED)],
        "whoami.allowed.test." => match server {
            IpAddr::V4(ip) => vec![a("whoami.allowed.test.", ip)],
            IpAddr::V6(_) => Vec::new(),
        },
        "www.allowed.test." => vec![
            Record::from_rdata(
                name("www.allowed.test."),
                TTL,
                RData::CNAME(rdata::CNAME(name("edge.cdn.test."))),
            ),
            a("edge.cdn.test.", CNAME_TARGET),
        ],
        _ => {
            response.set_response_code(ResponseCode::NXDomain);
            Vec::new()
        }
    };
    // Only A records for A questions; other types get an empty NOERROR answer.
    if question.query_type() == RecordType::A {
        response.add_answers(records);
    }
    response.to_vec().ok()
}

/// Serves the test zone over UDP and TCP on `addr` until the process is killed.
pub fn serve(addr: SocketAddr) {
    let udp = UdpSocket::bind(addr).expect("bind udp 53");
    let tcp = TcpListener::bind(addr).expect("bind tcp 53");
    std::thread::spawn(move || {
        for stream in tcp.incoming().flatten() {
            std::thread::spawn(move || serve_tcp(stream, addr.ip()));
        }
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((n, peer)) = udp.recv_from(&mut buf) {
            if let Some(answer) = zone_answer(&buf[..n], addr.ip()) {
                let _ = udp.send_to(&answer, peer);
            }
        }
    });
}

fn serve_tcp(mut stream: TcpStream, server: IpAddr) {
    loop {
        let mut len = [0u8; 2];
        if stream.read_exact(&mut len).is_err() {
            return;
        }
        let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if stream.read_exact(&mut query).is_err() {
            return;
        }
        let Some(answer) = zone_answer(&query, server) else {
            return;
        };
        let mut out = (answer.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&answer);
        if stream.write_all(&out).is_err() {
            return;
        }
    }
}

/// Asks `server` for the A records of `qname`, over `how`: `udp` (a connected socket, as
/// glibc), `udp-retry` (the same, sent again after each second without an answer, three times
/// at most, as resolvers do; an error ends it), `udp-send` (an unconnected one, `sendto`, as musl) or `tcp`. A UDP answer must come
/// from `server`, as clients check. Returns the response code and the addresses.
pub fn ask(how: &str, server: SocketAddr, qname: &str) -> std::io::Result<(String, Vec<IpAddr>)> {
    let mut query = Message::new();
    query
        .set_id(std::process::id() as u16)
        .set_message_type(MessageType::Query)
        .set_recursion_desired(true);
    query.add_query(Query::query(name(qname), RecordType::A));
    let bytes = query.to_vec().map_err(std::io::Error::other)?;
    let timeout = Some(Duration::from_secs(5));
    let answer = match how {
        // `udp-from=IP`: connected, from a socket bound to IP first.
        how if how == "udp"
            || how == "udp-send"
            || how == "udp-retry"
            || how.starts_with("udp-from=") =>
        {
            let any = if server.is_ipv6() {
                "[::]:0"
            } else {
                "0.0.0.0:0"
            };
            let socket = match how.strip_prefix("udp-from=") {
                Some(ip) => {
                    UdpSocket::bind((ip.parse::<IpAddr>().map_err(std::io::Error::other)?, 0))?
                }
                None => UdpSocket::bind(any)?,
            };
            let retry = how == "udp-retry";
            let sends = if retry { 3 } else { 1 };
            if retry {
                socket.set_read_timeout(Some(Duration::from_secs(1)))?;
            } else {
                socket.set_read_timeout(timeout)?;
            }
            if how != "udp-send" {
                socket.connect(server)?;
            }
            let mut buf = vec![0u8; 4096];
            let mut received = Err(std::io::ErrorKind::TimedOut.into());
            for _ in 0..sends {
                if how == "udp-send" {
                    socket.send_to(&bytes, server)?;
                } else {
                    socket.send(&bytes)?;
                }
                received = socket.recv_from(&mut buf);
                // Only silence is answered by a resend: an error (a refused port) ends it.
                let silence = received.as_ref().is_err_and(|e| {
                    matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    )
                });
                if !silence {
                    break;
                }
            }
            let (n, from) = received?;
            if from != server {
                return Err(std::io::Error::other(format!(
                    "answer from {from}, not {server}"
                )));
            }
            buf.truncate(n);
            buf
        }
        "tcp" => {
            let mut stream = TcpStream::connect_timeout(&server, Duration::from_secs(5))?;
            stream.set_read_timeout(timeout)?;
            let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
            out.extend_from_slice(&bytes);
            stream.write_all(&out)?;
            let mut len = [0u8; 2];
            stream.read_exact(&mut len)?;
            let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
            stream.read_exact(&mut buf)?;
            buf
        }
        other => panic!("unknown DNS transport {other}"),
    };
    let response = Message::from_vec(&answer).map_err(std::io::Error::other)?;
    let addrs = response
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
        .collect();
    Ok((format!("{:?}", response.response_code()), addrs))
}
