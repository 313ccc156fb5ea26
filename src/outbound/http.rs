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
//! When Gateway API routes are attached to the service (`crate::routes`), `RouteMatchLayer`
//! (outermost) picks the rule per request and the rule's [`route_stack`] runs instead:
//! timeout → retry (with backoff) → per-attempt timeout → split (weighted backend Services)
//! → per backend: balance → breaker → endpoint client. No matching rule: 404 `no_route`.
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

use http::uri::{Authority, PathAndQuery, Scheme};
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
use crate::layers::route_match::{RouteMatchLayer, RouteParent};
use crate::layers::split::{Split, WeightedBackend};
use crate::layers::timeout::TimeoutLayer;
use crate::metrics::{Direction, TcpLabels, Tls};
use crate::routes::{Matched, NoRoute, Rule, Unmatched};
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
        route: String::new(),
    };
    let stack = routed
        .balanced
        .as_ref()
        .map(|dst| service_stack(&outbound, dst, version));
    let parent = routed.balanced.as_ref().map(|dst| RouteParent {
        service: dst.name.clone(),
        port: dst.addr.0.port(),
    });
    // HTTP/1 to a fixed plain destination: this connection's own upstream connection.
    let conn_client = match (&routed.target, version, &stack) {
        (Target::Plain(dst), HttpVersion::H1, None) => Some(h::client::ConnClient::new(
            *dst,
            outbound.config.connect_timeout,
            outbound.config.http1_header_case,
        )),
        _ => None,
    };
    let mesh_sender = match (&routed.target, &stack) {
        (Target::Mesh { target, .. }, None) => Some(MeshSender::new(*target)),
        _ => None,
    };
    let svc = ServiceBuilder::new()
        .layer(RouteMatchLayer::new(outbound.routes.clone(), parent))
        .layer(HttpMetricsLayer::new(outbound.metrics.http.clone(), labels))
        .service(ProxyHttp {
            outbound: outbound.clone(),
            target: Arc::new(routed.target),
            version,
            stack,
            dst: routed.balanced.map(Arc::new),
            rule_stacks: RuleStacks::default(),
            conn_client,
            mesh_sender,
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

/// The stack of a route rule matched by a request to `dst` (its parent Service). The
/// rule's timeouts and retry override the service's; unset, the service's apply. The retry
/// budget is the parent's; each backend Service has its own balancer and breakers (shared
/// with direct traffic to it). A rule without backendRefs sends to the parent itself.
pub fn route_stack(
    outbound: &Arc<Outbound>,
    dst: &ServiceDst,
    rule: &Rule,
    version: HttpVersion,
) -> ServiceStack {
    let state = outbound.service_state(dst);
    let timeout = match rule.timeouts.request {
        Some(t) => Some(t).filter(|t| !t.is_zero()),
        None => dst.policy.timeout.or(outbound.config.request_timeout),
    };
    let retry = rule.retry.as_ref();
    let policy = retry.map_or_else(|| dst.policy.retry.clone(), |r| Some(r.policy.clone()));
    let retry = RetryLayer::new(
        state.balancer.service().clone(),
        policy,
        state.budget.clone(),
        outbound.metrics.retry.clone(),
    )
    .with_backoff(retry.map(|r| r.backoff));
    let attempt_timeout = rule.timeouts.backend_request.filter(|t| !t.is_zero());
    let stack = ServiceBuilder::new()
        .layer(TimeoutLayer::new(timeout))
        .layer(retry)
        .layer(TimeoutLayer::per_attempt(attempt_timeout))
        .service(Split::new(route_backends(outbound, dst, rule, version)));
    BoxCloneSyncService::new(stack)
}

/// A rule's weighted backends, resolved through discovery (`name.namespace` and port); an
/// unknown one keeps its weight and fails its share (`invalid_backend`).
fn route_backends(
    outbound: &Arc<Outbound>,
    dst: &ServiceDst,
    rule: &Rule,
    version: HttpVersion,
) -> Vec<WeightedBackend<ServiceStack>> {
    if rule.backends.is_empty() {
        return vec![WeightedBackend {
            name: dst.name.clone(),
            weight: 1,
            service: Some(backend_stack(outbound, dst, version)),
        }];
    }
    let resolve = |service: &str, port| {
        let (addr, policy, guard) = outbound.discovery.as_ref()?.find_backend(service, port)?;
        let dst = ServiceDst {
            addr: OrigDstAddr(addr),
            name: service.to_owned(),
            policy,
        };
        Some((dst, guard))
    };
    rule.backends
        .iter()
        .map(|b| {
            let backend = resolve(&b.service, b.port);
            if backend.is_none() {
                // Each failed request is logged by `rescue` (`invalid_backend`).
                tracing::debug!(route = &*rule.label, backend = %b.service, port = b.port,
                    "route backend unknown to discovery; its share of requests fails");
            }
            WeightedBackend {
                name: b.service.clone(),
                weight: b.weight,
                service: backend.map(|(d, guard)| {
                    let stack = backend_stack(outbound, &d, version);
                    match guard {
                        // The stack holds the guard: a Kubernetes backend stays watched while
                        // a connection can still send to it.
                        Some(guard) => ServiceStack::new(stack.map_request(move |r| {
                            let _held = &guard;
                            r
                        })),
                        None => stack,
                    }
                }),
            }
        })
        .collect()
}

/// Most rule stacks one connection keeps; past it the cache starts over (reloads make new
/// rules, so a long-lived connection would otherwise hold every old one).
const RULE_STACKS_MAX: usize = 16;

/// The stacks of the route rules a connection's requests matched, built on first use. Kept
/// per connection rather than in the shared rule, because the stacks hold the `Outbound`
/// that holds the routes: a cycle that would never be freed.
#[derive(Debug, Clone, Default)]
struct RuleStacks(Arc<std::sync::Mutex<Vec<RuleStack>>>);

/// A rule and the stack built for it.
type RuleStack = (Arc<Rule>, ServiceStack);

impl RuleStacks {
    fn get(
        &self,
        outbound: &Arc<Outbound>,
        dst: &ServiceDst,
        rule: &Arc<Rule>,
        version: HttpVersion,
    ) -> ServiceStack {
        let mut stacks = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, s)) = stacks.iter().find(|(r, _)| Arc::ptr_eq(r, rule)) {
            return s.clone();
        }
        if stacks.len() >= RULE_STACKS_MAX {
            stacks.clear();
        }
        let stack = route_stack(outbound, dst, rule, version);
        stacks.push((rule.clone(), stack.clone()));
        stack
    }
}

