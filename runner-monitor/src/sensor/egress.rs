//! Block mode's kernel maps (`runner-monitor-ebpf/src/egress.rs`): each job's plan
//! (`Policy::egress_plan`) compiled into allowlist entries under a policy id of its own, and the
//! global plan under `EGRESS_GLOBAL_POLICY` for jobs whose rules are not known yet.
//!
//! Every change writes the new entries before it points a job at them and removes the old ones
//! after, so a reload never refuses what both the old and the new policy allow.

use std::{
    collections::{BTreeSet, HashMap as StdHashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
};

use aya::maps::{HashMap, MapData, lpm_trie::LpmTrie};
use runner_monitor_common::{
    EGRESS_BLOCK, EGRESS_GLOBAL_POLICY, EGRESS_MAX_POLICY, EGRESS_METADATA_ENTITLED, EGRESS_SNI,
    EgressJob, TLS_NAME_EXACT, TLS_NAME_WILDCARD, map_name,
    tls::{TlsNameKey, sni_hash},
};

use super::{
    SensorError,
    allowlists::{Allowlists, EntryKey, SharedAllowlists, entries},
    map_error,
};
use crate::{event::JobKey, policy::EgressPlan};

/// The programs that refuse egress in block mode (they also watch DNS sockets, hence the names),
/// and `dns_recvmsg4`/`dns_recvmsg6`, without which answers from the agent's resolver would not
/// look like the server's and resolvers would drop them.
pub const ENFORCING_PROGRAMS: [&str; 7] = [
    "dns_connect4",
    "dns_connect6",
    "dns_sendmsg4",
    "dns_sendmsg6",
    "dns_recvmsg4",
    "dns_recvmsg6",
    "raw_socket_create",
];

/// The program that refuses TLS to server names outside the allowlist (`sni = true`).
pub const SNI_PROGRAM: &str = "packet_egress";

/// The programs block mode needs under `policy` that are not among the attached `probes`: block
/// mode can only report (or, for `packet_egress`, not check server names) while any is missing.
pub fn missing_enforcement(
    probes: &[super::ProbeStatus],
    policy: &crate::policy::Policy,
) -> Vec<&'static str> {
    let sni = policy.checks_sni().then_some(SNI_PROGRAM);
    ENFORCING_PROGRAMS
        .iter()
        .copied()
        .chain(sni)
        .filter(|name| {
            !probes
                .iter()
                .any(|p| p.program == *name && p.state == super::ProbeState::Attached)
        })
        .collect()
}

/// The `TLS_NAMES` keys of `plan` under policy id `policy`: its DNS names, exact or `*.`
/// wildcards, when it blocks and a rule says `sni = true`; ports do not matter here (the
/// address check has them).
fn sni_names(policy: u32, plan: &EgressPlan) -> BTreeSet<TlsNameKey> {
    if !(plan.block && plan.sni) {
        return BTreeSet::new();
    }
    plan.names
        .iter()
        .map(|(name, _)| match name.strip_prefix("*.") {
            Some(suffix) => TlsNameKey {
                policy,
                kind: TLS_NAME_WILDCARD,
                hash: sni_hash(suffix.as_bytes()),
            },
            None => TlsNameKey {
                policy,
                kind: TLS_NAME_EXACT,
                hash: sni_hash(name.as_bytes()),
            },
        })
        .collect()
}

