//! Graceful shutdown: one signal, many watchers.
//!
//! The sequence (see ARCHITECTURE.md): a [`Drain`] is triggered by SIGTERM/SIGINT or
//! `POST /shutdown` → `/ready` answers 503 at once → after `--shutdown-accept-delay` the accept
//! loops stop → open connections get `--shutdown-grace-period` to finish → exit 0.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;

/// The sending side: starts the drain once.
#[derive(Debug, Clone)]
pub struct Drain {
    tx: Arc<watch::Sender<bool>>,
}

/// The watching side, cloned into accept loops and the admin server.
#[derive(Debug, Clone)]
pub struct Watch {
    rx: watch::Receiver<bool>,
}

impl Drain {
    pub fn new() -> (Drain, Watch) {
        let (tx, rx) = watch::channel(false);
        (Drain { tx: Arc::new(tx) }, Watch { rx })
    }

    /// Starts draining. Returns false when a drain had already started.
    pub fn start(&self) -> bool {
        !self.tx.send_replace(true)
    }
}

impl Watch {
    pub fn is_draining(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once draining has started. Cancellation safe: it only waits on a watch channel.
    pub async fn signaled(&mut self) {
        // An error means every `Drain` is gone: nobody can start a drain any more, so wait forever.
        if self.rx.wait_for(|d| *d).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Readiness as the admin server sees it: ready once the listeners serve and until draining.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_starts_once_and_wakes_watchers() {
        let (drain, watch) = Drain::new();
        let mut w = watch.clone();
        assert!(!watch.is_draining());
        let waiter = tokio::spawn(async move { w.signaled().await });
        assert!(drain.start());
        assert!(!drain.start(), "second start reports already draining");
        waiter.await.expect("watcher wakes");
        assert!(watch.is_draining());
    }
}
