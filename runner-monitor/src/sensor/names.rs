//! The kernel's name sets: credential names and aliases, job roots and parents, job identity
//! variables, and the settings that go with them.

use std::collections::BTreeSet;

use runner_monitor_common::{
    JOB_ENV_INDEX, JOB_ENV_MARKER, MAX_PREFIX_LEN, NAME_KIND_BASENAME, NAME_KIND_DIRNAME,
    NAME_KIND_ENV_VAR, NAME_KIND_JOB_PARENT_COMM, NAME_KIND_JOB_ROOT_EXE, NAME_KIND_PREFIX,
    NAME_KIND_RUNTIME_SOCKET, NAME_LEN, NameKey, env_prefix_key, file_name_hash, map_name, setting,
};

use super::{MAX_ALIAS_NAMES, Sensor, SensorError, attach};
use crate::policy::SensorPolicy;

impl Sensor {
    /// Makes the kernel report opens of files named `names` (basenames of credential aliases,
    /// `identity`), up to `MAX_ALIAS_NAMES`; returns how many were refused for lack of room.
    pub fn add_alias_names(&mut self, names: Vec<String>) -> Result<usize, SensorError> {
        let mut refused = 0;
        for name in names {
            if self.alias_names.contains(&name) {
                continue;
            }
            if !file_name_fits(NAME_KIND_BASENAME, &name)
                || self.alias_names.len() >= MAX_ALIAS_NAMES
            {
                refused += 1;
                continue;
            }
            self.file_names
                .insert(file_name_hash(NAME_KIND_BASENAME, name.as_bytes()), 1, 0)
                .map_err(|source| SensorError::Map {
                    name: map_name::FILE_NAMES,
                    source,
                })?;
            self.alias_names.insert(name);
        }
        Ok(refused)
    }

    /// Makes the kernel's name sets those of `policy`: credential names, job-root executables,
    /// job parents and job identity variables. Used at load and on policy reload; names no
    /// longer wanted are removed after the new ones are in, so a reload never opens a gap.
    pub fn set_names(&mut self, policy: &SensorPolicy) -> Result<(), SensorError> {
        let map_error = |source| SensorError::Map {
            name: map_name::NAMES,
            source,
        };
        let file_map_error = |source| SensorError::Map {
            name: map_name::FILE_NAMES,
            source,
        };
        let mut wanted_files = BTreeSet::new();
        for name in &self.alias_names {
            wanted_files.insert(file_name_hash(NAME_KIND_BASENAME, name.as_bytes()));
        }
        for (kind, list) in [
            (NAME_KIND_BASENAME, &policy.credential_basenames),
            (NAME_KIND_DIRNAME, &policy.credential_dirnames),
            (NAME_KIND_PREFIX, &policy.credential_prefixes),
        ] {
            for name in list {
                if !file_name_fits(kind, name) {
                    return Err(SensorError::NameTooLong(name.clone()));
                }
                let hash = file_name_hash(kind, name.as_bytes());
                wanted_files.insert(hash);
                self.file_names.insert(hash, 1, 0).map_err(file_map_error)?;
            }
        }
        remove_stale(&mut self.file_names, |k| wanted_files.contains(k)).map_err(file_map_error)?;
        let mut wanted = BTreeSet::new();
        for (kind, list) in [
            (NAME_KIND_JOB_ROOT_EXE, &policy.job_root_executables),
            (NAME_KIND_JOB_PARENT_COMM, &policy.job_parent_executables),
            (NAME_KIND_RUNTIME_SOCKET, &policy.runtime_socket_names),
        ] {
            for name in list {
                let key = NameKey::new(kind, name.as_bytes())
                    .ok_or_else(|| SensorError::NameTooLong(name.clone()))?;
                wanted.insert(key_bytes(&key));
                self.names.insert(key, 1, 0).map_err(map_error)?;
            }
        }
        // Job identity variables: the value says which (index) and what (marker, value).
        let mut prefixes = BTreeSet::new();
        for (index, (name, bits)) in policy.job_env_vars.iter().enumerate() {
            let key = NameKey::new(NAME_KIND_ENV_VAR, name.as_bytes())
                .filter(|_| name.len() < NAME_LEN - 1 && index as u32 <= JOB_ENV_INDEX)
                .ok_or_else(|| SensorError::NameTooLong(name.clone()))?;
            wanted.insert(key_bytes(&key));
            self.names
                .insert(key, index as u32 | bits, 0)
                .map_err(map_error)?;
            prefixes.insert(env_prefix_key(name.as_bytes()));
        }
        let prefix_error = |source| SensorError::Map {
            name: map_name::ENV_PREFIXES,
            source,
        };
        for prefix in &prefixes {
            self.env_prefixes
                .insert(prefix, 1, 0)
                .map_err(prefix_error)?;
        }
        remove_stale(&mut self.env_prefixes, |k| prefixes.contains(k)).map_err(prefix_error)?;
        remove_stale(&mut self.names, |k| wanted.contains(&key_bytes(k))).map_err(map_error)?;
        let settings_error = |source| SensorError::Map {
            name: map_name::SETTINGS,
            source,
        };
        self.settings
            .set(
                setting::PREFIX_LENGTHS,
                prefix_length_mask(&policy.credential_prefixes),
                0,
            )
            .map_err(settings_error)?;
        let markers = policy
            .job_env_vars
            .iter()
            .filter(|(_, bits)| bits & JOB_ENV_MARKER != 0)
            .count();
        self.settings
            .set(setting::JOB_ENV, markers as u32, 0)
            .map_err(settings_error)?;
        self.settings
            .set(
                setting::JOB_PARENTS,
                policy.job_parent_executables.len() as u32,
                0,
            )
            .map_err(settings_error)?;
        let per_window = (u64::from(policy.job_events_per_second)
            * runner_monitor_common::BUDGET_WINDOW_NS
            / 1_000_000_000) as u32;
        let per_window = if policy.job_events_per_second > 0 {
            per_window.max(1)
        } else {
            0
        };
        self.settings
            .set(setting::JOB_EVENTS_PER_WINDOW, per_window, 0)
            .map_err(settings_error)?;
        // The global allowlist is in before block mode is switched on.
        self.egress
            .set_global(&policy.egress, &policy.metadata_endpoints)?;
        self.settings
            .set(setting::EGRESS_MODE, u32::from(policy.egress.block), 0)
            .map_err(settings_error)?;
        self.settings
            .set(
                setting::AGENT_FAILURE_CLOSED,
                u32::from(policy.failure_closed),
                0,
            )
            .map_err(settings_error)?;
        self.settings
            .set(
                setting::EXIT_GROUP_DEAD,
                attach::exit_group_dead_offset().unwrap_or(0),
                0,
            )
            .map_err(settings_error)?;
        Ok(())
    }
}

