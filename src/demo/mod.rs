//! `tern demo`: a small mesh on loopback, in one process, no root and no iptables: an in-memory CA
//! (rcgen) mints three SPIFFE identities, and real proxies carry real traffic over mTLS.
//!
//! ```text
//!  TCP clients  ─▶ client-side tern (tcp)  ═mTLS═╗
//!  HTTP clients ─▶ client-side tern (http) ═mTLS═╬═▶ server-side tern ─┬─▶ echo app (TCP)
//!  intruder     ─▶ intruder tern           ═mTLS═╣   (policy)          ├─▶ HTTP/1 + h2c + gRPC app
//!  shop clients ─▶ client-side tern (shop) ═mTLS═╝                     └─▶ shop.demo: fast, slow,
//!                  (per request: retry ─▶ balance ─▶ breaker)               flaky backends
//! ```
//!
//! Explicit mode gives each client-side listener one target, so the TCP and HTTP clients go
//! through two client-side proxies with the same identity; in a pod, one proxy does both.
//!
//! It pushes traffic through both proxies for `--duration`, then reads each proxy's `/metrics`
//! over HTTP, exactly as Prometheus would, and prints what they saw. Last, the resilience part
//! ([`faults`]) runs for twice `--duration`: requests to a service with one slow and one flaky
//! backend, and how they moved between the backends.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::app::{Proxy, ProxyAddrs};
use crate::cli::DemoArgs;
use crate::config::{ProxyConfig, TargetMode};
use crate::drain::Drain;
use crate::tls::SpiffeId;
use crate::tls::mint::TestCa;

mod faults;
mod web;

/// Runs the demo and prints its report to stdout.
pub fn main(args: &DemoArgs) -> anyhow::Result<()> {
    let rt = crate::app::runtime(1).context("building the runtime")?;
    rt.block_on(run(args))
}

const TRUST_DOMAIN: &str = "cluster.local";
const ECHO_ID: &str = "spiffe://cluster.local/ns/demo/sa/echo";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";
const INTRUDER_ID: &str = "spiffe://cluster.local/ns/demo/sa/intruder";
/// The service address of `shop.demo`: discovery maps it to the backends; nothing listens.
const SHOP_ADDR: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1)),
    9,
);

