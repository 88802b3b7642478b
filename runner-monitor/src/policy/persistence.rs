//! `[[persistence]]`: paths that something outside a job runs or reads later (cron, systemd, `at`,
//! `ld.so.preload`, shell profiles, `authorized_keys`, the runner's own files, git hooks, tool
//! configs a later job uses). A job process creating or changing one is `persistence-planted`.

use globset::{GlobSet, GlobSetBuilder};

use super::{PolicyError, Source, file, glob::path_glob, sensor};

/// The techniques a persistence kind may name: id and name, as ATT&CK writes them.
pub const TECHNIQUES: &[(&str, &str)] = &[
    ("T1053", "Scheduled Task/Job"),
    ("T1053.002", "Scheduled Task/Job: At"),
    ("T1053.003", "Scheduled Task/Job: Cron"),
    ("T1053.006", "Scheduled Task/Job: Systemd Timers"),
    ("T1543", "Create or Modify System Process"),
    (
        "T1543.002",
        "Create or Modify System Process: Systemd Service",
    ),
    ("T1546", "Event Triggered Execution"),
    (
        "T1546.004",
        "Event Triggered Execution: Unix Shell Configuration Modification",
    ),
    ("T1098.004", "Account Manipulation: SSH Authorized Keys"),
    ("T1574", "Hijack Execution Flow"),
    (
        "T1574.006",
        "Hijack Execution Flow: Dynamic Linker Hijacking",
    ),
    (
        "T1574.007",
        "Hijack Execution Flow: Path Interception by PATH Environment Variable",
    ),
];

/// The name of a technique id `TECHNIQUES` knows.
pub fn technique_name(id: &str) -> Option<&'static str> {
    TECHNIQUES.iter().find(|(i, _)| *i == id).map(|(_, n)| *n)
}

/// A kind of persistence and the globs of its paths.
#[derive(Debug, Clone)]
pub struct PersistenceKind {
    pub kind: String,
    /// ATT&CK technique id (one of `TECHNIQUES`).
    pub technique: String,
    /// The runner's own files (its `.env`, `.path`, hook scripts, configuration): critical.
    pub runner: bool,
    /// Only other users' files count (see `PersistenceKind::applies_to`).
    pub other_users_only: bool,
    pub patterns: Vec<String>,
}

impl PersistenceKind {
    /// Whether a write to `path` by a process of `uid` counts. For `other_users_only` kinds a
    /// process writing its own files does not: root's are under `/root`; a process of another
    /// user can write only its own home (permissions keep it out of the others'), so for it only
    /// `/root` is someone else's. Tool installers (rustup, nvm, conda) edit their user's profile.
    pub fn applies_to(&self, path: &str, uid: u32) -> bool {
        if !self.other_users_only {
            return true;
        }
        let in_root_home = path.starts_with("/root/");
        if uid == 0 {
            !in_root_home
        } else {
            in_root_home
        }
    }
}

/// The compiled section: kinds, one glob set over all their paths, and for each glob its kind.
pub(super) struct CompiledPersistence {
    pub kinds: Vec<PersistenceKind>,
    pub set: GlobSet,
    pub owner: Vec<usize>,
}

/// Checks and compiles `[[persistence]]`; every error names its field.
pub(super) fn compile(
    sections: &[file::PersistenceSection],
    src: &Source<'_>,
) -> Result<CompiledPersistence, PolicyError> {
    let mut kinds = Vec::new();
    let mut builder = GlobSetBuilder::new();
    let mut owner = Vec::new();
    for (i, s) in sections.iter().enumerate() {
        let kind = s.kind.get_ref().trim();
        if kind.is_empty() {
            return Err(src.error(s.kind.span(), &format!("persistence[{i}].kind"), "empty"));
        }
        let technique = s.technique.get_ref().trim();
        if technique_name(technique).is_none() {
            let known: Vec<&str> = TECHNIQUES.iter().map(|(id, _)| *id).collect();
            return Err(src.error(
                s.technique.span(),
                &format!("persistence[{i}].technique"),
                format!(
                    "unknown technique {technique:?}; one of {}",
                    known.join(", ")
                ),
            ));
        }
        if s.paths.is_empty() {
            return Err(src.error(
                s.kind.span(),
                &format!("persistence[{i}].paths"),
                "no paths",
            ));
        }
        let mut patterns = Vec::new();
        for (j, p) in s.paths.iter().enumerate() {
            let field = format!("persistence[{i}].paths[{j}]");
            let glob =
                path_glob(p.get_ref()).map_err(|e| src.error(p.span(), &field, e.to_string()))?;
            if !p.get_ref().starts_with('/') && !p.get_ref().starts_with("**/") {
                return Err(src.error(p.span(), &field, "must be absolute or start with **/"));
            }
            sensor::kernel_name(p.get_ref()).map_err(|m| src.error(p.span(), &field, m))?;
            builder.add(glob);
            owner.push(kinds.len());
            patterns.push(p.get_ref().clone());
        }
        kinds.push(PersistenceKind {
            kind: kind.to_owned(),
            technique: technique.to_owned(),
            runner: s.runner,
            other_users_only: s.other_users_only,
            patterns,
        });
    }
    let set = builder
        .build()
        .map_err(|e| src.error(0..0, "persistence", e.to_string()))?;
    Ok(CompiledPersistence { kinds, set, owner })
}

#[cfg(test)]
mod tests {
    use super::super::Policy;

