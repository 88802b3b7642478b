//! Block mode's kernel maps (`runner-monitor-ebpf/src/egress.rs`): each job's plan
//! (`Policy::egress_plan`) compiled into allowlist entries under a policy id of its own, and the
//! global plan under `EGRESS_GLOBAL_POLICY` for jobs whose rules are not known yet.
//!
//! Every change writes the new entries before it points a job at them and removes the old ones
//! after, so a reload never refuses what both the old and the new policy allow.

use std::{
    collections::{BTreeSet, HashMap as StdHashMap},
    net::IpAddr,
};

use aya::maps::{
    HashMap, MapData,
    lpm_trie::{Key, LpmTrie},
};
use ipnet::IpNet;
use runner_monitor_common::{
    EGRESS_BLOCK, EGRESS_GLOBAL_POLICY, EGRESS_KEY_FIXED_BITS, EGRESS_METADATA_ENTITLED,
    EgressAllow, EgressJob, EgressKey4, EgressKey6, egress_key, map_name,
};

use super::SensorError;
use crate::{event::JobKey, policy::EgressPlan};

/// The programs that refuse egress in block mode (they also watch DNS sockets, hence the names).
pub const ENFORCING_PROGRAMS: [&str; 5] = [
    "dns_connect4",
    "dns_connect6",
    "dns_sendmsg4",
    "dns_sendmsg6",
    "raw_socket_create",
];

/// The enforcing programs among `probes` that are not attached: block mode can only report
/// while any is missing.
pub fn missing_enforcement(probes: &[super::ProbeStatus]) -> Vec<&'static str> {
    ENFORCING_PROGRAMS
        .iter()
        .copied()
        .filter(|name| {
            !probes
                .iter()
                .any(|p| p.program == *name && p.state == super::ProbeState::Attached)
        })
        .collect()
}

/// One allowlist entry's key: the trie, the prefix length and the key bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum EntryKey {
    V4(u32, EgressKey4),
    V6(u32, EgressKey6),
}

/// The allowlist entries of `plan` under policy id `policy`: one per network and port (port 0:
/// any port). Empty when the plan does not block: nothing would look at them.
fn entries(policy: u32, plan: &EgressPlan) -> BTreeSet<EntryKey> {
    let mut out = BTreeSet::new();
    if !plan.block {
        return out;
    }
    for (net, ports) in &plan.nets {
        let ports: &[u16] = if ports.is_empty() { &[0] } else { ports };
        for port in ports {
            let bits = EGRESS_KEY_FIXED_BITS + u32::from(net.prefix_len());
            out.insert(match net {
                IpNet::V4(n) => {
                    EntryKey::V4(bits, egress_key(policy, *port, &n.network().octets()))
                }
                IpNet::V6(n) => {
                    EntryKey::V6(bits, egress_key(policy, *port, &n.network().octets()))
                }
            });
        }
    }
    out
}

