//! Gateway API routes for mesh traffic (the GAMMA profile): `HTTPRoute` and `GRPCRoute`
//! (`gateway.networking.k8s.io/v1`) whose `parentRefs` name a Service.
//!
//! ```text
//! routes file (YAML, multi-doc) ─▶ parse_yaml ─┐
//! API-server objects (JSON)  ───────────────────┴▶ parse_value ─▶ RouteStore ─▶ RouteTable (swapped whole)
//!                                                  (validated)    (last good per route)
//! request to a Service ─▶ RouteTable::lookup ─▶ Matched(rule) | NoMatch (404) | NoRoutes (service stack)
//! ```
//!
//! Feeding routes: [`RouteStore::replace_source`] (a whole set: a file's contents, an API
//! server relist), [`RouteStore::apply`] and [`RouteStore::delete`] (watch events); each takes
//! objects as `serde_json::Value` and validates them with [`parse_value`].
//!
//! A request to a discovery service is looked up in the current [`RouteTable`] by the
//! service's name (`name.namespace`) and the port it was sent to. When routes are attached to
//! that parent (and port), the first candidate in precedence order that matches picks the
//! [`Rule`]: its timeouts, retry policy and weighted backends make the request's stack
//! (`crate::outbound::http`). No match is a 404 (gRPC: UNIMPLEMENTED) with
//! `tern-proxy-error: no_route`. A parent without routes behaves as before routes existed.
//!
//! Precedence (Gateway API): HTTPRoute candidates order by exact path, then the longest
//! prefix (a `RegularExpression` path ranks below every prefix, longer patterns first), then
//! a method match, then the most header matches, then the most query matches; GRPCRoute
//! candidates by the characters of an exact service match, then of an exact method match,
//! then the most header matches. Ties go to the oldest route (`metadata.creationTimestamp`;
//! routes without one count as newest), then `namespace/name` alphabetically, then rule and
//! match order. A gRPC request tries the parent's GRPCRoute candidates first, then its
//! HTTPRoute candidates; other requests only HTTPRoute candidates.
//!
//! Producer and consumer routes (GAMMA): a route in its parent Service's namespace applies to
//! every client; a route in another namespace applies only to proxies whose pod is in the
//! route's namespace (`--pod-namespace`), and for them replaces the parent's producer routes.
//!
//! Errors: [`parse::RouteError`] (names the object and the field). Metrics:
//! `tern_route_config_errors_total{kind, namespace, name, field}` (documents refused),
//! `tern_routes{kind}` (routes in force). See [`mod@file`] for `--routes-file`.

pub mod api;
pub mod file;
pub mod parse;
#[cfg(test)]
mod pipeline_tests;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use http::{HeaderMap, HeaderName, Method, Request};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use regex::Regex;

pub use parse::{RouteError, parse_value, parse_yaml};

use crate::discover::RetryPolicy;

/// The two route kinds; label values of `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, EncodeLabelValue)]
pub enum RouteKind {
    HTTPRoute,
    GRPCRoute,
}

impl RouteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::HTTPRoute => "HTTPRoute",
            RouteKind::GRPCRoute => "GRPCRoute",
        }
    }
}

/// Identifies one route object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteKey {
    pub kind: RouteKind,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for RouteKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.kind.as_str(), self.namespace, self.name)
    }
}

/// One validated route document.
#[derive(Debug)]
pub struct Route {
    pub key: RouteKey,
    /// `metadata.creationTimestamp` (RFC 3339, as the API server writes it), for precedence.
    pub created: Option<String>,
    pub parents: Vec<ParentRef>,
    pub rules: Vec<RuleSpec>,
}

/// A parent Service (GAMMA): requests to it are routed by this route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentRef {
    /// `name.namespace`, as discovery names services.
    pub service: String,
    /// Only requests to this Service port, when set.
    pub port: Option<u16>,
}

/// One rule of a route, as written.
#[derive(Debug)]
pub struct RuleSpec {
    /// Any of these (an empty list matches every request of the route's kind).
    pub matches: Vec<RequestMatch>,
    pub timeouts: Timeouts,
    pub retry: Option<RouteRetry>,
    /// Empty: the parent Service itself.
    pub backends: Vec<Backend>,
}

/// `timeouts` of a rule; `None`: not set (the service's or the proxy's default applies).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// The whole request, retries included, until the response headers (`0s`: none).
    pub request: Option<Duration>,
    /// Each attempt (`backendRequest`).
    pub backend_request: Option<Duration>,
}

