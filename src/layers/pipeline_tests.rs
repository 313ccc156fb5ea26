//! Pipeline tests of the outbound resilience stack: a real proxy on 127.0.0.1:0 whose discovery
//! file makes three hyper apps the endpoints of one service, driven by a hyper client over one
//! HTTP/1.1 connection (so any spreading is per request, not per connection). Nothing of the
//! proxy is mocked; the apps count what reaches them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

use crate::config::{ProxyConfig, TargetMode};
use crate::demo::metric_value;

/// The service address in the discovery file: the client's explicit outbound target. The proxy
/// never dials it (discovery maps it to the endpoints).
pub(crate) const SERVICE_ADDR: &str = "127.0.0.1:9";

#[derive(Debug, Clone, Copy)]
pub(crate) enum Behavior {
    /// 200 with the app's name.
    Ok,
    /// Always this status.
    Status(u16),
    /// 200 after this long.
    Slow(Duration),
    /// 200 with this `grpc-status` in the headers (a trailers-only gRPC answer).
    Grpc(u32),
}

/// A hyper app server counting the requests that reach it; killed (listener and every
/// connection closed) on `kill` or drop.
pub(crate) struct App {
    pub(crate) addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
    /// After `kill`: a socket bound to the app's port but not listening, so connections are
    /// refused and no parallel test's listener can take the port over.
    tombstone: Option<socket2::Socket>,
}

