//! `RetryLayer`: retries within a budget, for requests whose body can be replayed.
//!
//! Where it sits: under the timeout, above the balancer (timeout → **retry** → balance →
//! breaker → endpoint client). Each attempt carries the same [`Tried`] set, so the balancer
//! prefers an endpoint this request has not tried yet.
//!
//! What is retried:
//! - by default, only requests that provably never reached a server: connection refused or
//!   timed out while connecting (plain or mesh), HTTP/2 `REFUSED_STREAM`; up to
//!   `max(attempts, 2)` extra attempts;
//! - with the service's `retry: {on: [...], attempts: N}` (discovery file), also responses
//!   whose status matches (`5xx`, a code, or a gRPC code in a trailers-only response's
//!   headers), up to N extra attempts. The decision is made on the response head: a
//!   response that is passed on is never retried, so nothing retries once it streams.
//!
//! A route rule's retry policy (`crate::routes`) also retries an attempt that hit the rule's
//! `backendRequest` timeout ([`AttemptTimeout`]) as if it were a 504, and waits between
//! attempts: the rule's `backoff` doubled per attempt (capped at [`MAX_BACKOFF`] unless the
//! backoff itself is longer), stretched by a random 0–50% so retries do not synchronize.
//! The wait never falls below the configured backoff (the Gateway API's minimum).
//!
//! Bodies are replayed only when they can be buffered under [`REPLAY_CAP`] (64 KiB): a body
//! whose size hint promises at most that much (an empty body, or a `content-length` within
//! the cap) is read first; a body of unknown length (HTTP/1 chunked, HTTP/2 without
//! `content-length`, as gRPC clients send) is recorded by a [`Tee`] while the first attempt
//! sends it, and replayed only if that attempt read it to its end within the cap (a unary
//! gRPC call). Others (a stream still open when the answer came, large uploads) get one
//! attempt.
//!
//! The [`Budget`] bounds the extra load: each request deposits 0.2 tokens, a retry takes one;
//! a floor of 10 retries per second stays available (refilled continuously). A failing
//! service therefore sees at most 1.2 × the requests + 10/s, never a retry storm.
//!
//! Metrics: `tern_retries_total{dst_service, result}` (`retried`: an extra attempt was sent;
//! `succeeded`: a retried request ended in a non-failure; `budget_exhausted`: a retry was
//! wanted but the budget was empty). Errors: none of its own (the last attempt's outcome
//! passes through). Flag: none; per service in the discovery file, per route rule (`retry`).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tower::{Layer, Service, ServiceExt};

use super::balance::Tried;
use super::timeout::AttemptTimeout;
use crate::discover::{RetryOn, RetryPolicy};
use crate::error::{CloseReason, ConnError};
use crate::http::{BoxBody, BoxError};
use crate::mesh::client::MeshError;

/// Largest request body buffered for replay.
pub const REPLAY_CAP: usize = 64 * 1024;
/// Share of requests that may be retried.
pub const BUDGET_RATIO: f64 = 0.2;
/// Retries per second always allowed.
pub const BUDGET_FLOOR_PER_SEC: f64 = 10.0;
/// Bound on saved-up ratio tokens, so a quiet hour does not fund a storm.
const BUDGET_MAX_TOKENS: f64 = 100.0;
/// Extra attempts for requests that never reached a server, without a retry policy.
const NEVER_REACHED_ATTEMPTS: u32 = 2;
/// Longest wait between attempts (unless the configured backoff is longer).
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// The wait before extra attempt number `attempt` (0 for the first retry), given the
/// configured `base` and a uniform `u` in [0, 1): `min(base·2^attempt, max(base, 1 s))`,
/// stretched by `u·50%`.
pub fn backoff_delay(base: Duration, attempt: u32, u: f64) -> Duration {
    let grown = base.saturating_mul(1u32 << attempt.min(16));
    let capped = grown.min(MAX_BACKOFF.max(base));
    capped.mul_f64(1.0 + 0.5 * u.clamp(0.0, 1.0))
}

