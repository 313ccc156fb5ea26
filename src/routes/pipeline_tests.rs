//! Pipeline tests of Gateway API routes: a real proxy on 127.0.0.1:0 with a discovery file
//! (the parent `web.shop` and the backends `web-v1.shop`, `web-v2.shop`) and a routes file,
//! real hyper apps as endpoints counting what reaches them, real HTTP/1 and HTTP/2 (gRPC)
//! clients. Nothing of the proxy is mocked.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::config::{ProxyConfig, TargetMode};
use crate::demo::metric_value;
use crate::layers::pipeline_tests::{App, Behavior, Client, SERVICE_ADDR};

/// Backend service addresses in the discovery file (never dialed: they resolve to endpoints).
const V1_ADDR: &str = "127.0.0.1:10";
const V2_ADDR: &str = "127.0.0.1:11";

struct Mesh {
    proxy: crate::testing::Running,
    routes: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mesh {
    /// A proxy whose client calls `web.shop` ([`SERVICE_ADDR`], endpoints `parent`), with the
    /// backends `web-v1.shop` (`v1`) and `web-v2.shop` (`v2`), and `routes` as its routes file.
    fn start(parent: &[&App], v1: &[&App], v2: &[&App], routes: &str) -> Mesh {
        Self::weighted(parent, &[], v1, v2, routes)
    }

    /// As [`Mesh::start`], the parent's endpoints with these weights (default 1).
    fn weighted(parent: &[&App], weights: &[u32], v1: &[&App], v2: &[&App], routes: &str) -> Mesh {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut yaml = String::from("services:\n");
        for (name, addr, apps) in [
            ("web.shop", SERVICE_ADDR, parent),
            ("web-v1.shop", V1_ADDR, v1),
            ("web-v2.shop", V2_ADDR, v2),
        ] {
            yaml.push_str(&format!(
                "  - name: {name}\n    addresses: [\"{addr}\"]\n    endpoints:\n"
            ));
            for (i, a) in apps.iter().enumerate() {
                let w = if name == "web.shop" {
                    weights.get(i).copied().unwrap_or(1)
                } else {
                    1
                };
                yaml.push_str(&format!(
                    "      - address: \"{}\"\n        weight: {w}\n",
                    a.addr
                ));
            }
            if apps.is_empty() {
                yaml.push_str("      []\n");
            }
        }
        let discovery = dir.path().join("discovery.yaml");
        std::fs::write(&discovery, yaml).expect("write discovery");
        let routes_path = dir.path().join("routes.yaml");
        std::fs::write(&routes_path, routes).expect("write routes");
        let mut c = ProxyConfig::loopback();
        c.outbound_target = TargetMode::Fixed(SERVICE_ADDR.parse().expect("addr"));
        c.discovery_file = Some(discovery);
        c.routes_file = Some(routes_path.clone());
        c.discovery_reload_interval = Duration::from_millis(50);
        Mesh {
            proxy: crate::testing::Running::start(c, None),
            routes: routes_path,
            _dir: dir,
        }
    }

    fn entry(&self) -> SocketAddr {
        self.proxy.addrs.outbound[0]
    }
}

/// An HTTPRoute for `web.shop` with one rule: `rule` are its YAML lines (6 spaces deep).
fn http_route(rule: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: web, namespace: shop}}\nspec:\n  parentRefs: [{{name: web, kind: Service}}]\n  rules:\n    - {}\n",
        rule.trim_start()
    )
}

fn split(v1: u32, v2: u32) -> String {
    http_route(&format!(
        "      backendRefs:\n        - {{name: web-v1, port: 10, weight: {v1}}}\n        - {{name: web-v2, port: 11, weight: {v2}}}\n"
    ))
}

/// One HTTP/2 connection sending gRPC-shaped requests (`content-type: application/grpc`).
struct GrpcClient(hyper::client::conn::http2::SendRequest<crate::http::BoxBody>);

