//! The inbound pipeline: connections from other pods to this pod's app.
//!
//! ```text
//! client pod ─▶ iptables PREROUTING ─▶ :4143 accept ─▶ orig dst (app port) ─▶ connect app ─▶ copy
//! ```
//!
//! In explicit mode (`--inbound-target`) the original-destination step is replaced by the fixed
//! target. Metrics: `tern_tcp_*{direction="inbound"}`.

use std::sync::Arc;

use crate::config::ProxyConfig;
use crate::forward::Forwarder;
use crate::metrics::Direction;

/// Builds the inbound pipeline's context.
pub fn forwarder(config: Arc<ProxyConfig>, own_ports: Vec<u16>) -> Forwarder {
    Forwarder {
        direction: Direction::inbound,
        target: config.inbound_target,
        config,
        own_ports,
    }
}
