//! Block mode's resolver in the network namespaces of job processes. The kernel redirects a job's
//! DNS to 127.0.0.1, and loopback is the namespace's own: a job's container on a bridge network,
//! or a program run with `ip netns exec`, reaches the resolver only if the resolver listens in
//! its namespace. So the agent opens the resolver's sockets there, on the same port as in its
//! own namespace (a socket stays in the namespace it was made in), and tells the kernel
//! (`DNS_NETNS`: cookie -> flags).
//!
//! The kernel names job processes in block mode whose namespace it may not serve yet in
//! `DNS_NETNS_WANTED`: when a job thread enters a namespace without an entry (`setns`: a
//! container runtime joining the namespace the container's program will run in, `ip netns exec`,
//! `nsenter`), at an exec in a namespace without an entry, or with a `DNS_NETNS_PASS` one, or
//! one looked at only at a `setns` (`DNS_NETNS_EARLY`: the program's resolv.conf and the
//! namespace's interfaces are read again then), before the program's first instruction (the
//! kernel reads the namespace's cookie at offsets from the BTF, `NetnsLayout`; without them, at
//! every exec), and at a DNS query in a namespace the agent has not looked at (that query is
//! parked: dropped until the namespace has an entry, so the client's retry gets the resolver;
//! `runner-monitor-ebpf/src/redirect.rs`). The ring wakes the agent at once; it opens
//! `/proc/<pid>/ns/net` and, in a thread of its own, enters the namespace and binds.
//!
//! A namespace with no interface but loopback has no way out and gets no resolver (the resolver
//! would give it one): its entry says `DNS_NETNS_PASS`, and its DNS is left to the verdict, as
//! is a namespace where the sockets could not be bound. Such a namespace is looked at again
//! after `RETRY` when named again. A namespace no process is in any more is let go at the next
//! `SWEEP` (its sockets would keep it, and its interfaces, alive).

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::unix::fs::MetadataExt,
    sync::PoisonError,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, MapData, RingBuf};
use runner_monitor_common::{
    DNS_NETNS_EARLY, DNS_NETNS_PASS, DNS_NETNS_WANTED_EXEC, DNS_NETNS_WANTED_QUERY,
    DNS_NETNS_WANTED_SETNS, dns_netns_flags,
};
use tokio::{io::unix::AsyncFd, task::JoinHandle};

use super::{
    btf::{KernelBtf, KernelLayout},
    resolver::{self, Servers, Service, Sockets},
};

/// How often namespaces no process is in are let go, and how long a new one is kept at least.
const SWEEP: Duration = Duration::from_secs(10);
/// How long a namespace the resolver does not listen in (no way out, or the sockets failed) is
/// not looked at again.
const RETRY: Duration = Duration::from_secs(2);

/// Where the kernel keeps a task's network namespace cookie: byte offsets of the running kernel,
/// from its BTF, so that an exec in a namespace served already names nothing to the agent
/// (`want_netns_unless_served` in `runner-monitor-ebpf/src/redirect.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetnsLayout {
    pub task_nsproxy: u32,
    pub nsproxy_net_ns: u32,
    pub net_cookie: u32,
}

impl KernelLayout for NetnsLayout {
    fn from_btf(btf: &KernelBtf) -> Result<Self, String> {
        Ok(Self {
            task_nsproxy: btf.offset("task_struct", "nsproxy")?,
            nsproxy_net_ns: btf.offset("nsproxy", "net_ns")?,
            net_cookie: btf.offset("net", "net_cookie")?,
        })
    }

    /// Sets the exec hook's layout globals.
    fn set_globals<'a>(&'a self, loader: &mut aya::EbpfLoader<'a>) {
        super::btf::set_layout(
            loader,
            &[
                ("TASK_NSPROXY", &self.task_nsproxy),
                ("NSPROXY_NET_NS", &self.nsproxy_net_ns),
                ("NET_COOKIE", &self.net_cookie),
            ],
            "NETNS_LAYOUT_KNOWN",
        );
    }
}

/// An own handle on the kernel's `DNS_NETNS`, and the `DNS_NETNS_WANTED` ring.
pub struct DnsNetnsMaps {
    pub(super) served: HashMap<MapData, u64, u32>,
    pub(super) wanted: RingBuf<MapData>,
}

/// The processes the kernel named, and why, taken out of the ring.
fn take_wanted(ring: &mut RingBuf<MapData>) -> Vec<(u32, u32)> {
    let mut named = Vec::new();
    while let Some(record) = ring.next() {
        if let (Some(tgid), Some(why)) = (record.get(..4), record.get(4..8)) {
            let word = |b: &[u8]| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
            named.push((word(tgid), word(why)));
        }
    }
    named
}

