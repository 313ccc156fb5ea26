//! Upstream HTTP clients: pooled connections to one address each, HTTP/1 or HTTP/2 (h2c).
//!
//! hyper-util's pooled client routes by the request URI's authority; tern must connect to the
//! original destination (or the app's port) while keeping the request's own authority and
//! `Host` intact. So each target address gets its own client whose connector always dials that
//! address, and the pool keys on the authority within it.
//!
//! [`ConnClient`] is the cheaper path for the common case, one HTTP/1 connection in, one out: a
//! downstream HTTP/1 connection serves its requests one at a time, so it gets one upstream
//! connection of its own, reused request after request without the pool's checkout, its
//! absolute-URI dance and its per-request bookkeeping (about a fifth of a hop's CPU).
//!
//! [`ConnPool`] is the same idea for a mesh connection, whose HTTP/2 streams arrive concurrently:
//! the connection keeps its own few HTTP/1 connections to the app and sends each request on one
//! that is idle (dialling another when none is), again without the shared pool's bookkeeping.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::{BoxBody, BoxError, HeaderCase};
use crate::addr::OrigDstAddr;
use crate::detect::HttpVersion;
use crate::error::ConnError;
use crate::transport::connect;

/// Idle pooled connections are closed after this long: shorter than the servers' own idle
/// timeouts (tern's is 10 s, many app servers' 5 s or more), so a request is never sent on a
/// connection the server is closing.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Bound on distinct upstream targets with a cached client.
const MAX_TARGETS: usize = 4096;

/// A connector that always dials one address.
#[derive(Debug, Clone)]
pub struct FixedConnector {
    addr: OrigDstAddr,
    timeout: Duration,
}

impl tower::Service<http::Uri> for FixedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = ConnError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let (addr, timeout) = (self.addr, self.timeout);
        Box::pin(async move { connect::connect(addr, timeout).await.map(TokioIo::new) })
    }
}

pub type UpstreamClient = Client<FixedConnector, BoxBody>;

/// Clients per (target, protocol), made on first use.
#[derive(Debug)]
pub struct Upstreams {
    connect_timeout: Duration,
    header_case: HeaderCase,
    clients: Mutex<HashMap<(SocketAddr, HttpVersion), UpstreamClient>>,
    /// HTTP/2 (h2c) upstreams: one connection per address, without the pooled client.
    h2: super::h2_upstream::H2Upstreams,
}

impl Upstreams {
    pub fn new(connect_timeout: Duration, header_case: HeaderCase) -> Self {
        Upstreams {
            connect_timeout,
            header_case,
            clients: Mutex::new(HashMap::new()),
            h2: super::h2_upstream::H2Upstreams::new(connect_timeout),
        }
    }

    /// The HTTP/2 (h2c) upstream connections.
    pub fn h2(&self) -> &super::h2_upstream::H2Upstreams {
        &self.h2
    }

    /// The client for `addr` speaking `version` (HTTP/2 is prior-knowledge h2c).
    pub fn client(&self, addr: OrigDstAddr, version: HttpVersion) -> UpstreamClient {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&(addr.0, version)) {
            return c.clone();
        }
        if clients.len() >= MAX_TARGETS {
            clients.clear();
        }
        let mut b = Client::builder(TokioExecutor::new());
        b.pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http1_preserve_header_case(self.header_case.preserve())
            .set_host(false);
        if version == HttpVersion::H2 {
            b.http2_only(true);
        }
        let client = b.build(FixedConnector {
            addr,
            timeout: self.connect_timeout,
        });
        clients.insert((addr.0, version), client.clone());
        client
    }
}

/// One downstream HTTP/1 connection's own upstream HTTP/1 connection to `addr`, made on first
/// use and remade when the upstream closed it or it sat idle longer than the pool would keep
/// it. Requests go out in origin form with the request's own `Host`.
#[derive(Debug, Clone)]
pub struct ConnClient {
    addr: OrigDstAddr,
    timeout: Duration,
    header_case: HeaderCase,
    slot: std::sync::Arc<Mutex<Option<Held>>>,
    /// A connection to `addr` made before the first request (a mesh tunnel connects to the app
    /// before it knows it carries HTTP): used instead of connecting anew, once.
    spare: std::sync::Arc<Mutex<Option<TcpStream>>>,
}

/// The upstream connection's sender and when it was last used.
type Held = (SendRequest<BoxBody>, Instant);

impl ConnClient {
    pub fn new(addr: OrigDstAddr, connect_timeout: Duration, header_case: HeaderCase) -> Self {
        ConnClient {
            addr,
            timeout: connect_timeout,
            header_case,
            slot: std::sync::Arc::new(Mutex::new(None)),
            spare: std::sync::Arc::new(Mutex::new(None)),
        }
    }

