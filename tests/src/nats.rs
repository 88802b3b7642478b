//! A real NATS server for the fleet tests: Debian's `nats-server` with JetStream, on a loopback
//! port the test picks, storing in a directory the test owns (kept across a restart, as a
//! broker's disk is); optionally with TLS from a CA the test generates. Read back with the same
//! client the agent uses (`async-nats`).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::live::free_port;

pub struct Broker {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
    /// The server's TLS block, when it serves TLS.
    tls: Option<String>,
    /// A `.creds` file to read the stream with, when the broker authenticates (`NatsAuth`).
    creds: Option<PathBuf>,
}

/// One message of the stream.
#[derive(Debug, Clone)]
pub struct StreamMessage {
    pub subject: String,
    pub msg_id: String,
    pub payload: Value,
}

impl Broker {
    /// Starts nats-server on a free port with its store in `dir`.
    pub fn start(dir: &Path) -> Self {
        Self::start_on(dir, free_port(), None)
    }

    /// Starts nats-server on `port` with its store in `dir`, and `tls` (a nats-server `tls { }`
    /// block) if given.
    pub fn start_on(dir: &Path, port: u16, tls: Option<String>) -> Self {
        Self::launch(dir, port, tls, None)
    }

    /// Starts nats-server that admits only users of `auth`'s account; the test reads the stream
    /// with a `.creds` file of its own (`<dir>/reader.creds`).
    pub fn start_authenticated(dir: &Path, auth: &NatsAuth) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let creds = dir.join("reader.creds");
        std::fs::write(&creds, &auth.creds).unwrap();
        Self::launch(dir, free_port(), None, Some((auth, creds)))
    }

    fn launch(
        dir: &Path,
        port: u16,
        tls: Option<String>,
        auth: Option<(&NatsAuth, PathBuf)>,
    ) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("nats.conf");
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:{port}\njetstream {{ store_dir: {:?} }}\n{}\n{}\n",
                dir.join("store").display(),
                tls.as_deref().unwrap_or(""),
                auth.as_ref().map_or("", |(a, _)| a.server_config.as_str()),
            ),
        )
        .unwrap();
        let child = crate::spawn_with_parent_death(
            Command::new("nats-server")
                .arg("-c")
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(
                    std::fs::File::options()
                        .create(true)
                        .append(true)
                        .open(dir.join("nats.log"))
                        .unwrap(),
                ),
            libc::SIGKILL,
        )
        .expect("starting nats-server (Debian package; `cargo xtask setup` installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen on {port}: {}",
                std::fs::read_to_string(dir.join("nats.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            port,
            dir: dir.to_path_buf(),
            tls,
            creds: auth.map(|(_, creds)| creds),
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "tls" } else { "nats" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Killed (SIGKILL: a crash, not a clean stop).
    pub fn kill(mut self) -> (PathBuf, u16, Option<String>) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        (self.dir.clone(), self.port, self.tls.take())
    }

    /// Started again after `kill`, on the same port and store.
    pub fn restart((dir, port, tls): (PathBuf, u16, Option<String>)) -> Self {
        Self::start_on(&dir, port, tls)
    }

    /// Every message of `stream` (a plain-text client; for a TLS broker, `tls` gives the CA and
    /// client certificate to read with).
    pub fn messages(&self, stream: &str, tls: Option<&TestPki>) -> Vec<StreamMessage> {
        let url = self.url();
        let tls = tls.cloned();
        let creds = self.creds.clone();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let mut options = async_nats::ConnectOptions::new();
                if let Some(creds) = &creds {
                    options = options.credentials_file(creds).await.unwrap();
                }
                if let Some(pki) = &tls {
                    options = options
                        .add_root_certificates(pki.ca.clone())
                        .add_client_certificate(pki.client_cert.clone(), pki.client_key.clone())
                        .require_tls(true);
                }
                let client = options.connect(url.as_str()).await.unwrap();
                let context = async_nats::jetstream::new(client);
                let Ok(mut stream) = context.get_stream(stream).await else {
                    return Vec::new();
                };
                let last = stream.info().await.unwrap().state.last_sequence;
                let mut out = Vec::new();
                for seq in 1..=last {
                    if let Ok(m) = stream.get_raw_message(seq).await {
                        let msg_id = m
                            .headers
                            .get("Nats-Msg-Id")
                            .map(|v| v.as_str().to_owned())
                            .unwrap_or_default();
                        out.push(StreamMessage {
                            subject: m.subject.to_string(),
                            msg_id,
                            payload: serde_json::from_slice(&m.payload)
                                .expect("a stream message is JSON"),
                        });
                    }
                }
                out
            })
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CA, a server certificate for 127.0.0.1 signed by it, and a client certificate, as PEM files
/// in a directory.
#[derive(Clone, Debug)]
pub struct TestPki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TestPki {
    /// Generates them in `dir` (rcgen, fresh keys each time: two calls make two unrelated CAs).
    pub fn generate(dir: &Path) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
        std::fs::create_dir_all(dir).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "runner-monitor test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let leaf = |names: Vec<String>, cn: &str| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(names).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            let cert = params.signed_by(&key, &ca).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(vec!["127.0.0.1".into(), "localhost".into()], "nats");
        let (client_cert, client_key) = leaf(vec!["runner-monitor".into()], "runner-monitor");
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        Self {
            ca: write("ca.pem", &ca.pem()),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server.key", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client.key", &client_key),
        }
    }

    /// nats-server's `tls { }` block: this certificate, and clients must present one of this CA.
    pub fn server_block(&self) -> String {
        format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n  timeout: 2\n}}",
            self.server_cert.display(),
            self.server_key.display(),
            self.ca.display()
        )
    }
}