    #[test]
    fn builtin_policy_knows_the_usual_persistence_paths() {
        let p = Policy::builtin();
        let kind = |path: &str| p.persistence_of(path).map(|k| k.kind.as_str());
        assert_eq!(kind("/etc/cron.d/x"), Some("cron"));
        assert_eq!(kind("/etc/crontab"), Some("cron"));
        assert_eq!(kind("/var/spool/cron/crontabs/root"), Some("cron"));
        assert_eq!(kind("/var/spool/cron/atjobs/a0001"), Some("at"));
        assert_eq!(kind("/etc/systemd/system/evil.service"), Some("systemd"));
        assert_eq!(
            kind("/home/runner/.config/systemd/user/evil.timer"),
            Some("systemd")
        );
        assert_eq!(kind("/etc/ld.so.preload"), Some("ld-preload"));
        assert_eq!(kind("/home/runner/.bashrc"), Some("shell-profile"));
        assert_eq!(kind("/etc/profile.d/x.sh"), Some("system-profile"));
        assert_eq!(
            kind("/home/ci/.ssh/authorized_keys"),
            Some("authorized-keys")
        );
        assert_eq!(
            kind("/home/runner/_work/r/r/.git/hooks/post-checkout"),
            Some("git-hook")
        );
        assert_eq!(
            kind("/home/runner/.gradle/init.d/x.gradle"),
            Some("tool-config")
        );
        let runner = p
            .persistence_of("/home/runner/actions-runner/.env")
            .unwrap();
        assert!(runner.runner);
        assert!(
            p.persistence_of("/usr/share/runner-monitor/hooks/github/job-started.sh")
                .unwrap()
                .runner
        );
        // What jobs write all day is not persistence.
        assert_eq!(kind("/home/runner/_work/r/r/.env"), None);
        assert_eq!(
            kind("/home/runner/_work/r/r/.git/hooks/pre-commit.sample"),
            None
        );
        assert_eq!(kind("/lib/systemd/system/nginx.service"), None);
        assert_eq!(kind("/etc/hosts"), None);
    }

    #[test]
    fn own_profile_is_not_someone_elses() {
        let p = Policy::builtin();
        let profile = p.persistence_of("/root/.bashrc").unwrap();
        assert!(!profile.applies_to("/root/.bashrc", 0));
        assert!(profile.applies_to("/root/.bashrc", 1001));
        assert!(profile.applies_to("/home/runner/.bashrc", 0));
        assert!(!profile.applies_to("/home/runner/.bashrc", 1001));
        let keys = p.persistence_of("/root/.ssh/authorized_keys").unwrap();
        assert!(keys.applies_to("/root/.ssh/authorized_keys", 0));
    }

    #[test]
    fn persistence_errors_name_file_line_and_field() {
        let text = "[[persistence]]\nkind = \"cron\"\ntechnique = \"T9999\"\npaths = [\"/etc/cron.d/*\"]\n";
        let e = Policy::parse(text, "p.toml").unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (3, "persistence[0].technique"));
        assert!(e.message.contains("T1053.003"), "{e}");
        assert!(e.to_string().starts_with("p.toml:3:"), "{e}");

        let text = "[[persistence]]\nkind = \"x\"\ntechnique = \"T1053\"\npaths = [\"/etc/cron.d/*\", \"**/*.service\"]\n";
        let e = Policy::parse(text, "p.toml").unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (4, "persistence[0].paths[1]"));

        let text =
            "[[persistence]]\nkind = \"x\"\ntechnique = \"T1053\"\npaths = [\"etc/cron.d/*\"]\n";
        let e = Policy::parse(text, "p.toml").unwrap_err();
        assert!(e.message.contains("absolute"), "{e}");

        let text = "[[persistence]]\nkind = \"x\"\ntechnique = \"T1053\"\npath = [\"/etc/x\"]\n";
        let e = Policy::parse(text, "p.toml").unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (4, "persistence.path"), "{e}");
        assert!(e.message.contains("unknown field `path`"), "{e}");
    }

    #[test]
    fn persistence_paths_reach_the_kernel_prefilter() {
        let p = Policy::parse(
            "[[persistence]]\nkind = \"x\"\ntechnique = \"T1053\"\npaths = [\"/opt/jobs.d/*\", \"/etc/evil.conf\"]\n",
            "p.toml",
        )
        .unwrap();
        let s = p.sensor_policy();
        assert!(s.credential_dirnames.iter().any(|d| d == "jobs.d"), "{s:?}");
        assert!(
            s.credential_basenames.iter().any(|b| b == "evil.conf"),
            "{s:?}"
        );
    }

    #[test]
    fn builtin_persistence_names_are_in_the_kernel_prefilter() {
        let s = Policy::builtin().sensor_policy();
        for dir in [
            "cron.d",
            "crontabs",
            "atjobs",
            "system",
            "user",
            "profile.d",
            "init.d",
        ] {
            assert!(
                s.credential_dirnames.iter().any(|d| d == dir),
                "{dir}: {s:?}"
            );
        }
        for base in [
            "ld.so.preload",
            "crontab",
            ".env",
            "authorized_keys",
            "post-checkout",
        ] {
            assert!(
                s.credential_basenames.iter().any(|b| b == base),
                "{base}: {s:?}"
            );
        }
        let names = s.credential_basenames.len()
            + s.credential_dirnames.len()
            + s.credential_prefixes.len();
        // The kernel's NAMES map holds 1024 entries, job-root names included.
        assert!(names < 200, "{names} names");
        println!(
            "kernel names: {} basenames, {} dirnames, {} prefixes",
            s.credential_basenames.len(),
            s.credential_dirnames.len(),
            s.credential_prefixes.len()
        );
    }
}