/// A job namespace the agent looked at: the resolver listens there (its tasks), or not (looked
/// at again after `retry`).
struct Served {
    cookie: u64,
    /// The namespace's own servers the resolver asks, if any (empty: upstream).
    local: Servers,
    /// The resolver listens on `[::1]` there too.
    v6: bool,
    /// Looked at when a job thread entered it (`setns`), before the program that will run
    /// there: its first exec is looked at again (`DNS_NETNS_EARLY`).
    early: bool,
    tasks: Vec<JoinHandle<()>>,
    since: Instant,
    retry: Option<Instant>,
}

/// The resolver's listeners in job namespaces, keyed by namespace inode.
pub struct NetnsResolvers {
    /// `DNS_NETNS`.
    kernel: HashMap<MapData, u64, u32>,
    wanted: Option<RingBuf<MapData>>,
    service: Service,
    port: u16,
    /// The agent's own namespace (served from the start).
    own: u64,
    served: StdHashMap<u64, Served>,
}

impl NetnsResolvers {
    /// For the resolver on `port` that answers with `service`.
    pub fn new(maps: DnsNetnsMaps, service: Service, port: u16) -> io::Result<Self> {
        Ok(Self {
            kernel: maps.served,
            wanted: Some(maps.wanted),
            service,
            port,
            own: std::fs::metadata("/proc/self/ns/net")?.ino(),
            served: StdHashMap::new(),
        })
    }