/// Decentralised NATS authentication (operator, account and user JWTs signed with nkeys), as
/// `nsc` makes it: the broker trusts the operator and knows the account (`resolver: MEMORY`),
/// and a user proves itself with a `.creds` file. nats-server checks every signature itself.
pub struct NatsAuth {
    /// The nats-server configuration lines that trust the operator and preload the account.
    pub server_config: String,
    /// A `.creds` file's text for a user of the account.
    pub creds: String,
}

impl NatsAuth {
    pub fn generate(name: &str) -> Self {
        let operator = nkeys::KeyPair::new_operator();
        let account = nkeys::KeyPair::new_account();
        let user = nkeys::KeyPair::new_user();
        // JetStream needs the server's system account.
        let system = nkeys::KeyPair::new_account();
        let operator_jwt = jwt(
            &operator,
            &operator.public_key(),
            name,
            serde_json::json!({
                "system_account": system.public_key(), "type": "operator", "version": 2,
            }),
        );
        let system_jwt = jwt(
            &operator,
            &system.public_key(),
            "SYS",
            serde_json::json!({ "type": "account", "version": 2 }),
        );
        // JetStream is on for an account whose storage limits are not zero.
        let unlimited = serde_json::json!({
            "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
            "wildcards": true, "conn": -1, "leaf": -1,
            "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
        });
        let account_jwt = jwt(
            &operator,
            &account.public_key(),
            name,
            serde_json::json!({ "limits": unlimited, "type": "account", "version": 2 }),
        );
        let user_jwt = jwt(
            &account,
            &user.public_key(),
            name,
            serde_json::json!({
                "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
                "type": "user", "version": 2,
            }),
        );
        Self {
            server_config: format!(
                "operator: {operator_jwt}\nsystem_account: {sys}\nresolver: MEMORY\n\
                 resolver_preload: {{\n  {sys}: {system_jwt}\n  {}: {account_jwt}\n}}\n",
                account.public_key(),
                sys = system.public_key(),
            ),
            creds: format!(
                "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
                 -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
                user.seed().unwrap()
            ),
        }
    }
}

/// A NATS JWT (`ed25519-nkey`) about `subject`, issued and signed by `issuer`.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: Value) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let iat = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = serde_json::json!({ "typ": "JWT", "alg": "ed25519-nkey" });
    let claims = serde_json::json!({
        "jti": format!("RMTEST{}{}", std::process::id(), subject.get(..12).unwrap_or(subject)),
        "iat": iat,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let signed = format!(
        "{}.{}",
        b64.encode(header.to_string()),
        b64.encode(claims.to_string())
    );
    let signature = issuer.sign(signed.as_bytes()).unwrap();
    format!("{signed}.{}", b64.encode(signature))
}