/// One backend Service of a route: balance → breaker → endpoint client.
fn backend_stack(outbound: &Arc<Outbound>, dst: &ServiceDst, version: HttpVersion) -> ServiceStack {
    let state = outbound.service_state(dst);
    let service = state.balancer.service().clone();
    let stack = ServiceBuilder::new()
        .layer(BalanceLayer::new(state.balancer.clone()))
        .layer(BreakerLayer::new(service, outbound.metrics.breaker.clone()))
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
    /// The discovery service, the parent of any routes the requests match.
    dst: Option<Arc<ServiceDst>>,
    rule_stacks: RuleStacks,
    /// Present for HTTP/1 to a plain fixed target: the connection's own upstream connection.
    conn_client: Option<h::client::ConnClient>,
    /// Present for a fixed mesh target: the connection's hold on the pooled mesh connection.
    mesh_sender: Option<MeshSender>,
}

/// A downstream connection's handle on the pooled mesh connection to its (fixed) peer, so a
/// request skips the pool's lookup (a map keyed by address and expected identity, a lock, and
/// the clones they take); remade from the pool when that connection closes. Also holds the
/// `tern-target` value of the connection's fixed target, formatted once.
#[derive(Debug, Clone)]
struct MeshSender {
    sender: Arc<std::sync::Mutex<Option<MeshHttp2>>>,
    target_value: HeaderValue,
}

type MeshHttp2 = hyper::client::conn::http2::SendRequest<BoxBody>;

impl MeshSender {
    fn new(target: OrigDstAddr) -> Self {
        MeshSender {
            sender: Arc::default(),
            target_value: h::socket_addr_value(target.0),
        }
    }

    fn get(&self) -> Option<MeshHttp2> {
        let slot = self.sender.lock().unwrap_or_else(|p| p.into_inner());
        slot.as_ref().filter(|s| !s.is_closed()).cloned()
    }

