//! Pipeline tests of HTTP through real proxies on 127.0.0.1:0: hyper clients and servers at the
//! edges, rcgen-minted identities, the discovery file. Nothing of the proxy is mocked.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

use crate::config::{ProxyConfig, TargetMode};
use crate::demo::metric_value;
use crate::testing::Running;
use crate::tls::SpiffeId;
use crate::tls::mint::TestCa;

const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/web";
const SERVER: &str = "spiffe://cluster.local/ns/shop/sa/api";

/// An app speaking HTTP/1 and h2c: `/status/N` answers N; `/grpc/N` answers a gRPC response
/// whose trailers carry grpc-status N; anything else echoes what it saw as headers.
async fn app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    Ok::<_, std::convert::Infallible>(answer(req).await)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

async fn answer(req: Request<Incoming>) -> Response<crate::http::BoxBody> {
    let path = req.uri().path().to_owned();
    if let Some(code) = path.strip_prefix("/status/") {
        let mut r = Response::new(crate::http::empty());
        *r.status_mut() = code.parse().unwrap_or(StatusCode::BAD_REQUEST);
        return r;
    }
    if let Some(code) = path.strip_prefix("/grpc/") {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", code.parse().expect("value"));
        let frames = vec![
            Ok::<_, crate::http::BoxError>(hyper::body::Frame::data(Bytes::from_static(
                b"\0\0\0\0\x02hi",
            ))),
            Ok(hyper::body::Frame::trailers(trailers)),
        ];
        let body = crate::http::boxed(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )));
        let mut r = Response::new(body);
        r.headers_mut()
            .insert("content-type", "application/grpc".parse().expect("value"));
        return r;
    }
    let h = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned()
    };
    let text = format!(
        "version={:?} host={} authority={} client-id={} forged={} body={}",
        req.version(),
        h("host"),
        req.uri()
            .authority()
            .map(|a| a.to_string())
            .unwrap_or("-".into()),
        h("tern-client-id"),
        h("tern-forged"),
        String::from_utf8_lossy(&req.into_body().collect().await.expect("body").to_bytes()),
    );
    Response::new(crate::http::boxed(Full::new(Bytes::from(text))))
}

/// A meshed pair in front of `app`: returns (client proxy, server proxy).
fn mesh_pair(app: SocketAddr, dir: &std::path::Path) -> (Running, Running) {
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
    let mut sc = ProxyConfig::loopback();
    sc.inbound_target = TargetMode::Fixed(app);
    let server = Running::start(sc, Some(issue(SERVER)));
    let file = dir.join("discovery.yaml");
    std::fs::write(
        &file,
        format!(
            "services:\n  - name: api.shop\n    endpoints:\n      - address: \"{app}\"\n        identity: {SERVER}\n        mesh_port: {}\n",
            server.addrs.inbound.port()
        ),
    )
    .expect("write");
    let mut cc = ProxyConfig::loopback();
    cc.outbound_target = TargetMode::Fixed(app);
    cc.discovery_file = Some(file);
    let client = Running::start(cc, Some(issue(CLIENT)));
    (client, server)
}

async fn h1(entry: SocketAddr, req: Request<Full<Bytes>>) -> (StatusCode, http::HeaderMap, String) {
    let s = TcpStream::connect(entry).await.expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .expect("h1 handshake");
    tokio::spawn(conn);
    let resp = tx.send_request(req).await.expect("response");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

async fn h2(
    entry: SocketAddr,
    reqs: Vec<Request<Full<Bytes>>>,
) -> Vec<(StatusCode, http::HeaderMap, String, Option<http::HeaderMap>)> {
    let s = TcpStream::connect(entry).await.expect("connect");
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let mut out = Vec::new();
    for req in reqs {
        let resp = tx.send_request(req).await.expect("response");
        let (parts, body) = resp.into_parts();
        let collected = body.collect().await.expect("body");
        let trailers = collected.trailers().cloned();
        let body = collected.to_bytes();
        out.push((
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&body).into_owned(),
            trailers,
        ));
    }
    out
}

