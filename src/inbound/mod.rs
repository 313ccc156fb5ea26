//! The inbound pipeline: connections from other pods to this pod's app.
//!
//! ```text
//!                      ┌─ orig dst port ≠ 4143: app traffic ─▶ policy(port, no id) ─▶ detect
//!                      │     HTTP ─▶ http::serve_plain (per request to the app) | other ─▶ copy
//! peer ─▶ :4143 accept ┤
//!                      └─ orig dst port = 4143 (or direct): mesh ─▶ TLS accept, verify client
//!                            ─▶ mesh::server: per CONNECT stream ─▶ policy(port, client id) ─▶ connect app ─▶ copy
//!                                             per HTTP stream    ─▶ http::from_mesh ─▶ app
//! ```
//!
//! A plaintext connection the policy denies is closed, except HTTP: its requests get 403.
//!
//! In explicit mode (`--inbound-target`) the app is the fixed target; a direct connection is a
//! mesh connection when it opens with a TLS handshake, and plain app traffic otherwise.
//! Metrics: `tern_tcp_*{direction="inbound"}`, `tern_inbound_authz_total`, `tern_mesh_*`.

pub mod http;
pub mod policy;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::addr::{ClientAddr, OrigDstAddr};
use crate::config::{ProxyConfig, TargetMode};
use crate::detect::{self, DetectMetrics, Served};
use crate::error::{CloseReason, ConnError};
use crate::forward;
use crate::http::client::Upstreams;
use crate::layers::http_metrics::HttpMetrics;
use crate::mesh::MeshMetrics;
use crate::metrics::{Direction, TcpLabels, TcpMetrics};
use crate::tls::IdentityStore;
use policy::Policy;

/// Time a mesh client has to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything the inbound pipeline needs, shared by its connections.
#[derive(Debug)]
pub struct Inbound {
    pub config: Arc<ProxyConfig>,
    pub tcp: TcpMetrics,
    pub detect: DetectMetrics,
    pub http: HttpMetrics,
    /// Pooled HTTP clients to the app's ports.
    pub upstreams: Upstreams,
    pub mesh: MeshMetrics,
    pub policy: Policy,
    /// None: no identity configured; mesh connections are refused.
    pub identity: Option<Arc<IdentityStore>>,
    /// The inbound listener's port: an original destination on it is a mesh connection.
    pub mesh_port: u16,
    /// The proxy's other ports: an original destination on one of them is a loop.
    pub own_ports: Vec<u16>,
    /// Limits of the HTTP server facing non-meshed clients (`crate::http::limits`).
    pub server: crate::http::limits::ServerLimits,
}

/// How an accepted inbound connection is handled.
enum Kind {
    /// Redirected app traffic (or plain traffic in explicit mode) for `dst`.
    App(OrigDstAddr),
    /// A connection from a peer proxy.
    Mesh,
}

impl Inbound {
    /// Serves one accepted connection to completion.
    pub async fn serve(self: Arc<Self>, stream: TcpStream, client: ClientAddr) {
        let started = Instant::now();
        let kind = match self.classify(&stream).await {
            Ok(k) => k,
            Err(e) => {
                forward::log_failure(&e);
                self.tcp.refused(Direction::inbound, e.reason());
                return;
            }
        };
        match kind {
            Kind::App(dst) => Box::pin(self.clone().serve_app(stream, dst, started)).await,
            Kind::Mesh => Box::pin(self.serve_mesh(stream, client)).await,
        }
    }

    async fn classify(&self, stream: &TcpStream) -> Result<Kind, ConnError> {
        let orig = forward::destination(stream, TargetMode::OrigDst)?;
        match (orig, self.config.inbound_target) {
            (Some(dst), _) if dst.0.port() == self.mesh_port => Ok(Kind::Mesh),
            (Some(dst), _) if forward::is_loop(Direction::inbound, &self.own_ports, dst) => {
                Err(ConnError::Loop(dst))
            }
            (Some(dst), TargetMode::OrigDst) => Ok(Kind::App(dst)),
            (Some(_), TargetMode::Fixed(app)) => Ok(Kind::App(OrigDstAddr(app))),
            (None, TargetMode::OrigDst) => Ok(Kind::Mesh),
            (None, TargetMode::Fixed(app)) => {
                if self.identity.is_some() && starts_with_tls(stream).await {
                    Ok(Kind::Mesh)
                } else {
                    Ok(Kind::App(OrigDstAddr(app)))
                }
            }
        }
    }

