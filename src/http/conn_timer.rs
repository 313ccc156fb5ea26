//! hyper's timer for one HTTP/1 server connection: one timer entry per connection, moved from
//! request to request, instead of a new one per request.
//!
//! hyper bounds the wait for every request head with `--header-read-timeout` (which also bounds
//! how long a keep-alive connection may sit idle between requests). It asks its [`Timer`] for a
//! sleep before each head and drops that sleep once the head has arrived. With hyper-util's
//! `TokioTimer` each request then costs an allocation, an insert into and a removal from
//! tokio's timer wheel, and, whenever the new deadline is the runtime's earliest, a wake-up of
//! the I/O driver (an `eventfd` write and one more `epoll_wait` round): 0.24 syscalls per
//! request on a saturated pair (benches/README.md, "Where the CPU goes", the syscall counts).
//!
//! [`ConnTimer`] keeps one tokio [`Sleep`](tokio::time::Sleep) per connection and moves its
//! deadline. Deadlines only move later (`now + timeout`), which tokio does with one atomic
//! store: the entry stays in the wheel and is only looked at again when its old slot comes
//! round (then re-filed, or fired if the deadline is really past). The handles hyper holds are
//! views of that one sleep; dropping one changes nothing, so a busy connection may see one
//! spurious wake-up per timeout period from a stale deadline, which hyper ignores.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::rt::{Sleep, Timer};

type Slot = Arc<Mutex<Option<Pin<Box<tokio::time::Sleep>>>>>;

/// The timer for one connection; make one per connection (clones share the sleep).
#[derive(Clone, Default)]
pub struct ConnTimer {
    slot: Slot,
}

impl Timer for ConnTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Sleep>> {
        let deadline = tokio::time::Instant::from_std(deadline);
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        match slot.as_mut() {
            Some(sleep) => sleep.as_mut().reset(deadline),
            None => *slot = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
        Box::pin(Deadline {
            slot: self.slot.clone(),
        })
    }

    /// tokio's clock, as the sleeps use (it differs from `Instant::now` only in paused tests).
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
}

/// hyper's handle on the connection's sleep, valid until the next `sleep_until`.
struct Deadline {
    slot: Slot,
}

impl Future for Deadline {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        slot.as_mut()
            .expect("a Deadline exists only after sleep_until filled the slot")
            .as_mut()
            .poll(cx)
    }
}

impl Sleep for Deadline {}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_moved_deadline_fires_at_the_new_time_not_the_old() {
        let timer = ConnTimer::default();
        let start = tokio::time::Instant::now();
        let mut first = timer.sleep(Duration::from_secs(10));
        // Polled once, as hyper does while it waits for a head: the entry is in the wheel.
        assert!(poll_once(first.as_mut()).is_pending());
        drop(first);
        tokio::time::advance(Duration::from_secs(4)).await;
        let second = timer.sleep(Duration::from_secs(10));
        second.await;
        assert_eq!(start.elapsed(), Duration::from_secs(14));
    }

    #[tokio::test(start_paused = true)]
    async fn a_fired_sleep_can_be_armed_again() {
        let timer = ConnTimer::default();
        timer.sleep(Duration::from_secs(1)).await;
        let start = tokio::time::Instant::now();
        timer.sleep(Duration::from_secs(3)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(3));
    }

    fn poll_once(f: Pin<&mut dyn Sleep>) -> Poll<()> {
        let waker = std::task::Waker::noop();
        f.poll(&mut Context::from_waker(waker))
    }
}
