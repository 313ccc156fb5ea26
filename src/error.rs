//! Per-connection errors and the close reasons they map to.
//!
//! Every connection ends with exactly one [`CloseReason`], logged and counted in
//! `tern_tcp_connections_closed_total{reason}`. Errors carry the typed cause; `reason()` is the
//! metric label.

use std::io;

use prometheus_client::encoding::EncodeLabelValue;

use crate::addr::OrigDstAddr;

/// Why a proxied connection closed. Label values of `tern_tcp_connections_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// Both sides finished normally.
    Eof,
    /// A side reset or failed mid-stream.
    IoError,
    /// The destination refused the connection.
    ConnectRefused,
    /// The destination did not answer within the connect timeout.
    ConnectTimeout,
    /// Any other failure to connect (unreachable network, no route, ...).
    ConnectError,
    /// The original destination is one of the proxy's own listeners.
    Loop,
    /// The connection was not redirected by iptables and no explicit target is configured.
    NoOrigDst,
    /// The listener is at `--max-connections`.
    Limit,
    /// The shutdown grace period ended with the connection still open.
    Shutdown,
    /// A TLS handshake with a peer proxy failed (bad certificate, wrong identity, not tern).
    TlsError,
    /// Inbound policy denied the client.
    Unauthorized,
    /// `--require-mtls` is set and the destination is not meshed.
    MtlsRequired,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Eof => "eof",
            CloseReason::IoError => "io_error",
            CloseReason::ConnectRefused => "connect_refused",
            CloseReason::ConnectTimeout => "connect_timeout",
            CloseReason::ConnectError => "connect_error",
            CloseReason::Loop => "loop",
            CloseReason::NoOrigDst => "no_orig_dst",
            CloseReason::Limit => "limit",
            CloseReason::Shutdown => "shutdown",
            CloseReason::TlsError => "tls_error",
            CloseReason::Unauthorized => "unauthorized",
            CloseReason::MtlsRequired => "mtls_required",
        }
    }
}

impl EncodeLabelValue for CloseReason {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// A failure that ends a connection before or during forwarding.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("connect to {0} refused")]
    ConnectRefused(OrigDstAddr),
    #[error("connect to {0} timed out")]
    ConnectTimeout(OrigDstAddr),
    #[error("connect to {0} failed: {1}")]
    Connect(OrigDstAddr, #[source] io::Error),
    #[error("original destination {0} is the proxy's own listener: refusing a loop")]
    Loop(OrigDstAddr),
    #[error("no original destination (not redirected by iptables, no explicit target)")]
    NoOrigDst,
    #[error("reading the original destination failed: {0}")]
    OrigDst(#[source] io::Error),
    #[error("forwarding failed: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Mesh(#[from] crate::mesh::client::MeshError),
    #[error("inbound policy denied the client: {0}")]
    Unauthorized(#[from] crate::inbound::policy::Denied),
    #[error("{0} is not meshed and --require-mtls is set")]
    MtlsRequired(OrigDstAddr),
    #[error("TLS handshake with a mesh client failed: {0}")]
    Handshake(#[source] io::Error),
}

impl ConnError {
    pub fn reason(&self) -> CloseReason {
        match self {
            ConnError::ConnectRefused(_) => CloseReason::ConnectRefused,
            ConnError::ConnectTimeout(_) => CloseReason::ConnectTimeout,
            ConnError::Connect(..) => CloseReason::ConnectError,
            ConnError::Loop(_) => CloseReason::Loop,
            ConnError::NoOrigDst | ConnError::OrigDst(_) => CloseReason::NoOrigDst,
            ConnError::Io(_) => CloseReason::IoError,
            ConnError::Mesh(e) => e.reason(),
            ConnError::Unauthorized(_) => CloseReason::Unauthorized,
            ConnError::MtlsRequired(_) => CloseReason::MtlsRequired,
            ConnError::Handshake(_) => CloseReason::TlsError,
        }
    }
}
