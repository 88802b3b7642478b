//! Names for what jobs touch: the DNS names of the addresses a job reached, and the containers
//! of the cgroups its processes run in (docs/containers.md).

use std::net::IpAddr;

use super::Engine;
use crate::event::{ContainerInfo, Dns, JobKey};

impl Engine {
    /// A DNS answer to job `key`: the names it asked for and got, by the addresses they resolved
    /// to (at most 8 names an address).
    pub(super) fn track_dns_answer(&mut self, key: JobKey, dns: &Dns) {
        let mut names: Vec<String> = dns
            .questions
            .iter()
            .map(|q| q.name.trim_end_matches('.').to_owned())
            .collect();
        for record in &dns.answers {
            let name = record.name.trim_end_matches('.').to_owned();
            if !names.contains(&name) {
                names.push(name);
            }
            if let Ok(ip) = record.data.parse::<IpAddr>() {
                let entry = self.dns.get_or_insert_with((key, ip), Vec::new);
                for n in &names {
                    if !entry.contains(n) && entry.len() < 8 {
                        entry.push(n.clone());
                    }
                }
            }
        }
    }

    /// The kernel made `c`'s cgroup the job's.
    pub(super) fn track_container(&mut self, c: &ContainerInfo) {
        // A job's exec into another job's container does not rename that job's container.
        if c.exec_only
            && self
                .containers
                .get(&c.cgroup_id)
                .is_some_and(|known| !known.exec_only)
        {
            return;
        }
        self.containers.insert(c.cgroup_id, c.clone());
    }

    /// The job's container process `pid` runs in, if any.
    pub(super) fn container_of(&self, pid: u32) -> Option<ContainerInfo> {
        let p = self.processes.get(&pid).or_else(|| self.exited.get(&pid))?;
        if p.cgroup_id == 0 {
            return None;
        }
        self.containers.get(&p.cgroup_id).cloned()
    }
}
