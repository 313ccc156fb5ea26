//! The outbound side of the mesh wire: a pool of HTTP/2-over-mTLS connections, one per
//! (peer proxy address, expected identity), and tunnels opened on them.
//!
//! A connection is made on first use and shared by every later tunnel to that peer; it is
//! replaced when it closes (peer restart, keep-alive timeout). Concurrent first uses wait for
//! one handshake rather than racing several.
//!
//! Errors: [`MeshError`], whose `reason()` is the close-reason label of the TCP connection that
//! wanted the tunnel.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::{CONNECTION_WINDOW, MeshMetrics, OpenGuard, PROXY_ERROR_HEADER, STREAM_WINDOW};
use crate::addr::OrigDstAddr;
use crate::error::CloseReason;
use crate::http::conn_exec::ConnExec;
use crate::http::{BoxBody, empty};
use crate::metrics::Direction;
use crate::tls::{ExpectedServer, IdentityStore, MESH_ALPN, PeerId};

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("mesh connection to {0} refused")]
    ConnectRefused(SocketAddr),
    #[error("mesh connection to {0} timed out")]
    ConnectTimeout(SocketAddr),
    #[error("mesh connection to {0} failed: {1}")]
    Connect(SocketAddr, #[source] std::io::Error),
    #[error("mTLS handshake with {addr} failed (expected {expected}): {source}")]
    Handshake {
        addr: SocketAddr,
        expected: String,
        #[source]
        source: std::io::Error,
    },
    #[error("peer {0} did not negotiate the tern mesh protocol (ALPN)")]
    Alpn(SocketAddr),
    #[error("HTTP/2 with {0} failed: {1}")]
    Http2(SocketAddr, #[source] hyper::Error),
    #[error("peer {addr} refused the tunnel to {target}: {status} ({why})")]
    Refused {
        addr: SocketAddr,
        target: OrigDstAddr,
        status: StatusCode,
        why: String,
    },
}

impl MeshError {
    pub fn reason(&self) -> CloseReason {
        match self {
            MeshError::ConnectRefused(_) => CloseReason::ConnectRefused,
            MeshError::ConnectTimeout(_) => CloseReason::ConnectTimeout,
            MeshError::Connect(..) => CloseReason::ConnectError,
            MeshError::Handshake { .. } | MeshError::Alpn(_) => CloseReason::TlsError,
            MeshError::Http2(..) => CloseReason::IoError,
            MeshError::Refused { status, .. } if *status == StatusCode::FORBIDDEN => {
                CloseReason::Unauthorized
            }
            MeshError::Refused { .. } => CloseReason::ConnectRefused,
        }
    }

    /// True when nothing proxy-like answered on the mesh port: the destination is not meshed.
    pub fn is_absent(&self) -> bool {
        matches!(
            self,
            MeshError::ConnectRefused(_) | MeshError::ConnectTimeout(_)
        )
    }
}

/// An established tunnel and the identity the peer proved.
#[derive(Debug)]
pub struct Tunnel {
    pub io: TokioIo<Upgraded>,
    pub server_id: PeerId,
}

type Sender = http2::SendRequest<BoxBody>;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    addr: SocketAddr,
    expected: ExpectedServer,
}

#[derive(Debug)]
struct Pooled {
    sender: Sender,
    server_id: PeerId,
}

/// The pool of mesh connections of one proxy.
#[derive(Debug)]
pub struct MeshClient {
    identity: Arc<IdentityStore>,
    metrics: MeshMetrics,
    pool: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<Option<Pooled>>>>>,
}

impl MeshClient {
    pub fn new(identity: Arc<IdentityStore>, metrics: MeshMetrics) -> Self {
        MeshClient {
            identity,
            metrics,
            pool: Mutex::new(HashMap::new()),
        }
    }

    pub fn identity(&self) -> &IdentityStore {
        &self.identity
    }

    pub(crate) fn metrics(&self) -> &MeshMetrics {
        &self.metrics
    }

    /// The identity the pooled connection to `addr` (for `expected`) proved, without connecting:
    /// `None` when there is no such connection yet (or it is being made right now).
    pub fn peer_id(&self, addr: SocketAddr, expected: &ExpectedServer) -> Option<PeerId> {
        let slot = {
            let pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            pool.get(&PoolKey {
                addr,
                expected: expected.clone(),
            })?
            .clone()
        };
        let slot = slot.try_lock().ok()?;
        slot.as_ref().map(|p| p.server_id.clone())
    }

