//! Memory access, egress, metadata, secret sockets, harvesting and tamper.

use super::*;

#[test]
fn memory_dump_of_the_runner_then_unknown_egress() {
    let mut t = Trace::new();
    t.start(1, 1, 100, "acme/app");
    t.exec(1, 1, 100, 1, &["Runner.Worker"]);
    t.fork(2, 1, 100, 101);
    t.feed(
        3,
        1,
        101,
        100,
        "python3",
        EventDetail::FileOpen(FileAccess {
            result: 5,
            matched: vec!["proc_memory".into()],
            target_pid: Some(100),
            ..FileAccess::at("/proc/100/mem")
        }),
    );
    t.feed(
        4,
        1,
        101,
        100,
        "python3",
        EventDetail::DnsAnswer(Dns::answer_a("exfil.example.net", "203.0.113.9")),
    );
    t.connect(5, 1, 101, "203.0.113.9", 443);
    assert_eq!(
        t.rules(),
        [RuleId::ProcessMemoryAccess, RuleId::UnexpectedEgress]
    );
    let mem = &t.findings[0];
    assert_eq!(mem.target.as_ref().unwrap().pid, 100);
    assert_eq!(
        mem.target.as_ref().unwrap().exe.as_deref(),
        Some("/usr/bin/Runner.Worker")
    );
    assert_eq!(mem.severity, Severity::Critical);
    let egress = &t.findings[1];
    let d = egress.destination.as_ref().unwrap();
    assert_eq!(d.dns_name.as_deref(), Some("exfil.example.net"));
    assert_eq!(d.port, 443);
    assert_eq!(egress.process.as_ref().unwrap().ancestry[0].pid, 100);
}

#[test]
fn egress_allowed_by_name_or_by_repository_rule_is_quiet() {
    let policy = Policy::parse(
        &format!(
            "{}\n[[rules]]\nrepository = \"acme/*\"\nallow_egress = [{{ cidr = \"198.51.100.0/24\", ports = [443] }}]\n",
            crate::policy::DEFAULT_POLICY
        ),
        "t.toml",
    )
    .unwrap();
    let mut t = Trace::with_policy(policy);
    t.start(1, 1, 100, "acme/app");
    t.feed(
        2,
        1,
        100,
        1,
        "git",
        EventDetail::DnsAnswer(Dns::answer_a("api.github.com", "140.82.112.5")),
    );
    t.connect(3, 1, 100, "140.82.112.5", 443);
    t.connect(3, 1, 100, "198.51.100.7", 443);
    assert!(t.findings.is_empty(), "{:#?}", t.findings);
    t.connect(4, 1, 100, "198.51.100.7", 22);
    assert_eq!(t.rules(), [RuleId::UnexpectedEgress]);
}

#[test]
fn metadata_runner_credentials_secret_sockets_harvesting_and_tamper() {
    let mut t = Trace::new();
    t.start(1, 1, 100, "acme/app");
    t.connect(2, 1, 100, "169.254.169.254", 80);
    t.open(3, 1, 100, "/home/runner/actions-runner/.credentials", false);
    t.feed(
        4,
        1,
        100,
        1,
        "docker",
        EventDetail::Connect(Connect::unix("/var/run/docker.sock")),
    );
    t.open(5, 1, 100, "/home/ci/.aws/credentials", false);
    t.open(5, 1, 100, "/home/ci/.kube/config", false);
    t.open(5, 1, 100, "/home/ci/.config/gh/hosts.yml", false);
    t.feed(
        6,
        1,
        100,
        1,
        "kill",
        EventDetail::Signal {
            target_pid: 4242,
            signal: 9,
            syscall: "kill".into(),
        },
    );
    t.feed(
        7,
        0,
        0,
        0,
        "agent",
        EventDetail::SensorStatus(SensorStatus {
            lost_events: 12,
            detached_probes: vec![],
            over_budget: vec![JobOverBudget {
                job: JobKey(9),
                id: Some("77/flood".into()),
                dropped: 10,
            }],
        }),
    );
    assert_eq!(
        t.rules(),
        [
            RuleId::MetadataEndpointAccess,
            RuleId::RunnerCredentialAccess,
            RuleId::SecretSocketAccess,
            RuleId::CredentialHarvesting,
            RuleId::AgentTamper,
            RuleId::SensorDegraded,
        ]
    );
    let harvest = t.only(RuleId::CredentialHarvesting);
    assert_eq!(harvest.kinds, ["aws", "gh", "kubernetes"]);
    assert_eq!(
        t.only(RuleId::SensorDegraded).summary,
        "the monitor is degraded: lost 12 events; job 77/flood over its event budget: 10 events \
         dropped"
    );
}

#[test]
fn an_entitled_secret_socket_is_quiet() {
    let policy = Policy::parse(
        &format!(
            "{}\n[[rules]]\nrepository = \"acme/*\"\nsecret_sockets = [\"docker\"]\n",
            crate::policy::DEFAULT_POLICY
        ),
        "t.toml",
    )
    .unwrap();
    let mut t = Trace::with_policy(policy);
    t.start(1, 1, 100, "acme/app");
    t.feed(
        2,
        1,
        100,
        1,
        "docker",
        EventDetail::Connect(Connect::unix("/run/docker.sock")),
    );
    assert!(t.findings.is_empty(), "{:#?}", t.findings);
}

