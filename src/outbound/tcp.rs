//! Opaque TCP to a discovery service: the endpoint is picked per connection.
//!
//! ```text
//! opaque connection to a service address ─▶ Balancer::pick (P2C over peak-EWMA, breakers)
//!   ─▶ connect (plain, or a mesh tunnel with the endpoint's identity)
//!        ok      ─▶ connect latency feeds the estimate, breaker success ─▶ copy ⇄ (counted as
//!                   load on the endpoint while open)
//!        refused / timed out ─▶ penalty feeds the estimate, breaker failure ─▶ another endpoint
//!                               (up to CONNECT_ATTEMPTS, preferring untried ones)
//! ```
//!
//! The service's [`crate::layers::balance::Balancer`] is the one its HTTP requests use, so HTTP
//! requests and TCP connections to one service see one picture of its endpoints: the latency
//! estimate (response time for requests, connect time for connections), the load (pending
//! requests plus open connections) and the circuit breakers. A connection that never reached
//! its endpoint (refused, connect timeout, tunnel refused by the peer proxy) is retried on
//! another: nothing was sent yet, so the app sees one connection that works.
//!
//! Metrics: `tern_tcp_*{direction="outbound"}` as for any connection,
//! `tern_circuit_transitions_total` and `tern_balancer_endpoints` for the service. Errors: the
//! last attempt's [`ConnError`] closes the connection (counted with its reason).

use std::time::Instant;

use tokio::net::TcpStream;

use super::{Outbound, ServiceDst, Target};
use crate::error::ConnError;
use crate::forward;
use crate::layers::balance::{EndpointState, OpenConnection, Tried};
use crate::layers::retry::never_reached;
use crate::metrics::{Direction, TcpLabels, Tls};
use crate::transport::connect;
use crate::transport::copy::copy_bidirectional;
use crate::transport::prefixed::PrefixedIo;

/// Endpoints tried for one connection before it is given up.
pub const CONNECT_ATTEMPTS: usize = 3;

/// Records a connect's outcome in the endpoint's breaker exactly once; dropped unrecorded (the
/// connection went away while connecting) it abandons a probe, so the endpoint is not left
/// probing for good.
struct Outcome<'a> {
    outbound: &'a Outbound,
    service: &'a str,
    endpoint: &'a EndpointState,
    recorded: bool,
}

impl Outcome<'_> {
    fn record(&mut self, success: bool) {
        self.recorded = true;
        let changed = self.endpoint.breaker().record(success, Instant::now());
        self.transition(changed);
    }

    fn transition(&self, changed: Option<crate::layers::breaker::CircuitState>) {
        if let Some(state) = changed {
            self.outbound.metrics.breaker.transition(
                self.service,
                self.endpoint.endpoint.addr,
                state,
            );
        }
    }
}

impl Drop for Outcome<'_> {
    fn drop(&mut self) {
        if !self.recorded {
            let changed = self.endpoint.breaker().abandon(Instant::now());
            self.transition(changed);
        }
    }
}

/// A connection's upstream side: a plain socket or a mesh tunnel.
enum Upstream {
    Plain(TcpStream),
    Mesh(crate::mesh::client::Tunnel),
}

