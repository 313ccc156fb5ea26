//! Serving an app-facing HTTP connection with hyper, with tern's limits and request hygiene.
//!
//! ```text
//! io ─▶ (HTTP/1: H1Guard) ─▶ hyper h1|h2 (head size, header count, header-read timeout,
//!        h2 streams, header list, keep-alive, reset floods) ─▶ Hygiene ─▶ svc
//! Hygiene: URI length (414) ─▶ Host checks (400) ─▶ h2c upgrade dropped ─▶ in-flight budget
//!          (503 overloaded) ─▶ request body idle timeout ─▶ svc
//! ```
//!
//! HTTP/1: a head must arrive within `--header-read-timeout` and fit `--max-request-head-bytes`
//! and `--max-request-headers` (hyper answers 431); header names keep their case unless
//! `--http1-header-case lowercase` ([`super::HeaderCase`]); a request with
//! both `Content-Length` and `Transfer-Encoding` is refused by [`super::h1_guard`]. HTTP/2: at
//! most `--h2-max-concurrent-streams` streams and `--h2-max-header-list-size` bytes of headers,
//! PINGs every `--h2-keep-alive-interval`, GOAWAY after `--http-idle-timeout` without streams;
//! h2 itself ends reset floods (pending-accept and local-error resets) with GOAWAY.
//!
//! Metrics: `tern_limit_exceeded_total` and `tern_http_rejected_total` (see [`super::limits`]).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::OwnedSemaphorePermit;

use super::BoxBody;
use super::conn_exec::ConnExec;
use super::conn_timer::ConnTimer;
use super::h1_guard::H1Guard;
use super::limits::{IdleTimeoutBody, Limit, Rejected, ServerLimits};
use super::rescue::{self, ProxyError};
use crate::detect::HttpVersion;

/// Pending resets (streams the client opened and reset before they were accepted) one
/// connection may accumulate before h2 ends it with GOAWAY(ENHANCE_YOUR_CALM).
const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// Streams the proxy may reset because the client broke the protocol on them (malformed
/// headers, bad content-length) before h2 ends the connection with GOAWAY.
const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 100;
/// Response bytes h2 buffers per stream for a slow reader.
const MAX_SEND_BUF_SIZE: usize = 256 * 1024;
/// Requests an HTTP/2 client may cancel (RST_STREAM) after they were forwarded, before the
/// connection is closed, when they are also at least half of its requests: the slow variant
/// of rapid reset, where each cheap reset costs the upstream a whole request (Envoy's
/// premature-reset limit). h2's own limit only counts resets before a stream is accepted.
const MAX_PREMATURE_RESETS: usize = 100;
/// How long an idle connection's GOAWAY may take before the connection is dropped.
const IDLE_GOAWAY_GRACE: std::time::Duration = std::time::Duration::from_secs(5);
/// How long an abusive connection's GOAWAY may take before the connection is dropped.
const ABUSE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Serves `io` as `version` with `svc` until the client closes, within `limits`.
pub async fn serve<IO, S>(
    io: IO,
    version: HttpVersion,
    svc: S,
    limits: &ServerLimits,
) -> Result<(), hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<Request<BoxBody>, Response = Response<BoxBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let (active, mut idle) = tokio::sync::watch::channel(0usize);
    let resets = std::sync::Arc::new(Resets::default());
    // The open-request count and the cancellations only matter to HTTP/2: an HTTP/1 client
    // has one request at a time and cancels it only by closing the connection.
    let h2 = version == HttpVersion::H2;
    let hygiene = Hygiene {
        inner: svc,
        limits: std::sync::Arc::new(limits.clone()),
        active: h2.then(|| std::sync::Arc::new(active)),
        resets: h2.then(|| resets.clone()),
    };
    let svc = TowerToHyperService::new(hygiene);
    let result = match version {
        HttpVersion::H1 => {
            let io = TokioIo::new(H1Guard::new(io, limits.clone()));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(ConnTimer::default())
                .header_read_timeout(limits.header_read_timeout)
                .max_buf_size(limits.max_head_bytes.max(8192))
                .max_headers(limits.max_headers)
                .preserve_header_case(limits.header_case.preserve())
                .serve_connection(io, svc)
                .with_upgrades();
            tokio::pin!(conn);
            // Cancellation safe: the connection future is pinned and polled again below.
            tokio::select! {
                r = conn.as_mut() => r,
                () = limits.shutting_down() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
        HttpVersion::H2 => {
            let exec = ConnExec::new();
            let conn = hyper::server::conn::http2::Builder::new(exec.clone())
                .timer(TokioTimer::new())
                .max_concurrent_streams(limits.h2_max_concurrent_streams)
                .max_header_list_size(limits.h2_max_header_list_size)
                .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS)
                .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESET_STREAMS)
                .max_send_buf_size(MAX_SEND_BUF_SIZE)
                .keep_alive_interval(limits.h2_keep_alive_interval)
                .keep_alive_timeout(limits.h2_keep_alive_timeout)
                .serve_connection(TokioIo::new(io), svc);
            let conn = exec.drive(conn);
            tokio::pin!(conn);
            let idle_timeout = limits.idle_timeout;
            let idle_for_too_long = async move {
                loop {
                    if idle.wait_for(|n| *n == 0).await.is_err() {
                        return std::future::pending().await;
                    }
                    // Cancellation safe: `changed` and `sleep` hold no data.
                    tokio::select! {
                        _ = tokio::time::sleep(idle_timeout) => return,
                        r = idle.changed() => if r.is_err() {
                            return std::future::pending().await;
                        },
                    }
                }
            };
            tokio::pin!(idle_for_too_long);
            // Cancellation safe: the connection future is pinned and polled again below;
            // `notified` holds no data.
            tokio::select! {
                r = conn.as_mut() => r,
                () = &mut idle_for_too_long => {
                    limits.exceeded(Limit::idle_timeout);
                    // GOAWAY; a peer that does not answer the shutdown's PING is dropped (it
                    // has no open stream to lose).
                    conn.as_mut().conn().graceful_shutdown();
                    match tokio::time::timeout(IDLE_GOAWAY_GRACE, conn).await {
                        Ok(r) => r,
                        Err(_) => Ok(()),
                    }
                }
                () = limits.shutting_down() => {
                    conn.as_mut().conn().graceful_shutdown();
                    conn.await
                }
                () = resets.abuse.notified() => {
                    tracing::info!("client reset too many forwarded requests; closing the connection");
                    limits.exceeded(Limit::premature_resets);
                    // GOAWAY; new streams are refused by `Hygiene` at once. An attacker need
                    // not answer the shutdown's PING, so the connection is dropped after a
                    // short grace.
                    conn.as_mut().conn().graceful_shutdown();
                    match tokio::time::timeout(ABUSE_GRACE, conn).await {
                        Ok(r) => r,
                        Err(_) => Ok(()),
                    }
                }
            }
        }
    };
    if let Err(e) = &result {
        count_connection_error(e, version, limits);
        tracing::debug!(error = %e, "HTTP connection ended");
    }
    result
}