impl App {
    pub(crate) async fn start(name: &'static str, behavior: Behavior) -> App {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
        let addr = l.local_addr().expect("addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let task = tokio::spawn(async move {
            // Owned by the accept task: aborting it aborts every connection too.
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((s, _)) = l.accept().await {
                let h = h.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        h.fetch_add(1, Ordering::SeqCst);
                        async move {
                            // As servers do: the whole request before the answer.
                            let _ = req.into_body().collect().await;
                            let mut r =
                                Response::new(Full::new(Bytes::from_static(name.as_bytes())));
                            match behavior {
                                Behavior::Ok => {}
                                Behavior::Status(s) => {
                                    *r.status_mut() = StatusCode::from_u16(s).expect("status")
                                }
                                Behavior::Slow(d) => tokio::time::sleep(d).await,
                                Behavior::Grpc(code) => {
                                    r.headers_mut().insert("grpc-status", code.into());
                                }
                            }
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        App {
            addr,
            hits,
            task,
            tombstone: None,
        }
    }

    pub(crate) fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    async fn kill(&mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        s.set_reuse_address(true).expect("SO_REUSEADDR");
        s.bind(&self.addr.into()).expect("hold the dead app's port");
        self.tombstone = Some(s);
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A running proxy and the directory holding its discovery file.
struct Running {
    proxy: crate::testing::Running,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for Running {
    type Target = crate::testing::Running;
    fn deref(&self) -> &Self::Target {
        &self.proxy
    }
}

impl Running {
    /// A proxy whose discovery file has one service (`web.shop` at [`SERVICE_ADDR`]) with
    /// `apps` as endpoints and `policy` (YAML lines of the service entry) as its policy.
    fn start(apps: &[&App], policy: &str) -> Running {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("discovery.yaml");
        let mut yaml = format!(
            "services:\n  - name: web.shop\n    addresses: [\"{SERVICE_ADDR}\"]\n{policy}    endpoints:\n"
        );
        for a in apps {
            yaml.push_str(&format!("      - address: \"{}\"\n", a.addr));
        }
        std::fs::write(&file, yaml).expect("write");
        let mut c = ProxyConfig::loopback();
        c.outbound_target = TargetMode::Fixed(SERVICE_ADDR.parse().expect("addr"));
        c.discovery_file = Some(file);
        c.discovery_reload_interval = Duration::from_millis(50);
        Self::with_config(c, dir)
    }

    fn with_config(c: ProxyConfig, dir: tempfile::TempDir) -> Running {
        Running {
            proxy: crate::testing::Running::start(c, None),
            _dir: dir,
        }
    }

    async fn stop(self) {
        self.proxy.stop().await;
    }
}

/// One HTTP/1.1 connection to the proxy, requests sent one after another.
pub(crate) struct Client(SendRequest<Empty<Bytes>>);

impl Client {
    pub(crate) async fn connect(entry: SocketAddr) -> Client {
        let s = TcpStream::connect(entry).await.expect("connect");
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .expect("h1 handshake");
        tokio::spawn(conn);
        Client(tx)
    }

    pub(crate) async fn get(&mut self, path: &str) -> (StatusCode, http::HeaderMap, String) {
        self.0.ready().await.expect("connection open");
        let req = Request::get(path)
            .header("host", "web.shop")
            .body(Empty::new())
            .expect("request");
        let resp = self.0.send_request(req).await.expect("response");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        let body = String::from_utf8_lossy(&body).into_owned();
        (parts.status, parts.headers, body)
    }
}

#[tokio::test]
async fn requests_on_one_connection_spread_across_all_endpoints() {
    let apps = [
        App::start("a", Behavior::Ok).await,
        App::start("b", Behavior::Ok).await,
        App::start("c", Behavior::Ok).await,
    ];
    let proxy = Running::start(&[&apps[0], &apps[1], &apps[2]], "");
    let mut client = Client::connect(proxy.addrs.outbound[0]).await;
    for _ in 0..300 {
        let (status, _, _) = client.get("/").await;
        assert_eq!(status, StatusCode::OK);
    }
    let hits: Vec<usize> = apps.iter().map(App::hits).collect();
    assert_eq!(hits.iter().sum::<usize>(), 300, "{hits:?}");
    // Even an endpoint that looks slowest gets ~1/9 of the requests (P2C with replacement).
    assert!(
        hits.iter().all(|h| *h >= 10),
        "every endpoint serves: {hits:?}"
    );
    let m = proxy.metrics().await;
    assert_eq!(
        metric_value(&m, "tern_balancer_endpoints", "state=\"ready\""),
        3.0,
        "{m}"
    );
    drop(client);
    proxy.stop().await;
}

#[tokio::test]
async fn a_failing_endpoint_is_ejected_and_retries_hide_its_failures() {
    let apps = [
        App::start("a", Behavior::Ok).await,
        App::start("b", Behavior::Ok).await,
        App::start("bad", Behavior::Status(503)).await,
    ];
    let policy = "    retry:\n      on: [\"5xx\"]\n      attempts: 2\n";
    let proxy = Running::start(&[&apps[0], &apps[1], &apps[2]], policy);
    let mut client = Client::connect(proxy.addrs.outbound[0]).await;
    for i in 0..200 {
        let (status, _, body) = client.get("/").await;
        assert_eq!(status, StatusCode::OK, "request {i}: {body}");
    }
    let bad = apps[2].hits();
    // Ejected after 5 consecutive failures; probes after 1 s, 2 s, ... add a few at most.
    assert!(
        (5..=12).contains(&bad),
        "the failing endpoint got {bad} requests"
    );
    let m = proxy.metrics().await;
    let open = format!("endpoint=\"{}\",state=\"open\"", apps[2].addr);
    assert!(
        metric_value(&m, "tern_circuit_transitions_total", &open) >= 1.0,
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "tern_balancer_endpoints", "state=\"ready\""),
        2.0,
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "tern_retries_total", "result=\"retried\""),
        bad as f64,
        "each 503 was retried once, elsewhere: {m}"
    );
    assert_eq!(
        metric_value(
            &m,
            "tern_http_responses_total",
            "classification=\"failure\""
        ),
        0.0,
        "the client saw no failure: {m}"
    );
    drop(client);
    proxy.stop().await;
}

#[tokio::test]
async fn a_discovery_reload_moves_traffic_without_failing_requests() {
    let apps = [
        App::start("a", Behavior::Ok).await,
        App::start("b", Behavior::Ok).await,
        App::start("c", Behavior::Slow(Duration::from_millis(300))).await,
    ];
    let proxy = Running::start(&[&apps[0], &apps[1], &apps[2]], "");
    let file = proxy._dir.path().join("discovery.yaml");
    let entry = proxy.addrs.outbound[0];
    // Requests in flight on the slow endpoint while the file changes under them.
    let in_flight: Vec<_> = (0..6)
        .map(|_| {
            tokio::spawn(async move {
                let mut c = Client::connect(entry).await;
                c.get("/").await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let yaml = format!(
        "services:\n  - name: web.shop\n    addresses: [\"{SERVICE_ADDR}\"]\n    endpoints:\n      - address: \"{}\"\n",
        apps[0].addr
    );
    std::fs::write(&file, yaml).expect("rewrite");
    let mut client = Client::connect(entry).await;
    let mut moved = false;
    for _ in 0..400 {
        let (status, _, body) = client.get("/").await;
        assert_eq!(status, StatusCode::OK);
        if body == "a" {
            // Once only `a` answers several times in a row, the reload took effect.
            let mut only_a = true;
            for _ in 0..20 {
                let (status, _, body) = client.get("/").await;
                assert_eq!(status, StatusCode::OK);
                only_a &= body == "a";
            }
            if only_a {
                moved = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(moved, "traffic moved to the remaining endpoint");
    for t in in_flight {
        let (status, _, _) = t.await.expect("join");
        assert_eq!(status, StatusCode::OK, "in-flight requests finish");
    }
    drop(client);
    proxy.stop().await;
}

#[tokio::test]
async fn a_killed_endpoint_costs_no_failed_requests() {
    let mut apps = [
        App::start("a", Behavior::Ok).await,
        App::start("b", Behavior::Ok).await,
        App::start("c", Behavior::Ok).await,
    ];
    // No retry policy: requests refused at connect are retried by default.
    let proxy = Running::start(&[&apps[0], &apps[1], &apps[2]], "");
    let mut client = Client::connect(proxy.addrs.outbound[0]).await;
    for _ in 0..30 {
        assert_eq!(client.get("/").await.0, StatusCode::OK);
    }
    apps[2].kill().await;
    // Let the proxy's pooled connections to the dead app see their end.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = apps[2].hits();
    for i in 0..150 {
        let (status, headers, _) = client.get("/").await;
        assert_eq!(status, StatusCode::OK, "request {i}: {headers:?}");
    }
    assert_eq!(apps[2].hits(), before, "nothing reached the dead app");
    let m = proxy.metrics().await;
    assert!(
        metric_value(&m, "tern_retries_total", "result=\"retried\"") >= 1.0,
        "connection refused was retried: {m}"
    );
    let open = format!("endpoint=\"{}\",state=\"open\"", apps[2].addr);
    assert!(
        metric_value(&m, "tern_circuit_transitions_total", &open) >= 1.0,
        "{m}"
    );
    drop(client);
    proxy.stop().await;
}

#[tokio::test]
async fn a_slow_endpoint_hits_the_request_timeout() {
    let slow = App::start("slow", Behavior::Slow(Duration::from_secs(30))).await;
    let proxy = Running::start(&[&slow], "    timeout: 200ms\n");
    let mut client = Client::connect(proxy.addrs.outbound[0]).await;
    let started = Instant::now();
    let (status, headers, _) = client.get("/").await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(headers["tern-proxy-error"], "request_timeout");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let m = proxy.metrics().await;
    assert_eq!(
        metric_value(&m, "tern_http_responses_total", "error=\"request_timeout\""),
        1.0,
        "{m}"
    );
    drop(client);
    proxy.stop().await;
}

#[tokio::test]
async fn the_budget_stops_a_retry_storm() {
    // 429 is retried by this policy but is no failure to the breaker: nothing gets ejected,
    // so only the budget stands between the client and a storm.
    let apps = [
        App::start("a", Behavior::Status(429)).await,
        App::start("b", Behavior::Status(429)).await,
        App::start("c", Behavior::Status(429)).await,
    ];
    let policy = "    retry:\n      on: [\"429\"]\n      attempts: 3\n";
    let proxy = Running::start(&[&apps[0], &apps[1], &apps[2]], policy);
    let mut client = Client::connect(proxy.addrs.outbound[0]).await;
    let n = 300;
    let started = Instant::now();
    for _ in 0..n {
        assert_eq!(client.get("/").await.0, StatusCode::TOO_MANY_REQUESTS);
    }
    let secs = started.elapsed().as_secs_f64();
    let upstream: usize = apps.iter().map(App::hits).sum();
    // 20% of the requests, plus the floor: 10 at the start and 10 per second since.
    let bound = 1.2 * n as f64 + 10.0 + 10.0 * secs.ceil();
    assert!(
        (upstream as f64) <= bound,
        "{upstream} upstream requests for {n} (bound {bound})"
    );
    assert!(upstream > n, "some retries were allowed: {upstream}");
    let m = proxy.metrics().await;
    assert!(
        metric_value(&m, "tern_retries_total", "result=\"budget_exhausted\"") > 0.0,
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "tern_retries_total", "result=\"retried\""),
        (upstream - n) as f64,
        "{m}"
    );
    drop(client);
    proxy.stop().await;
}

/// Per-request overhead of the full stack vs the plain path, same run, same app:
/// `cargo test --release --lib layers::pipeline_tests::overhead -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "a measurement; run in release mode"]
async fn overhead_of_the_stack_vs_the_plain_path() {
    const N: usize = 20_000;
    let app = App::start("a", Behavior::Ok).await;
    let mut plain = ProxyConfig::loopback();
    plain.outbound_target = TargetMode::Fixed(app.addr);
    let plain = Running::with_config(plain, tempfile::tempdir().expect("tempdir"));
    let stacked = Running::start(
        &[&app],
        "    retry:\n      on: [\"5xx\"]\n      attempts: 2\n",
    );
    let mut results = Vec::new();
    for (name, proxy) in [
        ("plain", &plain),
        ("stack", &stacked),
        ("plain", &plain),
        ("stack", &stacked),
    ] {
        let mut client = Client::connect(proxy.addrs.outbound[0]).await;
        for _ in 0..1000 {
            client.get("/").await;
        }
        let started = Instant::now();
        for _ in 0..N {
            assert_eq!(client.get("/").await.0, StatusCode::OK);
        }
        let per = started.elapsed().as_secs_f64() * 1e6 / N as f64;
        println!("{name}: {per:.1} µs per request (N={N})");
        results.push((name, per));
    }
    let avg = |n: &str| {
        let v: Vec<f64> = results.iter().filter(|r| r.0 == n).map(|r| r.1).collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    let (p, s) = (avg("plain"), avg("stack"));
    println!(
        "plain {p:.1} µs, stack {s:.1} µs: +{:.1} µs per request, ratio {:.3}",
        s - p,
        s / p
    );
    assert!(s > 0.0 && p > 0.0);
    plain.stop().await;
    stacked.stop().await;
}
