//! Inbound HTTP: requests from meshed clients (HTTP/2 streams on a mesh connection) and from
//! non-meshed clients (a detected HTTP connection), forwarded to the app.
//!
//! ```text
//! mesh stream ─▶ tern-target port ─▶ policy(port, client id) ─▶ strip tern-*, add tern-client-id
//!             ─▶ HTTP/1 to the app when tern-orig-proto says so, else h2c ─▶ app
//! plain conn  ─▶ (policy checked per connection) ─▶ strip tern-* ─▶ same protocol ─▶ app
//!                  └▶ denied: every request answered 403 (gRPC PERMISSION_DENIED), none forwarded
//! HTTP in a mesh CONNECT tunnel ─▶ like a plain conn, strip tern-* ─▶ add tern-client-id ─▶ app
//! ```
//!
//! Metrics: `tern_http_*{direction="inbound"}`, with `tls` and `client_id`.

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header};
use hyper::body::Incoming;
use tokio::net::TcpStream;
use tower::{Layer, Service};

use super::Inbound;
use crate::addr::OrigDstAddr;
use crate::detect::HttpVersion;
use crate::error::CloseReason;
use crate::http::rescue::{self, ProxyError};
use crate::http::{self as h, BoxBody, BoxError};
use crate::layers::http_metrics::{HttpMetricsLayer, RequestLabels};
use crate::metrics::{Direction, Tls};
use crate::tls::PeerId;
use crate::transport::prefixed::PrefixedIo;

type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<BoxBody>, Infallible>> + Send>>;

/// Serves a non-meshed client's HTTP connection, forwarding to `app`; when the policy denied the
/// connection (`allowed` false), every request is answered 403 / PERMISSION_DENIED instead.
pub async fn serve_plain(
    inbound: Arc<Inbound>,
    io: PrefixedIo<TcpStream>,
    version: HttpVersion,
    app: OrigDstAddr,
    started: std::time::Instant,
    allowed: bool,
) {
    let labels = RequestLabels {
        direction: Direction::inbound,
        tls: Tls::No,
        client_id: String::new(),
        server_id: String::new(),
        dst_service: String::new(),
        route: String::new(),
    };
    let conn_client = (version == HttpVersion::H1 && allowed).then(|| {
        h::client::ConnClient::new(
            app,
            inbound.config.connect_timeout,
            inbound.config.http1_header_case,
        )
    });
    let svc = HttpMetricsLayer::new(inbound.http.clone(), labels).layer(ToApp {
        inbound: inbound.clone(),
        app,
        version,
        meshed: false,
        client_id: None,
        allowed,
        conn_client,
        conn_pool: None,
    });
    let conn = inbound
        .tcp
        .conn(crate::metrics::TcpLabels::plain(Direction::inbound));
    serve_conn(inbound, io, version, svc, conn, started).await;
}

/// Serves the bytes of a mesh `CONNECT` tunnel that detected as HTTP like a plain client's
/// connection (`serve_plain`): every request head is parsed, the client's `tern-*` headers are
/// stripped and `tern-client-id` is set to the verified peer identity of `mesh`, and an upgrade
/// becomes an opaque tunnel only once the app switched protocols. A meshed client (a
/// compromised app elsewhere) cannot hand the app a forged identity inside an upgrade request.
/// `app` is the app's address and the connection to it the stream already made (used by the
/// first request).
pub(crate) async fn serve_mesh_tunnel<IO>(
    inbound: Arc<Inbound>,
    io: PrefixedIo<IO>,
    version: HttpVersion,
    (app, app_conn): (OrigDstAddr, TcpStream),
    mesh: &MeshConn,
    conn: crate::metrics::ConnMetrics,
    started: std::time::Instant,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn_client = (version == HttpVersion::H1).then(|| {
        h::client::ConnClient::with_stream(
            app,
            inbound.config.connect_timeout,
            inbound.config.http1_header_case,
            app_conn,
        )
    });
    let svc = mesh.metrics.layer(ToApp {
        inbound: inbound.clone(),
        app,
        version,
        meshed: false,
        client_id: mesh.header.clone(),
        allowed: true,
        conn_client,
        conn_pool: None,
    });
    serve_conn(inbound, io, version, svc, conn, started).await;
}

