//! Forged identity headers and plaintext to the mesh port never reach the app.

use crate::support::*;

// --- identity ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_client_id_from_a_plain_client_never_reaches_the_app() {
    let (up_addr, up) = Upstream::start().await;
    let proxy = Running::start(up_addr);
    let inbound = proxy.addrs.inbound;
    let benign = Benign::start(proxy.outbound());
    let before = proxy.rss().await;
    let forged = "tern-client-id: spiffe://cluster.local/ns/kube-system/sa/admin";
    for (name, payload) in [
        (
            "CRLF",
            format!("GET /forged HTTP/1.1\r\nHost: u\r\n{forged}\r\nConnection: close\r\n\r\n"),
        ),
        (
            "bare LF",
            format!("GET /forged HTTP/1.1\nHost: u\n{forged}\nConnection: close\n\n"),
        ),
        (
            "mixed case",
            format!(
                "GET /forged HTTP/1.1\r\nHost: u\r\n{}\r\nConnection: close\r\n\r\n",
                forged.to_uppercase().replacen("SPIFFE", "spiffe", 1)
            ),
        ),
    ] {
        let (resp, _) = exchange(inbound, payload.as_bytes()).await;
        eprintln!(
            "[forged id] {name}: {:?}",
            resp.lines().next().unwrap_or("")
        );
        assert!(resp.starts_with("HTTP/1.1 200"), "{name}: got {resp:?}");
    }
    // A head that trickles past the detect timeout (2 s) must not turn into opaque bytes
    // carrying the forged header to the app.
    let s = TcpStream::connect(inbound).await.expect("connect");
    let (mut rd, mut wr) = s.into_split();
    wr.write_all(format!("GET /forged HTTP/1.1\r\nHost: u\r\n{forged}\r\n").as_bytes())
        .await
        .expect("head");
    tokio::time::sleep(Duration::from_secs(3)).await;
    wr.write_all(b"Connection: close\r\n\r\n")
        .await
        .expect("end of head");
    let mut resp = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, rd.read_to_end(&mut resp)).await;
    let resp = String::from_utf8_lossy(&resp);
    eprintln!(
        "[forged id] trickled: {:?}",
        resp.lines().next().unwrap_or("")
    );
    assert!(resp.starts_with("HTTP/1.1 200"), "trickled: got {resp:?}");

    // Split writes must not decide the protocol: a lowercase method (an extension method to
    // hyper, so the app accepts it) arriving alone used to make the connection opaque.
    let s = TcpStream::connect(inbound).await.expect("connect");
    let (mut rd, mut wr) = s.into_split();
    wr.write_all(b"get /forged").await.expect("first write");
    tokio::time::sleep(Duration::from_millis(300)).await;
    wr.write_all(
        format!(" HTTP/1.1\r\nHost: u\r\n{forged}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("second write");
    let mut resp = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, rd.read_to_end(&mut resp)).await;
    let resp = String::from_utf8_lossy(&resp);
    eprintln!("[forged id] split: {:?}", resp.lines().next().unwrap_or(""));
    assert!(resp.starts_with("HTTP/1.1 200"), "split: got {resp:?}");

    let after = proxy.rss().await;
    benign.finish("forged id").await;
    eprintln!("[forged id] RSS before {before} after {after}");
    assert_eq!(
        up.count("/forged"),
        5,
        "every plain request reached the app"
    );
    let seen = up.client_ids.lock().expect("lock").clone();
    assert!(
        seen.is_empty(),
        "forged identities reached the app: {seen:?}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_client_id_via_upgrades_and_long_methods_never_reaches_the_app() {
    let (up_addr, up) = Upstream::start().await;
    let proxy = Running::start(up_addr);
    let inbound = proxy.addrs.inbound;
    let benign = Benign::start(proxy.outbound());
    let forged = "tern-client-id: spiffe://cluster.local/ns/kube-system/sa/admin";
    // An upgrade the app declines, then a second request on the same connection: both heads
    // are parsed and cleaned (they used to travel as opaque bytes).
    let s = TcpStream::connect(inbound).await.expect("connect");
    let (mut rd, mut wr) = s.into_split();
    wr.write_all(
        format!("GET /forged HTTP/1.1\r\nHost: u\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{forged}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("upgrade request");
    let head = read_head(&mut rd).await;
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "declined upgrade: {head:?}"
    );
    let mut body = [0u8; 2];
    rd.read_exact(&mut body).await.expect("body");
    wr.write_all(format!("GET /forged HTTP/1.1\r\nHost: u\r\n{forged}\r\n\r\n").as_bytes())
        .await
        .expect("second request");
    let head = read_head(&mut rd).await;
    assert!(head.starts_with("HTTP/1.1 200"), "second request: {head:?}");
    drop((rd, wr));

    // A method longer than detection's 20-byte cap.
    let (resp, _) = exchange(
        inbound,
        format!(
            "{} /forged HTTP/1.1\r\nHost: u\r\n{forged}\r\nConnection: close\r\n\r\n",
            "PROPFINDEXTENDEDLONGMETHOD"
        )
        .as_bytes(),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "long method: {resp:?}");

    // An upgrade the app accepts: 101, then bytes flow both ways, and the head was cleaned.
    let s = TcpStream::connect(inbound).await.expect("connect");
    let (mut rd, mut wr) = s.into_split();
    wr.write_all(
        format!("GET /ws HTTP/1.1\r\nHost: u\r\nUpgrade: echo\r\nConnection: Upgrade\r\n{forged}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("upgrade");
    let head = read_head(&mut rd).await;
    assert!(
        head.starts_with("HTTP/1.1 101"),
        "accepted upgrade: {head:?}"
    );
    assert!(
        head.to_ascii_lowercase().contains("upgrade: echo"),
        "{head}"
    );
    wr.write_all(b"ping").await.expect("tunnel write");
    let mut echo = [0u8; 4];
    tokio::time::timeout(DEADLINE, rd.read_exact(&mut echo))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(&echo, b"ping");
    drop((rd, wr));

    benign.finish("forged id via upgrade").await;
    assert_eq!(up.count("/forged"), 3);
    assert_eq!(up.count("/ws"), 1);
    let seen = up.client_ids.lock().expect("lock").clone();
    assert!(
        seen.is_empty(),
        "forged identities reached the app: {seen:?}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_to_the_mesh_port_never_reaches_the_app() {
    let (up_addr, up) = Upstream::start().await;
    // Transparent mode on loopback: a connection without an original destination is a mesh
    // connection, which must be mTLS.
    let ca = tern::tls::mint::TestCa::new("cluster.local").expect("ca");
    let issued = ca
        .issue(
            &"spiffe://cluster.local/ns/shop/sa/web".parse().expect("id"),
            Duration::from_secs(3600),
        )
        .expect("issue");
    let mut config = ProxyConfig::loopback();
    config.outbound_target = TargetMode::Fixed(up_addr);
    let proxy = Proxy::bind_with_identity(config, Some(issued.identity().expect("identity")))
        .expect("bind");
    let addrs = proxy.addrs().expect("addrs");
    let (drain, watch) = Drain::new();
    let task = tokio::spawn(proxy.run(drain.clone(), watch));
    let running = Running { addrs, drain, task };
    let forged = "tern-client-id: spiffe://cluster.local/ns/kube-system/sa/admin";
    let (resp, closed) = exchange(
        running.addrs.inbound,
        format!("GET /plain HTTP/1.1\r\nHost: u\r\n{forged}\r\n\r\n").as_bytes(),
    )
    .await;
    let metrics = running.metrics().await;
    assert!(closed, "the plaintext connection stayed open");
    assert!(!resp.contains("HTTP/1.1 200"), "answered: {resp:?}");
    assert_eq!(
        up.total.load(Ordering::SeqCst),
        0,
        "plaintext reached the app"
    );
    assert_eq!(
        metric_value(&metrics, "tern_mesh_handshake_failures_total", "inbound"),
        1.0,
        "{metrics}"
    );
    running.stop().await;
}
