//! `Split`: picks one of a route rule's weighted backend Services per request (traffic
//! splitting, canaries), then hands the request to that backend's own stack (balance →
//! breaker → endpoint client), so balancing happens within the chosen backend's endpoints.
//!
//! Where it sits: under the per-attempt timeout of a route's stack (route match → timeout →
//! retry → per-attempt timeout → **split** → balance → breaker → endpoint), so each retry
//! draws its backend again. A backend weighs in proportion to its `weight`; weight 0 gets
//! nothing. A backend that discovery does not know (`None`) keeps its weight and fails the
//! requests drawn for it, as the Gateway API asks for invalid backendRefs.
//!
//! Errors: [`NoBackend`] (500 / gRPC UNAVAILABLE, `tern-proxy-error: invalid_backend`) when
//! the drawn backend is unknown or every weight is 0. Metrics: none of its own (the backends'
//! balancer and breaker metrics carry their service names). Configured by `backendRefs`.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tower::{Service, ServiceExt};

use crate::http::BoxError;

/// The request matched a rule whose chosen backend cannot take it.
#[derive(Debug, thiserror::Error)]
#[error("route backend {0} is unknown or has weight 0")]
pub struct NoBackend(pub String);

/// One weighted backend: its stack, or `None` when discovery does not know it.
#[derive(Debug, Clone)]
pub struct WeightedBackend<S> {
    pub name: String,
    pub weight: u32,
    pub service: Option<S>,
}

/// Draws a backend per request in proportion to the weights.
#[derive(Debug, Clone)]
pub struct Split<S> {
    backends: Arc<[WeightedBackend<S>]>,
    rng: Arc<Mutex<SplitRng>>,
}

impl<S> Split<S> {
    /// A split seeded from the process's random state.
    pub fn new(backends: Vec<WeightedBackend<S>>) -> Self {
        let seed = std::hash::BuildHasher::hash_one(
            &std::collections::hash_map::RandomState::new(),
            backends.len(),
        );
        Self::seeded(backends, seed)
    }

    /// A split with a fixed seed (tests count picks, not timings).
    pub fn seeded(backends: Vec<WeightedBackend<S>>, seed: u64) -> Self {
        Split {
            backends: Arc::from(backends),
            rng: Arc::new(Mutex::new(SplitRng(seed | 1))),
        }
    }

    /// The index of the backend for the next request; `None` when every weight is 0.
    pub fn pick(&self) -> Option<usize> {
        let x = self.rng.lock().unwrap_or_else(|p| p.into_inner()).next();
        pick_weighted(self.backends.iter().map(|b| b.weight), x)
    }
}

/// The index `x` falls on when the weights are laid end to end (`x` modulo their sum).
pub fn pick_weighted(weights: impl Iterator<Item = u32> + Clone, x: u64) -> Option<usize> {
    let total: u64 = weights.clone().map(u64::from).sum();
    if total == 0 {
        return None;
    }
    let mut x = x % total;
    for (i, w) in weights.enumerate() {
        let w = u64::from(w);
        if x < w {
            return Some(i);
        }
        x -= w;
    }
    None
}

/// xorshift64*, as the balancer's.
#[derive(Debug)]
struct SplitRng(u64);

impl SplitRng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

impl<S, Req> Service<Req> for Split<S>
where
    S: Service<Req, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Each backend is driven to readiness when its request is sent.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let chosen = self.pick().map(|i| &self.backends[i]);
        match chosen {
            Some(WeightedBackend {
                service: Some(s), ..
            }) => Box::pin(s.clone().oneshot(req)),
            Some(b) => {
                let e = NoBackend(b.name.clone());
                Box::pin(std::future::ready(Err(e.into())))
            }
            None => {
                let names: Vec<&str> = self.backends.iter().map(|b| b.name.as_str()).collect();
                let e = NoBackend(names.join(","));
                Box::pin(std::future::ready(Err(e.into())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(
        name: &'static str,
    ) -> impl Service<(), Response = &'static str, Error = BoxError, Future: Send> + Clone + Send
    {
        tower::service_fn(move |()| async move { Ok::<_, BoxError>(name) })
    }

    fn backend<S>(name: &str, weight: u32, service: Option<S>) -> WeightedBackend<S> {
        WeightedBackend {
            name: name.into(),
            weight,
            service,
        }
    }

    #[tokio::test]
    async fn a_90_10_split_holds_within_tolerance_over_many_picks() {
        let split = Split::seeded(
            vec![
                backend("stable", 90, Some(named("stable"))),
                backend("canary", 10, Some(named("canary"))),
            ],
            42,
        );
        let n = 10_000;
        let mut canary = 0;
        for _ in 0..n {
            if split.clone().oneshot(()).await.expect("response") == "canary" {
                canary += 1;
            }
        }
        // Binomial(10000, 0.1): σ = 30; ±5σ.
        assert!((850..=1150).contains(&canary), "canary got {canary} of {n}");
    }

    #[test]
    fn weights_lay_out_end_to_end_and_zero_weights_get_nothing() {
        let w = [0u32, 3, 0, 1];
        let picks: Vec<_> = (0..8)
            .map(|x| pick_weighted(w.iter().copied(), x))
            .collect();
        assert_eq!(
            picks,
            [1, 1, 1, 3, 1, 1, 1, 3].map(Some).to_vec(),
            "x mod 4 over [0,3,0,1]"
        );
        assert_eq!(pick_weighted([0u32, 0].iter().copied(), 7), None);
        assert_eq!(pick_weighted(std::iter::empty::<u32>(), 7), None);
    }

    #[tokio::test]
    async fn an_unknown_backend_or_all_zero_weights_fail_typed() {
        type Svc = tower::util::BoxCloneSyncService<(), &'static str, BoxError>;
        let split: Split<Svc> = Split::seeded(vec![backend("gone.shop", 1, None)], 1);
        let e = split.oneshot(()).await.expect_err("unknown backend");
        assert_eq!(e.downcast_ref::<NoBackend>().expect("typed").0, "gone.shop");
        let split = Split::seeded(vec![backend("a.shop", 0, Some(named("a")))], 1);
        let e = split.oneshot(()).await.expect_err("weight 0");
        assert!(e.downcast_ref::<NoBackend>().is_some(), "{e}");
    }
}
