//! Signed job attestations through the real agent: a simulated GitHub job reads a credential,
//! writes two (one a survivor removes after the job, one it leaves), and leaves a survivor. At
//! its end (after the grace period) the agent writes a DSSE-signed in-toto Statement of it under
//! its state directory. `runner-monitor attest verify` and, independently, in-toto's own Python
//! tools (PyPI `in-toto` / `securesystemslib`, installed by `cargo xtask setup`) verify it; the
//! same attestation with one byte of its payload changed fails both. No canary in it.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use integration_tests::{
    CANARY, TestEnv,
    live::{Agent, agent_dir, free_port, github_job, repo_root, run_id, target_dir, wait_until},
    output_of,
};
use serde_json::Value;

fn runner_monitor(args: &[&std::ffi::OsStr]) -> std::process::Output {
    output_of(Command::new(target_dir().join("runner-monitor")).args(args))
}

/// `runner-monitor attest verify FILE --public-key PUB`.
fn our_verify(file: &Path, public: &Path) -> std::process::Output {
    runner_monitor(&[
        "attest".as_ref(),
        "verify".as_ref(),
        file.as_os_str(),
        "--public-key".as_ref(),
        public.as_os_str(),
    ])
}

/// in-toto's Python tools on the attestation (`tests/python/verify_attestation.py`).
fn in_toto_verify(file: &Path, public: &Path) -> std::process::Output {
    let home = std::env::var_os("HOME").map_or("/root".into(), PathBuf::from);
    let python = home.join(".cache/runner-monitor/in-toto/bin/python");
    assert!(
        python.exists(),
        "{} is missing: `cargo xtask setup` installs in-toto",
        python.display()
    );
    output_of(
        Command::new(python)
            .arg(repo_root().join("tests/python/verify_attestation.py"))
            .arg(file)
            .arg(public),
    )
}

