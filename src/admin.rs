//! The admin server, on its own thread and runtime so it answers while the data path is busy.
//!
//! | path | method | answer |
//! |---|---|---|
//! | `/live` | GET | 200 while the process runs |
//! | `/ready` | GET | 200 once the listeners serve, 503 before that and while draining |
//! | `/metrics` | GET | Prometheus text |
//! | `/config` | GET | the effective config as JSON |
//! | `/shutdown` | POST | starts a graceful shutdown; loopback clients only, and only with `--enable-shutdown-endpoint` |
//!
//! Unknown paths get 404, known paths with another method 405 (with `Allow`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::drain::{Drain, Readiness};

/// What the admin endpoints read.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub registry: Arc<Registry>,
    pub readiness: Readiness,
    /// The effective config, pre-rendered as JSON.
    pub config_json: Arc<String>,
    /// Present only when `/shutdown` is enabled.
    pub shutdown: Option<Drain>,
}

/// Runs the admin server on a new OS thread with its own single-threaded runtime.
/// The thread ends when `stop` resolves (or the process exits).
pub fn spawn(
    listener: std::net::TcpListener,
    state: AdminState,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("tern-admin".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "admin runtime failed to start");
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "admin listener failed");
                        return;
                    }
                };
                let trim = async {
                    let mut tick = tokio::time::interval(crate::alloc::TRIM_INTERVAL);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        tick.tick().await;
                        crate::alloc::trim();
                    }
                };
                tokio::select! {
                    // Cancellation safe: serve() and the trim loop hold no state that must
                    // survive; dropping serve() closes the listener and in-flight admin requests.
                    _ = serve(listener, state) => {}
                    _ = trim => {}
                    _ = stop => {}
                }
            });
        })
}

async fn serve(listener: TcpListener, state: AdminState) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, peer, &req)) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(error = %e, "admin connection ended");
            }
        });
    }
}

/// Routes one admin request. Pure apart from reading the shared state.
pub fn route(
    state: &AdminState,
    peer: SocketAddr,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    let allowed = match req.uri().path() {
        "/live" | "/ready" | "/metrics" | "/config" => Method::GET,
        "/shutdown" => Method::POST,
        _ => return text(StatusCode::NOT_FOUND, "not found\n"),
    };
    let method_ok =
        req.method() == allowed || (allowed == Method::GET && req.method() == Method::HEAD);
    if !method_ok {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        r.headers_mut().insert(
            header::ALLOW,
            header::HeaderValue::from_static(if allowed == Method::GET {
                "GET, HEAD"
            } else {
                "POST"
            }),
        );
        return r;
    }
    match req.uri().path() {
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" if state.readiness.is_ready() => text(StatusCode::OK, "ready\n"),
        "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/metrics" => {
            let body = crate::metrics::encode(&state.registry);
            with_type(
                StatusCode::OK,
                body,
                "text/plain; version=0.0.4; charset=utf-8",
            )
        }
        "/config" => with_type(
            StatusCode::OK,
            state.config_json.as_str().to_owned(),
            "application/json",
        ),
        _ => shutdown(state, peer),
    }
}

fn shutdown(state: &AdminState, peer: SocketAddr) -> Response<Full<Bytes>> {
    let Some(drain) = &state.shutdown else {
        return text(
            StatusCode::FORBIDDEN,
            "shutdown endpoint disabled (enable with --enable-shutdown-endpoint)\n",
        );
    };
    if !crate::transport::orig_dst::normalize(peer)
        .ip()
        .is_loopback()
    {
        return text(
            StatusCode::FORBIDDEN,
            "shutdown is allowed from loopback only\n",
        );
    }
    tracing::info!(%peer, "shutdown requested through the admin server");
    drain.start();
    text(StatusCode::OK, "shutting down\n")
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    with_type(status, body.to_owned(), "text/plain; charset=utf-8")
}

fn with_type(
    status: StatusCode,
    body: String,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}
