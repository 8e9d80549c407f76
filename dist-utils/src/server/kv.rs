//! The keys of a store server, owned by its event-loop thread (so no lock).

use std::collections::HashMap;

/// The key-value map of a server, plus a flag telling the event loop that
/// parked requests may now be answerable.
#[derive(Debug, Default)]
pub(crate) struct Kv {
    map: HashMap<String, Vec<u8>>,
    changed: bool,
}

impl Kv {
    pub(crate) fn get(&self, key: &str) -> Option<&Vec<u8>> {
        self.map.get(key)
    }

    /// The keys of `keys` that are not present, in order.
    pub(crate) fn missing<'k>(&self, keys: &'k [String]) -> Vec<&'k String> {
        keys.iter().filter(|k| !self.map.contains_key(*k)).collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn set(&mut self, key: String, value: Vec<u8>) {
        self.map.insert(key, value);
        self.changed = true;
    }

    /// Appends to `key`'s value (creating it).
    pub(crate) fn append(&mut self, key: String, value: &[u8]) {
        self.map.entry(key).or_default().extend_from_slice(value);
        self.changed = true;
    }

    pub(crate) fn remove(&mut self, key: &str) -> bool {
        // Removing never makes a waiter ready: no change flag.
        self.map.remove(key).is_some()
    }

    /// Adds `delta` to the decimal `i64` counter at `key` (created at 0).
    /// `Err` names the key when its value is not a counter.
    pub(crate) fn add(&mut self, key: &str, delta: i64) -> comm_core::Result<i64> {
        let cur = match self.map.get(key) {
            None => 0,
            Some(v) => crate::parse_counter(key, v)?,
        };
        let new = cur.wrapping_add(delta);
        self.set(key.to_string(), new.to_string().into_bytes());
        Ok(new)
    }

    /// Returns and clears the change flag.
    pub(crate) fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }
}
