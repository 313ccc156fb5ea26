//! Criterion micro-benchmarks for the per-connection and per-byte hot paths that exist today:
//!
//! - `metrics/*`: recording one connection in the TCP golden metrics (`TcpMetrics::conn`, the
//!   byte counters, `ConnMetrics::closed`), and the byte-counter increment alone.
//! - `copy/*`: `transport::copy::copy_bidirectional` over in-memory `tokio::io::duplex` pipes:
//!   one small request/response round trip on a long-lived connection (the per-request cost of
//!   keep-alive traffic through the opaque path) and a 1 MiB one-way transfer (per-byte cost).
//!
//! - `detect/*`: protocol detection on a connection's first bytes (HTTP/1 request line, the
//!   HTTP/2 preface, opaque TLS ClientHello bytes).
//! - `headers/*`: the per-request header rewriting (hop-by-hop and `tern-*` stripping) on a
//!   typical request and on one that carries hop-by-hop headers.
//! - `http_metrics/request`: one request and its response through `HttpMetricsLayer` (handles
//!   resolved per connection).
//! - `balance/pick`: the balancer's power-of-two-choices pick over 8 endpoints.
//!
//! Run: `cargo bench --bench hot_paths` (add `-- --quick` for a short run). Route matching has
//! its own `benches/routes.rs`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

use tern::error::CloseReason;
use tern::metrics::{Direction, TcpLabels, TcpMetrics};
use tern::transport::copy::{ByteCounters, copy_bidirectional};

fn metrics(c: &mut Criterion) {
    let mut g = c.benchmark_group("metrics");
    let mut registry = Registry::default();
    let tcp = TcpMetrics::register(&mut registry);
    g.throughput(Throughput::Elements(1));
    g.bench_function("connection_lifecycle", |b| {
        b.iter(|| {
            let conn = tcp.conn(black_box(TcpLabels::plain(Direction::outbound)));
            conn.read.inc_by(black_box(512));
            conn.write.inc_by(black_box(4096));
            conn.closed(CloseReason::Eof, black_box(Duration::from_millis(3)));
        })
    });
    let conn = tcp.conn(TcpLabels::plain(Direction::inbound));
    g.bench_function("byte_counter_inc", |b| {
        b.iter(|| conn.read.inc_by(black_box(1460)))
    });
    // What a scrape costs the admin thread with both directions populated.
    let mut full = Registry::default();
    tern::metrics::register_build_and_process(&mut full);
    let m = TcpMetrics::register(full.sub_registry_with_prefix("tern"));
    m.conn(TcpLabels::plain(Direction::inbound))
        .closed(CloseReason::Eof, Duration::from_millis(1));
    m.conn(TcpLabels::plain(Direction::outbound))
        .closed(CloseReason::IoError, Duration::from_millis(1));
    g.bench_function("encode_registry", |b| {
        b.iter(|| black_box(tern::metrics::encode(&full)))
    });
    g.finish();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building a current-thread runtime cannot fail here")
}

fn copy(c: &mut Criterion) {
    const BUF: usize = 16 * 1024;
    let mut g = c.benchmark_group("copy");

    // One long-lived proxied connection; each iteration is a 100-byte request and a 100-byte
    // response through copy_bidirectional (app ⇄ proxy ⇄ server, all in memory).
    {
        let rt = runtime();
        let (mut client, mut client_proxy) = duplex(64 * 1024);
        let (mut server_proxy, mut server) = duplex(64 * 1024);
        rt.spawn(async move {
            let counters = ByteCounters::default();
            let _ = copy_bidirectional(&mut client_proxy, &mut server_proxy, BUF, &counters).await;
        });
        rt.spawn(async move {
            let mut req = [0u8; 100];
            while server.read_exact(&mut req).await.is_ok() {
                if server.write_all(&req).await.is_err() {
                    break;
                }
            }
        });
        let req = [7u8; 100];
        let mut resp = [0u8; 100];
        g.throughput(Throughput::Elements(1));
        g.bench_function("round_trip_100B", |b| {
            b.iter(|| {
                rt.block_on(async {
                    client.write_all(&req).await.expect("duplex write");
                    client.read_exact(&mut resp).await.expect("duplex read");
                })
            })
        });
    }

    // A fresh connection per iteration moving 1 MiB one way, then both sides close.
    {
        let rt = runtime();
        let payload = vec![1u8; 1 << 20];
        g.throughput(Throughput::Bytes(payload.len() as u64));
        g.bench_function("one_way_1MiB", |b| {
            b.iter(|| {
                rt.block_on(async {
                    let (mut client, mut client_proxy) = duplex(64 * 1024);
                    let (mut server_proxy, mut server) = duplex(64 * 1024);
                    let proxy = tokio::spawn(async move {
                        let counters = ByteCounters::default();
                        copy_bidirectional(&mut client_proxy, &mut server_proxy, BUF, &counters)
                            .await
                    });
                    let sink = tokio::spawn(async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        let mut n = 0usize;
                        loop {
                            match server.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(k) => n += k,
                            }
                        }
                        drop(server);
                        n
                    });
                    client.write_all(&payload).await.expect("duplex write");
                    client.shutdown().await.expect("half-close");
                    let mut rest = Vec::new();
                    client.read_to_end(&mut rest).await.expect("read to EOF");
                    let n = sink.await.expect("sink task");
                    assert_eq!(n, payload.len());
                    proxy.await.expect("proxy task").expect("copy ok");
                })
            })
        });
    }
    g.finish();
}

