//! The current identity and the rustls configs built from it, swapped atomically on reload.
//!
//! [`IdentityStore`] holds one snapshot: `Arc<Identity>`, the mesh server config, and a cache of
//! client configs keyed by [`ExpectedServer`]. Readers clone `Arc`s out of a `RwLock` held for a
//! pointer copy; a reload builds a complete new snapshot and swaps it in. New handshakes use the new
//! configs; established connections keep the config (and certificate) they were made with, so no
//! connection is dropped.
//!
//! [`IdentityStore::watch`] polls the identity directory: it compares the **contents** of
//! `tls.crt`, `tls.key` and `ca.crt` (read through symlinks) with the last set it saw, which catches
//! both plain rewrites and Kubernetes' atomic `..data` symlink swaps (where mtimes of the visible
//! paths do not change). A changed set is validated as a whole ([`Identity::from_dir`]'s rules); a
//! broken set is logged, counted once, and the old identity kept. A set read while it was being
//! rewritten (two reads disagree) is skipped until it settles.
//!
//! Metrics ([`IdentityMetrics`], registered under the `tern_` prefix):
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `tern_identity_cert_expiry_timestamp_seconds` | gauge | (none): `notAfter` of the current leaf |
//! | `tern_identity_reloads_total` | counter | (none): new identities swapped in after start |
//! | `tern_identity_reload_failures_total` | counter | `reason` ([`IdentityErrorReason`]) |
//!
//! Errors: [`IdentityError`] from [`IdentityStore::load`] and in [`ReloadOutcome::Failed`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use rustls::{ClientConfig, ServerConfig};

use super::config::{ExpectedServer, TrustDomains, client_config, server_config};
use super::identity::{Identity, IdentityError, IdentityErrorReason, IdentityFiles};

/// Client configs cached per snapshot before the cache is cleared (bounds memory when a proxy talks
/// to very many distinct exact identities).
const MAX_CACHED_CLIENT_CONFIGS: usize = 1024;

/// Which client trust domains the mesh server accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientTrustDomains {
    /// Only the trust domain of our current identity (the default).
    Own,
    /// Exactly these.
    List(TrustDomains),
}

/// The current identity and its configs; see the module docs.
#[derive(Debug)]
pub struct IdentityStore {
    current: RwLock<Arc<Snapshot>>,
    accepted: ClientTrustDomains,
    metrics: IdentityMetrics,
    /// What the watcher last saw on disk, loaded or refused: a set is judged once.
    last_seen: Mutex<Option<Seen>>,
}

/// What one reload attempt found.
#[derive(Debug)]
pub enum ReloadOutcome {
    /// The files are byte-for-byte what was last seen (loaded, or already refused).
    Unchanged,
    /// The files changed between two reads; try again later.
    InFlux,
    /// A new identity was validated and swapped in.
    Reloaded,
    /// The new files were refused; the previous identity stays.
    Failed(IdentityError),
}

impl IdentityStore {
    /// A store serving `identity`.
    pub fn new(identity: Identity, accepted: ClientTrustDomains, metrics: IdentityMetrics) -> Self {
        let snapshot = Snapshot::new(Arc::new(identity), &accepted);
        metrics.expiry.set(snapshot.identity.not_after());
        IdentityStore {
            current: RwLock::new(Arc::new(snapshot)),
            accepted,
            metrics,
            last_seen: Mutex::new(None),
        }
    }

    /// Loads the identity in `dir` (see [`Identity::from_dir`]) and serves it. Fails if it is
    /// missing or invalid: the proxy must not start (or become ready) without one.
    pub fn load(
        dir: &Path,
        accepted: ClientTrustDomains,
        metrics: IdentityMetrics,
    ) -> Result<Self, IdentityError> {
        let files = IdentityFiles::read(dir)?;
        let identity = Identity::parse(&files, &super::identity::Paths::in_dir(dir))?;
        let store = Self::new(identity, accepted, metrics);
        *lock(&store.last_seen) = Some(Seen::Files(files));
        Ok(store)
    }

    /// The identity new connections present.
    pub fn identity(&self) -> Arc<Identity> {
        self.snapshot().identity.clone()
    }

