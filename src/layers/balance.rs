//! `BalanceLayer`: per-request endpoint choice for a discovery service, power of two choices
//! over peak-EWMA latency, weights respected, ejected endpoints skipped.
//!
//! Where it sits: under retry, above the circuit breaker (timeout → retry → **balance** →
//! breaker → endpoint client). It puts the chosen endpoint into the request as [`Picked`];
//! the endpoint client below sends there.
//!
//! Own implementation rather than tower's `balance::p2c` + `load::PeakEwma`: tower's
//! `Balance` owns one inner service per endpoint, fed by a `Discover` stream, and drives
//! readiness itself; here the endpoint is a value handed to one shared endpoint client (the
//! pooled plain and mesh clients), the set comes from a discovery snapshot, the choice must
//! skip endpoints the breaker ejected and prefer ones a retry has not tried ([`Tried`]), and
//! weights must count. That is a small function over `Vec<EndpointState>`; tower would need
//! a `Discover` adapter, per-endpoint services and a filter on top.
//!
//! The choice: two candidates drawn at random in proportion to their weights, the one with
//! the lower cost wins (drawn with replacement, so even the costliest endpoint gets about 1/n²
//! of the requests and its estimate stays fresh); cost = peak-EWMA RTT × (pending + 1). Weights count in the draw only
//! (counting them in the cost too would hand a heavier endpoint nearly every request). The RTT estimate takes
//! a higher sample at once (peak) and decays towards lower ones with a 10 s time constant; it
//! is measured to the response headers. The endpoint set is refreshed from discovery on each
//! request (a pointer comparison when unchanged): states of endpoints that stay are kept,
//! in-flight requests hold their endpoint's state and finish undisturbed.
//!
//! Errors: [`NoEndpoints`] (503 `no_endpoints`), [`CircuitOpen`] when every endpoint is
//! ejected (503 / gRPC UNAVAILABLE, `circuit_open`).
//! Metrics: `tern_balancer_endpoints{dst_service, state}` (`ready`, `probing`, `ejected`).
//! No flag configures it.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::Request;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tower::{Layer, Service};

use super::breaker::{Breaker, CircuitState};
use crate::discover::Endpoint;
use crate::http::BoxError;

/// RTT assumed for an endpoint that has not answered yet.
const DEFAULT_RTT: Duration = Duration::from_millis(5);
/// Time constant of the EWMA decay (tower's default).
const DECAY: Duration = Duration::from_secs(10);

/// The service has no endpoints.
#[derive(Debug, thiserror::Error)]
#[error("service {0} has no endpoints")]
pub struct NoEndpoints(pub Arc<str>);

/// Every endpoint of the service is ejected by its circuit breaker.
#[derive(Debug, thiserror::Error)]
#[error("every endpoint of service {0} is ejected (circuit open)")]
pub struct CircuitOpen(pub Arc<str>);

/// The endpoint a request was sent to (a request extension set by [`Balance`]).
#[derive(Debug, Clone)]
pub struct Picked(pub Arc<EndpointState>);

/// Endpoints a request already tried (a request extension shared by its attempts; the retry
/// layer creates it, [`Balance`] fills it and avoids what it holds when it can).
#[derive(Debug, Clone, Default)]
pub struct Tried(Arc<Mutex<Vec<SocketAddr>>>);

impl Tried {
    fn contains(&self, addr: SocketAddr) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&addr)
    }

    pub fn push(&self, addr: SocketAddr) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(addr);
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One endpoint's load and health, shared by every request to it.
#[derive(Debug)]
pub struct EndpointState {
    pub endpoint: Endpoint,
    pending: AtomicUsize,
    rtt: Mutex<PeakEwma>,
    breaker: Mutex<Breaker>,
}

#[derive(Debug, Clone, Copy)]
struct PeakEwma {
    rtt_ns: f64,
    stamp: Instant,
}