/// A number in [0, 1), different on each call (std's per-instance random hasher keys).
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let h = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// A token bucket bounding retries to a share of requests plus a floor per second. Tokens
/// are counted in thousandths, so 0.2 per request adds up exactly.
#[derive(Debug)]
pub struct Budget {
    state: Mutex<BudgetState>,
}

#[derive(Debug)]
struct BudgetState {
    /// Earned by requests, in thousandths of a retry.
    tokens: u64,
    /// The per-second floor, in thousandths, refilled continuously.
    floor: u64,
    last: Instant,
}

const MILLI: u64 = 1000;

impl Default for Budget {
    fn default() -> Self {
        Budget {
            state: Mutex::new(BudgetState {
                tokens: 0,
                floor: floor_max(),
                last: Instant::now(),
            }),
        }
    }
}

fn floor_max() -> u64 {
    (BUDGET_FLOOR_PER_SEC * MILLI as f64) as u64
}

impl Budget {
    /// A request arrived: it earns [`BUDGET_RATIO`] of a retry.
    pub fn deposit(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let max = (BUDGET_MAX_TOKENS * MILLI as f64) as u64;
        s.tokens = (s.tokens + (BUDGET_RATIO * MILLI as f64) as u64).min(max);
    }

    /// Takes one retry from the budget, if there is one.
    pub fn withdraw(&self, now: Instant) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(s.last);
        s.last = now.max(s.last);
        let refill = (elapsed.as_secs_f64() * BUDGET_FLOOR_PER_SEC * MILLI as f64) as u64;
        s.floor = (s.floor + refill).min(floor_max());
        if s.tokens >= MILLI {
            s.tokens -= MILLI;
            true
        } else if s.floor >= MILLI {
            s.floor -= MILLI;
            true
        } else {
            false
        }
    }
}

/// A buffered body, the body handed back because it may not fit, or the client's body error.
pub type Buffered = Result<Result<ReplayBody, BoxBody>, BoxError>;

/// A request body held in memory so it can be sent again; cloning is cheap.
#[derive(Debug, Clone, Default)]
pub struct ReplayBody {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl ReplayBody {
    /// Buffers `body` when its size hint promises at most `cap` bytes; otherwise hands it back.
    /// (A boxed future from a plain function: see [`send_once`].)
    pub fn buffer(body: BoxBody, cap: usize) -> Pin<Box<dyn Future<Output = Buffered> + Send>> {
        Box::pin(async move {
            let fits =
                body.is_end_stream() || body.size_hint().upper().is_some_and(|u| u <= cap as u64);
            if !fits {
                return Ok(Err(body));
            }
            let mut body = body;
            let mut data = bytes::BytesMut::new();
            let mut trailers = None;
            while let Some(frame) = body.frame().await {
                let frame = match frame {
                    Ok(f) => f,
                    Err(e) => return Err(e),
                };
                match frame.into_data() {
                    Ok(d) => data.extend_from_slice(&d),
                    Err(f) => trailers = f.into_trailers().ok(),
                }
                if data.len() > cap {
                    return Err("request body larger than its size hint promised".into());
                }
            }
            Ok(Ok(ReplayBody {
                data: (!data.is_empty()).then(|| data.freeze()),
                trailers,
            }))
        })
    }
}

/// A body of unknown length sent on the first attempt while a copy is kept, up to a cap.
/// When the attempt read it to its end within the cap (a unary gRPC call: the server answers
/// after the whole request), [`Tee::replay`] gives it back for the next attempts; a stream
/// still open when the answer came, or a larger one, cannot be retried.
#[derive(Debug, Clone)]
pub struct Tee(Arc<Mutex<TeeState>>);

#[derive(Debug, Default)]
struct TeeState {
    data: bytes::BytesMut,
    trailers: Option<HeaderMap>,
    complete: bool,
    overflowed: bool,
}

impl Tee {
    /// Wraps `body` for the first attempt; the returned handle sees what it read.
    pub fn new(body: BoxBody, cap: usize) -> (Tee, BoxBody) {
        let tee = Tee(Arc::default());
        let recording = TeeBody {
            inner: body,
            tee: tee.clone(),
            cap,
        };
        (tee, crate::http::boxed(recording))
    }

