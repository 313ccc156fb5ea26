//! Routes from the Kubernetes API server: `HTTPRoute` and `GRPCRoute`
//! (`gateway.networking.k8s.io/v1`) in every namespace, watched through the client of
//! Kubernetes discovery and fed into the same [`RouteStore`] as `--routes-file`.
//!
//! ```text
//! watch httproutes ─┐  Init…InitDone: one relist → RouteStore::replace_source("api/<kind>")
//! watch grpcroutes ─┴▶ Apply → RouteStore::apply;  Delete → RouteStore::delete
//! ```
//!
//! Objects are read as `DynamicObject`s and validated by [`super::parse_value`] exactly as a
//! file's documents are: an invalid object is logged and counted in
//! `tern_route_config_errors_total{kind,namespace,name,field}` and the last good version of
//! that route stays in force. A relist is buffered and swapped in whole, so a route never
//! disappears for the length of a relist. When the Gateway API CRDs are not installed, the
//! watches fail and back off (`tern_discovery_watch_errors_total{resource}`): routes are then
//! simply absent. The RBAC that allows these reads is in `deploy/rbac.yaml`.

use futures_util::StreamExt;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::watcher::{self, Event};

use super::{RouteKey, RouteKind, RouteStore};
use crate::discover::kube::{KubeDiscovery, WatchResource};

/// Watches both route kinds until the process ends.
pub async fn watch(kube: KubeDiscovery, store: RouteStore) {
    tokio::join!(
        watch_kind(&kube, &store, RouteKind::HTTPRoute),
        watch_kind(&kube, &store, RouteKind::GRPCRoute),
    );
}

/// The API resource of a route kind.
fn resource(kind: RouteKind) -> (ApiResource, WatchResource) {
    let (k, plural, metric) = match kind {
        RouteKind::HTTPRoute => ("HTTPRoute", "httproutes", WatchResource::httproutes),
        RouteKind::GRPCRoute => ("GRPCRoute", "grpcroutes", WatchResource::grpcroutes),
    };
    let gvk = GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", k);
    (ApiResource::from_gvk_with_plural(&gvk, plural), metric)
}

async fn watch_kind(kube: &KubeDiscovery, store: &RouteStore, kind: RouteKind) {
    let (ar, metric) = resource(kind);
    let api = kube::Api::<DynamicObject>::all_with(kube.client().clone(), &ar);
    let source = format!("api/{}", kind.as_str());
    let mut events = kube.watch_stream(api, watcher::Config::default(), metric);
    // A relist in progress: its objects, swapped in at InitDone.
    let mut relist: Vec<serde_json::Value> = Vec::new();
    while let Some(event) = events.next().await {
        match event {
            Event::Init => relist.clear(),
            Event::InitApply(obj) => relist.extend(to_value(&obj, &ar)),
            Event::InitDone => {
                let errors = store.replace_source(&source, &std::mem::take(&mut relist));
                tracing::info!(
                    kind = kind.as_str(),
                    refused = errors.len(),
                    "routes listed from the API server"
                );
            }
            Event::Apply(obj) => {
                if let Some(doc) = to_value(&obj, &ar) {
                    // Refusals are logged and counted by the store.
                    let _ = store.apply(&source, &doc);
                }
            }
            Event::Delete(obj) => {
                let key = RouteKey {
                    kind,
                    namespace: obj.metadata.namespace.clone().unwrap_or_default(),
                    name: obj.metadata.name.clone().unwrap_or_default(),
                };
                store.delete(&key);
            }
        }
    }
}

/// The object as the validator reads it, with `apiVersion`/`kind` filled in when a list
/// left them out.
fn to_value(obj: &DynamicObject, ar: &ApiResource) -> Option<serde_json::Value> {
    let mut v = match serde_json::to_value(obj) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "route object not representable as JSON; skipped");
            return None;
        }
    };
    if let Some(map) = v.as_object_mut() {
        map.entry("apiVersion")
            .or_insert_with(|| ar.api_version.clone().into());
        map.entry("kind").or_insert_with(|| ar.kind.clone().into());
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::discover::kube::fake_api::{FakeApi, Kind};
    use crate::discover::kube::{ApiServer, KubeMetrics, KubeSettings, client};
    use crate::routes::RouteMetrics;

    fn route(timeout: &str) -> serde_json::Value {
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"namespace": "shop", "name": "web-canary"},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
                "rules": [{
                    "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                    "timeouts": {"request": timeout},
                    "backendRefs": [{"name": "web", "port": 80}]
                }]
            }
        })
    }

    fn request_timeout(store: &RouteStore) -> Option<Duration> {
        let req = http::Request::get("http://web/").body(()).expect("request");
        match store.table().lookup("web.shop", 80, &req) {
            super::super::Lookup::Matched(rule) => rule.timeouts.request,
            _ => None,
        }
    }

    /// Polls (bounded) until `pred` holds.
    async fn until(what: &str, pred: impl Fn() -> bool) {
        for _ in 0..500 {
            if pred() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn api_routes_are_listed_watched_kept_when_invalid_and_deleted() {
        let api = FakeApi::start().await;
        api.apply(route("7s"));
        let kube = KubeDiscovery::start(
            client(&ApiServer::Url(api.url())).expect("client"),
            KubeSettings {
                cluster_domain: "cluster.local".into(),
                namespace: "shop".into(),
                trust_domain: None,
                idle_timeout: Duration::from_secs(300),
                timeout: Duration::from_secs(10),
                backoff: Duration::from_millis(20),
            },
            KubeMetrics::default(),
        );
        let store = RouteStore::for_client(RouteMetrics::default(), Some("shop".into()));
        let task = tokio::spawn(watch(kube, store.clone()));

        // The initial list puts the route in force.
        until("the listed route", || {
            request_timeout(&store) == Some(Duration::from_secs(7))
        })
        .await;
        assert_eq!(store.table().len(RouteKind::HTTPRoute), 1);
        assert_eq!(store.table().len(RouteKind::GRPCRoute), 0);

        // A watch event changes it.
        api.apply(route("9s"));
        until("the modified route", || {
            request_timeout(&store) == Some(Duration::from_secs(9))
        })
        .await;

        // An invalid version is refused, counted by field, and the last good one stays.
        api.apply(route("nine seconds"));
        let field = "spec.rules[0].timeouts.request";
        until("the refusal", || {
            store
                .metrics()
                .errors("HTTPRoute", "shop", "web-canary", field)
                == 1
        })
        .await;
        assert_eq!(request_timeout(&store), Some(Duration::from_secs(9)));

        // A relist after a compaction (410 Gone) keeps it too.
        api.compact();
        api.drop_watches();
        api.apply(route("11s"));
        until("the route after a relist", || {
            request_timeout(&store) == Some(Duration::from_secs(11))
        })
        .await;

        // Deleting the object removes the route.
        api.delete(Kind::HTTPRoute, "shop", "web-canary");
        until("the deletion", || {
            store.table().len(RouteKind::HTTPRoute) == 0
        })
        .await;
        assert!(api.count("httproutes") >= 1 && api.count("grpcroutes") >= 1);
        task.abort();
    }
}
