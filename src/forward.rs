//! Steps of the per-connection path shared by both directions:
//!
//! ```text
//! accepted ─▶ destination (explicit | orig dst, loop check) ─▶ connect ─▶ copy ⇄ ─▶ finish
//! ```
//!
//! Each step's failure is a [`ConnError`] whose `reason()` labels
//! `tern_tcp_connections_closed_total`; [`finish`] writes the one log line and metric per close.

use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::addr::OrigDstAddr;
use crate::config::{ProxyConfig, TargetMode};
use crate::error::{CloseReason, ConnError};
use crate::metrics::{ConnMetrics, Direction};
use crate::transport::copy::{ByteCounters, Transferred, copy_bidirectional};
use crate::transport::{connect, orig_dst};

/// Where an accepted connection goes: the explicit target, or its original destination.
/// `Ok(None)`: not redirected and no explicit target.
pub fn destination(
    client: &TcpStream,
    target: TargetMode,
) -> Result<Option<OrigDstAddr>, ConnError> {
    match target {
        TargetMode::Fixed(addr) => Ok(Some(OrigDstAddr(addr))),
        TargetMode::OrigDst => orig_dst::lookup(client).map_err(ConnError::OrigDst),
    }
}

/// An original destination on one of our own ports that is this host is a loop. Inbound
/// traffic is always addressed to this pod, so there the port alone decides.
pub fn is_loop(direction: Direction, own_ports: &[u16], dst: OrigDstAddr) -> bool {
    let local_ip = dst.0.ip().is_loopback() || dst.0.ip().is_unspecified();
    own_ports.contains(&dst.0.port()) && (direction == Direction::inbound || local_ip)
}

/// Connects to `dst` in plaintext and copies both ways until both sides finish.
pub async fn plain<C>(
    client: &mut C,
    dst: OrigDstAddr,
    config: &ProxyConfig,
    counters: &ByteCounters,
) -> Result<Transferred, ConnError>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let mut server = connect::connect(dst, config.connect_timeout).await?;
    Ok(copy_bidirectional(client, &mut server, config.buffer_size, counters).await?)
}

/// Counters of one connection, for the copy loop.
pub fn counters(metrics: &ConnMetrics) -> ByteCounters {
    ByteCounters {
        read: metrics.read.clone(),
        write: metrics.write.clone(),
    }
}

/// Logs how a connection ended and records it: one line and one close per connection.
pub fn finish(metrics: ConnMetrics, started: Instant, result: Result<Transferred, ConnError>) {
    let reason = match &result {
        Ok(t) => {
            tracing::debug!(
                sent = t.client_to_server,
                received = t.server_to_client,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "connection closed"
            );
            CloseReason::Eof
        }
        Err(e) => {
            log_failure(e);
            e.reason()
        }
    };
    metrics.closed(reason, started.elapsed());
}

/// Refusals the operator should see are warnings; a peer resetting is routine.
pub fn log_failure(e: &ConnError) {
    match e.reason() {
        CloseReason::IoError => tracing::debug!(error = %e, "connection failed"),
        reason => tracing::warn!(error = %e, reason = reason.as_str(), "connection refused"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dst(s: &str) -> OrigDstAddr {
        OrigDstAddr(s.parse().expect("addr"))
    }

    #[test]
    fn loops_are_detected() {
        let own = [4140, 4143, 4191];
        let out = Direction::outbound;
        assert!(is_loop(out, &own, dst("127.0.0.1:4140")));
        assert!(
            !is_loop(out, &own, dst("198.18.0.2:4140")),
            "another pod's port"
        );
        assert!(!is_loop(out, &own, dst("127.0.0.1:8080")));
        let inb = Direction::inbound;
        assert!(is_loop(inb, &own, dst("198.18.0.2:4140")));
        assert!(!is_loop(inb, &own, dst("198.18.0.2:8080")));
    }
}
