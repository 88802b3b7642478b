//! Block mode's DNS resolver. The kernel sends the port-53 traffic of job processes in block
//! mode here (`runner-monitor-ebpf/src/redirect.rs`), from a loopback source address that
//! carries the job's policy id. A query for a name the job's plan allows is forwarded to the
//! upstream resolver (or to the server the job addressed, where its plan admits that server:
//! `EgressPlan::asks_dns`; `DNS_ASKED` for UDP, `DNS_REDIRECTS` and `sock_diag` for TCP), and
//! the A/AAAA addresses of the answer (through CNAME chains from the name asked) are written
//! into the job's allowlist BEFORE the answer is sent: a connect right after the answer finds
//! them. A query for any other name is answered REFUSED and not forwarded: a
//! query is itself a way out (DNS tunnelling puts the data in the name), so block mode does not
//! let it leave the host.
//!
//! It listens on 127.0.0.1 (UDP and TCP) and, when the host has IPv6 loopback, on `[::1]` (UDP,
//! the same port) for IPv6 sockets' unconnected sends, whose source port names the job's policy
//! (`DNS_PORTS`).

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, PoisonError, RwLock},
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{Name, RData},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    time::timeout,
};

use super::allowlists::SharedAllowlists;
use crate::clock::monotonic_ns;

/// How long the upstream has to answer one query.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a TCP client may stay idle between queries.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// DNS servers the resolver forwards to, replaced while it runs: the upstream (on reload), a
/// job namespace's own (when a program's resolv.conf is read, `dns_netns.rs`).
pub type Servers = Arc<RwLock<Vec<SocketAddr>>>;
/// The upstream servers, replaced on reload.
pub type Upstream = Servers;

/// A running resolver: where it listens, and the network namespace it listens in.
pub struct Resolver {
    pub port: u16,
    pub netns_cookie: u64,
    /// What answers queries: in the agent's namespace and the job namespaces it serves later
    /// (`dns_netns.rs`).
    pub service: Service,
    /// Why it does not listen on `[::1]` too, if it does not (unconnected IPv6 sends to port 53
    /// are then not redirected).
    pub no_v6: Option<io::Error>,
}

/// What the resolver's sockets answer with: the jobs' allowlists and the upstream servers.
#[derive(Clone)]
pub struct Service {
    pub lists: SharedAllowlists,
    pub upstream: Upstream,
    /// The job namespace the sockets are in (`None`: the agent's own), where the servers the
    /// namespace's jobs address are asked from.
    pub ns: Option<Arc<std::fs::File>>,
    /// In a job namespace whose own loopback server answers its DNS (Docker's embedded DNS at
    /// 127.0.0.11): that server, asked from inside the namespace, instead of `upstream`.
    pub local: Servers,
}

/// The resolver's sockets in one network namespace, bound in it (a socket stays in the
/// namespace it was made in, whichever thread later uses it).
pub struct Sockets {
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
    /// `[::1]`, the same port, when the namespace has IPv6 loopback.
    pub udp6: io::Result<std::net::UdpSocket>,
}

impl Sockets {
    /// The resolver's sockets on `port` (0: any free one) in the calling thread's network
    /// namespace.
    pub fn bind(port: u16) -> io::Result<Self> {
        let udp = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, port))?;
        let port = udp.local_addr()?.port();
        let tcp = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port))?;
        let udp6 = std::net::UdpSocket::bind((Ipv6Addr::LOCALHOST, port));
        Ok(Self { udp, tcp, udp6 })
    }

    pub fn port(&self) -> io::Result<u16> {
        Ok(self.udp.local_addr()?.port())
    }

    /// The cookie of the network namespace the sockets are in.
    pub fn netns_cookie(&self) -> io::Result<u64> {
        netns_cookie(&self.udp)
    }
}

/// The nameservers of a resolv.conf text, on port 53.
pub fn nameservers(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            let ip: IpAddr = words.next()?.split('%').next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .collect()
}

/// The network namespace cookie of the namespace `socket` lives in (`SO_NETNS_COOKIE`).
pub fn netns_cookie(socket: &impl std::os::fd::AsRawFd) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    socket_cookie(socket, SO_NETNS_COOKIE)
}