    async fn serve_app(self: Arc<Self>, stream: TcpStream, dst: OrigDstAddr, started: Instant) {
        // A denied connection is closed, unless it turns out to be HTTP: then each request gets
        // a 403 (gRPC: PERMISSION_DENIED), which the client can tell from a network failure.
        let denied = self.policy.authorize(dst.0.port(), None).err();
        let refuse = |denied: policy::Denied| {
            let e = ConnError::from(denied);
            forward::log_failure(&e);
            self.tcp.refused(Direction::inbound, e.reason());
        };
        let _ = stream.set_nodelay(true);
        let opaque_port = self.config.is_opaque_port(dst.0.port());
        if let (true, Some(denied)) = (opaque_port, denied) {
            refuse(denied);
            return;
        }
        let served = detect::detect_recorded(
            stream,
            opaque_port,
            self.config.detect_timeout,
            Direction::inbound,
            &self.detect,
        )
        .await;
        let mut io = match served {
            Ok(Served::Http(io, version)) => {
                let allowed = denied.is_none();
                // Boxed: the HTTP state lives on the heap only for HTTP connections.
                Box::pin(http::serve_plain(
                    self.clone(),
                    io,
                    version,
                    dst,
                    started,
                    allowed,
                ))
                .await;
                return;
            }
            Ok(Served::Opaque(io)) => io,
            Err(e) => {
                tracing::debug!(error = %e, "client went away during detection");
                self.tcp.refused(Direction::inbound, CloseReason::IoError);
                return;
            }
        };
        if let Some(denied) = denied {
            refuse(denied);
            return;
        }
        let metrics = self.tcp.conn(TcpLabels::plain(Direction::inbound));
        let result = forward::plain(&mut io, dst, &self.config, &forward::counters(&metrics)).await;
        forward::finish(metrics, started, result);
    }

    async fn serve_mesh(self: Arc<Self>, stream: TcpStream, client: ClientAddr) {
        let Some(identity) = &self.identity else {
            tracing::warn!(%client, "mesh connection refused: no identity configured (--identity-dir)");
            self.mesh.handshake_failed(Direction::inbound);
            return;
        };
        let local_ip = match stream.local_addr() {
            Ok(a) => crate::transport::orig_dst::normalize(a).ip(),
            Err(e) => {
                tracing::debug!(error = %e, "mesh connection gone before handshake");
                return;
            }
        };
        let _ = stream.set_nodelay(true);
        let acceptor = TlsAcceptor::from(identity.server_config());
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                self.mesh.handshake_failed(Direction::inbound);
                tracing::warn!(%client, error = %e, "mesh TLS handshake failed");
                return;
            }
            Err(_) => {
                self.mesh.handshake_failed(Direction::inbound);
                tracing::warn!(%client, "mesh TLS handshake timed out");
                return;
            }
        };
        let (_, conn) = tls.get_ref();
        let Some(client_id) = crate::tls::peer_id(conn) else {
            // The verifier requires a SPIFFE client certificate; reaching here would be a bug.
            self.mesh.handshake_failed(Direction::inbound);
            tracing::error!(%client, "verified mesh client has no SPIFFE ID");
            return;
        };
        tracing::debug!(%client, %client_id, "mesh connection accepted");
        let _open = self.mesh.opened(Direction::inbound);
        crate::mesh::server::serve(tls, client_id, local_ip, self.clone()).await;
    }

    /// Where a mesh stream for `port` goes: the explicit app target, or this pod's own address.
    pub(crate) fn app_target(
        &self,
        local_ip: std::net::IpAddr,
        port: u16,
    ) -> Result<OrigDstAddr, CloseReason> {
        match self.config.inbound_target {
            TargetMode::Fixed(app) => Ok(OrigDstAddr(app)),
            TargetMode::OrigDst => {
                let dst = OrigDstAddr(SocketAddr::new(local_ip, port));
                if port == self.mesh_port
                    || forward::is_loop(Direction::inbound, &self.own_ports, dst)
                {
                    return Err(CloseReason::Loop);
                }
                Ok(dst)
            }
        }
    }
}

/// Peeks at the first byte: a TLS handshake record starts with 0x16. Gives up (plain) after the
/// detect timeout, so a client waiting for the server to speak first is still served.
async fn starts_with_tls(stream: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), stream.peek(&mut b)).await,
        Ok(Ok(1)) if b[0] == 0x16
    )
}