/// Counts a connection-level limit that ended the connection.
fn count_connection_error(e: &hyper::Error, version: HttpVersion, limits: &ServerLimits) {
    if e.is_parse_too_large() {
        limits.exceeded(Limit::head_size);
    } else if e.is_timeout() {
        limits.exceeded(match version {
            HttpVersion::H1 => Limit::header_read_timeout,
            HttpVersion::H2 => Limit::h2_keep_alive,
        });
    } else {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = cur {
            if let Some(h2e) = err.downcast_ref::<h2::Error>() {
                if h2e.is_go_away()
                    && !h2e.is_remote()
                    && h2e.reason() != Some(h2::Reason::NO_ERROR)
                {
                    limits.exceeded(Limit::h2_flood);
                }
                return;
            }
            cur = err.source();
        }
    }
}

/// Request hygiene and per-request limits in front of the proxying service.
#[derive(Clone)]
struct Hygiene<S> {
    inner: S,
    /// One allocation per connection: a request clones the `Arc`, not each handle inside.
    limits: std::sync::Arc<ServerLimits>,
    /// HTTP/2: requests open on this connection (idle timeout).
    active: Option<std::sync::Arc<tokio::sync::watch::Sender<usize>>>,
    /// HTTP/2: requests the client cancelled (slow rapid reset).
    resets: Option<std::sync::Arc<Resets>>,
}

/// The response body as served: the proxied body, holding the request's in-flight slot and
/// open-request count until it is done (a concrete type: no second boxing per response).
struct HeldBody {
    inner: BoxBody,
    _held: Option<(OwnedSemaphorePermit, Option<Open>)>,
}

impl HeldBody {
    fn bare(inner: BoxBody) -> Self {
        HeldBody { inner, _held: None }
    }
}

impl hyper::body::Body for HeldBody {
    type Data = bytes::Bytes;
    type Error = super::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, super::BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Per connection: requests seen, and those the client cancelled before their response.
#[derive(Default)]
struct Resets {
    total: std::sync::atomic::AtomicUsize,
    cancelled: std::sync::atomic::AtomicUsize,
    tripped: std::sync::atomic::AtomicBool,
    abuse: tokio::sync::Notify,
}

/// Counts a request as cancelled when its response future is dropped before it completes.
struct Armed(Option<std::sync::Arc<Resets>>);

impl Drop for Armed {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some(r) = self.0.take() {
            let cancelled = r.cancelled.fetch_add(1, Relaxed) + 1;
            if cancelled >= MAX_PREMATURE_RESETS
                && cancelled * 2 >= r.total.load(Relaxed)
                && !r.tripped.swap(true, Relaxed)
            {
                r.abuse.notify_one();
            }
        }
    }
}

