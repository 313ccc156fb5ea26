//! `HttpMetricsLayer`: request golden metrics, recorded when the response stream ends.
//!
//! Where it sits: outermost in each direction's HTTP stack, around the proxying service (which
//! never fails: errors are already responses from [`crate::http::rescue`]).
//!
//! Metrics (labels `direction`, `tls`, `client_id`, `server_id`, `dst_service`, `route` (the
//! matched route `namespace/name`, empty when none: see [`RouteLabel`]) on all; plus the
//! response labels `status_code`, `grpc_status`, `classification`, `error`):
//! - `tern_http_requests_total`: requests received;
//! - `tern_http_responses_total`: responses completed (end of stream, trailers included);
//! - `tern_http_response_duration_seconds`: from the request's head to the end of the response
//!   stream, labelled with `classification`.
//!
//! A response is a `failure` when its status is 5xx, when a gRPC response ends with a non-zero
//! `grpc-status` (from trailers, or the headers of a trailers-only response), when its body
//! fails mid-stream (`error="stream"`), or when the client goes away first
//! (`error="canceled"`). No flag configures it; label cardinality is bounded: no paths, no
//! authorities.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use hyper::body::{Body, Frame, SizeHint};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tower::{Layer, Service};

use crate::http::{BoxBody, BoxError, PROXY_ERROR};
use crate::metrics::{Direction, Tls};

/// Latency buckets (seconds) fine enough for sub-millisecond proxying.
const LATENCY_BUCKETS: [f64; 18] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Classification {
    success,
    failure,
}

/// Who and where: fixed per connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: Direction,
    pub tls: Tls,
    pub client_id: String,
    pub server_id: String,
    pub dst_service: String,
    /// The route (`namespace/name`) the request matched; empty when none.
    pub route: String,
}

/// A request extension naming the route the request matched (`namespace/name`); set by
/// route matching before this layer sees the request, it fills the `route` label.
#[derive(Debug, Clone)]
pub struct RouteLabel(pub Arc<str>);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResponseLabels {
    #[prometheus(flatten)]
    request: RequestLabels,
    status_code: u16,
    grpc_status: String,
    classification: Classification,
    error: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LatencyLabels {
    #[prometheus(flatten)]
    request: RequestLabels,
    classification: Classification,
}

/// The request metric families.
#[derive(Debug, Clone)]
pub struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
    responses: Family<ResponseLabels, Counter>,
    latency: Family<LatencyLabels, Histogram>,
}

impl HttpMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = HttpMetrics {
            requests: Family::default(),
            responses: Family::default(),
            latency: Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS)),
        };
        registry.register(
            "http_requests",
            "HTTP requests received",
            m.requests.clone(),
        );
        registry.register(
            "http_responses",
            "HTTP responses completed, by status and classification",
            m.responses.clone(),
        );
        registry.register_with_unit(
            "http_response_duration",
            "Time from a request's head to the end of its response stream",
            Unit::Seconds,
            m.latency.clone(),
        );
        m
    }
}

/// Wraps a service so each request/response pair is recorded with `labels`.
///
/// The labels are fixed for the layer (one per connection), so the metric handles are
/// resolved here, once: a request then costs counter increments and a histogram observation,
/// not a label-set clone, hash and family lookup per metric.
#[derive(Debug, Clone)]
pub struct HttpMetricsLayer {
    handles: Arc<Handles>,
}

impl HttpMetricsLayer {
    pub fn new(metrics: HttpMetrics, labels: RequestLabels) -> Self {
        HttpMetricsLayer {
            handles: Arc::new(Handles::new(metrics, labels)),
        }
    }
}

/// The response series one layer's requests ended in, remembered at most this many at once.
const RESPONSE_SERIES_CACHED: usize = 8;

/// One layer's metric handles: resolved when first needed (a series appears with its first
/// request, as before), then reused.
#[derive(Debug)]
struct Handles {
    metrics: HttpMetrics,
    labels: RequestLabels,
    requests: OnceLock<Counter>,
    /// By [`Classification`]: success, failure.
    latency: [OnceLock<Histogram>; 2],
    /// Most recently used first.
    responses: Mutex<Vec<(ResponseKey, Counter)>>,
    /// The handles of the routes this layer's requests matched (same labels plus `route`),
    /// most recently used first.
    routes: Mutex<Vec<(Arc<str>, Arc<Handles>)>>,
}

/// Routes whose handles one layer remembers at once.
const ROUTES_CACHED: usize = 8;

