//! Policy: what counts as a credential, which executables start a job. The built-in default works
//! with no file. (The TOML policy file and the per-repository rules build on this.)

/// What the kernel-side prefilter needs: names, not globs. A path passes when its basename, its
/// last directory name, or a prefix of its basename is listed; the agent then applies the full
/// policy to the resolved path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SensorPolicy {
    /// Exact basenames of credential files.
    pub credential_basenames: Vec<String>,
    /// Directories whose every file is a credential (`.ssh`, `.aws`).
    pub credential_dirnames: Vec<String>,
    /// Basename prefixes of credential files (`id_` for SSH keys), at most 16 bytes each.
    pub credential_prefixes: Vec<String>,
    /// Executable basenames that start a job when executed (`Runner.Worker`).
    pub job_root_executables: Vec<String>,
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

impl Default for SensorPolicy {
    fn default() -> Self {
        Self {
            credential_basenames: strings(&[
                // docker login
                "config.json",
                ".dockercfg",
                // aws, cargo
                "credentials",
                "credentials.toml",
                // gcloud
                "credentials.db",
                "access_tokens.db",
                "application_default_credentials.json",
                "adc.json",
                // azure
                "accessTokens.json",
                "msal_token_cache.json",
                "msal_token_cache.bin",
                // gh auth
                "hosts.yml",
                // git, npm, pypi, netrc, vault
                ".git-credentials",
                ".npmrc",
                ".pypirc",
                ".netrc",
                ".vault-token",
                // the self-hosted runner's own registration
                ".credentials",
                ".credentials_rsaparams",
                ".runner",
            ]),
            credential_dirnames: strings(&[".ssh", ".aws", ".kube", ".docker", "gcloud", ".azure"]),
            credential_prefixes: strings(&["id_"]),
            job_root_executables: strings(&["Runner.Worker"]),
        }
    }
}
