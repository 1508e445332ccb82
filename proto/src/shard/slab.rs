//! The shard's connections in numbered slots. A [`ConnId`] names a slot and the generation of
//! the connection in it, so finding a connection is an index and a comparison, not a hash, and
//! an id that outlived its connection (in an envelope still on its way) finds nothing rather
//! than the connection that took its slot since.

use std::collections::VecDeque;

use crate::apex::relay::ConnId;

/// Bits of a [`ConnId`] that number the slot; the rest count its generations.
const SLOT_BITS: u32 = 20;
const SLOT_MASK: u32 = (1 << SLOT_BITS) - 1;
/// Most connections a shard holds at once.
pub const MAX_SLOTS: usize = 1 << SLOT_BITS;

#[derive(Debug)]
struct Slot<T> {
    generation: u32,
    value: Option<T>,
}

/// Values by [`ConnId`], in slots.
#[derive(Debug)]
pub(crate) struct Slab<T> {
    slots: Vec<Slot<T>>,
    /// Free slots, oldest first: a slot is reused only after every other free one, so an id
    /// comes back only after `2^12` reuses of its slot by a shard that churned through all of
    /// its free slots as often.
    free: VecDeque<u32>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Self {
            slots: Vec::new(),
            free: VecDeque::new(),
            len: 0,
        }
    }
}

fn id(slot: u32, generation: u32) -> ConnId {
    ConnId::from_raw((generation << SLOT_BITS) | slot)
}

/// The slot and the generation `conn` names.
fn parts(conn: ConnId) -> (u32, u32) {
    (conn.raw() & SLOT_MASK, conn.raw() >> SLOT_BITS)
}

impl<T> Slab<T> {
    /// Stores `value`; its id, or `None` when every slot is taken.
    pub(crate) fn insert(&mut self, value: T) -> Option<ConnId> {
        let slot = match self.free.pop_front() {
            Some(slot) => slot,
            None if self.slots.len() < MAX_SLOTS => {
                self.slots.push(Slot {
                    generation: 0,
                    value: None,
                });
                (self.slots.len() - 1) as u32
            }
            None => return None,
        };
        let entry = &mut self.slots[slot as usize];
        entry.value = Some(value);
        self.len += 1;
        Some(id(slot, entry.generation))
    }

    fn slot(&self, conn: ConnId) -> Option<&Slot<T>> {
        let (slot, generation) = parts(conn);
        self.slots
            .get(slot as usize)
            .filter(|s| s.generation == generation)
    }

    pub(crate) fn get(&self, conn: &ConnId) -> Option<&T> {
        self.slot(*conn)?.value.as_ref()
    }

    pub(crate) fn get_mut(&mut self, conn: &ConnId) -> Option<&mut T> {
        let (slot, generation) = parts(*conn);
        self.slots
            .get_mut(slot as usize)
            .filter(|s| s.generation == generation)?
            .value
            .as_mut()
    }

    /// Takes the value out; its slot's next value gets the next generation.
    pub(crate) fn remove(&mut self, conn: &ConnId) -> Option<T> {
        let (slot, generation) = parts(*conn);
        let entry = self
            .slots
            .get_mut(slot as usize)
            .filter(|s| s.generation == generation)?;
        let value = entry.value.take()?;
        entry.generation = (entry.generation + 1) & (u32::MAX >> SLOT_BITS);
        self.free.push_back(slot);
        self.len -= 1;
        Some(value)
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (ConnId, &T)> {
        self.slots.iter().enumerate().filter_map(|(slot, s)| {
            s.value
                .as_ref()
                .map(|value| (id(slot as u32, s.generation), value))
        })
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().filter_map(|s| s.value.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_that_outlived_its_value_finds_nothing() {
        let mut slab = Slab::default();
        let a = slab.insert("a").unwrap();
        let b = slab.insert("b").unwrap();
        assert_eq!(slab.get(&a), Some(&"a"));
        assert_eq!(slab.remove(&a), Some("a"));
        assert_eq!(slab.remove(&a), None, "removed once");
        // b's slot is not free; a's is, and its next value has another id.
        let c = slab.insert("c").unwrap();
        assert_ne!(c, a);
        assert_eq!(parts(c).0, parts(a).0, "the free slot is reused");
        assert_eq!(slab.get(&a), None);
        assert_eq!(slab.get_mut(&a), None);
        assert_eq!(slab.get(&c), Some(&"c"));
        assert_eq!(slab.len(), 2);
        let mut all: Vec<(ConnId, &str)> = slab.iter().map(|(id, v)| (id, *v)).collect();
        all.sort();
        let mut want = vec![(b, "b"), (c, "c")];
        want.sort();
        assert_eq!(all, want);
    }

    #[test]
    fn free_slots_are_reused_oldest_first() {
        let mut slab = Slab::default();
        let ids: Vec<ConnId> = (0..3).map(|i| slab.insert(i).unwrap()).collect();
        slab.remove(&ids[2]);
        slab.remove(&ids[0]);
        let next = slab.insert(9).unwrap();
        assert_eq!(parts(next).0, parts(ids[2]).0);
        let next = slab.insert(9).unwrap();
        assert_eq!(parts(next).0, parts(ids[0]).0);
    }

    #[test]
    fn generations_wrap_within_the_id() {
        let mut slab = Slab::default();
        let first = slab.insert(0).unwrap();
        let mut last = first;
        for _ in 0..(1u32 << (32 - SLOT_BITS)) {
            slab.remove(&last);
            last = slab.insert(0).unwrap();
        }
        assert_eq!(last, first, "after 2^12 reuses the id comes back");
    }
}
