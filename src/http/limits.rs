//! The limits of an app-facing HTTP server and the counters that say when one tripped.
//!
//! [`ServerLimits`] holds one direction's limits (from the `--max-*`, `--h2-*`, `--*-timeout`
//! flags, see `crate::cli`) and its in-flight request budget: beyond `--max-in-flight-requests`
//! a request is shed at once with 503 and `tern-proxy-error: overloaded` (gRPC UNAVAILABLE),
//! before it holds any memory upstream. [`IdleTimeoutBody`] ends a request body that stops
//! arriving for `--request-body-idle-timeout` with [`BodyIdleTimeout`] (the upstream sees an
//! aborted request, the client 408 or a reset).
//!
//! Metrics: `tern_limit_exceeded_total{direction, limit}` (one count each time a limit trips),
//! `tern_http_rejected_total{direction, reason}` (requests refused as ambiguous or malformed).
//! Errors: [`BodyIdleTimeout`] (classified by `rescue` as `body_timeout`, 408).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::BoxError;
use crate::config::ProxyConfig;
use crate::metrics::Direction;

/// Label values of `tern_limit_exceeded_total{limit}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Limit {
    /// `--max-connections`: a connection accepted and closed at once.
    connections,
    /// `--max-request-head-bytes` (431) or a head over the header count (`--max-request-headers`).
    head_size,
    /// `--max-request-headers`: more header lines than allowed (431).
    header_count,
    /// `--max-uri-length` (414).
    uri_length,
    /// `--header-read-timeout`: a request head that did not arrive in time (slowloris).
    header_read_timeout,
    /// `--max-in-flight-requests`: a request shed with 503 `overloaded`.
    in_flight,
    /// `--request-body-idle-timeout`: a request body that stopped arriving.
    body_idle_timeout,
    /// `--http-idle-timeout`: an HTTP/2 connection without streams closed with GOAWAY.
    idle_timeout,
    /// HTTP/2 `GOAWAY(ENHANCE_YOUR_CALM)` or another protocol-level refusal of a flooding peer
    /// (rapid reset, too many local error resets, CONTINUATION flood).
    h2_flood,
    /// `--h2-keep-alive-timeout`: a peer that stopped answering PINGs.
    h2_keep_alive,
    /// An HTTP/2 client that cancelled too many forwarded requests (slow rapid reset): the
    /// connection is closed with GOAWAY.
    premature_resets,
    /// `accept` failed (out of file descriptors, `ulimit -n`): the listener backs off.
    accept_errors,
}

/// Label values of `tern_http_rejected_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Rejected {
    /// Both `Content-Length` and `Transfer-Encoding` (request smuggling): 400, connection closed.
    ambiguous_framing,
    /// HTTP/1.1 without `Host`: 400.
    missing_host,
    /// More than one `Host`: 400.
    duplicate_host,
    /// An absolute-form target (or HTTP/2 `:authority`) that disagrees with `Host`: 400.
    host_mismatch,
    /// `Upgrade: h2c`: the upgrade is dropped and the request served as HTTP/1.1.
    h2c_upgrade,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LimitLabels {
    direction: Direction,
    limit: Limit,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RejectedLabels {
    direction: Direction,
    reason: Rejected,
}

/// `tern_limit_exceeded_total` and `tern_http_rejected_total`.
#[derive(Debug, Clone, Default)]
pub struct LimitMetrics {
    exceeded: Family<LimitLabels, Counter>,
    rejected: Family<RejectedLabels, Counter>,
}

impl LimitMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = LimitMetrics::default();
        registry.register(
            "limit_exceeded",
            "Times a resource limit tripped (connection, request or protocol level)",
            m.exceeded.clone(),
        );
        registry.register(
            "http_rejected",
            "HTTP requests refused or rewritten as ambiguous or malformed",
            m.rejected.clone(),
        );
        m
    }

    pub fn exceeded(&self, direction: Direction, limit: Limit) {
        self.exceeded
            .get_or_create(&LimitLabels { direction, limit })
            .inc();
    }

    pub fn rejected(&self, direction: Direction, reason: Rejected) {
        self.rejected
            .get_or_create(&RejectedLabels { direction, reason })
            .inc();
    }

    /// The current count for `(direction, limit)` (tests, `tern demo`).
    pub fn exceeded_count(&self, direction: Direction, limit: Limit) -> u64 {
        self.exceeded
            .get_or_create(&LimitLabels { direction, limit })
            .get()
    }
}

