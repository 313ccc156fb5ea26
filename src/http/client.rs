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

use super::{BoxBody, BoxError};
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
    clients: Mutex<HashMap<(SocketAddr, HttpVersion), UpstreamClient>>,
}

impl Upstreams {
    pub fn new(connect_timeout: Duration) -> Self {
        Upstreams {
            connect_timeout,
            clients: Mutex::new(HashMap::new()),
        }
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
            .http1_preserve_header_case(true)
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
    slot: std::sync::Arc<Mutex<Option<Held>>>,
    /// A connection to `addr` made before the first request (a mesh tunnel connects to the app
    /// before it knows it carries HTTP): used instead of connecting anew, once.
    spare: std::sync::Arc<Mutex<Option<TcpStream>>>,
}

/// The upstream connection's sender and when it was last used.
type Held = (SendRequest<BoxBody>, Instant);

impl ConnClient {
    pub fn new(addr: OrigDstAddr, connect_timeout: Duration) -> Self {
        ConnClient {
            addr,
            timeout: connect_timeout,
            slot: std::sync::Arc::new(Mutex::new(None)),
            spare: std::sync::Arc::new(Mutex::new(None)),
        }
    }

    /// Like [`ConnClient::new`], with `stream` (already connected to `addr`) as the first
    /// connection.
    pub fn with_stream(addr: OrigDstAddr, connect_timeout: Duration, stream: TcpStream) -> Self {
        let c = ConnClient::new(addr, connect_timeout);
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
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .preserve_header_case(true)
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/1 connection ended");
            }
        });
        Ok(sender)
    }
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
