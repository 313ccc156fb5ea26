//! The inbound side of the mesh wire: serves one verified mesh connection as HTTP/2, turning
//! each `CONNECT ip:port` stream into a connection to the app's port.
//!
//! Per stream: authorize (`policy`, with the client's SPIFFE ID) → connect to the app → answer
//! `200` → copy both ways. Refusals answer with a status and a `tern-proxy-error` header:
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
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{CONNECTION_WINDOW, MAX_STREAMS, PROXY_ERROR_HEADER, STREAM_WINDOW};
use crate::error::{CloseReason, ConnError};
use crate::forward;
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
    let svc = service_fn(move |req| {
        let inbound = inbound.clone();
        let client_id = client_id.clone();
        let fut: Pin<Box<dyn Future<Output = Result<Response<BoxBody>, Infallible>> + Send>> =
            Box::pin(async move { Ok(stream(req, client_id, local_ip, inbound).await) });
        fut
    });
    let result = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_STREAMS)
        .keep_alive_interval(std::time::Duration::from_secs(10))
        .keep_alive_timeout(std::time::Duration::from_secs(20))
        .serve_connection(TokioIo::new(io), svc)
        .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "mesh connection ended");
    }
}

async fn stream(
    mut req: Request<Incoming>,
    client_id: Arc<PeerId>,
    local_ip: IpAddr,
    inbound: Arc<Inbound>,
) -> Response<BoxBody> {
    if req.method() != Method::CONNECT {
        return crate::inbound::http::from_mesh(inbound, req, client_id, local_ip).await;
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
    let config = inbound.config.clone();
    tokio::spawn(async move {
        let result = match on_upgrade.await {
            Ok(upgraded) => {
                let mut tunnel = TokioIo::new(upgraded);
                copy_bidirectional(
                    &mut tunnel,
                    &mut app,
                    config.buffer_size,
                    &forward::counters(&metrics),
                )
                .await
                .map_err(ConnError::Io)
            }
            Err(e) => Err(ConnError::Io(std::io::Error::other(e))),
        };
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