/// A cookie `socket` gives as its `SOL_SOCKET` option `option` (`SO_COOKIE`: its own;
/// `SO_NETNS_COOKIE`: its network namespace's).
pub fn socket_cookie(socket: &impl std::os::fd::AsRawFd, option: libc::c_int) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into the u64 we own.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Starts the resolver on 127.0.0.1 (UDP and TCP on one port) and `[::1]` (UDP, the same port,
/// when it can) in the current tokio runtime.
pub async fn start(lists: SharedAllowlists, upstream: Vec<SocketAddr>) -> io::Result<Resolver> {
    let mut attempt = 0;
    let sockets = loop {
        // A free UDP port may be taken for TCP or on `[::1]`: another one, a few times.
        let retry = |error: &io::Error| error.kind() == io::ErrorKind::AddrInUse && attempt < 10;
        match Sockets::bind(0) {
            Ok(s) if s.udp6.as_ref().is_err_and(retry) => attempt += 1,
            Ok(s) => break s,
            Err(error) if retry(&error) => attempt += 1,
            Err(error) => return Err(error),
        }
    };
    let port = sockets.port()?;
    let netns_cookie = sockets.netns_cookie()?;
    let service = Service {
        lists,
        upstream: Arc::new(RwLock::new(upstream)),
        ns: None,
        local: Servers::default(),
    };
    let (_, no_v6) = serve(sockets, &service, netns_cookie)?;
    Ok(Resolver {
        port,
        netns_cookie,
        service,
        no_v6,
    })
}

/// Answers the queries that reach `sockets`, in network namespace `netns` (its cookie): the
/// tasks that do, and why `[::1]` is not served, if it is not.
pub fn serve(
    sockets: Sockets,
    service: &Service,
    netns: u64,
) -> io::Result<(Vec<tokio::task::JoinHandle<()>>, Option<io::Error>)> {
    let tokio_udp = |udp: std::net::UdpSocket| {
        udp.set_nonblocking(true)?;
        UdpSocket::from_std(udp)
    };
    let mut tasks = vec![serve_udp(tokio_udp(sockets.udp)?, service, netns)];
    let no_v6 = match sockets.udp6.and_then(tokio_udp) {
        Ok(udp6) => {
            tasks.push(serve_udp(udp6, service, netns));
            None
        }
        Err(error) => Some(error),
    };
    sockets.tcp.set_nonblocking(true)?;
    let tcp = TcpListener::from_std(sockets.tcp)?;
    let service = service.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = tcp.accept().await else {
                continue;
            };
            let service = service.clone();
            tokio::spawn(async move {
                let _ = serve_tcp(stream, peer, &service, netns).await;
            });
        }
    }));
    Ok((tasks, no_v6))
}

/// Answers the queries that reach `udp`.
fn serve_udp(udp: UdpSocket, service: &Service, netns: u64) -> tokio::task::JoinHandle<()> {
    let udp = Arc::new(udp);
    let service = service.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, peer)) = udp.recv_from(&mut buf).await else {
                continue;
            };
            let query = buf[..n].to_vec();
            let (udp, service) = (udp.clone(), service.clone());
            tokio::spawn(async move {
                if let Some(answer) = answer(&service, netns, peer, &query, Via::Udp).await {
                    let _ = udp.send_to(&answer, peer).await;
                }
            });
        }
    })
}

/// How a query came: over UDP (the kernel noted where each was going: `DNS_ASKED`), or on a
/// TCP connection, with the server the job's socket was connecting to, if the kernel kept it.
#[derive(Clone, Copy)]
enum Via {
    Udp,
    Tcp(Option<SocketAddr>),
}

/// DNS over TCP: length-prefixed messages, one answer per query, until the client goes.
async fn serve_tcp(
    mut stream: TcpStream,
    peer: SocketAddr,
    service: &Service,
    netns: u64,
) -> io::Result<()> {
    // Where the job's socket was connecting: kept under its cookie (`DNS_REDIRECTS`), which
    // `sock_diag` finds by the connection's addresses, in the connection's namespace.
    let local = stream.local_addr()?;
    let cookie = made_in(service.ns.as_ref(), move || {
        super::sock_diag::tcp_socket_cookie(peer, local)
    })
    .await;
    let asked = match cookie {
        Ok(cookie) => service
            .lists
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .redirected_server(cookie),
        Err(error) => {
            tracing::debug!(%peer, %error, "a DNS-over-TCP client's socket was not found");
            None
        }
    };
    loop {
        let Ok(len) = timeout(TCP_IDLE, stream.read_u16()).await else {
            return Ok(());
        };
        let mut query = vec![0u8; usize::from(len?)];
        stream.read_exact(&mut query).await?;
        let Some(answer) = answer(service, netns, peer, &query, Via::Tcp(asked)).await else {
            return Ok(());
        };
        let mut out = (answer.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&answer);
        stream.write_all(&out).await?;
    }
}

