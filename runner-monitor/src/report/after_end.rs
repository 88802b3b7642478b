//! What a job used after its end, from the engine's findings (a staged job's gap).

use super::Record;
use crate::engine::finding::Finding;

impl Record {
    /// The object of a `credential-after-job-end` finding was used after the end: for a staged
    /// job the engine only knows that once no stage followed the gap it happened in.
    pub(super) fn after_end_from(&mut self, f: &Finding) {
        let path = f
            .credential
            .as_ref()
            .map(|c| c.path.as_str())
            .or(f.socket.as_ref().map(|s| s.path.as_str()));
        if let Some(Some(at)) = path.and_then(|p| self.credential_at.get(p))
            && let Some(c) = self.report.credentials.get_mut(*at)
        {
            c.after_end = true;
        }
        if let Some(d) = &f.destination
            && let Some(&at) = self.egress_at.get(&(d.ip, d.port))
            && let Some(e) = self.report.egress.get_mut(at)
        {
            e.after_end = true;
        }
    }
}