/// One direction's HTTP server limits, shared by all its connections.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    pub direction: Direction,
    pub max_head_bytes: usize,
    pub max_headers: usize,
    pub max_uri_length: usize,
    pub header_read_timeout: Duration,
    pub h2_max_concurrent_streams: u32,
    pub h2_max_header_list_size: u32,
    pub h2_keep_alive_interval: Duration,
    pub h2_keep_alive_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_idle_timeout: Duration,
    pub max_in_flight: usize,
    /// `--http1-header-case`: whether HTTP/1 heads keep their header names' case.
    pub header_case: crate::http::HeaderCase,
    in_flight: Arc<Semaphore>,
    pub metrics: LimitMetrics,
    /// Set when the proxy drains: HTTP connections finish their requests and close.
    shutdown: Arc<tokio::sync::watch::Sender<bool>>,
}

impl ServerLimits {
    pub fn new(config: &ProxyConfig, direction: Direction, metrics: LimitMetrics) -> Self {
        ServerLimits {
            direction,
            max_head_bytes: config.max_request_head_bytes,
            max_headers: config.max_request_headers,
            max_uri_length: config.max_uri_length,
            header_read_timeout: config.header_read_timeout,
            h2_max_concurrent_streams: config.h2_max_concurrent_streams,
            h2_max_header_list_size: config.h2_max_header_list_size,
            h2_keep_alive_interval: config.h2_keep_alive_interval,
            h2_keep_alive_timeout: config.h2_keep_alive_timeout,
            idle_timeout: config.http_idle_timeout,
            body_idle_timeout: config.request_body_idle_timeout,
            max_in_flight: config.max_in_flight_requests,
            header_case: config.http1_header_case,
            in_flight: Arc::new(Semaphore::new(config.max_in_flight_requests)),
            metrics,
            shutdown: Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }

    /// Starts the graceful shutdown of every HTTP connection of this direction: HTTP/1 closes
    /// after the request in progress (`Connection: close`), HTTP/2 sends GOAWAY and finishes
    /// its open streams.
    pub fn shut_down(&self) {
        self.shutdown.send_replace(true);
    }

    /// Resolves once [`ServerLimits::shut_down`] was called.
    pub async fn shutting_down(&self) {
        let mut rx = self.shutdown.subscribe();
        let _ = rx.wait_for(|down| *down).await;
    }

    /// A slot for one in-flight request, or `None` (counted) when the direction is saturated.
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        match self.in_flight.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                self.metrics.exceeded(self.direction, Limit::in_flight);
                None
            }
        }
    }

    pub fn exceeded(&self, limit: Limit) {
        self.metrics.exceeded(self.direction, limit);
    }

    pub fn rejected(&self, reason: Rejected) {
        self.metrics.rejected(self.direction, reason);
    }
}

/// A request body that stopped arriving for longer than `--request-body-idle-timeout`.
#[derive(Debug, thiserror::Error)]
#[error("request body idle for more than {0:?}")]
pub struct BodyIdleTimeout(pub Duration);

/// A body that fails with [`BodyIdleTimeout`] when no frame arrives for `timeout`, calling
/// `on_timeout` then (held inline: no allocation per request).
pub struct IdleTimeoutBody<B, F> {
    inner: B,
    timeout: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    on_timeout: Option<F>,
}

impl<B, F: FnOnce() + Send + Unpin> IdleTimeoutBody<B, F> {
    pub fn new(inner: B, timeout: Duration, on_timeout: F) -> Self {
        IdleTimeoutBody {
            inner,
            timeout,
            sleep: None,
            on_timeout: Some(on_timeout),
        }
    }
}

impl<B, F> Body for IdleTimeoutBody<B, F>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    F: FnOnce() + Send + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(f) => {
                this.sleep = None;
                Poll::Ready(f.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => {
                let timeout = this.timeout;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        if let Some(f) = this.on_timeout.take() {
                            f();
                        }
                        Poll::Ready(Some(Err(Box::new(BodyIdleTimeout(timeout)))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// One data frame, then nothing ever again (a client that stopped sending).
    struct Stalls(bool);

    impl Body for Stalls {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            if self.0 {
                return Poll::Pending;
            }
            self.0 = true;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"a")))))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_fails_after_the_idle_timeout() {
        let fired = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = fired.clone();
        let mut body = IdleTimeoutBody::new(Stalls(false), Duration::from_secs(5), move || {
            flag.store(true, std::sync::atomic::Ordering::SeqCst)
        });
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().expect("data"), "a");
        // Nothing more arrives: the paused clock jumps to the timeout.
        let err = body
            .frame()
            .await
            .expect("an error frame")
            .expect_err("timed out");
        assert!(err.downcast_ref::<BodyIdleTimeout>().is_some(), "{err}");
        assert!(fired.load(std::sync::atomic::Ordering::SeqCst));
    }
}
