use std::{collections::HashMap, os::unix::fs::PermissionsExt, time::SystemTime};

use ed25519_dalek::SigningKey;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{
    dsse::{self, Envelope, VerifyError},
    statement::{self, Context, ExeDigest, JobIdentity},
    *,
};
use crate::{
    engine::{
        Finding,
        finding::{CredentialRef, DestinationRef, FindingProcess},
    },
    event::{JobInfo, JobKey, JobRef, ProcessRef},
    report::{CredentialUse, Egress, JobReport, Omitted, ProcessNode, Survivor},
};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rm-attest-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn pae_is_the_dsse_specs() {
    // The DSSE protocol's own example.
    assert_eq!(
        dsse::pae("http://example.com/HelloWorld", b"hello world"),
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    );
    assert_eq!(dsse::pae("", b""), b"DSSEv1 0  0 ");
    // Lengths in bytes, not characters.
    assert_eq!(dsse::pae("t", "é".as_bytes()), "DSSEv1 1 t 2 é".as_bytes());
}

#[test]
fn a_signed_envelope_verifies_and_any_change_fails() {
    let key = SigningKey::from_bytes(&[7; 32]);
    let payload = br#"{"_type":"https://in-toto.io/Statement/v1"}"#;
    let envelope = dsse::sign(&key, payload);
    assert_eq!(envelope.payload_type, dsse::PAYLOAD_TYPE);
    assert_eq!(
        envelope.signatures[0].keyid,
        dsse::keyid(&key.verifying_key())
    );
    assert_eq!(
        dsse::verify(&envelope, &key.verifying_key()).unwrap(),
        payload
    );

    // One byte of the payload changed.
    let mut changed = payload.to_vec();
    changed[3] ^= 1;
    let mut tampered = envelope.clone();
    tampered.payload = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, changed);
    assert!(matches!(
        dsse::verify(&tampered, &key.verifying_key()),
        Err(VerifyError::BadSignature { .. })
    ));

    // The type is signed too.
    let mut retyped = envelope.clone();
    retyped.payload_type = "application/json".into();
    assert!(dsse::verify(&retyped, &key.verifying_key()).is_err());

    // Another key: no signature of its.
    let other = SigningKey::from_bytes(&[8; 32]);
    assert!(matches!(
        dsse::verify(&envelope, &other.verifying_key()),
        Err(VerifyError::NoSignatureByKey { .. })
    ));
    // Another key claiming this key's id.
    let mut forged = dsse::sign(&other, payload);
    forged.signatures[0].keyid = envelope.signatures[0].keyid.clone();
    assert!(matches!(
        dsse::verify(&forged, &key.verifying_key()),
        Err(VerifyError::BadSignature { .. })
    ));
}