/// A rule's retry policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRetry {
    pub policy: RetryPolicy,
    /// The least time between attempts; grows ×2 per attempt, with jitter.
    pub backoff: Duration,
}

/// A weighted backend Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// `name.namespace`.
    pub service: String,
    pub port: u16,
    pub weight: u32,
}

/// A request match of either kind.
#[derive(Debug)]
pub enum RequestMatch {
    Http(HttpMatch),
    Grpc(GrpcMatch),
}

/// An `HTTPRouteMatch`: every condition present must hold.
#[derive(Debug)]
pub struct HttpMatch {
    pub path: PathMatch,
    pub method: Option<Method>,
    pub headers: Vec<HeaderMatch>,
    pub query: Vec<QueryMatch>,
}

#[derive(Debug)]
pub enum PathMatch {
    Exact(String),
    /// Element-wise: `/foo` matches `/foo`, `/foo/` and `/foo/bar`, not `/foobar`.
    Prefix(String),
    /// The whole path must match.
    Regex(Regex),
}

#[derive(Debug)]
pub struct HeaderMatch {
    pub name: HeaderName,
    pub value: ValueMatch,
}

#[derive(Debug)]
pub struct QueryMatch {
    pub name: String,
    pub value: ValueMatch,
}

#[derive(Debug)]
pub enum ValueMatch {
    Exact(String),
    /// The whole value must match.
    Regex(Regex),
}

/// A `GRPCRouteMatch`: `/service/method` and headers.
#[derive(Debug)]
pub struct GrpcMatch {
    pub service: Option<ValueMatch>,
    pub method: Option<ValueMatch>,
    pub headers: Vec<HeaderMatch>,
}

/// A rule in force for one parent: what a matched request uses.
#[derive(Debug)]
pub struct Rule {
    pub key: RouteKey,
    /// `namespace/name`: the `route` metric label.
    pub label: Arc<str>,
    /// Index of the rule in its route.
    pub index: usize,
    pub timeouts: Timeouts,
    pub retry: Option<RouteRetry>,
    pub backends: Vec<Backend>,
}

/// A request extension set by route matching: the rule the request matched.
#[derive(Debug, Clone)]
pub struct Matched(pub Arc<Rule>);

/// A request extension set by route matching: the parent has routes, none matched.
#[derive(Debug, Clone, Copy)]
pub struct Unmatched;

/// The request matched no rule of a parent that has routes (404 / gRPC UNIMPLEMENTED).
#[derive(Debug, thiserror::Error)]
#[error("no route of service {0} matches the request")]
pub struct NoRoute(pub String);

/// The outcome of looking a request up.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// No route is attached to this parent and port: the service's own stack applies.
    NoRoutes,
    Matched(Arc<Rule>),
    NoMatch,
}

#[derive(Debug)]
struct Candidate {
    port: Option<u16>,
    rule: Arc<Rule>,
    route: Arc<Route>,
    /// Index into the rule's matches; `None`: the rule has none (matches everything).
    matcher: Option<usize>,
}

impl Candidate {
    fn matcher(&self) -> Option<&RequestMatch> {
        self.matcher
            .map(|m| &self.route.rules[self.rule.index].matches[m])
    }
}

/// The routes attached to one parent Service, in precedence order.
#[derive(Debug, Default)]
pub struct ParentRoutes {
    http: Vec<Candidate>,
    grpc: Vec<Candidate>,
}

/// Every route in force, indexed by parent; immutable once built, swapped whole.
#[derive(Debug, Default)]
pub struct RouteTable {
    parents: HashMap<String, ParentRoutes>,
    len: [usize; 2],
}

