//! The correlator's NATS connection: `tls://` with rustls (a custom CA, a client certificate) and
//! a `.creds` file, as the agents' `[fleet]` options have them.

use anyhow::Context as _;

use super::FleetArgs;

fn readable(path: &std::path::Path, flag: &str) -> anyhow::Result<()> {
    std::fs::metadata(path)
        .map(|_| ())
        .with_context(|| format!("{flag} {}", path.display()))
}

pub async fn connect(args: &FleetArgs) -> anyhow::Result<async_nats::Client> {
    let mut options = match &args.creds {
        Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
            .await
            .with_context(|| {
                format!("reading the NATS credentials {} (--creds)", path.display())
            })?,
        None => async_nats::ConnectOptions::new(),
    };
    options = options.name("runner-monitor-fleet");
    if args.nats.starts_with("tls://") {
        options = options.require_tls(true);
    }
    if let Some(ca) = &args.tls_ca {
        readable(ca, "--tls-ca")?;
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        readable(cert, "--tls-cert")?;
        readable(key, "--tls-key")?;
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    options
        .connect(args.nats.as_str())
        .await
        .with_context(|| format!("connecting to {} (--nats)", args.nats))
}
