//! Upstream HTTP clients: pooled connections to one address each, HTTP/1 or HTTP/2 (h2c).
//!
//! hyper-util's pooled client routes by the request URI's authority; tern must connect to the
//! original destination (or the app's port) while keeping the request's own authority and
//! `Host` intact. So each target address gets its own client whose connector always dials that
//! address, and the pool keys on the authority within it.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::BoxBody;
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
