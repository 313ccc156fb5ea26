//! Full mTLS handshake cost on one core: TLS 1.3, aws-lc-rs, X25519MLKEM768 (the default first
//! group), ECDSA P-256 leaves from the in-memory CA, both sides verifying SPIFFE identities, no
//! resumption. Client and server run in one thread over in-memory buffers (no sockets), so the
//! figures are CPU only; `server_side`/`client_side` count only the time spent in that side's calls.
//!
//! Run: `cargo bench --bench tls_handshake` (handshakes/s = 1 / time per iteration).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};
use rustls_pki_types::ServerName;
use tern::tls::mint::TestCa;
use tern::tls::{ClientTrustDomains, ExpectedServer, IdentityMetrics, IdentityStore, SpiffeId};

struct Pair {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

fn pair() -> Pair {
    let ca = TestCa::new("cluster.local").expect("CA");
    let store = |id: &str| {
        let id: SpiffeId = id.parse().expect("ID");
        let issued = ca.issue(&id, Duration::from_secs(3600)).expect("issue");
        IdentityStore::new(
            issued.identity().expect("identity"),
            ClientTrustDomains::Own,
            IdentityMetrics::default(),
        )
    };
    let server = store("spiffe://cluster.local/ns/shop/sa/web");
    let client = store("spiffe://cluster.local/ns/front/sa/gw");
    let expected =
        ExpectedServer::Exact("spiffe://cluster.local/ns/shop/sa/web".parse().expect("ID"));
    Pair {
        server: server.server_config(),
        client: client.client_config(&expected),
    }
}

/// Wall-clock time since the first call.
fn wall() -> Duration {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed()
}

/// Time this thread has spent on a CPU (`/proc/thread-self/schedstat`, nanoseconds): unlike wall
/// time, it does not grow while other processes hold the core.
fn thread_cpu() -> Duration {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat");
    let ns: u64 = s
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("schedstat format");
    Duration::from_nanos(ns)
}

/// One full handshake; returns (time in server calls, time in client calls) by `clock`.
fn handshake(pair: &Pair) -> (Duration, Duration) {
    handshake_by(pair, wall)
}

fn handshake_by(pair: &Pair, clock: fn() -> Duration) -> (Duration, Duration) {
    let mut buf = Vec::with_capacity(16 * 1024);
    let (mut t_server, mut t_client) = (Duration::ZERO, Duration::ZERO);

    let t = clock();
    let mut client = ClientConnection::new(
        pair.client.clone(),
        ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
    )
    .expect("client");
    t_client += clock() - t;
    let t = clock();
    let mut server = ServerConnection::new(pair.server.clone()).expect("server");
    t_server += clock() - t;

    for _ in 0..16 {
        if !client.is_handshaking() && !server.is_handshaking() {
            break;
        }
        let t = clock();
        buf.clear();
        while client.wants_write() {
            client.write_tls(&mut buf).expect("client write");
        }
        t_client += clock() - t;
        let t = clock();
        let mut rd = &buf[..];
        while !rd.is_empty() {
            server.read_tls(&mut rd).expect("server read");
            server.process_new_packets().expect("server handshake");
        }
        buf.clear();
        while server.wants_write() {
            server.write_tls(&mut buf).expect("server write");
        }
        t_server += clock() - t;
        let t = clock();
        let mut rd = &buf[..];
        while !rd.is_empty() {
            client.read_tls(&mut rd).expect("client read");
            client.process_new_packets().expect("client handshake");
        }
        t_client += clock() - t;
    }
    assert!(
        !client.is_handshaking() && !server.is_handshaking(),
        "handshake did not finish"
    );
    assert!(
        server.peer_certificates().is_some(),
        "no client certificate"
    );
    black_box((&client, &server));
    (t_server, t_client)
}

/// Handshakes per CPU-second, contention-proof: prints one line per side.
fn cpu_figures(pair: &Pair) {
    const N: u32 = 2000;
    let start = thread_cpu();
    let (mut server, mut client) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..N {
        let (s, c) = handshake_by(pair, thread_cpu);
        server += s;
        client += c;
    }
    let total = thread_cpu() - start;
    let per_sec = |d: Duration| f64::from(N) / d.as_secs_f64();
    println!(
        "mtls_handshake cpu: {N} handshakes; per CPU-second: pair {:.0}/s, server side {:.0}/s, client side {:.0}/s",
        per_sec(total),
        per_sec(server),
        per_sec(client)
    );
}

fn bench(c: &mut Criterion) {
    let pair = pair();
    cpu_figures(&pair);
    let mut g = c.benchmark_group("mtls_handshake");
    g.bench_function("pair", |b| b.iter(|| handshake(&pair)));
    g.bench_function("server_side", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| handshake(&pair).0).sum())
    });
    g.bench_function("client_side", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| handshake(&pair).1).sum())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
