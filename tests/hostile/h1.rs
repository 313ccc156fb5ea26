//! HTTP/1: request smuggling, oversized and slow heads, request hygiene, overload.

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_smuggling_is_refused_and_nothing_reaches_the_upstream() {
    let (up_addr, up) = Upstream::start().await;
    let proxy = Running::start(up_addr);
    let benign = Benign::start(proxy.outbound());
    let before = proxy.rss().await;
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: u\r\n\r\n";
    let cases: Vec<(&str, String)> = vec![
        (
            "conflicting Content-Length",
            format!(
                "POST /attack HTTP/1.1\r\nHost: u\r\nContent-Length: 5\r\nContent-Length: 40\r\n\r\nhello{smuggled}"
            ),
        ),
        (
            "Transfer-Encoding: chunked, identity",
            format!(
                "POST /attack HTTP/1.1\r\nHost: u\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "Transfer-Encoding: xchunked",
            format!(
                "POST /attack HTTP/1.1\r\nHost: u\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "Content-Length with a sign",
            format!(
                "POST /attack HTTP/1.1\r\nHost: u\r\nContent-Length: +5\r\n\r\nhello{smuggled}"
            ),
        ),
        (
            "space before the colon",
            format!(
                "POST /attack HTTP/1.1\r\nHost: u\r\nContent-Length : 5\r\n\r\nhello{smuggled}"
            ),
        ),
        (
            "obs-fold",
            format!("GET /attack HTTP/1.1\r\nHost: u\r\nX-A: a\r\n b\r\n\r\n{smuggled}"),
        ),
        (
            "bare CR in the head",
            format!("GET /attack HTTP/1.1\r\nHost: u\rX-A: b\r\n\r\n{smuggled}"),
        ),
        (
            "NUL in a header value",
            format!("GET /attack HTTP/1.1\r\nHost: u\r\nX-A: a\0b\r\n\r\n{smuggled}"),
        ),
    ];
    for (name, payload) in &cases {
        let (resp, closed) = exchange(proxy.outbound(), payload.as_bytes()).await;
        eprintln!(
            "[smuggling] {name}: {:?}",
            resp.lines().next().unwrap_or("")
        );
        assert!(resp.starts_with("HTTP/1.1 400"), "{name}: got {resp:?}");
        assert!(closed, "{name}: the connection stayed open");
    }
    // CL + TE, in either order and in the second request of a keep-alive connection: 400, the
    // connection closed, nothing forwarded (hyper alone would forward it chunked).
    for (name, payload) in [
        (
            "CL then TE",
            format!(
                "POST /clte HTTP/1.1\r\nHost: u\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "TE then CL",
            format!(
                "POST /clte HTTP/1.1\r\nHost: u\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "CL+TE behind a chunked request",
            format!(
                "POST /first HTTP/1.1\r\nHost: u\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nPOST /clte HTTP/1.1\r\nHost: u\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
    ] {
        let (resp, closed) = exchange(proxy.outbound(), payload.as_bytes()).await;
        eprintln!(
            "[smuggling] {name}: {:?}",
            resp.lines().next().unwrap_or("")
        );
        assert!(resp.contains("HTTP/1.1 400"), "{name}: got {resp:?}");
        assert!(closed, "{name}: the connection stayed open");
    }
    assert_eq!(up.count("/clte"), 0, "a CL+TE request reached the upstream");
    assert_eq!(up.count("/first"), 1, "the clean first request was served");
    let clte = 1; // the /first request

    // Bare LF line ends: hyper reads them as one well-formed request and forwards it normalized;
    // it must arrive exactly once, with nothing smuggled behind it.
    let (resp, _) = exchange(
        proxy.outbound(),
        b"GET /barelf HTTP/1.1\nHost: u\nContent-Length: 0\nConnection: close\n\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "bare LF: got {resp:?}");

    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "tern_http_rejected_total",
            "reason=\"ambiguous_framing\""
        ),
        3.0,
        "{metrics}"
    );
    let after = proxy.rss().await;
    let ok = benign.finish("smuggling").await;
    eprintln!("[smuggling] RSS before {before} after {after}");
    assert_eq!(
        up.count("/attack"),
        0,
        "an ambiguous request reached the upstream"
    );
    assert_eq!(
        up.count("/smuggled"),
        0,
        "a smuggled request reached the upstream"
    );
    assert_eq!(up.count("/barelf"), 1);
    assert_eq!(
        up.total.load(Ordering::SeqCst),
        ok + 1 + clte,
        "the upstream saw exactly the well-formed requests"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_head_gets_431() {
    let (up_addr, up) = Upstream::start().await;
    let proxy = Running::start(up_addr);
    let benign = Benign::start(proxy.outbound());
    let before = proxy.rss().await;
    let mut head = String::from("GET /big HTTP/1.1\r\nHost: u\r\n");
    for i in 0..70 {
        head.push_str(&format!("X-Pad-{i}: {}\r\n", "a".repeat(1000)));
    }
    head.push_str("\r\n");
    let (resp, closed) = exchange(proxy.outbound(), head.as_bytes()).await;
    let after = proxy.rss().await;
    benign.finish("431").await;
    eprintln!("[431] RSS before {before} after {after}");
    assert!(resp.starts_with("HTTP/1.1 431"), "got {resp:?}");
    assert!(closed, "the connection stayed open");
    assert_eq!(up.count("/big"), 0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_head_is_closed() {
    let (up_addr, up) = Upstream::start().await;
    let proxy = Running::start(up_addr);
    let benign = Benign::start(proxy.outbound());
    let before = proxy.rss().await;
    let s = TcpStream::connect(proxy.outbound()).await.expect("connect");
    let (mut rd, mut wr) = s.into_split();
    wr.write_all(b"GET /slow HTTP/1.1\r\nHost: u\r\n")
        .await
        .expect("request line");
    // One header line a second; the detect timeout (2 s here) plus the 10 s header-read
    // timeout end it. The bound (40 lines) is far beyond both: it is not a latency assertion.
    let mut closed = false;
    for i in 0..40 {
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(Duration::from_secs(1), rd.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(_)) => {} // a 408, then the close
            Err(_) => {}
        }
        if wr
            .write_all(format!("X-Slow-{i}: a\r\n").as_bytes())
            .await
            .is_err()
        {
            closed = true;
            break;
        }
    }
    let after = proxy.rss().await;
    benign.finish("slowloris").await;
    eprintln!("[slowloris] RSS before {before} after {after}");
    assert!(closed, "a trickling head was never closed");
    assert_eq!(
        up.count("/slow"),
        0,
        "the trickled head reached the upstream"
    );
    proxy.stop().await;
}

/// The head-read deadline is one timer per connection, moved from request to request: after
/// a request on a keep-alive connection, the next head (trickled) and an idle connection are
/// bounded just like a first head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_head_and_idle_keep_alive_are_bounded() {
    let (up_addr, up) = Upstream::start().await;
    let proxy = Running::start_with(up_addr, |c| {
        c.header_read_timeout = Duration::from_secs(3);
    });
    let benign = Benign::start(proxy.outbound());
    // Each connection: one full request, then a trickled second head (`trickle`) or silence.
    let one = |trickle: bool| {
        let entry = proxy.outbound();
        tokio::spawn(async move {
            let s = TcpStream::connect(entry).await.expect("connect");
            let (mut rd, mut wr) = s.into_split();
            wr.write_all(b"GET /first HTTP/1.1\r\nHost: u\r\n\r\n")
                .await
                .expect("first request");
            let first = read_head(&mut rd).await;
            if trickle {
                wr.write_all(b"GET /second HTTP/1.1\r\nHost: u\r\n")
                    .await
                    .expect("second request line");
            }
            // Bounded far beyond the 3 s deadline; not a latency assertion.
            for i in 0..40 {
                let mut buf = [0u8; 1024];
                match tokio::time::timeout(Duration::from_secs(1), rd.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return (first, true),
                    Ok(Ok(_)) | Err(_) => {}
                }
                if trickle
                    && wr
                        .write_all(format!("X-Slow-{i}: a\r\n").as_bytes())
                        .await
                        .is_err()
                {
                    return (first, true);
                }
            }
            (first, false)
        })
    };
    let (trickled, idle) = (one(true), one(false));
    let (trickled, idle) = (
        trickled.await.expect("trickle task"),
        idle.await.expect("idle task"),
    );
    let metrics = proxy.metrics().await;
    benign.finish("keep-alive heads").await;
    for (case, (first, closed)) in [("trickled", trickled), ("idle", idle)] {
        assert!(
            first.starts_with("HTTP/1.1 200"),
            "{case}: first answer {first:?}"
        );
        assert!(closed, "{case}: the connection was never closed");
    }
    assert_eq!(up.count("/first"), 2);
    assert_eq!(
        up.count("/second"),
        0,
        "the trickled head reached the upstream"
    );
    assert!(
        metric_value(
            &metrics,
            "tern_limit_exceeded_total",
            "limit=\"header_read_timeout\""
        ) >= 2.0,
        "{metrics}"
    );
    proxy.stop().await;
}

// --- request hygiene, upgrades, limits ------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_hygiene_host_upgrade_and_hop_by_hop() {
    let (up_addr, up) = Upstream::start().await;
    let proxy = Running::start(up_addr);
    let benign = Benign::start(proxy.outbound());
    let before = proxy.rss().await;
    let refused: Vec<(&str, String, &str)> = vec![
        (
            "missing Host",
            "GET /bad HTTP/1.1\r\nX-A: 1\r\n\r\n".into(),
            "HTTP/1.1 400",
        ),
        (
            "duplicate Host",
            "GET /bad HTTP/1.1\r\nHost: u\r\nHost: evil\r\n\r\n".into(),
            "HTTP/1.1 400",
        ),
        (
            "absolute-form disagreeing with Host",
            "GET http://evil/bad HTTP/1.1\r\nHost: u\r\n\r\n".into(),
            "HTTP/1.1 400",
        ),
        (
            "URI too long",
            format!("GET /bad?{} HTTP/1.1\r\nHost: u\r\n\r\n", "a".repeat(9000)),
            "HTTP/1.1 414",
        ),
        (
            "too many headers",
            format!(
                "GET /bad HTTP/1.1\r\nHost: u\r\n{}\r\n",
                (0..150)
                    .map(|i| format!("X-{i}: 1\r\n"))
                    .collect::<String>()
            ),
            "HTTP/1.1 431",
        ),
    ];
    for (name, payload, want) in &refused {
        let (resp, closed) = exchange(proxy.outbound(), payload.as_bytes()).await;
        eprintln!("[hygiene] {name}: {:?}", resp.lines().next().unwrap_or(""));
        assert!(resp.starts_with(want), "{name}: got {resp:?}");
        assert!(closed, "{name}: the connection stayed open");
    }
    // Accepted, cleaned: HTTP/1.0 needs no Host; an h2c upgrade is dropped (served as
    // HTTP/1.1); headers named in Connection never reach the upstream.
    for (name, payload) in [
        ("HTTP/1.0 without Host", "GET /good HTTP/1.0\r\n\r\n"),
        (
            "Upgrade: h2c",
            "GET /good HTTP/1.1\r\nHost: u\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\nConnection: Upgrade, HTTP2-Settings, close\r\n\r\n",
        ),
        (
            "hop-by-hop named in Connection",
            "GET /good HTTP/1.1\r\nHost: u\r\nConnection: x-secret, close\r\nX-Secret: 1\r\n\r\n",
        ),
        (
            "absolute-form agreeing with Host",
            "GET http://u:80/good HTTP/1.1\r\nHost: u\r\nConnection: close\r\n\r\n",
        ),
    ] {
        let (resp, _) = exchange(proxy.outbound(), payload.as_bytes()).await;
        eprintln!("[hygiene] {name}: {:?}", resp.lines().next().unwrap_or(""));
        assert!(
            resp.starts_with("HTTP/1.1 200") || resp.starts_with("HTTP/1.0 200"),
            "{name}: got {resp:?}"
        );
    }
    let metrics = proxy.metrics().await;
    let after = proxy.rss().await;
    let ok = benign.finish("hygiene").await;
    eprintln!("[hygiene] RSS before {before} after {after}");
    assert_eq!(
        up.count("/bad"),
        0,
        "a refused request reached the upstream"
    );
    assert_eq!(up.count("/good"), 4);
    assert_eq!(up.total.load(Ordering::SeqCst), ok + 4);
    let names = up.header_names.lock().expect("lock").clone();
    for forbidden in ["upgrade", "http2-settings", "x-secret", "connection"] {
        assert!(
            !names.iter().any(|n| n == forbidden),
            "{forbidden} reached the upstream: {names:?}"
        );
    }
    for (label, want) in [
        ("reason=\"missing_host\"", 1.0),
        ("reason=\"duplicate_host\"", 1.0),
        ("reason=\"host_mismatch\"", 1.0),
        ("reason=\"h2c_upgrade\"", 1.0),
    ] {
        assert_eq!(
            metric_value(&metrics, "tern_http_rejected_total", label),
            want,
            "{label}: {metrics}"
        );
    }
    assert_eq!(
        metric_value(
            &metrics,
            "tern_limit_exceeded_total",
            "limit=\"uri_length\""
        ),
        1.0
    );
    assert!(
        metric_value(
            &metrics,
            "tern_limit_exceeded_total",
            "limit=\"header_count\""
        ) >= 1.0
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_shed_and_stalled_bodies_end() {
    let (up_addr, up) = Upstream::start().await;
    let proxy = Running::start_with(up_addr, |c| {
        c.max_in_flight_requests = 2;
        c.request_body_idle_timeout = Duration::from_secs(1);
    });
    let entry = proxy.outbound();
    let before = proxy.rss().await;
    // Two held requests fill the budget; the third is shed at once.
    let held: Vec<_> = (0..2)
        .map(|_| tokio::spawn(status_of(entry, "/hold")))
        .collect();
    for _ in 0..200 {
        if up.in_flight.load(Ordering::SeqCst) == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let s = TcpStream::connect(entry).await.expect("connect");
    let (mut rd, mut wr) = s.into_split();
    wr.write_all(b"GET /shed HTTP/1.1\r\nHost: u\r\n\r\n")
        .await
        .expect("request");
    let head = read_head(&mut rd).await;
    eprintln!("[overload] third request: {:?}", head.lines().next());
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(head.contains("tern-proxy-error: overloaded"), "{head}");
    for h in held {
        assert_eq!(h.await.expect("join"), 200, "held requests complete");
    }
    assert_eq!(up.count("/shed"), 0);

    // A body that stops mid-way: ended after the idle timeout; the upstream never sees a
    // complete body, the client gets 408 or a closed connection.
    let s = TcpStream::connect(entry).await.expect("connect");
    let (mut rd, mut wr) = s.into_split();
    wr.write_all(b"POST /stall HTTP/1.1\r\nHost: u\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .expect("partial body");
    let head = read_head(&mut rd).await;
    eprintln!("[stall] {:?}", head.lines().next());
    assert!(
        head.is_empty() || head.starts_with("HTTP/1.1 408"),
        "stalled body: {head:?}"
    );
    drop(wr);
    let after = proxy.rss().await;
    let metrics = proxy.metrics().await;
    eprintln!("[overload] RSS before {before} after {after}");
    assert_eq!(
        up.bodies_ok
            .lock()
            .expect("lock")
            .get("/stall")
            .copied()
            .unwrap_or(0),
        0,
        "a truncated body reached the upstream as a success"
    );
    assert!(metric_value(&metrics, "tern_limit_exceeded_total", "limit=\"in_flight\"") >= 1.0);
    assert!(
        metric_value(
            &metrics,
            "tern_limit_exceeded_total",
            "limit=\"body_idle_timeout\""
        ) >= 1.0,
        "{metrics}"
    );
    // The budget is free again.
    assert_eq!(status_of(entry, "/after").await, 200);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_in_detection_count_against_the_connection_limit() {
    let (up_addr, _up) = Upstream::start().await;
    let proxy = Running::start_with(up_addr, |c| {
        c.max_connections = 2;
        c.detect_timeout = Duration::from_secs(30);
    });
    let entry = proxy.outbound();
    let _silent1 = TcpStream::connect(entry).await.expect("silent 1");
    let _silent2 = TcpStream::connect(entry).await.expect("silent 2");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut over = TcpStream::connect(entry).await.expect("connect");
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(DEADLINE, over.read(&mut b))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "the third connection is closed");
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "tern_limit_exceeded_total",
            "limit=\"connections\""
        ),
        1.0,
        "{metrics}"
    );
    proxy.stop().await;
}