/// Runs hyper's server for one downstream connection and records how it ended.
async fn serve_conn<IO, S>(
    inbound: Arc<Inbound>,
    io: PrefixedIo<IO>,
    version: HttpVersion,
    svc: S,
    conn: crate::metrics::ConnMetrics,
    started: std::time::Instant,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<BoxBody>, Response = Response<BoxBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let io = crate::transport::counted::CountedIo::new(io, crate::forward::counters(&conn));
    let result = h::server::serve(io, version, svc, &inbound.server)
        .await
        .map(|()| crate::transport::copy::Transferred::default())
        .map_err(crate::error::ConnError::Http);
    crate::forward::finish(conn, started, result);
}

/// What every request on one mesh connection shares: the verified client identity (also as
/// the `tern-client-id` value), the metric handles, made once per connection, and the
/// connection's own HTTP/1 connections to the app.
#[derive(Debug)]
pub struct MeshConn {
    client_id: Arc<PeerId>,
    header: Option<HeaderValue>,
    metrics: HttpMetricsLayer,
    app_h1: Arc<h::client::ConnPool>,
}

impl MeshConn {
    pub fn new(inbound: &Inbound, client_id: Arc<PeerId>) -> Self {
        let id = client_id.to_string();
        let header = HeaderValue::from_str(&id).ok();
        let labels = RequestLabels {
            direction: Direction::inbound,
            tls: Tls::Yes,
            client_id: id,
            server_id: String::new(),
            dst_service: String::new(),
            route: String::new(),
        };
        MeshConn {
            client_id,
            header,
            metrics: HttpMetricsLayer::new(inbound.http.clone(), labels),
            app_h1: Arc::new(h::client::ConnPool::new(inbound.config.connect_timeout)),
        }
    }
}

/// Answers one HTTP request that arrived on the mesh connection `conn`.
pub fn from_mesh(
    inbound: Arc<Inbound>,
    req: Request<Incoming>,
    conn: Arc<MeshConn>,
    local_ip: IpAddr,
) -> Pin<Box<dyn Future<Output = Response<BoxBody>> + Send>> {
    Box::pin(from_mesh_inner(inbound, req, conn, local_ip))
}