    /// Opens a tunnel to `target` through the proxy at `addr`, which must prove `expected`.
    /// `connect_timeout` bounds the TCP connect when a new mesh connection is needed.
    pub async fn tunnel(
        &self,
        addr: SocketAddr,
        expected: ExpectedServer,
        target: OrigDstAddr,
        connect_timeout: Duration,
    ) -> Result<Tunnel, MeshError> {
        let (mut sender, server_id) = self.connection(addr, expected, connect_timeout).await?;
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(target.0.to_string())
            .body(empty())
            .expect("a CONNECT request to a socket address is always valid");
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| MeshError::Http2(addr, e))?;
        if resp.status() != StatusCode::OK {
            let why = resp
                .headers()
                .get(PROXY_ERROR_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("unknown")
                .to_string();
            return Err(MeshError::Refused {
                addr,
                target,
                status: resp.status(),
                why,
            });
        }
        let upgraded = hyper::upgrade::on(resp)
            .await
            .map_err(|e| MeshError::Http2(addr, e))?;
        Ok(Tunnel {
            io: TokioIo::new(upgraded),
            server_id,
        })
    }

    /// Sends an HTTP request over the pooled connection to `addr` (made if needed).
    pub async fn send(
        &self,
        addr: SocketAddr,
        expected: ExpectedServer,
        req: Request<BoxBody>,
        connect_timeout: Duration,
    ) -> Result<Response<Incoming>, MeshError> {
        let (mut sender, _) = self.connection(addr, expected, connect_timeout).await?;
        sender
            .send_request(req)
            .await
            .map_err(|e| MeshError::Http2(addr, e))
    }

    /// A ready pooled connection to `addr`, made if needed; also the probe of a mesh port.
    pub async fn connection(
        &self,
        addr: SocketAddr,
        expected: ExpectedServer,
        connect_timeout: Duration,
    ) -> Result<(Sender, PeerId), MeshError> {
        let slot = {
            let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            pool.entry(PoolKey {
                addr,
                expected: expected.clone(),
            })
            .or_default()
            .clone()
        };
        // Held across the handshake so concurrent first uses share one connection.
        let mut slot = slot.lock().await;
        if let Some(p) = slot.as_mut() {
            if !p.sender.is_closed() && p.sender.ready().await.is_ok() {
                return Ok((p.sender.clone(), p.server_id.clone()));
            }
        }
        // Boxed: the handshake's future is large and rare; requests should not carry it.
        let fresh = Box::pin(self.connect(addr, &expected, connect_timeout)).await?;
        let out = (fresh.sender.clone(), fresh.server_id.clone());
        *slot = Some(fresh);
        Ok(out)
    }

    async fn connect(
        &self,
        addr: SocketAddr,
        expected: &ExpectedServer,
        connect_timeout: Duration,
    ) -> Result<Pooled, MeshError> {
        let tcp = match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
            Err(_) => return Err(MeshError::ConnectTimeout(addr)),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Err(MeshError::ConnectRefused(addr));
            }
            Ok(Err(e)) => return Err(MeshError::Connect(addr, e)),
            Ok(Ok(s)) => s,
        };
        tcp.set_nodelay(true)
            .map_err(|e| MeshError::Connect(addr, e))?;
        let connector = TlsConnector::from(self.identity.client_config(expected));
        let handshake = connector.connect(ServerName::IpAddress(addr.ip().into()), tcp);
        let tls = match tokio::time::timeout(connect_timeout, handshake).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(source)) => {
                self.metrics.handshake_failed(Direction::outbound);
                return Err(MeshError::Handshake {
                    addr,
                    expected: expected.to_string(),
                    source,
                });
            }
            Err(_) => {
                self.metrics.handshake_failed(Direction::outbound);
                return Err(MeshError::Handshake {
                    addr,
                    expected: expected.to_string(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "handshake timed out",
                    ),
                });
            }
        };
        let (_, conn) = tls.get_ref();
        if conn.alpn_protocol() != Some(MESH_ALPN) {
            self.metrics.handshake_failed(Direction::outbound);
            return Err(MeshError::Alpn(addr));
        }
        let server_id = crate::tls::peer_id(conn).ok_or_else(|| MeshError::Handshake {
            addr,
            expected: expected.to_string(),
            source: std::io::Error::other("verified peer has no SPIFFE ID"),
        })?;
        let exec = ConnExec::new();
        let (sender, connection) = http2::Builder::new(exec.clone())
            .timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| MeshError::Http2(addr, e))?;
        let guard: OpenGuard = self.metrics.opened(Direction::outbound);
        tracing::debug!(peer = %addr, %server_id, "mesh connection established");
        tokio::spawn(async move {
            if let Err(e) = exec.drive(connection).await {
                tracing::debug!(peer = %addr, error = %e, "mesh connection ended");
            }
            drop(guard);
        });
        Ok(Pooled { sender, server_id })
    }
}