    /// Like [`ConnClient::new`], with `stream` (already connected to `addr`) as the first
    /// connection.
    pub fn with_stream(
        addr: OrigDstAddr,
        connect_timeout: Duration,
        header_case: HeaderCase,
        stream: TcpStream,
    ) -> Self {
        let c = ConnClient::new(addr, connect_timeout, header_case);
        *c.spare.lock().unwrap_or_else(|p| p.into_inner()) = Some(stream);
        c
    }

    /// The connection given to [`ConnClient::with_stream`], if no request used it yet.
    pub fn take_spare(&self) -> Option<TcpStream> {
        self.spare.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Sends `req` on this connection's upstream connection. A request the upstream never saw
    /// (the connection closed under it) is sent once more on a new connection.
    pub async fn request(&self, mut req: Request<BoxBody>) -> Result<Response<Incoming>, BoxError> {
        origin_form(req.uri_mut());
        // Connecting is rare: its (large) future is boxed so this one stays small.
        let mut sender = match self.take() {
            Some(s) => s,
            None => Box::pin(self.connect()).await?,
        };
        if sender.ready().await.is_err() {
            sender = Box::pin(self.connect()).await?;
            sender.ready().await?;
        }
        let sent = sender.try_send_request(req);
        // The downstream connection sends its next request only after this one's response,
        // and `ready` waits for that response's end; so the sender can go back now.
        self.put(sender);
        match sent.await {
            Ok(resp) => Ok(resp),
            Err(mut e) => match e.take_message() {
                Some(req) => {
                    let mut sender = Box::pin(self.connect()).await?;
                    sender.ready().await?;
                    let sent = sender.send_request(req);
                    self.put(sender);
                    Ok(sent.await?)
                }
                None => Err(e.into_error().into()),
            },
        }
    }

    fn take(&self) -> Option<SendRequest<BoxBody>> {
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        match slot.take() {
            Some((s, used)) if !s.is_closed() && used.elapsed() < POOL_IDLE_TIMEOUT => Some(s),
            _ => None,
        }
    }

    fn put(&self, sender: SendRequest<BoxBody>) {
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        *slot = Some((sender, Instant::now()));
    }

    async fn connect(&self) -> Result<SendRequest<BoxBody>, BoxError> {
        let stream = match self.take_spare() {
            Some(s) => s,
            None => connect::connect(self.addr, self.timeout).await?,
        };
        handshake_h1(stream, self.header_case).await
    }
}

/// Bound on the app connections one [`ConnPool`] keeps (idle or busy); beyond it a connection
/// serves its request and closes.
const MAX_HELD: usize = 64;

/// One mesh connection's own HTTP/1 connections to the app target(s) its requests name. A
/// request takes a connection that is idle (ready for a request), else dials a new one; the
/// connection goes back right after the request is sent and is taken again only once its
/// response has ended, so no request waits behind another's response.
#[derive(Debug)]
pub struct ConnPool {
    timeout: Duration,
    held: Mutex<Vec<Held1>>,
}

/// A held connection: its target, its sender and when a request was last sent on it.
#[derive(Debug)]
struct Held1 {
    addr: SocketAddr,
    sender: SendRequest<BoxBody>,
    used: Instant,
}

impl ConnPool {
    pub fn new(connect_timeout: Duration) -> Self {
        ConnPool {
            timeout: connect_timeout,
            held: Mutex::new(Vec::new()),
        }
    }

    /// Sends `req` to `addr` on an idle held connection or a new one. A request the app never
    /// saw (the connection closed under it) is sent once more on a new connection.
    pub async fn request(
        &self,
        addr: OrigDstAddr,
        mut req: Request<BoxBody>,
    ) -> Result<Response<Incoming>, BoxError> {
        origin_form(req.uri_mut());
        // As hyper-util's pooled client does, so the app keeps an HTTP/1.0 client's connection.
        if req.version() == http::Version::HTTP_10
            && !req.headers().contains_key(http::header::CONNECTION)
        {
            req.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("keep-alive"),
            );
        }
        let mut sender = match self.take(addr.0) {
            Some(s) => s,
            None => Box::pin(connect_h1(addr, self.timeout)).await?,
        };
        if sender.ready().await.is_err() {
            sender = Box::pin(connect_h1(addr, self.timeout)).await?;
            sender.ready().await?;
        }
        let sent = sender.try_send_request(req);
        self.put(addr.0, sender);
        match sent.await {
            Ok(resp) => Ok(resp),
            Err(mut e) => match e.take_message() {
                Some(req) => {
                    let mut sender = Box::pin(connect_h1(addr, self.timeout)).await?;
                    sender.ready().await?;
                    let sent = sender.send_request(req);
                    self.put(addr.0, sender);
                    Ok(sent.await?)
                }
                None => Err(e.into_error().into()),
            },
        }
    }

