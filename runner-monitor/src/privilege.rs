//! The capabilities the agent needs, checked at start-up: a missing one is an error that names it
//! and says what it is for, instead of an EPERM deep inside a program load.
//!
//! The list was found by experiment on Linux 6.18, running the agent as an unprivileged user with
//! ambient capabilities and removing each in turn (packaging/README.md, "Capabilities";
//! `tests/tests/privilege.rs` keeps it true). Not on it: CAP_SYS_RESOURCE (since Linux 5.11 BPF
//! memory is charged to the memory cgroup, not RLIMIT_MEMLOCK) and CAP_SYS_ADMIN, except to mount
//! tracefs when nothing has.

use std::{collections::HashSet, fmt, path::Path};

pub use caps::Capability;

/// When the agent needs a capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum When {
    /// Always: the agent does not start without it.
    Always,
    /// For an optional sensor: without it the agent starts, warns, and reports the sensor
    /// detached.
    Optional,
    /// Only when tracefs is not mounted (the agent mounts it).
    TracefsUnmounted,
    /// Only with `--runner-user` (the control socket gets the runner user's group).
    RunnerUser,
}

/// One capability, why the agent needs it and what fails without it.
#[derive(Debug)]
pub struct Requirement {
    pub capability: Capability,
    pub when: When,
    /// What the agent does with it.
    pub why: &'static str,
    /// What fails without it (found by experiment).
    pub without: &'static str,
}

/// Every capability the agent uses.
pub const REQUIREMENTS: &[Requirement] = &[
    Requirement {
        capability: Capability::CAP_BPF,
        when: When::Always,
        why: "to create the kernel maps and load the kernel programs",
        without: "the first map creation is refused (EPERM): nothing loads",
    },
    Requirement {
        capability: Capability::CAP_PERFMON,
        when: When::Always,
        why: "to load the tracing programs and attach them to tracepoints (perf events), and to \
              pass the kernel's ptrace-read check on /proc/<pid>/environ (job identity)",
        without: "every tracepoint program is refused (EPERM): the required process probes do \
                  not load",
    },
    Requirement {
        capability: Capability::CAP_DAC_READ_SEARCH,
        when: When::Always,
        why: "to read tracefs (/sys/kernel/tracing is root-only), the environment of job \
              processes of other users (/proc/<pid>/environ, mode 0400: job identity) and their \
              credential files (fingerprints)",
        without: "as a non-root user tracefs is unreadable and no tracepoint attaches; as root, \
                  jobs of the runner user stay unnamed and their credentials are not \
                  fingerprinted",
    },
    Requirement {
        capability: Capability::CAP_SYS_PTRACE,
        when: When::Always,
        why: "to read the working directory of job processes of other users \
              (/proc/<pid>/cwd), which resolves the relative paths they open",
        without: "a credential opened by a relative path (`cd ~/.aws; cat credentials`) is not \
                  recognised: no finding",
    },
    Requirement {
        capability: Capability::CAP_NET_ADMIN,
        when: When::Optional,
        why: "to load and attach the DNS sensor's cgroup_sock_addr and cgroup_skb programs",
        without: "the DNS sensor is off (reported as sensor-degraded): egress findings carry no \
                  DNS name and allowlist entries by DNS name cannot match",
    },
    Requirement {
        capability: Capability::CAP_CHOWN,
        when: When::RunnerUser,
        why: "to give the control socket the runner user's group (--runner-user)",
        without: "the control socket cannot be set up: the agent does not start",
    },
    Requirement {
        capability: Capability::CAP_SYS_ADMIN,
        when: When::TracefsUnmounted,
        why: "to mount tracefs at /sys/kernel/tracing, which nothing has mounted (not needed \
              once it is mounted, e.g. by systemd's sys-kernel-tracing.mount)",
        without: "no tracepoint attaches",
    },
];

/// What the agent is about to do, which decides the conditional requirements.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Setup {
    pub tracefs_mounted: bool,
    pub runner_user: bool,
}

impl Setup {
    /// This host, for an agent started with or without `--runner-user`.
    pub fn here(runner_user: bool) -> Self {
        Self {
            tracefs_mounted: tracefs_mounted(),
            runner_user,
        }
    }

    fn needs(&self, when: When) -> bool {
        match when {
            When::Always | When::Optional => true,
            When::TracefsUnmounted => !self.tracefs_mounted,
            When::RunnerUser => self.runner_user,
        }
    }
}

/// The requirements a capability set does not meet.
#[derive(Debug, Default)]
pub struct Assessment {
    /// Without these the agent must not start.
    pub missing: Vec<&'static Requirement>,
    /// Without these an optional sensor is off.
    pub degraded: Vec<&'static Requirement>,
}

