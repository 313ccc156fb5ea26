//! hyper's executor for one HTTP/2 connection: on a single-threaded runtime, the futures hyper
//! hands it (one per stream on a server, one per request on a client) run inside the
//! connection's own task instead of each as a task of its own.
//!
//! Why: hyper's HTTP/2 server spawns a task per stream and its client a task per request. On a
//! current-thread runtime (`--workers 1`, the default) those tasks run on the same thread as the
//! connection anyway; spawning each costs an allocation of the task cell, several moves of a
//! future of some hundred bytes into it, the runtime's task-list bookkeeping and a pass through
//! the scheduler, and every hand-off between stream and connection is a wake-up of another
//! task (benches/README.md, "Where the CPU goes"). Here a stream's future is boxed once and
//! polled by the connection's task when it is woken ([`FuturesUnordered`] polls only the woken
//! ones). On a multi-threaded runtime the futures are spawned as before, so one busy mesh
//! connection's streams still spread over the workers.
//!
//! [`Driven`] polls the connection and these futures; it ends when the connection has ended
//! and every future it started has finished, as spawned tasks would have run on after it.
//! Dropping it (a connection dropped after a shutdown grace) drops those futures too.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};

type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The executor to give hyper's HTTP/2 builder for one connection; drive that connection with
/// [`ConnExec::drive`].
#[derive(Clone)]
pub struct ConnExec {
    /// `None`: spawn on the runtime (multi-threaded).
    local: Option<Arc<Mutex<Queue>>>,
}

/// Futures handed over since the connection's task last looked, and how to wake it should one
/// arrive while it is not running (hyper hands them over from within the task's own poll).
#[derive(Default)]
struct Queue {
    new: Vec<Task>,
    /// The connection's task is polling (it looks at `new` before it returns).
    polling: bool,
    waker: Option<Waker>,
}

impl ConnExec {
    /// Local when the current runtime is single-threaded (and outside any runtime, which only
    /// tests do), spawning otherwise.
    pub fn new() -> Self {
        let single = tokio::runtime::Handle::try_current()
            .map(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread)
            .unwrap_or(true);
        ConnExec {
            local: single.then(Arc::default),
        }
    }

    /// `conn` together with the futures it hands to this executor.
    pub fn drive<C: Future<Output = O>, O>(&self, conn: C) -> Driven<C, O> {
        Driven {
            conn,
            output: None,
            running: FuturesUnordered::new(),
            local: self.local.clone(),
        }
    }
}

impl Default for ConnExec {
    fn default() -> Self {
        ConnExec::new()
    }
}

impl<F> hyper::rt::Executor<F> for ConnExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        let Some(local) = &self.local else {
            tokio::spawn(fut);
            return;
        };
        // As a spawned task would, a panic ends only this future (the sidecar unwinds panics so
        // a bug ends one task, not the process); the panic hook has reported it.
        let fut = AssertUnwindSafe(fut).catch_unwind().map(|r| {
            if r.is_err() {
                tracing::error!("an HTTP/2 stream's future panicked; the stream was dropped");
            }
        });
        let mut queue = local.lock().unwrap_or_else(PoisonError::into_inner);
        queue.new.push(Box::pin(fut));
        if !queue.polling {
            if let Some(waker) = &queue.waker {
                waker.wake_by_ref();
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A connection future driven together with the futures it started; see the module doc.
    /// (The output is a parameter of its own: a field of type `C::Output` trips rustc's
    /// `Send` inference for the tasks that hold it.)
    pub struct Driven<C, O> {
        #[pin]
        conn: C,
        output: Option<O>,
        running: FuturesUnordered<Task>,
        local: Option<Arc<Mutex<Queue>>>,
    }
}

impl<C: Future<Output = O>, O> Driven<C, O> {
    /// The connection itself (for its graceful shutdown).
    pub fn conn(self: Pin<&mut Self>) -> Pin<&mut C> {
        self.project().conn
    }
}

impl<C: Future<Output = O>, O> Future for Driven<C, O> {
    type Output = O;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<O> {
        let mut this = self.project();
        let Some(local) = this.local.as_ref() else {
            return this.conn.poll(cx);
        };
        // While this task runs, futures handed over are picked up below: no wake-up needed.
        local.lock().unwrap_or_else(PoisonError::into_inner).polling = true;
        if this.output.is_none() {
            if let Poll::Ready(out) = this.conn.as_mut().poll(cx) {
                *this.output = Some(out);
            }
        }
        loop {
            // Polls the woken futures until none is ready; `FuturesUnordered` yields to the
            // scheduler by itself after a round through all of them.
            while let Poll::Ready(Some(())) = this.running.poll_next_unpin(cx) {}
            let mut queue = local.lock().unwrap_or_else(PoisonError::into_inner);
            if queue.new.is_empty() {
                queue.polling = false;
                if !queue
                    .waker
                    .as_ref()
                    .is_some_and(|w| w.will_wake(cx.waker()))
                {
                    queue.waker = Some(cx.waker().clone());
                }
                break;
            }
            this.running.extend(queue.new.drain(..));
        }
        if this.output.is_some() && this.running.is_empty() {
            if let Some(out) = this.output.take() {
                return Poll::Ready(out);
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use hyper::rt::Executor;

    #[tokio::test(flavor = "current_thread")]
    async fn handed_over_futures_run_in_the_connection_task_and_outlive_it() {
        let exec = ConnExec::new();
        assert!(exec.local.is_some(), "single-threaded runtime: local");
        let done = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        // The "connection" hands over two futures, one of which waits for a signal sent after
        // the connection itself has ended.
        let conn = {
            let (exec, done) = (exec.clone(), done.clone());
            async move {
                let d = done.clone();
                exec.execute(async move {
                    d.fetch_add(1, Ordering::SeqCst);
                });
                let d = done.clone();
                exec.execute(async move {
                    let _ = rx.await;
                    d.fetch_add(1, Ordering::SeqCst);
                });
                "conn ended"
            }
        };
        let driven = tokio::spawn(exec.drive(conn));
        tokio::task::yield_now().await;
        assert_eq!(done.load(Ordering::SeqCst), 1, "the first ran");
        assert!(!driven.is_finished(), "waits for the second");
        tx.send(()).expect("receiver alive");
        assert_eq!(driven.await.expect("no panic"), "conn ended");
        assert_eq!(done.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_panicking_future_ends_alone() {
        let exec = ConnExec::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let conn = {
            let exec = exec.clone();
            async move {
                exec.execute(async { panic!("a bug in one stream") });
                exec.execute(async move {
                    let _ = tx.send("the other stream finished");
                });
                tokio::task::yield_now().await;
                "conn ended"
            }
        };
        assert_eq!(exec.drive(conn).await, "conn ended");
        assert_eq!(rx.await.expect("sent"), "the other stream finished");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_multi_threaded_runtime_spawns() {
        let exec = ConnExec::new();
        assert!(exec.local.is_none());
        let (tx, rx) = tokio::sync::oneshot::channel();
        exec.execute(async move {
            let _ = tx.send(7);
        });
        // Nothing drives it but the runtime.
        assert_eq!(rx.await.expect("spawned future ran"), 7);
    }
}
