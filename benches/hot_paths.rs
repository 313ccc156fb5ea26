//! Criterion micro-benchmarks for the per-connection and per-byte hot paths that exist today:
//!
//! - `metrics/*`: recording one connection in the TCP golden metrics (`TcpMetrics::conn`, the
//!   byte counters, `ConnMetrics::closed`), and the byte-counter increment alone.
//! - `copy/*`: `transport::copy::copy_bidirectional` over in-memory `tokio::io::duplex` pipes:
//!   one small request/response round trip on a long-lived connection (the per-request cost of
//!   keep-alive traffic through the opaque path) and a 1 MiB one-way transfer (per-byte cost).
//!
//! Run: `cargo bench --bench hot_paths` (add `-- --quick` for a short run). Protocol detection,
//! header rewriting, route matching and the balancer's pick get their groups when they land.

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

criterion_group!(benches, metrics, copy);
criterion_main!(benches);
