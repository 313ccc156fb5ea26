//! `BreakerLayer`: per-endpoint circuit breaking by consecutive failures.
//!
//! Where it sits: under the balancer ([`super::balance`]), around the endpoint client. The
//! balancer puts the chosen endpoint into the request ([`Picked`]); this layer records the
//! outcome in that endpoint's [`Breaker`]: an error, a 5xx, or a trailers-only gRPC
//! UNAVAILABLE is a failure, anything else a success. After [`FAILURES_TO_EJECT`] consecutive
//! failures the endpoint is ejected: the balancer skips it until a backoff (1 s, doubling to
//! 30 s, ±10% jitter) has passed, then lets exactly one request through as a probe, whose
//! outcome closes the circuit or ejects it again for twice as long. A probe that is cancelled
//! puts the endpoint back to ejected with the same backoff.
//!
//! When every endpoint of a service is ejected the balancer fails the request with
//! [`super::balance::CircuitOpen`] (503 / gRPC UNAVAILABLE, `circuit_open`).
//!
//! Metrics: `tern_circuit_transitions_total{dst_service, endpoint, state}` (state the endpoint
//! moved to: `closed`, `open`, `probing`); endpoints of services in discovery only, so the
//! cardinality is bounded by the discovery file. No flag configures it.

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tower::{Layer, Service};

use super::balance::{EndpointState, Picked};
use crate::http::BoxError;

/// Consecutive failures that eject an endpoint.
pub const FAILURES_TO_EJECT: u32 = 5;
/// First ejection time; doubled after each failed probe.
pub const MIN_BACKOFF: Duration = Duration::from_secs(1);
/// Longest ejection time.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A circuit's state, and the label value of its transitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum CircuitState {
    /// Traffic flows.
    closed,
    /// Ejected: skipped by the balancer until its backoff has passed.
    open,
    /// One probe request is in flight; nothing else is sent.
    probing,
}

/// One endpoint's failure accrual. Pure: the caller passes the time.
#[derive(Debug, Clone)]
pub struct Breaker {
    state: CircuitState,
    failures: u32,
    backoff: Duration,
    until: Instant,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            state: CircuitState::closed,
            failures: 0,
            backoff: MIN_BACKOFF,
            until: Instant::now(),
        }
    }
}

impl Breaker {
    pub fn state(&self) -> CircuitState {
        self.state
    }

    /// Whether the balancer may pick this endpoint now (closed, or ejected long enough that a
    /// probe is due).
    pub fn available(&self, now: Instant) -> bool {
        match self.state {
            CircuitState::closed => true,
            CircuitState::open => now >= self.until,
            CircuitState::probing => false,
        }
    }

    /// The balancer picked this endpoint: an ejected one becomes probing.
    pub fn on_pick(&mut self, now: Instant) -> Option<CircuitState> {
        (self.state == CircuitState::open && now >= self.until).then(|| {
            self.state = CircuitState::probing;
            CircuitState::probing
        })
    }

    /// Records a request's outcome; returns the new state when it changed.
    pub fn record(&mut self, success: bool, now: Instant) -> Option<CircuitState> {
        if success {
            self.failures = 0;
            if self.state == CircuitState::closed {
                return None;
            }
            self.state = CircuitState::closed;
            self.backoff = MIN_BACKOFF;
            return Some(CircuitState::closed);
        }
        match self.state {
            CircuitState::closed => {
                self.failures += 1;
                (self.failures >= FAILURES_TO_EJECT).then(|| self.eject(now, self.backoff))
            }
            CircuitState::probing => {
                let next = (self.backoff * 2).min(MAX_BACKOFF);
                Some(self.eject(now, next))
            }
            // A request sent before the ejection finished late: nothing new.
            CircuitState::open => None,
        }
    }

    /// A probe went away without an outcome: ejected again, same backoff.
    pub fn abandon(&mut self, now: Instant) -> Option<CircuitState> {
        (self.state == CircuitState::probing).then(|| self.eject(now, self.backoff))
    }

    fn eject(&mut self, now: Instant, backoff: Duration) -> CircuitState {
        self.state = CircuitState::open;
        self.failures = 0;
        self.backoff = backoff;
        self.until = now + backoff.mul_f64(0.9 + 0.2 * jitter());
        CircuitState::open
    }
}

/// A number in [0, 1), different on each call (std's per-instance random hasher keys).
fn jitter() -> f64 {
    let h = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (h >> 11) as f64 / (1u64 << 53) as f64
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TransitionLabels {
    dst_service: String,
    endpoint: String,
    state: CircuitState,
}

/// Circuit transitions.
#[derive(Debug, Clone, Default)]
pub struct BreakerMetrics {
    transitions: Family<TransitionLabels, Counter>,
}

impl BreakerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = BreakerMetrics::default();
        registry.register(
            "circuit_transitions",
            "Circuit breaker state changes per endpoint (state: the state moved to)",
            m.transitions.clone(),
        );
        m
    }

    pub fn transition(&self, service: &str, endpoint: SocketAddr, state: CircuitState) {
        tracing::info!(dst_service = service, %endpoint, ?state, "circuit breaker");
        self.transitions
            .get_or_create(&TransitionLabels {
                dst_service: service.to_owned(),
                endpoint: endpoint.to_string(),
                state,
            })
            .inc();
    }
}

/// Records outcomes into the picked endpoint's breaker.
#[derive(Debug, Clone)]
pub struct BreakerLayer {
    service: Arc<str>,
    metrics: BreakerMetrics,
}

impl BreakerLayer {
    pub fn new(service: Arc<str>, metrics: BreakerMetrics) -> Self {
        BreakerLayer { service, metrics }
    }
}

