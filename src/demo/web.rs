//! The demo's HTTP part: an app speaking HTTP/1, h2c and gRPC, three load phases through the
//! mesh (HTTP/1, HTTP/2, gRPC), and per-protocol golden metrics read back from tern's
//! `/metrics`: request rate, success rate, p50/p99 latency (from the histogram, as
//! Prometheus's `histogram_quantile` computes it).
//!
//! The app fails one request in 20 (503, or gRPC UNAVAILABLE) so the success rate means
//! something.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

use super::http_get;
use crate::http::{BoxBody, BoxError, boxed};

/// Concurrent clients (HTTP/1 connections, or streams on one HTTP/2 connection) per phase.
const CONCURRENCY: usize = 4;

/// Starts the app on loopback; answers HTTP/1 and h2c on one port.
pub async fn spawn_app() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let served = Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            // As any latency-sensitive server does: no Nagle delay on small writes.
            let _ = s.set_nodelay(true);
            let served = served.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let n = served.fetch_add(1, Ordering::Relaxed);
                    async move { Ok::<_, std::convert::Infallible>(answer(req, n).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn answer(req: Request<Incoming>, n: u64) -> Response<BoxBody> {
    let fail = n % 20 == 19;
    let grpc = crate::http::is_grpc(req.headers());
    // Read the request body to its end, as a real server would.
    let _ = req.into_body().collect().await;
    if grpc {
        let mut trailers = http::HeaderMap::new();
        let status = if fail { "14" } else { "0" };
        trailers.insert("grpc-status", http::HeaderValue::from_static(status));
        let frames = vec![
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"\0\0\0\0\x05hello"))),
            Ok(Frame::trailers(trailers)),
        ];
        let body = boxed(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )));
        let mut r = Response::new(body);
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        return r;
    }
    let mut r = Response::new(boxed(Full::new(Bytes::from_static(
        b"hello from the mesh\n",
    ))));
    if fail {
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    }
    r
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Http1,
    Http2,
    Grpc,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Http1 => "HTTP/1.1",
            Phase::Http2 => "HTTP/2",
            Phase::Grpc => "gRPC",
        }
    }
}

/// Runs the three phases through the client-side proxy at `entry` and prints what its
/// metrics saw for each.
pub async fn run(entry: SocketAddr, admin: SocketAddr, duration: Duration) -> anyhow::Result<()> {
    let each = (duration / 3).max(Duration::from_millis(300));
    println!(
        "HTTP through the mesh: {CONCURRENCY} concurrent clients, {each:?} per protocol; one app \
         response in 20 fails on purpose"
    );
    println!(
        "  {:<9} {:>9} {:>9} {:>9} {:>9}   (from the client-side tern's /metrics)",
        "protocol", "req/s", "success", "p50", "p99"
    );
    for phase in [Phase::Http1, Phase::Http2, Phase::Grpc] {
        let before = Snapshot::read(admin).await?;
        let started = Instant::now();
        load(phase, entry, each).await?;
        let elapsed = started.elapsed();
        let after = Snapshot::read(admin).await?;
        let d = after.minus(&before);
        println!(
            "  {:<9} {:>9.0} {:>8.1}% {:>9} {:>9}",
            phase.name(),
            d.total() / elapsed.as_secs_f64(),
            100.0 * d.success / d.total().max(1.0),
            fmt_secs(d.quantile(0.5)),
            fmt_secs(d.quantile(0.99)),
        );
    }
    println!();
    Ok(())
}

