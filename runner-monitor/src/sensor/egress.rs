//! Block mode's kernel maps (`runner-monitor-ebpf/src/egress.rs`): each job's plan
//! (`Policy::egress_plan`) compiled into allowlist entries under a policy id of its own, and the
//! global plan under `EGRESS_GLOBAL_POLICY` for jobs whose rules are not known yet.
//!
//! Every change writes the new entries before it points a job at them and removes the old ones
//! after, so a reload never refuses what both the old and the new policy allow.

use std::{
    collections::{BTreeSet, HashMap as StdHashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use aya::maps::{
    HashMap, MapData,
    lpm_trie::{Key, LpmTrie},
};
use ipnet::IpNet;
use runner_monitor_common::{
    DnsRedirected, EGRESS_BLOCK, EGRESS_GLOBAL_POLICY, EGRESS_KEY_FIXED_BITS, EGRESS_MAX_POLICY,
    EGRESS_METADATA_ENTITLED, EGRESS_SNI, EgressAllow, EgressJob, EgressKey4, EgressKey6,
    TLS_NAME_EXACT, TLS_NAME_WILDCARD, egress_key, map_name,
    tls::{TlsNameKey, sni_hash},
};

use super::SensorError;
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
pub const SNI_PROGRAM: &str = "tls_egress";

/// The programs block mode needs under `policy` that are not among the attached `probes`: block
/// mode can only report (or, for `tls_egress`, not check server names) while any is missing.
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

/// One allowlist entry's key: the trie, the prefix length and the key bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
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

fn map_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> SensorError {
    move |source| SensorError::Map { name, source }
}

/// The allowlist tries and what was written into them, shared by the agent's loop (plans) and
/// its DNS resolver (addresses a job resolved for an allowed name).
pub struct Allowlists {
    allow4: LpmTrie<MapData, EgressKey4, EgressAllow>,
    allow6: LpmTrie<MapData, EgressKey6, EgressAllow>,
    /// policy id -> the plan's entries written under it (no expiry).
    written: StdHashMap<u32, BTreeSet<EntryKey>>,
    /// policy id -> its plan, for the resolver (the names it admits).
    plans: StdHashMap<u32, EgressPlan>,
    /// policy id -> entries the resolver wrote under it, with their expiry (ktime ns).
    resolved: StdHashMap<u32, StdHashMap<EntryKey, u64>>,
    /// Local port -> policy id of redirected sockets bound before their connect.
    ports: HashMap<MapData, [u64; 2], u32>,
    /// Source of a redirected UDP query -> where the process sent it.
    asked: HashMap<MapData, [u64; 2], DnsRedirected>,
    /// Socket cookie of a redirected socket -> where the process sent it.
    redirects: HashMap<MapData, u64, DnsRedirected>,
}

pub type SharedAllowlists = Arc<Mutex<Allowlists>>;

/// How long an address a job resolved stays admitted when its TTL is shorter: clients cache
/// answers a little past their TTL, and a connect right after a 0-TTL answer must go through.
pub const RESOLVED_FLOOR_NS: u64 = 30_000_000_000;

impl Allowlists {
    /// Writes the entries of `policy` that `wanted` has and it lacks, then removes the others;
    /// an empty `wanted` and no plan forget the policy, with what the resolver wrote under it.
    fn write(
        &mut self,
        policy: u32,
        wanted: BTreeSet<EntryKey>,
        plan: Option<&EgressPlan>,
    ) -> Result<(), SensorError> {
        let allow = EgressAllow { expires_ns: 0 };
        let before = self.written.remove(&policy).unwrap_or_default();
        for entry in wanted.difference(&before) {
            self.insert(entry, allow)?;
        }
        for entry in before.difference(&wanted) {
            self.remove(entry);
        }
        if !wanted.is_empty() {
            self.written.insert(policy, wanted);
        }
        match plan {
            Some(plan) => {
                self.plans.insert(policy, plan.clone());
            }
            None => {
                self.plans.remove(&policy);
                for entry in self.resolved.remove(&policy).unwrap_or_default().keys() {
                    self.remove(entry);
                }
            }
        }
        Ok(())
    }

    fn insert(&mut self, entry: &EntryKey, allow: EgressAllow) -> Result<(), SensorError> {
        match entry {
            EntryKey::V4(bits, data) => self
                .allow4
                .insert(&Key::new(*bits, *data), allow, 0)
                .map_err(map_error(map_name::EGRESS_ALLOW4)),
            EntryKey::V6(bits, data) => self
                .allow6
                .insert(&Key::new(*bits, *data), allow, 0)
                .map_err(map_error(map_name::EGRESS_ALLOW6)),
        }
    }

    fn remove(&mut self, entry: &EntryKey) {
        // Gone already is fine: the goal is its absence.
        let _ = match entry {
            EntryKey::V4(bits, data) => self.allow4.remove(&Key::new(*bits, *data)),
            EntryKey::V6(bits, data) => self.allow6.remove(&Key::new(*bits, *data)),
        };
    }

    /// The policy id of a redirected socket that queries from `addr` (host byte order; 127.0.0.1
    /// for one bound to the wildcard; `[::1]` when `v6`, given as 0) and `port` in network
    /// namespace `netns` (its cookie).
    pub fn policy_of_port(&self, addr: u32, port: u16, v6: bool, netns: u64) -> Option<u32> {
        let key = runner_monitor_common::dns_port_key(addr, port, v6, netns);
        self.ports.get(&key, 0).ok()
    }

    /// The server a redirected UDP query from `addr` and `port` (as `policy_of_port` takes them)
    /// was addressed to, as the kernel noted it when the query left.
    pub fn asked_server(&self, addr: u32, port: u16, v6: bool, netns: u64) -> Option<SocketAddr> {
        let key = runner_monitor_common::dns_port_key(addr, port, v6, netns);
        self.asked.get(&key, 0).ok().map(|r| r.server())
    }

    /// The server a redirected socket (its cookie) was addressed to.
    pub fn redirected_server(&self, cookie: u64) -> Option<SocketAddr> {
        self.redirects.get(&cookie, 0).ok().map(|r| r.server())
    }

    /// The plan judged under `policy` (a job's, or the global one), if it blocks.
    pub fn plan(&self, policy: u32) -> Option<&EgressPlan> {
        self.plans.get(&policy).filter(|p| p.block)
    }

    /// Admits `addrs` (with their TTL in seconds) on `ports` (empty: any) under `policy` until
    /// `now_ns` + the TTL (at least `RESOLVED_FLOOR_NS`). An entry of the plan itself is left
    /// as it is; a longer expiry already written is kept.
    pub fn admit(
        &mut self,
        policy: u32,
        addrs: &[(IpAddr, u32)],
        ports: &[u16],
        now_ns: u64,
    ) -> Result<(), SensorError> {
        if !self.plans.contains_key(&policy) {
            return Ok(());
        }
        let any: &[u16] = if ports.is_empty() { &[0] } else { ports };
        for (ip, ttl) in addrs {
            let expires = now_ns + (u64::from(*ttl) * 1_000_000_000).max(RESOLVED_FLOOR_NS);
            for port in any {
                let entry = match super::super::policy::egress_address(*ip) {
                    IpAddr::V4(v4) => EntryKey::V4(
                        EGRESS_KEY_FIXED_BITS + 32,
                        egress_key(policy, *port, &v4.octets()),
                    ),
                    IpAddr::V6(v6) => EntryKey::V6(
                        EGRESS_KEY_FIXED_BITS + 128,
                        egress_key(policy, *port, &v6.octets()),
                    ),
                };
                if self
                    .written
                    .get(&policy)
                    .is_some_and(|w| w.contains(&entry))
                {
                    continue;
                }
                let known = self.resolved.entry(policy).or_default();
                let expires = expires.max(known.get(&entry).copied().unwrap_or(0));
                known.insert(entry, expires);
                self.insert(
                    &entry,
                    EgressAllow {
                        expires_ns: expires,
                    },
                )?;
            }
        }
        Ok(())
    }

    /// Removes resolved entries whose expiry has passed (the kernel already ignores them).
    pub fn expire(&mut self, now_ns: u64) {
        let mut stale = Vec::new();
        for known in self.resolved.values_mut() {
            known.retain(|entry, expires| {
                let keep = *expires > now_ns;
                if !keep {
                    stale.push(*entry);
                }
                keep
            });
        }
        self.resolved.retain(|_, known| !known.is_empty());
        for entry in stale {
            self.remove(&entry);
        }
    }

    /// Entries the resolver has written and that have not expired yet.
    pub fn resolved_entries(&self) -> usize {
        self.resolved.values().map(StdHashMap::len).sum()
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
            lists: Arc::new(Mutex::new(Allowlists {
                allow4,
                allow6,
                written: StdHashMap::new(),
                plans: StdHashMap::new(),
                resolved: StdHashMap::new(),
                ports,
                asked,
                redirects,
            })),
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
    fn block_mode_needs_tls_egress_only_when_a_rule_checks_server_names() {
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
    fn a_plan_becomes_one_entry_per_network_and_port_under_its_policy_id() {
        let plan = EgressPlan {
            block: true,
            metadata: false,
            names: vec![],
            sni: false,
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