    /// The mesh server config for new inbound connections.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.snapshot().server.clone()
    }

    /// The client config for a new connection to a server expected to be `expected`.
    pub fn client_config(&self, expected: &ExpectedServer) -> Arc<ClientConfig> {
        let snapshot = self.snapshot();
        let mut cache = lock(&snapshot.clients);
        if let Some(config) = cache.get(expected) {
            return config.clone();
        }
        if cache.len() >= MAX_CACHED_CLIENT_CONFIGS {
            cache.clear();
        }
        let config = client_config(&snapshot.identity, expected);
        cache.insert(expected.clone(), config.clone());
        config
    }

    /// Swaps in `identity` for new connections (e.g. rotated in memory by `tern demo`).
    pub fn replace(&self, identity: Identity) {
        let snapshot = Arc::new(Snapshot::new(Arc::new(identity), &self.accepted));
        let (id, not_after) = (
            snapshot.identity.id().clone(),
            snapshot.identity.not_after(),
        );
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = snapshot;
        self.metrics.expiry.set(not_after);
        self.metrics.reloads.inc();
        tracing::info!(%id, not_after, "identity reloaded");
    }

    /// Re-reads `dir` and swaps in its identity if the files changed and are valid. Blocking
    /// (small file reads and one signature check); [`Self::watch`] runs it off the async threads.
    pub fn reload_from(&self, dir: &Path) -> ReloadOutcome {
        let read = IdentityFiles::read(dir);
        let seen = Seen::of(&read);
        let mut last = lock(&self.last_seen);
        if last.as_ref() == Some(&seen) {
            return ReloadOutcome::Unchanged;
        }
        let result =
            read.and_then(|files| Identity::parse(&files, &super::identity::Paths::in_dir(dir)));
        match result {
            Ok(identity) => {
                *last = Some(seen);
                drop(last);
                self.replace(identity);
                ReloadOutcome::Reloaded
            }
            Err(err) => {
                // A writer may be mid-way through replacing the files: judge only a stable set.
                if Seen::of(&IdentityFiles::read(dir)) != seen {
                    return ReloadOutcome::InFlux;
                }
                *last = Some(seen);
                self.metrics
                    .failures
                    .get_or_create(&FailureLabels {
                        reason: err.reason(),
                    })
                    .inc();
                tracing::warn!(error = %err, "new identity files refused; keeping the current identity");
                ReloadOutcome::Failed(err)
            }
        }
    }

    /// Polls `dir` every `interval` and reloads on change (see the module docs). The task ends when
    /// the store is dropped; abort the handle to stop it sooner.
    pub fn watch(
        self: &Arc<Self>,
        dir: PathBuf,
        interval: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let store: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await; // The first tick is immediate; the files were just loaded.
            loop {
                ticks.tick().await;
                let Some(store) = store.upgrade() else { return };
                let dir = dir.clone();
                let outcome = tokio::task::spawn_blocking(move || store.reload_from(&dir)).await;
                if let Err(e) = outcome {
                    tracing::error!(error = %e, "identity reload task failed");
                }
            }
        })
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Identity metrics; see the module docs. `Default` gives unregistered metrics (tests, demo).
#[derive(Debug, Clone, Default)]
pub struct IdentityMetrics {
    expiry: Gauge,
    reloads: Counter,
    failures: Family<FailureLabels, Counter>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FailureLabels {
    reason: IdentityErrorReason,
}

impl IdentityMetrics {
    /// Registers into `registry`, which should be the `tern`-prefixed sub-registry (as for
    /// [`crate::metrics::TcpMetrics`]).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register_with_unit(
            "identity_cert_expiry_timestamp",
            "When the current identity certificate expires (notAfter), in Unix seconds",
            Unit::Seconds,
            m.expiry.clone(),
        );
        registry.register(
            "identity_reloads",
            "New identities loaded from the identity directory after start",
            m.reloads.clone(),
        );
        registry.register(
            "identity_reload_failures",
            "Changed identity files that were refused (the previous identity was kept), by reason",
            m.failures.clone(),
        );
        m
    }

    /// The current expiry gauge value (Unix seconds).
    pub fn expiry(&self) -> i64 {
        self.expiry.get()
    }

    pub fn reloads(&self) -> u64 {
        self.reloads.get()
    }

    pub fn failures(&self, reason: IdentityErrorReason) -> u64 {
        self.failures.get_or_create(&FailureLabels { reason }).get()
    }
}

#[derive(Debug)]
struct Snapshot {
    identity: Arc<Identity>,
    server: Arc<ServerConfig>,
    clients: Mutex<HashMap<ExpectedServer, Arc<ClientConfig>>>,
}

impl Snapshot {
    fn new(identity: Arc<Identity>, accepted: &ClientTrustDomains) -> Self {
        let accepted = match accepted {
            ClientTrustDomains::Own => TrustDomains::only(identity.id().trust_domain()),
            ClientTrustDomains::List(list) => list.clone(),
        };
        Snapshot {
            server: server_config(&identity, &accepted),
            identity,
            clients: Mutex::new(HashMap::new()),
        }
    }
}

/// One observation of the identity directory.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Files(IdentityFiles),
    /// A file could not be read; the message tells repeated failures apart from new ones.
    Unreadable {
        message: String,
    },
}

impl Seen {
    fn of(read: &Result<IdentityFiles, IdentityError>) -> Self {
        match read {
            Ok(files) => Seen::Files(files.clone()),
            Err(e) => Seen::Unreadable {
                message: e.to_string(),
            },
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