async fn from_mesh_inner(
    inbound: Arc<Inbound>,
    mut req: Request<Incoming>,
    conn: Arc<MeshConn>,
    local_ip: IpAddr,
) -> Response<BoxBody> {
    let grpc = h::is_grpc(req.headers());
    let client_id = &conn.client_id;
    let metrics = conn.metrics.clone();
    let head = crate::mesh::wire::parse(req.method(), req.uri(), req.headers());
    let Ok(crate::mesh::wire::StreamHead::Http { target, version }) = head else {
        return record(
            metrics,
            req,
            rescue::response(ProxyError::bad_request, grpc),
        )
        .await;
    };
    let port = target.port();
    if let Err(denied) = inbound.policy.authorize(port, Some(&**client_id)) {
        tracing::warn!(%client_id, port, reason = ?denied.reason, "request denied by policy");
        return record(
            metrics,
            req,
            rescue::response(ProxyError::unauthorized, grpc),
        )
        .await;
    }
    let app = match inbound.app_target(local_ip, port) {
        Ok(app) => app,
        Err(CloseReason::Loop) => {
            return record(metrics, req, rescue::response(ProxyError::r#loop, grpc)).await;
        }
        Err(_) => {
            return record(
                metrics,
                req,
                rescue::response(ProxyError::bad_request, grpc),
            )
            .await;
        }
    };
    let headers = req.headers_mut();
    h::strip_tern_headers(headers);
    if let Some(v) = &conn.header {
        headers.insert(h::CLIENT_ID, v.clone());
    }
    let app_version = if version == Version::HTTP_2 {
        HttpVersion::H2
    } else {
        // Restore the HTTP/1 request the client sent: its Host is the HTTP/2 authority.
        if let Some(authority) = req.uri().authority().map(|a| a.as_str().to_owned()) {
            if let Ok(v) = HeaderValue::from_str(&authority) {
                req.headers_mut().insert(header::HOST, v);
            }
        }
        *req.version_mut() = version;
        HttpVersion::H1
    };
    let mut svc = metrics.layer(ToApp {
        inbound,
        app,
        version: app_version,
        meshed: true,
        client_id: None,
        allowed: true,
        conn_client: None,
        conn_pool: (app_version == HttpVersion::H1).then(|| conn.app_h1.clone()),
    });
    // ToApp is always ready; naming the boxed future keeps its Send-ness concrete.
    let fut: ResponseFuture = svc.call(req.map(h::boxed));
    match fut.await {
        Ok(resp) => resp,
        Err(never) => match never {},
    }
}

/// Runs `resp` through the metrics layer so refused requests are counted too.
async fn record(
    metrics: HttpMetricsLayer,
    req: Request<Incoming>,
    resp: Response<BoxBody>,
) -> Response<BoxBody> {
    let mut slot = Some(resp);
    let mut svc = metrics.layer(tower::service_fn(move |_req: Request<Incoming>| {
        let resp = slot.take().expect("the service is called once");
        std::future::ready(Ok::<_, Infallible>(resp))
    }));
    let fut: ResponseFuture = svc.call(req);
    match fut.await {
        Ok(resp) => resp,
        Err(never) => match never {},
    }
}

/// Forwards requests to the app over pooled connections of the given protocol.
#[derive(Debug, Clone)]
struct ToApp {
    inbound: Arc<Inbound>,
    app: OrigDstAddr,
    version: HttpVersion,
    /// Whether requests come from a verified mesh client (tern-client-id is ours).
    meshed: bool,
    /// The verified peer identity to send as `tern-client-id` after stripping the client's own
    /// `tern-*` headers (HTTP inside a mesh tunnel); None: a plain client, none is sent.
    client_id: Option<HeaderValue>,
    /// False when the inbound policy denied the connection: requests are answered 403.
    allowed: bool,
    /// A plain HTTP/1 connection's own connection to the app (requests come one at a time).
    conn_client: Option<h::client::ConnClient>,
    /// A mesh connection's own HTTP/1 connections to the app (requests come concurrently).
    conn_pool: Option<Arc<h::client::ConnPool>>,
}

impl Service<Request<BoxBody>> for ToApp {
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
            let tunnel = !this.meshed
                && this.allowed
                && version == Version::HTTP_11
                && (req.method() == Method::CONNECT || req.headers().contains_key(header::UPGRADE));
            if tunnel {
                let result = this.tunnel(req).await;
                let switched = result.as_ref().ok().and_then(|r| {
                    (r.status() == StatusCode::SWITCHING_PROTOCOLS)
                        .then(|| r.headers().get(header::UPGRADE).cloned())
                });
                let mut resp = rescue::finish(result, grpc, version, "upgrade request to the app");
                // A 101 must name the protocol it switched to.
                if let Some(upgrade) = switched {
                    let h = resp.headers_mut();
                    if let Some(upgrade) = upgrade {
                        h.insert(header::UPGRADE, upgrade);
                    }
                    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                }
                return Ok(resp);
            }
            let result = this.forward(req).await;
            Ok(rescue::finish(result, grpc, version, "request to the app"))
        })
    }
}

