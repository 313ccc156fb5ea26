//! Discovery: which endpoints back a destination, and what identity each has.
//!
//! Sources sit behind [`Discovery`]: the YAML **file** source ([`file`]), hot-reloaded, whose
//! services may take their endpoints from **DNS** records ([`dns`], re-resolved on TTL), and the
//! **Kubernetes** source ([`kube`]): Services and EndpointSlices watched through the API server,
//! lazily, per destination. A destination that no source knows resolves to `None`, and the
//! caller forwards it to its original address (probing the mesh port first when it is in the
//! cluster's networks). The file wins where both know a destination.
//!
//! The interface:
//! - [`Discovery::lookup`] (async) resolves an original destination to a [`Watched`]: the
//!   current [`Resolved`] and its changes (a `tokio::sync::watch` stream). The Kubernetes source
//!   may wait here for its first list, bounded by `--discovery-timeout`; afterwards answers
//!   come from the watched cache. Holding the [`Watched`] keeps the destination's watches
//!   running; they stop after `--discovery-idle-timeout` without holders or lookups.
//! - [`Discovery::lookup_authority`] does the same for an HTTP authority (`name`, `name.ns`,
//!   `name.ns.svc`, `name.ns.svc.<cluster-domain>`, with or without port).
//! - [`Discovery::resolve`] (sync) answers from what is already known, without waiting or
//!   starting watches: the per-request path (the balancer's endpoint source) uses it.
//!
//! Metrics: `tern_discovery_reloads_total`, `tern_discovery_reload_failures_total`,
//! `tern_discovery_addresses` (see [`file::FileMetrics`]); `tern_dns_*` (see
//! [`dns::DnsMetrics`]); the Kubernetes source's in [`kube::KubeMetrics`].

pub mod dns;
pub mod file;
pub mod kube;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

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

    /// The service address of `service` (`name.namespace`) on `port`, with its resolution: how
    /// a route's backendRef finds its Service. Several addresses on that port: the lowest.
    pub fn find_service(&self, service: &str, port: u16) -> Option<(SocketAddr, Resolved)> {
        self.by_addr
            .iter()
            .filter(|(addr, r)| {
                addr.port() == port && r.policy.is_some() && r.service.as_deref() == Some(service)
            })
            .min_by_key(|(addr, _)| **addr)
            .map(|(addr, r)| (*addr, r.clone()))
    }

    pub fn is_empty(&self) -> bool {
        self.by_addr.is_empty()
    }
}

/// Shared handle to every configured source; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Discovery {
    /// The file source's current snapshot (empty without a file).
    current: Arc<watch::Sender<Arc<Snapshot>>>,
    /// The Kubernetes source, when on.
    kube: Option<kube::KubeDiscovery>,
    /// The snapshot as the file gave it and the DNS records added to it; `current` is their
    /// composition.
    dns: Arc<Mutex<dns::Overlay>>,
}

impl Discovery {
    /// A discovery of one fixed or file-fed snapshot.
    pub fn new(snapshot: Snapshot) -> Self {
        let overlay = dns::Overlay::new(snapshot);
        Discovery {
            current: Arc::new(watch::Sender::new(overlay.compose())),
            kube: None,
            dns: Arc::new(Mutex::new(overlay)),
        }
    }

    /// Adds the Kubernetes source (consulted after the snapshot).
    pub fn with_kube(mut self, kube: kube::KubeDiscovery) -> Self {
        self.kube = Some(kube);
        self
    }

    /// The Kubernetes source, for modules that start their own watches on its client.
    pub fn kube(&self) -> Option<&kube::KubeDiscovery> {
        self.kube.as_ref()
    }

    /// Resolves an original destination from what is known now, without waiting or starting
    /// watches. `None`: unknown (or not yet watched).
    pub fn resolve(&self, dst: SocketAddr) -> Option<Resolved> {
        self.snapshot()
            .resolve(dst)
            .or_else(|| self.kube.as_ref().and_then(|k| k.resolve(dst)))
    }

