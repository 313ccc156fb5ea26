//! The Kubernetes discovery source: Services and EndpointSlices watched through the API server
//! (kube-rs), lazily, only for the destinations the app uses.
//!
//! ```text
//! start ─▶ Services watch (cluster-wide, [`services`]) ─▶ VIP and name index
//! lookup(VIP:port | authority) ─▶ wait for the first Services list (only during the first
//!      --discovery-timeout after start-up)
//!   ─▶ the Service's watches ([`endpoints`]): EndpointSlices + Pods (identities), started on
//!      first use ─▶ wait for their first list (only during the watch's first
//!      --discovery-timeout) ─▶ watch::Receiver<Option<Resolved>>
//!   idle (no receiver held, no lookup for --discovery-idle-timeout) ─▶ watches stop
//! ```
//!
//! API errors are logged and counted; the watch retries with exponential backoff (0.5 s to
//! 30 s, jittered), re-lists after `410 Gone`, and the last known state keeps answering
//! meanwhile: a re-list replaces the state only once complete.
//!
//! Other modules start their own watches on the same client with [`KubeDiscovery::client`] and
//! [`KubeDiscovery::watch_stream`] (backoff, logging and metrics included), and report invalid
//! objects with [`KubeMetrics::config_error`].
//!
//! Metrics: `tern_discovery_watches_active{resource}`, `tern_discovery_watch_events_total{resource}`,
//! `tern_discovery_watch_errors_total{resource}`, `tern_discovery_services` (Services known),
//! `tern_discovery_endpoints` (endpoints of the watched Services),
//! `tern_discovery_lookup_timeouts_total` (lookups answered "unknown" because the first list
//! did not arrive in time), `tern_discovery_config_errors_total{kind,namespace,name,field}`.
//! Errors: [`KubeError`] when the client cannot be built (start-up).

pub mod endpoints;
pub mod services;

#[cfg(test)]
pub(crate) mod fake_api;
#[cfg(test)]
mod pipeline_tests;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use kube::runtime::utils::{Backoff, StreamBackoff};
use kube::runtime::watcher::{self, Event};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family as MetricFamily;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::watch;

use self::endpoints::ServiceWatch;
use self::services::Index;
use crate::discover::{Resolved, ServicePolicy};

/// Where the Kubernetes API server is and how to authenticate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "mode", content = "url")]
pub enum ApiServer {
    /// The pod's own service account (`KUBERNETES_SERVICE_HOST`, the mounted token and CA).
    InCluster,
    /// This URL, no authentication (tests, `kubectl proxy`).
    Url(#[serde(serialize_with = "crate::discover::kube::serialize_uri")] http::Uri),
}

fn serialize_uri<S: serde::Serializer>(u: &http::Uri, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(u)
}

/// Why the Kubernetes client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(
        "Kubernetes in-cluster configuration (KUBERNETES_SERVICE_HOST, service account token): {0}"
    )]
    InCluster(#[source] kube::config::InClusterError),
    #[error("building the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// Builds the one Kubernetes client of the proxy (must run inside a tokio runtime). Outside a
/// cluster, point `--kube-api-url` at `kubectl proxy`.
pub fn client(api: &ApiServer) -> Result<kube::Client, KubeError> {
    let config = match api {
        ApiServer::InCluster => kube::Config::incluster().map_err(KubeError::InCluster)?,
        ApiServer::Url(url) => kube::Config::new(url.clone()),
    };
    kube::Client::try_from(config).map_err(KubeError::Client)
}

/// Settings of the Kubernetes source.
#[derive(Debug, Clone)]
pub struct KubeSettings {
    /// The cluster's DNS domain (`--cluster-domain`), for authorities `name.ns.svc.<domain>`.
    pub cluster_domain: String,
    /// This pod's namespace: the namespace of a bare `name` authority.
    pub namespace: String,
    /// The mesh's trust domain (this proxy's identity); `None`: every endpoint is plain.
    pub trust_domain: Option<String>,
    /// Watches of a destination stop after this long unused (`--discovery-idle-timeout`).
    pub idle_timeout: Duration,
    /// How long a lookup may wait for a first list (`--discovery-timeout`).
    pub timeout: Duration,
    /// First delay after an API error (doubles up to 30 s).
    pub backoff: Duration,
}

/// Keeps a route backend's Service watched while it lives (see [`KubeDiscovery::find_backend`]).
#[derive(Debug, Clone)]
pub struct BackendGuard(Arc<()>);

/// A Service's namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    fn of(svc: &k8s_openapi::api::core::v1::Service) -> Option<Self> {
        Some(ServiceKey {
            namespace: svc.metadata.namespace.clone()?,
            name: svc.metadata.name.clone()?,
        })
    }
}