    /// An idle connection to `addr`, dropping closed ones and ones idle too long.
    fn take(&self, addr: SocketAddr) -> Option<SendRequest<BoxBody>> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        held.retain(|h| {
            !h.sender.is_closed()
                && (!h.sender.is_ready() || now.duration_since(h.used) < POOL_IDLE_TIMEOUT)
        });
        let i = held
            .iter()
            .position(|h| h.addr == addr && h.sender.is_ready())?;
        Some(held.swap_remove(i).sender)
    }

    fn put(&self, addr: SocketAddr, sender: SendRequest<BoxBody>) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.len() < MAX_HELD {
            held.push(Held1 {
                addr,
                sender,
                used: Instant::now(),
            });
        }
    }
}

/// A new HTTP/1 connection to `addr` for a [`ConnPool`], its connection task spawned.
/// Its requests come off HTTP/2 (the mesh hop) and carry no original case, and its responses go
/// back over HTTP/2, so it never records header case (a second header map per response).
async fn connect_h1(
    addr: OrigDstAddr,
    timeout: Duration,
) -> Result<SendRequest<BoxBody>, BoxError> {
    handshake_h1(
        connect::connect(addr, timeout).await?,
        HeaderCase::Lowercase,
    )
    .await
}

/// An HTTP/1 client connection over `stream`, its connection task spawned; with
/// [`HeaderCase::Preserve`] a request's recorded header case is written and the response's
/// recorded.
async fn handshake_h1(
    stream: TcpStream,
    header_case: HeaderCase,
) -> Result<SendRequest<BoxBody>, BoxError> {
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .preserve_header_case(header_case.preserve())
        .handshake(TokioIo::new(stream))
        .await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream HTTP/1 connection ended");
        }
    });
    Ok(sender)
}

/// Rewrites an absolute URI to origin form (`/path?query`), as HTTP/1 sends to an origin
/// (what hyper-util's pooled client does for a direct connection).
fn origin_form(uri: &mut Uri) {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return;
    }
    *uri = match uri.path_and_query() {
        Some(path) if path.as_str() != "/" => {
            let mut parts = http::uri::Parts::default();
            parts.path_and_query = Some(path.clone());
            Uri::from_parts(parts).unwrap_or_default()
        }
        _ => Uri::default(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, Full};
    use hyper::service::service_fn;
    use tokio::net::TcpListener;
    use tokio::sync::Notify;

    /// A real HTTP/1 server on loopback counting its connections; `/slow` answers only once
    /// `release` is notified.
    async fn app(accepted: Arc<AtomicUsize>, release: Arc<Notify>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let release = release.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let release = release.clone();
                        async move {
                            if req.uri().path() == "/slow" {
                                release.notified().await;
                            }
                            let body = Full::new(bytes::Bytes::from(req.uri().path().to_owned()));
                            Ok::<_, std::convert::Infallible>(Response::new(body))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        addr
    }

    async fn get(pool: &ConnPool, addr: SocketAddr, path: &str) -> String {
        let req = Request::get(format!("http://app.test{path}"))
            .body(super::super::empty())
            .expect("request");
        let resp = pool
            .request(OrigDstAddr(addr), req)
            .await
            .expect("response");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8_lossy(&body).into_owned()
    }

    #[tokio::test]
    async fn conn_pool_reuses_an_idle_connection() {
        let accepted = Arc::new(AtomicUsize::new(0));
        let addr = app(accepted.clone(), Arc::new(Notify::new())).await;
        let pool = ConnPool::new(Duration::from_secs(5));
        for path in ["/a", "/b", "/c"] {
            assert_eq!(get(&pool, addr, path).await, path);
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one connection for sequential requests"
        );
    }

    #[tokio::test]
    async fn conn_pool_request_does_not_wait_behind_a_pending_response() {
        let accepted = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(Notify::new());
        let addr = app(accepted.clone(), release.clone()).await;
        let pool = Arc::new(ConnPool::new(Duration::from_secs(5)));
        let slow = tokio::spawn({
            let pool = pool.clone();
            async move { get(&pool, addr, "/slow").await }
        });
        // Wait (bounded) until the slow request reached the app, then send another: it must be
        // answered while /slow is still pending, on a second connection.
        for _ in 0..200 {
            if accepted.load(Ordering::SeqCst) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The guard only turns a deadlock into a failure; it asserts nothing about time.
        let fast = tokio::time::timeout(Duration::from_secs(30), get(&pool, addr, "/fast")).await;
        assert_eq!(fast.expect("not queued behind /slow"), "/fast");
        release.notify_one();
        assert_eq!(slow.await.expect("slow task"), "/slow");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // Both connections are idle again: the next request reuses one of them.
        assert_eq!(get(&pool, addr, "/again").await, "/again");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }
}
