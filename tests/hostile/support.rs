//! What every hostile test uses: a counting upstream, a proxy running in process, a benign
//! client measuring alongside an attack, and raw HTTP/1 and HTTP/2 frame helpers.

pub(crate) use std::collections::BTreeMap;
pub(crate) use std::net::SocketAddr;
pub(crate) use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
pub(crate) use std::sync::{Arc, Mutex};
pub(crate) use std::time::Duration;

pub(crate) use bytes::Bytes;
pub(crate) use http::{Request, Response};
pub(crate) use http_body_util::{BodyExt, Empty, Full};
pub(crate) use hyper::body::Incoming;
pub(crate) use hyper_util::rt::{TokioExecutor, TokioIo};
pub(crate) use tokio::io::{AsyncReadExt, AsyncWriteExt};
pub(crate) use tokio::net::{TcpListener, TcpStream};

pub(crate) use tern::app::{Proxy, ProxyAddrs};
pub(crate) use tern::config::{ProxyConfig, TargetMode};
pub(crate) use tern::demo::{http_get, metric_value};
pub(crate) use tern::drain::Drain;

/// Generous upper bound for any single exchange with the proxy.
pub(crate) const DEADLINE: Duration = Duration::from_secs(15);

/// An upstream app (HTTP/1 and h2c) that counts what reaches it: requests per path, the
/// `tern-client-id` values it saw, and the most requests it held at once. `/hold` waits
/// (bounded) before answering, so streams stay open.
#[derive(Default)]
pub(crate) struct Upstream {
    pub(crate) total: AtomicUsize,
    pub(crate) by_path: Mutex<BTreeMap<String, usize>>,
    pub(crate) client_ids: Mutex<Vec<String>>,
    pub(crate) in_flight: AtomicUsize,
    pub(crate) max_in_flight: AtomicUsize,
    /// Requests per path whose body arrived complete.
    pub(crate) bodies_ok: Mutex<BTreeMap<String, usize>>,
    /// Header names seen (lowercase), for hop-by-hop and upgrade checks.
    pub(crate) header_names: Mutex<Vec<String>>,
}