/// A GET; an origin-form target gets a `Host` (HTTP/1.1 requires one).
fn get(uri: &str) -> Request<Full<Bytes>> {
    let mut req = Request::get(uri);
    if !uri.contains("://") {
        req = req.header("host", "app");
    }
    req.body(Full::new(Bytes::new())).expect("request")
}

#[tokio::test]
async fn http1_through_the_mesh_restores_http1_and_identifies_the_client() {
    let dir = tempfile::tempdir().expect("tempdir");
    let app = app().await;
    let (client, server) = mesh_pair(app, dir.path());
    let entry = client.addrs.outbound[0];
    let req = Request::post("/echo")
        .header("host", "api.shop:8080")
        .header("tern-forged", "evil")
        .header("tern-client-id", "spiffe://cluster.local/ns/x/sa/forged")
        .body(Full::new(Bytes::from_static(b"payload")))
        .expect("request");
    let (status, _, body) = h1(entry, req).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("version=HTTP/1.1"), "{body}");
    assert!(body.contains("host=api.shop:8080"), "{body}");
    assert!(body.contains(&format!("client-id={CLIENT}")), "{body}");
    assert!(
        body.contains("forged=-"),
        "tern-* headers from the app are stripped: {body}"
    );
    assert!(body.contains("body=payload"), "{body}");

    let (status, _, _) = h1(entry, get("/status/503")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);

    let cm = client.metrics().await;
    let sm = server.metrics().await;
    let tls = "tls=\"true\"";
    assert_eq!(
        metric_value(&cm, "tern_http_requests_total", tls),
        2.0,
        "{cm}"
    );
    assert_eq!(
        metric_value(&cm, "tern_http_responses_total", "status_code=\"503\""),
        1.0,
        "{cm}"
    );
    assert_eq!(
        metric_value(
            &sm,
            "tern_http_requests_total",
            &format!("client_id=\"{CLIENT}\"")
        ),
        2.0,
        "{sm}"
    );
    assert_eq!(
        metric_value(&cm, "tern_detect_total", "protocol=\"http1\""),
        2.0,
        "{cm}"
    );
    assert_eq!(
        metric_value(&cm, "tern_mesh_connections_total", ""),
        1.0,
        "one pooled connection"
    );
    client.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn h2_and_grpc_through_the_mesh_keep_trailers_and_classify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let app = app().await;
    let (client, server) = mesh_pair(app, dir.path());
    let entry = client.addrs.outbound[0];
    let grpc = |code: &str| {
        Request::post(format!("http://api.shop/grpc/{code}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
            .expect("request")
    };
    let out = h2(
        entry,
        vec![get("http://api.shop/echo"), grpc("0"), grpc("5")],
    )
    .await;
    assert_eq!(out[0].0, StatusCode::OK);
    assert!(out[0].2.contains("version=HTTP/2.0"), "{}", out[0].2);
    assert!(out[0].2.contains("authority=api.shop"), "{}", out[0].2);
    assert_eq!(
        out[1].3.as_ref().map(|t| t["grpc-status"].clone()),
        Some("0".parse().expect("v"))
    );
    assert_eq!(
        out[2].3.as_ref().map(|t| t["grpc-status"].clone()),
        Some("5".parse().expect("v"))
    );
    // Responses are recorded at end of stream; give the proxies a moment to finish.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let cm = client.metrics().await;
    assert_eq!(
        metric_value(
            &cm,
            "tern_http_responses_total",
            "grpc_status=\"5\",classification=\"failure\""
        ),
        1.0,
        "{cm}"
    );
    assert_eq!(
        metric_value(
            &cm,
            "tern_http_responses_total",
            "grpc_status=\"0\",classification=\"success\""
        ),
        1.0,
        "{cm}"
    );
    let sm = server.metrics().await;
    assert_eq!(
        metric_value(&sm, "tern_http_responses_total", "grpc_status=\"5\""),
        1.0,
        "{sm}"
    );
    client.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn proxy_failures_become_responses() {
    // Plain outbound to a port where nothing listens: 502 with a reason; gRPC: UNAVAILABLE.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead = closed.local_addr().expect("addr");
    drop(closed);
    let mut c = ProxyConfig::loopback();
    c.outbound_target = TargetMode::Fixed(dead);
    let proxy = Running::start(c, None);
    let entry = proxy.addrs.outbound[0];
    let (status, headers, _) = h1(entry, get("/x")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(headers["tern-proxy-error"], "connect_refused");
    let req = Request::post("http://svc/pkg.Svc/Call")
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let out = h2(entry, vec![req]).await;
    assert_eq!(out[0].0, StatusCode::OK);
    assert_eq!(out[0].1["grpc-status"], "14");
    let m = proxy.metrics().await;
    assert_eq!(
        metric_value(&m, "tern_http_responses_total", "error=\"connect_refused\""),
        2.0,
        "{m}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn plain_inbound_http_is_measured_and_scrubbed() {
    let app = app().await;
    let mut c = ProxyConfig::loopback();
    c.inbound_target = TargetMode::Fixed(app);
    let proxy = Running::start(c, None);
    let req = Request::get("/echo")
        .header("host", "api")
        .header("tern-client-id", "spiffe://cluster.local/ns/x/sa/forged")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let (status, _, body) = h1(proxy.addrs.inbound, req).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.contains("client-id=-"),
        "a forged identity never reaches the app: {body}"
    );
    let m = proxy.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "tern_http_requests_total",
            "direction=\"inbound\",tls=\"false\""
        ),
        1.0,
        "{m}"
    );
    proxy.stop().await;
}

/// An HTTP/1 origin over raw bytes: answers every request with a mixed-case response header
/// and sends each request head it read (verbatim) on the channel.
async fn raw_origin() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
    use tokio::io::AsyncWriteExt;
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let Some(head) = crate::testing::read_head(&mut s).await else {
                    return;
                };
                let _ = tx.send(head);
                let resp = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Response-CaSe: y\r\n\r\nok";
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    (addr, rx)
}

