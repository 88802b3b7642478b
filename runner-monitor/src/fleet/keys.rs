//! The fingerprint key ids the fleet has used, and which are still accepted. A fingerprint made
//! with one key never equals one made with another, so key rotation is: give every agent the new
//! key file (with its new id); as soon as the correlator sees the new id, the old one has
//! `grace` left, after which fingerprints made with it are neither recorded nor compared.

/// Key ids in the order they were first seen, with that time.
pub struct KeyRing {
    grace_ns: u64,
    keys: Vec<(String, u64)>,
}

/// Key ids remembered at most (a fleet rotates a few times a year; the handle is a u16).
const MAX_KEYS: usize = 1024;

impl KeyRing {
    pub fn new(grace_ns: u64) -> Self {
        Self {
            grace_ns,
            keys: Vec::new(),
        }
    }

    /// A message made with `key_id` at `time_unix_ns`: a new id is remembered from then.
    pub fn seen(&mut self, key_id: &str, time_unix_ns: u64) {
        if self.keys.iter().any(|(k, _)| k == key_id) || self.keys.len() >= MAX_KEYS {
            return;
        }
        self.keys.push((key_id.to_owned(), time_unix_ns));
    }

    /// The handle of `key_id` if it is accepted at `now`: the newest key, or an older one whose
    /// successor was first seen less than the grace period ago. `None` for an unknown id.
    pub fn accepted(&self, key_id: &str, now_unix_ns: u64) -> Option<u16> {
        let index = self.keys.iter().position(|(k, _)| k == key_id)?;
        let first_seen = self.keys[index].1;
        // The successor: the key first seen next after this one.
        let successor = self
            .keys
            .iter()
            .filter(|(k, t)| *t > first_seen || (*t == first_seen && k.as_str() > key_id))
            .map(|(_, t)| *t)
            .min();
        match successor {
            Some(t) if now_unix_ns > t.saturating_add(self.grace_ns) => None,
            _ => Some(index as u16),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn old_key_is_accepted_for_the_grace_period_after_the_new_one_appears() {
        let mut ring = KeyRing::new(60 * S);
        ring.seen("k1", 10 * S);
        assert_eq!(ring.accepted("k1", 1000 * S), Some(0));
        ring.seen("k2", 1000 * S);
        assert!(ring.accepted("k1", 1059 * S).is_some());
        assert!(ring.accepted("k1", 1061 * S).is_none());
        assert_eq!(ring.accepted("k2", 5000 * S), Some(1));
        assert_eq!(ring.accepted("never-seen", 0), None);
    }
}
