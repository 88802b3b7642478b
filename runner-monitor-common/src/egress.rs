//! Block mode's maps: which policy judges a job's egress, and the allowlist entries.

/// Egress policy id of the global allowlist: jobs the agent has not given a policy of their own
/// yet (their rules are not known) are judged by it when `setting::EGRESS_MODE` is block.
pub const EGRESS_GLOBAL_POLICY: u32 = 0;
/// `EgressJob::flags`: the job's connections outside its allowlist are refused.
pub const EGRESS_BLOCK: u32 = 1;
/// `EgressJob::flags`: the job may reach the cloud metadata endpoints.
pub const EGRESS_METADATA_ENTITLED: u32 = 1 << 1;
/// `EgressJob::flags`: a rule of the job says `sni = true`: in block mode, TLS whose server name
/// is not in `TLS_NAMES` under the job's policy id is refused (`runner-monitor-ebpf/src/tls.rs`).
pub const EGRESS_SNI: u32 = 1 << 2;

/// Value of `EGRESS_JOBS` (keyed by job): which compiled allowlist judges the job, and how.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressJob {
    /// Policy id: the first 4 bytes of its allowlist keys.
    pub policy: u32,
    /// `EGRESS_*` bits.
    pub flags: u32,
}

/// Key bytes of an IPv4 allowlist entry (`EGRESS_ALLOW4`, an LPM trie): policy id (big-endian),
/// destination port (big-endian, 0: any port), address. The prefix length counts from the
/// first bit: `EGRESS_KEY_FIXED_BITS` + the CIDR's prefix.
pub type EgressKey4 = [u8; 10];
/// `EgressKey4` for IPv6 (`EGRESS_ALLOW6`).
pub type EgressKey6 = [u8; 22];
/// Bits of policy id and port before the address in an allowlist key.
pub const EGRESS_KEY_FIXED_BITS: u32 = 48;
/// Capacity of each allowlist trie (entries over all policies).
pub const MAX_EGRESS_ENTRIES: u32 = 65536;
/// Capacity of the metadata endpoint set.
pub const MAX_METADATA_ENDPOINTS: u32 = 64;

/// Policy ids the agent gives jobs stay below this: the DNS redirect carries the id in the
/// last 24 bits of a loopback source address (`dns_source`).
pub const EGRESS_MAX_POLICY: u32 = 0x00fe_0000;
/// A policy id no allowlist entry has: what judges a job's egress while the agent is gone and
/// `on_agent_failure` is `closed` (only loopback gets through).
pub const EGRESS_NO_POLICY: u32 = 0x00ff_ffff;
/// Name of the redirect's source addresses: `127.1.0.0` + policy id.
const DNS_SOURCE_BASE: u32 = 0x7f01_0000;

/// The loopback address block mode binds a job's redirected DNS socket to (host byte order):
/// the agent's resolver reads the job's policy id from the query's source address.
pub fn dns_source(policy: u32) -> u32 {
    DNS_SOURCE_BASE + (policy & 0x00ff_ffff)
}

/// The policy id a redirected query's source address (host byte order) carries, if it is one.
pub fn dns_source_policy(addr: u32) -> Option<u32> {
    let policy = addr.checked_sub(DNS_SOURCE_BASE)?;
    (policy < EGRESS_MAX_POLICY).then_some(policy)
}

/// Capacity of `DNS_PORTS` (LRU): local address and port of a redirected socket whose queries
/// come without a source address naming its policy -> policy id.
pub const MAX_DNS_PORTS: u32 = 4096;

/// The `DNS_PORTS` key of a redirected socket: the address its queries come from (host byte
/// order; 0 for 127.0.0.1, where a socket bound to the wildcard address sends from, and for an
/// IPv6 socket's sends, which come from `[::1]`) and its `port`; `v6` for those IPv6 sends
/// (their own port space beside IPv4's); `netns` the cookie of the network namespace it is in
/// (each namespace has its own addresses and ports).
pub fn dns_port_key(addr: u32, port: u16, v6: bool, netns: u64) -> [u64; 2] {
    let addr = if addr == 0x7f00_0001 { 0 } else { addr };
    let key = (u64::from(addr) << 32) | u64::from(port) | if v6 { 1 << 16 } else { 0 };
    [netns, key]
}

/// Capacity of `DNS_ASKED` (LRU): redirected UDP queries whose server the resolver has not read
/// yet, keyed as `DNS_PORTS` is.
pub const MAX_DNS_ASKED: u32 = 4096;

/// Where a redirected socket's queries were going (`DNS_REDIRECTS`, by socket cookie), and where
/// a redirected UDP query was going (`DNS_ASKED`, written by `packet_egress` as the query leaves
/// for the resolver, keyed by its source address and port: `dns_port_key`). The resolver asks
/// that server instead of its upstream when the job's allowlist admits it on port 53 (a
/// cluster's DNS service).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsRedirected {
    /// The IPv4 address and the port as the process wrote them (network byte order).
    pub ip4: u32,
    pub port: u32,
    /// The IPv6 address, when `v6` (an IPv6 socket's), as the process wrote it.
    pub ip6: [u32; 4],
    pub v6: u32,
    /// Non-zero: redirected before the resolver listened in the socket's network namespace
    /// (cookie `netns`): its queries are dropped until the namespace has a `DNS_NETNS` entry.
    pub parked: u32,
    pub netns: u64,
}