/// `name.namespace`, the form `dst_service` labels and the file source use.
impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.name, self.namespace)
    }
}

/// An address family: the family of the dialed VIP picks the EndpointSlices (dual stack).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// The EndpointSlice `addressType` of this family.
    pub fn address_type(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// Parses an HTTP authority naming a Service: `name`, `name.ns`, `name.ns.svc`,
/// `name.ns.svc.<cluster-domain>` (a trailing dot allowed), each with an optional `:port`.
/// A bare `name` is in `namespace`. `None`: not a Service name of this cluster.
pub fn resolve_authority(
    authority: &str,
    namespace: &str,
    cluster_domain: &str,
) -> Option<(ServiceKey, Option<u16>)> {
    let authority: http::uri::Authority = authority.parse().ok()?;
    let host = authority.host().trim_end_matches('.').to_ascii_lowercase();
    if host.is_empty() || host.starts_with('[') || host.parse::<IpAddr>().is_ok() {
        return None;
    }
    let labels: Vec<&str> = host.split('.').collect();
    let domain = cluster_domain.trim_end_matches('.').to_ascii_lowercase();
    let (name, ns) = match labels.as_slice() {
        [name] => (*name, namespace),
        [name, ns] => (*name, *ns),
        [name, ns, "svc"] => (*name, *ns),
        [name, ns, "svc", rest @ ..] if rest.join(".") == domain => (*name, *ns),
        _ => return None,
    };
    let dns_label = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if !dns_label(name) || !dns_label(ns) {
        return None;
    }
    Some((
        ServiceKey {
            namespace: ns.to_string(),
            name: name.to_string(),
        },
        authority.port_u16(),
    ))
}

/// The resources tern watches (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum WatchResource {
    services,
    endpointslices,
    pods,
    httproutes,
    grpcroutes,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResourceLabels {
    resource: WatchResource,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ConfigErrorLabels {
    kind: String,
    namespace: String,
    name: String,
    field: String,
}

/// The Kubernetes source's metrics.
#[derive(Debug, Clone, Default)]
pub struct KubeMetrics {
    watches: MetricFamily<ResourceLabels, Gauge>,
    events: MetricFamily<ResourceLabels, Counter>,
    errors: MetricFamily<ResourceLabels, Counter>,
    services: Gauge,
    endpoints: Gauge,
    lookup_timeouts: Counter,
    config_errors: MetricFamily<ConfigErrorLabels, Counter>,
}

impl KubeMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = KubeMetrics::default();
        registry.register(
            "discovery_watches_active",
            "Kubernetes watches running, by resource",
            m.watches.clone(),
        );
        registry.register(
            "discovery_watch_events",
            "Kubernetes watch events received, by resource",
            m.events.clone(),
        );
        registry.register(
            "discovery_watch_errors",
            "Kubernetes list/watch errors (retried with backoff), by resource",
            m.errors.clone(),
        );
        registry.register(
            "discovery_services",
            "Kubernetes Services known",
            m.services.clone(),
        );
        registry.register(
            "discovery_endpoints",
            "Endpoints of the Kubernetes Services being watched",
            m.endpoints.clone(),
        );
        registry.register(
            "discovery_lookup_timeouts",
            "Lookups that gave up waiting for a first list (--discovery-timeout); the destination was forwarded as unknown",
            m.lookup_timeouts.clone(),
        );
        registry.register(
            "discovery_config_errors",
            "Invalid configuration found in Kubernetes objects (the last good one stays in force)",
            m.config_errors.clone(),
        );
        m
    }

    /// Counts an invalid field of a Kubernetes object (`kind` `namespace`/`name`, `field`).
    pub fn config_error(&self, kind: &str, namespace: &str, name: &str, field: &str) {
        self.config_errors
            .get_or_create(&ConfigErrorLabels {
                kind: kind.to_string(),
                namespace: namespace.to_string(),
                name: name.to_string(),
                field: field.to_string(),
            })
            .inc();
    }

    fn watch(&self, resource: WatchResource) -> Gauge {
        self.watches
            .get_or_create(&ResourceLabels { resource })
            .clone()
    }
}

