//! The outbound pipeline: connections from this pod's app to anywhere.
//!
//! ```text
//! app ─▶ :4140 accept ─▶ destination (orig dst | explicit) ─▶ loop check ─▶ route
//!   route: discovery knows it ─▶ endpoint with identity ─▶ mesh tunnel (mTLS, exact identity)
//!                              └▶ endpoint without identity ─▶ plain
//!          unknown, in --cluster-networks ─▶ probe <ip>:4143 ─▶ meshed ─▶ mesh tunnel (trust domain)
//!                                                            └▶ absent ─▶ plain (negative cache)
//!          unknown, elsewhere ─▶ plain
//!   --require-mtls: plain routes are refused
//! ```
//!
//! Metrics: `tern_tcp_*{direction="outbound"}` (`tls`, `server_id` when meshed),
//! `tern_mesh_probes_total`, `tern_mesh_*{direction="outbound"}`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ipnet::IpNet;
use tokio::net::TcpStream;

use crate::addr::{ClientAddr, OrigDstAddr};
use crate::config::ProxyConfig;
use crate::discover::{DEFAULT_MESH_PORT, Discovery, Endpoint};
use crate::error::ConnError;
use crate::forward;
use crate::mesh::ProbeResult;
use crate::mesh::client::{MeshClient, MeshError, Tunnel};
use crate::metrics::{Direction, TcpLabels, TcpMetrics, Tls};
use crate::tls::ExpectedServer;
use crate::transport::copy::copy_bidirectional;

/// Bound on remembered not-meshed destinations; expired entries are pruned when it is reached.
const NEGATIVE_CACHE_MAX: usize = 4096;

/// Everything the outbound pipeline needs, shared by its connections.
#[derive(Debug)]
pub struct Outbound {
    pub config: Arc<ProxyConfig>,
    pub tcp: TcpMetrics,
    pub discovery: Option<Discovery>,
    /// None: no identity configured; everything goes out in plaintext.
    pub mesh: Option<MeshClient>,
    /// The proxy's own ports: an original destination on one of them (locally) is a loop.
    pub own_ports: Vec<u16>,
    /// Destinations whose mesh port recently did not answer, and until when to believe it.
    not_meshed: Mutex<HashMap<IpAddr, Instant>>,
    /// Round-robin cursor over a service's endpoints (balancing proper comes with discovery).
    next: AtomicUsize,
}

/// How one connection leaves the proxy.
enum Route {
    Plain(OrigDstAddr),
    Mesh(Tunnel),
}

impl Outbound {
    pub fn new(
        config: Arc<ProxyConfig>,
        tcp: TcpMetrics,
        discovery: Option<Discovery>,
        mesh: Option<MeshClient>,
        own_ports: Vec<u16>,
    ) -> Self {
        Outbound {
            config,
            tcp,
            discovery,
            mesh,
            own_ports,
            not_meshed: Mutex::new(HashMap::new()),
            next: AtomicUsize::new(0),
        }
    }

    /// Serves one accepted connection to completion.
    pub async fn serve(self: Arc<Self>, mut stream: TcpStream, client: ClientAddr) {
        let started = Instant::now();
        let route = async {
            let dst = forward::destination(&stream, self.config.outbound_target)?
                .ok_or(ConnError::NoOrigDst)?;
            if forward::is_loop(Direction::outbound, &self.own_ports, dst) {
                return Err(ConnError::Loop(dst));
            }
            tracing::debug!(%client, %dst, "routing");
            self.route(dst).await
        }
        .await;
        let route = match route {
            Ok(r) => r,
            Err(e) => {
                forward::log_failure(&e);
                self.tcp.refused(Direction::outbound, e.reason());
                return;
            }
        };
        let _ = stream.set_nodelay(true);
        match route {
            Route::Plain(dst) => {
                let metrics = self.tcp.conn(TcpLabels::plain(Direction::outbound));
                let counters = forward::counters(&metrics);
                let result = forward::plain(&mut stream, dst, &self.config, &counters).await;
                forward::finish(metrics, started, result);
            }
            Route::Mesh(mut tunnel) => {
                let metrics = self.tcp.conn(TcpLabels {
                    direction: Direction::outbound,
                    tls: Tls::Yes,
                    client_id: String::new(),
                    server_id: tunnel.server_id.to_string(),
                });
                let counters = forward::counters(&metrics);
                let result = copy_bidirectional(
                    &mut stream,
                    &mut tunnel.io,
                    self.config.buffer_size,
                    &counters,
                )
                .await
                .map_err(ConnError::Io);
                forward::finish(metrics, started, result);
            }
        }
    }

