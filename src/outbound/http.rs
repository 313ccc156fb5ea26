//! Outbound HTTP: serve the app's HTTP/1 or HTTP/2 connection with hyper and proxy each request.
//!
//! ```text
//! hyper server (h1 | h2) ─▶ HttpMetricsLayer ─▶ ProxyHttp ─┬─ Mesh: HTTP/2 over the pooled mTLS
//!                                                        │        connection, `tern-target` names
//!                                                        │        the port, HTTP/1 marked with
//!                                                        │        `tern-orig-proto`
//!                                                        └─ Plain: pooled client to the original
//!                                                                 destination, same protocol
//! ```
//!
//! A discovery service address picks the endpoint per request instead, through
//! [`service_stack`]: timeout → retry → balance → breaker → [`EndpointClient`] (mesh when the
//! endpoint has an identity, plain otherwise). Other destinations keep the connection's target.
//!
//! Errors never reach hyper: [`crate::http::rescue`] turns them into 502/503/504/403 (gRPC:
//! trailers-only) with `tern-proxy-error`. `tern-*` headers from the app are stripped.
//! Requests that upgrade (WebSocket) or `CONNECT` on a connection whose first request did not
//! are answered 501: such connections are detected as opaque tunnels when they start that way.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{HeaderValue, Method, Request, Response, Uri, Version, header};
use tokio::net::TcpStream;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};

use super::{Outbound, Routed, ServiceDst, Target};
use crate::addr::OrigDstAddr;
use crate::detect::HttpVersion;
use crate::error::ConnError;
use crate::forward;
use crate::http::rescue::{self, ProxyError};
use crate::http::{self as h, BoxBody, BoxError};
use crate::layers::balance::{BalanceLayer, Picked};
use crate::layers::breaker::BreakerLayer;
use crate::layers::http_metrics::{HttpMetricsLayer, RequestLabels};
use crate::layers::retry::RetryLayer;
use crate::layers::timeout::TimeoutLayer;
use crate::metrics::{Direction, TcpLabels, Tls};
use crate::transport::copy::Transferred;
use crate::transport::counted::CountedIo;
use crate::transport::prefixed::PrefixedIo;

/// Serves one detected HTTP connection from the app until it closes; the connection is counted
/// in the TCP metrics like an opaque one.
pub async fn serve(
    outbound: Arc<Outbound>,
    io: PrefixedIo<TcpStream>,
    version: HttpVersion,
    routed: Routed,
    started: Instant,
) {
    let (tls, server_id) = match &routed.target {
        // The identity the peer proved (routing just made or reused the pooled connection), as
        // the TCP path labels it; the expectation only if that connection is already gone.
        Target::Mesh { addr, expected, .. } => (
            Tls::Yes,
            outbound
                .mesh
                .as_ref()
                .and_then(|m| m.peer_id(*addr, expected))
                .map_or_else(|| expected.to_string(), |id| id.to_string()),
        ),
        Target::Plain(_) => (Tls::No, String::new()),
    };
    let conn_labels = TcpLabels {
        direction: Direction::outbound,
        tls,
        client_id: String::new(),
        server_id: server_id.clone(),
    };
    let labels = RequestLabels {
        direction: Direction::outbound,
        tls,
        client_id: String::new(),
        server_id,
        dst_service: routed.service.clone().unwrap_or_default(),
    };
    let stack = routed
        .balanced
        .as_ref()
        .map(|dst| service_stack(&outbound, dst, version));
    let svc = ServiceBuilder::new()
        .layer(HttpMetricsLayer::new(outbound.metrics.http.clone(), labels))
        .service(ProxyHttp {
            outbound: outbound.clone(),
            target: Arc::new(routed.target),
            version,
            stack,
        });
    let conn = outbound.tcp.conn(conn_labels);
    let io = CountedIo::new(io, forward::counters(&conn));
    let result = h::server::serve(io, version, svc, &outbound.metrics.limits).await;
    let result = result
        .map(|()| Transferred::default())
        .map_err(ConnError::Http);
    forward::finish(conn, started, result);
}

/// A service's per-request stack, boxed at the stage boundary.
pub type ServiceStack = BoxCloneSyncService<Request<BoxBody>, Response<BoxBody>, BoxError>;

/// The per-request resilience stack of a discovery service (DESIGN.md §7). The balancer, its
/// breakers and the retry budget are the service's, shared by all its connections.
pub fn service_stack(
    outbound: &Arc<Outbound>,
    dst: &ServiceDst,
    version: HttpVersion,
) -> ServiceStack {
    let state = outbound.service_state(dst);
    let service = state.balancer.service().clone();
    let metrics = &outbound.metrics;
    let timeout = dst.policy.timeout.or(outbound.config.request_timeout);
    let retry = RetryLayer::new(
        service.clone(),
        dst.policy.retry.clone(),
        state.budget.clone(),
        metrics.retry.clone(),
    );
    let stack = ServiceBuilder::new()
        .layer(TimeoutLayer::new(timeout))
        .layer(retry)
        .layer(BalanceLayer::new(state.balancer.clone()))
        .layer(BreakerLayer::new(service, metrics.breaker.clone()))
        .service(EndpointClient {
            outbound: outbound.clone(),
            version,
        });
    BoxCloneSyncService::new(stack)
}