impl Upstream {
    pub(crate) async fn start() -> (SocketAddr, Arc<Upstream>) {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = l.local_addr().expect("upstream addr");
        let up = Arc::new(Upstream::default());
        let state = up.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let state = state.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let state = state.clone();
                        async move { Ok::<_, std::convert::Infallible>(state.answer(req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        (addr, up)
    }

    pub(crate) async fn answer(&self, mut req: Request<Incoming>) -> Response<Full<Bytes>> {
        self.total.fetch_add(1, Ordering::SeqCst);
        self.header_names
            .lock()
            .expect("lock")
            .extend(req.headers().keys().map(|k| k.as_str().to_owned()));
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let path = req.uri().path().to_owned();
        *self
            .by_path
            .lock()
            .expect("lock")
            .entry(path.clone())
            .or_default() += 1;
        if let Some(v) = req.headers().get("tern-client-id") {
            self.client_ids
                .lock()
                .expect("lock")
                .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
        }
        if req.uri().path() == "/ws" && req.headers().contains_key("upgrade") {
            // An echo protocol after 101.
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(up) = on.await {
                    let mut io = TokioIo::new(up);
                    let mut buf = [0u8; 64];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
            r.headers_mut()
                .insert("upgrade", "echo".parse().expect("value"));
            r.headers_mut()
                .insert("connection", "upgrade".parse().expect("value"));
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            return r;
        }
        if req.into_body().collect().await.is_ok() {
            *self
                .bodies_ok
                .lock()
                .expect("lock")
                .entry(path.clone())
                .or_default() += 1;
        }
        if path == "/hold" {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        Response::new(Full::new(Bytes::from_static(b"ok")))
    }

    pub(crate) fn count(&self, path: &str) -> usize {
        self.by_path
            .lock()
            .expect("lock")
            .get(path)
            .copied()
            .unwrap_or(0)
    }
}

pub(crate) struct Running {
    pub(crate) addrs: ProxyAddrs,
    pub(crate) drain: Drain,
    pub(crate) task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// A plain proxy whose outbound and inbound both go to `upstream` (explicit mode). A short
    /// detect timeout keeps the slow cases bounded.
    pub(crate) fn start(upstream: SocketAddr) -> Self {
        Self::start_with(upstream, |_| {})
    }

    /// As [`Running::start`], with `tweak` applied to the config.
    pub(crate) fn start_with(upstream: SocketAddr, tweak: impl FnOnce(&mut ProxyConfig)) -> Self {
        let mut config = ProxyConfig::loopback();
        config.outbound_target = TargetMode::Fixed(upstream);
        config.inbound_target = TargetMode::Fixed(upstream);
        config.detect_timeout = Duration::from_secs(2);
        tweak(&mut config);
        let proxy = Proxy::bind(config).expect("bind proxy");
        let addrs = proxy.addrs().expect("addrs");
        let (drain, watch) = Drain::new();
        let task = tokio::spawn(proxy.run(drain.clone(), watch));
        Running { addrs, drain, task }
    }

    pub(crate) fn outbound(&self) -> SocketAddr {
        self.addrs.outbound[0]
    }

    pub(crate) async fn rss(&self) -> f64 {
        let text = http_get(self.addrs.admin, "/metrics")
            .await
            .expect("metrics")
            .1;
        metric_value(&text, "process_resident_memory_bytes", "")
    }

    pub(crate) async fn metrics(&self) -> String {
        http_get(self.addrs.admin, "/metrics")
            .await
            .expect("metrics")
            .1
    }

    pub(crate) async fn stop(self) {
        self.drain.start();
        self.task.await.expect("join").expect("clean run");
    }
}

/// A well-behaved HTTP/1 client sending `GET /ok` over one keep-alive connection until stopped.
pub(crate) struct Benign {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(usize, usize, Vec<Duration>)>,
}

impl Benign {
    pub(crate) fn start(entry: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let (mut ok, mut failed) = (0, 0);
            let mut latencies = Vec::new();
            let mut sender = None;
            // Bounded: stops when told, or after 100k requests.
            for _ in 0..100_000 {
                if flag.load(Ordering::SeqCst) && ok > 0 {
                    break;
                }
                if sender.is_none() {
                    let s = TcpStream::connect(entry).await.expect("benign connect");
                    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
                        .await
                        .expect("benign handshake");
                    tokio::spawn(conn);
                    sender = Some(tx);
                }
                let tx = sender.as_mut().expect("a sender");
                let req = Request::get("/ok")
                    .header("host", "upstream")
                    .body(Empty::<Bytes>::new())
                    .expect("request");
                let sent = std::time::Instant::now();
                let answer = tokio::time::timeout(DEADLINE, async {
                    let resp = tx.send_request(req).await?;
                    let status = resp.status();
                    resp.into_body().collect().await?;
                    Ok::<_, hyper::Error>(status)
                })
                .await;
                latencies.push(sent.elapsed());
                match answer {
                    Ok(Ok(s)) if s.is_success() => ok += 1,
                    _ => {
                        failed += 1;
                        sender = None;
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (ok, failed, latencies)
        });
        Benign { stop, task }
    }

    /// Stops and asserts every benign request succeeded; returns how many did.
    pub(crate) async fn finish(self, case: &str) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        let (ok, failed, mut latencies) = self.task.await.expect("benign join");
        latencies.sort();
        let pct = |p: usize| {
            latencies
                .get((latencies.len() * p / 100).min(latencies.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
        };
        eprintln!(
            "[{case}] benign client: {ok} ok, {failed} failed; p50 {:?} p99 {:?}",
            pct(50),
            pct(99)
        );
        assert!(ok > 0, "{case}: the benign client got no answers");
        assert_eq!(
            failed, 0,
            "{case}: benign requests failed during the attack"
        );
        ok
    }
}

/// Writes `payload` on a fresh connection and reads until the proxy closes (bounded). Returns
/// what was read and whether the connection was closed within the deadline.
pub(crate) async fn exchange(entry: SocketAddr, payload: &[u8]) -> (String, bool) {
    let s = TcpStream::connect(entry).await.expect("connect");
    let (mut rd, mut wr) = s.into_split();
    let owned = payload.to_vec();
    // The proxy may answer and close before reading everything: write beside the read.
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&owned).await;
        wr
    });
    let mut got = Vec::new();
    let closed = tokio::time::timeout(DEADLINE, async {
        let mut buf = [0u8; 4096];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    drop(writer.await);
    (String::from_utf8_lossy(&got).into_owned(), closed)
}

// --- raw HTTP/2 frames -------------------------------------------------------------------

pub(crate) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub(crate) fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HEADERS (END_HEADERS, and END_STREAM when `end`) for `GET <path>`: HPACK static-table
/// `:method GET`, `:scheme http`, and literal-without-indexing `:path` and `:authority`.
pub(crate) fn get_headers(stream: u32, path: &str, end: bool) -> Vec<u8> {
    let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
    block.extend_from_slice(path.as_bytes());
    block.extend_from_slice(&[0x01, 0x01, b'u']);
    frame(0x1, 0x4 | if end { 0x1 } else { 0 }, stream, &block)
}

pub(crate) const REFUSED_STREAM: u32 = 0x7;

/// Reads one HTTP/1 response head (bounded).
pub(crate) async fn read_head(rd: &mut tokio::net::tcp::OwnedReadHalf) -> String {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, async {
        let mut b = [0u8; 1];
        while !got.ends_with(b"\r\n\r\n") {
            match rd.read(&mut b).await {
                Ok(1) => got.push(b[0]),
                _ => break,
            }
        }
    })
    .await;
    String::from_utf8_lossy(&got).into_owned()
}

/// Sends one HTTP/1 request on a fresh connection; the status, or 0 when the connection closed.
pub(crate) async fn status_of(entry: SocketAddr, path: &str) -> u16 {
    let Ok(s) = TcpStream::connect(entry).await else {
        return 0;
    };
    let Ok((mut tx, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await else {
        return 0;
    };
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "u")
        .body(Empty::<Bytes>::new())
        .expect("request");
    match tokio::time::timeout(DEADLINE, tx.send_request(req)).await {
        Ok(Ok(resp)) => {
            let status = resp.status().as_u16();
            let _ = resp.into_body().collect().await;
            status
        }
        _ => 0,
    }
}

// --- HTTP/2 floods (raw frames) ------------------------------------------------------------

pub(crate) const PROTOCOL_ERROR: u32 = 0x1;
pub(crate) const ENHANCE_YOUR_CALM: u32 = 0xb;

/// An HPACK integer with an `n`-bit prefix whose other bits are `flags`.
pub(crate) fn hpack_int(flags: u8, n: u32, mut v: usize) -> Vec<u8> {
    let max = (1usize << n) - 1;
    if v < max {
        return vec![flags | v as u8];
    }
    let mut out = vec![flags | max as u8];
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
    out
}

/// A literal header field (without indexing, or with incremental indexing), new name.
pub(crate) fn literal(name: &str, value: &[u8], index: bool) -> Vec<u8> {
    let mut out = vec![if index { 0x40 } else { 0x00 }];
    out.extend(hpack_int(0, 7, name.len()));
    out.extend_from_slice(name.as_bytes());
    out.extend(hpack_int(0, 7, value.len()));
    out.extend_from_slice(value);
    out
}

/// The pseudo-headers of a request for `path` (`:method` GET or POST).
pub(crate) fn request_block(path: &str, post: bool) -> Vec<u8> {
    let mut block = vec![if post { 0x83 } else { 0x82 }, 0x86, 0x04];
    block.extend(hpack_int(0, 7, path.len()));
    block.extend_from_slice(path.as_bytes());
    block.extend([0x01, 0x01, b'u']);
    block
}

/// What an attacking HTTP/2 connection saw: RST_STREAM codes, GOAWAY codes, whether the proxy
/// closed it within `wait` after the attack was written, and how many bytes it wrote.
pub(crate) struct Outcome {
    pub(crate) resets: Vec<u32>,
    pub(crate) goaways: Vec<u32>,
    pub(crate) closed: bool,
    pub(crate) written: usize,
}

/// Reads frames for at most `wait` (or until EOF): RST_STREAM and GOAWAY codes, whether EOF came.
pub(crate) async fn read_frames_for(
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    wait: Duration,
) -> (Vec<u32>, Vec<u32>, bool) {
    let mut resets = Vec::new();
    let mut goaways = Vec::new();
    let closed = tokio::time::timeout(wait, async {
        loop {
            let mut head = [0u8; 9];
            if rd.read_exact(&mut head).await.is_err() {
                break;
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            if rd.read_exact(&mut payload).await.is_err() {
                break;
            }
            match head[3] {
                0x3 if len == 4 => resets.push(u32::from_be_bytes([
                    payload[0], payload[1], payload[2], payload[3],
                ])),
                0x7 if len >= 8 => goaways.push(u32::from_be_bytes([
                    payload[4], payload[5], payload[6], payload[7],
                ])),
                _ => {}
            }
        }
    })
    .await
    .is_ok();
    (resets, goaways, closed)
}

/// Opens an HTTP/2 connection to `entry`, writes the preface and then every batch `attack`
/// yields (stopping at the first write error), and reads what comes back for at most `wait`.
pub(crate) async fn h2_attack(
    entry: SocketAddr,
    batches: impl Iterator<Item = Vec<u8>>,
    wait: Duration,
) -> Outcome {
    let s = TcpStream::connect(entry).await.expect("connect");
    let (mut rd, mut wr) = s.into_split();
    let reader = tokio::spawn(async move { read_frames_for(&mut rd, wait).await });
    let mut out = PREFACE.to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    let mut written = 0;
    if wr.write_all(&out).await.is_ok() {
        for batch in batches {
            if wr.write_all(&batch).await.is_err() {
                break;
            }
            written += batch.len();
        }
    }
    let (resets, goaways, closed) = reader.await.expect("reader");
    Outcome {
        resets,
        goaways,
        closed,
        written,
    }
}

/// Runs one flood against a fresh proxy with a concurrent benign client, prints what happened
/// (codes, RSS before/after, the benign client's latency), and returns the outcome.
pub(crate) async fn flood(
    case: &str,
    batches: impl Iterator<Item = Vec<u8>> + Send,
    wait: Duration,
) -> (Outcome, Arc<Upstream>) {
    let (up_addr, up) = Upstream::start().await;
    let proxy = Running::start(up_addr);
    let benign = Benign::start(proxy.outbound());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = proxy.rss().await;
    let outcome = h2_attack(proxy.outbound(), batches, wait).await;
    let after = proxy.rss().await;
    let metrics = proxy.metrics().await;
    benign.finish(case).await;
    eprintln!(
        "[{case}] wrote {} B; GOAWAY {:?}; {} RST_STREAM (codes {:?}); closed {}; RSS before {:.1} MiB after {:.1} MiB; h2_flood count {}",
        outcome.written,
        outcome.goaways,
        outcome.resets.len(),
        outcome.resets.iter().take(3).collect::<Vec<_>>(),
        outcome.closed,
        before / 1048576.0,
        after / 1048576.0,
        metric_value(&metrics, "tern_limit_exceeded_total", "limit=\"h2_flood\""),
    );
    // In-process RSS includes every test running at the time: a generous bound that still
    // catches unbounded growth (a megabyte-sized flood amplified into gigabytes).
    assert!(
        after - before < 256.0 * 1048576.0,
        "{case}: memory grew by {} bytes",
        after - before
    );
    proxy.stop().await;
    (outcome, up)
}

/// CPU time (user + system, clock ticks) a process used so far, from /proc.
pub(crate) fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_comm = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are 12 and 13 after the command name.
    fields
        .get(11)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Kills the subprocess proxy when the test ends, however it ends.
pub(crate) struct Child(pub(crate) std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