/// Header names through a plain pair (client → outbound proxy → inbound proxy → origin), both
/// ways: kept as the HTTP/1 peers wrote them by default, lowercase with
/// `--http1-header-case lowercase`.
#[tokio::test]
async fn http1_header_case_is_preserved_or_lowercased_across_a_pair() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for case in [
        crate::http::HeaderCase::Preserve,
        crate::http::HeaderCase::Lowercase,
    ] {
        let (origin, mut heads) = raw_origin().await;
        let mut sc = ProxyConfig::loopback();
        sc.inbound_target = TargetMode::Fixed(origin);
        sc.http1_header_case = case;
        let server = Running::start(sc, None);
        let mut cc = ProxyConfig::loopback();
        cc.outbound_target = TargetMode::Fixed(server.addrs.inbound);
        cc.http1_header_case = case;
        let client = Running::start(cc, None);

        let mut s = TcpStream::connect(client.addrs.outbound[0])
            .await
            .expect("connect");
        s.write_all(b"GET /c HTTP/1.1\r\nHost: api\r\nX-MiXeD-Case: 1\r\nuser-agent: t\r\n\r\n")
            .await
            .expect("write");
        let mut resp = Vec::new();
        let mut b = [0u8; 1024];
        let read = tokio::time::timeout(Duration::from_secs(10), async {
            while !resp.ends_with(b"ok") {
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => resp.extend_from_slice(&b[..n]),
                }
            }
        });
        read.await.expect("a response within 10 s");
        let resp = String::from_utf8_lossy(&resp).into_owned();
        let head = tokio::time::timeout(Duration::from_secs(10), heads.recv())
            .await
            .expect("the origin saw a request")
            .expect("a head");
        let (req_names, resp_name) = match case {
            crate::http::HeaderCase::Preserve => (
                ["Host: api", "X-MiXeD-Case: 1", "user-agent: t"],
                "X-Response-CaSe: y",
            ),
            crate::http::HeaderCase::Lowercase => (
                ["host: api", "x-mixed-case: 1", "user-agent: t"],
                "x-response-case: y",
            ),
        };
        for want in req_names {
            assert!(
                head.contains(want),
                "{case:?}: {want:?} in the origin's head:\n{head}"
            );
        }
        assert!(resp.starts_with("HTTP/1.1 200"), "{case:?}: {resp}");
        assert!(
            resp.contains(resp_name),
            "{case:?}: {resp_name:?} in the client's response:\n{resp}"
        );
        client.stop().await;
        server.stop().await;
    }
}