async fn load(phase: Phase, entry: SocketAddr, each: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + each;
    match phase {
        Phase::Http1 => {
            let mut tasks = Vec::new();
            for _ in 0..CONCURRENCY {
                tasks.push(tokio::spawn(async move {
                    let s = TcpStream::connect(entry).await?;
                    s.set_nodelay(true)?;
                    s.set_nodelay(true)?;
                    let (mut tx, conn) =
                        hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
                    tokio::spawn(conn);
                    while Instant::now() < deadline {
                        let req = Request::get("/hello")
                            .header(http::header::HOST, "web.demo")
                            .body(Full::new(Bytes::new()))?;
                        let resp = tx.send_request(req).await?;
                        resp.into_body().collect().await?;
                    }
                    Ok::<_, anyhow::Error>(())
                }));
            }
            for t in tasks {
                t.await.context("HTTP/1 client panicked")??;
            }
        }
        Phase::Http2 | Phase::Grpc => {
            let s = TcpStream::connect(entry).await?;
            s.set_nodelay(true)?;
            let (tx, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
                    .await?;
            tokio::spawn(conn);
            let mut tasks = Vec::new();
            for _ in 0..CONCURRENCY {
                let mut tx = tx.clone();
                tasks.push(tokio::spawn(async move {
                    while Instant::now() < deadline {
                        let req = if phase == Phase::Grpc {
                            Request::post("http://web.demo/demo.Greeter/Hello")
                                .header(http::header::CONTENT_TYPE, "application/grpc")
                                .header(http::header::TE, "trailers")
                                .body(Full::new(Bytes::from_static(b"\0\0\0\0\x02hi")))?
                        } else {
                            Request::get("http://web.demo/hello").body(Full::new(Bytes::new()))?
                        };
                        let resp = tx.send_request(req).await?;
                        resp.into_body().collect().await?;
                    }
                    Ok::<_, anyhow::Error>(())
                }));
            }
            for t in tasks {
                t.await.context("HTTP/2 client panicked")??;
            }
        }
    }
    Ok(())
}

/// Outbound request metrics at one moment: outcomes and the latency histogram's buckets.
#[derive(Debug, Default, Clone)]
struct Snapshot {
    success: f64,
    failure: f64,
    /// (upper bound in seconds, cumulative count)
    buckets: Vec<(f64, f64)>,
}

impl Snapshot {
    async fn read(admin: SocketAddr) -> anyhow::Result<Self> {
        // Responses are recorded when their stream ends; let the last ones land.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let text = http_get(admin, "/metrics").await?.1;
        let mut s = Snapshot {
            success: super::metric_value(
                &text,
                "tern_http_responses_total",
                "classification=\"success\"",
            ),
            failure: super::metric_value(
                &text,
                "tern_http_responses_total",
                "classification=\"failure\"",
            ),
            buckets: Vec::new(),
        };
        let mut by_le: std::collections::BTreeMap<u64, (f64, f64)> = Default::default();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("tern_http_response_duration_seconds_bucket{")
            else {
                continue;
            };
            let Some((labels, value)) = rest.rsplit_once("} ") else {
                continue;
            };
            let le = labels
                .split(',')
                .find_map(|l| l.strip_prefix("le=\""))
                .map(|v| v.trim_end_matches('"'));
            let (Some(le), Ok(count)) = (le, value.trim().parse::<f64>()) else {
                continue;
            };
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::INFINITY)
            };
            let e = by_le.entry(le.to_bits()).or_insert((le, 0.0));
            e.1 += count;
        }
        let mut buckets: Vec<(f64, f64)> = by_le.into_values().collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        s.buckets = buckets;
        Ok(s)
    }

    fn minus(&self, before: &Snapshot) -> Snapshot {
        let buckets = self
            .buckets
            .iter()
            .map(|(le, c)| {
                let prev = before
                    .buckets
                    .iter()
                    .find(|(l, _)| l == le)
                    .map_or(0.0, |(_, c)| *c);
                (*le, c - prev)
            })
            .collect();
        Snapshot {
            success: self.success - before.success,
            failure: self.failure - before.failure,
            buckets,
        }
    }

    fn total(&self) -> f64 {
        self.success + self.failure
    }

    /// Linear interpolation inside the bucket holding the q-th observation.
    fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.buckets.last()?.1;
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let mut prev = (0.0, 0.0);
        for &(le, count) in &self.buckets {
            if count >= rank {
                if le.is_infinite() {
                    return Some(prev.0);
                }
                let width = count - prev.1;
                let frac = if width > 0.0 {
                    (rank - prev.1) / width
                } else {
                    1.0
                };
                return Some(prev.0 + (le - prev.0) * frac);
            }
            prev = (le, count);
        }
        None
    }
}

fn fmt_secs(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(s) if s < 0.001 => format!("{:.0}µs", s * 1e6),
        Some(s) => format!("{:.2}ms", s * 1e3),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_like_prometheus() {
        let s = Snapshot {
            success: 100.0,
            failure: 0.0,
            buckets: vec![
                (0.001, 50.0),
                (0.002, 90.0),
                (0.004, 100.0),
                (f64::INFINITY, 100.0),
            ],
        };
        let p50 = s.quantile(0.5).expect("p50");
        assert!((p50 - 0.001).abs() < 1e-9, "{p50}");
        let p90 = s.quantile(0.9).expect("p90");
        assert!((p90 - 0.002).abs() < 1e-9, "{p90}");
        let p99 = s.quantile(0.99).expect("p99");
        assert!((p99 - 0.0038).abs() < 1e-9, "{p99}");
        assert_eq!(Snapshot::default().quantile(0.5), None);
    }
}
