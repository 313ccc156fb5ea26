//! The inbound side of the mesh wire: serves one verified mesh connection as HTTP/2, turning
//! each `CONNECT ip:port` stream into a connection to the app's port.
//!
//! Per stream: authorize (`policy`, with the client's SPIFFE ID) → connect to the app → answer
//! `200` → detect the tunnel's first bytes (skipped on opaque ports; ended early when the app
//! speaks first): HTTP is served by `inbound::http::serve_mesh_tunnel` (the client's `tern-*`
//! headers stripped, the verified `tern-client-id` set, upgrades spliced only after the app
//! switched protocols), anything else is copied both ways. Refusals answer with a status and a `tern-proxy-error` header:
//! 403 `unauthorized`, 400 `bad_target`, 508 `loop`, 502 `connect_refused` / `connect_timeout` /
//! `connect_error`, 405 `not_connect` (plain HTTP requests arrive with the HTTP issue).
//! Each stream is counted as an inbound TCP connection with `tls="true"` and its `client_id`.

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{CONNECTION_WINDOW, MAX_STREAMS, PROXY_ERROR_HEADER, STREAM_WINDOW};
use crate::detect::{self, Served};
use crate::error::{CloseReason, ConnError};
use crate::forward;
use crate::http::conn_exec::ConnExec;
use crate::http::{BoxBody, empty};
use crate::inbound::Inbound;
use crate::metrics::{Direction, TcpLabels, Tls};
use crate::tls::PeerId;
use crate::transport::connect;
use crate::transport::copy::copy_bidirectional;

/// Serves a mesh connection until the peer closes it.
pub async fn serve<IO>(io: IO, client_id: PeerId, local_ip: IpAddr, inbound: Arc<Inbound>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let client_id = Arc::new(client_id);
    let conn = Arc::new(crate::inbound::http::MeshConn::new(
        &inbound,
        client_id.clone(),
    ));
    let svc = service_fn(move |req| {
        let inbound = inbound.clone();
        let client_id = client_id.clone();
        let conn = conn.clone();
        let fut: Pin<Box<dyn Future<Output = Result<Response<BoxBody>, Infallible>> + Send>> =
            Box::pin(async move { Ok(stream(req, client_id, conn, local_ip, inbound).await) });
        fut
    });
    let exec = ConnExec::new();
    let conn = http2::Builder::new(exec.clone())
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_STREAMS)
        .keep_alive_interval(std::time::Duration::from_secs(10))
        .keep_alive_timeout(std::time::Duration::from_secs(20))
        .serve_connection(TokioIo::new(io), svc);
    if let Err(e) = exec.drive(conn).await {
        tracing::debug!(error = %e, "mesh connection ended");
    }
}

async fn stream(
    mut req: Request<Incoming>,
    client_id: Arc<PeerId>,
    conn: Arc<crate::inbound::http::MeshConn>,
    local_ip: IpAddr,
    inbound: Arc<Inbound>,
) -> Response<BoxBody> {
    if req.method() != Method::CONNECT {
        return crate::inbound::http::from_mesh(inbound, req, conn, local_ip).await;
    }
    let port = match super::wire::parse(req.method(), req.uri(), req.headers()) {
        Ok(super::wire::StreamHead::Tunnel { port }) => port,
        _ => return refuse(StatusCode::BAD_REQUEST, "bad_target"),
    };
    let labels = TcpLabels {
        direction: Direction::inbound,
        tls: Tls::Yes,
        client_id: client_id.to_string(),
        server_id: String::new(),
    };
    if let Err(denied) = inbound.policy.authorize(port, Some(&**client_id)) {
        tracing::warn!(%client_id, port, reason = ?denied.reason, "mesh stream denied by policy");
        inbound
            .tcp
            .conn(labels)
            .closed(CloseReason::Unauthorized, std::time::Duration::ZERO);
        return refuse(StatusCode::FORBIDDEN, "unauthorized");
    }
    let dst = match inbound.app_target(local_ip, port) {
        Ok(dst) => dst,
        Err(reason) => {
            tracing::warn!(%client_id, port, "mesh stream refused: target is the proxy itself");
            inbound
                .tcp
                .conn(labels)
                .closed(reason, std::time::Duration::ZERO);
            return refuse(StatusCode::LOOP_DETECTED, "loop");
        }
    };
    let started = Instant::now();
    let metrics = inbound.tcp.conn(labels);
    let mut app = match connect::connect(dst, inbound.config.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            let why = e.reason().as_str();
            forward::finish(metrics, started, Err(e));
            return refuse(StatusCode::BAD_GATEWAY, why);
        }
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let opaque_port = inbound.config.is_opaque_port(port);
    tokio::spawn(async move {
        let tunnel = match on_upgrade.await {
            Ok(upgraded) => TokioIo::new(upgraded),
            Err(e) => {
                let e = ConnError::Io(std::io::Error::other(e));
                forward::finish(metrics, started, Err(e));
                return;
            }
        };
        // The tunnel's bytes are the meshed client's app's, unchecked by its proxy when they
        // open with an upgrade: HTTP is parsed here, so no forged tern-* header reaches the app.
        // An app that speaks first (its client waits for it) ends detection at once: the client
        // already waited out its own proxy's detect timeout, it should not wait twice.
        let app_spoke = async {
            let mut b = [0u8; 1];
            let _ = app.peek(&mut b).await;
        };
        let detected = detect::detect_recorded_until(
            tunnel,
            opaque_port,
            inbound.config.detect_timeout,
            Direction::inbound,
            &inbound.detect,
            app_spoke,
        )
        .await;
        let mut tunnel = match detected {
            Ok(Served::Http(io, version)) => {
                let serve = crate::inbound::http::serve_mesh_tunnel(
                    inbound.clone(),
                    io,
                    version,
                    (dst, app),
                    &conn,
                    metrics,
                    started,
                );
                Box::pin(serve).await;
                return;
            }
            Ok(Served::Opaque(io)) => io,
            Err(e) => {
                forward::finish(metrics, started, Err(ConnError::Io(e)));
                return;
            }
        };
        let result = copy_bidirectional(
            &mut tunnel,
            &mut app,
            inbound.config.buffer_size,
            &forward::counters(&metrics),
        )
        .await
        .map_err(ConnError::Io);
        forward::finish(metrics, started, result);
    });
    Response::new(empty())
}

fn refuse(status: StatusCode, why: &'static str) -> Response<BoxBody> {
    let mut r = Response::new(empty());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(PROXY_ERROR_HEADER, http::HeaderValue::from_static(why));
    r
}