    fn set(&self, sender: MeshHttp2) {
        *self.sender.lock().unwrap_or_else(|p| p.into_inner()) = Some(sender);
    }
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
        if let Some(dst) = &self.dst {
            if req.extensions().get::<Unmatched>().is_some() {
                return Err(NoRoute(dst.name.clone()).into());
            }
            if let Some(Matched(rule)) = req.extensions_mut().remove::<Matched>() {
                let stack = self
                    .rule_stacks
                    .get(&self.outbound, dst, &rule, self.version);
                return through(&stack, req).await;
            }
        }
        match (&self.stack, &self.conn_client) {
            (Some(stack), _) => through(stack, req).await,
            (None, Some(client)) => Ok(client.request(req).await?.map(h::boxed)),
            // Boxed: `send`'s future (mesh connect and handshake inside) is kilobytes, and
            // every request would otherwise copy it into this one's.
            (None, None) => match &self.mesh_sender {
                Some(held) => {
                    Box::pin(send_held(
                        &self.outbound,
                        &self.target,
                        self.version,
                        req,
                        held,
                    ))
                    .await
                }
                None => Box::pin(send(&self.outbound, &self.target, self.version, req)).await,
            },
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
                let resp = if version == HttpVersion::H2 {
                    outbound.upstreams.h2().request(*dst, req).await?
                } else {
                    outbound
                        .upstreams
                        .client(*dst, version)
                        .request(req)
                        .await?
                };
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
                let target_value = h::socket_addr_value(target.0);
                to_mesh(&mut req, *target, target_value, version, orig_version)?;
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

/// Sends one request to a mesh target over the held pooled connection, taking it from the
/// pool when there is none or it closed.
async fn send_held(
    outbound: &Outbound,
    target: &Target,
    version: HttpVersion,
    mut req: Request<BoxBody>,
    held: &MeshSender,
) -> Result<Response<BoxBody>, BoxError> {
    let (
        Target::Mesh {
            addr,
            expected,
            target: dst,
        },
        Some(mesh),
    ) = (target, &outbound.mesh)
    else {
        return send(outbound, target, version, req).await;
    };
    let orig_version = req.version();
    to_mesh(
        &mut req,
        *dst,
        held.target_value.clone(),
        version,
        orig_version,
    )?;
    let mut sender = match held.get() {
        Some(s) => s,
        None => {
            let (s, _) = mesh
                .connection(*addr, expected.clone(), outbound.config.connect_timeout)
                .await?;
            held.set(s.clone());
            s
        }
    };
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| crate::mesh::client::MeshError::Http2(*addr, e))?;
    Ok(resp.map(h::boxed))
}

/// Turns an app's request into its mesh form: absolute URI, `tern-target`, and for HTTP/1
/// `tern-orig-proto` instead of `Host`; HTTP/2 on the wire. `target_value` is `target` as the
/// `tern-target` value ([`h::socket_addr_value`]).
fn to_mesh(
    req: &mut Request<BoxBody>,
    target: OrigDstAddr,
    target_value: HeaderValue,
    version: HttpVersion,
    orig_version: Version,
) -> Result<(), BoxError> {
    absolute_uri(req, target)?;
    let headers = req.headers_mut();
    headers.insert(h::TARGET, target_value);
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
    Ok(())
}

/// Makes the URI absolute (scheme + authority), as the pooled client and HTTP/2 need. The
/// authority comes from the request (HTTP/2 `:authority`, HTTP/1 `Host`), else the destination.
fn absolute_uri(req: &mut Request<BoxBody>, dst: OrigDstAddr) -> Result<(), BoxError> {
    if req.uri().authority().is_some() && req.uri().scheme().is_some() {
        return Ok(());
    }
    // The request's own path is kept as parsed (no copy, no second parse); only the
    // authority is made, from `Host`'s bytes (validated as an authority) or the destination.
    let authority = match req.headers().get(header::HOST) {
        Some(host) => Authority::try_from(host.as_bytes())?,
        None => Authority::try_from(dst.0.to_string())?,
    };
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    *req.uri_mut() = Uri::from_parts(parts)?;
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
