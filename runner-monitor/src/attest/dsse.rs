//! DSSE envelopes (<https://github.com/secure-systems-lab/dsse>, protocol v1) signed with ed25519:
//! the pre-authentication encoding, signing, verifying, and the keys.
//!
//! Keys are PEM files as OpenSSL writes them: the private key PKCS#8 (`openssl genpkey -algorithm
//! ed25519`), the public key SubjectPublicKeyInfo (`openssl pkey -pubout`). A signature's `keyid`
//! is the key id securesystemslib computes by default for an ed25519 key (the SHA-256 of the
//! canonical JSON `{"keytype":"ed25519","keyval":{"public":"<hex>"},"scheme":"ed25519"}`), so
//! in-toto's Python tools match the signature to the key without being told its id.

use std::{os::unix::fs::PermissionsExt, path::Path};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use ed25519_dalek::{
    Signature, Signer, SigningKey, Verifier, VerifyingKey,
    pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, spki::der::pem},
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The payload type of an in-toto Statement.
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("attestation key {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("attestation key {path} is readable by group or others (mode {mode:o}); chmod 600 it")]
    Exposed { path: String, mode: u32 },
    #[error("attestation key {path}: not an ed25519 {what} in PEM ({detail})")]
    Format {
        path: String,
        what: &'static str,
        detail: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("not a DSSE envelope: {0}")]
    Envelope(String),
    #[error("payloadType is {0:?}, expected {PAYLOAD_TYPE:?}")]
    PayloadType(String),
    #[error("{field} is not valid base64")]
    Base64 { field: String },
    #[error("no signature by key {keyid} (the envelope is signed by {found})")]
    NoSignatureByKey { keyid: String, found: String },
    #[error(
        "the signature by key {keyid} does not verify: the payload or the signature was changed, \
         or it was signed by another key"
    )]
    BadSignature { keyid: String },
}

/// A DSSE envelope, as JSON (`payload` and `sig` base64, standard alphabet, padded).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub payload: String,
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    pub signatures: Vec<EnvelopeSignature>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeSignature {
    #[serde(default)]
    pub keyid: String,
    pub sig: String,
}

/// DSSE's pre-authentication encoding: `"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`, the
/// lengths in ASCII decimal. What is signed, so that the type cannot be swapped.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + payload_type.len() + 32);
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(payload_type.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload);
    out
}

/// securesystemslib's default key id of an ed25519 public key.
pub fn keyid(key: &VerifyingKey) -> String {
    let public: String = key.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
    let canonical =
        format!(r#"{{"keytype":"ed25519","keyval":{{"public":"{public}"}},"scheme":"ed25519"}}"#);
    hex(&Sha256::digest(canonical.as_bytes()))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Signs `payload` (an in-toto Statement's JSON) into an envelope.
pub fn sign(key: &SigningKey, payload: &[u8]) -> Envelope {
    let signature = key.sign(&pae(PAYLOAD_TYPE, payload));
    Envelope {
        payload: STANDARD.encode(payload),
        payload_type: PAYLOAD_TYPE.to_owned(),
        signatures: vec![EnvelopeSignature {
            keyid: keyid(&key.verifying_key()),
            sig: STANDARD.encode(signature.to_bytes()),
        }],
    }
}

/// Verifies the envelope's signature by `key`; returns the payload. A signature is matched to the
/// key by its `keyid`, or tried when it has none.
pub fn verify(envelope: &Envelope, key: &VerifyingKey) -> Result<Vec<u8>, VerifyError> {
    if envelope.payload_type != PAYLOAD_TYPE {
        return Err(VerifyError::PayloadType(envelope.payload_type.clone()));
    }
    let payload = STANDARD
        .decode(&envelope.payload)
        .map_err(|_| VerifyError::Base64 {
            field: "payload".into(),
        })?;
    let id = keyid(key);
    let mine: Vec<&EnvelopeSignature> = envelope
        .signatures
        .iter()
        .filter(|s| s.keyid.is_empty() || s.keyid == id)
        .collect();
    if mine.is_empty() {
        let found: Vec<&str> = envelope
            .signatures
            .iter()
            .map(|s| s.keyid.as_str())
            .collect();
        return Err(VerifyError::NoSignatureByKey {
            keyid: id,
            found: if found.is_empty() {
                "no key: it has no signature".to_owned()
            } else {
                found.join(", ")
            },
        });
    }
    let message = pae(&envelope.payload_type, &payload);
    for s in mine {
        let bytes = STANDARD.decode(&s.sig).map_err(|_| VerifyError::Base64 {
            field: "signatures[].sig".into(),
        })?;
        if let Ok(signature) = Signature::from_slice(&bytes)
            && key.verify(&message, &signature).is_ok()
        {
            return Ok(payload);
        }
    }
    Err(VerifyError::BadSignature { keyid: id })
}

/// Reads the private key, which must be private to its owner (like the fingerprint key).
pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    let shown = path.display().to_string();
    let read_error = |source| KeyError::Read {
        path: shown.clone(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_error)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Exposed { path: shown, mode });
    }
    let text = std::fs::read_to_string(path).map_err(read_error)?;
    SigningKey::from_pkcs8_pem(&text).map_err(|e| KeyError::Format {
        path: shown,
        what: "private key (PKCS#8)",
        detail: e.to_string(),
    })
}

pub fn load_verifying_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: shown.clone(),
        source,
    })?;
    VerifyingKey::from_public_key_pem(&text).map_err(|e| KeyError::Format {
        path: shown,
        what: "public key (SubjectPublicKeyInfo)",
        detail: e.to_string(),
    })
}

/// A new key from the kernel's random source: (private PKCS#8 PEM, public SPKI PEM).
pub fn generate() -> std::io::Result<(String, String)> {
    let mut seed = [0u8; 32];
    // SAFETY: getrandom writes at most `seed.len()` bytes into the buffer we own.
    let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
    if n != seed.len() as isize {
        return Err(std::io::Error::last_os_error());
    }
    let key = SigningKey::from_bytes(&seed);
    seed.fill(0);
    let private = key
        .to_pkcs8_pem(pem::LineEnding::LF)
        .map_err(std::io::Error::other)?;
    let public = key
        .verifying_key()
        .to_public_key_pem(pem::LineEnding::LF)
        .map_err(std::io::Error::other)?;
    Ok((private.to_string(), public))
}
