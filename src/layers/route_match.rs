//! `RouteMatchLayer`: looks each request to a discovery service up in the routes in force
//! and marks it with the outcome, for the layers and the proxy service below.
//!
//! Where it sits: outermost of the outbound HTTP stack of a connection to a discovery
//! service, above the request metrics (so they carry the `route` label): **route match** →
//! metrics → proxy (which runs the matched rule's stack: timeout → retry → per-attempt
//! timeout → split → balance → breaker → endpoint).
//!
//! It inserts [`Matched`] and [`RouteLabel`] when a rule matched, [`Unmatched`] when the
//! service has routes on this port but none matched (the proxy answers 404 / gRPC
//! UNIMPLEMENTED, `no_route`), and nothing when the service has no routes. The table is read
//! per request (a pointer clone), so a reload applies to open connections at once.
//! Errors: none (it never fails). Metrics: none of its own. Flag: `--routes-file`.

use std::task::{Context, Poll};

use http::Request;
use tower::{Layer, Service};

use super::http_metrics::RouteLabel;
use crate::routes::{Lookup, Matched, RouteStore, Unmatched};

/// The parent a connection's requests are routed for: a discovery service and port.
#[derive(Debug, Clone)]
pub struct RouteParent {
    /// `name.namespace`.
    pub service: String,
    pub port: u16,
}

/// Marks requests with their route (see the module doc); `None`: a destination that is no
/// discovery service, passed through untouched.
#[derive(Debug, Clone)]
pub struct RouteMatchLayer {
    store: RouteStore,
    /// Shared: the stack is cloned for every request, and the name is a `String`.
    parent: Option<std::sync::Arc<RouteParent>>,
}

impl RouteMatchLayer {
    pub fn new(store: RouteStore, parent: Option<RouteParent>) -> Self {
        RouteMatchLayer {
            store,
            parent: parent.map(std::sync::Arc::new),
        }
    }
}

impl<S> Layer<S> for RouteMatchLayer {
    type Service = RouteMatch<S>;

    fn layer(&self, inner: S) -> RouteMatch<S> {
        RouteMatch {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`RouteMatchLayer`] produces.
#[derive(Debug, Clone)]
pub struct RouteMatch<S> {
    inner: S,
    layer: RouteMatchLayer,
}

impl<S, B> Service<Request<B>> for RouteMatch<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> S::Future {
        if let Some(parent) = &self.layer.parent {
            let table = self.layer.store.table();
            match table.lookup(&parent.service, parent.port, &req) {
                Lookup::NoRoutes => {}
                Lookup::Matched(rule) => {
                    req.extensions_mut().insert(RouteLabel(rule.label.clone()));
                    req.extensions_mut().insert(Matched(rule));
                }
                Lookup::NoMatch => {
                    req.extensions_mut().insert(Unmatched);
                }
            }
        }
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    const ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{name: web, kind: Service, group: "", port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /api}}]
"#;

    async fn outcome(layer: &RouteMatchLayer, path: &str) -> &'static str {
        let svc = layer.layer(tower::service_fn(|req: Request<()>| async move {
            let e = req.extensions();
            Ok::<_, std::convert::Infallible>(
                match (
                    e.get::<Matched>(),
                    e.get::<Unmatched>(),
                    e.get::<RouteLabel>(),
                ) {
                    (Some(_), None, Some(l)) if &*l.0 == "shop/web" => "matched",
                    (None, Some(_), None) => "unmatched",
                    (None, None, None) => "none",
                    _ => "inconsistent",
                },
            )
        }));
        let req = Request::get(path).body(()).expect("request");
        svc.oneshot(req).await.expect("infallible")
    }

    #[tokio::test]
    async fn requests_are_marked_with_their_route() {
        let store = RouteStore::default();
        let docs = crate::routes::parse_yaml(ROUTE).expect("yaml");
        assert!(store.replace_source("t", &docs).is_empty());
        let parent = |service: &str, port| {
            Some(RouteParent {
                service: service.into(),
                port,
            })
        };
        let layer = RouteMatchLayer::new(store.clone(), parent("web.shop", 80));
        assert_eq!(outcome(&layer, "/api/x").await, "matched");
        assert_eq!(outcome(&layer, "/other").await, "unmatched");
        let other_port = RouteMatchLayer::new(store.clone(), parent("web.shop", 8080));
        assert_eq!(
            outcome(&other_port, "/other").await,
            "none",
            "port-bound route"
        );
        let other = RouteMatchLayer::new(store.clone(), parent("cart.shop", 80));
        assert_eq!(outcome(&other, "/api").await, "none");
        let plain = RouteMatchLayer::new(store, None);
        assert_eq!(outcome(&plain, "/api").await, "none");
    }
}