    /// Serves the namespaces the kernel names, in the current tokio runtime, for as long as it
    /// runs.
    pub fn spawn(mut self) -> io::Result<()> {
        let wanted = self
            .wanted
            .take()
            .ok_or_else(|| io::Error::other("spawned twice"))?;
        // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd owns the RingBuf.
        let mut ring =
            unsafe { AsyncFd::register_with_interest(wanted, tokio::io::Interest::READABLE) }
                .map_err(|e| e.into_parts().1)?;
        tokio::spawn(async move {
            let mut sweep = tokio::time::interval(SWEEP);
            sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    ready = ring.readable_mut() => {
                        let Ok(mut guard) = ready else { return };
                        let named = take_wanted(guard.get_inner_mut());
                        // Ready again at once until a read finds the ring empty: nothing
                        // written between the read and the clearing waits for the next record.
                        if named.is_empty() {
                            guard.clear_ready();
                        }
                        for (tgid, why) in named {
                            self.check(tgid, why).await;
                        }
                    }
                    _ = sweep.tick() => self.sweep(),
                }
            }
        });
        Ok(())
    }

    /// Serves the namespace of process `tgid` (for a `setns`, of thread `tgid`) if it needs it.
    async fn check(&mut self, tgid: u32, why: u32) {
        // Gone already: its namespace is named again by its next process.
        let Ok(ns) = File::open(format!("/proc/{tgid}/ns/net")) else {
            return;
        };
        let Ok(inode) = ns.metadata().map(|m| m.ino()) else {
            return;
        };
        let now = Instant::now();
        tracing::debug!(
            pid = tgid,
            why,
            netns = inode,
            "the kernel names a job process's network namespace"
        );
        if inode == self.own {
            return;
        }
        let early = why == DNS_NETNS_WANTED_SETNS;
        if let Some(seen) = self.served.get(&inode) {
            let exec_after_setns = seen.early && why == DNS_NETNS_WANTED_EXEC;
            if exec_after_setns && seen.retry.is_none() {
                self.read_again(inode, tgid);
                return;
            }
            // Passed at a `setns`, the exec is looked at whatever the retry says: the runtime
            // may have given the namespace its interfaces since.
            if !exec_after_setns && seen.retry.is_none_or(|retry| now < retry) {
                return;
            }
        }
        let why = match why {
            DNS_NETNS_WANTED_EXEC => "exec",
            DNS_NETNS_WANTED_QUERY => "query",
            DNS_NETNS_WANTED_SETNS => "setns",
            _ => "unknown",
        };
        let listen = way_out(tgid);
        let port = self.port;
        let ns = std::sync::Arc::new(ns);
        let inside = ns.clone();
        let bound = tokio::task::spawn_blocking(move || bind_in(&inside, port, listen))
            .await
            .map_err(io::Error::other)
            .and_then(|bound| bound);
        let (cookie, sockets) = match bound {
            Ok(bound) => bound,
            Err(error) => {
                // Not even its cookie: the kernel keeps parking its queries, and names it again.
                tracing::warn!(pid = tgid, netns = inode, %error, "a job's network namespace could not be entered");
                return;
            }
        };
        let served = match sockets {
            Some(Ok(sockets)) => {
                let local = local_servers(tgid);
                self.listen(cookie, sockets, ns, local, early)
            }
            Some(Err(error)) => Err(error),
            None => {
                tracing::debug!(
                    pid = tgid,
                    netns = inode,
                    "a job's network namespace has only loopback: no resolver there"
                );
                Err(io::Error::other("only loopback"))
            }
        };
        let served = match served {
            Ok((served, v6)) => {
                tracing::info!(
                    pid = tgid,
                    netns = inode,
                    at = why,
                    v6,
                    local = ?served.local.read().unwrap_or_else(PoisonError::into_inner),
                    lag_us = now.elapsed().as_micros() as u64,
                    "block mode's DNS resolver listens in a job's network namespace"
                );
                served
            }
            Err(error) => {
                if listen {
                    tracing::warn!(pid = tgid, netns = inode, %error, "block mode's DNS resolver \
                        cannot listen in a job's network namespace: its DNS is judged by the \
                        server's address");
                }
                if let Err(error) = self.kernel.insert(cookie, DNS_NETNS_PASS, 0) {
                    tracing::warn!(%error, "a job's network namespace not written to the kernel");
                }
                Served {
                    cookie,
                    local: Servers::default(),
                    v6: false,
                    early,
                    tasks: Vec::new(),
                    since: now,
                    retry: Some(now + RETRY),
                }
            }
        };
        if let Some(old) = self.served.insert(inode, served) {
            self.let_go(old, false);
        }
    }

    /// Serves `sockets`, bound in namespace `ns` (cookie `cookie`); whether on `[::1]` too.
    /// `local`: the namespace's own loopback servers that answer its queries, if any; `early`:
    /// looked at a `setns`, before its program's exec.
    fn listen(
        &mut self,
        cookie: u64,
        sockets: Sockets,
        ns: std::sync::Arc<File>,
        local: Vec<SocketAddr>,
        early: bool,
    ) -> io::Result<(Served, bool)> {
        let is_local = !local.is_empty();
        let local = Servers::new(local.into());
        let service = Service {
            ns: Some(ns),
            local: local.clone(),
            ..self.service.clone()
        };
        let (tasks, no_v6) = resolver::serve(sockets, &service, cookie)?;
        let v6 = no_v6.is_none();
        let early_bit = if early { DNS_NETNS_EARLY } else { 0 };
        let flags = dns_netns_flags(false, is_local, v6) | early_bit;
        if let Err(error) = self.kernel.insert(cookie, flags, 0) {
            tasks.iter().for_each(JoinHandle::abort);
            return Err(io::Error::other(error));
        }
        let served = Served {
            cookie,
            local,
            v6,
            early,
            tasks,
            since: Instant::now(),
            retry: None,
        };
        Ok((served, v6))
    }

    /// At the first exec in namespace `inode`, served since a job thread entered it: the
    /// program's resolv.conf (which the runtime put in place after its `setns`) says whether the
    /// namespace's own loopback server answers its DNS, as it would have at the exec.
    fn read_again(&mut self, inode: u64, pid: u32) {
        let Some(served) = self.served.get_mut(&inode) else {
            return;
        };
        served.early = false;
        let local = local_servers(pid);
        let flags = dns_netns_flags(false, !local.is_empty(), served.v6);
        let mut servers = served.local.write().unwrap_or_else(PoisonError::into_inner);
        if *servers != local {
            tracing::info!(
                pid,
                netns = inode,
                ?local,
                "block mode's DNS resolver in a job's network namespace: its program's \
                 resolv.conf read at its exec"
            );
            *servers = local;
        }
        drop(servers);
        if let Err(error) = self.kernel.insert(served.cookie, flags, 0) {
            tracing::warn!(%error, "a job's network namespace not written to the kernel");
        }
    }

    /// Stops serving a namespace; `forget`: its kernel entry goes too.
    fn let_go(&mut self, served: Served, forget: bool) {
        if forget {
            let _ = self.kernel.remove(&served.cookie);
        }
        served.tasks.iter().for_each(JoinHandle::abort);
    }

    /// Lets go of the namespaces no process is in any more.
    fn sweep(&mut self) {
        let Ok(in_use) = namespaces_in_use() else {
            return;
        };
        let gone: Vec<u64> = self
            .served
            .iter()
            .filter(|(inode, s)| !in_use.contains(inode) && s.since.elapsed() >= SWEEP)
            .map(|(inode, _)| *inode)
            .collect();
        for inode in gone {
            let Some(served) = self.served.remove(&inode) else {
                continue;
            };
            self.let_go(served, true);
            tracing::debug!(
                netns = inode,
                "a job's network namespace is gone: its resolver too"
            );
        }
    }
}