async fn run(args: &DemoArgs) -> anyhow::Result<()> {
    println!("tern demo: a meshed echo service on loopback (no root, no iptables)\n");
    let ca = TestCa::new(TRUST_DOMAIN).context("minting the demo CA")?;
    let identity = |id: &str| -> anyhow::Result<crate::tls::Identity> {
        let id: SpiffeId = id.parse()?;
        Ok(ca.issue(&id, Duration::from_secs(3600))?.identity()?)
    };
    let app = spawn_echo_app().await?;
    let http_app = web::spawn_app().await?;
    let backends = faults::Backends::spawn().await?;

    // The server side: only the client's identity may reach the apps' ports. Mesh streams name
    // their port, and the proxy connects to it on loopback (its own address).
    let mut server_cfg = loopback_config(TargetMode::OrigDst, TargetMode::OrigDst);
    server_cfg.inbound_policy = vec![
        format!("{}={CLIENT_ID}", app.port()).parse()?,
        format!("{}={CLIENT_ID}", http_app.port()).parse()?,
    ];
    for port in backends.ports() {
        server_cfg
            .inbound_policy
            .push(format!("{port}={CLIENT_ID}").parse()?);
    }
    let server = Proxy::bind_with_identity(server_cfg, Some(identity(ECHO_ID)?))?;
    let server_addrs = server.addrs()?;

    // Discovery tells the client side that the app is meshed, with the echo identity.
    let dir = DemoDir::new()?;
    let discovery = dir.path.join("discovery.yaml");
    std::fs::write(
        &discovery,
        format!(
            "services:\n  - name: echo.demo\n    endpoints:\n      - address: \"{app}\"\n        identity: {ECHO_ID}\n        mesh_port: {port}\n  - name: web.demo\n    endpoints:\n      - address: \"{http_app}\"\n        identity: {ECHO_ID}\n        mesh_port: {port}\n{shop}",
            port = server_addrs.inbound.port(),
            shop = faults::discovery_entry(
                &backends,
                SHOP_ADDR,
                ECHO_ID,
                server_addrs.inbound.port()
            ),
        ),
    )
    .context("writing the demo discovery file")?;
    let client_side = |id: &str, target: SocketAddr| -> anyhow::Result<Proxy> {
        let mut c = loopback_config(TargetMode::Fixed(target), TargetMode::OrigDst);
        c.discovery_file = Some(discovery.clone());
        Proxy::bind_with_identity(c, Some(identity(id)?))
    };
    let client = client_side(CLIENT_ID, app)?;
    let client_addrs = client.addrs()?;
    let http_client = client_side(CLIENT_ID, http_app)?;
    let http_addrs = http_client.addrs()?;
    let intruder = client_side(INTRUDER_ID, app)?;
    let intruder_addrs = intruder.addrs()?;
    let shop_client = client_side(CLIENT_ID, SHOP_ADDR)?;
    let shop_addrs = shop_client.addrs()?;
    let entry = client_addrs.outbound[0];

    println!("  in-memory CA          trust domain {TRUST_DOMAIN}");
    println!("  echo app (TCP)        {app}");
    println!("  web app               {http_app}  (HTTP/1, h2c, gRPC)");
    println!("  server-side tern      {ECHO_ID}");
    println!(
        "                        mesh {}  admin http://{}/metrics",
        server_addrs.inbound, server_addrs.admin
    );
    println!("  client-side tern      {CLIENT_ID}");
    println!(
        "                        tcp outbound {entry}  admin http://{}/metrics",
        client_addrs.admin
    );
    println!(
        "                        http outbound {}  admin http://{}/metrics",
        http_addrs.outbound[0], http_addrs.admin
    );
    println!("  intruder tern         {INTRUDER_ID}");
    println!(
        "  shop backends         fast {}, slow {}, flaky {}  (service {}, address {SHOP_ADDR})",
        backends.0[0].addr,
        backends.0[1].addr,
        backends.0[2].addr,
        faults::SERVICE
    );
    println!(
        "                        client-side outbound {}  admin http://{}/metrics",
        shop_addrs.outbound[0], shop_addrs.admin
    );
    println!("  policy on the apps' ports admits only {CLIENT_ID}\n");

    let mut running = Vec::new();
    for proxy in [server, client, http_client, intruder, shop_client] {
        let (drain, watch) = Drain::new();
        running.push((drain.clone(), tokio::spawn(proxy.run(drain, watch))));
    }

    println!(
        "pushing traffic: {} connections for {:?}, client → tern ═mTLS═▶ tern → echo ...",
        args.connections, args.duration
    );
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..args.connections.max(1) {
        clients.push(tokio::spawn(echo_client(entry, args.duration)));
    }
    let mut echoed = 0u64;
    for c in clients {
        echoed += c.await.context("demo client panicked")??;
    }
    let elapsed = started.elapsed();
    println!(
        "  echoed {} intact through both proxies: {:.1} MiB/s",
        human_bytes(echoed),
        echoed as f64 / elapsed.as_secs_f64() / (1024.0 * 1024.0)
    );
    let denied = intruder_attempt(intruder_addrs.outbound[0]).await;
    println!(
        "  the intruder's connection: {}\n",
        if denied {
            "refused by the echo proxy's policy, as it should be"
        } else {
            "NOT refused (a bug!)"
        }
    );

    report_client(&client_addrs).await?;
    report_server(&server_addrs).await?;

    web::run(http_addrs.outbound[0], http_addrs.admin, args.duration).await?;
    let shop = faults::run(
        shop_addrs.outbound[0],
        shop_addrs.admin,
        &backends,
        (args.duration * 2).max(Duration::from_secs(2)),
    )
    .await?;

    for (drain, _) in &running {
        drain.start();
    }
    for (_, task) in running {
        task.await.context("a proxy panicked")??;
    }
    println!("all proxies drained and stopped. Next: README.md, \"Run it as a sidecar\".");
    anyhow::ensure!(denied, "the intruder was not refused");
    anyhow::ensure!(
        shop.ok * 100 >= (shop.ok + shop.failed) * 99,
        "the client saw fewer than 99% of shop.demo requests succeed: {shop:?}"
    );
    Ok(())
}