/// Removes the keys of `map` that `keep` does not want (after the wanted ones are in, so a
/// reload never opens a gap).
pub(super) fn remove_stale<K: aya::Pod, V: aya::Pod>(
    map: &mut aya::maps::HashMap<aya::maps::MapData, K, V>,
    keep: impl Fn(&K) -> bool,
) -> Result<(), aya::maps::MapError> {
    let stale: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !keep(k))
        .collect();
    for key in stale {
        map.remove(&key)?;
    }
    Ok(())
}

/// Whether a credential name of `kind` can be matched in the kernel: not empty, at most
/// `NAME_LEN` bytes, and a prefix at most `MAX_PREFIX_LEN`.
fn file_name_fits(kind: u32, name: &str) -> bool {
    let max = if kind == NAME_KIND_PREFIX {
        MAX_PREFIX_LEN
    } else {
        NAME_LEN
    };
    (1..=max).contains(&name.len())
}

/// A name key as bytes, to compare keys (the kernel struct has no `Ord`).
fn key_bytes(key: &NameKey) -> Vec<u8> {
    let mut out = key.kind.to_le_bytes().to_vec();
    out.extend_from_slice(&key.len.to_le_bytes());
    out.extend_from_slice(&key.name);
    out
}

/// Bit n-1 set for each prefix length n in use.
fn prefix_length_mask(prefixes: &[String]) -> u32 {
    prefixes
        .iter()
        .map(|p| p.len())
        .filter(|n| (1..=MAX_PREFIX_LEN).contains(n))
        .fold(0, |mask, n| mask | 1 << (n - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_mask_has_one_bit_per_length() {
        assert_eq!(prefix_length_mask(&["id_".into()]), 0b100);
        assert_eq!(
            prefix_length_mask(&["id_".into(), "ab".into(), "x".repeat(40)]),
            0b110
        );
        assert_eq!(prefix_length_mask(&[]), 0);
    }
}