    async fn route(&self, dst: OrigDstAddr) -> Result<Route, ConnError> {
        let resolved = self.discovery.as_ref().and_then(|d| d.resolve(dst.0));
        let route = match resolved {
            Some(r) if !r.endpoints.is_empty() => {
                let i = self.next.fetch_add(1, Ordering::Relaxed) % r.endpoints.len();
                self.to_endpoint(&r.endpoints[i]).await?
            }
            _ => self.to_unknown(dst).await?,
        };
        match route {
            Route::Plain(dst) if self.config.require_mtls => Err(ConnError::MtlsRequired(dst)),
            route => Ok(route),
        }
    }

    async fn to_endpoint(&self, ep: &Endpoint) -> Result<Route, ConnError> {
        let target = OrigDstAddr(ep.addr);
        match (&ep.identity, ep.mesh_addr(), &self.mesh) {
            (Some(id), Some(mesh_addr), Some(mesh)) => {
                let tunnel = mesh
                    .tunnel(
                        mesh_addr,
                        ExpectedServer::Exact(id.clone()),
                        target,
                        self.config.connect_timeout,
                    )
                    .await?;
                Ok(Route::Mesh(tunnel))
            }
            (Some(id), _, None) => {
                // Discovery says it is meshed but we have no identity to speak mTLS with:
                // never downgrade silently.
                Err(ConnError::Mesh(MeshError::Handshake {
                    addr: ep.addr,
                    expected: id.to_string(),
                    source: std::io::Error::other("this proxy has no identity (--identity-dir)"),
                }))
            }
            _ => Ok(Route::Plain(target)),
        }
    }

    async fn to_unknown(&self, dst: OrigDstAddr) -> Result<Route, ConnError> {
        let Some(mesh) = &self.mesh else {
            return Ok(Route::Plain(dst));
        };
        let ip = dst.0.ip();
        if !self.in_cluster(ip) || self.known_not_meshed(ip) {
            return Ok(Route::Plain(dst));
        }
        let trust_domain = mesh.identity().identity().id().trust_domain().to_string();
        let expected = ExpectedServer::TrustDomain(trust_domain);
        let mesh_addr = SocketAddr::new(ip, DEFAULT_MESH_PORT);
        match mesh
            .tunnel(mesh_addr, expected, dst, self.config.probe_timeout)
            .await
        {
            Ok(tunnel) => {
                mesh.metrics().probed(ProbeResult::meshed);
                Ok(Route::Mesh(tunnel))
            }
            Err(e) if e.is_absent() => {
                mesh.metrics().probed(ProbeResult::not_meshed);
                tracing::debug!(%dst, error = %e, "destination not meshed; plaintext");
                let mut cache = self.not_meshed.lock().unwrap_or_else(|p| p.into_inner());
                if cache.len() >= NEGATIVE_CACHE_MAX {
                    let now = Instant::now();
                    cache.retain(|_, until| *until > now);
                }
                cache.insert(ip, Instant::now() + self.config.probe_negative_ttl);
                Ok(Route::Plain(dst))
            }
            Err(e) => {
                mesh.metrics().probed(ProbeResult::failed);
                Err(e.into())
            }
        }
    }

    fn in_cluster(&self, ip: IpAddr) -> bool {
        self.config
            .cluster_networks
            .iter()
            .any(|n: &IpNet| n.contains(&ip))
    }

    fn known_not_meshed(&self, ip: IpAddr) -> bool {
        let mut cache = self.not_meshed.lock().unwrap_or_else(|p| p.into_inner());
        match cache.get(&ip) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                cache.remove(&ip);
                false
            }
            None => false,
        }
    }
}
