//! `tern demo`: a two-proxy mesh on loopback, in one process, no root and no iptables.
//!
//! ```text
//!  demo clients ─▶ client-side tern (outbound, explicit mode) ─▶ server-side tern (inbound) ─▶ echo app
//! ```
//!
//! It pushes traffic through both proxies for `--duration`, then reads each proxy's `/metrics`
//! over HTTP, exactly as Prometheus would, and prints what they saw.

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

/// Runs the demo and prints its report to stdout.
pub fn main(args: &DemoArgs) -> anyhow::Result<()> {
    let rt = crate::app::runtime(1).context("building the runtime")?;
    rt.block_on(run(args))
}

async fn run(args: &DemoArgs) -> anyhow::Result<()> {
    println!("tern demo: two proxies and an echo app on loopback\n");
    let app = spawn_echo_app().await?;
    let server = Proxy::bind(loopback_config(TargetMode::OrigDst, TargetMode::Fixed(app)))?;
    let server_addrs = server.addrs()?;
    let client = Proxy::bind(loopback_config(
        TargetMode::Fixed(server_addrs.inbound),
        TargetMode::OrigDst,
    ))?;
    let client_addrs = client.addrs()?;
    let entry = client_addrs.outbound[0];
    println!("  echo app             {app}");
    println!(
        "  server-side tern     inbound {}  admin http://{}/metrics",
        server_addrs.inbound, server_addrs.admin
    );
    println!(
        "  client-side tern     outbound {}  admin http://{}/metrics\n",
        entry, client_addrs.admin
    );

    let (server_drain, server_watch) = Drain::new();
    let (client_drain, client_watch) = Drain::new();
    let server_task = tokio::spawn(server.run(server_drain.clone(), server_watch));
    let client_task = tokio::spawn(client.run(client_drain.clone(), client_watch));

    println!(
        "pushing traffic: {} connections for {:?} ...",
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
        "  clients echoed {} through both proxies: {:.1} MiB/s\n",
        human_bytes(echoed),
        echoed as f64 / elapsed.as_secs_f64() / (1024.0 * 1024.0)
    );

    report("client-side tern (outbound)", &client_addrs, "outbound").await?;
    report("server-side tern (inbound)", &server_addrs, "inbound").await?;

    client_drain.start();
    server_drain.start();
    client_task.await.context("client proxy panicked")??;
    server_task.await.context("server proxy panicked")??;
    println!("both proxies drained and stopped. Next: README.md, \"Run it as a sidecar\".");
    Ok(())
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

async fn report(title: &str, addrs: &ProxyAddrs, direction: &str) -> anyhow::Result<()> {
    let text = http_get(addrs.admin, "/metrics").await?.1;
    let pick = |name: &str| metric_value(&text, name, &format!("direction=\"{direction}\""));
    println!("{title}, from its /metrics:");
    println!(
        "  connections opened {:>8}   open now {:>4}",
        pick("tern_tcp_connections_total"),
        pick("tern_tcp_connections_open")
    );
    println!(
        "  bytes read         {:>8}   bytes written {:>8}",
        human_bytes(pick("tern_tcp_read_bytes_total") as u64),
        human_bytes(pick("tern_tcp_write_bytes_total") as u64)
    );
    println!(
        "  process RSS        {:>8}   CPU {:.2}s\n",
        human_bytes(metric_value(&text, "process_resident_memory_bytes", "") as u64),
        metric_value(&text, "process_cpu_seconds_total", "")
    );
    Ok(())
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
