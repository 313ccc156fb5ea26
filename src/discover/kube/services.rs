//! The cluster-wide Services watch: Service VIPs (`clusterIPs`, both families) and names →
//! the Service's ports, selector and request policy (from its `tern.io/*` annotations).
//!
//! Why one cluster-wide watch rather than a per-VIP lookup (`fieldSelector=spec.clusterIP=…`):
//! a VIP lookup has to answer for *every* destination the app dials, including the many that
//! are not Services (pod IPs, external addresses); a cluster-wide watch answers those from
//! memory without an API request per unknown address, and Services are small, slowly-changing
//! objects (Linkerd's destination service and Istio's istiod watch them the same way). The
//! expensive, fast-changing objects (EndpointSlices, Pods) are the ones watched lazily.
//!
//! An invalid `tern.io/*` annotation is logged and counted in
//! `tern_discovery_config_errors_total{kind="Service",namespace,name,field}`, once per change of
//! the annotations; the Service keeps its last good policy (the default when it never had one).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;

use super::{KubeMetrics, ServiceKey, Shared, WatchResource};
use crate::discover::{RetryOn, RetryPolicy, ServicePolicy};

/// `tern.io/timeout`: the whole-request timeout (humantime, e.g. `2s`).
pub const TIMEOUT_ANNOTATION: &str = "tern.io/timeout";
/// `tern.io/retry-http`: HTTP statuses to retry, comma-separated (`5xx`, `503`, `429`).
pub const RETRY_HTTP_ANNOTATION: &str = "tern.io/retry-http";
/// `tern.io/retry-grpc`: gRPC codes to retry, comma-separated (`unavailable`, `resource-exhausted`).
pub const RETRY_GRPC_ANNOTATION: &str = "tern.io/retry-grpc";
/// `tern.io/retry-attempts`: extra attempts after the first (1..=10, default 1).
pub const RETRY_ATTEMPTS_ANNOTATION: &str = "tern.io/retry-attempts";

const ANNOTATIONS: [&str; 4] = [
    TIMEOUT_ANNOTATION,
    RETRY_HTTP_ANNOTATION,
    RETRY_GRPC_ANNOTATION,
    RETRY_ATTEMPTS_ANNOTATION,
];

/// What tern needs of one Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    pub key: ServiceKey,
    /// ClusterIPs (`spec.clusterIPs`, else `spec.clusterIP`); empty for headless Services.
    pub cluster_ips: Vec<IpAddr>,
    /// TCP ports only (the proxy intercepts TCP).
    pub ports: Vec<ServicePortInfo>,
    /// `spec.selector` as `k=v,…` (sorted); `None` for a Service without a selector.
    pub selector: Option<String>,
    pub policy: Arc<ServicePolicy>,
    /// A hash of the `tern.io/*` annotations the policy was parsed from (re-parsed only when
    /// they change; a hash, not a copy: thousands of Services live in every sidecar).
    annotations: u64,
}

/// One TCP port of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortInfo {
    pub port: u16,
    /// Empty when the Service's only port is unnamed: EndpointSlice ports match it by name.
    pub name: String,
    pub target_port: Option<IntOrString>,
}

impl ServiceInfo {
    pub fn port(&self, port: u16) -> Option<&ServicePortInfo> {
        self.ports.iter().find(|p| p.port == port)
    }
}

/// One invalid annotation of a Service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Service {namespace}/{name}: annotation {annotation} `{value}`: {message}")]
pub struct AnnotationError {
    pub namespace: String,
    pub name: String,
    pub annotation: &'static str,
    pub value: String,
    pub message: String,
}

/// Every Service of the cluster, by key and by ClusterIP.
#[derive(Debug, Default)]
pub struct Index {
    inner: RwLock<Maps>,
    /// Bumped on every change; the per-service watches follow it to see their Service change.
    generation: watch::Sender<u64>,
    /// True once the first full list arrived.
    synced: watch::Sender<bool>,
}

#[derive(Debug, Default)]
struct Maps {
    by_key: HashMap<ServiceKey, Arc<ServiceInfo>>,
    by_ip: HashMap<IpAddr, Arc<ServiceInfo>>,
}

impl Index {
    pub fn get(&self, key: &ServiceKey) -> Option<Arc<ServiceInfo>> {
        self.read().by_key.get(key).cloned()
    }

    /// The Service whose ClusterIP and port `dst` is.
    pub fn by_addr(&self, dst: SocketAddr) -> Option<Arc<ServiceInfo>> {
        let maps = self.read();
        let info = maps.by_ip.get(&dst.ip())?;
        info.port(dst.port()).map(|_| info.clone())
    }

