//! `[fleet]`: the fleet's NATS JetStream stream. Which server (`url`, or `run --nats`), the stream
//! and subject prefix (the wire contract is `crate::fleet::message`), the host name in subjects,
//! and how the agent authenticates (a NATS `.creds` file, TLS with a custom CA and an optional
//! client certificate). Files are only named here; they are read when the agent connects.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use toml::Spanned;

use super::{PolicyError, Source, file::FleetSection};

/// Default subject prefix and stream name of the fleet stream (`crate::fleet::message` builds
/// the subjects under the prefix).
pub const DEFAULT_PREFIX: &str = "runner-monitor";
pub const DEFAULT_STREAM: &str = "RUNNER_MONITOR";

/// Duplicate window of a stream the agent creates: a resend within it is dropped by JetStream.
pub const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetConfig {
    /// `nats://...` or `tls://...`, if the policy names the server.
    pub url: Option<String>,
    pub stream: String,
    pub subject_prefix: String,
    /// Host name override (default: the kernel's).
    pub host: Option<String>,
    pub credentials: Option<PathBuf>,
    pub tls: FleetTls,
    pub duplicate_window: Duration,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetTls {
    pub ca: Option<PathBuf>,
    /// Client certificate and its key.
    pub client: Option<(PathBuf, PathBuf)>,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            url: None,
            stream: DEFAULT_STREAM.to_owned(),
            subject_prefix: DEFAULT_PREFIX.to_owned(),
            host: None,
            credentials: None,
            tls: FleetTls::default(),
            duplicate_window: DEFAULT_DUPLICATE_WINDOW,
        }
    }
}

/// Checks a NATS server URL: `nats://` or `tls://` (TLS required) with a host.
pub fn check_url(url: &str) -> Result<(), String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("{url:?}: not a URL (nats://HOST:PORT or tls://HOST:PORT)"))?;
    if scheme != "nats" && scheme != "tls" {
        return Err(format!(
            "{url:?}: scheme {scheme:?} is not supported (nats:// or tls://)"
        ));
    }
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let host = authority.rsplit('@').next().unwrap_or("");
    if host.is_empty() || host.starts_with(':') {
        return Err(format!("{url:?}: no host"));
    }
    Ok(())
}

pub(super) fn compile(f: &FleetSection, src: &Source<'_>) -> Result<FleetConfig, PolicyError> {
    let mut c = FleetConfig::default();
    if let Some(url) = &f.url {
        check_url(url.get_ref()).map_err(|m| src.error(url.span(), "fleet.url", m))?;
        c.url = Some(url.get_ref().clone());
    }
    if let Some(stream) = &f.stream {
        let name = stream.get_ref();
        if name.is_empty()
            || name
                .chars()
                .any(|ch| ch.is_whitespace() || matches!(ch, '.' | '*' | '>' | '/' | '\\'))
        {
            return Err(src.error(
                stream.span(),
                "fleet.stream",
                "a stream name is not empty and has no white space, `.`, `*`, `>`, `/` or `\\`",
            ));
        }
        c.stream = name.clone();
    }
    if let Some(prefix) = &f.subject_prefix {
        let p = prefix.get_ref();
        let bad_token = |t: &str| {
            t.is_empty()
                || t.chars()
                    .any(|ch| ch.is_whitespace() || ch == '*' || ch == '>')
        };
        if p.split('.').any(bad_token) {
            return Err(src.error(
                prefix.span(),
                "fleet.subject_prefix",
                "dot-separated non-empty tokens without white space, `*` or `>`",
            ));
        }
        c.subject_prefix = p.clone();
    }
    if let Some(host) = &f.host {
        if host.get_ref().trim().is_empty() {
            return Err(src.error(host.span(), "fleet.host", "empty"));
        }
        c.host = Some(host.get_ref().clone());
    }
    c.credentials = f
        .credentials
        .as_ref()
        .map(|p| file_path(p, "fleet.credentials", src))
        .transpose()?;
    c.tls.ca = f
        .tls_ca
        .as_ref()
        .map(|p| file_path(p, "fleet.tls_ca", src))
        .transpose()?;
    c.tls.client = match (&f.tls_cert, &f.tls_key) {
        (Some(cert), Some(key)) => Some((
            file_path(cert, "fleet.tls_cert", src)?,
            file_path(key, "fleet.tls_key", src)?,
        )),
        (Some(cert), None) => {
            return Err(src.error(cert.span(), "fleet.tls_key", "tls_cert needs tls_key"));
        }
        (None, Some(key)) => {
            return Err(src.error(key.span(), "fleet.tls_cert", "tls_key needs tls_cert"));
        }
        (None, None) => None,
    };
    if let Some(window) = &f.duplicate_window_seconds {
        if *window.get_ref() == 0 {
            return Err(src.error(
                window.span(),
                "fleet.duplicate_window_seconds",
                "must be at least 1 (the duplicate window is what makes a resend harmless)",
            ));
        }
        c.duplicate_window = Duration::from_secs(*window.get_ref());
    }
    Ok(c)
}

