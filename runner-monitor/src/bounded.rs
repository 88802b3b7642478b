//! A map with a capacity: when full, the oldest entry (by first insertion) goes, and is counted.
//! Every engine and job table is one, so no input can grow the agent's memory without bound.

use std::collections::{BTreeMap, HashMap};

/// The hasher of the agent's per-event tables. Keys come from jobs (paths, ids): it is seeded at
/// random for each map, so which keys collide cannot be known in advance, and every such table is
/// bounded.
pub type Hasher = foldhash::quality::RandomState;

pub struct BoundedMap<K, V> {
    entries: HashMap<K, (u64, V), Hasher>,
    order: BTreeMap<u64, K>,
    next: u64,
    capacity: usize,
    evicted: u64,
}

impl<K: std::hash::Hash + Eq + Clone, V> BoundedMap<K, V> {
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::default(),
            order: BTreeMap::new(),
            next: 0,
            capacity: capacity.max(1),
            evicted: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries dropped to make room, since creation.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// By `key` or anything `K` borrows as (a `&str` for a `String` key: no allocation).
    pub fn get<Q: std::hash::Hash + Eq + ?Sized>(&self, key: &Q) -> Option<&V>
    where
        K: std::borrow::Borrow<Q>,
    {
        self.entries.get(key).map(|(_, v)| v)
    }

    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.entries.get_mut(key).map(|(_, v)| v)
    }

    pub fn contains_key<Q: std::hash::Hash + Eq + ?Sized>(&self, key: &Q) -> bool
    where
        K: std::borrow::Borrow<Q>,
    {
        self.entries.contains_key(key)
    }

    /// Inserts or replaces (a replaced entry keeps its age). Returns the evicted entry, if any.
    pub fn insert(&mut self, key: K, value: V) -> Option<(K, V)> {
        if let Some((_, v)) = self.entries.get_mut(&key) {
            *v = value;
            return None;
        }
        let mut evicted = None;
        if self.entries.len() >= self.capacity
            && let Some((_, oldest)) = self.order.pop_first()
        {
            evicted = self.entries.remove(&oldest).map(|(_, v)| (oldest, v));
            self.evicted += 1;
        }
        let seq = self.next;
        self.next += 1;
        self.order.insert(seq, key.clone());
        self.entries.insert(key, (seq, value));
        evicted
    }

    /// The value for `key`, inserted with `make` when absent.
    pub fn get_or_insert_with(&mut self, key: K, make: impl FnOnce() -> V) -> &mut V {
        if !self.entries.contains_key(&key) {
            self.insert(key.clone(), make());
        }
        self.get_mut(&key).expect("just inserted")
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        let (seq, v) = self.entries.remove(key)?;
        self.order.remove(&seq);
        Some(v)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.entries.iter().map(|(k, (_, v))| (k, v))
    }

    /// Entries oldest first: inserting them in this order into an empty map rebuilds the same
    /// ages (state snapshots).
    pub fn iter_by_age(&self) -> impl Iterator<Item = (&K, &V)> {
        self.order
            .values()
            .filter_map(|k| self.entries.get(k).map(|(_, v)| (k, v)))
    }

    /// Inserts `entries` in order (oldest first), as `insert` would.
    pub fn extend(&mut self, entries: impl IntoIterator<Item = (K, V)>) {
        for (k, v) in entries {
            self.insert(k, v);
        }
    }
}

/// A snapshot is the entries, oldest first; the capacity comes from the policy in force when it
/// is read back.
impl<K: serde::Serialize + std::hash::Hash + Eq + Clone, V: serde::Serialize> serde::Serialize
    for BoundedMap<K, V>
{
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter_by_age())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_map_drops_the_oldest_and_counts_it() {
        let mut m = BoundedMap::new(2);
        m.insert("a", 1);
        m.insert("b", 2);
        m.insert("a", 10); // replace keeps age
        assert_eq!(m.insert("c", 3), Some(("a", 10)));
        assert_eq!(m.len(), 2);
        assert_eq!(m.evicted(), 1);
        assert!(m.get(&"a").is_none());
        m.remove(&"b");
        m.insert("d", 4);
        assert_eq!(m.evicted(), 1);
        m.insert("e", 5);
        assert_eq!(m.evicted(), 2, "c was the oldest left");
        assert!(m.get(&"c").is_none());
        assert_eq!(m.iter().count(), 2);
    }

    #[test]
    fn a_snapshot_rebuilds_the_same_ages() {
        let mut m = BoundedMap::new(3);
        for (k, v) in [("a", 1), ("b", 2), ("c", 3)] {
            m.insert(k, v);
        }
        m.remove(&"a");
        m.insert("d", 4);
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, r#"[["b",2],["c",3],["d",4]]"#);
        let entries: Vec<(String, i32)> = serde_json::from_str(&json).unwrap();
        let mut back = BoundedMap::new(3);
        back.extend(entries);
        back.insert("e".to_owned(), 5);
        assert!(back.get(&"b".to_owned()).is_none(), "b is still the oldest");
    }
}