impl DnsRedirected {
    /// The server the process addressed (a v4-mapped IPv6 address as IPv4).
    pub fn server(&self) -> core::net::SocketAddr {
        let port = u16::from_be(self.port as u16);
        let ip = if self.v6 != 0 {
            let mut octets = [0u8; 16];
            for (i, word) in self.ip6.iter().enumerate() {
                octets[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
            }
            core::net::Ipv6Addr::from(octets).to_canonical()
        } else {
            core::net::IpAddr::V4(core::net::Ipv4Addr::from(self.ip4.to_ne_bytes()))
        };
        core::net::SocketAddr::new(ip, port)
    }
}

/// Capacity of `DNS_NETNS`: the network namespaces block mode's resolver listens in at once
/// (the agent's own and those of job processes: containers, `ip netns exec`).
pub const MAX_DNS_NETNS: u32 = 1024;
/// `DNS_NETNS` value bit: the resolver listens on `[::1]` in that namespace too (UDP, the same
/// port): IPv6 sockets' unconnected sends to port 53 are redirected there.
pub const DNS_NETNS_V6: u32 = 1 << 16;
/// `DNS_NETNS` value bit: the resolver does not listen in that namespace (no interface but
/// loopback, or its sockets could not be bound): its DNS is left to the verdict, not parked.
pub const DNS_NETNS_PASS: u32 = 1 << 17;
/// `DNS_NETNS` value bit: the agent's own namespace. Elsewhere a loopback DNS server is the
/// namespace's own (Docker's embedded DNS at 127.0.0.11): redirected only with
/// `DNS_NETNS_LOCAL`.
pub const DNS_NETNS_OWN: u32 = 1 << 18;
/// `DNS_NETNS` value bit: the namespace's own loopback server answers its DNS (Docker's
/// embedded DNS), asked by the resolver from inside the namespace: queries to it are
/// redirected too.
pub const DNS_NETNS_LOCAL: u32 = 1 << 19;
/// `DNS_NETNS` value bit: the agent looked at that namespace when a job thread entered it
/// (`setns`), before the exec of the program that will run there: the first exec names it
/// again, so that the agent reads that program's resolv.conf (and, had the namespace only
/// loopback then, its interfaces) once more.
pub const DNS_NETNS_EARLY: u32 = 1 << 20;

/// The `DNS_NETNS` value of a namespace the resolver listens in: `own` (the agent's), `local`
/// (asks the namespace's own loopback server), `v6` (listens on `[::1]` too).
pub fn dns_netns_flags(own: bool, local: bool, v6: bool) -> u32 {
    let bit = |on: bool, bit: u32| if on { bit } else { 0 };
    bit(own, DNS_NETNS_OWN) | bit(local, DNS_NETNS_LOCAL) | bit(v6, DNS_NETNS_V6)
}
/// Size of the `DNS_NETNS_WANTED` ring buffer: processes whose network namespace the agent
/// should check for a resolver (8 bytes each, and the ring's 8-byte header).
pub const DNS_NETNS_WANTED_BYTES: u32 = 64 * 1024;
/// `DNS_NETNS_WANTED` values: why the process (for `SETNS`, the thread) was named.
pub const DNS_NETNS_WANTED_EXEC: u32 = 1;
pub const DNS_NETNS_WANTED_QUERY: u32 = 2;
pub const DNS_NETNS_WANTED_SETNS: u32 = 3;

/// Value of an allowlist entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressAllow {
    /// ktime ns after which the entry no longer admits anything; 0: never (a CIDR of the
    /// policy). Addresses a job resolved for an allowed name carry their TTL here.
    pub expires_ns: u64,
}

/// The allowlist key of `policy`, `port` (0: any) and an address (4 or 16 bytes).
pub fn egress_key<const N: usize>(policy: u32, port: u16, addr: &[u8]) -> [u8; N] {
    let mut key = [0u8; N];
    key[..4].copy_from_slice(&policy.to_be_bytes());
    key[4..6].copy_from_slice(&port.to_be_bytes());
    let n = addr.len().min(N - 6);
    key[6..6 + n].copy_from_slice(&addr[..n]);
    key
}

const _: () = assert!(core::mem::size_of::<EgressJob>() == 8);
const _: () = assert!(core::mem::size_of::<EgressAllow>() == 8);
const _: () = assert!(core::mem::size_of::<DnsRedirected>() == 40);

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: plain `#[repr(C)]` data without padding (sizes asserted above); every bit pattern
    // is a valid value.
    unsafe impl aya::Pod for EgressJob {}
    unsafe impl aya::Pod for EgressAllow {}
    unsafe impl aya::Pod for DnsRedirected {}
}