fn detect(c: &mut Criterion) {
    let mut g = c.benchmark_group("detect");
    g.throughput(Throughput::Elements(1));
    let h1 = b"GET /api/v1/items?page=2 HTTP/1.1\r\nHost: web.demo.svc.cluster.local\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n";
    let h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\x00\x00\x00\x00";
    let tls = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x8a\x1d\x00\x00\x00\x00";
    g.bench_function("http1_request_line", |b| {
        b.iter(|| tern::detect::classify_prefix(black_box(&h1[..])))
    });
    g.bench_function("h2_preface", |b| {
        b.iter(|| tern::detect::classify_prefix(black_box(&h2[..])))
    });
    g.bench_function("opaque_tls", |b| {
        b.iter(|| tern::detect::classify_prefix(black_box(&tls[..])))
    });
    g.finish();
}

fn request_headers(hop_by_hop: bool) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    for (k, v) in [
        ("host", "web.demo.svc.cluster.local"),
        ("user-agent", "curl/8.5.0"),
        ("accept", "*/*"),
        ("x-request-id", "0f5e3c1a-9b7d-4c2e-8f61-2d4b9a7c3e10"),
        ("content-type", "application/json"),
    ] {
        h.insert(k, v.parse().expect("value"));
    }
    if hop_by_hop {
        h.insert("connection", "keep-alive, x-trace".parse().expect("value"));
        h.insert("keep-alive", "timeout=5".parse().expect("value"));
        h.insert("x-trace", "1".parse().expect("value"));
        h.insert("tern-client-id", "spiffe://forged".parse().expect("value"));
    }
    h
}

fn headers(c: &mut Criterion) {
    let mut g = c.benchmark_group("headers");
    g.throughput(Throughput::Elements(1));
    for (name, hop) in [
        ("strip_typical_request", false),
        ("strip_hop_by_hop_present", true),
    ] {
        let template = request_headers(hop);
        g.bench_function(name, |b| {
            b.iter_batched_ref(
                || template.clone(),
                |h| {
                    tern::http::strip_tern_headers(h);
                    tern::http::strip_hop_by_hop(h);
                },
                criterion::BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn http_metrics(c: &mut Criterion) {
    use futures_util::FutureExt;
    use http_body_util::BodyExt;
    use tern::layers::http_metrics::{HttpMetrics, HttpMetricsLayer, RequestLabels};
    use tower::{Layer, Service};

    let mut g = c.benchmark_group("http_metrics");
    g.throughput(Throughput::Elements(1));
    let mut registry = Registry::default();
    let m = HttpMetrics::register(&mut registry);
    let layer = HttpMetricsLayer::new(
        m,
        RequestLabels {
            direction: Direction::outbound,
            tls: tern::metrics::Tls::Yes,
            client_id: String::new(),
            server_id: "spiffe://cluster.local/ns/demo/sa/web".into(),
            dst_service: "web.demo.svc.cluster.local".into(),
            route: String::new(),
        },
    );
    let mut svc = layer.layer(tower::service_fn(|_req: http::Request<()>| {
        std::future::ready(Ok::<_, std::convert::Infallible>(http::Response::new(
            tern::http::boxed(http_body_util::Full::new(bytes::Bytes::from_static(
                b"hello",
            ))),
        )))
    }));
    g.bench_function("request", |b| {
        b.iter(|| {
            let resp = svc
                .call(http::Request::new(()))
                .now_or_never()
                .expect("ready")
                .expect("infallible");
            black_box(resp.into_body().collect().now_or_never());
        })
    });
    g.finish();
}

fn balance(c: &mut Criterion) {
    use std::sync::Arc;
    use tern::discover::Endpoint;
    use tern::layers::balance::{BalanceMetrics, Balancer, EndpointSource};

    let mut g = c.benchmark_group("balance");
    g.throughput(Throughput::Elements(1));
    let eps: Arc<[Endpoint]> = (0..8)
        .map(|i| Endpoint {
            addr: std::net::SocketAddr::from(([198, 18, 0, 10 + i], 8080)),
            identity: None,
            weight: 1,
            mesh_port: 4143,
        })
        .collect();
    let source: EndpointSource = Arc::new(move || eps.clone());
    let b8 = Balancer::new("web".into(), source, &BalanceMetrics::default());
    g.bench_function("pick_of_8", |b| {
        b.iter(|| black_box(b8.pick(None).expect("endpoints")))
    });
    g.finish();
}

criterion_group!(
    benches,
    metrics,
    copy,
    detect,
    headers,
    http_metrics,
    balance
);
criterion_main!(benches);
