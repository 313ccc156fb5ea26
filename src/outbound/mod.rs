//! The outbound pipeline: connections from this pod's app to anywhere.
//!
//! ```text
//! app ─▶ :4140 accept ─▶ destination (orig dst | explicit) ─▶ loop check ─▶ route ─▶ detect
//!   detect: HTTP/1 or HTTP/2 ─▶ http::serve (per request: metrics ─▶ proxy ─▶ mesh or plain)
//!           a discovery service address: per request timeout ─▶ retry ─▶ balance ─▶ breaker
//!                                        ─▶ endpoint (mesh or plain), see `http`
//!           anything else    ─▶ one tunnel or one plain connection, bytes copied both ways
//!                              (to a service address: endpoint picked per connection, `tcp`)
//!   route: discovery knows it ─▶ endpoint with identity ─▶ mesh tunnel (mTLS, exact identity)
//!                              └▶ endpoint without identity ─▶ plain
//!          unknown, in --cluster-networks ─▶ probe <ip>:4143 ─▶ meshed ─▶ mesh tunnel (trust domain)
//!                                                            └▶ absent ─▶ plain (negative cache)
//!          unknown, elsewhere ─▶ plain
//!   --require-mtls: plain routes are refused
//! ```
//!
//! Metrics: `tern_tcp_*{direction="outbound"}` (`tls`, `server_id` when meshed),
//! `tern_mesh_probes_total`, `tern_mesh_*{direction="outbound"}`; per discovery service
//! `tern_balancer_endpoints`, `tern_circuit_transitions_total`, `tern_retries_total`
//! (see `crate::layers`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ipnet::IpNet;
use tokio::net::TcpStream;

use crate::addr::{ClientAddr, OrigDstAddr};
use crate::config::ProxyConfig;
use crate::detect::{self, DetectMetrics, Served};
use crate::discover::{DEFAULT_MESH_PORT, Discovery, Endpoint, ServicePolicy, Watched};
use crate::error::{CloseReason, ConnError};
use crate::forward;
use crate::http::client::Upstreams;
use crate::layers::balance::{BalanceMetrics, Balancer};
use crate::layers::breaker::BreakerMetrics;
use crate::layers::http_metrics::HttpMetrics;
use crate::layers::retry::{Budget, RetryMetrics};
use crate::mesh::ProbeResult;
use crate::mesh::client::{MeshClient, MeshError};
use crate::metrics::{Direction, TcpLabels, TcpMetrics, Tls};
use crate::routes::RouteStore;
use crate::tls::ExpectedServer;
use crate::transport::copy::copy_bidirectional;
use crate::transport::prefixed::PrefixedIo;

pub mod http;
pub mod tcp;

/// Metrics of the outbound pipeline beyond TCP.
#[derive(Debug, Clone)]
pub struct OutboundMetrics {
    pub detect: DetectMetrics,
    pub http: HttpMetrics,
    pub balance: BalanceMetrics,
    pub breaker: BreakerMetrics,
    pub retry: RetryMetrics,
    /// The app-facing HTTP server's limits and their counters (`crate::http::limits`).
    pub limits: crate::http::limits::ServerLimits,
}

/// Bound on remembered not-meshed destinations; expired entries are pruned when it is reached.
const NEGATIVE_CACHE_MAX: usize = 4096;

/// Everything the outbound pipeline needs, shared by its connections.
#[derive(Debug)]
pub struct Outbound {
    pub config: Arc<ProxyConfig>,
    pub tcp: TcpMetrics,
    pub metrics: OutboundMetrics,
    pub discovery: Option<Discovery>,
    /// Pooled plaintext HTTP clients, per destination.
    pub upstreams: Upstreams,
    /// None: no identity configured; everything goes out in plaintext.
    pub mesh: Option<MeshClient>,
    /// The proxy's own ports: an original destination on one of them (locally) is a loop.
    pub own_ports: Vec<u16>,
    /// Destinations whose mesh port recently did not answer, and until when to believe it.
    not_meshed: Mutex<HashMap<IpAddr, Instant>>,
    /// Round-robin cursor over a service's endpoints: the connection's provisional target
    /// (HTTP requests to a service are balanced per request, opaque connections per
    /// connection in `tcp`).
    next: AtomicUsize,
    /// Per discovery service: its balancer (endpoint load and breakers) and retry budget,
    /// shared by every connection to it. Bounded by the services discovery knows.
    services: Mutex<HashMap<String, Arc<ServiceState>>>,
    /// Gateway API routes (`--routes-file`); empty: every service uses its own stack.
    pub routes: RouteStore,
}

/// What every connection to one discovery service shares.
#[derive(Debug)]
pub struct ServiceState {
    pub balancer: Arc<Balancer>,
    pub budget: Arc<Budget>,
}

/// A destination that is a discovery service address: its HTTP requests go through the
/// per-request resilience stack.
#[derive(Debug, Clone)]
pub struct ServiceDst {
    pub addr: OrigDstAddr,
    pub name: String,
    pub policy: Arc<ServicePolicy>,
}

