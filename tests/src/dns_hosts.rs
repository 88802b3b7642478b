//! The network namespaces of the block-mode DNS tests: a server namespace joined to this one by
//! a veth pair (10.215.0.0/24, fd72:215::/64) holding the DNS servers and the listeners, and job
//! namespaces routed through it (10.216.N.0/24), as a container on a bridge network is.

use std::process::{Child, Command};

use crate::{
    dns::{ALLOWED, CNAME_TARGET, DENIED, GLIBC},
    netpair::serve_in,
    sh,
};

/// The DNS server the jobs' resolv.conf names, and the agent's upstream.
pub const SERVER: &str = "10.215.0.2";
/// A second DNS server, as a cluster's DNS service is: asked where a job's allowlist admits it.
pub const CLUSTER: &str = "10.215.0.7";
/// The same server's IPv6 address (`nodad`: usable at once).
pub const SERVER6: &str = "fd72:215::2";

/// The server namespace, its veth pair to this namespace and the servers in it; removed on drop.
pub struct ServerNamespace {
    pub name: String,
    host_link: String,
    servers: Vec<Child>,
}

impl ServerNamespace {
    pub fn create() -> Self {
        let id = std::process::id() % 100000;
        let ns = ServerNamespace {
            name: format!("rmdns{id}"),
            host_link: format!("rmdh{id}"),
            servers: Vec::new(),
        };
        let (n, h) = (&ns.name, &ns.host_link);
        let _ = Command::new("ip").args(["netns", "del", n]).output();
        let _ = Command::new("ip").args(["link", "del", h]).output();
        sh(&format!(
            "ip netns add {n} && ip -n {n} link set lo up && \
             ip link add {h} type veth peer name vs netns {n} && \
             ip addr add 10.215.0.1/24 dev {h} && ip link set {h} up && \
             ip -n {n} addr add {SERVER}/24 dev vs && ip -n {n} addr add {ALLOWED}/24 dev vs && \
             ip -n {n} addr add {DENIED}/24 dev vs && ip -n {n} addr add {CNAME_TARGET}/24 dev vs && \
             ip -n {n} addr add {GLIBC}/24 dev vs && ip -n {n} addr add {CLUSTER}/24 dev vs && \
             ip -n {n} link set vs up && \
             ip addr add fd72:215::1/64 dev {h} nodad && \
             ip -n {n} addr add {SERVER6}/64 dev vs nodad"
        ));
        ns
    }

    /// `job-step ARGS` inside the namespace, ready when it printed `listening`.
    pub fn serve(&mut self, args: &[String]) {
        self.servers.push(serve_in(&self.name, args));
    }
}

/// A namespace of the job's own (as a container on a bridge network has), joined to the server
/// namespace by a veth pair (10.216.N.0/24) and routed through it, with its own resolv.conf for
/// `ip netns exec` when given one; removed on drop.
pub struct JobNamespace {
    pub name: String,
}

impl JobNamespace {
    pub fn new(server: &ServerNamespace, n: u8, resolv_conf: Option<&str>) -> Self {
        let id = std::process::id() % 100000;
        let ns = JobNamespace {
            name: format!("rmdj{id}{n}"),
        };
        let (j, s) = (&ns.name, &server.name);
        let _ = Command::new("ip").args(["netns", "del", j]).output();
        sh(&format!(
            "ip netns add {j} && ip -n {j} link set lo up && \
             ip -n {s} link add vk{n} type veth peer name vj netns {j} && \
             ip -n {s} addr add 10.216.{n}.2/24 dev vk{n} && ip -n {s} link set vk{n} up && \
             ip -n {j} addr add 10.216.{n}.1/24 dev vj && ip -n {j} link set vj up && \
             ip -n {j} route add default via 10.216.{n}.2"
        ));
        if let Some(conf) = resolv_conf {
            let dir = std::path::Path::new("/etc/netns").join(j);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("resolv.conf"), conf).unwrap();
        }
        ns
    }
}

impl Drop for JobNamespace {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(std::path::Path::new("/etc/netns").join(&self.name));
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

impl Drop for ServerNamespace {
    fn drop(&mut self) {
        for child in &mut self.servers {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_link])
            .output();
    }
}
