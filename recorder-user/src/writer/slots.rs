//! The writer thread's tables: live recordings in numbered slots, and flow ids routed straight
//! to a slot, so that a packet costs one lookup of an integer key (no hashing of a recording id
//! string per packet).

use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
};

use super::encode::recording::Recording;

/// Live recordings by slot, and the slot of each recording id.
#[derive(Default)]
pub(crate) struct Recordings {
    slots: Vec<Option<Recording>>,
    /// Slots emptied by ended recordings, reused first.
    free: Vec<usize>,
    by_id: HashMap<String, usize>,
}

impl Recordings {
    pub(crate) fn len(&self) -> usize {
        self.by_id.len()
    }

    pub(crate) fn contains_key(&self, id: &str) -> bool {
        self.by_id.contains_key(id)
    }

    pub(crate) fn slot_of(&self, id: &str) -> Option<usize> {
        self.by_id.get(id).copied()
    }

    pub(crate) fn get_mut(&mut self, id: &str) -> Option<&mut Recording> {
        let slot = *self.by_id.get(id)?;
        self.slot_mut(slot)
    }

    pub(crate) fn slot(&self, slot: usize) -> Option<&Recording> {
        self.slots.get(slot).and_then(Option::as_ref)
    }

    pub(crate) fn slot_mut(&mut self, slot: usize) -> Option<&mut Recording> {
        self.slots.get_mut(slot).and_then(Option::as_mut)
    }

    /// Stores a recording (its id must not be present: see `contains_key`); returns its slot.
    pub(crate) fn insert(&mut self, rec: Recording) -> usize {
        let id = rec.id().to_string();
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot] = Some(rec);
                slot
            }
            None => {
                self.slots.push(Some(rec));
                self.slots.len() - 1
            }
        };
        if let Some(old) = self.by_id.insert(id, slot) {
            // Callers check first; should it happen, the older one is no longer reachable.
            self.slots[old] = None;
            self.free.push(old);
        }
        slot
    }

    /// Takes a recording out; returns the slot it had.
    pub(crate) fn remove(&mut self, id: &str) -> Option<(usize, Recording)> {
        let slot = self.by_id.remove(id)?;
        let rec = self.slots[slot].take()?;
        self.free.push(slot);
        Some((slot, rec))
    }

    pub(crate) fn ids(&self) -> Vec<String> {
        self.by_id.keys().cloned().collect()
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &Recording> {
        self.slots.iter().flatten()
    }

    /// Every live recording with its slot.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (usize, &mut Recording)> {
        self.slots
            .iter_mut()
            .enumerate()
            .filter_map(|(slot, r)| r.as_mut().map(|r| (slot, r)))
    }

    /// Takes every recording out.
    pub(crate) fn take_all(&mut self) -> Vec<Recording> {
        self.by_id.clear();
        self.free.clear();
        std::mem::take(&mut self.slots)
            .into_iter()
            .flatten()
            .collect()
    }
}

/// Where a flow id's packets go.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Route {
    pub slot: usize,
    pub stream: usize,
    pub rtcp: bool,
}

/// Flow id -> route. Flow ids are small integers handed out by signaling (not attacker-chosen
/// keys), so a multiplicative hash is enough; SipHash was a visible share of the per-packet cost.
pub(crate) type FlowRoutes = HashMap<u64, Route, BuildHasherDefault<FlowIdHasher>>;

/// Fibonacci hashing of a `u64` key (hashbrown takes the top bits for its tags and the low bits
/// for the bucket: the multiply spreads sequential ids over both).
#[derive(Default)]
pub(crate) struct FlowIdHasher(u64);

impl Hasher for FlowIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed here; a generic fallback keeps the trait total.
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        let h = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = h ^ (h >> 29);
    }
}

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;

    use super::*;

    #[test]
    fn flow_hasher_spreads_sequential_ids() {
        let b = BuildHasherDefault::<FlowIdHasher>::default();
        let mut low = std::collections::HashSet::new();
        let mut high = std::collections::HashSet::new();
        for id in 0..1024u64 {
            let h = b.hash_one(id);
            low.insert(h & 1023);
            high.insert(h >> 57);
        }
        assert!(low.len() > 600, "low bits used: {}", low.len());
        assert_eq!(high.len(), 128, "all 7-bit tags used");
    }
}