impl EndpointState {
    pub fn new(endpoint: Endpoint) -> Arc<Self> {
        Arc::new(EndpointState {
            endpoint,
            pending: AtomicUsize::new(0),
            rtt: Mutex::new(PeakEwma {
                rtt_ns: DEFAULT_RTT.as_nanos() as f64,
                stamp: Instant::now(),
            }),
            breaker: Mutex::new(Breaker::default()),
        })
    }

    pub fn breaker(&self) -> MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// RTT × (pending + 1); the RTT decays while the endpoint gets no answers (as tower's
    /// `PeakEwma`), so an endpoint that was slow once is tried again.
    fn cost(&self, now: Instant) -> f64 {
        let e = *self.rtt.lock().unwrap_or_else(|p| p.into_inner());
        let idle = now.saturating_duration_since(e.stamp).as_secs_f64();
        let rtt = e.rtt_ns * (-idle / DECAY.as_secs_f64()).exp();
        let pending = self.pending.load(Ordering::Relaxed) as f64;
        rtt * (pending + 1.0)
    }

    fn observe(&self, sample: Duration, now: Instant) {
        let mut e = self.rtt.lock().unwrap_or_else(|p| p.into_inner());
        let sample = sample.as_nanos() as f64;
        if sample > e.rtt_ns {
            e.rtt_ns = sample;
        } else {
            let elapsed = now.saturating_duration_since(e.stamp).as_secs_f64();
            let w = (-elapsed / DECAY.as_secs_f64()).exp();
            e.rtt_ns = e.rtt_ns * w + sample * (1.0 - w);
        }
        e.stamp = now;
    }
}

/// An open TCP connection to an endpoint (opaque TCP is balanced per connection): counted as
/// load (like a pending request) until dropped. Its latency sample is the connect time, fed
/// with [`OpenConnection::connected`]; a failed connect feeds a penalty instead
/// ([`OpenConnection::failed`]), since a refusal comes back fast and would otherwise make a dead
/// endpoint look like the fastest one.
#[derive(Debug)]
pub struct OpenConnection {
    endpoint: Arc<EndpointState>,
}

impl OpenConnection {
    pub fn new(endpoint: Arc<EndpointState>) -> Self {
        endpoint.pending.fetch_add(1, Ordering::Relaxed);
        OpenConnection { endpoint }
    }

    /// The connection is established after `latency`.
    pub fn connected(&self, latency: Duration) {
        self.endpoint.observe(latency, Instant::now());
    }