/// A file named in `[fleet]`: absolute, or relative to the policy file's directory.
fn file_path(
    value: &Spanned<String>,
    field: &str,
    src: &Source<'_>,
) -> Result<PathBuf, PolicyError> {
    let path = Path::new(value.get_ref());
    if value.get_ref().is_empty() {
        return Err(src.error(value.span(), field, "empty"));
    }
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    match src.dir {
        Some(dir) => Ok(dir.join(path)),
        None => Err(src.error(
            value.span(),
            field,
            "must be an absolute path (relative paths need a policy file to resolve against)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::super::Policy;
    use super::*;

    #[test]
    fn fleet_section_defaults_to_the_wire_contract_names() {
        let p = Policy::parse("", "t.toml").unwrap();
        assert_eq!(p.fleet, FleetConfig::default());
        assert_eq!(p.fleet.stream, "RUNNER_MONITOR");
        assert_eq!(p.fleet.subject_prefix, "runner-monitor");
    }

    #[test]
    fn fleet_section_reads_every_field() {
        let p = Policy::parse(
            "[fleet]\nurl = \"tls://nats.example:4222\"\nstream = \"CI\"\nsubject_prefix = \"acme.ci\"\n\
             host = \"runner-7\"\ncredentials = \"/etc/rm/agent.creds\"\ntls_ca = \"/etc/rm/ca.pem\"\n\
             tls_cert = \"/etc/rm/c.pem\"\ntls_key = \"/etc/rm/k.pem\"\nduplicate_window_seconds = 120\n",
            "t.toml",
        )
        .unwrap();
        let f = p.fleet;
        assert_eq!(f.url.as_deref(), Some("tls://nats.example:4222"));
        assert_eq!(
            (f.stream.as_str(), f.subject_prefix.as_str()),
            ("CI", "acme.ci")
        );
        assert_eq!(f.host.as_deref(), Some("runner-7"));
        assert_eq!(f.credentials, Some("/etc/rm/agent.creds".into()));
        assert_eq!(f.tls.ca, Some("/etc/rm/ca.pem".into()));
        assert_eq!(
            f.tls.client,
            Some(("/etc/rm/c.pem".into(), "/etc/rm/k.pem".into()))
        );
        assert_eq!(f.duplicate_window, Duration::from_secs(120));
    }

    #[test]
    fn fleet_errors_name_the_file_line_and_field() {
        let cases = [
            (
                "[fleet]\nurl = \"http://x:4222\"\n",
                2,
                "fleet.url",
                "not supported",
            ),
            (
                "[fleet]\n\nstream = \"a.b\"\n",
                3,
                "fleet.stream",
                "white space",
            ),
            (
                "[fleet]\nsubject_prefix = \"a.>\"\n",
                2,
                "fleet.subject_prefix",
                "tokens",
            ),
            (
                "[fleet]\ntls_cert = \"/c.pem\"\n",
                2,
                "fleet.tls_key",
                "needs tls_key",
            ),
            (
                "[fleet]\ncredentials = \"agent.creds\"\n",
                2,
                "fleet.credentials",
                "absolute",
            ),
            (
                "[fleet]\nduplicate_window_seconds = 0\n",
                2,
                "fleet.duplicate_window_seconds",
                "at least 1",
            ),
            (
                "[fleet]\ncreds = \"/a\"\n",
                2,
                "fleet.creds",
                "unknown field",
            ),
        ];
        for (text, line, field, message) in cases {
            let e = Policy::parse(text, "p.toml").unwrap_err();
            assert_eq!((e.origin.as_str(), e.line), ("p.toml", line), "{text}: {e}");
            assert_eq!(e.field, field, "{text}: {e}");
            assert!(e.message.contains(message), "{text}: {e}");
        }
    }

    #[test]
    fn relative_fleet_files_resolve_against_the_policy_directory() {
        let dir = std::env::temp_dir().join(format!("rm-fleet-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("policy.toml");
        std::fs::write(&path, "[fleet]\ncredentials = \"agent.creds\"\n").unwrap();
        let p = Policy::load(&path).unwrap();
        assert_eq!(p.fleet.credentials, Some(dir.join("agent.creds")));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn nats_urls_are_nats_or_tls_with_a_host() {
        assert!(check_url("nats://127.0.0.1:4222").is_ok());
        assert!(check_url("tls://user:pw@nats.example:4222").is_ok());
        assert!(check_url("nats://:4222").is_err());
        assert!(check_url("127.0.0.1:4222").is_err());
        assert!(check_url("https://x").is_err());
    }
}
