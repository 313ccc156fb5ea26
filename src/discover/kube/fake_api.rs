//! An in-process Kubernetes API server for tests: plain HTTP/1.1 on 127.0.0.1, speaking the
//! list/watch protocol for Services, EndpointSlices, Pods, HTTPRoutes and GRPCRoutes (lists carry `resourceVersion`;
//! `?watch=true&resourceVersion=N` streams newline-delimited JSON events after N; a version
//! older than the last compaction gets a `410 Gone` ERROR event, which makes clients re-list).
//! Equality label selectors are honoured. The server can drop every watch, stop listening and
//! restart on the same port, so the client's recovery is exercised for real.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// The resource collections the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Pod,
    HTTPRoute,
    GRPCRoute,
}

impl Kind {
    fn of(obj: &Value) -> Kind {
        match obj["kind"].as_str() {
            Some("Service") => Kind::Service,
            Some("EndpointSlice") => Kind::EndpointSlice,
            Some("Pod") => Kind::Pod,
            Some("HTTPRoute") => Kind::HTTPRoute,
            Some("GRPCRoute") => Kind::GRPCRoute,
            other => panic!("fake API: unsupported kind {other:?}"),
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::HTTPRoute | Kind::GRPCRoute => "gateway.networking.k8s.io/v1",
            _ => "v1",
        }
    }

    fn list_kind(self) -> &'static str {
        match self {
            Kind::Service => "ServiceList",
            Kind::EndpointSlice => "EndpointSliceList",
            Kind::Pod => "PodList",
            Kind::HTTPRoute => "HTTPRouteList",
            Kind::GRPCRoute => "GRPCRouteList",
        }
    }
}

#[derive(Debug, Default)]
struct State {
    rv: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    /// (resourceVersion, kind, event type, object)
    events: Vec<(u64, Kind, &'static str, Value)>,
    /// Watches from before this version get 410 Gone.
    compacted: u64,
    requests: Vec<String>,
}

/// The fake API server.
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    /// The latest resourceVersion, for watches to wait on.
    rv: watch::Sender<u64>,
    /// Bumped to end every open watch.
    cut: watch::Sender<u64>,
    addr: SocketAddr,
    server: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl FakeApi {
    pub async fn start() -> Arc<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake API");
        let addr = listener.local_addr().expect("addr");
        let api = Arc::new(FakeApi {
            state: Arc::default(),
            rv: watch::Sender::new(0),
            cut: watch::Sender::new(0),
            addr,
            server: Mutex::new(None),
        });
        api.serve(listener);
        api
    }

    pub fn url(&self) -> http::Uri {
        format!("http://{}", self.addr).parse().expect("url")
    }

    /// Creates or replaces an object (its `kind` picks the collection).
    pub fn apply(&self, mut obj: Value) {
        let kind = Kind::of(&obj);
        let mut s = self.lock();
        s.rv += 1;
        let rv = s.rv;
        obj["apiVersion"] = json!(kind.api_version());
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = (
            kind,
            obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            obj["metadata"]["name"].as_str().expect("name").to_string(),
        );
        let ty = if s.objects.insert(key, obj.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        s.events.push((rv, kind, ty, obj));
        drop(s);
        self.rv.send_replace(rv);
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let mut s = self.lock();
        let Some(mut obj) = s
            .objects
            .remove(&(kind, namespace.to_string(), name.to_string()))
        else {
            return;
        };
        s.rv += 1;
        let rv = s.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        s.events.push((rv, kind, "DELETED", obj));
        drop(s);
        self.rv.send_replace(rv);
    }

    /// Every request so far (`path?query`).
    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    /// Requests whose path contains `what`.
    pub fn count(&self, what: &str) -> usize {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.contains(what))
            .count()
    }

    /// Forgets the event history: watches from an older version get 410 Gone.
    pub fn compact(&self) {
        let mut s = self.lock();
        s.compacted = s.rv + 1;
        s.events.clear();
    }

    /// Ends every open watch (the connection closes cleanly; clients re-watch).
    pub fn drop_watches(&self) {
        self.cut.send_modify(|c| *c += 1);
    }

    /// Stops listening and closes every connection (clients see connection refused).
    pub fn stop(&self) {
        if let Some(t) = self.server.lock().expect("lock").take() {
            t.abort();
        }
        self.drop_watches();
    }