/// A response to `query` with only a response code.
fn refusal(query: &Message, code: ResponseCode) -> Option<Vec<u8>> {
    let mut response = Message::new();
    response
        .set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(code);
    response.add_queries(query.queries().to_vec());
    response.to_vec().ok()
}

/// The answer to a query from `peer` in network namespace `netns` (its cookie); `None`: nothing
/// to send (not a DNS query).
async fn answer(
    service: &Service,
    netns: u64,
    peer: SocketAddr,
    query: &[u8],
    via: Via,
) -> Option<Vec<u8>> {
    let Service {
        lists,
        upstream,
        ns,
        local,
    } = service;
    let message = Message::from_vec(query).ok()?;
    if message.message_type() != MessageType::Query {
        return None;
    }
    let question = message.queries().first().map(|q| q.name().clone());
    let (policy, ports, asked) = {
        let lists = lists.lock().unwrap_or_else(PoisonError::into_inner);
        // The query's source: an address naming the policy (`bpf_bind`), else the socket's own
        // address and port (bound before its connect), or `[::1]` and the port (IPv6 sends).
        let source = match peer.ip() {
            IpAddr::V4(v4) => Some((u32::from(v4), false)),
            IpAddr::V6(v6) if v6 == Ipv6Addr::LOCALHOST => Some((0, true)),
            IpAddr::V6(_) => None,
        };
        let policy = source.and_then(|(addr, v6)| {
            runner_monitor_common::dns_source_policy(addr)
                .or_else(|| lists.policy_of_port(addr, peer.port(), v6, netns))
        });
        let plan = policy.and_then(|p| lists.plan(p));
        let ports = plan
            .zip(question.as_ref())
            .and_then(|(plan, name)| plan.name_ports(&name.to_utf8()));
        // The server the job addressed, where its plan lets the resolver ask it.
        let asked = plan.and_then(|plan| {
            let server = match via {
                Via::Udp => {
                    let (addr, v6) = source?;
                    lists.asked_server(addr, peer.port(), v6, netns)?
                }
                Via::Tcp(asked) => asked?,
            };
            plan.asks_dns(server).then_some(server)
        });
        (policy, ports, asked)
    };
    let (Some(policy), Some(question), Some(ports)) = (policy, question, ports) else {
        return refusal(&message, ResponseCode::Refused);
    };
    // Upstream is asked from the agent's namespace; the others from the job's.
    let local = local.read().unwrap_or_else(PoisonError::into_inner).clone();
    let (servers, ns) = match asked {
        Some(server) => (vec![server], ns.as_ref()),
        None if !local.is_empty() => (local, ns.as_ref()),
        None => (
            upstream
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            None,
        ),
    };
    for server in servers {
        let forwarded = if matches!(via, Via::Tcp(_)) {
            timeout(UPSTREAM_TIMEOUT, forward_tcp(ns, server, query)).await
        } else {
            timeout(UPSTREAM_TIMEOUT, forward_udp(ns, server, query)).await
        };
        let Ok(Ok(response)) = forwarded else {
            continue;
        };
        let Ok(parsed) = Message::from_vec(&response) else {
            continue;
        };
        if parsed.id() != message.id() {
            continue;
        }
        let addrs = addresses(&parsed, &question);
        if !addrs.is_empty() {
            let mut lists = lists.lock().unwrap_or_else(PoisonError::into_inner);
            if let Err(error) = lists.admit(policy, &addrs, &ports, monotonic_ns()) {
                tracing::warn!(%error, "resolved addresses not admitted: answering SERVFAIL");
                return refusal(&message, ResponseCode::ServFail);
            }
        }
        return Some(response);
    }
    refusal(&message, ResponseCode::ServFail)
}