    pub fn len(&self) -> usize {
        self.read().by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Waits until the first list arrived or `deadline` passed; true when synced.
    pub async fn wait_synced(&self, deadline: tokio::time::Instant) -> bool {
        let mut rx = self.synced.subscribe();
        tokio::time::timeout_at(deadline, rx.wait_for(|s| *s))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Maps> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Maps> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Inserts or replaces a Service (keeping its last good policy when an annotation is bad).
    fn apply(&self, svc: &Service, metrics: &KubeMetrics) {
        let Some(info) = self.info(svc, metrics) else {
            return;
        };
        let mut maps = self.write();
        if maps.by_key.get(&info.key).is_some_and(|old| **old == info) {
            return;
        }
        Self::remove_locked(&mut maps, &info.key);
        let info = Arc::new(info);
        for ip in &info.cluster_ips {
            maps.by_ip.insert(*ip, info.clone());
        }
        maps.by_key.insert(info.key.clone(), info);
        drop(maps);
        self.bump(metrics);
    }

    fn delete(&self, svc: &Service, metrics: &KubeMetrics) {
        if let Some(key) = ServiceKey::of(svc) {
            Self::remove_locked(&mut self.write(), &key);
            self.bump(metrics);
        }
    }

    /// Replaces the whole index with a fresh list (after a (re)list).
    fn replace(&self, items: Vec<ServiceInfo>, metrics: &KubeMetrics) {
        let mut maps = Maps::default();
        for info in items {
            let info = Arc::new(info);
            for ip in &info.cluster_ips {
                maps.by_ip.insert(*ip, info.clone());
            }
            maps.by_key.insert(info.key.clone(), info);
        }
        *self.write() = maps;
        self.bump(metrics);
        self.synced.send_replace(true);
    }

    fn remove_locked(maps: &mut Maps, key: &ServiceKey) {
        if let Some(old) = maps.by_key.remove(key) {
            for ip in &old.cluster_ips {
                if maps.by_ip.get(ip).is_some_and(|i| i.key == *key) {
                    maps.by_ip.remove(ip);
                }
            }
        }
    }

    fn bump(&self, metrics: &KubeMetrics) {
        metrics.services.set(self.len() as i64);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Converts a Service; its policy is re-parsed only when its annotations changed.
    fn info(&self, svc: &Service, metrics: &KubeMetrics) -> Option<ServiceInfo> {
        let key = ServiceKey::of(svc)?;
        let previous = self.get(&key);
        let annotations: BTreeMap<String, String> = svc
            .metadata
            .annotations
            .iter()
            .flatten()
            .filter(|(k, _)| ANNOTATIONS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let hash = std::hash::BuildHasher::hash_one(&FixedState, &annotations);
        let policy = match &previous {
            Some(p) if p.annotations == hash => p.policy.clone(),
            _ if annotations.is_empty() => default_policy(),
            _ => match policy(&key, &annotations) {
                Ok(p) => Arc::new(p),
                Err(errors) => {
                    for e in &errors {
                        tracing::warn!(error = %e, "invalid Service annotation; keeping the last good policy");
                        metrics.config_error(
                            "Service",
                            &e.namespace,
                            &e.name,
                            &format!("metadata.annotations[{}]", e.annotation),
                        );
                    }
                    previous
                        .as_ref()
                        .map_or_else(default_policy, |p| p.policy.clone())
                }
            },
        };
        let spec = svc.spec.as_ref();
        let ips: Vec<&String> = match spec.and_then(|s| s.cluster_ips.as_ref()) {
            Some(ips) if !ips.is_empty() => ips.iter().collect(),
            _ => spec
                .and_then(|s| s.cluster_ip.as_ref())
                .into_iter()
                .collect(),
        };
        let cluster_ips = ips.iter().filter_map(|ip| ip.parse().ok()).collect();
        let ports = spec
            .and_then(|s| s.ports.as_ref())
            .into_iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
            .filter_map(|p| {
                Some(ServicePortInfo {
                    port: u16::try_from(p.port).ok()?,
                    name: p.name.clone().unwrap_or_default(),
                    target_port: p.target_port.clone(),
                })
            })
            .collect();
        let selector = spec
            .and_then(|s| s.selector.as_ref())
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            });
        Some(ServiceInfo {
            key,
            cluster_ips,
            ports,
            selector,
            policy,
            annotations: hash,
        })
    }
}

/// One shared default policy for the (many) Services without annotations.
fn default_policy() -> Arc<ServicePolicy> {
    static DEFAULT: std::sync::OnceLock<Arc<ServicePolicy>> = std::sync::OnceLock::new();
    DEFAULT.get_or_init(Arc::default).clone()
}

/// A hasher with fixed keys: annotation hashes are compared across calls.
struct FixedState;

impl std::hash::BuildHasher for FixedState {
    type Hasher = std::collections::hash_map::DefaultHasher;

    fn build_hasher(&self) -> Self::Hasher {
        std::collections::hash_map::DefaultHasher::new()
    }
}

/// Parses a Service's `tern.io/*` annotations into its request policy; every invalid one is
/// reported.
pub fn policy(
    key: &ServiceKey,
    annotations: &BTreeMap<String, String>,
) -> Result<ServicePolicy, Vec<AnnotationError>> {
    let mut errors = Vec::new();
    let mut error = |annotation: &'static str, value: &str, message: String| {
        errors.push(AnnotationError {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            annotation,
            value: value.to_string(),
            message,
        });
    };
    let mut p = ServicePolicy::default();
    if let Some(v) = annotations.get(TIMEOUT_ANNOTATION) {
        match humantime::parse_duration(v.trim()) {
            Ok(d) if d >= Duration::from_millis(1) => p.timeout = Some(d),
            Ok(_) => error(TIMEOUT_ANNOTATION, v, "must be at least 1ms".into()),
            Err(e) => error(TIMEOUT_ANNOTATION, v, e.to_string()),
        }
    }
    let mut on = Vec::new();
    for (annotation, grpc) in [
        (RETRY_HTTP_ANNOTATION, false),
        (RETRY_GRPC_ANNOTATION, true),
    ] {
        let Some(v) = annotations.get(annotation) else {
            continue;
        };
        for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match (item.parse::<RetryOn>(), grpc) {
                (Ok(r @ (RetryOn::Server5xx | RetryOn::Status(_))), false) => on.push(r),
                (Ok(r @ RetryOn::Grpc(_)), true) => on.push(r),
                _ if grpc => error(
                    annotation,
                    v,
                    format!(
                        "`{item}` is not a gRPC code name (unavailable, resource-exhausted, deadline-exceeded, internal, unknown, aborted, cancelled)"
                    ),
                ),
                _ => error(
                    annotation,
                    v,
                    format!("`{item}` is neither 5xx nor an HTTP status (100..=599)"),
                ),
            }
        }
    }
    let mut attempts = 1;
    if let Some(v) = annotations.get(RETRY_ATTEMPTS_ANNOTATION) {
        match v.trim().parse::<u32>() {
            Ok(n) if (1..=10).contains(&n) => attempts = n,
            _ => error(
                RETRY_ATTEMPTS_ANNOTATION,
                v,
                "must be a number within 1..=10".into(),
            ),
        }
    }
    if !on.is_empty() {
        p.retry = Some(RetryPolicy { on, attempts });
    }
    if errors.is_empty() {
        Ok(p)
    } else {
        Err(errors)
    }
}

