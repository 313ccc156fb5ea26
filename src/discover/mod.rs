//! Discovery: which endpoints back a destination, and what identity each has.
//!
//! Sources sit behind [`Discovery`]: today the YAML **file** source ([`file`]), hot-reloaded.
//! A destination that no source knows resolves to `None`, and the caller forwards it to its
//! original address (probing the mesh port first when it is in the cluster's networks).
//!
//! Metrics: `tern_discovery_reloads_total`, `tern_discovery_reload_failures_total`,
//! `tern_discovery_services` (see [`file::FileMetrics`]).

pub mod file;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

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
}

/// The current view of every source, swapped atomically on reload.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// Service address (VIP:port) or endpoint address → resolution.
    by_addr: std::collections::HashMap<SocketAddr, Resolved>,
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
}

impl Discovery {
    pub fn new(snapshot: Snapshot) -> Self {
        Discovery {
            current: Arc::new(RwLock::new(Arc::new(snapshot))),
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
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(snapshot);
    }
}
