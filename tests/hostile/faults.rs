//! Upstreams dying mid-response, draining, fd exhaustion, benign latency during attacks.

use crate::support::*;

// --- faults ---------------------------------------------------------------------------------

/// An h2c upstream whose responses announce 100 bytes, send 10, then fail (RST_STREAM).
async fn failing_h2_upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
                    let frames: Vec<Result<hyper::body::Frame<Bytes>, std::io::Error>> = vec![
                        Ok(hyper::body::Frame::data(Bytes::from_static(b"0123456789"))),
                        Err(std::io::Error::other("upstream died")),
                    ];
                    // The failure comes after the head and the first bytes were sent.
                    let frames = futures_util::StreamExt::then(
                        futures_util::stream::iter(frames),
                        |f| async move {
                            if f.is_err() {
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                            f
                        },
                    );
                    let body = http_body_util::StreamBody::new(frames);
                    let mut r = Response::new(body);
                    r.headers_mut()
                        .insert("content-length", "100".parse().expect("value"));
                    Ok::<_, std::convert::Infallible>(r)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// An upstream that answers every request with `response` (a head and part of a body), then
/// dies.
async fn dying_upstream(response: &'static [u8]) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(response).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                // Dies before the body is complete.
                drop(s);
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_dying_mid_response_is_never_a_truncated_success() {
    for (name, response) in [
        (
            "content-length",
            &b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"[..],
        ),
        (
            "chunked",
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n"[..],
        ),
    ] {
        let up = dying_upstream(response).await;
        let proxy = Running::start(up);
        // HTTP/1 client: the body must fail, never end cleanly.
        let s = TcpStream::connect(proxy.outbound()).await.expect("connect");
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let req = Request::get("/die")
            .header("host", "u")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let outcome = tokio::time::timeout(DEADLINE, async {
            let resp = tx.send_request(req).await?;
            let status = resp.status();
            resp.into_body()
                .collect()
                .await
                .map(|b| (status, b.to_bytes().len()))
        })
        .await
        .expect("an answer in time");
        eprintln!("[dying upstream, {name}] HTTP/1 client: {outcome:?}");
        assert!(
            !matches!(outcome, Ok((s, _)) if s.is_success()),
            "{name}: HTTP/1 got a truncated success"
        );

        drop(tx);
        proxy.stop().await;
        // HTTP/2 client, through to an h2c upstream whose response body fails after 10 bytes
        // (the upstream resets the stream): the client's stream must be reset, never end with
        // END_STREAM.
        let proxy = Running::start(failing_h2_upstream().await);
        let s = TcpStream::connect(proxy.outbound()).await.expect("connect");
        let (mut tx, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
                .await
                .expect("h2 handshake");
        tokio::spawn(conn);
        let req = Request::get("http://u/die")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let outcome = tokio::time::timeout(DEADLINE, async {
            let resp = tx.send_request(req).await?;
            let status = resp.status();
            resp.into_body()
                .collect()
                .await
                .map(|b| (status, b.to_bytes().len()))
        })
        .await
        .expect("an answer in time");
        eprintln!("[dying upstream, {name}] HTTP/2 client: {outcome:?}");
        assert!(
            !matches!(outcome, Ok((s, _)) if s.is_success()),
            "{name}: HTTP/2 got a truncated success"
        );
        drop(tx);
        proxy.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_completes_in_flight_requests_and_closes_idle_connections() {
    let (up_addr, up) = Upstream::start().await;
    let proxy = Running::start_with(up_addr, |c| {
        c.shutdown_grace_period = Duration::from_secs(120);
    });
    let entry = proxy.outbound();
    // An idle HTTP/1 keep-alive connection that already served a request.
    let idle = TcpStream::connect(entry).await.expect("connect");
    let (mut idle_rd, mut idle_wr) = idle.into_split();
    idle_wr
        .write_all(b"GET /ok HTTP/1.1\r\nHost: u\r\n\r\n")
        .await
        .expect("request");
    assert!(read_head(&mut idle_rd).await.starts_with("HTTP/1.1 200"));
    let mut ok = [0u8; 2];
    idle_rd.read_exact(&mut ok).await.expect("body");
    // In-flight requests: HTTP/1 and HTTP/2, each held 3 s by the upstream.
    let h1 = tokio::spawn(status_of(entry, "/hold"));
    let s = TcpStream::connect(entry).await.expect("connect");
    let (mut h2tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let h2 = tokio::spawn(async move {
        let req = Request::get("http://u/hold")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let resp = h2tx.send_request(req).await.expect("h2 response");
        let status = resp.status().as_u16();
        resp.into_body().collect().await.expect("h2 body");
        status
    });
    for _ in 0..300 {
        if up.in_flight.load(Ordering::SeqCst) == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        up.in_flight.load(Ordering::SeqCst),
        2,
        "both requests in flight"
    );
    let Running { drain, task, .. } = proxy;
    drain.start();
    assert_eq!(
        h1.await.expect("join"),
        200,
        "the HTTP/1 request in flight completed"
    );
    assert_eq!(
        h2.await.expect("join"),
        200,
        "the HTTP/2 stream in flight completed"
    );
    let mut b = [0u8; 1];
    let closed = tokio::time::timeout(DEADLINE, idle_rd.read(&mut b)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the idle keep-alive connection was not closed: {closed:?}"
    );
    // Well within the 120 s grace period: nothing is left holding the proxy open.
    tokio::time::timeout(DEADLINE, task)
        .await
        .expect("the proxy finished draining before the grace period")
        .expect("join")
        .expect("clean run");
    drop(idle_wr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fd_exhaustion_degrades_gracefully_and_recovers() {
    if std::process::Command::new("prlimit")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "prlimit (util-linux) is missing"
        );
        eprintln!("!!! SKIPPED: prlimit (util-linux) is not installed");
        return;
    }
    let (up_addr, up) = Upstream::start().await;
    let (inbound, outbound, admin) = (free_port(), free_port(), free_port());
    let child = std::process::Command::new("prlimit")
        .arg("--nofile=64:64")
        .arg(env!("CARGO_BIN_EXE_tern"))
        .args(["--log", "warn", "proxy"])
        .args(["--inbound-addr", &format!("127.0.0.1:{inbound}")])
        .args(["--outbound-addrs", &format!("127.0.0.1:{outbound}")])
        .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
        .args(["--outbound-target", &up_addr.to_string()])
        .args(["--inbound-target", &up_addr.to_string()])
        .args(["--detect-timeout", "60s"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn tern under prlimit");
    let mut child = Child(child);
    let pid = child.0.id();
    let admin_addr: SocketAddr = format!("127.0.0.1:{admin}").parse().expect("addr");
    let entry: SocketAddr = format!("127.0.0.1:{outbound}").parse().expect("addr");
    let mut ready = false;
    for _ in 0..200 {
        if matches!(http_get(admin_addr, "/ready").await, Ok((200, _))) {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(ready, "the proxy never became ready");
    assert_eq!(status_of(entry, "/before").await, 200);
    let rss = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .unwrap_or("")
            .to_owned()
    };
    let before = rss(pid);
    // Far more silent connections than descriptors: the kernel queues what tern cannot accept.
    let mut held = Vec::new();
    for _ in 0..150 {
        match TcpStream::connect(entry).await {
            Ok(s) => held.push(s),
            Err(_) => break,
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu0 = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu = cpu_ticks(pid) - cpu0;
    let during = rss(pid);
    assert!(
        child.0.try_wait().expect("wait").is_none(),
        "the proxy died when it ran out of descriptors"
    );
    // A busy accept loop would burn ~300 ticks (3 s of CPU) here.
    assert!(
        cpu < 100,
        "{cpu} clock ticks of CPU in 3 s: a busy accept loop"
    );
    drop(held);
    // Recovers: once descriptors free up, new requests are served.
    let mut recovered = 0;
    for _ in 0..100 {
        if status_of(entry, "/after").await == 200 {
            recovered += 1;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = http_get(admin_addr, "/metrics").await.expect("metrics").1;
    eprintln!(
        "[fd exhaustion] {} held; CPU {cpu} ticks in 3 s; {before} / {during}; accept errors {}",
        150,
        metric_value(
            &metrics,
            "tern_limit_exceeded_total",
            "limit=\"accept_errors\""
        )
    );
    assert_eq!(
        recovered, 1,
        "the proxy did not recover after descriptors were freed"
    );
    assert!(
        metric_value(
            &metrics,
            "tern_limit_exceeded_total",
            "limit=\"accept_errors\""
        ) >= 1.0
    );
    assert_eq!(up.count("/after"), 1);
    drop(child);
}

/// Prints the benign client's latency without and then during a mix of attacks on the same
/// proxy (rapid reset, CONTINUATION flood, HPACK bomb, CL+TE smuggling), for the notes. Asserts
/// only that every benign request succeeded: no timing assertions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn benign_latency_with_and_without_attacks() {
    let (up_addr, _up) = Upstream::start().await;
    let proxy = Running::start(up_addr);
    let entry = proxy.outbound();
    let before = proxy.rss().await;
    let benign = Benign::start(entry);
    tokio::time::sleep(Duration::from_secs(2)).await;
    benign.finish("latency, no attack").await;
    let benign = Benign::start(entry);
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let attacker = tokio::spawn(async move {
        let mut rounds = 0;
        while !flag.load(Ordering::SeqCst) && rounds < 1000 {
            rounds += 1;
            let resets = (0..10u32).map(|b| {
                (0..100u32)
                    .flat_map(|i| {
                        let id = 1 + 2 * (b * 100 + i);
                        let mut f = get_headers(id, "/reset", true);
                        f.extend(frame(0x3, 0, id, &0x8u32.to_be_bytes()));
                        f
                    })
                    .collect::<Vec<u8>>()
            });
            h2_attack(entry, resets, Duration::from_secs(2)).await;
            let cont = std::iter::once(frame(0x1, 0x1, 1, &request_block("/cont", false))).chain(
                (0..500)
                    .map(|i| frame(0x9, 0, 1, &literal(&format!("x-{i}"), &[b'v'; 100], false))),
            );
            h2_attack(entry, cont, Duration::from_secs(2)).await;
            let mut bomb = request_block("/bomb", false);
            bomb.extend(literal("x-bomb", &[b'b'; 4000], true));
            bomb.extend(std::iter::repeat_n(0x80 | 62, 2000));
            h2_attack(
                entry,
                std::iter::once(frame(0x1, 0x5, 1, &bomb)),
                Duration::from_secs(2),
            )
            .await;
            exchange(
                entry,
                b"POST /clte HTTP/1.1\r\nHost: u\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            )
            .await;
        }
        rounds
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    benign.finish("latency, under attack").await;
    let rounds = attacker.await.expect("attacker");
    let after = proxy.rss().await;
    eprintln!("[latency] {rounds} attack rounds; RSS before {before} after {after}");
    assert!(rounds > 0);
    proxy.stop().await;
}
