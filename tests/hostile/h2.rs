//! HTTP/2 with raw frames: stream limits, rapid reset, floods, idle connections.

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_streams_beyond_the_limit_are_refused() {
    let (up_addr, up) = Upstream::start().await;
    let proxy = Running::start(up_addr);
    let benign = Benign::start(proxy.outbound());
    let before = proxy.rss().await;
    let s = TcpStream::connect(proxy.outbound()).await.expect("connect");
    let (mut rd, mut wr) = s.into_split();
    // A client that ignores SETTINGS_MAX_CONCURRENT_STREAMS: 150 held streams at once.
    let mut out = PREFACE.to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    for i in 0..150u32 {
        out.extend(get_headers(1 + 2 * i, "/hold", true));
    }
    wr.write_all(&out).await.expect("write frames");
    // Read for a bounded while (the held streams answer after 3 s), then hang up.
    let reader = tokio::spawn(async move { read_frames_for(&mut rd, DEADLINE).await });
    tokio::time::sleep(Duration::from_secs(5)).await;
    drop(wr);
    let (resets, goaways, _) = reader.await.expect("reader");
    let after = proxy.rss().await;
    benign.finish("h2 streams").await;
    let refused = resets.iter().filter(|c| **c == REFUSED_STREAM).count();
    eprintln!(
        "[h2 streams] RST_STREAM codes {:?}, GOAWAY {goaways:?}; upstream max in flight {}; RSS before {before} after {after}",
        resets
            .iter()
            .fold(BTreeMap::<u32, usize>::new(), |mut m, c| {
                *m.entry(*c).or_default() += 1;
                m
            }),
        up.max_in_flight.load(Ordering::SeqCst),
    );
    assert!(
        refused >= 1 || !goaways.is_empty(),
        "streams beyond the limit were neither refused nor the connection ended"
    );
    assert!(
        up.count("/hold") <= 100,
        "{} streams reached the upstream",
        up.count("/hold")
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_rapid_reset_ends_the_connection_with_goaway() {
    let (up_addr, up) = Upstream::start().await;
    let proxy = Running::start(up_addr);
    let benign = Benign::start(proxy.outbound());
    let before = proxy.rss().await;
    let s = TcpStream::connect(proxy.outbound()).await.expect("connect");
    let (mut rd, mut wr) = s.into_split();
    let reader = tokio::spawn(async move { read_frames_for(&mut rd, DEADLINE).await });
    let mut out = PREFACE.to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    wr.write_all(&out).await.expect("preface");
    // Open and cancel streams as fast as possible (CVE-2023-44487), in batches.
    let attempted = 5_000u32;
    let mut sent = 0;
    for batch in 0..(attempted / 100) {
        let mut out = Vec::new();
        for i in 0..100 {
            let id = 1 + 2 * (batch * 100 + i);
            out.extend(get_headers(id, "/reset", true));
            out.extend(frame(0x3, 0, id, &0x8u32.to_be_bytes())); // CANCEL
        }
        if wr.write_all(&out).await.is_err() {
            break;
        }
        sent += 100;
    }
    let (resets, goaways, closed) = reader.await.expect("reader");
    let after = proxy.rss().await;
    benign.finish("rapid reset").await;
    eprintln!(
        "[rapid reset] sent {sent} HEADERS+RST pairs; GOAWAY codes {goaways:?}; {} RST_STREAMs back; upstream saw {} /reset; RSS before {before} after {after}",
        resets.len(),
        up.count("/reset"),
    );
    assert!(!goaways.is_empty(), "no GOAWAY after {sent} resets");
    assert!(closed, "the connection stayed open");
    assert!(
        up.count("/reset") < sent as usize,
        "every reset stream still reached the upstream"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_continuation_flood_ends_with_goaway() {
    // HEADERS without END_HEADERS, then CONTINUATION frames of junk headers forever.
    let batches = std::iter::once({
        let mut block = request_block("/cont", false);
        block.extend(literal("x-a", b"b", false));
        frame(0x1, 0x1, 1, &block)
    })
    .chain((0..2_000).map(|i| {
        let mut f = Vec::new();
        for j in 0..10 {
            f.extend(frame(
                0x9,
                0,
                1,
                &literal(&format!("x-{i}-{j}"), &[b'v'; 100], false),
            ));
        }
        f
    }));
    let (o, up) = flood("CONTINUATION flood", batches, DEADLINE).await;
    assert!(o.closed, "the connection stayed open");
    assert!(
        o.goaways
            .iter()
            .any(|c| *c == ENHANCE_YOUR_CALM || *c == PROTOCOL_ERROR),
        "GOAWAY {:?}",
        o.goaways
    );
    assert_eq!(up.count("/cont"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_hpack_bomb_never_reaches_the_upstream() {
    // One 4000-byte header enters the dynamic table (index 62), then each request references
    // it 2000 times: 5 KB on the wire, 8 MB of decoded headers per request.
    let batches = (0..50u32).map(|i| {
        let mut block = request_block("/bomb", false);
        if i == 0 {
            block.extend(literal("x-bomb", &[b'b'; 4000], true));
        }
        block.extend(std::iter::repeat_n(0x80 | 62, 2000));
        frame(0x1, 0x5, 1 + 2 * i, &block)
    });
    let (o, up) = flood("HPACK bomb", batches, Duration::from_secs(5)).await;
    assert_eq!(up.count("/bomb"), 0, "a bomb request reached the upstream");
    assert!(
        o.closed || !o.goaways.is_empty() || !o.resets.is_empty(),
        "the oversized header lists were neither refused nor the connection ended"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_empty_data_flood_ends_with_goaway() {
    // RUSTSEC-2026-0258: empty, non-final DATA frames on an open stream, forever.
    let batches = std::iter::once(frame(0x1, 0x4, 1, &request_block("/empty", true)))
        .chain((0..1_000).map(|_| (0..100).flat_map(|_| frame(0x0, 0, 1, &[])).collect()));
    let (o, up) = flood("empty DATA flood", batches, DEADLINE).await;
    assert!(o.closed, "the connection stayed open");
    assert!(
        o.goaways.contains(&ENHANCE_YOUR_CALM),
        "GOAWAY {:?}",
        o.goaways
    );
    assert_eq!(
        up.bodies_ok
            .lock()
            .expect("lock")
            .get("/empty")
            .copied()
            .unwrap_or(0),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_malformed_stream_resets_end_with_goaway() {
    // Streams h2 must reset as malformed (a connection-specific header, RFC 9113 §8.2.2):
    // past --max-local-error-reset-streams the connection ends.
    let batches = (0..300u32).map(|i| {
        let mut block = request_block("/malformed", false);
        block.extend(literal("connection", b"keep-alive", false));
        frame(0x1, 0x5, 1 + 2 * i, &block)
    });
    let (o, up) = flood("malformed-stream resets", batches, DEADLINE).await;
    assert_eq!(up.count("/malformed"), 0);
    assert!(
        o.resets.iter().all(|c| *c == PROTOCOL_ERROR),
        "{:?}",
        o.resets
    );
    assert!(o.closed, "the connection stayed open");
    assert!(
        o.goaways.contains(&ENHANCE_YOUR_CALM),
        "GOAWAY {:?}",
        o.goaways
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_content_length_mismatch_is_never_a_success_upstream() {
    // content-length 10, then 3 bytes and END_STREAM: a malformed request (RFC 9113 §8.1.1).
    let batches = (0..5u32).map(|i| {
        let mut block = request_block("/short", true);
        block.extend(literal("content-length", b"10", false));
        let mut f = frame(0x1, 0x4, 1 + 2 * i, &block);
        f.extend(frame(0x0, 0x1, 1 + 2 * i, b"abc"));
        f
    });
    let (o, up) = flood("content-length mismatch", batches, Duration::from_secs(3)).await;
    assert_eq!(
        up.bodies_ok
            .lock()
            .expect("lock")
            .get("/short")
            .copied()
            .unwrap_or(0),
        0,
        "a short body reached the upstream as complete"
    );
    assert!(
        o.resets.contains(&PROTOCOL_ERROR) || !o.goaways.is_empty(),
        "resets {:?}",
        o.resets
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_ping_settings_window_update_floods_stay_bounded() {
    // Control-frame floods: h2 answers PING and SETTINGS with one pending ACK at a time and
    // stops reading while the ACKs are not drained, so an attacker that never reads fills only
    // its own socket buffers. WINDOW_UPDATE increments past 2^31-1 are a FLOW_CONTROL_ERROR.
    let ping = (0..2_000).map(|i: u64| {
        (0..50)
            .flat_map(|j| frame(0x6, 0, 0, &(i * 50 + j).to_be_bytes()))
            .collect()
    });
    let (o, _) = flood("PING flood", ping, Duration::from_secs(3)).await;
    eprintln!(
        "[PING flood] the proxy wrote back until the attacker stopped reading: closed {}",
        o.closed
    );
    let settings = (0..2_000).map(|_| {
        (0..50)
            .flat_map(|_| frame(0x4, 0, 0, &[0x0, 0x3, 0, 0, 0, 100]))
            .collect()
    });
    flood("SETTINGS flood", settings, Duration::from_secs(3)).await;
    let window = (0..200).map(|_| {
        (0..100)
            .flat_map(|_| frame(0x8, 0, 0, &0x4000_0000u32.to_be_bytes()))
            .collect()
    });
    let (o, _) = flood("WINDOW_UPDATE flood", window, DEADLINE).await;
    assert!(o.closed, "a window past 2^31-1 did not end the connection");
    assert!(
        o.goaways.contains(&0x3),
        "FLOW_CONTROL_ERROR expected: {:?}",
        o.goaways
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_slow_rapid_reset_does_not_amplify_upstream() {
    // The slow variant of rapid reset: each stream is reset only after it was accepted and
    // forwarded, so h2's pending-accept reset limit never trips. Each client stream costs at
    // most one upstream request, and never more than the stream limit at once.
    let (up_addr, up) = Upstream::start().await;
    let proxy = Running::start(up_addr);
    let benign = Benign::start(proxy.outbound());
    let before = proxy.rss().await;
    let s = TcpStream::connect(proxy.outbound()).await.expect("connect");
    let (mut rd, mut wr) = s.into_split();
    let reader = tokio::spawn(async move { read_frames_for(&mut rd, DEADLINE).await });
    let mut out = PREFACE.to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    wr.write_all(&out).await.expect("preface");
    let mut sent = 0usize;
    for round in 0..10u32 {
        let ids: Vec<u32> = (0..50).map(|i| 1 + 2 * (round * 50 + i)).collect();
        let mut out = Vec::new();
        for id in &ids {
            out.extend(get_headers(*id, "/hold", true));
        }
        if wr.write_all(&out).await.is_err() {
            break;
        }
        sent += ids.len();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut out = Vec::new();
        for id in &ids {
            out.extend(frame(0x3, 0, *id, &0x8u32.to_be_bytes()));
        }
        if wr.write_all(&out).await.is_err() {
            break;
        }
    }
    drop(wr);
    let (_, goaways, closed) = reader.await.expect("reader");
    let after = proxy.rss().await;
    let metrics = proxy.metrics().await;
    benign.finish("slow rapid reset").await;
    let seen = up.count("/hold");
    eprintln!(
        "[slow rapid reset] {sent} streams opened and reset; upstream saw {seen}, at most {} at once; GOAWAY {goaways:?}; RSS before {before} after {after}",
        up.max_in_flight.load(Ordering::SeqCst)
    );
    assert!(
        seen <= sent,
        "{seen} upstream requests for {sent} client streams"
    );
    // Past 100 cancelled forwarded requests the connection is refused further streams and
    // closed: one resetting connection gets ~100 + one round of streams into the upstream.
    assert!(
        seen <= 200,
        "{seen} upstream requests from one resetting connection"
    );
    assert!(closed, "the resetting connection stayed open");
    assert!(
        goaways.contains(&0),
        "GOAWAY(NO_ERROR) expected: {goaways:?}"
    );
    assert_eq!(
        metric_value(
            &metrics,
            "tern_limit_exceeded_total",
            "limit=\"premature_resets\""
        ),
        1.0
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_h2_connections_get_goaway() {
    let (up_addr, _up) = Upstream::start().await;
    let proxy = Running::start_with(up_addr, |c| {
        c.http_idle_timeout = Duration::from_secs(1);
    });
    // One request, then silence: the proxy ends the connection with GOAWAY(NO_ERROR).
    let batches = std::iter::once(get_headers(1, "/ok", true));
    let o = h2_attack(proxy.outbound(), batches, DEADLINE).await;
    let metrics = proxy.metrics().await;
    assert!(o.closed, "the idle connection stayed open");
    assert!(o.goaways.contains(&0), "GOAWAY {:?}", o.goaways);
    assert_eq!(
        metric_value(
            &metrics,
            "tern_limit_exceeded_total",
            "limit=\"idle_timeout\""
        ),
        1.0
    );
    proxy.stop().await;
}
