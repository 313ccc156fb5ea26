//! `TimeoutLayer`: bounds a whole request, retries included, until its response headers.
//!
//! Where it sits: outermost of the per-request resilience stack of a discovery service
//! (timeout → retry → balance → breaker → endpoint client, see [`crate::outbound::http`]).
//! The response body is not bounded: a stream that started is the app's business.
//! [`TimeoutLayer::per_attempt`] makes the same layer bound each attempt instead: it sits
//! under the retry layer of a route's stack (a route's `timeouts.backendRequest`).
//!
//! Errors: [`RequestTimeout`], which [`crate::http::rescue`] turns into 504 (gRPC:
//! DEADLINE_EXCEEDED, `tern-proxy-error: request_timeout`); per attempt [`AttemptTimeout`]
//! (the retry layer retries it as a 504; the last one becomes 504 / DEADLINE_EXCEEDED,
//! `attempt_timeout`). Metrics: none of its own (the response metrics label it
//! `error="request_timeout"`). Configured per service by the discovery file's `timeout`,
//! defaulting to `--request-timeout` (none unless set), and per route rule by `timeouts`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tower::{Layer, Service};

use crate::http::BoxError;

/// The request did not get its response headers within the configured timeout.
#[derive(Debug, thiserror::Error)]
#[error("request timed out after {0:?}")]
pub struct RequestTimeout(pub Duration);

/// One attempt did not get its response headers within the route's `backendRequest`.
#[derive(Debug, thiserror::Error)]
#[error("attempt timed out after {0:?}")]
pub struct AttemptTimeout(pub Duration);

/// Applies `timeout` (when set) to each request.
#[derive(Debug, Clone, Copy)]
pub struct TimeoutLayer {
    timeout: Option<Duration>,
    attempt: bool,
}

impl TimeoutLayer {
    pub fn new(timeout: Option<Duration>) -> Self {
        TimeoutLayer {
            timeout,
            attempt: false,
        }
    }

    /// Bounds each attempt; expiry is an [`AttemptTimeout`].
    pub fn per_attempt(timeout: Option<Duration>) -> Self {
        TimeoutLayer {
            timeout,
            attempt: true,
        }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            timeout: self.timeout,
            attempt: self.attempt,
        }
    }
}

/// The service [`TimeoutLayer`] produces.
#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
    timeout: Option<Duration>,
    attempt: bool,
}

impl<S, Req> Service<Req> for Timeout<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let fut = self.inner.call(req);
        let (timeout, attempt) = (self.timeout, self.attempt);
        Box::pin(async move {
            match timeout {
                None => fut.await.map_err(Into::into),
                Some(t) => match tokio::time::timeout(t, fut).await {
                    Ok(r) => r.map_err(Into::into),
                    Err(_) if attempt => Err(AttemptTimeout(t).into()),
                    Err(_) => Err(RequestTimeout(t).into()),
                },
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    fn slow(
        delay: Duration,
    ) -> impl Service<(), Response = &'static str, Error = BoxError, Future: Send + 'static> + Clone
    {
        tower::service_fn(move |()| async move {
            tokio::time::sleep(delay).await;
            Ok::<_, BoxError>("done")
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_response_times_out_with_a_typed_error() {
        let svc =
            TimeoutLayer::new(Some(Duration::from_secs(1))).layer(slow(Duration::from_secs(5)));
        let e = svc.oneshot(()).await.expect_err("timed out");
        let t = e.downcast_ref::<RequestTimeout>().expect("typed leaf");
        assert_eq!(t.0, Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_attempt_times_out_as_an_attempt() {
        let svc = TimeoutLayer::per_attempt(Some(Duration::from_millis(300)))
            .layer(slow(Duration::from_secs(5)));
        let e = svc.oneshot(()).await.expect_err("timed out");
        let t = e.downcast_ref::<AttemptTimeout>().expect("typed leaf");
        assert_eq!(t.0, Duration::from_millis(300));
        assert!(e.downcast_ref::<RequestTimeout>().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn fast_responses_and_no_timeout_pass() {
        let svc =
            TimeoutLayer::new(Some(Duration::from_secs(1))).layer(slow(Duration::from_millis(500)));
        assert_eq!(svc.oneshot(()).await.expect("in time"), "done");
        let svc = TimeoutLayer::new(None).layer(slow(Duration::from_secs(3600)));
        assert_eq!(svc.oneshot(()).await.expect("no timeout"), "done");
    }
}