impl RouteTable {
    /// Builds the table from validated routes, every route applying to every client.
    pub fn build<'a>(routes: impl IntoIterator<Item = &'a Arc<Route>> + Clone) -> RouteTable {
        Self::build_for(routes, None)
    }

    /// Builds the table for a client (this proxy's pod) in `client_namespace`, with GAMMA's
    /// producer and consumer routes: a route in the parent Service's namespace (producer)
    /// applies to every client; a route in another namespace (consumer) applies only to
    /// clients in the route's namespace, and replaces the producer routes of that parent for
    /// them. `None` (namespace unknown, e.g. outside Kubernetes): every route applies.
    pub fn build_for<'a>(
        routes: impl IntoIterator<Item = &'a Arc<Route>> + Clone,
        client_namespace: Option<&str>,
    ) -> RouteTable {
        let parent_ns = |p: &ParentRef| {
            p.service
                .split_once('.')
                .map_or("", |(_, ns)| ns)
                .to_owned()
        };
        let consumer = |r: &Route, p: &ParentRef| r.key.namespace != parent_ns(p);
        let applies = |r: &Route, p: &ParentRef| {
            !consumer(r, p) || client_namespace.is_none_or(|ns| ns == r.key.namespace)
        };
        // Parents that have a consumer route for this client: their producer routes yield.
        let mut overridden = std::collections::HashSet::new();
        if client_namespace.is_some() {
            for r in routes.clone() {
                for p in r.parents.iter().filter(|p| consumer(r, p) && applies(r, p)) {
                    overridden.insert(p.service.clone());
                }
            }
        }
        let mut parents: HashMap<String, ParentRoutes> = HashMap::new();
        let mut len = [0; 2];
        for route in routes {
            len[route.key.kind as usize] += 1;
            let label: Arc<str> = Arc::from(format!("{}/{}", route.key.namespace, route.key.name));
            for parent in &route.parents {
                if !applies(route, parent)
                    || (!consumer(route, parent) && overridden.contains(&parent.service))
                {
                    continue;
                }
                let entry = parents.entry(parent.service.clone()).or_default();
                for (index, spec) in route.rules.iter().enumerate() {
                    let rule = Arc::new(Rule {
                        key: route.key.clone(),
                        label: label.clone(),
                        index,
                        timeouts: spec.timeouts,
                        retry: spec.retry.clone(),
                        backends: spec.backends.clone(),
                    });
                    let list = match route.key.kind {
                        RouteKind::HTTPRoute => &mut entry.http,
                        RouteKind::GRPCRoute => &mut entry.grpc,
                    };
                    let matchers: Vec<Option<usize>> = if spec.matches.is_empty() {
                        vec![None]
                    } else {
                        (0..spec.matches.len()).map(Some).collect()
                    };
                    for matcher in matchers {
                        list.push(Candidate {
                            port: parent.port,
                            rule: rule.clone(),
                            route: route.clone(),
                            matcher,
                        });
                    }
                }
            }
        }
        for p in parents.values_mut() {
            p.http.sort_by(precedence);
            p.grpc.sort_by(precedence);
        }
        RouteTable { parents, len }
    }

    /// Routes in force of `kind`.
    pub fn len(&self, kind: RouteKind) -> usize {
        self.len[kind as usize]
    }

    pub fn is_empty(&self) -> bool {
        self.parents.is_empty()
    }

    /// Looks up the rule for a request to `service` (`name.namespace`) on `port`.
    pub fn lookup<B>(&self, service: &str, port: u16, req: &Request<B>) -> Lookup {
        match self.parents.get(service) {
            None => Lookup::NoRoutes,
            Some(p) => p.lookup(port, req),
        }
    }
}

impl ParentRoutes {
    fn lookup<B>(&self, port: u16, req: &Request<B>) -> Lookup {
        let applies = |c: &Candidate| c.port.is_none_or(|p| p == port);
        if !self.http.iter().chain(&self.grpc).any(applies) {
            return Lookup::NoRoutes;
        }
        let grpc = crate::http::is_grpc(req.headers());
        let view = View::new(req);
        let candidates = self
            .grpc
            .iter()
            .filter(|_| grpc)
            .chain(&self.http)
            .filter(|c| applies(c));
        for c in candidates {
            let hit = match c.matcher() {
                None => true,
                Some(RequestMatch::Http(m)) => m.matches(&view),
                Some(RequestMatch::Grpc(m)) => m.matches(&view),
            };
            if hit {
                return Lookup::Matched(c.rule.clone());
            }
        }
        Lookup::NoMatch
    }
}

/// The parts of a request matching looks at.
struct View<'a> {
    method: &'a Method,
    path: &'a str,
    query: Option<&'a str>,
    headers: &'a HeaderMap,
}

impl<'a> View<'a> {
    fn new<B>(req: &'a Request<B>) -> Self {
        View {
            method: req.method(),
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
        }
    }
}

impl HttpMatch {
    fn matches(&self, r: &View<'_>) -> bool {
        self.path.matches(r.path)
            && self.method.as_ref().is_none_or(|m| m == r.method)
            && self.headers.iter().all(|h| h.matches(r.headers))
            && self.query.iter().all(|q| q.matches(r.query))
    }
}