/// The A and AAAA addresses (with TTL) of `name` in `response`, through CNAME chains.
pub fn addresses(response: &Message, name: &Name) -> Vec<(IpAddr, u32)> {
    let mut names = vec![name.to_lowercase()];
    // A chain is at most as long as the answer section.
    for _ in 0..response.answers().len() {
        let before = names.len();
        for record in response.answers() {
            if let RData::CNAME(target) = record.data()
                && names.contains(&record.name().to_lowercase())
                && !names.contains(&target.0.to_lowercase())
            {
                names.push(target.0.to_lowercase());
            }
        }
        if names.len() == before {
            break;
        }
    }
    response
        .answers()
        .iter()
        .filter(|r| names.contains(&r.name().to_lowercase()))
        .filter_map(|r| match r.data() {
            RData::A(a) => Some((IpAddr::V4(a.0), r.ttl())),
            RData::AAAA(aaaa) => Some((IpAddr::V6(aaaa.0), r.ttl())),
            _ => None,
        })
        .collect()
}

/// Runs `f` in a thread of its own that enters network namespace `ns` first (no thread of the
/// runtime ever changes namespace): the sockets it makes are that namespace's.
pub fn in_namespace<T: Send>(
    ns: &std::fs::File,
    f: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    use std::os::fd::AsRawFd as _;
    let fd = ns.as_raw_fd();
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // SAFETY: setns on this thread only, with a namespace descriptor held open.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                f()
            })
            .join()
            .map_err(|_| io::Error::other("the thread in the namespace panicked"))?
    })
}

/// What `make` makes (a socket), made in namespace `ns` when given (`in_namespace`, from the
/// blocking pool), else here in the agent's own.
async fn made_in<T: Send + 'static>(
    ns: Option<&Arc<std::fs::File>>,
    make: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let Some(ns) = ns.cloned() else {
        return make();
    };
    tokio::task::spawn_blocking(move || in_namespace(&ns, make))
        .await
        .map_err(io::Error::other)?
}

/// Asks `server` over UDP from a socket of namespace `ns` (the agent's own when `None`).
async fn forward_udp(
    ns: Option<&Arc<std::fs::File>>,
    server: SocketAddr,
    query: &[u8],
) -> io::Result<Vec<u8>> {
    let bind: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = made_in(ns, move || {
        let socket = std::net::UdpSocket::bind(bind)?;
        socket.set_nonblocking(true)?;
        Ok(socket)
    })
    .await?;
    let socket = UdpSocket::from_std(socket)?;
    socket.connect(server).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; 65535];
    let n = socket.recv(&mut buf).await?;
    buf.truncate(n);
    Ok(buf)
}

/// Asks `server` over TCP from a socket of namespace `ns` (the agent's own when `None`).
async fn forward_tcp(
    ns: Option<&Arc<std::fs::File>>,
    server: SocketAddr,
    query: &[u8],
) -> io::Result<Vec<u8>> {
    let socket = made_in(ns, move || {
        if server.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
    })
    .await?;
    let mut stream = socket.connect(server).await?;
    let mut out = (query.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(query);
    stream.write_all(&out).await?;
    let len = stream.read_u16().await?;
    let mut buf = vec![0u8; usize::from(len)];
    stream.read_exact(&mut buf).await?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use hickory_proto::{
        op::Query,
        rr::{Record, RecordType, rdata},
    };

    use super::*;

    #[test]
    fn addresses_follow_cname_chains_from_the_name_asked_only() {
        let asked = Name::from_ascii("api.allowed.test.").unwrap();
        let edge = Name::from_ascii("edge.cdn.test.").unwrap();
        let other = Name::from_ascii("other.test.").unwrap();
        let mut m = Message::new();
        m.set_message_type(MessageType::Response);
        m.add_query(Query::query(asked.clone(), RecordType::A));
        m.add_answer(Record::from_rdata(
            Name::from_ascii("API.allowed.test.").unwrap(),
            60,
            RData::CNAME(rdata::CNAME(edge.clone())),
        ));
        m.add_answer(Record::from_rdata(
            edge,
            5,
            RData::A(rdata::A(Ipv4Addr::new(10, 0, 0, 7))),
        ));
        // Not on the chain: an answer may not admit addresses of names nobody asked for.
        m.add_answer(Record::from_rdata(
            other,
            5,
            RData::A(rdata::A(Ipv4Addr::new(10, 0, 0, 8))),
        ));
        assert_eq!(
            addresses(&m, &asked),
            vec![(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)), 5)]
        );
    }

    #[test]
    fn nameservers_are_read_from_resolv_conf() {
        let conf = "# c\nnameserver 10.0.0.2\nsearch x\nnameserver fe80::1%eth0\nnameserver bad\n";
        assert_eq!(
            nameservers(conf),
            vec![
                "10.0.0.2:53".parse().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
    }
}
