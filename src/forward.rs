//! The per-connection path shared by both directions for opaque TCP:
//!
//! ```text
//! accepted ─▶ target (orig dst | explicit) ─▶ loop check ─▶ connect ─▶ copy both ways ─▶ close
//! ```
//!
//! Each step's failure is a [`ConnError`] whose `reason()` labels
//! `tern_tcp_connections_closed_total`; each close is one log line.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;

use crate::addr::{ClientAddr, OrigDstAddr};
use crate::config::{ProxyConfig, TargetMode};
use crate::error::{CloseReason, ConnError};
use crate::metrics::{ConnMetrics, Direction};
use crate::transport::copy::{ByteCounters, Transferred, copy_bidirectional};
use crate::transport::{connect, orig_dst};

/// What a listener needs to forward its connections: one per direction.
#[derive(Debug)]
pub struct Forwarder {
    pub direction: Direction,
    pub target: TargetMode,
    pub config: Arc<ProxyConfig>,
    /// Ports of the proxy's own listeners: an original destination on one of them is a loop.
    pub own_ports: Vec<u16>,
}

impl Forwarder {
    /// Serves one accepted connection to completion and records how it ended.
    pub async fn serve(&self, mut client: TcpStream, peer: ClientAddr, metrics: ConnMetrics) {
        let started = Instant::now();
        let counters = ByteCounters {
            read: metrics.read.clone(),
            write: metrics.write.clone(),
        };
        let result = self.forward(&mut client, peer, &counters).await;
        let reason = match &result {
            Ok((dst, t)) => {
                tracing::debug!(
                    %dst,
                    sent = t.client_to_server,
                    received = t.server_to_client,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "connection closed"
                );
                CloseReason::Eof
            }
            Err(e) => {
                // Refusals that the operator should see are warnings; a peer resetting is routine.
                match e.reason() {
                    CloseReason::IoError => tracing::debug!(error = %e, "connection failed"),
                    _ => {
                        tracing::warn!(error = %e, reason = e.reason().as_str(), "connection refused")
                    }
                }
                e.reason()
            }
        };
        metrics.closed(reason, started.elapsed());
    }

    async fn forward(
        &self,
        client: &mut TcpStream,
        peer: ClientAddr,
        counters: &ByteCounters,
    ) -> Result<(OrigDstAddr, Transferred), ConnError> {
        let dst = self.destination(client)?;
        tracing::debug!(client = %peer, %dst, "forwarding");
        client.set_nodelay(true)?;
        let mut server = connect::connect(dst, self.config.connect_timeout).await?;
        let t = copy_bidirectional(client, &mut server, self.config.buffer_size, counters).await?;
        Ok((dst, t))
    }

    /// Where this connection goes: the explicit target, or the original destination.
    fn destination(&self, client: &TcpStream) -> Result<OrigDstAddr, ConnError> {
        match self.target {
            TargetMode::Fixed(addr) => Ok(OrigDstAddr(addr)),
            TargetMode::OrigDst => {
                let dst = orig_dst::lookup(client)
                    .map_err(ConnError::OrigDst)?
                    .ok_or(ConnError::NoOrigDst)?;
                if self.is_loop(dst.0) {
                    return Err(ConnError::Loop(dst));
                }
                Ok(dst)
            }
        }
    }

    /// An original destination on one of our own ports that is this host is a loop. Inbound
    /// traffic is always addressed to this pod, so there the port alone decides.
    fn is_loop(&self, dst: SocketAddr) -> bool {
        let local_ip = dst.ip().is_loopback() || dst.ip().is_unspecified();
        self.own_ports.contains(&dst.port()) && (self.direction == Direction::inbound || local_ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn forwarder(direction: Direction) -> Forwarder {
        let cli = Cli::try_parse_from(["tern", "proxy"]).expect("parse");
        let Command::Proxy(args) = cli.command else {
            panic!("proxy");
        };
        Forwarder {
            direction,
            target: TargetMode::OrigDst,
            config: Arc::new(ProxyConfig::from_args(&args).expect("config")),
            own_ports: vec![4140, 4143, 4191],
        }
    }

    #[test]
    fn loops_are_detected() {
        let out = forwarder(Direction::outbound);
        assert!(out.is_loop("127.0.0.1:4140".parse().expect("addr")));
        assert!(
            !out.is_loop("198.18.0.2:4140".parse().expect("addr")),
            "another pod's port"
        );
        assert!(!out.is_loop("127.0.0.1:8080".parse().expect("addr")));
        let inb = forwarder(Direction::inbound);
        assert!(inb.is_loop("198.18.0.2:4140".parse().expect("addr")));
        assert!(!inb.is_loop("198.18.0.2:8080".parse().expect("addr")));
    }
}