    /// Resolves an original destination and follows its changes; the Kubernetes source starts
    /// the destination's watches and may wait for their first list (`--discovery-timeout`).
    /// `None`: unknown to every source.
    pub async fn lookup(&self, dst: SocketAddr) -> Option<Watched> {
        if self.snapshot().resolve(dst).is_some() {
            return Some(Watched(WatchedInner::Snapshot {
                rx: self.current.subscribe(),
                dst,
            }));
        }
        let kube = self.kube.as_ref()?;
        kube.lookup(dst)
            .await
            .map(|rx| Watched(WatchedInner::Kube(rx)))
    }

    /// Resolves an HTTP authority (`name[.ns[.svc[.<cluster-domain>]]][:port]`, `port` when it
    /// names none) to a Service of the Kubernetes source and follows its changes.
    pub async fn lookup_authority(&self, authority: &str, port: u16) -> Option<Watched> {
        let kube = self.kube.as_ref()?;
        kube.lookup_authority(authority, port)
            .await
            .map(|rx| Watched(WatchedInner::Kube(rx)))
    }

    /// See [`Snapshot::find_service`].
    pub fn find_service(&self, service: &str, port: u16) -> Option<(SocketAddr, Resolved)> {
        self.snapshot().find_service(service, port)
    }

    /// A route backend (`name.namespace` on `port`): its service address and policy, from the
    /// file first, then Kubernetes (whose watches run while the returned guard lives).
    pub fn find_backend(
        &self,
        service: &str,
        port: u16,
    ) -> Option<(SocketAddr, Arc<ServicePolicy>, Option<kube::BackendGuard>)> {
        if let Some((addr, r)) = self.find_service(service, port) {
            return Some((addr, r.policy?, None));
        }
        let (addr, policy, guard) = self.kube.as_ref()?.find_backend(service, port)?;
        Some((addr, policy, Some(guard)))
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.borrow().clone()
    }

    pub(crate) fn replace(&self, snapshot: Snapshot) {
        let mut overlay = self.dns.lock().unwrap_or_else(|p| p.into_inner());
        overlay.set_base(snapshot);
        self.current.send_replace(overlay.compose());
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
        self.current.send_replace(overlay.compose());
        true
    }
}

/// A resolved destination that stays current: [`Watched::current`] is the latest resolution,
/// [`Watched::changed`] waits for the next one. Holding it keeps the destination watched.
#[derive(Debug, Clone)]
pub struct Watched(WatchedInner);

#[derive(Debug, Clone)]
enum WatchedInner {
    /// The file source: the destination looked up in the current snapshot.
    Snapshot {
        rx: watch::Receiver<Arc<Snapshot>>,
        dst: SocketAddr,
    },
    /// The Kubernetes source: one channel per destination (service, port, address family).
    Kube(watch::Receiver<Option<Resolved>>),
}

/// The source behind a [`Watched`] went away (the proxy is shutting down).
#[derive(Debug, thiserror::Error)]
#[error("discovery source closed")]
pub struct SourceClosed;

impl Watched {
    /// The latest resolution; `None` when the destination is no longer known (a Service
    /// deleted, a file entry removed).
    pub fn current(&self) -> Option<Resolved> {
        match &self.0 {
            WatchedInner::Snapshot { rx, dst } => rx.borrow().resolve(*dst),
            WatchedInner::Kube(rx) => rx.borrow().clone(),
        }
    }

    /// Waits until the resolution may have changed (the file source wakes on every reload).
    pub async fn changed(&mut self) -> Result<(), SourceClosed> {
        match &mut self.0 {
            WatchedInner::Snapshot { rx, .. } => rx.changed().await.map_err(|_| SourceClosed),
            WatchedInner::Kube(rx) => rx.changed().await.map_err(|_| SourceClosed),
        }
    }
}