/// The response-specific part of [`ResponseLabels`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct ResponseKey {
    status_code: u16,
    grpc_status: Option<String>,
    classification: Classification,
    error: &'static str,
}

impl Handles {
    fn new(metrics: HttpMetrics, labels: RequestLabels) -> Self {
        Handles {
            metrics,
            labels,
            requests: OnceLock::new(),
            latency: [OnceLock::new(), OnceLock::new()],
            responses: Mutex::new(Vec::new()),
            routes: Mutex::new(Vec::new()),
        }
    }

    /// The handles for requests that matched `route`.
    fn for_route(&self, route: &Arc<str>) -> Arc<Handles> {
        let mut cached = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = cached.iter().position(|(r, _)| r == route) {
            let hit = cached.remove(i);
            cached.insert(0, hit);
            return cached[0].1.clone();
        }
        let labels = RequestLabels {
            route: route.to_string(),
            ..self.labels.clone()
        };
        let handles = Arc::new(Handles::new(self.metrics.clone(), labels));
        cached.truncate(ROUTES_CACHED - 1);
        cached.insert(0, (route.clone(), handles.clone()));
        handles
    }

    fn requests(&self) -> &Counter {
        self.requests
            .get_or_init(|| self.metrics.requests.get_or_create(&self.labels).clone())
    }

    fn latency(&self, classification: Classification) -> &Histogram {
        self.latency[classification as usize].get_or_init(|| {
            self.metrics
                .latency
                .get_or_create(&LatencyLabels {
                    request: self.labels.clone(),
                    classification,
                })
                .clone()
        })
    }

    fn response(&self, key: ResponseKey) -> Counter {
        let mut cached = self.responses.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = cached.iter().position(|(k, _)| *k == key) {
            if i != 0 {
                let hit = cached.remove(i);
                cached.insert(0, hit);
            }
            return cached[0].1.clone();
        }
        let counter = self
            .metrics
            .responses
            .get_or_create(&ResponseLabels {
                request: self.labels.clone(),
                status_code: key.status_code,
                grpc_status: key.grpc_status.clone().unwrap_or_default(),
                classification: key.classification,
                error: key.error,
            })
            .clone();
        cached.truncate(RESPONSE_SERIES_CACHED - 1);
        cached.insert(0, (key, counter.clone()));
        counter
    }
}

impl<S> Layer<S> for HttpMetricsLayer {
    type Service = RecordHttp<S>;

    fn layer(&self, inner: S) -> RecordHttp<S> {
        RecordHttp {
            inner,
            handles: self.handles.clone(),
        }
    }
}

/// The service [`HttpMetricsLayer`] produces.
#[derive(Debug, Clone)]
pub struct RecordHttp<S> {
    inner: S,
    handles: Arc<Handles>,
}

impl<S, B> Service<Request<B>> for RecordHttp<S>
where
    S: Service<Request<B>, Response = Response<BoxBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<BoxBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<BoxBody>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let started = Instant::now();
        let handles = match req.extensions().get::<RouteLabel>() {
            None => self.handles.clone(),
            Some(r) => self.handles.for_route(&r.0),
        };
        handles.requests().inc();
        let recorder = Recorder {
            handles,
            started,
            status: 0,
            grpc_status: None,
            error: None,
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            let (parts, body) = resp.into_parts();
            let mut recorder = recorder;
            recorder.status = parts.status.as_u16();
            recorder.error = parts
                .headers
                .get(PROXY_ERROR)
                .and_then(|v| v.to_str().ok())
                .map(static_error);
            recorder.grpc_status = grpc_status(&parts.headers);
            // Its error is already `BoxError`: boxed as is, without a `map_err` layer.
            let body = http_body_util::BodyExt::boxed_unsync(RecordBody {
                inner: body,
                recorder: Some(recorder),
            });
            Ok(Response::from_parts(parts, body))
        })
    }
}

/// Maps a `tern-proxy-error` value back to a static label value.
fn static_error(v: &str) -> &'static str {
    use crate::http::rescue::ProxyError as P;
    [
        P::connect_refused,
        P::connect_timeout,
        P::connect_error,
        P::tls_error,
        P::upstream_reset,
        P::unauthorized,
        P::mtls_required,
        P::r#loop,
        P::bad_request,
        P::circuit_open,
        P::request_timeout,
        P::no_endpoints,
        P::no_route,
        P::attempt_timeout,
        P::invalid_backend,
        P::overloaded,
        P::body_timeout,
    ]
    .into_iter()
    .map(P::as_str)
    .find(|s| *s == v)
    .unwrap_or("other")
}

/// `grpc-status` as a name: looked up without parsing the string each time.
const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