/// Compares `have` (effective capabilities) with what `setup` needs.
pub fn assess(have: &HashSet<Capability>, setup: &Setup) -> Assessment {
    let mut out = Assessment::default();
    for r in REQUIREMENTS {
        if !setup.needs(r.when) || have.contains(&r.capability) {
            continue;
        }
        if r.when == When::Optional {
            out.degraded.push(r);
        } else {
            out.missing.push(r);
        }
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("reading the agent's capabilities: {0}")]
    Read(#[from] caps::errors::CapsError),
    #[error("{}", Missing(.0))]
    Missing(Vec<&'static Requirement>),
}

struct Missing<'a>(&'a [&'static Requirement]);

impl fmt::Display for Missing<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = if self.0.len() == 1 { "y" } else { "ies" };
        write!(f, "missing capabilit{plural}: ")?;
        for (n, r) in self.0.iter().enumerate() {
            if n > 0 {
                f.write_str("; ")?;
            }
            write!(
                f,
                "{} is needed {} (without it: {})",
                r.capability, r.why, r.without
            )?;
        }
        let them = if self.0.len() == 1 { "it" } else { "them" };
        write!(
            f,
            ". Grant {them} (systemd: AmbientCapabilities=, as in \
             packaging/systemd/runner-monitor.service) or run as root"
        )
    }
}

/// The calling thread's effective capabilities (every thread has the same at start-up).
pub fn effective() -> Result<HashSet<Capability>, PrivilegeError> {
    Ok(caps::read(None, caps::CapSet::Effective)?)
}

/// Checks the effective capabilities: an error naming every missing required one; the optional
/// ones missing are returned, for the caller to warn about.
pub fn check(setup: &Setup) -> Result<Vec<&'static Requirement>, PrivilegeError> {
    let assessment = assess(&effective()?, setup);
    if !assessment.missing.is_empty() {
        return Err(PrivilegeError::Missing(assessment.missing));
    }
    Ok(assessment.degraded)
}

/// Is tracefs mounted where the agent looks for it? Read from the mount table, which needs no
/// permission on tracefs itself (it is root-only).
pub fn tracefs_mounted() -> bool {
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|table| tracefs_in_mountinfo(&table))
        // With debugfs mounted, tracefs is an automount below it that looking in mounts.
        || Path::new("/sys/kernel/debug/tracing/events").is_dir()
}

fn tracefs_in_mountinfo(table: &str) -> bool {
    table.lines().any(|line| {
        // "... <mount point> <options> - <fstype> <source> <super options>"
        let Some((left, right)) = line.split_once(" - ") else {
            return false;
        };
        right.split_whitespace().next() == Some("tracefs")
            && left.split_whitespace().nth(4).is_some_and(|point| {
                crate::sensor::attach::TRACEFS_DIRS
                    .iter()
                    .any(|dir| Path::new(point) == Path::new(dir))
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_but(missing: &[Capability]) -> HashSet<Capability> {
        REQUIREMENTS
            .iter()
            .map(|r| r.capability)
            .filter(|c| !missing.contains(c))
            .collect()
    }

    #[test]
    fn each_missing_required_capability_is_named_with_its_purpose() {
        let setup = Setup {
            tracefs_mounted: true,
            runner_user: true,
        };
        for r in REQUIREMENTS.iter().filter(|r| setup.needs(r.when)) {
            let a = assess(&all_but(&[r.capability]), &setup);
            if r.when == When::Optional {
                assert!(a.missing.is_empty(), "{}", r.capability);
                assert_eq!(a.degraded.len(), 1);
                continue;
            }
            assert_eq!(a.missing.len(), 1, "{}", r.capability);
            let message = PrivilegeError::Missing(a.missing).to_string();
            assert!(
                message.starts_with(&format!(
                    "missing capability: {} is needed to ",
                    r.capability
                )),
                "{message}"
            );
            assert!(message.contains(r.without), "{message}");
        }
    }

    #[test]
    fn conditional_capabilities_are_needed_only_in_their_situation() {
        let have = all_but(&[Capability::CAP_SYS_ADMIN, Capability::CAP_CHOWN]);
        let mounted = Setup {
            tracefs_mounted: true,
            runner_user: false,
        };
        assert!(assess(&have, &mounted).missing.is_empty());
        let unmounted = Setup {
            tracefs_mounted: false,
            ..mounted
        };
        let missing: Vec<Capability> = assess(&have, &unmounted)
            .missing
            .iter()
            .map(|r| r.capability)
            .collect();
        assert_eq!(missing, [Capability::CAP_SYS_ADMIN]);
        let runner = Setup {
            runner_user: true,
            ..mounted
        };
        let missing: Vec<Capability> = assess(&have, &runner)
            .missing
            .iter()
            .map(|r| r.capability)
            .collect();
        assert_eq!(missing, [Capability::CAP_CHOWN]);
    }

    #[test]
    fn several_missing_capabilities_are_all_named_in_one_error() {
        let message =
            PrivilegeError::Missing(assess(&HashSet::new(), &Setup::default()).missing).to_string();
        assert!(
            message.starts_with("missing capabilities: CAP_BPF"),
            "{message}"
        );
        for name in [
            "CAP_PERFMON",
            "CAP_DAC_READ_SEARCH",
            "CAP_SYS_PTRACE",
            "CAP_SYS_ADMIN",
        ] {
            assert!(message.contains(name), "{name} in {message}");
        }
        assert!(!message.contains("CAP_NET_ADMIN"), "optional: {message}");
    }

    #[test]
    fn tracefs_is_found_in_the_mount_table_at_either_place() {
        let line = |point: &str, fs: &str| {
            format!(
                "40 25 0:12 / {point} rw,nosuid,nodev,noexec,relatime shared:14 - {fs} {fs} rw\n"
            )
        };
        assert!(tracefs_in_mountinfo(&line(
            "/sys/kernel/tracing",
            "tracefs"
        )));
        assert!(tracefs_in_mountinfo(&line(
            "/sys/kernel/debug/tracing",
            "tracefs"
        )));
        assert!(!tracefs_in_mountinfo(&line("/mnt/tracing", "tracefs")));
        assert!(!tracefs_in_mountinfo(&line(
            "/sys/kernel/tracing",
            "debugfs"
        )));
        assert!(!tracefs_in_mountinfo(""));
    }
}