/// A connect or UDP send as block mode reports it: refused in the kernel with EPERM.
fn refused(ip: &str, port: u16, udp_send: bool) -> EventDetail {
    let ip: std::net::IpAddr = ip.parse().unwrap();
    EventDetail::Connect(Connect {
        family: if ip.is_ipv4() {
            SocketFamily::Inet
        } else {
            SocketFamily::Inet6
        },
        ip: Some(ip),
        port: Some(port),
        unix_path: None,
        fd: -1,
        result: -1,
        io_uring: false,
        blocked: true,
        udp_send,
        raw_socket: None,
        via: None,
        dns_redirected: false,
        quic: false,
    })
}

#[test]
fn a_connection_block_mode_refused_is_unexpected_egress_marked_blocked_and_counted_so() {
    let mut t = Trace::new();
    t.start(1, 1, 100, "acme/app");
    t.feed(2, 1, 100, 1, "curl", refused("203.0.113.9", 443, false));
    t.feed(3, 1, 101, 1, "nc", refused("2001:db8::9", 53, true));
    t.feed(
        4,
        1,
        102,
        1,
        "curl",
        refused("64:ff9b::a9fe:a9fe", 80, false),
    );
    t.connect(5, 1, 103, "203.0.113.10", 443);
    assert_eq!(
        t.rules(),
        [
            RuleId::UnexpectedEgress,
            RuleId::UnexpectedEgress,
            RuleId::MetadataEndpointAccess,
            RuleId::UnexpectedEgress
        ]
    );
    let [tcp, udp, metadata, audited] = &t.findings[..] else {
        unreachable!()
    };
    assert!(tcp.blocked && udp.blocked && metadata.blocked && !audited.blocked);
    assert!(
        tcp.summary
            .contains("was refused a connection to 203.0.113.9 port 443 (block mode)"),
        "{}",
        tcp.summary
    );
    assert!(
        udp.summary.contains("was refused a UDP send to"),
        "{}",
        udp.summary
    );
    let json = serde_json::to_value(tcp).unwrap();
    assert_eq!(json["blocked"], true);
    assert!(
        serde_json::to_value(audited)
            .unwrap()
            .get("blocked")
            .is_none()
    );
    let stats = t.engine.stats();
    assert_eq!(stats.egress.get("blocked"), Some(&3));
    assert_eq!(stats.egress.get("unexpected"), Some(&1));
}

#[test]
fn a_rule_with_metadata_entitles_its_jobs_to_the_metadata_endpoint() {
    let policy = Policy::parse(
        &format!(
            "{}\n[[rules]]\nrepository = \"acme/cloud\"\nmetadata = true\n",
            crate::policy::DEFAULT_POLICY
        ),
        "t.toml",
    )
    .unwrap();
    let mut t = Trace::with_policy(policy);
    t.start(1, 1, 100, "acme/cloud");
    t.connect(2, 1, 100, "169.254.169.254", 80);
    assert!(t.findings.is_empty(), "{:#?}", t.findings);
    t.start(3, 2, 200, "acme/app");
    t.connect(4, 2, 200, "169.254.169.254", 80);
    assert_eq!(t.rules(), [RuleId::MetadataEndpointAccess]);
}

#[test]
fn a_raw_packet_or_icmp_socket_is_unexpected_egress_refused_in_block_mode() {
    use crate::event::{RawSocket, RawSocketKind};
    let raw = |family, kind, protocol, blocked| {
        EventDetail::Connect(Connect {
            family,
            ip: None,
            port: None,
            unix_path: None,
            fd: -1,
            result: if blocked { -1 } else { 0 },
            io_uring: false,
            blocked,
            udp_send: false,
            raw_socket: Some(RawSocket { kind, protocol }),
            via: None,
            dns_redirected: false,
            quic: false,
        })
    };
    let mut t = Trace::new();
    t.start(1, 1, 100, "acme/app");
    t.feed(
        2,
        1,
        100,
        1,
        "ping",
        raw(SocketFamily::Inet, RawSocketKind::Icmp, 1, false),
    );
    t.feed(
        3,
        1,
        101,
        1,
        "scapy",
        raw(SocketFamily::Packet, RawSocketKind::Packet, 768, true),
    );
    t.feed(
        4,
        1,
        102,
        1,
        "tun",
        raw(SocketFamily::Inet6, RawSocketKind::Raw, 58, true),
    );
    assert_eq!(t.rules(), [RuleId::UnexpectedEgress; 3]);
    let summaries: Vec<&str> = t.findings.iter().map(|f| f.summary.as_str()).collect();
    assert!(
        summaries[0].contains("opened an ICMP socket (protocol 1)"),
        "{summaries:?}"
    );
    assert!(
        summaries[1].contains("was refused a packet socket"),
        "{summaries:?}"
    );
    assert!(
        summaries[2].contains("was refused a raw IP socket (protocol 58)"),
        "{summaries:?}"
    );
    let blocked: Vec<bool> = t.findings.iter().map(|f| f.blocked).collect();
    assert_eq!(blocked, [false, true, true]);
    assert_eq!(
        t.findings[1].raw_socket.map(|r| r.kind),
        Some(RawSocketKind::Packet)
    );
    assert!(t.findings.iter().all(|f| f.destination.is_none()));
}