impl GrpcClient {
    async fn connect(entry: SocketAddr) -> GrpcClient {
        let s = TcpStream::connect(entry).await.expect("connect");
        let (tx, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
                .await
                .expect("h2 handshake");
        tokio::spawn(conn);
        GrpcClient(tx)
    }

    /// The response's `grpc-status` header (a trailers-only answer from the proxy), if any,
    /// and the `tern-proxy-error` header.
    async fn call(&mut self, path: &str) -> (Option<String>, Option<String>) {
        self.0.ready().await.expect("connection open");
        // One empty gRPC message, streamed: no content-length, as gRPC clients send it.
        let message = futures_util::stream::iter([Ok::<_, crate::http::BoxError>(
            hyper::body::Frame::data(Bytes::from_static(b"\0\0\0\0\0")),
        )]);
        let body = crate::http::boxed(http_body_util::StreamBody::new(message));
        let req = Request::post(format!("http://web.shop{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body)
            .expect("request");
        let resp = self.0.send_request(req).await.expect("response");
        let h = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let out = (h("grpc-status"), h("tern-proxy-error"));
        let _ = resp.into_body().collect().await;
        out
    }
}

#[tokio::test]
async fn a_90_10_canary_split_is_seen_by_the_backends() {
    let parent = App::start("parent", Behavior::Ok).await;
    let v1 = App::start("v1", Behavior::Ok).await;
    let v2 = App::start("v2", Behavior::Ok).await;
    let mesh = Mesh::start(&[&parent], &[&v1], &[&v2], &split(90, 10));
    let mut client = Client::connect(mesh.entry()).await;
    let n = 1000;
    for i in 0..n {
        let (status, _, body) = client.get("/").await;
        assert_eq!(status, StatusCode::OK, "request {i}: {body}");
    }
    assert_eq!(parent.hits(), 0, "the route sends to its backends only");
    assert_eq!(v1.hits() + v2.hits(), n);
    // Binomial(1000, 0.1): σ ≈ 9.5; ±5σ.
    assert!(
        (50..=150).contains(&v2.hits()),
        "canary got {} of {n}",
        v2.hits()
    );
    let m = mesh.proxy.metrics().await;
    assert_eq!(
        metric_value(&m, "tern_http_requests_total", "route=\"shop/web\""),
        n as f64,
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "tern_routes", "kind=\"HTTPRoute\""),
        1.0,
        "{m}"
    );
    drop(client);
    mesh.proxy.stop().await;
}

#[tokio::test]
async fn a_timed_out_attempt_is_retried_on_another_endpoint() {
    let slow = App::start("slow", Behavior::Slow(Duration::from_secs(30))).await;
    let fast = App::start("fast", Behavior::Ok).await;
    let routes = http_route(
        "      timeouts: {request: 10s, backendRequest: 200ms}\n      retry: {codes: [504], attempts: 2, backoff: 1ms}\n",
    );
    // Weighted so that the balancer draws the slow endpoint first almost always.
    let mesh = Mesh::weighted(&[&slow, &fast], &[100, 1], &[], &[], &routes);
    let mut client = Client::connect(mesh.entry()).await;
    let n = 10;
    for i in 0..n {
        let (status, headers, body) = client.get("/").await;
        assert_eq!(status, StatusCode::OK, "request {i}: {headers:?}");
        assert_eq!(body, "fast");
    }
    let m = mesh.proxy.metrics().await;
    assert!(slow.hits() >= 1, "the slow endpoint was tried");
    assert_eq!(fast.hits(), n, "every request ended on the fast endpoint");
    assert_eq!(
        metric_value(&m, "tern_retries_total", "result=\"retried\""),
        slow.hits() as f64,
        "each timed-out attempt was retried once: {m}"
    );
    drop(client);
    mesh.proxy.stop().await;
}

#[tokio::test]
async fn a_request_timeout_is_504_and_deadline_exceeded() {
    let slow = App::start("slow", Behavior::Slow(Duration::from_secs(30))).await;
    let routes = format!(
        "{}---\napiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata:\n  name: grpc\n  namespace: shop\n  annotations: {{tern.io/timeout: 200ms}}\nspec:\n  parentRefs: [{{name: web}}]\n  rules: [{{}}]\n",
        http_route("      timeouts: {request: 200ms}\n")
    );
    let mesh = Mesh::start(&[&slow], &[], &[], &routes);
    let mut client = Client::connect(mesh.entry()).await;
    let (status, headers, _) = client.get("/").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(headers["tern-proxy-error"], "request_timeout");
    let mut grpc = GrpcClient::connect(mesh.entry()).await;
    let (grpc_status, error) = grpc.call("/helloworld.Greeter/SayHello").await;
    assert_eq!(grpc_status.as_deref(), Some("4"), "DEADLINE_EXCEEDED");
    assert_eq!(error.as_deref(), Some("request_timeout"));
    let m = mesh.proxy.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "tern_http_responses_total",
            "route=\"shop/grpc\",status_code=\"200\",grpc_status=\"4\""
        ),
        1.0,
        "{m}"
    );
    drop((client, grpc));
    mesh.proxy.stop().await;
}

#[tokio::test]
async fn no_matching_rule_is_404_or_unimplemented() {
    let app = App::start("app", Behavior::Ok).await;
    let routes = format!(
        "{}---\napiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: grpc, namespace: shop}}\nspec:\n  parentRefs: [{{name: web}}]\n  rules:\n    - matches: [{{method: {{service: helloworld.Greeter}}}}]\n",
        http_route("      matches: [{path: {type: Exact, value: /only}}]\n")
    );
    let mesh = Mesh::start(&[&app], &[], &[], &routes);
    let mut client = Client::connect(mesh.entry()).await;
    let (status, headers, _) = client.get("/only").await;
    assert_eq!(status, StatusCode::OK);
    let (status, headers2, _) = client.get("/other").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{headers:?}");
    assert_eq!(headers2["tern-proxy-error"], "no_route");
    let mut grpc = GrpcClient::connect(mesh.entry()).await;
    let (grpc_status, _) = grpc.call("/helloworld.Greeter/SayHello").await;
    assert_eq!(grpc_status, None, "matched: the app answered");
    let (grpc_status, error) = grpc.call("/other.Service/Method").await;
    assert_eq!(grpc_status.as_deref(), Some("12"), "UNIMPLEMENTED");
    assert_eq!(error.as_deref(), Some("no_route"));
    assert_eq!(app.hits(), 2, "only matched requests reached the app");
    drop((client, grpc));
    mesh.proxy.stop().await;
}

