//! Discovery: which endpoints back a destination, and what identity each has.
//!
//! Sources sit behind [`Discovery`]: today the YAML **file** source ([`file`]), hot-reloaded,
//! whose services may take their endpoints from **DNS** records ([`dns`], re-resolved on TTL).
//! A destination that no source knows resolves to `None`, and the caller forwards it to its
//! original address (probing the mesh port first when it is in the cluster's networks).
//!
//! Metrics: `tern_discovery_reloads_total`, `tern_discovery_reload_failures_total`,
//! `tern_discovery_services` (see [`file::FileMetrics`]); `tern_dns_*` (see [`dns::DnsMetrics`]).

pub mod dns;
pub mod file;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::tls::SpiffeId;

/// The port a meshed pod's proxy accepts mesh connections on (DESIGN.md §2).
pub const DEFAULT_MESH_PORT: u16 = 4143;

/// One backend of a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Where the app listens (pod IP and target port).
    pub addr: SocketAddr,
    /// Present: the endpoint is meshed and must present exactly this identity.
    pub identity: Option<SpiffeId>,
    /// Relative weight for load balancing.
    pub weight: u32,
    /// The port its proxy accepts mesh connections on (4143 unless the file says otherwise).
    pub mesh_port: u16,
}

impl Endpoint {
    /// The address of this endpoint's proxy, when it is meshed.
    pub fn mesh_addr(&self) -> Option<SocketAddr> {
        self.identity
            .as_ref()
            .map(|_| SocketAddr::new(self.addr.ip(), self.mesh_port))
    }
}

/// What a destination resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The service name (`name.namespace`) when the destination is a service.
    pub service: Option<String>,
    pub endpoints: Arc<[Endpoint]>,
    /// Present when the destination is a service address: requests to it go through the
    /// per-request resilience stack (balance, breaker, retry, timeout) with this policy.
    /// Absent for an endpoint dialed directly.
    pub policy: Option<Arc<ServicePolicy>>,
}

/// Per-service request policy (the discovery file's `timeout` and `retry`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServicePolicy {
    /// Whole-request timeout (until response headers, retries included); `None`: the
    /// `--request-timeout` default applies.
    pub timeout: Option<Duration>,
    /// Retries on responses; `None`: only requests that never reached a server are retried.
    pub retry: Option<RetryPolicy>,
}

/// When to retry a request whose response came back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub on: Vec<RetryOn>,
    /// Extra attempts after the first (Gateway API `retry.attempts` semantics).
    pub attempts: u32,
}

/// One retry condition: an HTTP status class, a status, or a gRPC status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOn {
    /// Any 5xx status.
    Server5xx,
    Status(u16),
    /// A gRPC status code (from a trailers-only response's headers).
    Grpc(u32),
}

impl std::str::FromStr for RetryOn {
    type Err = ();

    /// `5xx`, a status code (`503`), or a gRPC code name (`unavailable`, `deadline-exceeded`,
    /// `resource-exhausted`, `internal`, `unknown`, `aborted`, `cancelled`).
    fn from_str(s: &str) -> Result<Self, ()> {
        let s = s.trim().to_ascii_lowercase().replace('_', "-");
        if s == "5xx" {
            return Ok(RetryOn::Server5xx);
        }
        if let Ok(code) = s.parse::<u16>() {
            return (100..=599)
                .contains(&code)
                .then_some(RetryOn::Status(code))
                .ok_or(());
        }
        let grpc = match s.as_str() {
            "cancelled" | "canceled" => 1,
            "unknown" => 2,
            "deadline-exceeded" => 4,
            "resource-exhausted" => 8,
            "aborted" => 10,
            "internal" => 13,
            "unavailable" => 14,
            _ => return Err(()),
        };
        Ok(RetryOn::Grpc(grpc))
    }
}

/// The current view of every source, swapped atomically on reload.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// Service address (VIP:port) or endpoint address → resolution.
    by_addr: std::collections::HashMap<SocketAddr, Resolved>,
    /// Services whose endpoints come (partly) from DNS: [`Discovery`] adds their records.
    dns: Vec<dns::DnsService>,
}

impl Snapshot {
    pub fn resolve(&self, dst: SocketAddr) -> Option<Resolved> {
        self.by_addr.get(&dst).cloned()
    }

    pub fn len(&self) -> usize {
        self.by_addr.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_addr.is_empty()
    }
}

/// Shared handle to the current snapshot; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Discovery {
    current: Arc<RwLock<Arc<Snapshot>>>,
    /// The snapshot as its source gave it and the DNS records added to it; `current` is
    /// their composition.
    dns: Arc<Mutex<dns::Overlay>>,
}

impl Discovery {
    pub fn new(snapshot: Snapshot) -> Self {
        let overlay = dns::Overlay::new(snapshot);
        Discovery {
            current: Arc::new(RwLock::new(overlay.compose())),
            dns: Arc::new(Mutex::new(overlay)),
        }
    }

    /// Resolves an original destination. `None`: unknown to discovery.
    pub fn resolve(&self, dst: SocketAddr) -> Option<Resolved> {
        self.snapshot().resolve(dst)
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        // A poisoned lock only means a writer panicked mid-swap of an Arc: the value is intact.
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn replace(&self, snapshot: Snapshot) {
        let mut overlay = self.dns.lock().unwrap_or_else(|p| p.into_inner());
        overlay.set_base(snapshot);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = overlay.compose();
    }

    /// The DNS names the current snapshot takes endpoints from.
    pub fn dns_names(&self) -> Vec<dns::DnsName> {
        self.dns.lock().unwrap_or_else(|p| p.into_inner()).names()
    }

    /// New records for `name`; true when they changed the snapshot.
    pub(crate) fn set_dns_records(
        &self,
        name: &dns::DnsName,
        ips: Arc<[std::net::IpAddr]>,
    ) -> bool {
        let mut overlay = self.dns.lock().unwrap_or_else(|p| p.into_inner());
        if !overlay.set_records(name, ips) {
            return false;
        }
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = overlay.compose();
        true
    }
}