fn grpc_status(headers: &HeaderMap) -> Option<String> {
    headers
        .get(GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

#[derive(Debug)]
struct Recorder {
    handles: Arc<Handles>,
    started: Instant,
    status: u16,
    grpc_status: Option<String>,
    error: Option<&'static str>,
}

impl Recorder {
    fn record(self) {
        let failed = self.status >= 500
            || self.error.is_some()
            || self.grpc_status.as_deref().is_some_and(|s| s != "0");
        let classification = if failed {
            Classification::failure
        } else {
            Classification::success
        };
        self.handles
            .latency(classification)
            .observe(self.started.elapsed().as_secs_f64());
        self.handles
            .response(ResponseKey {
                status_code: self.status,
                grpc_status: self.grpc_status,
                classification,
                error: self.error.unwrap_or(""),
            })
            .inc();
    }
}

pin_project_lite::pin_project! {
    /// A response body that records the response when its stream ends (or is dropped early).
    struct RecordBody {
        #[pin]
        inner: BoxBody,
        recorder: Option<Recorder>,
    }

    impl PinnedDrop for RecordBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(mut r) = this.recorder.take() {
                // Dropped before its end: the client went away (an empty body ends at once).
                if !this.inner.is_end_stream() {
                    r.error.get_or_insert("canceled");
                }
                r.record();
            }
        }
    }
}

impl Body for RecordBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let mut inner = this.inner;
        let polled = inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    if let (Some(r), Some(s)) = (this.recorder.as_mut(), grpc_status(trailers)) {
                        r.grpc_status = Some(s);
                    }
                }
                // Trailers end a stream; so does the last data frame of a sized body. hyper
                // stops polling there, so record now rather than on a `None` that never comes.
                if frame.is_trailers() || inner.is_end_stream() {
                    if let Some(r) = this.recorder.take() {
                        r.record();
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(mut r) = this.recorder.take() {
                    r.error = Some("stream");
                    r.record();
                }
            }
            Poll::Ready(None) => {
                if let Some(r) = this.recorder.take() {
                    r.record();
                }
            }
            Poll::Pending => {}
        }
        polled
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
    use http_body_util::{BodyExt, Full, StreamBody};

    fn labels() -> RequestLabels {
        RequestLabels {
            direction: Direction::outbound,
            tls: Tls::No,
            client_id: String::new(),
            server_id: String::new(),
            dst_service: String::new(),
            route: String::new(),
        }
    }

    #[tokio::test]
    async fn grpc_trailers_and_status_classify() {
        let mut registry = Registry::default();
        let m = HttpMetrics::register(&mut registry);
        let layer = HttpMetricsLayer::new(m, labels());
        // A gRPC response whose trailers carry a failing status.
        let mut svc = layer.layer(tower::service_fn(|_req: Request<()>| async {
            let frames = vec![
                Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"\0\0\0\0\0"))),
                Ok(Frame::trailers({
                    let mut t = HeaderMap::new();
                    t.insert("grpc-status", "5".parse().expect("value"));
                    t
                })),
            ];
            let body = crate::http::boxed(StreamBody::new(futures_util::stream::iter(frames)));
            Ok::<_, std::convert::Infallible>(Response::new(body))
        }));
        let resp = svc.call(Request::new(())).await.expect("infallible");
        resp.into_body().collect().await.expect("body");
        // A plain 503 and a 200 whose client went away.
        let mut svc2 = layer.layer(tower::service_fn(|_req: Request<()>| async {
            let mut r = Response::new(crate::http::boxed(Full::new(Bytes::from_static(b"x"))));
            *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            Ok::<_, std::convert::Infallible>(r)
        }));
        let resp = svc2.call(Request::new(())).await.expect("infallible");
        resp.into_body().collect().await.expect("body");
        let mut svc3 = layer.layer(tower::service_fn(|_req: Request<()>| async {
            Ok::<_, std::convert::Infallible>(Response::new(crate::http::boxed(Full::new(
                Bytes::from_static(b"x"),
            ))))
        }));
        drop(svc3.call(Request::new(())).await.expect("infallible"));
        let text = crate::metrics::encode(&registry);
        assert!(
            text.contains("grpc_status=\"5\",classification=\"failure\""),
            "{text}"
        );
        assert!(
            text.contains("status_code=\"503\",grpc_status=\"\",classification=\"failure\""),
            "{text}"
        );
        assert!(
            text.contains("classification=\"failure\",error=\"canceled\""),
            "{text}"
        );
        assert!(text.contains("http_requests_total"), "{text}");
    }
}