/// A scratch directory for the demo's discovery file, removed on drop.
struct DemoDir {
    path: std::path::PathBuf,
}

impl DemoDir {
    fn new() -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("tern-demo-{}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(DemoDir { path })
    }
}

impl Drop for DemoDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// True when the intruder's connection is closed without an echo.
async fn intruder_attempt(entry: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(entry).await else {
        return false;
    };
    let _ = s.write_all(b"let me in").await;
    let _ = s.shutdown().await;
    let mut back = Vec::new();
    let _ = s.read_to_end(&mut back).await;
    back.is_empty()
}

fn loopback_config(outbound: TargetMode, inbound: TargetMode) -> ProxyConfig {
    let mut c = ProxyConfig::loopback();
    c.outbound_target = outbound;
    c.inbound_target = inbound;
    c.max_connections = 1000;
    c.shutdown_grace_period = Duration::from_secs(5);
    c
}

async fn spawn_echo_app() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            // Like any latency-sensitive server: without TCP_NODELAY, Nagle's algorithm and
            // delayed ACKs add up to 40 ms to every small write.
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(addr)
}

/// Writes 64 KiB chunks and reads the echo back until `duration` passes; returns bytes echoed.
async fn echo_client(entry: SocketAddr, duration: Duration) -> anyhow::Result<u64> {
    let mut s = TcpStream::connect(entry)
        .await
        .context("connecting to tern")?;
    let chunk = vec![0x5a; 64 * 1024];
    let mut back = vec![0; 64 * 1024];
    let deadline = Instant::now() + duration;
    let mut total = 0u64;
    while Instant::now() < deadline {
        s.write_all(&chunk).await?;
        s.read_exact(&mut back).await?;
        anyhow::ensure!(back == chunk, "echo came back corrupted");
        total += chunk.len() as u64;
    }
    s.shutdown().await?;
    Ok(total)
}

async fn report_client(addrs: &ProxyAddrs) -> anyhow::Result<()> {
    let m = http_get(addrs.admin, "/metrics").await?.1;
    let server = format!("server_id=\"{ECHO_ID}\"");
    println!("client-side tern, from its /metrics:");
    println!(
        "  connections to {ECHO_ID} over mTLS: {}",
        metric_value(&m, "tern_tcp_connections_total", &server)
    );
    println!(
        "  bytes sent {}   received {}",
        human_bytes(metric_value(&m, "tern_tcp_read_bytes_total", &server) as u64),
        human_bytes(metric_value(&m, "tern_tcp_write_bytes_total", &server) as u64)
    );
    println!(
        "  proxy-to-proxy connections: {} (pooled: every client connection is an HTTP/2 stream on it)",
        metric_value(&m, "tern_mesh_connections_total", "")
    );
    print_process(&m);
    Ok(())
}

async fn report_server(addrs: &ProxyAddrs) -> anyhow::Result<()> {
    let m = http_get(addrs.admin, "/metrics").await?.1;
    let client = format!("client_id=\"{CLIENT_ID}\"");
    println!("server-side tern, from its /metrics:");
    println!(
        "  connections from {CLIENT_ID}: {}",
        metric_value(&m, "tern_tcp_connections_total", &client)
    );
    println!(
        "  authorization: {} allowed, {} denied",
        metric_value(&m, "tern_inbound_authz_total", "decision=\"allow\""),
        metric_value(&m, "tern_inbound_authz_total", "decision=\"deny\"")
    );
    print_process(&m);
    Ok(())
}

fn print_process(m: &str) {
    println!(
        "  process (all proxies share this demo process): RSS {}, CPU {:.2}s\n",
        human_bytes(metric_value(m, "process_resident_memory_bytes", "") as u64),
        metric_value(m, "process_cpu_seconds_total", "")
    );
}

/// Sums the samples of `name` whose labels contain `label` (empty: every sample).
pub fn metric_value(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let base = series.split('{').next()?;
            (base == name && series.contains(label)).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// A GET over HTTP/1.1 with hyper's client; returns the status and the body as text.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}
