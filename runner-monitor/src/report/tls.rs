//! TLS server names in the job report: each egress destination lists the names its connections
//! sent in their ClientHello.

use super::Record;
use crate::event::TlsHello;

/// Server names kept per destination.
const MAX_SNI: usize = 8;

impl Record {
    pub(super) fn tls_hello(&mut self, t: &TlsHello) {
        let Some(name) = &t.sni else { return };
        let Some(&at) = self.egress_at.get(&(t.ip, t.port)) else {
            return;
        };
        let e = &mut self.report.egress[at];
        if e.sni.len() < MAX_SNI && !e.sni.contains(name) {
            e.sni.push(name.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Connect, Event, EventDetail, JobKey, JobRef, ProcessRef};

    #[test]
    fn a_destination_lists_the_server_names_its_connections_sent() {
        let mut record = Record::new(JobKey(7), 1);
        let policy = crate::policy::Policy::builtin();
        let ip = "203.0.113.9".parse().unwrap();
        let event = Event {
            time_ns: 2,
            job: Some(JobRef {
                key: JobKey(7),
                ended: false,
                root: false,
            }),
            process: ProcessRef {
                pid: 100,
                tid: 100,
                ppid: 1,
                uid: 0,
                comm: "curl".into(),
                cgroup_id: 1,
            },
            truncated: false,
            detail: EventDetail::Connect(Connect::inet(ip, 443)),
        };
        let EventDetail::Connect(c) = &event.detail else {
            unreachable!()
        };
        record.connect(&policy, &event, c, false);
        for name in ["api.github.com", "api.github.com", "uploads.github.com"] {
            record.tls_hello(&TlsHello {
                ip,
                port: 443,
                sni: Some(name.to_owned()),
                sni_truncated: false,
                blocked: false,
            });
        }
        assert_eq!(
            record.report.egress[0].sni,
            ["api.github.com", "uploads.github.com"]
        );
        assert!(
            super::super::text::egress_counts(&record.report.egress[0])
                .contains("TLS to api.github.com, uploads.github.com")
        );
    }
}
