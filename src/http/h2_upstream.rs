//! HTTP/2 (prior-knowledge h2c) to upstream addresses without hyper-util's pooled client.
//!
//! An HTTP/2 connection multiplexes every request to its address, so a proxy needs one per
//! upstream address: [`H2Upstreams`] keeps it (hyper's HTTP/2 sender) per address and sends
//! each request on it directly. The pooled client it replaces paid, per request, a lookup of
//! the client per target, a clone of that client, the pool's checkout keyed by scheme and
//! authority, and its return.
//!
//! As the pooled client did: a connection idle for longer than the pool's idle timeout, or
//! closed, is replaced on the next request; a request the connection never took (it closed
//! under it) is sent once more on a new connection; concurrent first requests share one dial.
//!
//! Owns no metrics. Errors are hyper's and the connect errors of
//! [`crate::transport::connect`], boxed ([`BoxError`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2::{Builder, SendRequest};
use hyper_util::rt::{TokioIo, TokioTimer};

use super::conn_exec::ConnExec;
use super::{BoxBody, BoxError};
use crate::addr::OrigDstAddr;
use crate::transport::connect;

/// As the pooled client's idle timeout (`client::POOL_IDLE_TIMEOUT`): shorter than servers'
/// idle timeouts, so a request is not sent on a connection the server is closing.
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Bound on distinct upstream addresses held; beyond it the map starts over.
const MAX_TARGETS: usize = 4096;

type Sender = SendRequest<BoxBody>;

/// One HTTP/2 connection per upstream address, made on first use.
#[derive(Debug)]
pub struct H2Upstreams {
    connect_timeout: Duration,
    conns: Mutex<HashMap<SocketAddr, Arc<Slot>>>,
}

/// One address's connection: its sender and when a request last went out on it; the async
/// lock serialises dialling so concurrent first requests share one connection.
#[derive(Debug, Default)]
struct Slot {
    held: Mutex<Option<(Sender, Instant)>>,
    dial: tokio::sync::Mutex<()>,
}

impl Slot {
    /// The held sender when it is open and was used recently enough; marks it used.
    fn get(&self) -> Option<Sender> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        match held.as_mut() {
            Some((s, used)) if !s.is_closed() && used.elapsed() < IDLE_TIMEOUT => {
                *used = Instant::now();
                Some(s.clone())
            }
            _ => None,
        }
    }

    /// The held sender, or a new connection's when there is none usable (one that refused a
    /// request is closed, so it is replaced).
    async fn connect(&self, addr: OrigDstAddr, timeout: Duration) -> Result<Sender, BoxError> {
        let _dialling = self.dial.lock().await;
        if let Some(s) = self.get() {
            return Ok(s);
        }
        let stream = connect::connect(addr, timeout).await?;
        let exec = ConnExec::new();
        let (sender, conn) = Builder::new(exec.clone())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(async move {
            if let Err(e) = exec.drive(conn).await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
            }
        });
        *self.held.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((sender.clone(), Instant::now()));
        Ok(sender)
    }
}

impl H2Upstreams {
    pub fn new(connect_timeout: Duration) -> Self {
        H2Upstreams {
            connect_timeout,
            conns: Mutex::new(HashMap::new()),
        }
    }

    fn slot(&self, addr: SocketAddr) -> Arc<Slot> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = conns.get(&addr) {
            return s.clone();
        }
        if conns.len() >= MAX_TARGETS {
            conns.clear();
        }
        conns.entry(addr).or_default().clone()
    }

    /// Sends `req` (absolute URI: HTTP/2 carries scheme and authority) to `addr` over its
    /// HTTP/2 connection.
    pub async fn request(
        &self,
        addr: OrigDstAddr,
        req: Request<BoxBody>,
    ) -> Result<Response<Incoming>, BoxError> {
        let slot = self.slot(addr.0);
        // Dialling is rare: its (large) future is boxed so this one stays small.
        let mut sender = match slot.get() {
            Some(s) => s,
            None => Box::pin(slot.connect(addr, self.connect_timeout)).await?,
        };
        match sender.try_send_request(req).await {
            Ok(resp) => Ok(resp),
            Err(mut e) => match e.take_message() {
                Some(req) => {
                    let mut sender = Box::pin(slot.connect(addr, self.connect_timeout)).await?;
                    Ok(sender.send_request(req).await?)
                }
                None => Err(e.into_error().into()),
            },
        }
    }
}
