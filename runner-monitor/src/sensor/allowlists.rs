//! Block mode's allowlists in the kernel (`EGRESS_ALLOW4`, `EGRESS_ALLOW6`: LPM tries keyed by
//! policy id, port and address), what the agent wrote into them for each policy id, and the maps
//! block mode's resolver reads to know whose query it answers and where it was going
//! (`DNS_PORTS`, `DNS_ASKED`, `DNS_REDIRECTS`). Shared by the agent's loop, which writes each
//! plan's networks (`egress.rs`), and the resolver, which admits the addresses a job resolved for
//! an allowed name (`resolver.rs`).

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
    DnsRedirected, EGRESS_KEY_FIXED_BITS, EgressAllow, EgressKey4, EgressKey6, egress_key, map_name,
};

use super::{SensorError, map_error};
use crate::policy::EgressPlan;

/// One allowlist entry's key: the trie, the prefix length and the key bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum EntryKey {
    V4(u32, EgressKey4),
    V6(u32, EgressKey6),
}

/// The allowlist entries of `plan` under policy id `policy`: one per network and port (port 0:
/// any port). Empty when the plan does not block: nothing would look at them.
pub(super) fn entries(policy: u32, plan: &EgressPlan) -> BTreeSet<EntryKey> {
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
    /// Over the kernel's allowlist tries and the maps the resolver reads, with nothing written.
    pub(super) fn new(
        allow4: LpmTrie<MapData, EgressKey4, EgressAllow>,
        allow6: LpmTrie<MapData, EgressKey6, EgressAllow>,
        ports: HashMap<MapData, [u64; 2], u32>,
        asked: HashMap<MapData, [u64; 2], DnsRedirected>,
        redirects: HashMap<MapData, u64, DnsRedirected>,
    ) -> Self {
        Self {
            allow4,
            allow6,
            written: StdHashMap::new(),
            plans: StdHashMap::new(),
            resolved: StdHashMap::new(),
            ports,
            asked,
            redirects,
        }
    }

    /// Writes the entries of `policy` that `wanted` has and it lacks, then removes the others;
    /// an empty `wanted` and no plan forget the policy, with what the resolver wrote under it.
    pub(super) fn write(
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
    /// `now_ns` + the TTL (at least `RESOLVED_FLOOR_NS`). An address the plan's networks admit
    /// on that port already gets no entry: the kernel takes the longest prefix, and a name's
    /// address would hide the network's entry, which says the address needs no name (UDP under
    /// `sni = true` is refused to addresses only a name admits). A longer expiry already
    /// written is kept.
    pub fn admit(
        &mut self,
        policy: u32,
        addrs: &[(IpAddr, u32)],
        ports: &[u16],
        now_ns: u64,
    ) -> Result<(), SensorError> {
        let Some(plan) = self.plans.get(&policy) else {
            return Ok(());
        };
        let any: &[u16] = if ports.is_empty() { &[0] } else { ports };
        let mut wanted = Vec::new();
        for (ip, ttl) in addrs {
            let expires = now_ns + (u64::from(*ttl) * 1_000_000_000).max(RESOLVED_FLOOR_NS);
            for port in any {
                if plan.nets_admit(*ip, *port) {
                    continue;
                }
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
                wanted.push((entry, expires));
            }
        }
        for (entry, expires) in wanted {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