impl<S> Layer<S> for BreakerLayer {
    type Service = CircuitBreak<S>;

    fn layer(&self, inner: S) -> CircuitBreak<S> {
        CircuitBreak {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`BreakerLayer`] produces.
#[derive(Debug, Clone)]
pub struct CircuitBreak<S> {
    inner: S,
    layer: BreakerLayer,
}

impl<S, B, RB> Service<Request<B>> for CircuitBreak<S>
where
    S: Service<Request<B>, Response = Response<RB>, Error = BoxError>,
    S::Future: Send + 'static,
    RB: Send + 'static,
{
    type Response = Response<RB>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<RB>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let outcome = req.extensions().get::<Picked>().map(|p| Outcome {
            endpoint: p.0.clone(),
            layer: self.layer.clone(),
            recorded: false,
        });
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            if let Some(mut o) = outcome {
                o.record(match &result {
                    Ok(resp) => !is_failure(resp),
                    Err(_) => false,
                });
            }
            result
        })
    }
}

/// Whether a response counts against its endpoint: 5xx, or gRPC UNAVAILABLE in the headers.
pub fn is_failure<B>(resp: &Response<B>) -> bool {
    resp.status().is_server_error() || resp.headers().get("grpc-status").is_some_and(|v| v == "14")
}

/// Records exactly once; dropped unrecorded (cancelled) it abandons a probe.
struct Outcome {
    endpoint: Arc<EndpointState>,
    layer: BreakerLayer,
    recorded: bool,
}

impl Outcome {
    fn record(&mut self, success: bool) {
        self.recorded = true;
        let changed = self.endpoint.breaker().record(success, Instant::now());
        if let Some(state) = changed {
            let addr = self.endpoint.endpoint.addr;
            self.layer
                .metrics
                .transition(&self.layer.service, addr, state);
        }
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if !self.recorded {
            let changed = self.endpoint.breaker().abandon(Instant::now());
            if let Some(state) = changed {
                let addr = self.endpoint.endpoint.addr;
                self.layer
                    .metrics
                    .transition(&self.layer.service, addr, state);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discover::Endpoint;
    use tower::ServiceExt;

    #[test]
    fn five_failures_eject_and_one_probe_decides() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        for _ in 0..FAILURES_TO_EJECT - 1 {
            assert_eq!(b.record(false, t0), None);
        }
        assert_eq!(b.record(true, t0), None, "a success resets the count");
        for _ in 0..FAILURES_TO_EJECT - 1 {
            assert_eq!(b.record(false, t0), None);
        }
        assert_eq!(b.record(false, t0), Some(CircuitState::open));
        assert!(!b.available(t0));
        assert!(
            !b.available(t0 + Duration::from_millis(800)),
            "backoff ≥ 0.9 s"
        );
        let t1 = t0 + Duration::from_millis(1200);
        assert!(b.available(t1), "backoff ≤ 1.1 s");
        assert_eq!(b.on_pick(t1), Some(CircuitState::probing));
        assert!(!b.available(t1), "one probe at a time");
        // The probe fails: ejected for twice as long.
        assert_eq!(b.record(false, t1), Some(CircuitState::open));
        assert!(!b.available(t1 + Duration::from_millis(1700)));
        let t2 = t1 + Duration::from_millis(2300);
        assert!(b.available(t2));
        b.on_pick(t2);
        assert_eq!(b.record(true, t2), Some(CircuitState::closed));
        assert!(b.available(t2));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_abandoned_probes_reeject() {
        let mut now = Instant::now();
        let mut b = Breaker::default();
        for _ in 0..FAILURES_TO_EJECT {
            b.record(false, now);
        }
        for _ in 0..10 {
            now += MAX_BACKOFF * 2;
            b.on_pick(now);
            b.record(false, now);
        }
        assert_eq!(b.backoff, MAX_BACKOFF);
        now += MAX_BACKOFF * 2;
        assert_eq!(b.on_pick(now), Some(CircuitState::probing));
        assert_eq!(b.abandon(now), Some(CircuitState::open));
        assert!(!b.available(now));
    }

    #[tokio::test]
    async fn the_layer_records_failures_of_the_picked_endpoint() {
        let ep = EndpointState::new(Endpoint {
            addr: "127.0.0.1:1".parse().expect("addr"),
            identity: None,
            weight: 1,
            mesh_port: 4143,
        });
        let metrics = BreakerMetrics::default();
        let svc = BreakerLayer::new("web.shop".into(), metrics.clone()).layer(tower::service_fn(
            |req: Request<()>| async move {
                let mut r = Response::new(());
                *r.status_mut() = if req.uri().path() == "/fail" {
                    503
                } else {
                    200
                }
                .try_into()
                .expect("status");
                Ok::<_, BoxError>(r)
            },
        ));
        let req = |path: &str| {
            let mut r = Request::get(path).body(()).expect("request");
            r.extensions_mut().insert(Picked(ep.clone()));
            r
        };
        for _ in 0..FAILURES_TO_EJECT {
            svc.clone().oneshot(req("/fail")).await.expect("response");
        }
        assert_eq!(ep.breaker().state(), CircuitState::open);
        let labels = TransitionLabels {
            dst_service: "web.shop".into(),
            endpoint: "127.0.0.1:1".into(),
            state: CircuitState::open,
        };
        assert_eq!(metrics.transitions.get_or_create(&labels).get(), 1);
        svc.clone().oneshot(req("/ok")).await.expect("response");
        assert_eq!(ep.breaker().state(), CircuitState::closed);
    }
}