/// Runs the cluster-wide Services watch until aborted. A (re)list replaces the index at once
/// when complete; until then, and while the API server is unreachable, the last known Services
/// keep answering.
pub async fn run(shared: Arc<Shared>) {
    let api: kube::Api<Service> = kube::Api::all(shared.client.clone());
    let mut events = shared.watch_stream(api, watcher::Config::default(), WatchResource::services);
    // A (re)list is buffered as converted ServiceInfos (not whole Service objects: a sidecar's
    // memory is the product) and swapped in when complete.
    let mut listing: Option<Vec<ServiceInfo>> = None;
    while let Some(event) = events.next().await {
        match event {
            Event::Init => listing = Some(Vec::new()),
            Event::InitApply(svc) => {
                if let Some(info) = shared.services.info(&svc, &shared.metrics) {
                    listing.get_or_insert_with(Vec::new).push(info);
                }
            }
            Event::InitDone => {
                let items = listing.take().unwrap_or_default();
                shared.services.replace(items, &shared.metrics);
            }
            Event::Apply(svc) => shared.services.apply(&svc, &shared.metrics),
            Event::Delete(svc) => shared.services.delete(&svc, &shared.metrics),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ServiceKey {
        ServiceKey {
            namespace: "shop".into(),
            name: "web".into(),
        }
    }

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn annotations_parse() {
        let p = policy(
            &key(),
            &ann(&[
                (TIMEOUT_ANNOTATION, "1500ms"),
                (RETRY_HTTP_ANNOTATION, "5xx, 429"),
                (RETRY_GRPC_ANNOTATION, "unavailable,resource-exhausted"),
                (RETRY_ATTEMPTS_ANNOTATION, "3"),
            ]),
        )
        .expect("valid");
        assert_eq!(p.timeout, Some(Duration::from_millis(1500)));
        assert_eq!(
            p.retry,
            Some(RetryPolicy {
                on: vec![
                    RetryOn::Server5xx,
                    RetryOn::Status(429),
                    RetryOn::Grpc(14),
                    RetryOn::Grpc(8)
                ],
                attempts: 3
            })
        );
        assert_eq!(
            policy(&key(), &ann(&[])).expect("none"),
            ServicePolicy::default()
        );
    }

    #[test]
    fn bad_annotations_name_the_annotation() {
        let errors = policy(
            &key(),
            &ann(&[
                (TIMEOUT_ANNOTATION, "soon"),
                (RETRY_HTTP_ANNOTATION, "5xx,unavailable"),
                (RETRY_GRPC_ANNOTATION, "503"),
                (RETRY_ATTEMPTS_ANNOTATION, "0"),
            ]),
        )
        .expect_err("invalid");
        let names: Vec<_> = errors.iter().map(|e| e.annotation).collect();
        assert_eq!(names, ANNOTATIONS.to_vec());
        assert!(
            errors[1].to_string().contains("shop/web")
                && errors[1].to_string().contains("unavailable"),
            "{}",
            errors[1]
        );
    }
}