impl Armed {
    /// The response future completed: not a cancellation.
    fn disarm(mut self) {
        self.0 = None;
    }
}

/// Decrements the connection's open-request count when the response body is done.
struct Open(std::sync::Arc<tokio::sync::watch::Sender<usize>>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl<S> tower::Service<Request<Incoming>> for Hygiene<S>
where
    S: tower::Service<Request<BoxBody>, Response = Response<BoxBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<HeldBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<HeldBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        let ready = |r: Response<BoxBody>| -> Self::Future {
            Box::pin(std::future::ready(Ok(r.map(HeldBody::bare))))
        };
        let limits = &self.limits;
        let grpc = super::is_grpc(req.headers());
        if self
            .resets
            .as_ref()
            .is_some_and(|r| r.tripped.load(std::sync::atomic::Ordering::Relaxed))
        {
            return ready(rescue::response(ProxyError::overloaded, grpc));
        }
        if let Err((status, why)) = check(&mut req, limits) {
            return ready(refusal(status, why));
        }
        let Some(permit) = limits.admit() else {
            tracing::debug!("request shed: --max-in-flight-requests reached");
            return ready(rescue::response(ProxyError::overloaded, grpc));
        };
        let open = self.active.as_ref().map(|active| {
            active.send_modify(|n| *n += 1);
            Open(active.clone())
        });
        let timeout = limits.body_idle_timeout;
        let on_timeout = {
            let limits = limits.clone();
            move || limits.exceeded(Limit::body_idle_timeout)
        };
        let req = req.map(|body| IdleTimeoutBody::new(body, timeout, on_timeout).boxed_unsync());
        let mut inner = self.inner.clone();
        // The slot and the open count are held until the response body is done. Combinators,
        // not an async block: rustc cannot prove such a block `Send` for every lifetime of the
        // boxed error inside `BoxBody`.
        let held = (permit, open);
        let armed = Armed(self.resets.as_ref().map(|r| {
            r.total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            r.clone()
        }));
        Box::pin(futures_util::FutureExt::map(inner.call(req), move |r| {
            armed.disarm();
            r.map(move |resp| {
                resp.map(move |inner| HeldBody {
                    inner,
                    _held: Some(held),
                })
            })
        }))
    }
}

/// The per-request checks: `Err` is the status and reason that refuse the request.
fn check(
    req: &mut Request<Incoming>,
    limits: &ServerLimits,
) -> Result<(), (StatusCode, &'static str)> {
    let uri_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len())
        + req.uri().authority().map_or(0, |a| a.as_str().len());
    if uri_len > limits.max_uri_length {
        limits.exceeded(Limit::uri_length);
        return Err((StatusCode::URI_TOO_LONG, "uri_too_long"));
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next().cloned();
    if hosts.next().is_some() {
        limits.rejected(Rejected::duplicate_host);
        return Err((StatusCode::BAD_REQUEST, "duplicate_host"));
    }
    match (&host, req.uri().authority()) {
        (None, None) if req.version() == Version::HTTP_11 => {
            limits.rejected(Rejected::missing_host);
            return Err((StatusCode::BAD_REQUEST, "missing_host"));
        }
        (Some(host), Some(authority)) if !same_authority(host, authority, req.uri().scheme()) => {
            limits.rejected(Rejected::host_mismatch);
            return Err((StatusCode::BAD_REQUEST, "host_mismatch"));
        }
        _ => {}
    }
    let h2c = req.headers().get_all(header::UPGRADE).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"h2c"))
    });
    if h2c {
        // The server may ignore an upgrade (RFC 9110 §7.8): a switch to h2c would carry the
        // rest of the connection past tern's header handling.
        limits.rejected(Rejected::h2c_upgrade);
        let h = req.headers_mut();
        h.remove(header::UPGRADE);
        h.remove("http2-settings");
    }
    Ok(())
}

/// Whether a `Host` value names the same host and port as a request's authority.
fn same_authority(
    host: &HeaderValue,
    authority: &http::uri::Authority,
    scheme: Option<&http::uri::Scheme>,
) -> bool {
    let Ok(host) = http::uri::Authority::try_from(host.as_bytes()) else {
        return false;
    };
    let default = if scheme == Some(&http::uri::Scheme::HTTPS) {
        443
    } else {
        80
    };
    host.host().eq_ignore_ascii_case(authority.host())
        && host.port_u16().unwrap_or(default) == authority.port_u16().unwrap_or(default)
}

/// A 400-class answer that also closes an HTTP/1 connection.
fn refusal(status: StatusCode, why: &'static str) -> Response<BoxBody> {
    let mut r = Response::new(super::empty());
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(super::PROXY_ERROR, HeaderValue::from_static(why));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}
