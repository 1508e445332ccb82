//! The envelopes a shard has for one peer shard and not yet handed to the shard queue, and
//! whether there are too many of them.
//!
//! A peer that stops taking envelopes (its own output is backlogged) must slow down the
//! connections that produce them here, or they pile up without bound: with two shards under
//! saturation the relay grew to hundreds of megabytes and delivered with seconds of delay.
//! Above its limit an outbox therefore counts as backlogged in the shard's `outbox_backlog`,
//! which the connection readers wait on, until it drains to half the limit (so it does not
//! flap at the edge). The shard-queue receivers do not wait on it: two shards whose outboxes
//! are both full still take each other's envelopes, so they cannot wait on each other.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;

use super::notify::Notify;

/// The queue of envelopes for one peer shard, in order; one flusher task sends them.
#[derive(Debug)]
pub struct Outbox<T> {
    queue: RefCell<VecDeque<T>>,
    wake: Notify,
    /// Set while the outbox is over `limit` and until it drains to `limit / 2`.
    over: Cell<bool>,
    limit: usize,
}

impl<T> Outbox<T> {
    /// An empty outbox that counts as backlogged above `limit` entries.
    pub fn new(limit: usize) -> Self {
        Self {
            queue: RefCell::new(VecDeque::new()),
            wake: Notify::default(),
            over: Cell::new(false),
            limit,
        }
    }

    /// Queues `item` and wakes the flusher. True when this push took the outbox over its
    /// limit: the caller counts it as backlogged from now on.
    pub fn push(&self, item: T) -> bool {
        let mut queue = self.queue.borrow_mut();
        queue.push_back(item);
        self.wake.notify();
        if !self.over.get() && queue.len() > self.limit {
            self.over.set(true);
            return true;
        }
        false
    }

    /// The oldest item, and true when taking it drained an outbox that was over its limit to
    /// half of it: the caller no longer counts it as backlogged.
    pub fn pop(&self) -> (Option<T>, bool) {
        let mut queue = self.queue.borrow_mut();
        let item = queue.pop_front();
        let relieved = self.over.get() && queue.len() <= self.limit / 2;
        if relieved {
            self.over.set(false);
        }
        (item, relieved)
    }

    /// Completes after the next [`push`](Self::push) (or at once if one came since the last
    /// wait).
    pub async fn pushed(&self) {
        self.wake.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_the_limit_once_until_drained_to_half() {
        let outbox = Outbox::new(4);
        let crossings: Vec<bool> = (0..8).map(|i| outbox.push(i)).collect();
        // Only the push that made it 5 > 4 reports the crossing.
        assert_eq!(
            crossings,
            [false, false, false, false, true, false, false, false]
        );
        // Relieved only when 2 (= 4 / 2) are left, once.
        let relief: Vec<(Option<i32>, bool)> = (0..8).map(|_| outbox.pop()).collect();
        let relieved_at: Vec<usize> = relief
            .iter()
            .enumerate()
            .filter_map(|(i, (_, r))| r.then_some(i))
            .collect();
        assert_eq!(relieved_at, [5]);
        // Order is kept.
        let items: Vec<i32> = relief.iter().filter_map(|(item, _)| *item).collect();
        assert_eq!(items, (0..8).collect::<Vec<_>>());
        assert_eq!(
            outbox.pop(),
            (None, false),
            "all eight were queued, no more"
        );
    }

    #[test]
    fn refilling_after_relief_crosses_again() {
        let outbox = Outbox::new(2);
        assert!(!outbox.push(1));
        assert!(!outbox.push(2));
        assert!(outbox.push(3));
        assert!(!outbox.push(4), "already over: no second crossing");
        assert_eq!(outbox.pop(), (Some(1), false));
        assert_eq!(outbox.pop(), (Some(2), false));
        assert_eq!(outbox.pop(), (Some(3), true));
        // 4 is still queued: 4, 5 is at the limit, 4, 5, 6 over it again.
        assert!(!outbox.push(5));
        assert!(outbox.push(6), "over again after the relief");
    }

    #[test]
    fn a_push_wakes_the_flusher() {
        let outbox = Outbox::new(8);
        outbox.push(1);
        // The notification is kept until the flusher waits.
        futures_lite::future::block_on(outbox.pushed());
        assert_eq!(outbox.pop(), (Some(1), false));
    }
}
