//! DNS messages copied by the kernel, parsed with hickory-proto (the DNS library of the Rust
//! ecosystem: full wire-format support, compression pointers and all, and fuzzed upstream).

use hickory_proto::{
    op::{Message, MessageType},
    rr::RData,
};

use crate::event::{Dns, DnsQuestion, DnsRecord};

/// Parses a DNS message. A malformed one still gives an event (with `parse_error`), since a
/// malformed message on port 53 is itself worth seeing.
pub fn parse(payload: &[u8], server_ip: std::net::IpAddr, server_port: u16) -> Dns {
    let mut dns = Dns {
        server_ip,
        server_port,
        id: if payload.len() >= 2 {
            u16::from_be_bytes([payload[0], payload[1]])
        } else {
            0
        },
        rcode: None,
        questions: Vec::new(),
        answers: Vec::new(),
        parse_error: None,
    };
    let message = match Message::from_vec(payload) {
        Ok(message) => message,
        Err(error) => {
            dns.parse_error = Some(error.to_string());
            return dns;
        }
    };
    if message.message_type() == MessageType::Response {
        dns.rcode = Some(message.response_code().to_str().to_owned());
    }
    dns.questions = message
        .queries()
        .iter()
        .map(|q| DnsQuestion {
            name: q.name().to_utf8(),
            record_type: q.query_type().to_string(),
        })
        .collect();
    dns.answers = message
        .answers()
        .iter()
        .map(|r| DnsRecord {
            name: r.name().to_utf8(),
            record_type: r.record_type().to_string(),
            ttl: r.ttl(),
            data: match r.data() {
                RData::A(a) => a.0.to_string(),
                RData::AAAA(aaaa) => aaaa.0.to_string(),
                RData::CNAME(cname) => cname.0.to_utf8(),
                other => other.record_type().to_string(),
            },
        })
        .collect();
    dns
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use hickory_proto::{
        op::{Message, MessageType, Query},
        rr::{Name, RData, Record, RecordType, rdata},
    };

    use super::*;

    fn server() -> IpAddr {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    }

    #[test]
    fn answer_with_cname_and_addresses_is_decoded() {
        let name = Name::from_ascii("api.example.test.").unwrap();
        let target = Name::from_ascii("edge.example.test.").unwrap();
        let mut message = Message::new();
        message
            .set_id(0x1234)
            .set_message_type(MessageType::Response);
        message.add_query(Query::query(name.clone(), RecordType::A));
        message.add_answer(Record::from_rdata(
            name.clone(),
            60,
            RData::CNAME(rdata::CNAME(target.clone())),
        ));
        message.add_answer(Record::from_rdata(
            target.clone(),
            30,
            RData::A(rdata::A(Ipv4Addr::new(10, 1, 2, 3))),
        ));
        message.add_answer(Record::from_rdata(
            target,
            30,
            RData::AAAA(rdata::AAAA(Ipv6Addr::LOCALHOST)),
        ));
        let bytes = message.to_vec().unwrap();

        let dns = parse(&bytes, server(), 53);
        assert_eq!(dns.id, 0x1234);
        assert_eq!(dns.rcode.as_deref(), Some("No Error"));
        assert_eq!(dns.questions[0].name, "api.example.test.");
        assert_eq!(dns.questions[0].record_type, "A");
        let data: Vec<&str> = dns.answers.iter().map(|a| a.data.as_str()).collect();
        assert_eq!(data, ["edge.example.test.", "10.1.2.3", "::1"]);
        assert_eq!(dns.parse_error, None);
    }

    #[test]
    fn garbage_gives_a_parse_error_not_a_panic() {
        let dns = parse(&[0xab, 0xcd, 0xff, 0xff, 0xff], server(), 53);
        assert_eq!(dns.id, 0xabcd);
        assert!(dns.parse_error.is_some());
        let dns = parse(&[], server(), 53);
        assert!(dns.parse_error.is_some());
    }
}
