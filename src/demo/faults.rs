//! The demo's resilience part: three backends behind one discovery service (`shop.demo`), one
//! slow and one failing for a while, requests at a fixed rate through the client-side tern,
//! and what happened: each backend's share of the requests over time (they move away from the
//! failing and the slow one, and back once the failing one recovers), retries within the
//! budget, circuit breaker transitions, and the success rate the client sees.
//!
//! The backends sit behind the server-side tern like the other apps, so every request also
//! crosses the mesh (mTLS) to a balanced endpoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use super::{http_get, metric_value};

/// The service's name in the demo's discovery file.
pub const SERVICE: &str = "shop.demo";
/// Requests per second the client sends.
const RATE: u64 = 200;
/// How much the slow backend adds to each answer.
const SLOW: Duration = Duration::from_millis(20);
/// Rows in the share-over-time table.
const WINDOWS: u32 = 8;

/// One backend: its address, what it is doing, how many requests reached it.
#[derive(Debug)]
pub struct Backend {
    pub name: &'static str,
    pub addr: SocketAddr,
    failing: Arc<AtomicBool>,
    hits: Arc<AtomicU64>,
}

/// The three backends: `fast`, `slow` (+20 ms), `flaky` (answers 503 while told to).
#[derive(Debug)]
pub struct Backends(pub [Backend; 3]);

impl Backends {
    pub async fn spawn() -> anyhow::Result<Backends> {
        Ok(Backends([
            spawn("fast", Duration::ZERO).await?,
            spawn("slow", SLOW).await?,
            spawn("flaky", Duration::ZERO).await?,
        ]))
    }

    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.0.iter().map(|b| b.addr.port())
    }

    fn hits(&self) -> [u64; 3] {
        [0, 1, 2].map(|i| self.0[i].hits.load(Ordering::Relaxed))
    }
}

