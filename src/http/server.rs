//! Serving an app-facing HTTP connection with hyper, with tern's limits.
//!
//! HTTP/1: a request head must arrive within [`HEADER_READ_TIMEOUT`] and fit in
//! [`MAX_HEAD_BYTES`] (hyper answers 431 beyond); header case is preserved. HTTP/2: at most
//! [`MAX_CONCURRENT_STREAMS`] concurrent streams (hyper/h2 bound header lists and resets).

use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};

use super::BoxBody;
use crate::detect::HttpVersion;

/// Concurrent HTTP/2 streams one app connection may open.
pub const MAX_CONCURRENT_STREAMS: u32 = 100;
/// A request head must arrive within this long (slowloris).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest HTTP/1 request head read (64 KiB).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Serves `io` as `version` with `svc` until the client closes.
pub async fn serve<IO, S>(io: IO, version: HttpVersion, svc: S) -> Result<(), hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<
            Request<Incoming>,
            Response = Response<BoxBody>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let svc = TowerToHyperService::new(svc);
    let io = TokioIo::new(io);
    let result = match version {
        HttpVersion::H1 => {
            hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES)
                .preserve_header_case(true)
                .serve_connection(io, svc)
                .await
        }
        HttpVersion::H2 => {
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
                .serve_connection(io, svc)
                .await
        }
    };
    if let Err(e) = &result {
        tracing::debug!(error = %e, "HTTP connection ended");
    }
    result
}
