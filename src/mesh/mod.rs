//! The wire between proxies (DESIGN.md §4): HTTP/2 over mTLS to `<peer pod IP>:4143`.
//!
//! ```text
//!  outbound proxy                                            inbound proxy
//!  ┌──────────────────────────┐   TLS 1.3, ALPN tern/1     ┌──────────────────────────────┐
//!  │ client::MeshClient        │   one HTTP/2 connection    │ server::serve                 │
//!  │  pool[(peer, identity)] ──┼──────── per peer ─────────▶│  verify client → per stream:  │
//!  │  CONNECT <ip>:<port> ─────┼──── stream per TCP conn ──▶│  authorize → connect app:port │
//!  └──────────────────────────┘                            └──────────────────────────────┘
//! ```
//!
//! Each opaque TCP connection is one HTTP/2 `CONNECT` stream whose authority names the target
//! `ip:port` inside the peer pod; the server uses the port (the IP is the pod's own) and strips
//! nothing else because a tunnel carries no headers to the app. HTTP/2 flow control bounds what
//! either side buffers per stream ([`STREAM_WINDOW`]), so a slow app slows the sender.
//!
//! Metrics: `tern_mesh_connections_total{direction}`, `tern_mesh_connections_open{direction}`,
//! `tern_mesh_handshake_failures_total{direction}`, `tern_mesh_probes_total{result}`.

pub mod client;
pub mod server;
pub mod wire;

#[cfg(test)]
mod pipeline_tests;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::metrics::{Direction, DirectionLabels};

/// Per-stream HTTP/2 flow-control window: the most either proxy buffers for one tunnel.
pub const STREAM_WINDOW: u32 = 256 * 1024;
/// Per-connection HTTP/2 window, shared by every stream to one peer.
pub const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
/// Concurrent streams a peer may open on one mesh connection: every TCP connection and request
/// from one pod to another shares it, so this is well above a client-facing limit.
pub const MAX_STREAMS: u32 = 2000;
/// Header on error responses saying why the proxy refused a stream.
pub const PROXY_ERROR_HEADER: &str = "tern-proxy-error";

/// Outcome of probing a destination's mesh port. Label values of `tern_mesh_probes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ProbeResult {
    /// A tern proxy answered and proved an identity of our trust domain.
    meshed,
    /// Nothing listens on the mesh port (refused or no answer within the probe timeout).
    not_meshed,
    /// Something listens but the TLS handshake failed: the connection fails, no fallback.
    failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ProbeLabels {
    result: ProbeResult,
}

/// Mesh transport metrics.
#[derive(Debug, Clone, Default)]
pub struct MeshMetrics {
    connections: Family<DirectionLabels, Counter>,
    open: Family<DirectionLabels, Gauge>,
    handshake_failures: Family<DirectionLabels, Counter>,
    probes: Family<ProbeLabels, Counter>,
}

impl MeshMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = MeshMetrics::default();
        registry.register(
            "mesh_connections",
            "Proxy-to-proxy mTLS connections established",
            m.connections.clone(),
        );
        registry.register(
            "mesh_connections_open",
            "Proxy-to-proxy mTLS connections open now",
            m.open.clone(),
        );
        registry.register(
            "mesh_handshake_failures",
            "Proxy-to-proxy TLS handshakes that failed (bad certificate, wrong identity, not TLS)",
            m.handshake_failures.clone(),
        );
        registry.register(
            "mesh_probes",
            "Probes of a destination's mesh port, by result",
            m.probes.clone(),
        );
        m
    }

    pub(crate) fn opened(&self, direction: Direction) -> OpenGuard {
        let labels = DirectionLabels { direction };
        self.connections.get_or_create(&labels).inc();
        let gauge = self.open.get_or_create(&labels).clone();
        gauge.inc();
        OpenGuard(gauge)
    }

    pub(crate) fn handshake_failed(&self, direction: Direction) {
        self.handshake_failures
            .get_or_create(&DirectionLabels { direction })
            .inc();
    }

    pub(crate) fn probed(&self, result: ProbeResult) {
        self.probes.get_or_create(&ProbeLabels { result }).inc();
    }
}

/// Decrements the open-connections gauge when the mesh connection ends.
#[derive(Debug)]
pub(crate) struct OpenGuard(Gauge);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