/// An address as `EGRESS_METADATA` keys it: IPv4 in its mapped form.
fn metadata_key(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn map_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> SensorError {
    move |source| SensorError::Map { name, source }
}

pub struct EgressMaps {
    jobs: HashMap<MapData, u64, EgressJob>,
    allow4: LpmTrie<MapData, EgressKey4, EgressAllow>,
    allow6: LpmTrie<MapData, EgressKey6, EgressAllow>,
    metadata: HashMap<MapData, [u8; 16], u32>,
    /// job -> its policy id and the plan compiled under it.
    planned: StdHashMap<JobKey, (u32, EgressPlan)>,
    /// policy id -> the entries written under it.
    written: StdHashMap<u32, BTreeSet<EntryKey>>,
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
        Ok(Self {
            jobs,
            allow4,
            allow6,
            metadata,
            planned: StdHashMap::new(),
            written: StdHashMap::new(),
            last_policy: EGRESS_GLOBAL_POLICY,
        })
    }

    /// Writes the entries of `policy` that `wanted` has and it lacks, then removes the others.
    fn write(&mut self, policy: u32, wanted: BTreeSet<EntryKey>) -> Result<(), SensorError> {
        let allow = EgressAllow { expires_ns: 0 };
        let before = self.written.remove(&policy).unwrap_or_default();
        for entry in wanted.difference(&before) {
            match entry {
                EntryKey::V4(bits, data) => self
                    .allow4
                    .insert(&Key::new(*bits, *data), allow, 0)
                    .map_err(map_error(map_name::EGRESS_ALLOW4))?,
                EntryKey::V6(bits, data) => self
                    .allow6
                    .insert(&Key::new(*bits, *data), allow, 0)
                    .map_err(map_error(map_name::EGRESS_ALLOW6))?,
            }
        }
        for entry in before.difference(&wanted) {
            // Gone already is fine: the goal is its absence.
            let _ = match entry {
                EntryKey::V4(bits, data) => self.allow4.remove(&Key::new(*bits, *data)),
                EntryKey::V6(bits, data) => self.allow6.remove(&Key::new(*bits, *data)),
            };
        }
        if !wanted.is_empty() {
            self.written.insert(policy, wanted);
        }
        Ok(())
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
        self.write(EGRESS_GLOBAL_POLICY, entries(EGRESS_GLOBAL_POLICY, &global))
    }

    /// Enforces `plan` for `job` from now on; nothing to do when it is the plan in force.
    pub fn set_job(&mut self, job: JobKey, plan: &EgressPlan) -> Result<(), SensorError> {
        if self.planned.get(&job).is_some_and(|(_, p)| p == plan) {
            return Ok(());
        }
        let policy = self.next_policy();
        self.write(policy, entries(policy, plan))?;
        let mut flags = 0;
        if plan.block {
            flags |= EGRESS_BLOCK;
        }
        if plan.metadata {
            flags |= EGRESS_METADATA_ENTITLED;
        }
        self.jobs
            .insert(job.0, EgressJob { policy, flags }, 0)
            .map_err(map_error(map_name::EGRESS_JOBS))?;
        if let Some((old, _)) = self.planned.insert(job, (policy, plan.clone())) {
            self.write(old, BTreeSet::new())?;
        }
        Ok(())
    }

    /// The job is gone: its plan and entries go too.
    pub fn forget_job(&mut self, job: JobKey) -> Result<(), SensorError> {
        let _ = self.jobs.remove(&job.0);
        if let Some((old, _)) = self.planned.remove(&job) {
            self.write(old, BTreeSet::new())?;
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

    /// A policy id no plan uses (ids wrap after 2^32 - 1 plans).
    fn next_policy(&mut self) -> u32 {
        loop {
            self.last_policy = self.last_policy.wrapping_add(1);
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
    fn a_plan_becomes_one_entry_per_network_and_port_under_its_policy_id() {
        let plan = EgressPlan {
            block: true,
            metadata: false,
            nets: vec![
                ("10.1.0.0/16".parse().unwrap(), vec![443, 80]),
                ("fd00::/8".parse().unwrap(), vec![]),
            ],
        };
        let e: Vec<EntryKey> = entries(7, &plan).into_iter().collect();
        assert_eq!(
            e,
            vec![
                EntryKey::V4(48 + 16, [0, 0, 0, 7, 0, 80, 10, 1, 0, 0]),
                EntryKey::V4(48 + 16, [0, 0, 0, 7, 1, 187, 10, 1, 0, 0]),
                EntryKey::V6(48 + 8, {
                    let mut k = [0u8; 22];
                    k[3] = 7;
                    k[6] = 0xfd;
                    k
                }),
            ]
        );
        let audit = EgressPlan {
            block: false,
            ..plan
        };
        assert!(
            entries(7, &audit).is_empty(),
            "an audit plan needs no entries"
        );
    }

    #[test]
    fn ipv4_metadata_endpoints_are_keyed_in_their_mapped_form() {
        let key = metadata_key("169.254.169.254".parse().unwrap());
        assert_eq!(key[10..], [0xff, 0xff, 169, 254, 169, 254]);
    }
}