/// An address as `EGRESS_METADATA` keys it: IPv4 in its mapped form.
fn metadata_key(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

pub struct EgressMaps {
    jobs: HashMap<MapData, u64, EgressJob>,
    lists: SharedAllowlists,
    metadata: HashMap<MapData, [u8; 16], u32>,
    /// The server names `sni = true` allows, and which were written under each policy id.
    tls_names: HashMap<MapData, TlsNameKey, u32>,
    tls_written: StdHashMap<u32, BTreeSet<TlsNameKey>>,
    /// job -> its policy id and the plan compiled under it.
    planned: StdHashMap<JobKey, (u32, EgressPlan)>,
    last_policy: u32,
}

impl EgressMaps {
    pub(super) fn take(ebpf: &mut aya::Ebpf) -> Result<Self, SensorError> {
        let mut take = |name: &'static str| super::take_map(ebpf, name);
        let jobs = HashMap::try_from(take(map_name::EGRESS_JOBS)?)
            .map_err(map_error(map_name::EGRESS_JOBS))?;
        let allow4 = LpmTrie::try_from(take(map_name::EGRESS_ALLOW4)?)
            .map_err(map_error(map_name::EGRESS_ALLOW4))?;
        let allow6 = LpmTrie::try_from(take(map_name::EGRESS_ALLOW6)?)
            .map_err(map_error(map_name::EGRESS_ALLOW6))?;
        let metadata = HashMap::try_from(take(map_name::EGRESS_METADATA)?)
            .map_err(map_error(map_name::EGRESS_METADATA))?;
        let ports = HashMap::try_from(take(map_name::DNS_PORTS)?)
            .map_err(map_error(map_name::DNS_PORTS))?;
        let asked = HashMap::try_from(take(map_name::DNS_ASKED)?)
            .map_err(map_error(map_name::DNS_ASKED))?;
        let redirects = HashMap::try_from(take(map_name::DNS_REDIRECTS)?)
            .map_err(map_error(map_name::DNS_REDIRECTS))?;
        let tls_names = HashMap::try_from(take(map_name::TLS_NAMES)?)
            .map_err(map_error(map_name::TLS_NAMES))?;
        Ok(Self {
            jobs,
            lists: Arc::new(Mutex::new(Allowlists::new(
                allow4, allow6, ports, asked, redirects,
            ))),
            metadata,
            tls_names,
            tls_written: StdHashMap::new(),
            planned: StdHashMap::new(),
            last_policy: EGRESS_GLOBAL_POLICY,
        })
    }

    /// The allowlists, for the resolver.
    pub fn allowlists(&self) -> SharedAllowlists {
        self.lists.clone()
    }

    fn write(
        &mut self,
        policy: u32,
        wanted: BTreeSet<EntryKey>,
        plan: Option<&EgressPlan>,
    ) -> Result<(), SensorError> {
        self.lists
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .write(policy, wanted, plan)
    }

    /// Removes the addresses resolved for jobs whose TTL has passed.
    pub fn expire(&mut self, now_ns: u64) {
        self.lists
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .expire(now_ns);
    }

    /// The global plan and the metadata endpoints (at load and on reload). The caller sets
    /// `setting::EGRESS_MODE` after this, so block mode never starts before its allowlist.
    pub(super) fn set_global(
        &mut self,
        plan: &EgressPlan,
        metadata_endpoints: &[IpAddr],
    ) -> Result<(), SensorError> {
        let wanted: BTreeSet<[u8; 16]> = metadata_endpoints
            .iter()
            .map(|ip| metadata_key(*ip))
            .collect();
        for key in &wanted {
            self.metadata
                .insert(key, 1, 0)
                .map_err(map_error(map_name::EGRESS_METADATA))?;
        }
        let stale: Vec<[u8; 16]> = self
            .metadata
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains(k))
            .collect();
        for key in stale {
            let _ = self.metadata.remove(&key);
        }
        let global = EgressPlan {
            block: true,
            ..plan.clone()
        };
        let wanted = entries(EGRESS_GLOBAL_POLICY, &global);
        // The global plan judges jobs without one only when `[egress] mode` blocks.
        self.write(
            EGRESS_GLOBAL_POLICY,
            wanted,
            Some(&EgressPlan {
                block: plan.block,
                ..global
            }),
        )
    }

    /// Enforces `plan` for `job` from now on; nothing to do when it is the plan in force.
    pub fn set_job(&mut self, job: JobKey, plan: &EgressPlan) -> Result<(), SensorError> {
        if self.planned.get(&job).is_some_and(|(_, p)| p == plan) {
            return Ok(());
        }
        let policy = self.next_policy();
        self.write(policy, entries(policy, plan), Some(plan))?;
        self.write_names(policy, sni_names(policy, plan))?;
        let mut flags = 0;
        if plan.block {
            flags |= EGRESS_BLOCK;
        }
        if plan.metadata {
            flags |= EGRESS_METADATA_ENTITLED;
        }
        if plan.sni {
            flags |= EGRESS_SNI;
        }
        self.jobs
            .insert(job.0, EgressJob { policy, flags }, 0)
            .map_err(map_error(map_name::EGRESS_JOBS))?;
        if let Some((old, _)) = self.planned.insert(job, (policy, plan.clone())) {
            self.write(old, BTreeSet::new(), None)?;
            self.write_names(old, BTreeSet::new())?;
        }
        Ok(())
    }

    /// Makes the server names under `policy` those of `wanted` (empty: none).
    fn write_names(
        &mut self,
        policy: u32,
        wanted: BTreeSet<TlsNameKey>,
    ) -> Result<(), SensorError> {
        let before = self.tls_written.remove(&policy).unwrap_or_default();
        for key in wanted.difference(&before) {
            self.tls_names
                .insert(key, 1, 0)
                .map_err(map_error(map_name::TLS_NAMES))?;
        }
        for key in before.difference(&wanted) {
            let _ = self.tls_names.remove(key);
        }
        if !wanted.is_empty() {
            self.tls_written.insert(policy, wanted);
        }
        Ok(())
    }

    /// The job is gone: its plan and entries go too.
    pub fn forget_job(&mut self, job: JobKey) -> Result<(), SensorError> {
        let _ = self.jobs.remove(&job.0);
        if let Some((old, _)) = self.planned.remove(&job) {
            self.write(old, BTreeSet::new(), None)?;
            self.write_names(old, BTreeSet::new())?;
        }
        Ok(())
    }

    /// Jobs with a plan of their own.
    pub fn planned_jobs(&self) -> Vec<JobKey> {
        self.planned.keys().copied().collect()
    }

    /// Jobs whose plan blocks.
    pub fn blocking_jobs(&self) -> usize {
        self.planned.values().filter(|(_, p)| p.block).count()
    }

    /// A policy id no plan uses (ids wrap after `EGRESS_MAX_POLICY` - 1 plans: the DNS redirect
    /// carries the id in 24 bits).
    fn next_policy(&mut self) -> u32 {
        loop {
            self.last_policy = (self.last_policy + 1) % EGRESS_MAX_POLICY;
            let id = self.last_policy;
            if id != EGRESS_GLOBAL_POLICY && !self.planned.values().any(|(p, _)| *p == id) {
                return id;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_mode_needs_packet_egress_only_when_a_rule_checks_server_names() {
        let attached = |program: &str| super::super::ProbeStatus {
            sensor: "egress",
            program: program.to_owned(),
            target: String::new(),
            required: false,
            state: super::super::ProbeState::Attached,
        };
        let all: Vec<_> = ENFORCING_PROGRAMS.iter().map(|p| attached(p)).collect();
        let plain = crate::policy::Policy::builtin();
        assert!(missing_enforcement(&all, &plain).is_empty());
        let sni = crate::policy::Policy::parse(
            "[egress]\nmode = \"block\"\n[[rules]]\nrepository = \"o/r\"\nsni = true\n\
             allow_egress = [{ name = \"api.github.com\" }]\n",
            "test",
        )
        .expect("valid policy");
        assert_eq!(missing_enforcement(&all, &sni), vec![SNI_PROGRAM]);
        assert_eq!(
            missing_enforcement(&all[1..], &plain),
            vec!["dns_connect4"],
            "a missing enforcing program is named"
        );
    }

    #[test]
    fn sni_true_writes_each_name_exact_or_as_its_wildcard_suffix_under_the_policy_id() {
        let mut plan = EgressPlan {
            block: true,
            sni: true,
            names: vec![
                ("api.github.com".to_owned(), vec![443]),
                ("*.githubusercontent.com".to_owned(), vec![]),
            ],
            ..EgressPlan::default()
        };
        let keys: Vec<TlsNameKey> = sni_names(9, &plan).into_iter().collect();
        let exact = TlsNameKey {
            policy: 9,
            kind: TLS_NAME_EXACT,
            hash: sni_hash(b"api.github.com"),
        };
        let wildcard = TlsNameKey {
            policy: 9,
            kind: TLS_NAME_WILDCARD,
            hash: sni_hash(b"githubusercontent.com"),
        };
        assert_eq!(keys.len(), 2);
        assert!(
            keys.contains(&exact) && keys.contains(&wildcard),
            "{keys:?}"
        );
        plan.block = false;
        assert!(
            sni_names(9, &plan).is_empty(),
            "audit mode: nothing to enforce"
        );
    }

    #[test]
    fn ipv4_metadata_endpoints_are_keyed_in_their_mapped_form() {
        let key = metadata_key("169.254.169.254".parse().unwrap());
        assert_eq!(key[10..], [0xff, 0xff, 169, 254, 169, 254]);
    }
}