/// The innermost service: forwards one request to its target.
#[derive(Debug, Clone)]
struct ProxyHttp {
    outbound: Arc<Outbound>,
    target: Arc<Target>,
    version: HttpVersion,
    /// Present for a discovery service: the endpoint is picked per request.
    stack: Option<ServiceStack>,
}

impl tower::Service<Request<BoxBody>> for ProxyHttp {
    type Response = Response<BoxBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<BoxBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<BoxBody>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let grpc = h::is_grpc(req.headers());
            let version = req.version();
            let result = this.forward(req).await;
            Ok(rescue::finish(result, grpc, version, "request"))
        })
    }
}

impl ProxyHttp {
    async fn forward(&self, mut req: Request<BoxBody>) -> Result<Response<BoxBody>, BoxError> {
        if req.method() == Method::CONNECT || req.headers().contains_key(header::UPGRADE) {
            return Ok(not_implemented());
        }
        h::strip_tern_headers(req.headers_mut());
        h::strip_hop_by_hop(req.headers_mut());
        match &self.stack {
            Some(stack) => through(stack, req).await,
            None => send(&self.outbound, &self.target, self.version, req).await,
        }
    }
}

/// The bottom of a service's stack: sends the request to the endpoint the balancer picked.
#[derive(Debug, Clone)]
pub struct EndpointClient {
    outbound: Arc<Outbound>,
    version: HttpVersion,
}

impl tower::Service<Request<BoxBody>> for EndpointClient {
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<BoxBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<BoxBody>) -> Self::Future {
        let (outbound, version) = (self.outbound.clone(), self.version);
        Box::pin(async move {
            let picked = req
                .extensions()
                .get::<Picked>()
                .cloned()
                .ok_or("no endpoint picked: the balancer must sit above the endpoint client")?;
            let target = outbound.to_endpoint(&picked.0.endpoint)?;
            if let (Target::Plain(dst), true) = (&target, outbound.config.require_mtls) {
                return Err(ConnError::MtlsRequired(*dst).into());
            }
            send(&outbound, &target, version, req).await
        })
    }
}

/// Runs a request through a service's stack. A plain function returning a boxed future, so
/// the async caller holds no generic future (rustc otherwise fails to prove `Send` for every
/// lifetime of the boxed error inside `BoxBody`).
fn through(
    stack: &ServiceStack,
    req: Request<BoxBody>,
) -> Pin<Box<dyn Future<Output = Result<Response<BoxBody>, BoxError>> + Send>> {
    Box::pin(stack.clone().oneshot(req))
}

/// Sends one request to `target`: plain through the pooled client, or over the mesh.
async fn send(
    outbound: &Outbound,
    target: &Target,
    version: HttpVersion,
    mut req: Request<BoxBody>,
) -> Result<Response<BoxBody>, BoxError> {
    let orig_version = req.version();
    {
        match target {
            Target::Plain(dst) => {
                absolute_uri(&mut req, *dst)?;
                let client = outbound.upstreams.client(*dst, version);
                let resp = client.request(req).await?;
                Ok(resp.map(h::boxed))
            }
            Target::Mesh {
                addr,
                expected,
                target,
            } => {
                let Some(mesh) = &outbound.mesh else {
                    return Ok(rescue::response(ProxyError::tls_error, false));
                };
                absolute_uri(&mut req, *target)?;
                let headers = req.headers_mut();
                headers.insert(h::TARGET, HeaderValue::from_str(&target.0.to_string())?);
                if version == HttpVersion::H1 {
                    let proto = if orig_version == Version::HTTP_10 {
                        "HTTP/1.0"
                    } else {
                        "HTTP/1.1"
                    };
                    headers.insert(h::ORIG_PROTO, HeaderValue::from_static(proto));
                    // HTTP/2 carries the authority in the URI; Host would be redundant.
                    headers.remove(header::HOST);
                }
                *req.version_mut() = Version::HTTP_2;
                let resp = mesh
                    .send(
                        *addr,
                        expected.clone(),
                        req,
                        outbound.config.connect_timeout,
                    )
                    .await?;
                Ok(resp.map(h::boxed))
            }
        }
    }
}

/// Makes the URI absolute (scheme + authority), as the pooled client and HTTP/2 need. The
/// authority comes from the request (HTTP/2 `:authority`, HTTP/1 `Host`), else the destination.
fn absolute_uri(req: &mut Request<BoxBody>, dst: OrigDstAddr) -> Result<(), BoxError> {
    if req.uri().authority().is_some() && req.uri().scheme().is_some() {
        return Ok(());
    }
    let authority = match req.headers().get(header::HOST) {
        Some(host) => host.to_str()?.to_owned(),
        None => dst.0.to_string(),
    };
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_owned();
    *req.uri_mut() = Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path)
        .build()?;
    Ok(())
}

fn not_implemented() -> Response<BoxBody> {
    let mut r = Response::new(h::empty());
    *r.status_mut() = http::StatusCode::NOT_IMPLEMENTED;
    r.headers_mut().insert(
        h::PROXY_ERROR,
        HeaderValue::from_static("upgrade_after_first_request"),
    );
    r
}