#[test]
fn a_dns_connect_block_mode_sent_to_the_agents_resolver_is_not_unexpected_egress() {
    let mut t = Trace::new();
    t.start(1, 1, 100, "acme/app");
    let EventDetail::Connect(mut redirected) = refused("203.0.113.53", 53, false) else {
        unreachable!()
    };
    redirected.blocked = false;
    redirected.result = 0;
    redirected.dns_redirected = true;
    t.feed(2, 1, 100, 1, "curl", EventDetail::Connect(redirected));
    assert!(t.findings.is_empty(), "{:#?}", t.findings);
}

/// UDP refused under `sni = true` (QUIC to port 443 of an allowed address, or UDP to another port
/// of an address only a name admits): the address is allowed, the finding says why it was refused.
#[test]
fn udp_refused_under_an_sni_rule_says_so() {
    for (port, says) in [
        (
            443,
            "was refused QUIC (UDP) to 203.0.113.9 port 443 (block mode)",
        ),
        (
            8443,
            "was refused UDP to 203.0.113.9 port 8443 (block mode)",
        ),
    ] {
        let mut t = Trace::new();
        t.start(1, 1, 100, "acme/app");
        let EventDetail::Connect(mut udp) = refused("203.0.113.9", port, true) else {
            unreachable!()
        };
        udp.quic = true;
        t.feed(2, 1, 100, 1, "curl", EventDetail::Connect(udp));
        assert_eq!(t.rules(), [RuleId::UnexpectedEgress]);
        let finding = &t.findings[0];
        assert!(finding.blocked);
        assert!(finding.summary.contains(says), "{}", finding.summary);
    }
}

#[test]
fn tls_server_names_outside_an_sni_rule_are_unexpected_egress_with_destination_sni() {
    let policy = Policy::parse(
        &format!(
            "{}\n[[rules]]\nrepository = \"acme/tls\"\nsni = true\nallow_egress = [\
             {{ cidr = \"198.51.100.0/24\" }}, {{ name = \"*.github.com\" }}]\n",
            crate::policy::DEFAULT_POLICY
        ),
        "t.toml",
    )
    .unwrap();
    let hello = |sni: Option<&str>, blocked: bool| {
        EventDetail::TlsClientHello(crate::event::TlsHello {
            ip: "198.51.100.7".parse().unwrap(),
            port: 443,
            sni: sni.map(str::to_owned),
            sni_truncated: false,
            blocked,
        })
    };
    let mut t = Trace::with_policy(policy);
    t.start(1, 1, 100, "acme/tls");
    t.feed(2, 1, 100, 1, "curl", hello(Some("api.github.com"), false));
    assert!(t.findings.is_empty(), "{:#?}", t.findings);
    // Audit mode: reported, not blocked.
    t.feed(3, 1, 100, 1, "curl", hello(Some("evil.example"), false));
    // Block mode: the kernel refused it.
    t.feed(4, 1, 100, 1, "curl", hello(None, true));
    assert_eq!(
        t.rules(),
        [RuleId::UnexpectedEgress, RuleId::UnexpectedEgress]
    );
    let audit = &t.findings[0];
    assert!(!audit.blocked);
    let d = audit.destination.as_ref().unwrap();
    assert_eq!(d.sni.as_deref(), Some("evil.example"));
    assert!(
        audit
            .summary
            .contains("sent TLS for server name evil.example")
    );
    let refused = &t.findings[1];
    assert!(refused.blocked);
    assert!(refused.summary.contains("without a readable server name"));
    // A job without an sni rule: server names are events only.
    t.start(5, 2, 200, "acme/other");
    t.feed(6, 2, 200, 1, "curl", hello(Some("evil.example"), false));
    assert_eq!(t.findings.len(), 2);
}

/// The LSM set reports `process_vm_writev` and `pidfd_getfd` as ptrace events named by their
/// syscall; the finding says the syscall, not "ptrace process_vm_writev".
#[test]
fn an_access_check_by_another_syscall_is_named_by_it() {
    let mut t = Trace::new();
    t.start(1, 1, 100, "acme/app");
    t.feed(
        2,
        1,
        100,
        1,
        "inject",
        EventDetail::Ptrace {
            request: "process_vm_writev".into(),
            target_pid: 4242,
            targets_agent: false,
        },
    );
    let f = t.only(RuleId::ProcessMemoryAccess);
    let target = f.target.as_ref().expect("a target process");
    assert_eq!(target.access, "process_vm_writev");
    assert_eq!(target.pid, 4242);
}
