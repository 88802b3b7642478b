//! TLS for remote receivers (`https://` Alertmanager and webhooks): rustls with the ring
//! provider, no OpenSSL. The server is verified against the CA file given (`--tls-ca`, a PEM
//! bundle: it replaces the system roots) or else the system's roots; a client certificate and
//! key (`--tls-cert`, `--tls-key`, PEM) are presented when the receiver asks (mTLS).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

/// The files that configure TLS to the receivers; all optional.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM CA certificates the receivers' certificates must chain to (instead of the system's).
    pub ca: Option<PathBuf>,
    /// PEM client certificate chain, presented to receivers that ask for one.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert` (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {what}: {source}", path.display())]
    Pem {
        path: PathBuf,
        what: &'static str,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{}: no certificate in it (expected PEM `BEGIN CERTIFICATE`)", .0.display())]
    NoCertificate(PathBuf),
    #[error("{}: {source}", path.display())]
    BadCa {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("--tls-cert and --tls-key go together (one is missing)")]
    HalfIdentity,
    #[error("client certificate {} with key {}: {source}", cert.display(), key.display())]
    BadIdentity {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("no system CA certificates found (give --tls-ca)")]
    NoSystemRoots,
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_error = |source| TlsError::Pem {
        path: path.to_owned(),
        what: "reading certificates",
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

/// The rustls client configuration for `files`.
pub fn client_config(files: &TlsFiles) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match &files.ca {
        Some(ca) => {
            for cert in certificates(ca)? {
                roots.add(cert).map_err(|source| TlsError::BadCa {
                    path: ca.clone(),
                    source,
                })?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(native.certs);
            if added == 0 {
                return Err(TlsError::NoSystemRoots);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(match (&files.cert, &files.key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let chain = certificates(cert)?;
            let private = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Pem {
                path: key.clone(),
                what: "reading the private key",
                source,
            })?;
            builder
                .with_client_auth_cert(chain, private)
                .map_err(|source| TlsError::BadIdentity {
                    cert: cert.clone(),
                    key: key.clone(),
                    source,
                })?
        }
        _ => return Err(TlsError::HalfIdentity),
    })
}

/// The TLS failure behind a delivery error, if that is what it was (a certificate that does not
/// verify, a handshake the receiver refused), in rustls's words.
pub fn tls_failure(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        // An io::Error's source() is its inner error's source, skipping the inner error itself;
        // rustls's error sits inside one (inside another, from hyper's connector).
        let inner = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref());
        if let Some(found) = inner.and_then(|inner| tls_failure(inner)) {
            return Some(found);
        }
        current = e.source();
    }
    None
}

/// `error` and all its causes, `: `-separated (reqwest's own message names only the URL).
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut current = error.source();
    while let Some(e) = current {
        let cause = e.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        current = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("rm-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_ca_file_without_certificates_is_named_in_the_error() {
        let d = dir("empty");
        let ca = d.join("ca.pem");
        std::fs::write(&ca, "not a certificate\n").unwrap();
        let err = client_config(&TlsFiles {
            ca: Some(ca.clone()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains(&ca.display().to_string()), "{err}");
        let missing = client_config(&TlsFiles {
            ca: Some(d.join("missing.pem")),
            ..Default::default()
        })
        .unwrap_err();
        assert!(missing.to_string().contains("missing.pem"), "{missing}");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_client_certificate_needs_its_key() {
        let d = dir("half");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["agent".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(d.join("ca.pem"), cert.pem()).unwrap();
        std::fs::write(d.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(d.join("key.pem"), key.serialize_pem()).unwrap();
        let mut files = TlsFiles {
            ca: Some(d.join("ca.pem")),
            cert: Some(d.join("cert.pem")),
            key: None,
        };
        assert!(matches!(client_config(&files), Err(TlsError::HalfIdentity)));
        files.key = Some(d.join("key.pem"));
        client_config(&files).expect("CA, certificate and key");
        let _ = std::fs::remove_dir_all(d);
    }
}