    /// Listens again on the same port.
    pub async fn restart(self: &Arc<Self>) {
        let mut listener = None;
        for _ in 0..100 {
            match TcpListener::bind(self.addr).await {
                Ok(l) => {
                    listener = Some(l);
                    break;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
        self.serve(listener.expect("rebind the fake API's port"));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fake API state")
    }

    fn serve(self: &Arc<Self>, listener: TcpListener) {
        let api = self.clone();
        let task = tokio::spawn(async move {
            // The connections die with this task (JoinSet aborts them when dropped).
            let mut conns = JoinSet::new();
            while let Ok((s, _)) = listener.accept().await {
                let api = api.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let api = api.clone();
                        async move { Ok::<_, Infallible>(api.handle(req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        *self.server.lock().expect("lock") = Some(task);
    }

    fn handle(self: &Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        self.lock().requests.push(format!("{path}?{query}"));
        let params: BTreeMap<String, String> = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), percent_decode(v)))
            .collect();
        let Some((kind, namespace)) = route(&path) else {
            return status(StatusCode::NOT_FOUND, "no such collection");
        };
        let selector = params.get("labelSelector").cloned().unwrap_or_default();
        let filter = Filter {
            kind,
            namespace,
            selector,
        };
        if params.get("watch").is_some_and(|w| w == "true" || w == "1") {
            let from = params
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            return self.watch(filter, from);
        }
        // Paginated like the real server: `limit`, and `continue` (here: an offset).
        let s = self.lock();
        let offset: usize = params
            .get("continue")
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let limit: usize = params
            .get("limit")
            .and_then(|l| l.parse().ok())
            .unwrap_or(usize::MAX);
        let matching: Vec<&Value> = s.objects.values().filter(|o| filter.matches(o)).collect();
        let page: Vec<Value> = matching
            .iter()
            .skip(offset)
            .take(limit)
            .map(|v| (*v).clone())
            .collect();
        let mut metadata = json!({"resourceVersion": s.rv.to_string()});
        if offset.saturating_add(limit) < matching.len() {
            metadata["continue"] = json!((offset + limit).to_string());
        }
        let body = json!({
            "apiVersion": kind.api_version(),
            "kind": kind.list_kind(),
            "metadata": metadata,
            "items": page,
        });
        json_response(&body)
    }

    fn watch(self: &Arc<Self>, filter: Filter, from: u64) -> Response<Body> {
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        let api = self.clone();
        tokio::spawn(async move {
            let mut rv = api.rv.subscribe();
            let mut cut = api.cut.subscribe();
            cut.mark_unchanged();
            let mut cursor = from;
            if from < api.lock().compacted {
                let gone = json!({"type": "ERROR", "object": {
                    "kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Failure", "reason": "Expired", "code": 410,
                    "message": format!("too old resource version: {from}"),
                }});
                let _ = tx.send(line(&gone)).await;
                return;
            }
            loop {
                rv.mark_unchanged();
                let pending: Vec<Value> = {
                    let s = api.lock();
                    s.events
                        .iter()
                        .filter(|(v, _, _, o)| *v > cursor && filter.matches(o))
                        .map(|(_, _, ty, o)| json!({"type": ty, "object": o}))
                        .collect()
                };
                cursor = *rv.borrow();
                for ev in pending {
                    if tx.send(line(&ev)).await.is_err() {
                        return;
                    }
                }
                // Cancellation safe: both are watch::Receiver::changed.
                tokio::select! {
                    r = rv.changed() => if r.is_err() { return },
                    _ = cut.changed() => return,
                }
            }
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
        });
        let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
        r.headers_mut()
            .insert("content-type", "application/json".parse().expect("value"));
        r
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        if let Some(t) = self.server.get_mut().ok().and_then(Option::take) {
            t.abort();
        }
    }
}

struct Filter {
    kind: Kind,
    namespace: Option<String>,
    selector: String,
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        if Kind::of(obj) != self.kind {
            return false;
        }
        if let Some(ns) = &self.namespace {
            if obj["metadata"]["namespace"].as_str() != Some(ns.as_str()) {
                return false;
            }
        }
        self.selector
            .split(',')
            .filter(|s| !s.is_empty())
            .all(|term| match term.split_once('=') {
                Some((k, v)) => obj["metadata"]["labels"][k].as_str() == Some(v),
                None => !obj["metadata"]["labels"][term].is_null(),
            })
    }
}

/// `/api/v1[/namespaces/NS]/{services,pods}`, `/apis/discovery.k8s.io/v1[/namespaces/NS]/endpointslices`,
/// `/apis/gateway.networking.k8s.io/v1[/namespaces/NS]/{httproutes,grpcroutes}`.
fn route(path: &str) -> Option<(Kind, Option<String>)> {
    let rest = path
        .strip_prefix("/api/v1/")
        .or_else(|| path.strip_prefix("/apis/discovery.k8s.io/v1/"))
        .or_else(|| path.strip_prefix("/apis/gateway.networking.k8s.io/v1/"))?;
    let (ns, collection) = match rest.strip_prefix("namespaces/") {
        Some(r) => {
            let (ns, c) = r.split_once('/')?;
            (Some(ns.to_string()), c)
        }
        None => (None, rest),
    };
    let kind = match collection {
        "services" => Kind::Service,
        "pods" => Kind::Pod,
        "endpointslices" => Kind::EndpointSlice,
        "httproutes" => Kind::HTTPRoute,
        "grpcroutes" => Kind::GRPCRoute,
        _ => return None,
    };
    Some((kind, ns))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn line(v: &Value) -> Bytes {
    let mut s = serde_json::to_vec(v).expect("json");
    s.push(b'\n');
    Bytes::from(s)
}

fn json_response(v: &Value) -> Response<Body> {
    let mut r = Response::new(BodyExt::boxed(Full::new(Bytes::from(
        serde_json::to_vec(v).expect("json"),
    ))));
    r.headers_mut()
        .insert("content-type", "application/json".parse().expect("value"));
    r
}

fn status(code: StatusCode, message: &str) -> Response<Body> {
    let mut r = json_response(&json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "code": code.as_u16(),
    }));
    *r.status_mut() = code;
    r
}

// ---- object builders ----

/// A Service with `ports` as (name, port, targetPort) and `annotations`.
pub fn service(
    ns: &str,
    name: &str,
    cluster_ips: &[&str],
    ports: &[(&str, u16, Value)],
    annotations: &[(&str, &str)],
) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p, t)| json!({"name": n, "port": p, "targetPort": t, "protocol": "TCP"}))
        .collect();
    let annotations: BTreeMap<&str, &str> = annotations.iter().copied().collect();
    json!({
        "kind": "Service",
        "metadata": {"namespace": ns, "name": name, "annotations": annotations},
        "spec": {
            "clusterIP": cluster_ips.first(),
            "clusterIPs": cluster_ips,
            "ports": ports,
            "selector": {"app": name},
        }
    })
}

/// An endpoint of a slice: (address, pod name, ready, serving, terminating).
pub struct Ep<'a> {
    pub ip: &'a str,
    pub pod: &'a str,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

pub fn ready<'a>(ip: &'a str, pod: &'a str) -> Ep<'a> {
    Ep {
        ip,
        pod,
        ready: true,
        serving: true,
        terminating: false,
    }
}

/// An EndpointSlice of Service `service` with `ports` as (name, port).
pub fn slice(
    ns: &str,
    name: &str,
    service: &str,
    address_type: &str,
    ports: &[(&str, u16)],
    endpoints: &[Ep<'_>],
) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p)| json!({"name": n, "port": p, "protocol": "TCP"}))
        .collect();
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|e| {
            json!({
                "addresses": [e.ip],
                "conditions": {"ready": e.ready, "serving": e.serving, "terminating": e.terminating},
                "targetRef": {"kind": "Pod", "namespace": ns, "name": e.pod},
            })
        })
        .collect();
    json!({
        "kind": "EndpointSlice",
        "metadata": {"namespace": ns, "name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": address_type,
        "ports": ports,
        "endpoints": endpoints,
    })
}

/// A Pod labelled `app=<app>`; `meshed`: with the injected label and a `tern-proxy` sidecar
/// whose `tern-inbound` port is `mesh_port`.
pub fn pod(ns: &str, name: &str, app: &str, sa: &str, meshed: Option<u16>) -> Value {
    let mut labels = json!({"app": app});
    let mut init = json!([]);
    if let Some(port) = meshed {
        labels["tern.io/proxy"] = json!("tern");
        init = json!([{
            "name": "tern-proxy", "image": "tern", "restartPolicy": "Always",
            "ports": [{"name": "tern-inbound", "containerPort": port, "protocol": "TCP"}],
        }]);
    }
    json!({
        "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "labels": labels},
        "spec": {
            "serviceAccountName": sa,
            "initContainers": init,
            "containers": [{"name": "app", "image": "app"}],
        }
    })
}