    /// The whole body, when the first attempt read all of it within the cap.
    pub fn replay(&self) -> Option<ReplayBody> {
        let s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        (s.complete && !s.overflowed).then(|| ReplayBody {
            data: (!s.data.is_empty()).then(|| s.data.clone().freeze()),
            trailers: s.trailers.clone(),
        })
    }
}

struct TeeBody {
    inner: BoxBody,
    tee: Tee,
    cap: usize,
}

impl Body for TeeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let mut s = self.tee.0.lock().unwrap_or_else(|p| p.into_inner());
        match &polled {
            Poll::Ready(None) => s.complete = true,
            Poll::Ready(Some(Ok(frame))) if !s.overflowed => {
                if let Some(d) = frame.data_ref() {
                    if s.data.len() + d.len() > self.cap {
                        s.overflowed = true;
                        s.data = bytes::BytesMut::new();
                    } else {
                        s.data.extend_from_slice(d);
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    s.trailers = Some(t.clone());
                }
            }
            _ => {}
        }
        // Senders may stop polling once the body says it ended (hyper sends END_STREAM with
        // the last data frame), so the end is recorded here too.
        if self.inner.is_end_stream() {
            s.complete = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            self.tee
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .complete = true;
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RetryResult {
    retried,
    succeeded,
    budget_exhausted,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RetryLabels {
    dst_service: String,
    result: RetryResult,
}

/// Retry counters.
#[derive(Debug, Clone, Default)]
pub struct RetryMetrics {
    retries: Family<RetryLabels, Counter>,
}

impl RetryMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = RetryMetrics::default();
        registry.register(
            "retries",
            "Retries: retried (extra attempt sent), succeeded, budget_exhausted",
            m.retries.clone(),
        );
        m
    }

    fn inc(&self, service: &str, result: RetryResult) {
        self.retries
            .get_or_create(&RetryLabels {
                dst_service: service.to_owned(),
                result,
            })
            .inc();
    }
}

/// Retries requests of one service.
#[derive(Debug, Clone)]
pub struct RetryLayer {
    service: Arc<str>,
    policy: Option<Arc<RetryPolicy>>,
    budget: Arc<Budget>,
    metrics: RetryMetrics,
    /// A route rule's backoff; `None`: retries go out at once (discovery-file policies).
    backoff: Option<Duration>,
}

impl RetryLayer {
    pub fn new(
        service: Arc<str>,
        policy: Option<RetryPolicy>,
        budget: Arc<Budget>,
        metrics: RetryMetrics,
    ) -> Self {
        RetryLayer {
            service,
            policy: policy.map(Arc::new),
            budget,
            metrics,
            backoff: None,
        }
    }

    /// Waits between attempts (a route rule's `retry.backoff`).
    pub fn with_backoff(mut self, backoff: Option<Duration>) -> Self {
        self.backoff = backoff.filter(|b| !b.is_zero());
        self
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`RetryLayer`] produces.
#[derive(Debug, Clone)]
pub struct Retry<S> {
    inner: S,
    layer: RetryLayer,
}

impl<S> Service<Request<BoxBody>> for Retry<S>
where
    S: Service<Request<BoxBody>, Response = Response<BoxBody>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<BoxBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<BoxBody>) -> Self::Future {
        // Each attempt drives its own clone of the inner service to readiness.
        let svc = self.inner.clone();
        let layer = self.layer.clone();
        layer.budget.deposit();
        Box::pin(layer.run(svc, req))
    }
}

impl RetryLayer {
    async fn run<S>(self, svc: S, req: Request<BoxBody>) -> Result<Response<BoxBody>, BoxError>
    where
        S: Service<Request<BoxBody>, Response = Response<BoxBody>, Error = BoxError>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let (parts, body) = req.into_parts();
        // The first attempt's body; `replay` holds what later attempts send.
        let (mut first, mut replay, tee) = match ReplayBody::buffer(body, REPLAY_CAP).await {
            Err(e) => return Err(e),
            Ok(Ok(b)) => (None, Some(b), None),
            // Unknown length: recorded while the first attempt sends it.
            Ok(Err(body)) if body.size_hint().upper().is_none() => {
                let (tee, body) = Tee::new(body, REPLAY_CAP);
                (Some(body), None, Some(tee))
            }
            Ok(Err(large)) => {
                return send_once(&svc, Request::from_parts(parts, large)).await;
            }
        };
        let tried = Tried::default();
        let mut attempt = 0u32;
        loop {
            let body = match (first.take(), &replay) {
                (Some(b), _) => b,
                (None, Some(r)) => crate::http::boxed(r.clone()),
                (None, None) => return Err("retry without a replayable body".into()),
            };
            let mut req = Request::new(body);
            *req.method_mut() = parts.method.clone();
            *req.uri_mut() = parts.uri.clone();
            *req.version_mut() = parts.version;
            *req.headers_mut() = parts.headers.clone();
            req.extensions_mut().insert(tried.clone());
            let result = send_once(&svc, req).await;
            let limit = match &result {
                Err(e) if never_reached(&**e) => {
                    Some(self.policy.as_ref().map_or(NEVER_REACHED_ATTEMPTS, |p| {
                        p.attempts.max(NEVER_REACHED_ATTEMPTS)
                    }))
                }
                Ok(resp) => self
                    .policy
                    .as_ref()
                    .filter(|p| matches(p, resp))
                    .map(|p| p.attempts),
                // A route's per-attempt timeout: retried as a 504 would be.
                Err(e) if e.downcast_ref::<AttemptTimeout>().is_some() => self
                    .policy
                    .as_ref()
                    .filter(|p| matches_status(p, 504, None))
                    .map(|p| p.attempts),
                Err(_) => None,
            };
            if attempt == 0 {
                if let Some(t) = &tee {
                    replay = t.replay();
                }
            }
            // A body that cannot be sent again ends it (a stream still open, or too large).
            let retry = limit.is_some_and(|l| attempt < l) && replay.is_some();
            if retry && !self.budget.withdraw(Instant::now()) {
                self.metrics
                    .inc(&self.service, RetryResult::budget_exhausted);
                return result;
            }
            if !retry {
                if attempt > 0 && result.as_ref().is_ok_and(|r| !r.status().is_server_error()) {
                    self.metrics.inc(&self.service, RetryResult::succeeded);
                }
                return result;
            }
            tracing::debug!(dst_service = &*self.service, attempt, "retrying");
            self.metrics.inc(&self.service, RetryResult::retried);
            if let Some(base) = self.backoff {
                tokio::time::sleep(backoff_delay(base, attempt, jitter())).await;
            }
            attempt += 1;
        }
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<BoxBody>, BoxError>> + Send>>;

/// One attempt on a clone of the inner service (driven to readiness first). A plain function
/// returning a boxed future, so the async caller holds no generic future (rustc otherwise
/// fails to prove `Send` for every lifetime of the boxed error inside `BoxBody`).
fn send_once<S>(svc: &S, req: Request<BoxBody>) -> BoxFuture
where
    S: Service<Request<BoxBody>, Response = Response<BoxBody>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    Box::pin(svc.clone().oneshot(req))
}

/// Whether the response matches the policy's conditions.
fn matches<B>(policy: &RetryPolicy, resp: &Response<B>) -> bool {
    let status = resp.status().as_u16();
    let grpc = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok());
    matches_status(policy, status, grpc)
}