#[test]
fn keyid_is_securesystemslibs_default() {
    let key = SigningKey::from_bytes(&[7; 32]).verifying_key();
    let public = dsse::hex(key.as_bytes());
    let canonical =
        format!(r#"{{"keytype":"ed25519","keyval":{{"public":"{public}"}},"scheme":"ed25519"}}"#);
    assert_eq!(
        dsse::keyid(&key),
        dsse::hex(&Sha256::digest(canonical.as_bytes()))
    );
}

#[test]
fn keys_round_trip_through_pem_and_an_exposed_private_key_is_refused() {
    let dir = temp_dir("keys");
    let (private, public) = dsse::generate().unwrap();
    assert!(
        private.starts_with("-----BEGIN PRIVATE KEY-----"),
        "{private}"
    );
    assert!(public.starts_with("-----BEGIN PUBLIC KEY-----"), "{public}");
    let (priv_path, pub_path) = (dir.join("key"), dir.join("key.pub"));
    std::fs::write(&priv_path, &private).unwrap();
    std::fs::write(&pub_path, &public).unwrap();
    std::fs::set_permissions(&priv_path, std::fs::Permissions::from_mode(0o640)).unwrap();
    assert!(matches!(
        dsse::load_signing_key(&priv_path),
        Err(dsse::KeyError::Exposed { mode: 0o640, .. })
    ));
    std::fs::set_permissions(&priv_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let key = dsse::load_signing_key(&priv_path).unwrap();
    assert_eq!(
        dsse::load_verifying_key(&pub_path).unwrap(),
        key.verifying_key()
    );
    // A public key where the private one belongs says what is wrong.
    std::fs::write(&priv_path, &public).unwrap();
    let error = dsse::load_signing_key(&priv_path).unwrap_err().to_string();
    assert!(error.contains("not an ed25519 private key"), "{error}");
    let _ = std::fs::remove_dir_all(dir);
}

fn finding(rule: crate::rule::RuleId, time_ns: u64) -> Finding {
    Finding::new(rule, time_ns, format!("{rule:?}"))
}

fn report() -> JobReport {
    let job = JobInfo {
        id: "479701/build".into(),
        platform: Some("github".into()),
        repository: Some("acme/app".into()),
        workflow: Some("CI".into()),
        run: Some("479701".into()),
        attempt: Some("2".into()),
        runner: Some("runner-1".into()),
        ..JobInfo::default()
    };
    let node = |pid, ppid, exe: &str, start_ns| ProcessNode {
        pid,
        ppid,
        comm: exe.rsplit('/').next().unwrap().into(),
        exe: Some(exe.into()),
        argv: Some(exe.into()),
        start_ns,
        exit_ns: Some(start_ns + 10),
        exit_code: Some(0),
        signal: None,
        survivor: false,
        step: None,
        io_uring: false,
    };
    let mut left = finding(crate::rule::RuleId::CredentialLeftBehind, 9_000);
    left.credential = Some(CredentialRef {
        path: "/home/r/.docker/config.json".into(),
        kind: "docker".into(),
        fingerprint: None,
        used_path: None,
    });
    let mut egress = finding(crate::rule::RuleId::UnexpectedEgress, 3_000);
    egress.destination = Some(DestinationRef {
        ip: "203.0.113.9".parse().unwrap(),
        port: 443,
        dns_name: Some("exfil.example".into()),
        sni: None,
    });
    let mut survived = finding(crate::rule::RuleId::ProcessSurvivedJob, 12_000);
    survived.process = Some(FindingProcess {
        pid: 12,
        exe: Some("/usr/bin/sleep".into()),
        cmdline: Some("sleep 60".into()),
        comm: "sleep".into(),
        uid: 0,
        ancestry: Vec::new(),
    });
    let mut survivor = node(12, 1, "/usr/bin/sleep", 2_000);
    survivor.survivor = true;
    survivor.exit_ns = None;
    survivor.exit_code = None;
    JobReport {
        key: JobKey(42),
        job,
        start_ns: 1_000,
        end_ns: Some(9_000),
        steps: Vec::new(),
        processes: vec![
            node(10, 1, "/usr/bin/bash", 1_000),
            node(11, 10, "/usr/bin/cat", 1_500),
            node(13, 10, "/usr/bin/cat", 1_600),
            survivor,
        ],
        credentials: vec![CredentialUse {
            path: "/home/r/.aws/credentials".into(),
            kind: "aws".into(),
            access: crate::report::Access::File,
            reads: 2,
            writes: 0,
            failed: 0,
            first_ns: 1_500,
            pids: vec![11],
            after_end: true,
        }],
        egress: vec![
            Egress {
                ip: "203.0.113.9".parse().unwrap(),
                port: 443,
                dns_name: Some("exfil.example".into()),
                connections: 1,
                failed: 0,
                sni: Vec::new(),
                first_ns: 3_000,
                pids: vec![11],
                after_end: false,
            },
            Egress {
                ip: "140.82.112.3".parse().unwrap(),
                port: 443,
                dns_name: Some("github.com".into()),
                connections: 3,
                failed: 0,
                sni: Vec::new(),
                first_ns: 2_000,
                pids: vec![10],
                after_end: false,
            },
        ],
        survivors: vec![Survivor {
            pid: 12,
            exe: Some("/usr/bin/sleep".into()),
            cmdline: Some("sleep 60".into()),
            escape: vec!["setsid".into()],
        }],
        findings: vec![egress, left, survived],
        omitted: Omitted::default(),
        not_tracked: vec!["containers".into()],
    }
}

fn build(report: &JobReport) -> Value {
    let executables = HashMap::from([
        (
            "/usr/bin/bash".to_owned(),
            ExeDigest::Sha256("ab".repeat(32)),
        ),
        (
            "/usr/bin/cat".to_owned(),
            ExeDigest::Unhashed("unreadable: gone".into()),
        ),
    ]);
    let still_present = HashMap::from([("/home/r/.docker/config.json".to_owned(), false)]);
    let cx = Context {
        host: "host-a",
        epoch: SystemTime::UNIX_EPOCH,
        now_ns: 20_000_000_000,
        executables: &executables,
        still_present: &still_present,
    };
    statement::statement(report, &cx)
}

#[test]
fn the_statement_is_an_in_toto_v1_runtime_trace_of_the_job() {
    let report = report();
    let s = build(&report);
    assert_eq!(s["_type"], "https://in-toto.io/Statement/v1");
    assert_eq!(
        s["predicateType"],
        "https://in-toto.io/attestation/runtime-trace/v0.2"
    );
    // The subject: the job, its digest the SHA-256 of its canonical identity.
    let subject = &s["subject"][0];
    assert_eq!(
        subject["name"],
        "github/acme/app/run/479701/attempt/2/job/479701/build@host-a"
    );
    let canonical = r#"{"platform":"github","repository":"acme/app","workflow":"CI","run":"479701","attempt":"2","job":"479701/build","runner":"runner-1","host":"host-a"}"#;
    assert_eq!(JobIdentity::of(&report, "host-a").canonical(), canonical);
    assert_eq!(
        subject["digest"]["sha256"],
        dsse::hex(&Sha256::digest(canonical.as_bytes()))
    );
    let p = &s["predicate"];
    assert_eq!(p["monitor"]["type"], statement::MONITOR_TYPE);
    assert_eq!(
        p["monitoredProcess"]["event"],
        "https://github.com/acme/app/actions/runs/479701/attempts/2"
    );
    assert_eq!(p["metadata"]["buildStartedOn"], "1970-01-01T00:00:00.000Z");

    // Executables: path, digest where hashed, why not where not; once per path.
    let files = p["monitorLog"]["fileAccess"].as_array().unwrap();
    let bash = files.iter().find(|f| f["name"] == "/usr/bin/bash").unwrap();
    assert_eq!(bash["digest"]["sha256"], "ab".repeat(32));
    assert_eq!(bash["uri"], "file:///usr/bin/bash");
    let cat: Vec<_> = files
        .iter()
        .filter(|f| f["name"] == "/usr/bin/cat")
        .collect();
    assert_eq!(cat.len(), 1);
    assert_eq!(cat[0]["annotations"]["execs"], 2);
    assert!(cat[0].get("digest").is_none());
    assert_eq!(cat[0]["annotations"]["unhashed"], "unreadable: gone");
    let sleep = files
        .iter()
        .find(|f| f["name"] == "/usr/bin/sleep")
        .unwrap();
    assert_eq!(
        sleep["annotations"]["unhashed"],
        "not seen by the agent's hasher"
    );
    // Credentials: kind, reads and writes, after the end; never a digest.
    let aws = files
        .iter()
        .find(|f| f["name"] == "/home/r/.aws/credentials")
        .unwrap();
    assert_eq!(aws["annotations"]["kind"], "aws");
    assert_eq!(aws["annotations"]["reads"], 2);
    assert_eq!(aws["annotations"]["afterJobEnd"], true);
    assert!(aws.get("digest").is_none());

    // Egress with the name resolved and the engine's verdict.
    let net = p["monitorLog"]["network"].as_array().unwrap();
    assert_eq!(net[0]["hostname"], "exfil.example");
    assert_eq!(net[0]["verdict"], "unexpected");
    assert_eq!(net[1]["verdict"], "allowed");
    assert_eq!(net[1]["port"], 443);

    // Processes, the survivor marked.
    let procs = p["monitorLog"]["process"].as_array().unwrap();
    assert_eq!(procs[0]["digest"]["sha256"], "ab".repeat(32));
    assert_eq!(procs[3]["survivor"], true);

    let ext = &p["runnerMonitor"];
    assert_eq!(ext["survivors"][0]["escape"][0], "setsid");
    let left = &ext["credentialsLeftBehind"][0];
    assert_eq!(left["path"], "/home/r/.docker/config.json");
    assert_eq!(left["removed"], true);
    assert_eq!(left["checkedOn"], "1970-01-01T00:00:20.000Z");
    assert_eq!(ext["findings"].as_array().unwrap().len(), 3);
    assert_eq!(ext["findings"][0]["rule"], "unexpected-egress");
    assert_eq!(ext["identity"]["host"], "host-a");
    assert_eq!(ext["notTracked"][0], "containers");
}

#[test]
fn attestation_file_names_are_safe_whatever_the_job_id() {
    let mut r = report();
    r.job.id = "../../etc/passwd\n".into();
    let name = file_name(&r);
    assert_eq!(name, "000000000000002a-.._.._etc_passwd_.intoto.json");
    r.job.id = "x".repeat(500);
    assert!(file_name(&r).len() < 100);
    assert_eq!(
        statement::file_uri("/a b/ü"),
        "file:///a%20b/%C3%BC".to_owned()
    );
}

#[test]
fn the_attestor_hashes_executables_once_and_writes_a_verifiable_envelope() {
    let dir = temp_dir("attestor");
    let exe = dir.join("tool");
    std::fs::write(&exe, b"#!/bin/sh\necho hi\n").unwrap();
    let key = SigningKey::from_bytes(&[9; 32]);
    let mut a = Attestor::new(key.clone(), dir.join("out"), "host-b".into()).unwrap();
    let exec = |pid| Event {
        time_ns: 5,
        job: Some(JobRef {
            key: JobKey(42),
            ended: false,
            root: false,
        }),
        process: ProcessRef {
            pid,
            tid: pid,
            ppid: 1,
            uid: 0,
            comm: "tool".into(),
            cgroup_id: 0,
        },
        truncated: false,
        detail: EventDetail::Exec {
            filename: exe.display().to_string(),
            argv: vec![],
            argc: 0,
        },
    };
    a.event(&exec(100));
    a.event(&exec(101));
    assert_eq!(a.hashed, 1, "the same executable again is not read again");
    let mut r = report();
    r.processes[0].exe = Some(exe.display().to_string());
    let written = a.attest(&r, 20_000).unwrap();
    assert!(written.path.starts_with(dir.join("out")));
    let envelope: Envelope = serde_json::from_slice(&written.envelope).unwrap();
    let payload = dsse::verify(&envelope, &key.verifying_key()).unwrap();
    let s: Value = serde_json::from_slice(&payload).unwrap();
    let tool = s["predicate"]["monitorLog"]["fileAccess"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == exe.display().to_string().as_str())
        .unwrap()
        .clone();
    assert_eq!(
        tool["digest"]["sha256"],
        dsse::hex(&Sha256::digest(b"#!/bin/sh\necho hi\n"))
    );
    // The docker config of the report does not exist here: removed.
    assert_eq!(
        s["predicate"]["runnerMonitor"]["credentialsLeftBehind"][0]["removed"],
        true
    );
    let on_disk = std::fs::read(&written.path).unwrap();
    assert_eq!(on_disk, written.envelope);
    let _ = std::fs::remove_dir_all(dir);
}