impl PathMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => p == path,
            PathMatch::Prefix(p) => {
                let p = p.trim_end_matches('/');
                path.strip_prefix(p)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            PathMatch::Regex(re) => re.is_match(path),
        }
    }
}

impl ValueMatch {
    fn matches(&self, v: &str) -> bool {
        match self {
            ValueMatch::Exact(e) => e == v,
            ValueMatch::Regex(re) => re.is_match(v),
        }
    }
}

impl HeaderMatch {
    /// Several values of one header are joined with `,` (as the Gateway API asks).
    fn matches(&self, headers: &HeaderMap) -> bool {
        let mut values = headers.get_all(&self.name).iter();
        let Some(first) = values.next() else {
            return false;
        };
        match values.next() {
            None => first.to_str().is_ok_and(|v| self.value.matches(v)),
            Some(second) => {
                let mut joined = String::new();
                for v in [first, second].into_iter().chain(values) {
                    let Ok(v) = v.to_str() else { return false };
                    if !joined.is_empty() {
                        joined.push(',');
                    }
                    joined.push_str(v);
                }
                self.value.matches(&joined)
            }
        }
    }
}

impl QueryMatch {
    /// The first parameter of that name (names are case-sensitive, values not decoded).
    fn matches(&self, query: Option<&str>) -> bool {
        let Some(q) = query else { return false };
        q.split('&')
            .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
            .find(|(k, _)| *k == self.name)
            .is_some_and(|(_, v)| self.value.matches(v))
    }
}

impl GrpcMatch {
    fn matches(&self, r: &View<'_>) -> bool {
        let Some((service, method)) = r.path.strip_prefix('/').and_then(|p| p.split_once('/'))
        else {
            return false;
        };
        self.service.as_ref().is_none_or(|m| m.matches(service))
            && self.method.as_ref().is_none_or(|m| m.matches(method))
            && self.headers.iter().all(|h| h.matches(r.headers))
    }
}