fn matches_status(policy: &RetryPolicy, status: u16, grpc: Option<u32>) -> bool {
    policy.on.iter().any(|on| match on {
        RetryOn::Server5xx => (500..600).contains(&status),
        RetryOn::Status(s) => *s == status,
        RetryOn::Grpc(c) => grpc == Some(*c),
    })
}

/// Whether the error proves the request never reached a server.
pub fn never_reached(err: &(dyn std::error::Error + 'static)) -> bool {
    let not_sent =
        |r: CloseReason| matches!(r, CloseReason::ConnectRefused | CloseReason::ConnectTimeout);
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(c) = e.downcast_ref::<ConnError>() {
            return not_sent(c.reason());
        }
        if let Some(m) = e.downcast_ref::<MeshError>() {
            if matches!(m, MeshError::Refused { status, .. } if *status == http::StatusCode::FORBIDDEN)
            {
                return false;
            }
            if not_sent(m.reason()) {
                return true;
            }
        }
        if let Some(h) = e.downcast_ref::<h2::Error>() {
            return h.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        cur = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::OrigDstAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn refused() -> BoxError {
        Box::new(ConnError::ConnectRefused(OrigDstAddr(
            "127.0.0.1:1".parse().expect("addr"),
        )))
    }

    /// An upstream counting calls; answers with `status` from the closure per call index.
    fn upstream(
        calls: Arc<AtomicUsize>,
        answer: impl Fn(usize) -> Result<u16, ()> + Clone + Send + Sync + 'static,
    ) -> impl Service<
        Request<BoxBody>,
        Response = Response<BoxBody>,
        Error = BoxError,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static {
        tower::service_fn(move |req: Request<BoxBody>| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            let answer = answer.clone();
            async move {
                let body = req.into_body().collect().await?.to_bytes();
                assert_eq!(&body[..], b"payload", "the body is replayed intact");
                match answer(n) {
                    Ok(s) => {
                        let mut r = Response::new(crate::http::empty());
                        *r.status_mut() = s.try_into().expect("status");
                        Ok(r)
                    }
                    Err(()) => Err(refused()),
                }
            }
        })
    }

    fn req() -> Request<BoxBody> {
        Request::post("/x")
            .body(crate::http::boxed(http_body_util::Full::new(
                Bytes::from_static(b"payload"),
            )))
            .expect("request")
    }

    fn layer(policy: Option<RetryPolicy>) -> (RetryLayer, RetryMetrics) {
        let m = RetryMetrics::default();
        (
            RetryLayer::new("s".into(), policy, Arc::new(Budget::default()), m.clone()),
            m,
        )
    }

    fn count(m: &RetryMetrics, result: RetryResult) -> u64 {
        m.retries
            .get_or_create(&RetryLabels {
                dst_service: "s".into(),
                result,
            })
            .get()
    }

    #[tokio::test]
    async fn refused_connections_are_retried_by_default_but_5xx_is_not() {
        let calls = Arc::new(AtomicUsize::new(0));
        let (l, m) = layer(None);
        let svc = l.layer(upstream(calls.clone(), |n| {
            if n == 0 { Err(()) } else { Ok(200) }
        }));
        let resp = svc.clone().oneshot(req()).await.expect("retried");
        assert_eq!(resp.status(), 200);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(count(&m, RetryResult::retried), 1);
        assert_eq!(count(&m, RetryResult::succeeded), 1);

        let calls = Arc::new(AtomicUsize::new(0));
        let svc = l.layer(upstream(calls.clone(), |_| Ok(503)));
        let resp = svc.oneshot(req()).await.expect("response");
        assert_eq!(resp.status(), 503);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "no policy: a 503 is not retried"
        );
    }

    #[tokio::test]
    async fn configured_statuses_are_retried_up_to_attempts() {
        let calls = Arc::new(AtomicUsize::new(0));
        let policy = RetryPolicy {
            on: vec![RetryOn::Server5xx],
            attempts: 2,
        };
        let (l, _) = layer(Some(policy));
        let svc = l.layer(upstream(calls.clone(), |_| Ok(503)));
        let resp = svc.oneshot(req()).await.expect("response");
        assert_eq!(resp.status(), 503);
        assert_eq!(calls.load(Ordering::SeqCst), 3, "first + 2 retries");
    }

    #[tokio::test]
    async fn large_or_unsized_bodies_are_not_retried() {
        let calls = Arc::new(AtomicUsize::new(0));
        let (l, _) = layer(None);
        let c = calls.clone();
        let svc = l.layer(tower::service_fn(move |_req: Request<BoxBody>| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Err::<Response<BoxBody>, _>(refused()) }
        }));
        let big = Bytes::from(vec![0u8; REPLAY_CAP + 1]);
        let req = Request::post("/x")
            .body(crate::http::boxed(http_body_util::Full::new(big)))
            .expect("request");
        svc.oneshot(req).await.expect_err("refused");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    /// A body of unknown length: `ready` frames already there, then (when `more`) a frame
    /// that arrives only after the first attempt was sent.
    fn unsized_body(
        ready: &[&'static [u8]],
        more: Option<tokio::sync::oneshot::Receiver<()>>,
    ) -> BoxBody {
        use futures_util::StreamExt;
        let head: Vec<Result<Frame<Bytes>, BoxError>> = ready
            .iter()
            .map(|b| Ok(Frame::data(Bytes::from_static(b))))
            .collect();
        let tail = futures_util::stream::iter(more).then(|rx| async move {
            let _ = rx.await;
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"-late")))
        });
        crate::http::boxed(http_body_util::StreamBody::new(
            futures_util::stream::iter(head).chain(tail),
        ))
    }

    #[tokio::test]
    async fn unsized_bodies_read_to_the_end_are_replayed_open_streams_are_not() {
        // Like a unary gRPC call without content-length: the first attempt reads it all.
        let body = unsized_body(&[b"pay", b"load"], None);
        assert_eq!(body.size_hint().upper(), None);
        let calls = Arc::new(AtomicUsize::new(0));
        let policy = RetryPolicy {
            on: vec![RetryOn::Server5xx],
            attempts: 2,
        };
        let (l, m) = layer(Some(policy.clone()));
        let svc = l.layer(upstream(calls.clone(), |n| {
            Ok(if n == 0 { 503 } else { 200 })
        }));
        let req = Request::post("/x").body(body).expect("request");
        assert_eq!(svc.oneshot(req).await.expect("retried").status(), 200);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "replayed intact (checked upstream)"
        );
        assert_eq!(count(&m, RetryResult::retried), 1);

        // A stream still open when the answer comes: one attempt.
        let (_tx, rx) = tokio::sync::oneshot::channel();
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let (l, _) = layer(Some(policy));
        let svc = l.layer(tower::service_fn(move |_req: Request<BoxBody>| {
            c.fetch_add(1, Ordering::SeqCst);
            async {
                let mut r = Response::new(crate::http::empty());
                *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                Ok::<_, BoxError>(r)
            }
        }));
        let req = Request::post("/x")
            .body(unsized_body(&[b"early"], Some(rx)))
            .expect("request");
        assert_eq!(svc.oneshot(req).await.expect("answer").status(), 503);
        assert_eq!(calls.load(Ordering::SeqCst), 1, "not replayable");

        // Larger than the cap: recorded no further, never replayed.
        let big: &'static [u8] = Box::leak(vec![7u8; REPLAY_CAP + 1].into_boxed_slice());
        let (tee, body) = Tee::new(unsized_body(&[big], None), REPLAY_CAP);
        let all = body.collect().await.expect("body").to_bytes();
        assert_eq!(
            all.len(),
            REPLAY_CAP + 1,
            "the first attempt gets every byte"
        );
        assert!(tee.replay().is_none());
    }

    #[test]
    fn the_budget_allows_a_fifth_of_requests_plus_the_floor() {
        let b = Budget::default();
        let now = Instant::now();
        for _ in 0..100 {
            b.deposit();
        }
        let mut allowed = 0;
        while b.withdraw(now) {
            allowed += 1;
            assert!(allowed < 1000, "bounded");
        }
        assert_eq!(allowed, 20 + 10, "20% of 100 + the floor of 10");
        assert!(!b.withdraw(now + Duration::from_millis(50)), "half a token");
        assert!(
            b.withdraw(now + Duration::from_millis(150)),
            "the floor refills at 10/s"
        );
    }

    #[test]
    fn backoff_doubles_within_bounds_with_jitter_and_never_below_the_base() {
        let base = Duration::from_millis(25);
        for attempt in 0..8 {
            let floor = (base * (1 << attempt)).min(MAX_BACKOFF);
            for u in [0.0, 0.25, 0.5, 0.999_999] {
                let d = backoff_delay(base, attempt, u);
                assert!(d >= floor, "attempt {attempt} u {u}: {d:?} < {floor:?}");
                assert!(d < floor.mul_f64(1.5), "attempt {attempt} u {u}: {d:?}");
                assert!(d >= base, "never below the configured backoff");
            }
        }
        assert_eq!(backoff_delay(base, 0, 0.0), base);
        assert_eq!(backoff_delay(base, 2, 0.0), base * 4);
        assert_eq!(backoff_delay(base, 30, 0.0), MAX_BACKOFF, "capped");
        let long = Duration::from_secs(3);
        assert_eq!(
            backoff_delay(long, 5, 0.0),
            long,
            "a longer base is its own cap"
        );
        for _ in 0..100 {
            let u = jitter();
            assert!((0.0..1.0).contains(&u), "{u}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn attempt_timeouts_are_retried_as_504_with_backoff() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let policy = RetryPolicy {
            on: vec![RetryOn::Status(504)],
            attempts: 2,
        };
        let (l, m) = layer(Some(policy));
        let l = l.with_backoff(Some(Duration::from_millis(100)));
        let svc = l.layer(tower::service_fn(move |_req: Request<BoxBody>| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 2 {
                    return Err::<Response<BoxBody>, BoxError>(
                        AttemptTimeout(Duration::from_millis(50)).into(),
                    );
                }
                Ok(Response::new(crate::http::empty()))
            }
        }));
        let started = tokio::time::Instant::now();
        let resp = svc.oneshot(req()).await.expect("third attempt answers");
        assert_eq!(resp.status(), 200);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(count(&m, RetryResult::retried), 2);
        // Waited 100 ms then 200 ms at least (paused clock: exact sums of the sleeps).
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(started.elapsed() < Duration::from_millis(450));
        // Without 504 (or 5xx) in the policy an attempt timeout is final.
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let (l, _) = layer(Some(RetryPolicy {
            on: vec![RetryOn::Status(503)],
            attempts: 2,
        }));
        let svc = l.layer(tower::service_fn(move |_req: Request<BoxBody>| {
            c.fetch_add(1, Ordering::SeqCst);
            async {
                Err::<Response<BoxBody>, BoxError>(AttemptTimeout(Duration::from_millis(50)).into())
            }
        }));
        svc.oneshot(req()).await.expect_err("timed out");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn refused_stream_and_refused_connect_never_reached_a_server() {
        assert!(never_reached(&*refused()));
        let h2: BoxError = Box::new(h2::Error::from(h2::Reason::REFUSED_STREAM));
        assert!(never_reached(&*h2));
        let reset: BoxError = Box::new(h2::Error::from(h2::Reason::CANCEL));
        assert!(!never_reached(&*reset));
        let io: BoxError = Box::new(std::io::Error::other("reset"));
        assert!(!never_reached(&*io));
    }
}
