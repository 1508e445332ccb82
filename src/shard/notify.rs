//! Shard-local wake-ups, no atomics: [`Notify`], the flag another task sets after queueing
//! output into a connection's session (its driver awaits [`Notify::notified`] beside its
//! read), and [`Backlog`], the count of connections whose relay output overflowed, which the
//! shard's other readers wait on (backpressure).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// A wake-up flag with at most one waiter.
#[derive(Debug, Default)]
pub struct Notify {
    pending: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Notify {
    /// Sets the flag and wakes the waiter, if any.
    pub fn notify(&self) {
        self.pending.set(true);
        if let Some(waker) = self.waker.borrow_mut().take() {
            waker.wake();
        }
    }

    /// Completes once the flag is set (immediately if it already is), clearing it.
    pub fn notified(&self) -> Notified<'_> {
        Notified { notify: self }
    }
}

/// Future returned by [`Notify::notified`].
#[derive(Debug)]
pub struct Notified<'a> {
    notify: &'a Notify,
}

impl Future for Notified<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.notify.pending.replace(false) {
            return Poll::Ready(());
        }
        *self.notify.waker.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// Connections whose relay output overflowed their session, and the tasks holding back until
/// there are none. Waiters are woken on every change and check their own condition again, so
/// a connection that just became backlogged itself is released at once.
///
/// Each time the count drops to zero every waiter is let through once, even if the backlog is
/// back by the time it runs: under sustained fan-in it comes back at once, and waiters that
/// looked again only at the count were starved (p99.9 of 0.5 s in `apex-load --pattern fan-in`).
#[derive(Debug, Default)]
pub struct Backlog {
    count: Cell<usize>,
    /// How many times the count dropped to zero.
    releases: Cell<u64>,
    /// How many times the waiters were woken: a waiter registers once per wake-up, so the
    /// list holds each task at most once without being searched.
    wakes: Cell<u64>,
    waiters: RefCell<Vec<Waker>>,
    /// How many times something became backlogged, since the start.
    added: Cell<u64>,
}

impl Backlog {
    /// One more connection is backlogged.
    pub fn add(&self) {
        self.count.set(self.count.get() + 1);
        self.added.set(self.added.get() + 1);
        self.wake_all();
    }

    /// How many times something became backlogged since the start (metrics).
    pub fn overflows(&self) -> u64 {
        self.added.get()
    }

    /// One connection is no longer backlogged.
    pub fn remove(&self) {
        self.count.set(self.count.get().saturating_sub(1));
        if self.count.get() == 0 {
            self.releases.set(self.releases.get().wrapping_add(1));
        }
        self.wake_all();
    }

    /// Wakes every waiter (also for other reasons to look again, such as shutdown).
    pub fn wake_all(&self) {
        self.wakes.set(self.wakes.get().wrapping_add(1));
        for waker in self.waiters.borrow_mut().drain(..) {
            waker.wake();
        }
    }

    /// Completes once nothing is backlogged, or `proceed` holds (checked now and after every
    /// change), or the backlog emptied at least once since the wait began.
    pub async fn wait(&self, proceed: impl Fn() -> bool) {
        let began = self.releases.get();
        let mut registered: Option<u64> = None;
        futures_lite::future::poll_fn(|cx| {
            if self.count.get() == 0 || proceed() || self.releases.get() != began {
                return Poll::Ready(());
            }
            if registered != Some(self.wakes.get()) {
                registered = Some(self.wakes.get());
                self.waiters.borrow_mut().push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_before_and_after_waiting() {
        let notify = std::rc::Rc::new(Notify::default());
        notify.notify();
        futures_lite::future::block_on(notify.notified());
        let n = notify.clone();
        let waiter = async move { n.notified().await };
        futures_lite::pin!(waiter);
        let waker = futures_lite::future::block_on(futures_lite::future::poll_fn(|cx| {
            Poll::Ready(cx.waker().clone())
        }));
        let mut cx = Context::from_waker(&waker);
        assert!(waiter.as_mut().poll(&mut cx).is_pending());
        notify.notify();
        assert!(waiter.as_mut().poll(&mut cx).is_ready());
    }

    #[test]
    fn backlog_waiters_are_released_when_it_empties() {
        let backlog = Backlog::default();
        backlog.add();
        backlog.add();
        let waker = futures_lite::future::block_on(futures_lite::future::poll_fn(|cx| {
            Poll::Ready(cx.waker().clone())
        }));
        let mut cx = Context::from_waker(&waker);
        let waiter = backlog.wait(|| false);
        futures_lite::pin!(waiter);
        assert!(waiter.as_mut().poll(&mut cx).is_pending());
        assert!(waiter.as_mut().poll(&mut cx).is_pending());
        assert_eq!(backlog.waiters.borrow().len(), 1, "one waker per waiter");
        backlog.remove();
        assert!(backlog.waiters.borrow().is_empty(), "woken");
        assert!(
            waiter.as_mut().poll(&mut cx).is_pending(),
            "still one backlogged"
        );
        // Emptied, then backlogged again before the waiter ran: it still gets its turn.
        backlog.remove();
        backlog.add();
        assert!(waiter.as_mut().poll(&mut cx).is_ready());
        // A waiter whose own condition holds is not held.
        let own = backlog.wait(|| true);
        futures_lite::pin!(own);
        assert!(own.as_mut().poll(&mut cx).is_ready());
        backlog.remove();
        backlog.remove();
        assert_eq!(backlog.count.get(), 0, "never below zero");
        let free = backlog.wait(|| false);
        futures_lite::pin!(free);
        assert!(free.as_mut().poll(&mut cx).is_ready(), "nothing backlogged");
    }
}