#[tokio::test]
async fn a_routes_file_reload_moves_traffic_without_failures() {
    let parent = App::start("parent", Behavior::Ok).await;
    let v1 = App::start("v1", Behavior::Ok).await;
    let v2 = App::start("v2", Behavior::Ok).await;
    let mesh = Mesh::start(&[&parent], &[&v1], &[&v2], &split(1, 0));
    let entry = mesh.entry();
    // Traffic flows on several connections while the file changes.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let loads: Vec<_> = (0..3)
        .map(|_| {
            let stop = stop_rx.clone();
            tokio::spawn(async move {
                let mut c = Client::connect(entry).await;
                let (mut ok, mut failed) = (0usize, 0usize);
                for _ in 0..100_000 {
                    if *stop.borrow() {
                        break;
                    }
                    match c.get("/").await.0 {
                        StatusCode::OK => ok += 1,
                        _ => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let mut client = Client::connect(entry).await;
    assert_eq!(client.get("/").await.2, "v1");
    // An invalid document: refused, counted, the last good route stays.
    std::fs::write(&mesh.routes, split(0, 1).replace("weight: 0", "weight: -1")).expect("write");
    let mut refused = false;
    for _ in 0..200 {
        let m = mesh.proxy.metrics().await;
        if metric_value(&m, "tern_route_config_errors_total", "name=\"web\"") >= 1.0 {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "the invalid document was counted");
    for _ in 0..20 {
        assert_eq!(client.get("/").await.2, "v1", "the last good route stays");
    }
    std::fs::write(&mesh.routes, split(0, 1)).expect("write");
    let mut moved = false;
    for _ in 0..400 {
        if client.get("/").await.2 == "v2" {
            moved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(moved, "traffic moved to v2");
    for _ in 0..50 {
        assert_eq!(client.get("/").await.2, "v2", "all of it");
    }
    stop_tx.send(true).expect("stop");
    for l in loads {
        let (ok, failed) = l.await.expect("join");
        assert_eq!(failed, 0, "no request failed during the reloads ({ok} ok)");
        assert!(ok > 0);
    }
    let m = mesh.proxy.metrics().await;
    assert!(
        metric_value(
            &m,
            "tern_route_config_errors_total",
            "field=\"spec.rules[0].backendRefs[0].weight\""
        ) >= 1.0,
        "{m}"
    );
    drop(client);
    mesh.proxy.stop().await;
}

#[tokio::test]
async fn an_unknown_backend_fails_its_share_with_500() {
    let parent = App::start("parent", Behavior::Ok).await;
    let v1 = App::start("v1", Behavior::Ok).await;
    let routes = http_route(
        "      backendRefs:\n        - {name: web-v1, port: 10, weight: 1}\n        - {name: missing, port: 80, weight: 1}\n",
    );
    let mesh = Mesh::start(&[&parent], &[&v1], &[], &routes);
    let mut client = Client::connect(mesh.entry()).await;
    let (mut ok, mut invalid) = (0, 0);
    for _ in 0..100 {
        let (status, headers, _) = client.get("/").await;
        match status {
            StatusCode::OK => ok += 1,
            StatusCode::INTERNAL_SERVER_ERROR => {
                assert_eq!(headers["tern-proxy-error"], "invalid_backend");
                invalid += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(ok, v1.hits());
    assert!(
        ok > 20 && invalid > 20,
        "about half each: {ok} ok, {invalid} invalid"
    );
    drop(client);
    mesh.proxy.stop().await;
}

#[tokio::test]
async fn grpc_unavailable_is_retried_by_the_route_annotation() {
    let bad = App::start("bad", Behavior::Grpc(14)).await;
    let good = App::start("good", Behavior::Grpc(0)).await;
    let routes = "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata:\n  name: greeter\n  namespace: shop\n  annotations: {tern.io/retry-grpc: unavailable, tern.io/retry-backoff: 1ms}\nspec:\n  parentRefs: [{name: web}]\n";
    let mesh = Mesh::start(&[&bad, &good], &[], &[], routes);
    let mut grpc = GrpcClient::connect(mesh.entry()).await;
    for i in 0..30 {
        let (status, error) = grpc.call("/helloworld.Greeter/SayHello").await;
        assert_eq!(status.as_deref(), Some("0"), "call {i}: {error:?}");
    }
    assert!(bad.hits() >= 1, "the failing endpoint was tried");
    assert_eq!(good.hits(), 30);
    let m = mesh.proxy.metrics().await;
    assert_eq!(
        metric_value(&m, "tern_retries_total", "result=\"retried\""),
        bad.hits() as f64,
        "each UNAVAILABLE was retried (the streamed unary body was replayed): {m}"
    );
    drop(grpc);
    mesh.proxy.stop().await;
}