/// Orders candidates: most specific first, then the tie-breakers (module doc).
fn precedence(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    rank(b)
        .cmp(&rank(a))
        .then_with(|| match (&a.route.created, &b.route.created) {
            (Some(x), Some(y)) => x.cmp(y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        })
        .then_with(|| a.route.key.namespace.cmp(&b.route.key.namespace))
        .then_with(|| a.route.key.name.cmp(&b.route.key.name))
        .then_with(|| a.rule.index.cmp(&b.rule.index))
        .then_with(|| a.matcher.cmp(&b.matcher))
}

/// Specificity; greater sorts first.
fn rank(c: &Candidate) -> (u8, usize, bool, usize, usize) {
    match c.matcher() {
        // No matches: a `PathPrefix /` match.
        None => (2, 1, false, 0, 0),
        Some(RequestMatch::Http(m)) => {
            let (kind, len) = match &m.path {
                PathMatch::Exact(p) => (3, p.len()),
                PathMatch::Prefix(p) => (2, p.trim_end_matches('/').len().max(1)),
                PathMatch::Regex(re) => (1, re.as_str().len()),
            };
            (
                kind,
                len,
                m.method.is_some(),
                m.headers.len(),
                m.query.len(),
            )
        }
        Some(RequestMatch::Grpc(m)) => {
            let exact = |v: &Option<ValueMatch>| match v {
                Some(ValueMatch::Exact(s)) => s.len(),
                _ => 0,
            };
            (
                0,
                exact(&m.service),
                exact(&m.method) > 0,
                exact(&m.method),
                m.headers.len(),
            )
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ErrorLabels {
    kind: String,
    namespace: String,
    name: String,
    field: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabels {
    kind: RouteKind,
}

/// Route configuration metrics.
#[derive(Debug, Clone, Default)]
pub struct RouteMetrics {
    errors: Family<ErrorLabels, Counter>,
    routes: Family<KindLabels, Gauge>,
}

impl RouteMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = RouteMetrics::default();
        registry.register(
            "route_config_errors",
            "Route documents refused, by object and field (the last good version stays)",
            m.errors.clone(),
        );
        registry.register(
            "routes",
            "HTTPRoute and GRPCRoute objects in force",
            m.routes.clone(),
        );
        m
    }

    /// Refusals counted for this object and field (tests and `tern demo`).
    pub fn errors(&self, kind: &str, namespace: &str, name: &str, field: &str) -> u64 {
        self.errors
            .get_or_create(&ErrorLabels {
                kind: kind.into(),
                namespace: namespace.into(),
                name: name.into(),
                field: field.into(),
            })
            .get()
    }
}

#[derive(Debug)]
struct Entry {
    route: Arc<Route>,
    source: Arc<str>,
}

/// The routes in force, shared by the proxy's connections and fed by the sources (the routes
/// file, later the API server). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct RouteStore {
    inner: Arc<StoreInner>,
}

#[derive(Debug, Default)]
struct StoreInner {
    /// This proxy's pod namespace, for consumer routes (see [`RouteTable::build_for`]).
    client_namespace: Option<String>,
    table: RwLock<Arc<RouteTable>>,
    /// Writers serialize here; readers only take the table's read lock for a pointer clone.
    entries: Mutex<BTreeMap<RouteKey, Entry>>,
    metrics: RouteMetrics,
}

impl RouteStore {
    pub fn new(metrics: RouteMetrics) -> Self {
        Self::for_client(metrics, None)
    }

    /// A store for a proxy whose pod is in `client_namespace` (`--pod-namespace`): consumer
    /// routes of that namespace apply, those of others do not.
    pub fn for_client(metrics: RouteMetrics, client_namespace: Option<String>) -> Self {
        RouteStore {
            inner: Arc::new(StoreInner {
                metrics,
                client_namespace,
                ..StoreInner::default()
            }),
        }
    }

    /// The table in force (a pointer clone).
    pub fn table(&self) -> Arc<RouteTable> {
        self.inner
            .table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Makes `docs` the complete set of routes from `source` (a file's contents, an API
    /// server relist). Invalid documents are logged and counted; for each, the last good
    /// version of the same route stays in force. Routes of `source` no longer present are
    /// removed; routes of other sources are untouched. One atomic swap.
    pub fn replace_source(&self, source: &str, docs: &[serde_json::Value]) -> Vec<RouteError> {
        let mut entries = self.entries();
        let mut keep = std::collections::BTreeSet::new();
        let mut errors = Vec::new();
        for doc in docs {
            match parse_value(doc) {
                Ok(route) => {
                    keep.insert(route.key.clone());
                    entries.insert(
                        route.key.clone(),
                        Entry {
                            route: Arc::new(route),
                            source: Arc::from(source),
                        },
                    );
                }
                Err(e) => {
                    if let Some(key) = e.key() {
                        keep.insert(key);
                    }
                    self.reject(&e);
                    errors.push(e);
                }
            }
        }
        entries.retain(|k, e| &*e.source != source || keep.contains(k));
        self.publish(&entries);
        errors
    }

    /// Adds or replaces one route (an API-server `Applied` event). When invalid, it is
    /// logged and counted and the route's last good version stays.
    pub fn apply(&self, source: &str, doc: &serde_json::Value) -> Result<RouteKey, RouteError> {
        let route = parse_value(doc).inspect_err(|e| self.reject(e))?;
        let key = route.key.clone();
        let mut entries = self.entries();
        entries.insert(
            key.clone(),
            Entry {
                route: Arc::new(route),
                source: Arc::from(source),
            },
        );
        self.publish(&entries);
        Ok(key)
    }

    /// Removes one route (an API-server `Deleted` event); whether it was in force.
    pub fn delete(&self, key: &RouteKey) -> bool {
        let mut entries = self.entries();
        let removed = entries.remove(key).is_some();
        if removed {
            self.publish(&entries);
        }
        removed
    }

    /// Logs and counts a refused document (or a whole file that failed to parse).
    pub fn reject(&self, e: &RouteError) {
        tracing::warn!(error = %e, "route refused; the last good version stays in force");
        self.inner
            .metrics
            .errors
            .get_or_create(&ErrorLabels {
                kind: e.kind.clone(),
                namespace: e.namespace.clone(),
                name: e.name.clone(),
                field: e.field.clone(),
            })
            .inc();
    }

    pub fn metrics(&self) -> &RouteMetrics {
        &self.inner.metrics
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, BTreeMap<RouteKey, Entry>> {
        self.inner.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, entries: &BTreeMap<RouteKey, Entry>) {
        let table = RouteTable::build_for(
            entries.values().map(|e| &e.route),
            self.inner.client_namespace.as_deref(),
        );
        for kind in [RouteKind::HTTPRoute, RouteKind::GRPCRoute] {
            self.inner
                .metrics
                .routes
                .get_or_create(&KindLabels { kind })
                .set(table.len(kind) as i64);
        }
        *self.inner.table.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(table);
    }
}

#[cfg(test)]
mod tests;