/// Where one connection (or its requests) goes.
#[derive(Debug, Clone)]
pub enum Target {
    /// Plaintext to this address.
    Plain(OrigDstAddr),
    /// Through the peer proxy at `addr`, which must prove `expected`, to `target` in its pod.
    Mesh {
        addr: SocketAddr,
        expected: ExpectedServer,
        target: OrigDstAddr,
    },
}

/// A routed destination: the target and, when discovery knows it, the service name.
#[derive(Debug, Clone)]
pub struct Routed {
    pub target: Target,
    pub service: Option<String>,
    /// Present for a service address: HTTP picks the endpoint per request.
    pub balanced: Option<ServiceDst>,
    /// The discovery answer this route came from; held for the connection's lifetime so the
    /// destination's watches stay up while it is in use. Boxed: it rides in every
    /// connection's future, and is only held, never read, on the data path.
    pub watched: Option<Box<Watched>>,
}

impl Outbound {
    pub fn new(
        config: Arc<ProxyConfig>,
        tcp: TcpMetrics,
        metrics: OutboundMetrics,
        discovery: Option<Discovery>,
        mesh: Option<MeshClient>,
        own_ports: Vec<u16>,
    ) -> Self {
        Outbound {
            upstreams: Upstreams::new(config.connect_timeout, config.http1_header_case),
            config,
            tcp,
            metrics,
            discovery,
            mesh,
            own_ports,
            not_meshed: Mutex::new(HashMap::new()),
            next: AtomicUsize::new(0),
            services: Mutex::new(HashMap::new()),
            routes: RouteStore::default(),
        }
    }

    /// Routes requests to services by `routes` (see `crate::routes`).
    pub fn with_routes(mut self, routes: RouteStore) -> Self {
        self.routes = routes;
        self
    }

    /// Serves one accepted connection to completion.
    pub async fn serve(self: Arc<Self>, stream: TcpStream, client: ClientAddr) {
        let started = Instant::now();
        let routed = async {
            let dst = forward::destination(&stream, self.config.outbound_target)?
                .ok_or(ConnError::NoOrigDst)?;
            if forward::is_loop(Direction::outbound, &self.own_ports, dst) {
                return Err(ConnError::Loop(dst));
            }
            let routed = Box::pin(self.route(dst)).await?;
            tracing::debug!(%client, %dst, target = ?routed.target, "routed");
            Ok((dst, routed))
        }
        .await;
        let (dst, routed) = match routed {
            Ok(r) => r,
            Err(e) => {
                forward::log_failure(&e);
                self.tcp.refused(Direction::outbound, e.reason());
                return;
            }
        };
        let _ = stream.set_nodelay(true);
        let opaque_port = self.config.is_opaque_port(dst.0.port());
        let served = detect::detect_recorded(
            stream,
            opaque_port,
            self.config.detect_timeout,
            Direction::outbound,
            &self.metrics.detect,
        )
        .await;
        let io = match served {
            Ok(Served::Http(io, version)) => {
                // Boxed: the HTTP state lives on the heap only for HTTP connections.
                Box::pin(http::serve(self.clone(), io, version, routed, started)).await;
                return;
            }
            Ok(Served::Opaque(io)) => io,
            Err(e) => {
                tracing::debug!(error = %e, "client went away during detection");
                self.tcp.refused(Direction::outbound, CloseReason::IoError);
                return;
            }
        };
        match &routed.balanced {
            // A service address: the endpoint is picked per connection (see `tcp`).
            Some(dst) => Box::pin(self.serve_tcp_balanced(io, dst, started)).await,
            None => Box::pin(self.serve_tcp(io, routed.target, started)).await,
        }
    }

    async fn serve_tcp(&self, mut io: PrefixedIo<TcpStream>, target: Target, started: Instant) {
        match target {
            Target::Plain(dst) => {
                let metrics = self.tcp.conn(TcpLabels::plain(Direction::outbound));
                let counters = forward::counters(&metrics);
                let result = forward::plain(&mut io, dst, &self.config, &counters).await;
                forward::finish(metrics, started, result);
            }
            Target::Mesh {
                addr,
                expected,
                target,
            } => {
                let Some(mesh) = &self.mesh else {
                    // route() only returns Mesh targets when a mesh client exists.
                    return;
                };
                let mut tunnel = match mesh
                    .tunnel(addr, expected, target, self.config.connect_timeout)
                    .await
                {
                    Ok(t) => t,
                    Err(e) => {
                        let e = ConnError::from(e);
                        forward::log_failure(&e);
                        self.tcp.refused(Direction::outbound, e.reason());
                        return;
                    }
                };
                let metrics = self.tcp.conn(TcpLabels {
                    direction: Direction::outbound,
                    tls: Tls::Yes,
                    client_id: String::new(),
                    server_id: tunnel.server_id.to_string(),
                });
                let counters = forward::counters(&metrics);
                let result =
                    copy_bidirectional(&mut io, &mut tunnel.io, self.config.buffer_size, &counters)
                        .await
                        .map_err(ConnError::Io);
                forward::finish(metrics, started, result);
            }
        }
    }