/// The cookie of namespace `ns` and, when `listen`, the resolver's sockets on `port` there,
/// made by a thread of its own that enters the namespace and ends (no thread of the runtime
/// ever changes namespace).
fn bind_in(ns: &File, port: u16, listen: bool) -> io::Result<(u64, Option<io::Result<Sockets>>)> {
    resolver::in_namespace(ns, || {
        let probe = std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0))?;
        let cookie = resolver::netns_cookie(&probe)?;
        Ok((cookie, listen.then(|| Sockets::bind(port))))
    })
}

/// The nameservers of process `tgid`'s resolv.conf that are its namespace's own: on IPv4
/// loopback, with a UDP socket bound to that address in the namespace (Docker's embedded DNS
/// listens on 127.0.0.11; a host's 127.0.0.53 seen through `ip netns exec` has nobody there).
fn local_servers(tgid: u32) -> Vec<SocketAddr> {
    let Ok(conf) = std::fs::read_to_string(format!("/proc/{tgid}/root/etc/resolv.conf")) else {
        return Vec::new();
    };
    let bound = std::fs::read_to_string(format!("/proc/{tgid}/net/udp")).unwrap_or_default();
    let bound = udp_addresses(&bound);
    resolver::nameservers(&conf)
        .into_iter()
        .filter(|s| matches!(s.ip(), IpAddr::V4(ip) if ip.is_loopback() && bound.contains(&ip)))
        .collect()
}

/// The local addresses of a `/proc/net/udp` text.
fn udp_addresses(table: &str) -> HashSet<Ipv4Addr> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().nth(1)?.split(':').next())
        .filter_map(|hex| u32::from_str_radix(hex, 16).ok())
        .map(|word| Ipv4Addr::from(word.to_ne_bytes()))
        .collect()
}

/// Whether process `tgid`'s network namespace has an interface besides loopback.
fn way_out(tgid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{tgid}/net/dev")).is_ok_and(|dev| has_way_out(&dev))
}

/// Whether a `/proc/net/dev` text names an interface besides `lo`.
fn has_way_out(dev: &str) -> bool {
    dev.lines()
        .skip(2)
        .filter_map(|line| line.split(':').next())
        .any(|name| name.trim() != "lo")
}

/// The inodes of the network namespaces some process is in.
fn namespaces_in_use() -> io::Result<HashSet<u64>> {
    let mut in_use = HashSet::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        if !entry
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        if let Ok(meta) = std::fs::metadata(entry.path().join("ns/net")) {
            in_use.insert(meta.ino());
        }
    }
    Ok(in_use)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_table_addresses_are_read_in_network_order() {
        let table = "  sl  local_address rem_address   st\n   \
            1: 0B00007F:A1B2 00000000:0000 07\n   2: 00000000:0035 00000000:0000 07\n";
        let addrs = udp_addresses(table);
        assert!(addrs.contains(&Ipv4Addr::new(127, 0, 0, 11)), "{addrs:?}");
        assert!(addrs.contains(&Ipv4Addr::UNSPECIFIED));
        assert_eq!(addrs.len(), 2);
    }

    #[test]
    fn the_running_kernels_netns_layout_is_found() {
        let Ok(btf) = KernelBtf::vmlinux() else {
            eprintln!("no kernel BTF: skipped");
            return;
        };
        let layout = NetnsLayout::from_btf(&btf).unwrap();
        // `struct nsproxy` starts with its reference count and the uts, ipc, mnt and pid
        // namespaces' pointers.
        assert!(layout.nsproxy_net_ns >= 8, "{layout:?}");
        assert!(
            layout.task_nsproxy > 0 && layout.net_cookie > 0,
            "{layout:?}"
        );
    }

    #[test]
    fn only_loopback_is_no_way_out() {
        let head = "Inter-|   Receive\n face |bytes    packets\n";
        assert!(!has_way_out(&format!("{head}    lo: 0 0 0 0\n")));
        assert!(has_way_out(&format!(
            "{head}    lo: 0 0 0 0\n  eth0@if9: 1 2 3\n"
        )));
        assert!(!has_way_out(head));
    }
}