async fn spawn(name: &'static str, delay: Duration) -> anyhow::Result<Backend> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let failing = Arc::new(AtomicBool::new(false));
    let hits = Arc::new(AtomicU64::new(0));
    let (f, h) = (failing.clone(), hits.clone());
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            let (f, h) = (f.clone(), h.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                    h.fetch_add(1, Ordering::Relaxed);
                    let fail = f.load(Ordering::Relaxed);
                    async move {
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        let mut r = Response::new(Full::new(Bytes::from_static(name.as_bytes())));
                        if fail {
                            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
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
    Ok(Backend {
        name,
        addr,
        failing,
        hits,
    })
}

/// The discovery file entry of the service (endpoints meshed behind the server-side tern).
pub fn discovery_entry(
    backends: &Backends,
    service_addr: SocketAddr,
    identity: &str,
    mesh_port: u16,
) -> String {
    let mut s = format!(
        "  - name: {SERVICE}\n    addresses: [\"{service_addr}\"]\n    retry:\n      on: [\"5xx\"]\n      attempts: 2\n    endpoints:\n"
    );
    for b in &backends.0 {
        s.push_str(&format!(
            "      - address: \"{}\"\n        identity: {identity}\n        mesh_port: {mesh_port}\n",
            b.addr
        ));
    }
    s
}

/// What the client saw in one window.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    ok: u64,
    failed: u64,
}

/// Sends requests at a fixed rate through `entry` for `length`; `flaky` answers 503 from the
/// second to the fourth of eight windows. Prints the share of each backend per window and
/// what the client-side tern's metrics say.
pub async fn run(
    entry: SocketAddr,
    admin: SocketAddr,
    backends: &Backends,
    length: Duration,
) -> anyhow::Result<Outcome> {
    let window = length / WINDOWS;
    let (fail_from, fail_to) = (1, 4);
    println!(
        "Resilience: {SERVICE} has three backends behind the mesh; \"slow\" adds {SLOW:?}, \"flaky\" \
         answers 503 from {:.1?} to {:.1?}.",
        window * fail_from,
        window * fail_to
    );
    println!(
        "  {RATE} requests/s for {length:.1?} through the client-side tern (retry on 5xx, 2 attempts, budget 20% + 10/s)"
    );
    println!(
        "  {:<12} {:>7} {:>7} {:>7}   {:>8}   (share of the requests each backend served;",
        "time", backends.0[0].name, backends.0[1].name, backends.0[2].name, "client"
    );
    println!(
        "  {:<12} {:>7} {:>7} {:>7}   {:>8}    client: success rate it saw)",
        "", "", "", "", ""
    );
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(5))
        .build_http::<Empty<Bytes>>();
    let seen = Arc::new(std::sync::Mutex::new(vec![
        Seen::default();
        WINDOWS as usize
    ]));
    let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / RATE));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    let mut last_hits = backends.hits();
    let mut current = 0u32;
    let mut rows = Vec::new();
    loop {
        tick.tick().await;
        let elapsed = started.elapsed();
        let w = (elapsed.as_nanos() / window.as_nanos().max(1)) as u32;
        if w != current {
            // A window ended: let its last requests land, then read the backends' counters.
            let hits = backends.hits();
            let delta = [0, 1, 2].map(|i| hits[i] - last_hits[i]);
            last_hits = hits;
            rows.push((current, delta));
            current = w;
        }
        if w >= WINDOWS {
            break;
        }
        backends.0[2]
            .failing
            .store((fail_from..fail_to).contains(&w), Ordering::Relaxed);
        let (client, seen, latencies) = (client.clone(), seen.clone(), latencies.clone());
        let uri: http::Uri = format!("http://{entry}/").parse()?;
        tasks.spawn(async move {
            let t0 = Instant::now();
            let req = Request::get(uri)
                .header(http::header::HOST, SERVICE)
                .body(Empty::new())
                .expect("a GET to a socket address is valid");
            let ok = match client.request(req).await {
                Ok(resp) => {
                    let status = resp.status();
                    resp.into_body().collect().await.is_ok() && status == StatusCode::OK
                }
                Err(_) => false,
            };
            let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
            if ok {
                s[w as usize].ok += 1;
            } else {
                s[w as usize].failed += 1;
            }
            latencies
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(t0.elapsed());
        });
    }
    backends.0[2].failing.store(false, Ordering::Relaxed);
    while tasks.join_next().await.is_some() {}
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for (w, delta) in &rows {
        let total = delta.iter().sum::<u64>().max(1) as f64;
        let s = seen[*w as usize];
        let marker = if (fail_from..fail_to).contains(w) {
            "  ← flaky answers 503"
        } else {
            ""
        };
        println!(
            "  {:<12} {:>6.0}% {:>6.0}% {:>6.0}%   {:>7.1}%{marker}",
            format!(
                "{:.2}-{:.2}s",
                (window * *w).as_secs_f64(),
                (window * (*w + 1)).as_secs_f64()
            ),
            100.0 * delta[0] as f64 / total,
            100.0 * delta[1] as f64 / total,
            100.0 * delta[2] as f64 / total,
            100.0 * s.ok as f64 / (s.ok + s.failed).max(1) as f64,
        );
    }
    let ok: u64 = seen.iter().map(|s| s.ok).sum();
    let failed: u64 = seen.iter().map(|s| s.failed).sum();
    let mut lat = latencies.lock().unwrap_or_else(|p| p.into_inner()).clone();
    lat.sort();
    let pct = |q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let m = http_get(admin, "/metrics")
        .await
        .context("reading the client-side tern's metrics")?
        .1;
    let svc = format!("dst_service=\"{SERVICE}\"");
    // `+ 0.0`: an empty sum is -0.0, which would print as "-0".
    let retries = |result: &str| {
        metric_value(
            &m,
            "tern_retries_total",
            &format!("{svc},result=\"{result}\""),
        ) + 0.0
    };
    let outcome = Outcome {
        ok,
        failed,
        retried: retries("retried"),
        budget_exhausted: retries("budget_exhausted"),
        ejections: metric_value(
            &m,
            "tern_circuit_transitions_total",
            &format!("endpoint=\"{}\",state=\"open\"", backends.0[2].addr),
        ) + 0.0,
        readmissions: metric_value(
            &m,
            "tern_circuit_transitions_total",
            &format!("endpoint=\"{}\",state=\"closed\"", backends.0[2].addr),
        ) + 0.0,
    };
    println!(
        "  the client saw {ok} of {} requests succeed: {:.2}% (p50 {:.1?}, p99 {:.1?})",
        ok + failed,
        100.0 * ok as f64 / (ok + failed).max(1) as f64,
        pct(0.5),
        pct(0.99)
    );
    println!(
        "  retries: {} sent, {} succeeded, {} refused by the budget (tern_retries_total)",
        outcome.retried,
        retries("succeeded"),
        outcome.budget_exhausted
    );
    println!(
        "  circuit breaker on flaky: ejected {} times, readmitted {} times (tern_circuit_transitions_total)\n",
        outcome.ejections, outcome.readmissions
    );
    Ok(outcome)
}

/// What the resilience run showed, for the caller's checks.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub ok: u64,
    pub failed: u64,
    pub retried: f64,
    pub budget_exhausted: f64,
    pub ejections: f64,
    pub readmissions: f64,
}