/// What the source's tasks share.
pub struct Shared {
    pub(crate) client: kube::Client,
    pub(crate) settings: KubeSettings,
    pub(crate) metrics: KubeMetrics,
    pub(crate) services: Index,
    watches: Mutex<HashMap<ServiceKey, Arc<ServiceWatch>>>,
    /// When the Services watch started: lookups wait for its first list only until
    /// `started + timeout`, so an unreachable API server delays the first connections, not all.
    started: tokio::time::Instant,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// A watch on `api` with backoff: events only (errors are logged, counted and retried).
    /// The stream counts in `tern_discovery_watches_active` while it exists.
    pub fn watch_stream<K>(
        &self,
        api: kube::Api<K>,
        config: watcher::Config,
        resource: WatchResource,
    ) -> BoxStream<'static, Event<K>>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + fmt::Debug + Send + 'static,
    {
        let metrics = self.metrics.clone();
        let active = ActiveGuard(metrics.watch(resource));
        active.0.inc();
        let backoff = JitteredBackoff::new(self.settings.backoff);
        StreamBackoff::new(watcher::watcher(api, config), backoff)
            .filter_map(move |r| {
                let _active = &active;
                let labels = ResourceLabels { resource };
                let out = match r {
                    Ok(event) => {
                        metrics.events.get_or_create(&labels).inc();
                        Some(event)
                    }
                    Err(e) => {
                        metrics.errors.get_or_create(&labels).inc();
                        tracing::warn!(?resource, error = %e, "Kubernetes watch error; retrying with backoff, last known state kept");
                        None
                    }
                };
                std::future::ready(out)
            })
            .boxed()
    }

    /// Removes an idle Service watch from the map (under its lock, so a concurrent lookup
    /// either finds it before or starts a new one after). True: the watch must stop.
    fn retire(&self, watch: &Arc<ServiceWatch>) -> bool {
        let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        if !watch.is_idle(self.settings.idle_timeout) {
            return false;
        }
        if watches
            .get(&watch.key)
            .is_some_and(|w| Arc::ptr_eq(w, watch))
        {
            watches.remove(&watch.key);
        }
        true
    }
}

/// Decrements the active-watches gauge when a watch stream is dropped.
#[derive(Debug)]
struct ActiveGuard(Gauge);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Exponential backoff with jitter (each delay drawn from [d/2, d]), doubling up to 30 s; reset
/// when a watch makes progress.
#[derive(Debug)]
struct JitteredBackoff {
    initial: Duration,
    next: Duration,
    seed: u64,
}

impl JitteredBackoff {
    fn new(initial: Duration) -> Self {
        let seed = std::hash::BuildHasher::hash_one(
            &std::collections::hash_map::RandomState::new(),
            initial,
        ) | 1;
        JitteredBackoff {
            initial,
            next: initial,
            seed,
        }
    }
}

impl Iterator for JitteredBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        // xorshift64: jitter needs no quality, only spread.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let frac = 0.5 + (self.seed % 1000) as f64 / 2000.0;
        let delay = self.next.mul_f64(frac);
        self.next = (self.next * 2).min(Duration::from_secs(30));
        Some(delay)
    }
}

impl Backoff for JitteredBackoff {
    fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// The Kubernetes source; cheap to clone. Dropping the last clone stops every watch.
#[derive(Debug, Clone)]
pub struct KubeDiscovery {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
    services_task: tokio::task::AbortHandle,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.services_task.abort();
        let watches = self
            .shared
            .watches
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for w in watches.values() {
            if let Some(t) = w.task.get() {
                t.abort();
            }
        }
    }
}

impl KubeDiscovery {
    /// Starts the Services watch on `client` (inside a tokio runtime).
    pub fn start(client: kube::Client, settings: KubeSettings, metrics: KubeMetrics) -> Self {
        let shared = Arc::new(Shared {
            client,
            settings,
            metrics,
            services: Index::default(),
            watches: Mutex::new(HashMap::new()),
            started: tokio::time::Instant::now(),
        });
        let services_task = tokio::spawn(services::run(shared.clone())).abort_handle();
        KubeDiscovery {
            inner: Arc::new(Inner {
                shared,
                services_task,
            }),
        }
    }

    /// The proxy's Kubernetes client (one per proxy; cloning it is cheap).
    pub fn client(&self) -> kube::Client {
        self.inner.shared.client.clone()
    }

