//! `runner-monitor attest`: keys for the agent's signed job attestations (`run
//! --attestation-key`), and verifying an attestation (`runner_monitor::attest`).

use std::{
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use clap::Subcommand;
use runner_monitor::attest::{dsse, statement};

#[derive(Subcommand)]
pub enum AttestCommand {
    /// Make an ed25519 key pair: FILE (private, PKCS#8 PEM, mode 0600) and FILE.pub (public,
    /// SubjectPublicKeyInfo PEM, for verifiers). Refuses to overwrite either.
    Keygen {
        /// The private key file.
        file: PathBuf,
    },
    /// Verify an attestation's signature with the public key; print the statement it signs.
    Verify {
        /// The attestation (a DSSE envelope, `<state-dir>/attestations/*.intoto.json`).
        file: PathBuf,
        /// The public key (PEM), e.g. the `.pub` that `attest keygen` wrote.
        #[arg(long, value_name = "PUB")]
        public_key: PathBuf,
    },
}

pub fn run(command: AttestCommand) -> anyhow::Result<()> {
    match command {
        AttestCommand::Keygen { file } => keygen(&file),
        AttestCommand::Verify { file, public_key } => verify(&file, &public_key),
    }
}

fn create(path: &Path, mode: u32, content: &str) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(content.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

fn keygen(file: &Path) -> anyhow::Result<()> {
    let public_path = PathBuf::from(format!("{}.pub", file.display()));
    for p in [file, public_path.as_path()] {
        if p.exists() {
            bail!("{} exists; not overwriting a key", p.display());
        }
    }
    let (private, public) = dsse::generate().context("generating a key")?;
    create(file, 0o600, &private)?;
    create(&public_path, 0o644, &public)?;
    let key = dsse::load_verifying_key(&public_path)?;
    println!(
        "{} (private) and {} (public), keyid {}",
        file.display(),
        public_path.display(),
        dsse::keyid(&key)
    );
    Ok(())
}

fn verify(file: &Path, public_key: &Path) -> anyhow::Result<()> {
    let key = dsse::load_verifying_key(public_key)?;
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let envelope: dsse::Envelope = serde_json::from_str(&text)
        .map_err(|e| dsse::VerifyError::Envelope(e.to_string()))
        .with_context(|| format!("{}: does not verify", file.display()))?;
    let payload = dsse::verify(&envelope, &key)
        .with_context(|| format!("{}: does not verify", file.display()))?;
    let statement: serde_json::Value = serde_json::from_slice(&payload)
        .with_context(|| format!("{}: the signed payload is not JSON", file.display()))?;
    if statement["_type"] != statement::STATEMENT_TYPE {
        bail!(
            "{}: signed, but not an in-toto Statement v1 (_type {})",
            file.display(),
            statement["_type"]
        );
    }
    eprintln!(
        "{}: verified (keyid {}, predicate {})",
        file.display(),
        dsse::keyid(&key),
        statement["predicateType"]
    );
    println!("{}", serde_json::to_string_pretty(&statement)?);
    Ok(())
}
