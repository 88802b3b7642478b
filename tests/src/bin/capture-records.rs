//! Records real ring-buffer records as seeds for the fuzz targets (`fuzz/seeds/`), as root:
//!
//!     cargo build -p integration-tests --bins && target/debug/capture-records fuzz/seeds
//!
//! Loads the real kernel programs, runs one simulated job that does what CI jobs do (chdir and a
//! relative credential read, an absolute one, a rename, a proc-memory read, unix and TCP connects,
//! a DNS query answered by a resolver this program runs on 127.0.0.1:53, a signal to the "agent",
//! a `bpf()` call), and writes the raw records, two of each kind, to `DIR/decode/` and the DNS
//! messages they carry to `DIR/dns/`. The credential files are canaries in a temporary home.

use std::{
    io::Write,
    net::{Ipv4Addr, TcpListener, UdpSocket},
    os::unix::net::UnixListener,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, Query},
    rr::{Name, RData, Record, RecordType, rdata},
};
use integration_tests::TestEnv;
use runner_monitor::{policy::SensorPolicy, sensor::Sensor, sensor::decode::kind_of};
use runner_monitor_common::DnsEvent;

fn main() {
    let out = PathBuf::from(std::env::args().nth(1).expect("usage: capture-records DIR"));
    let env = TestEnv::new("capture");
    let mut sensor = Sensor::load(&SensorPolicy::default()).expect("loading the sensor (root?)");
    let mut ring = sensor.take_events().expect("ring buffer");

    // A resolver that answers every A query with 10.1.2.3 behind a CNAME.
    let resolver = UdpSocket::bind((Ipv4Addr::LOCALHOST, 53)).expect("binding 127.0.0.1:53");
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = resolver.recv_from(&mut buf) {
            let Ok(query) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut answer = Message::new();
            answer
                .set_id(query.id())
                .set_message_type(MessageType::Response)
                .set_recursion_desired(true)
                .set_recursion_available(true);
            let name = query.queries()[0].name().clone();
            let edge = Name::from_ascii("edge.example.test.").unwrap();
            answer.add_query(query.queries()[0].clone());
            answer.add_answer(Record::from_rdata(
                name,
                60,
                RData::CNAME(rdata::CNAME(edge.clone())),
            ));
            answer.add_answer(Record::from_rdata(
                edge,
                30,
                RData::A(rdata::A(Ipv4Addr::new(10, 1, 2, 3))),
            ));
            let _ = resolver.send_to(&answer.to_vec().unwrap(), from);
        }
    });
    let mut query = Message::new();
    query.set_id(0x5eed).set_recursion_desired(true);
    query.add_query(Query::query(
        Name::from_ascii("registry.npmjs.org.").unwrap(),
        RecordType::A,
    ));
    let query_hex: String = query
        .to_vec()
        .unwrap()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let unix_path = env.dir.join("docker.sock");
    let _unix = UnixListener::bind(&unix_path).unwrap();
    let script = format!(
        r#"read _go
cd "$HOME/.docker" && cat config.json >/dev/null
cat "$HOME/.aws/credentials" >/dev/null
mv "$HOME/.git-credentials" "$HOME/.git-credentials.old"
cat /proc/$PPID/environ >/dev/null
"$JOB_STEP" connect-unix {unix}
"$JOB_STEP" connect-tcp {tcp}
python3 -c 'import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3); s.sendto(bytes.fromhex("{query_hex}"), ("127.0.0.1", 53)); s.recv(512)'
kill -0 {agent}
bpftool prog show >/dev/null 2>&1 || true
"#,
        unix = unix_path.display(),
        tcp = tcp.local_addr().unwrap(),
        agent = std::process::id(),
    );
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .env("HOME", &env.home)
        .env("JOB_STEP", job_step_path())
        .current_dir(&env.dir)
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawning the job");
    sensor
        .register_job(child.id())
        .expect("registering the job");
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    assert!(child.wait().unwrap().success(), "the job failed");
    std::thread::sleep(Duration::from_millis(500));

    let decode = out.join("decode");
    let dns = out.join("dns");
    std::fs::create_dir_all(&decode).unwrap();
    std::fs::create_dir_all(&dns).unwrap();
    let mut written = std::collections::BTreeMap::<&str, usize>::new();
    while let Some(record) = ring.next() {
        let Some(kind) = kind_of(&record) else {
            continue;
        };
        let n = written.entry(kind.name()).or_default();
        if *n == 2 {
            continue;
        }
        *n += 1;
        std::fs::write(decode.join(format!("{}-{n}", kind.name())), &*record).unwrap();
        if record.len() >= std::mem::size_of::<DnsEvent>()
            && let Some(payload) = dns_payload(&record, kind)
        {
            std::fs::write(dns.join(format!("{}-{n}", kind.name())), payload).unwrap();
        }
    }
    println!("{written:?}");
}

fn dns_payload(record: &[u8], kind: runner_monitor_common::EventKind) -> Option<Vec<u8>> {
    use runner_monitor_common::EventKind::{DnsAnswer, DnsQuery};
    if !matches!(kind, DnsQuery | DnsAnswer) {
        return None;
    }
    // SAFETY: the length was checked by the caller; DnsEvent is plain old data.
    let e: DnsEvent = unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) };
    let len = (e.len as usize).min(e.payload.len());
    Some(e.payload[..len].to_vec())
}

/// `job-step`, built beside this program (the tests' helper looks beside test binaries).
fn job_step_path() -> PathBuf {
    std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .join("job-step")
}