impl Outbound {
    /// Serves one opaque connection to a discovery service (see the module doc).
    pub(super) async fn serve_tcp_balanced(
        &self,
        mut io: PrefixedIo<TcpStream>,
        dst: &ServiceDst,
        started: Instant,
    ) {
        let state = self.service_state(dst);
        let tried = Tried::default();
        let mut last = None;
        for _ in 0..CONNECT_ATTEMPTS {
            let endpoint = match state.balancer.pick(Some(&tried)) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(service = %dst.name, error = %e, "no endpoint for a TCP connection");
                    break;
                }
            };
            tried.push(endpoint.endpoint.addr);
            let load = OpenConnection::new(endpoint.clone());
            let mut outcome = Outcome {
                outbound: self,
                service: &dst.name,
                endpoint: &endpoint,
                recorded: false,
            };
            let t0 = Instant::now();
            match self.connect_endpoint(&endpoint).await {
                Ok(upstream) => {
                    load.connected(t0.elapsed());
                    outcome.record(true);
                    self.copy_to(&mut io, upstream, started).await;
                    drop(load);
                    return;
                }
                Err(e) => {
                    load.failed(self.config.connect_timeout);
                    outcome.record(false);
                    let again = never_reached(&e);
                    tracing::debug!(service = %dst.name, endpoint = %endpoint.endpoint.addr, error = %e, retry = again, "TCP connect to an endpoint failed");
                    last = Some(e);
                    if !again {
                        break;
                    }
                }
            }
        }
        let reason = match &last {
            Some(e) => {
                forward::log_failure(e);
                e.reason()
            }
            None => crate::error::CloseReason::ConnectError,
        };
        self.tcp.refused(Direction::outbound, reason);
    }

    async fn connect_endpoint(&self, endpoint: &EndpointState) -> Result<Upstream, ConnError> {
        match self.to_endpoint(&endpoint.endpoint)? {
            Target::Plain(dst) if self.config.require_mtls => Err(ConnError::MtlsRequired(dst)),
            Target::Plain(dst) => Ok(Upstream::Plain(
                connect::connect(dst, self.config.connect_timeout).await?,
            )),
            Target::Mesh {
                addr,
                expected,
                target,
            } => {
                let Some(mesh) = &self.mesh else {
                    return Err(ConnError::MtlsRequired(target));
                };
                let tunnel = mesh
                    .tunnel(addr, expected, target, self.config.connect_timeout)
                    .await?;
                Ok(Upstream::Mesh(tunnel))
            }
        }
    }

    async fn copy_to(&self, io: &mut PrefixedIo<TcpStream>, upstream: Upstream, started: Instant) {
        match upstream {
            Upstream::Plain(mut server) => {
                let metrics = self.tcp.conn(TcpLabels::plain(Direction::outbound));
                let counters = forward::counters(&metrics);
                let result =
                    copy_bidirectional(io, &mut server, self.config.buffer_size, &counters)
                        .await
                        .map_err(ConnError::Io);
                forward::finish(metrics, started, result);
            }
            Upstream::Mesh(mut tunnel) => {
                let metrics = self.tcp.conn(TcpLabels {
                    direction: Direction::outbound,
                    tls: Tls::Yes,
                    client_id: String::new(),
                    server_id: tunnel.server_id.to_string(),
                });
                let counters = forward::counters(&metrics);
                let result =
                    copy_bidirectional(io, &mut tunnel.io, self.config.buffer_size, &counters)
                        .await
                        .map_err(ConnError::Io);
                forward::finish(metrics, started, result);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use crate::config::{ProxyConfig, TargetMode};
    use crate::demo::metric_value;
    use crate::testing::Running;

    /// The service address: the proxy's explicit outbound target, never dialed.
    const SERVICE_ADDR: &str = "127.0.0.1:9";

    /// An echo server counting the connections it accepted.
    async fn echo() -> (SocketAddr, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let a = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        (addr, accepted)
    }

    /// A port where connections are refused: bound, never listening, held for the test.
    fn dead() -> (SocketAddr, socket2::Socket) {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("bind");
        let addr = s
            .local_addr()
            .expect("addr")
            .as_socket()
            .expect("an inet address");
        (addr, s)
    }

    fn proxy(endpoints: &[SocketAddr]) -> (Running, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("discovery.yaml");
        let mut yaml = format!(
            "services:\n  - name: echo.shop\n    addresses: [\"{SERVICE_ADDR}\"]\n    endpoints:\n"
        );
        for e in endpoints {
            yaml.push_str(&format!("      - address: \"{e}\"\n"));
        }
        std::fs::write(&file, yaml).expect("write");
        let mut c = ProxyConfig::loopback();
        c.outbound_target = TargetMode::Fixed(SERVICE_ADDR.parse().expect("addr"));
        c.discovery_file = Some(file);
        // Opaque at once: no detection wait.
        c.opaque_ports = vec!["9".parse().expect("port")];
        (Running::start(c, None), dir)
    }

    /// Opens a connection through the proxy and checks one echo round trip.
    async fn round_trip(entry: SocketAddr) -> TcpStream {
        let mut s = TcpStream::connect(entry).await.expect("connect");
        s.write_all(b"ping").await.expect("write");
        let mut back = [0u8; 4];
        s.read_exact(&mut back).await.expect("echo");
        assert_eq!(&back, b"ping");
        s
    }

    #[tokio::test]
    async fn connections_spread_across_endpoints_by_open_connections() {
        let apps = [echo().await, echo().await, echo().await];
        let addrs: Vec<SocketAddr> = apps.iter().map(|(a, _)| *a).collect();
        let (proxy, _dir) = proxy(&addrs);
        let entry = proxy.addrs.outbound[0];
        // Held open: each open connection is load on its endpoint.
        let mut open = Vec::new();
        for _ in 0..45 {
            open.push(round_trip(entry).await);
        }
        let counts: Vec<usize> = apps.iter().map(|(_, n)| n.load(Ordering::SeqCst)).collect();
        assert_eq!(counts.iter().sum::<usize>(), 45, "{counts:?}");
        // Spread, and by load: an endpoint whose connect time spiked is avoided until the
        // others carry more open connections, so the split need not be even, but no endpoint
        // takes most of them and none is left out.
        assert!(
            counts.iter().all(|n| *n >= 2) && counts.iter().all(|n| *n <= 30),
            "open connections spread: {counts:?}"
        );
        drop(open);
        proxy.stop().await;
    }

    #[tokio::test]
    async fn a_refusing_endpoint_is_retried_around_and_ejected() {
        let (dead, _hold) = dead();
        let apps = [echo().await, echo().await];
        let (proxy, _dir) = proxy(&[dead, apps[0].0, apps[1].0]);
        let entry = proxy.addrs.outbound[0];
        // After its first refusal the dead endpoint's estimate is the connect timeout, so P2C
        // picks it only when it draws it twice (about 1 in 9); 5 refusals in a row eject it.
        for _ in 0..200 {
            // Every connection works: a refused connect is retried on another endpoint.
            drop(round_trip(entry).await);
        }
        let accepted: usize = apps.iter().map(|(_, n)| n.load(Ordering::SeqCst)).sum();
        assert_eq!(accepted, 200);
        let mut m = String::new();
        for _ in 0..100 {
            m = proxy.metrics().await;
            if metric_value(&m, "tern_tcp_connections_closed_total", "reason=\"eof\"") >= 200.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let dead_label = format!("endpoint=\"{dead}\"");
        let opened = metric_value(
            &m,
            "tern_circuit_transitions_total",
            &format!("{dead_label},state=\"open\""),
        );
        assert!(opened >= 1.0, "the dead endpoint was ejected:\n{m}");
        // Out of rotation: ejected, or being probed again after its backoff.
        assert_eq!(
            metric_value(&m, "tern_balancer_endpoints", "state=\"ejected\"")
                + metric_value(&m, "tern_balancer_endpoints", "state=\"probing\""),
            1.0,
            "{m}"
        );
        assert_eq!(
            metric_value(
                &m,
                "tern_tcp_connections_closed_total",
                "reason=\"connect_refused\""
            ),
            0.0,
            "no connection failed:\n{m}"
        );
        proxy.stop().await;
    }
}