fn sha256sum(path: &str) -> String {
    let out = output_of(Command::new("sha256sum").arg(path));
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

#[test]
fn a_jobs_signed_attestation_verifies_with_our_tool_and_in_totos_and_a_changed_byte_fails_both() {
    let dir = agent_dir("attest");
    let key = dir.join("attestation.key");
    let public = dir.join("attestation.key.pub");
    let keygen = runner_monitor(&["attest".as_ref(), "keygen".as_ref(), key.as_os_str()]);
    assert!(keygen.status.success(), "{keygen:?}");
    let agent = Agent::launch(
        &dir,
        free_port(),
        &["--attestation-key", key.to_str().unwrap()],
    );
    let env = TestEnv::new("attest");
    let run = run_id(1);
    let gh = env.home.join(".config/gh/hosts.yml");
    github_job(
        &env,
        &agent,
        &run,
        "acme/app",
        &format!(
            "cat \"$HOME/.aws/credentials\" > /dev/null\n\
             sh -c 'printf %s \"$TOKEN\" > \"$HOME/.npmrc\"'\n\
             mkdir -p \"$HOME/.config/gh\" && sh -c 'printf %s \"$TOKEN\" > {gh}'\n\
             (setsid sh -c 'sleep 1; rm -f {gh}; sleep 10' &)",
            gh = gh.display()
        ),
    );
    let attestations = dir.join("state/attestations");
    let id = format!("{run}/build");
    let wanted = format!("-{}.intoto.json", id.replace('/', "_"));
    let mut file = None;
    wait_until("the job's attestation", 30, || {
        file = std::fs::read_dir(&attestations)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().ends_with(&wanted));
        file.is_some()
    });
    let file = file.unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains(CANARY), "the canary leaked into {text}");

    // Our verifier: ok, and it prints the statement.
    let ours = our_verify(&file, &public);
    assert!(ours.status.success(), "{ours:?}");
    let statement: Value = serde_json::from_slice(&ours.stdout).unwrap();
    assert!(!statement.to_string().contains(CANARY));
    assert_eq!(statement["_type"], "https://in-toto.io/Statement/v1");
    assert_eq!(
        statement["predicateType"],
        "https://in-toto.io/attestation/runtime-trace/v0.2"
    );
    let subject = statement["subject"][0]["name"].as_str().unwrap();
    assert!(
        subject.starts_with(&format!("github/acme/app/run/{run}/attempt/-/job/{id}@")),
        "{subject}"
    );
    let p = &statement["predicate"];
    let files = p["monitorLog"]["fileAccess"].as_array().unwrap();
    let named = |path: &str| files.iter().find(|f| f["name"] == path);
    // The credential read, by path and kind.
    let aws = named(&env.home.join(".aws/credentials").display().to_string())
        .unwrap_or_else(|| panic!("no aws credential in {files:?}"));
    assert_eq!(aws["annotations"]["kind"], "aws");
    assert!(aws["annotations"]["reads"].as_u64().unwrap() >= 1, "{aws}");
    // The executables, with the digest of what ran.
    let cat = named("/usr/bin/cat").unwrap_or_else(|| panic!("no /usr/bin/cat in {files:?}"));
    assert_eq!(cat["digest"]["sha256"], sha256sum("/usr/bin/cat"));
    // The survivor, and the credentials left behind: one still there, one removed after the end.
    let ext = &p["runnerMonitor"];
    let survivors = ext["survivors"].as_array().unwrap();
    assert!(
        survivors.iter().any(|s| s["escape"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e == "setsid")),
        "{survivors:?}"
    );
    // The writers exited before the end: not survivors (their credentials' fingerprints, made
    // after they exited, must not bring them back).
    assert!(
        !survivors
            .iter()
            .any(|s| s["cmdline"].as_str().unwrap_or("").contains("printf")),
        "{survivors:?}"
    );
    assert!(
        p["monitorLog"]["process"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["survivor"] == true)
    );
    let left = ext["credentialsLeftBehind"].as_array().unwrap();
    let left_at = |path: &Path| {
        left.iter()
            .find(|l| l["path"] == path.display().to_string().as_str())
            .unwrap_or_else(|| panic!("{} not left behind: {left:?}", path.display()))
    };
    assert_eq!(left_at(&env.home.join(".npmrc"))["removed"], false);
    assert_eq!(left_at(&gh)["removed"], true);
    assert!(
        ext["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["rule"] == "process-survived-job")
    );

    // in-toto's own tools agree.
    let theirs = in_toto_verify(&file, &public);
    assert!(theirs.status.success(), "in-toto: {theirs:?}");
    assert!(String::from_utf8_lossy(&theirs.stdout).contains(subject));

    // One byte of the payload changed (still valid JSON: the repository's last letter).
    let mut envelope: Value = serde_json::from_str(&text).unwrap();
    let payload = base64_decode(envelope["payload"].as_str().unwrap());
    let at = find(&payload, b"acme/app").unwrap() + 7;
    let mut changed = payload.clone();
    changed[at] = b'q';
    assert_eq!(
        changed.iter().zip(&payload).filter(|(a, b)| a != b).count(),
        1
    );
    envelope["payload"] = base64_encode(&changed).into();
    let tampered = dir.join("tampered.intoto.json");
    std::fs::write(&tampered, envelope.to_string()).unwrap();
    let ours = our_verify(&tampered, &public);
    assert!(
        !ours.status.success(),
        "our verify accepted a changed payload"
    );
    let error = String::from_utf8_lossy(&ours.stderr);
    assert!(error.contains("does not verify"), "{error}");
    let theirs = in_toto_verify(&tampered, &public);
    assert!(
        !theirs.status.success(),
        "in-toto accepted a changed payload"
    );
    // Another key: not verified either.
    let other = dir.join("other.key");
    let keygen = runner_monitor(&["attest".as_ref(), "keygen".as_ref(), other.as_os_str()]);
    assert!(keygen.status.success());
    let other_pub = dir.join("other.key.pub");
    assert!(!our_verify(&file, &other_pub).status.success());
    assert!(!in_toto_verify(&file, &other_pub).status.success());

    agent.stop();
    std::thread::sleep(Duration::from_millis(100));
}

/// An exposed key is refused at start, with the file and the fix named.
#[test]
fn an_attestation_key_readable_by_others_is_refused() {
    let dir = agent_dir("attest-exposed");
    let key = dir.join("attestation.key");
    let keygen = runner_monitor(&["attest".as_ref(), "keygen".as_ref(), key.as_os_str()]);
    assert!(keygen.status.success());
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = output_of(
        integration_tests::live::agent_command(&dir, &[])
            .arg("--attestation-key")
            .arg(&key)
            .stderr(std::process::Stdio::piped()),
    );
    assert!(!out.status.success());
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(
        error.contains("readable by group or others") && error.contains("chmod 600"),
        "{error}"
    );
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.len();
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= n {
                out.push(B64[(v >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().filter(|&c| c != b'=') {
        let v = B64.iter().position(|&x| x == c).expect("base64") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}