    /// Decides where `dst` goes: discovery first (which may wait for a first list, bounded by
    /// `--discovery-timeout`), then a mesh-port probe inside the cluster.
    pub async fn route(&self, dst: OrigDstAddr) -> Result<Routed, ConnError> {
        let watched = match &self.discovery {
            Some(d) => d.lookup(dst.0).await,
            None => None,
        };
        let resolved = watched.as_ref().and_then(Watched::current);
        let watched = watched.map(Box::new);
        let routed = match resolved {
            Some(r) if !r.endpoints.is_empty() => {
                let i = self.next.fetch_add(1, Ordering::Relaxed) % r.endpoints.len();
                let balanced = match (&r.service, r.policy) {
                    (Some(name), Some(policy)) => Some(ServiceDst {
                        addr: dst,
                        name: name.clone(),
                        policy,
                    }),
                    _ => None,
                };
                Routed {
                    target: self.to_endpoint(&r.endpoints[i])?,
                    service: r.service,
                    balanced,
                    watched,
                }
            }
            // A Service discovery knows, with no endpoints right now: as it came (kube-proxy
            // refuses it too), never probed (a VIP has no mesh port).
            Some(r) => Routed {
                target: Target::Plain(dst),
                service: r.service,
                balanced: None,
                watched,
            },
            None => Routed {
                target: self.to_unknown(dst).await?,
                service: None,
                balanced: None,
                watched,
            },
        };
        match routed.target {
            Target::Plain(dst) if self.config.require_mtls => Err(ConnError::MtlsRequired(dst)),
            _ => Ok(routed),
        }
    }

    /// The shared state of a discovery service, made on first use. Its endpoints are looked up
    /// in discovery on each request, so a reload applies while traffic flows.
    pub fn service_state(&self, dst: &ServiceDst) -> Arc<ServiceState> {
        let mut services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        // Per service *address*: a Kubernetes Service's ports (and address families) have
        // different endpoints.
        let key = format!("{}@{}", dst.name, dst.addr.0);
        if let Some(s) = services.get(&key) {
            return s.clone();
        }
        let discovery = self.discovery.clone().unwrap_or_default();
        let addr = dst.addr.0;
        let source = Arc::new(move || {
            discovery
                .resolve(addr)
                .map_or_else(|| Arc::from(Vec::new()), |r| r.endpoints)
        });
        let state = Arc::new(ServiceState {
            balancer: Arc::new(
                Balancer::new(Arc::from(dst.name.as_str()), source, &self.metrics.balance)
                    .with_transitions(self.metrics.breaker.clone()),
            ),
            budget: Arc::new(Budget::default()),
        });
        services.insert(key, state.clone());
        state
    }

    fn to_endpoint(&self, ep: &Endpoint) -> Result<Target, ConnError> {
        let target = OrigDstAddr(ep.addr);
        match (&ep.identity, ep.mesh_addr(), &self.mesh) {
            (Some(id), Some(addr), Some(_)) => Ok(Target::Mesh {
                addr,
                expected: ExpectedServer::Exact(id.clone()),
                target,
            }),
            (Some(id), _, None) => {
                // Discovery says it is meshed but we have no identity to speak mTLS with:
                // never downgrade silently.
                Err(ConnError::Mesh(MeshError::Handshake {
                    addr: ep.addr,
                    expected: id.to_string(),
                    source: std::io::Error::other("this proxy has no identity (--identity-dir)"),
                }))
            }
            _ => Ok(Target::Plain(target)),
        }
    }

    async fn to_unknown(&self, dst: OrigDstAddr) -> Result<Target, ConnError> {
        let Some(mesh) = &self.mesh else {
            return Ok(Target::Plain(dst));
        };
        let ip = dst.0.ip();
        if !self.in_cluster(ip) || self.known_not_meshed(ip) {
            return Ok(Target::Plain(dst));
        }
        let trust_domain = mesh.identity().identity().id().trust_domain().to_string();
        let expected = ExpectedServer::TrustDomain(trust_domain);
        let addr = SocketAddr::new(ip, DEFAULT_MESH_PORT);
        match mesh
            .connection(addr, expected.clone(), self.config.probe_timeout)
            .await
        {
            Ok(_) => {
                mesh.metrics().probed(ProbeResult::meshed);
                Ok(Target::Mesh {
                    addr,
                    expected,
                    target: dst,
                })
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
                Ok(Target::Plain(dst))
            }
            Err(e) => {
                mesh.metrics().probed(ProbeResult::failed);
                Err(e.into())
            }
        }
    }

    /// Whether `ip` may have a mesh port: in the cluster's networks, not a Service VIP.
    fn in_cluster(&self, ip: IpAddr) -> bool {
        let within = |nets: &[IpNet]| nets.iter().any(|n| n.contains(&ip));
        within(&self.config.cluster_networks) && !within(&self.config.service_networks)
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