    /// Connecting failed: the endpoint's estimate jumps to `penalty` (the connect timeout).
    pub fn failed(&self, penalty: Duration) {
        self.endpoint.observe(penalty, Instant::now());
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.endpoint.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a request as pending on its endpoint until dropped, then feeds its latency.
struct InFlight {
    endpoint: Arc<EndpointState>,
    started: Instant,
}

impl InFlight {
    fn new(endpoint: Arc<EndpointState>) -> Self {
        endpoint.pending.fetch_add(1, Ordering::Relaxed);
        InFlight {
            endpoint,
            started: Instant::now(),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.pending.fetch_sub(1, Ordering::Relaxed);
        let now = Instant::now();
        self.endpoint.observe(now - self.started, now);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum EndpointStateLabel {
    ready,
    probing,
    ejected,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EndpointsLabels {
    dst_service: String,
    state: EndpointStateLabel,
}

/// Endpoints per service and state.
#[derive(Debug, Clone, Default)]
pub struct BalanceMetrics {
    endpoints: Family<EndpointsLabels, Gauge>,
}

impl BalanceMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = BalanceMetrics::default();
        registry.register(
            "balancer_endpoints",
            "Endpoints of each balanced service, by state (ready, probing, ejected)",
            m.endpoints.clone(),
        );
        m
    }
}

/// Where the current endpoint set comes from (a discovery lookup).
pub type EndpointSource = Arc<dyn Fn() -> Arc<[Endpoint]> + Send + Sync>;

/// One service's endpoints and their states; shared by every connection to the service.
pub struct Balancer {
    service: Arc<str>,
    source: EndpointSource,
    set: Mutex<Set>,
    gauges: [Gauge; 3],
    /// Where an ejected endpoint's move to `probing` is counted (the other transitions are
    /// counted where outcomes are recorded).
    transitions: Option<super::breaker::BreakerMetrics>,
}

struct Set {
    from: Arc<[Endpoint]>,
    endpoints: Vec<Arc<EndpointState>>,
    rng: u64,
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl Balancer {
    pub fn new(service: Arc<str>, source: EndpointSource, metrics: &BalanceMetrics) -> Self {
        let gauge = |state| {
            metrics
                .endpoints
                .get_or_create(&EndpointsLabels {
                    dst_service: service.to_string(),
                    state,
                })
                .clone()
        };
        let gauges = [
            gauge(EndpointStateLabel::ready),
            gauge(EndpointStateLabel::probing),
            gauge(EndpointStateLabel::ejected),
        ];
        let seed = std::hash::BuildHasher::hash_one(
            &std::collections::hash_map::RandomState::new(),
            &*service,
        );
        Balancer {
            service,
            source,
            set: Mutex::new(Set {
                from: Arc::from(Vec::new()),
                endpoints: Vec::new(),
                rng: seed | 1,
            }),
            gauges,
            transitions: None,
        }
    }

    /// Counts the `probing` transitions of this balancer's endpoints in `metrics`.
    pub fn with_transitions(mut self, metrics: super::breaker::BreakerMetrics) -> Self {
        self.transitions = Some(metrics);
        self
    }

    pub fn service(&self) -> &Arc<str> {
        &self.service
    }

    /// Chooses the endpoint for one request (see the module doc).
    pub fn pick(&self, tried: Option<&Tried>) -> Result<Arc<EndpointState>, BoxError> {
        let current = (self.source)();
        let now = Instant::now();
        let mut set = self.set.lock().unwrap_or_else(|p| p.into_inner());
        if !Arc::ptr_eq(&set.from, &current) {
            set.update(current);
        }
        let mut counts = [0i64; 3];
        let mut available = Vec::with_capacity(set.endpoints.len());
        for ep in &set.endpoints {
            let b = ep.breaker();
            counts[match b.state() {
                CircuitState::closed => 0,
                CircuitState::probing => 1,
                CircuitState::open => 2,
            }] += 1;
            if b.available(now) {
                available.push(ep.clone());
            }
        }
        for (g, c) in self.gauges.iter().zip(counts) {
            g.set(c);
        }
        if set.endpoints.is_empty() {
            return Err(NoEndpoints(self.service.clone()).into());
        }
        if available.is_empty() {
            return Err(CircuitOpen(self.service.clone()).into());
        }
        if let Some(tried) = tried.filter(|t| !t.is_empty()) {
            let fresh: Vec<_> = available
                .iter()
                .filter(|e| !tried.contains(e.endpoint.addr))
                .cloned()
                .collect();
            if !fresh.is_empty() {
                available = fresh;
            }
        }
        // Drawn with replacement: the costliest endpoint still wins when drawn twice, so its
        // estimate keeps being refreshed and it is never starved for good.
        let a = set.weighted(&available);
        let b = set.weighted(&available);
        // Costs within 5% count as equal: the weighted first draw decides.
        let chosen = if available[b].cost(now) < available[a].cost(now) * 0.95 {
            available[b].clone()
        } else {
            available[a].clone()
        };
        if let Some(state) = chosen.breaker().on_pick(now) {
            self.gauges[1].inc();
            self.gauges[2].dec();
            if let Some(m) = &self.transitions {
                m.transition(&self.service, chosen.endpoint.addr, state);
            }
        }
        Ok(chosen)
    }
}

impl Set {
    /// Swaps in a new endpoint set, keeping the state of endpoints that stay.
    fn update(&mut self, from: Arc<[Endpoint]>) {
        let endpoints = from
            .iter()
            .map(|ep| {
                self.endpoints
                    .iter()
                    .find(|s| s.endpoint == *ep)
                    .cloned()
                    .unwrap_or_else(|| EndpointState::new(ep.clone()))
            })
            .collect();
        self.endpoints = endpoints;
        self.from = from;
    }

    /// An index into `eps` drawn in proportion to the weights.
    fn weighted(&mut self, eps: &[Arc<EndpointState>]) -> usize {
        let total: u64 = eps
            .iter()
            .map(|e| u64::from(e.endpoint.weight.max(1)))
            .sum();
        let mut x = self.next() % total.max(1);
        for (i, e) in eps.iter().enumerate() {
            let w = u64::from(e.endpoint.weight.max(1));
            if x < w {
                return i;
            }
            x -= w;
        }
        eps.len() - 1
    }

    /// xorshift64*: fast, good enough to spread load.
    fn next(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Picks an endpoint per request from a [`Balancer`].
#[derive(Debug, Clone)]
pub struct BalanceLayer {
    balancer: Arc<Balancer>,
}

impl BalanceLayer {
    pub fn new(balancer: Arc<Balancer>) -> Self {
        BalanceLayer { balancer }
    }
}

impl<S> Layer<S> for BalanceLayer {
    type Service = Balance<S>;

    fn layer(&self, inner: S) -> Balance<S> {
        Balance {
            inner,
            balancer: self.balancer.clone(),
        }
    }
}

/// The service [`BalanceLayer`] produces.
#[derive(Debug, Clone)]
pub struct Balance<S> {
    inner: S,
    balancer: Arc<Balancer>,
}

impl<S, B> Service<Request<B>> for Balance<S>
where
    S: Service<Request<B>, Error = BoxError>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let tried = req.extensions().get::<Tried>().cloned();
        let endpoint = match self.balancer.pick(tried.as_ref()) {
            Ok(e) => e,
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        if let Some(t) = &tried {
            t.push(endpoint.endpoint.addr);
        }
        let in_flight = InFlight::new(endpoint.clone());
        req.extensions_mut().insert(Picked(endpoint));
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            drop(in_flight);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use tower::ServiceExt;

    fn ep(port: u16, weight: u32) -> Endpoint {
        Endpoint {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            identity: None,
            weight,
            mesh_port: 4143,
        }
    }

    fn fixed(eps: Vec<Endpoint>) -> EndpointSource {
        let eps: Arc<[Endpoint]> = Arc::from(eps);
        Arc::new(move || eps.clone())
    }

    fn count(b: &Balancer, n: usize) -> HashMap<u16, usize> {
        let mut seen = HashMap::new();
        for _ in 0..n {
            let e = b.pick(None).expect("pick");
            *seen.entry(e.endpoint.addr.port()).or_default() += 1;
        }
        seen
    }

    #[test]
    fn weights_split_traffic_in_proportion() {
        let b = Balancer::new(
            "s".into(),
            fixed(vec![ep(1, 1), ep(2, 3)]),
            &BalanceMetrics::default(),
        );
        let seen = count(&b, 4000);
        let heavy = seen[&2] as f64 / 4000.0;
        // P2C on equal costs keeps the first draw: the split follows the weights.
        assert!((0.65..0.85).contains(&heavy), "{seen:?}");
    }

    #[test]
    fn peak_ewma_prefers_the_faster_endpoint() {
        let b = Balancer::new(
            "s".into(),
            fixed(vec![ep(1, 1), ep(2, 1), ep(3, 1)]),
            &BalanceMetrics::default(),
        );
        b.pick(None).expect("load the set");
        let now = Instant::now();
        for s in &b.set.lock().expect("lock").endpoints {
            let rtt = if s.endpoint.addr.port() == 3 { 200 } else { 1 };
            s.observe(Duration::from_millis(rtt), now);
        }
        let seen = count(&b, 3000);
        let slow = seen.get(&3).copied().unwrap_or(0);
        // The slow one only wins when drawn twice: about 1/9 of the picks, never none.
        assert!(slow < 600 && slow > 100, "{seen:?}");
        assert!(seen[&1] > 900 && seen[&2] > 900, "{seen:?}");
    }

    #[test]
    fn ejected_endpoints_are_skipped_and_all_ejected_is_circuit_open() {
        let metrics = BalanceMetrics::default();
        let b = Balancer::new("s".into(), fixed(vec![ep(1, 1), ep(2, 1)]), &metrics);
        b.pick(None).expect("load the set");
        let first = b.set.lock().expect("lock").endpoints[0].clone();
        for _ in 0..super::super::breaker::FAILURES_TO_EJECT {
            first.breaker().record(false, Instant::now());
        }
        let seen = count(&b, 200);
        assert_eq!(seen.get(&1), None, "{seen:?}");
        let gauge = |state| {
            metrics
                .endpoints
                .get_or_create(&EndpointsLabels {
                    dst_service: "s".into(),
                    state,
                })
                .get()
        };
        assert_eq!(gauge(EndpointStateLabel::ejected), 1);
        assert_eq!(gauge(EndpointStateLabel::ready), 1);
        let second = b.set.lock().expect("lock").endpoints[1].clone();
        for _ in 0..super::super::breaker::FAILURES_TO_EJECT {
            second.breaker().record(false, Instant::now());
        }
        let e = b.pick(None).expect_err("all ejected");
        assert!(e.downcast_ref::<CircuitOpen>().is_some(), "{e}");
        let empty = Balancer::new("e".into(), fixed(vec![]), &metrics);
        let e = empty.pick(None).expect_err("no endpoints");
        assert!(e.downcast_ref::<NoEndpoints>().is_some(), "{e}");
    }

    #[test]
    fn a_retry_prefers_an_untried_endpoint() {
        let b = Balancer::new(
            "s".into(),
            fixed(vec![ep(1, 1), ep(2, 1)]),
            &BalanceMetrics::default(),
        );
        for _ in 0..50 {
            let tried = Tried::default();
            tried.push(SocketAddr::from(([127, 0, 0, 1], 1)));
            assert_eq!(b.pick(Some(&tried)).expect("pick").endpoint.addr.port(), 2);
        }
    }

    #[tokio::test]
    async fn endpoint_changes_apply_while_requests_are_in_flight() {
        let current = Arc::new(Mutex::new(Arc::<[Endpoint]>::from(vec![ep(1, 1)])));
        let c = current.clone();
        let source: EndpointSource = Arc::new(move || c.lock().expect("lock").clone());
        let b = Arc::new(Balancer::new(
            "s".into(),
            source,
            &BalanceMetrics::default(),
        ));
        let (release, hold) = tokio::sync::watch::channel(false);
        let svc = BalanceLayer::new(b.clone()).layer(tower::service_fn(move |req: Request<()>| {
            let mut hold = hold.clone();
            async move {
                let port = req
                    .extensions()
                    .get::<Picked>()
                    .expect("picked")
                    .0
                    .endpoint
                    .addr
                    .port();
                if port == 1 {
                    let _ = hold.wait_for(|r| *r).await;
                }
                Ok::<_, BoxError>(port)
            }
        }));
        let in_flight = tokio::spawn(svc.clone().oneshot(Request::new(())));
        tokio::task::yield_now().await;
        let first = b.pick(None).expect("pick");
        assert_eq!(
            first.pending.load(Ordering::Relaxed),
            1,
            "one request in flight"
        );
        *current.lock().expect("lock") = Arc::from(vec![ep(2, 1), ep(3, 1)]);
        for _ in 0..20 {
            let port = svc
                .clone()
                .oneshot(Request::new(()))
                .await
                .expect("response");
            assert_ne!(port, 1, "the removed endpoint gets no new requests");
        }
        release.send(true).expect("release");
        assert_eq!(in_flight.await.expect("join").expect("finished"), 1);
    }
}
