//! A real tern proxy with Kubernetes discovery against [`super::fake_api`]: requests to a
//! Service VIP are balanced per request over the Service's endpoints (real loopback backends)
//! through the resilience stack, the meshed endpoint over mTLS through a real server proxy, and
//! the Service's `tern.io/retry-http` annotation retries a failing endpoint's 503s.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};

use super::ApiServer;
use super::fake_api::{FakeApi, pod, ready, service, slice};
use crate::config::{ProxyConfig, TargetMode};
use crate::testing::Running;
use crate::tls::SpiffeId;
use crate::tls::mint::TestCa;

const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/web";
const SERVER: &str = "spiffe://cluster.local/ns/shop/sa/api";
const VIP: &str = "198.18.10.1:80";

/// A backend answering `<name> client-id=<tern-client-id>`; `/flaky` gets 503 when `flaky`.
async fn backend(name: &'static str, flaky: bool) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                    let id = req
                        .headers()
                        .get("tern-client-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_owned();
                    let mut r =
                        Response::new(Full::new(Bytes::from(format!("{name} client-id={id}"))));
                    if flaky && req.uri().path() == "/flaky" {
                        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                    }
                    Ok::<_, std::convert::Infallible>(r)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn service_vip_is_balanced_meshed_and_retried_through_kubernetes_discovery() {
    let ca = TestCa::new("cluster.local").expect("ca");
    let issue = |id: &str| {
        ca.issue(
            &id.parse::<SpiffeId>().expect("id"),
            Duration::from_secs(3600),
        )
        .expect("issue")
        .identity()
        .expect("identity")
    };
    let a = backend("a", false).await;
    let b = backend("b", true).await;
    let c = backend("c", false).await;
    // c is meshed: its pod runs a tern proxy (explicit inbound mode to c).
    let mut sc = ProxyConfig::loopback();
    sc.inbound_target = TargetMode::Fixed(c);
    let server = Running::start(sc, Some(issue(SERVER)));

    let api = FakeApi::start().await;
    api.apply(service(
        "shop",
        "api",
        &["198.18.10.1"],
        &[("http", 80, json!("http"))],
        &[
            ("tern.io/retry-http", "5xx"),
            ("tern.io/retry-attempts", "2"),
        ],
    ));
    api.apply(pod("shop", "api-a", "api", "api", None));
    api.apply(pod("shop", "api-b", "api", "api", None));
    api.apply(pod(
        "shop",
        "api-c",
        "api",
        "api",
        Some(server.addrs.inbound.port()),
    ));
    // One slice per endpoint: on loopback the backends differ by port, and a slice's named
    // port is per slice (as with pods whose named targetPort resolves differently).
    for (name, addr) in [("api-a", a), ("api-b", b), ("api-c", c)] {
        api.apply(slice(
            "shop",
            name,
            "api",
            "IPv4",
            &[("http", addr.port())],
            &[ready("127.0.0.1", name)],
        ));
    }

    let mut cc = ProxyConfig::loopback();
    cc.outbound_target = TargetMode::Fixed(VIP.parse().expect("vip"));
    cc.kubernetes = Some(ApiServer::Url(api.url()));
    cc.pod_namespace = Some("shop".into());
    // Generous on a loaded machine: the first connection waits for the first lists.
    cc.discovery_timeout = Duration::from_secs(10);
    let client = Running::start(cc, Some(issue(CLIENT)));

    // One keep-alive connection: balanced per request, not per connection.
    let s = TcpStream::connect(client.addrs.outbound[0])
        .await
        .expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut get = async |path: &str| {
        let req = Request::get(path)
            .header("host", "api.shop")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = tx.send_request(req).await.expect("response");
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    for _ in 0..60 {
        let (status, body) = get("/").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        match body.split_once(' ') {
            Some(("c", id)) => assert_eq!(id, format!("client-id={CLIENT}"), "c over mTLS"),
            Some((_, id)) => assert_eq!(id, "client-id=-", "a and b in plaintext: {body}"),
            None => panic!("unexpected body {body}"),
        }
        *seen.entry(body[..1].to_string()).or_default() += 1;
    }
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        vec!["a", "b", "c"],
        "every endpoint gets requests: {seen:?}"
    );
    // b answers 503 on /flaky: the annotation's retry sends those to another endpoint. P2C
    // may avoid b for a while (peak-EWMA on a loaded machine), so send until a retry happened
    // (bounded); every answer must be a success.
    let mut retried = 0.0;
    for round in 0..10 {
        for _ in 0..12 {
            let (status, body) = get("/flaky").await;
            assert_eq!(status, StatusCode::OK, "retried away from b: {body}");
        }
        let metrics = client.metrics().await;
        retried = crate::demo::metric_value(&metrics, "tern_retries_total", "retried");
        if retried >= 1.0 || round == 9 {
            break;
        }
    }
    // Close the app's connection so the proxies drain at once.
    drop(tx);
    let metrics = client.metrics().await;
    assert!(retried >= 1.0, "b's 503s were retried: {metrics}");
    assert!(
        metrics.contains("tern_discovery_watches_active{resource=\"endpointslices\"} 1"),
        "{metrics}"
    );
    promtool_accepts(&metrics);
    let server_metrics = server.metrics().await;
    assert!(
        server_metrics.contains(CLIENT),
        "the server proxy saw the client's identity: {server_metrics}"
    );
    client.stop().await;
    server.stop().await;
}

/// `promtool check metrics` accepts the output (the discovery families included); without
/// promtool: a loud skip, or a failure under `CI=true`.
fn promtool_accepts(metrics: &str) {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but promtool is missing"
        );
        eprintln!("\n!!! SKIPPED promtool check: `promtool` is not installed !!!\n");
        return;
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(metrics.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool ran");
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An HTTPRoute watched from the API server splits a Service's traffic by path onto another
/// Service (a backend known only to Kubernetes discovery), and requests carry the route label.
#[tokio::test]
async fn api_server_httproute_sends_a_path_to_another_kubernetes_service() {
    let a = backend("a", false).await;
    let d = backend("d", false).await;
    let api = FakeApi::start().await;
    api.apply(service(
        "shop",
        "api",
        &["198.18.10.1"],
        &[("http", 80, json!("http"))],
        &[],
    ));
    api.apply(service(
        "shop",
        "api-v2",
        &["198.18.10.2"],
        &[("http", 80, json!("http"))],
        &[],
    ));
    api.apply(pod("shop", "api-a", "api", "api", None));
    api.apply(pod("shop", "api-d", "api-v2", "api", None));
    api.apply(slice(
        "shop",
        "api-a",
        "api",
        "IPv4",
        &[("http", a.port())],
        &[ready("127.0.0.1", "api-a")],
    ));
    api.apply(slice(
        "shop",
        "api-d",
        "api-v2",
        "IPv4",
        &[("http", d.port())],
        &[ready("127.0.0.1", "api-d")],
    ));
    api.apply(json!({
        "kind": "HTTPRoute",
        "metadata": {"namespace": "shop", "name": "api-split"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "api", "port": 80}],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/v2"}}],
                    "backendRefs": [{"name": "api-v2", "port": 80}]
                },
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                    "backendRefs": [{"name": "api", "port": 80}]
                }
            ]
        }
    }));

    let mut cc = ProxyConfig::loopback();
    cc.outbound_target = TargetMode::Fixed(VIP.parse().expect("vip"));
    cc.kubernetes = Some(ApiServer::Url(api.url()));
    cc.pod_namespace = Some("shop".into());
    cc.discovery_timeout = Duration::from_secs(10);
    let client = Running::start(cc, None);

    let get = async |path: &str| {
        let s = TcpStream::connect(client.addrs.outbound[0])
            .await
            .expect("connect");
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let req = Request::get(path)
            .header("host", "api.shop")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = tx.send_request(req).await.expect("response");
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    // The route arrives by watch and the backend's watches start on first use: poll, bounded.
    let mut last = (StatusCode::OK, String::new());
    for _ in 0..100 {
        last = get("/v2/items").await;
        if last.0 == StatusCode::OK && last.1.starts_with("d ") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        last.0 == StatusCode::OK && last.1.starts_with("d "),
        "/v2 reaches api-v2: {last:?}"
    );
    for _ in 0..5 {
        let (status, body) = get("/v2/x").await;
        assert_eq!((status, &body[..2]), (StatusCode::OK, "d "), "{body}");
        let (status, body) = get("/other").await;
        assert_eq!((status, &body[..2]), (StatusCode::OK, "a "), "{body}");
    }
    let metrics = client.metrics().await;
    assert!(
        metrics.contains("route=\"shop/api-split\""),
        "requests carry the route label: {metrics}"
    );
    client.stop().await;
}