    /// The shared state, for starting other watches ([`Shared::watch_stream`]).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    pub fn metrics(&self) -> &KubeMetrics {
        &self.inner.shared.metrics
    }

    pub fn settings(&self) -> &KubeSettings {
        &self.inner.shared.settings
    }

    /// A watch on `api` with backoff, logging and metrics; see [`Shared::watch_stream`].
    pub fn watch_stream<K>(
        &self,
        api: kube::Api<K>,
        config: watcher::Config,
        resource: WatchResource,
    ) -> BoxStream<'static, Event<K>>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + fmt::Debug + Send + 'static,
    {
        self.inner.shared.watch_stream(api, config, resource)
    }

    /// From what is already watched, without waiting or starting anything.
    pub fn resolve(&self, dst: SocketAddr) -> Option<Resolved> {
        let shared = &self.inner.shared;
        let info = shared.services.by_addr(dst)?;
        let watch = shared
            .watches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&info.key)
            .cloned()?;
        watch.current((dst.port(), Family::of(dst.ip())))
    }

    /// A route backend (`name.namespace` on `port`): its ClusterIP address and policy. Starts
    /// the Service's watches in the background (the first requests may find no endpoints yet);
    /// they keep running while the returned guard lives, so a backend stack holds its Service.
    pub fn find_backend(
        &self,
        service: &str,
        port: u16,
    ) -> Option<(SocketAddr, Arc<ServicePolicy>, BackendGuard)> {
        let (name, namespace) = service.split_once('.')?;
        let key = ServiceKey {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        let info = self.inner.shared.services.get(&key)?;
        info.port(port)?;
        let vip = SocketAddr::new(*info.cluster_ips.first()?, port);
        let guard = BackendGuard(Arc::new(()));
        let held = Arc::downgrade(&guard.0);
        let kube = self.clone();
        tokio::spawn(async move {
            let Some(rx) = kube.lookup(vip).await else {
                return;
            };
            while held.strong_count() > 0 {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            drop(rx);
        });
        Some((vip, info.policy.clone(), guard))
    }

    /// A Service VIP:port: its destination channel, starting the Service's watches.
    pub async fn lookup(&self, dst: SocketAddr) -> Option<watch::Receiver<Option<Resolved>>> {
        let shared = &self.inner.shared;
        if !shared
            .services
            .wait_synced(shared.started + shared.settings.timeout)
            .await
        {
            shared.metrics.lookup_timeouts.inc();
            tracing::debug!(%dst, "no Services list yet; forwarding as unknown");
            return None;
        }
        let info = shared.services.by_addr(dst)?;
        self.subscribe(info.key.clone(), dst.port(), Family::of(dst.ip()))
            .await
    }

    /// A Service by HTTP authority (see [`resolve_authority`]); `port` when it names none.
    pub async fn lookup_authority(
        &self,
        authority: &str,
        port: u16,
    ) -> Option<watch::Receiver<Option<Resolved>>> {
        let shared = &self.inner.shared;
        let s = &shared.settings;
        let (key, p) = resolve_authority(authority, &s.namespace, &s.cluster_domain)?;
        if !shared
            .services
            .wait_synced(shared.started + s.timeout)
            .await
        {
            shared.metrics.lookup_timeouts.inc();
            return None;
        }
        let info = shared.services.get(&key)?;
        let port = p.unwrap_or(port);
        info.port(port)?;
        let family = info
            .cluster_ips
            .first()
            .map_or(Family::V4, |ip| Family::of(*ip));
        self.subscribe(key, port, family).await
    }

    async fn subscribe(
        &self,
        key: ServiceKey,
        port: u16,
        family: Family,
    ) -> Option<watch::Receiver<Option<Resolved>>> {
        let shared = &self.inner.shared;
        let (watch, rx) = {
            let mut watches = shared.watches.lock().unwrap_or_else(|p| p.into_inner());
            let watch = watches
                .entry(key.clone())
                .or_insert_with(|| {
                    let w = ServiceWatch::new(key);
                    let task = tokio::spawn(endpoints::run(w.clone(), shared.clone()));
                    let _ = w.task.set(task.abort_handle());
                    w
                })
                .clone();
            let rx = watch.subscribe((port, family), shared);
            (watch, rx)
        };
        // Only within the watch's first `timeout`: a Service whose endpoints cannot be listed
        // delays its first connections, not every one.
        if !watch
            .wait_synced(watch.created + shared.settings.timeout)
            .await
        {
            shared.metrics.lookup_timeouts.inc();
            tracing::debug!(service = %watch.key, "endpoints not listed yet; forwarding as unknown");
        }
        Some(rx)
    }
}
