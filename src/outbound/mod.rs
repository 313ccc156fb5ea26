//! The outbound pipeline: connections from this pod's app to anywhere.
//!
//! ```text
//! app ─▶ iptables OUTPUT ─▶ :4140 accept ─▶ orig dst ─▶ loop check ─▶ connect dst ─▶ copy
//! ```
//!
//! In explicit mode (`--outbound-target`) every connection goes to the fixed target.
//! Metrics: `tern_tcp_*{direction="outbound"}`.

use std::sync::Arc;

use crate::config::ProxyConfig;
use crate::forward::Forwarder;
use crate::metrics::Direction;

/// Builds the outbound pipeline's context.
pub fn forwarder(config: Arc<ProxyConfig>, own_ports: Vec<u16>) -> Forwarder {
    Forwarder {
        direction: Direction::outbound,
        target: config.outbound_target,
        config,
        own_ports,
    }
}