impl ToApp {
    /// Strips the client's (forged) `tern-*` headers and adds the verified `tern-client-id`,
    /// when there is one.
    fn clean(&self, headers: &mut http::HeaderMap) {
        h::strip_tern_headers(headers);
        if let Some(id) = &self.client_id {
            headers.insert(h::CLIENT_ID, id.clone());
        }
    }

    async fn forward(&self, mut req: Request<BoxBody>) -> Result<Response<BoxBody>, BoxError> {
        if !self.allowed {
            let grpc = h::is_grpc(req.headers());
            return Ok(rescue::response(ProxyError::unauthorized, grpc));
        }
        // A plain client's tern-* headers are forged by definition; a mesh request was cleaned
        // by `from_mesh`, which added the verified tern-client-id.
        if !self.meshed {
            self.clean(req.headers_mut());
        }
        h::strip_hop_by_hop(req.headers_mut());
        if let Some(client) = &self.conn_client {
            return Ok(client.request(req).await?.map(h::boxed));
        }
        if let Some(pool) = &self.conn_pool {
            return Ok(pool.request(self.app, req).await?.map(h::boxed));
        }
        if req.uri().authority().is_none() {
            let authority = req
                .headers()
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
                .unwrap_or_else(|| self.app.0.to_string());
            let path = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_else(|| "/".into());
            *req.uri_mut() = Uri::builder()
                .scheme("http")
                .authority(authority)
                .path_and_query(path)
                .build()?;
        }
        if self.version == HttpVersion::H2 {
            let resp = self.inbound.upstreams.h2().request(self.app, req).await?;
            return Ok(resp.map(h::boxed));
        }
        let client = self.inbound.upstreams.client(self.app, self.version);
        Ok(client.request(req).await?.map(h::boxed))
    }
}

impl ToApp {
    /// A plain client's `CONNECT` or `Upgrade` (WebSocket) request: its head is cleaned like any
    /// other (forged `tern-*` headers stripped), sent to the app on a connection of its own,
    /// and only when the app switches protocols (101, or 2xx to `CONNECT`) do both sides
    /// become one opaque tunnel. Until then every request on the connection is parsed by
    /// hyper, so nothing reaches the app past the header hygiene.
    async fn tunnel(&self, mut req: Request<BoxBody>) -> Result<Response<BoxBody>, BoxError> {
        let client_side = hyper::upgrade::on(&mut req);
        let connect = req.method() == Method::CONNECT;
        let upgrade = req.headers().get(header::UPGRADE).cloned();
        self.clean(req.headers_mut());
        h::strip_hop_by_hop(req.headers_mut());
        if let Some(upgrade) = upgrade {
            let headers = req.headers_mut();
            headers.insert(header::UPGRADE, upgrade);
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        let spare = self.conn_client.as_ref().and_then(|c| c.take_spare());
        let stream = match spare {
            Some(s) => s,
            None => {
                crate::transport::connect::connect(self.app, self.inbound.config.connect_timeout)
                    .await?
            }
        };
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upgrade connection to the app ended");
            }
        });
        let mut resp = sender.send_request(req).await?;
        let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS
            || (connect && resp.status().is_success());
        if switched {
            let app_side = hyper::upgrade::on(&mut resp);
            let buffer_size = self.inbound.config.buffer_size;
            tokio::spawn(async move {
                let (client, app) = match tokio::join!(client_side, app_side) {
                    (Ok(c), Ok(a)) => (c, a),
                    (c, a) => {
                        tracing::debug!(client = c.is_ok(), app = a.is_ok(), "upgrade failed");
                        return;
                    }
                };
                let mut client = hyper_util::rt::TokioIo::new(client);
                let mut app = hyper_util::rt::TokioIo::new(app);
                let _ = tokio::io::copy_bidirectional_with_sizes(
                    &mut client,
                    &mut app,
                    buffer_size,
                    buffer_size,
                )
                .await;
            });
        }
        Ok(resp.map(h::boxed))
    }
}
