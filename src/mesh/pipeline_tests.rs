//! Pipeline tests of the mesh wire: real proxies on 127.0.0.1:0 with rcgen-minted identities,
//! a real app, real TCP clients. Nothing of the proxy is mocked.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::config::{ProxyConfig, TargetMode};
use crate::demo::metric_value;
use crate::testing::Running;
use crate::tls::SpiffeId;
use crate::tls::mint::TestCa;

const HOUR: Duration = Duration::from_secs(3600);

fn id(s: &str) -> SpiffeId {
    s.parse().expect("valid SPIFFE ID")
}

/// An app that echoes everything until EOF, then closes.
async fn echo_app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Server-side proxy for `app`, with optional inbound policy rules.
fn server_proxy(ca: &TestCa, app: SocketAddr, rules: &[&str]) -> Running {
    let mut c = ProxyConfig::loopback();
    c.inbound_target = TargetMode::Fixed(app);
    c.inbound_policy = rules.iter().map(|r| r.parse().expect("rule")).collect();
    let issued = ca
        .issue(&id("spiffe://cluster.local/ns/shop/sa/echo"), HOUR)
        .expect("issue");
    Running::start(c, Some(issued.identity().expect("identity")))
}

/// Client-side proxy whose outbound goes to `app`, which discovery says is served by the proxy
/// at `server_inbound` with identity `expect`.
fn client_proxy(
    ca: &TestCa,
    me: &str,
    app: SocketAddr,
    server_inbound: SocketAddr,
    expect: &str,
    dir: &std::path::Path,
) -> Running {
    let file = dir.join(format!("discovery-{}.yaml", me.replace('/', "_")));
    std::fs::write(
        &file,
        format!(
            "services:\n  - name: echo.shop\n    addresses: []\n    endpoints:\n      - address: \"{app}\"\n        identity: {expect}\n        mesh_port: {}\n",
            server_inbound.port()
        ),
    )
    .expect("write discovery");
    let mut c = ProxyConfig::loopback();
    c.outbound_target = TargetMode::Fixed(app);
    c.discovery_file = Some(file);
    let issued = ca.issue(&id(me), HOUR).expect("issue");
    Running::start(c, Some(issued.identity().expect("identity")))
}

/// Sends `payload`, half-closes, and returns whatever comes back before EOF.
async fn roundtrip(entry: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(entry)
        .await
        .expect("connect to client proxy");
    // The write may fail if the proxy already refused the connection: what comes back says.
    let _ = s.write_all(payload).await;
    let _ = s.shutdown().await;
    let mut back = Vec::new();
    let _ = s.read_to_end(&mut back).await;
    back
}

#[tokio::test]
async fn mtls_tunnel_carries_bytes_and_labels_identities() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("cluster.local").expect("ca");
    let app = echo_app().await;
    let server = server_proxy(&ca, app, &[]);
    let client_id = "spiffe://cluster.local/ns/shop/sa/web";
    let server_id = "spiffe://cluster.local/ns/shop/sa/echo";
    let client = client_proxy(
        &ca,
        client_id,
        app,
        server.addrs.inbound,
        server_id,
        dir.path(),
    );
    let entry = client.addrs.outbound[0];

    // Several connections share one pooled mesh connection; a large payload crosses intact.
    let big: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    assert_eq!(roundtrip(entry, &big).await, big);
    for _ in 0..3 {
        assert_eq!(roundtrip(entry, b"hello mesh").await, b"hello mesh");
    }

    let cm = client.metrics().await;
    let sm = server.metrics().await;
    let server_label = format!("server_id=\"{server_id}\"");
    let client_label = format!("client_id=\"{client_id}\"");
    assert_eq!(
        metric_value(&cm, "tern_tcp_connections_total", &server_label),
        4.0,
        "{cm}"
    );
    assert!(cm.contains("tls=\"true\""), "{cm}");
    assert_eq!(
        metric_value(&cm, "tern_mesh_connections_total", ""),
        1.0,
        "pooled: {cm}"
    );
    for _ in 0..50 {
        let sm = server.metrics().await;
        if metric_value(&sm, "tern_tcp_connections_closed_total", &client_label) == 4.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sm2 = server.metrics().await;
    assert_eq!(
        metric_value(&sm2, "tern_tcp_connections_closed_total", &client_label),
        4.0,
        "{sm}"
    );
    assert_eq!(
        metric_value(&sm2, "tern_tcp_read_bytes_total", &client_label),
        (big.len() + 30) as f64
    );
    client.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn wrong_server_identity_fails_without_plaintext_fallback() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("cluster.local").expect("ca");
    let app = echo_app().await;
    let server = server_proxy(&ca, app, &[]);
    let client = client_proxy(
        &ca,
        "spiffe://cluster.local/ns/shop/sa/web",
        app,
        server.addrs.inbound,
        "spiffe://cluster.local/ns/shop/sa/someone-else",
        dir.path(),
    );
    let back = roundtrip(client.addrs.outbound[0], b"secret").await;
    assert!(back.is_empty(), "nothing may flow: {back:?}");
    let cm = client.metrics().await;
    assert_eq!(
        metric_value(
            &cm,
            "tern_tcp_connections_closed_total",
            "reason=\"tls_error\""
        ),
        1.0,
        "{cm}"
    );
    assert_eq!(
        metric_value(&cm, "tern_mesh_handshake_failures_total", ""),
        1.0,
        "{cm}"
    );
    client.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn policy_admits_listed_identity_and_denies_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("cluster.local").expect("ca");
    let app = echo_app().await;
    let rule = format!("{}=spiffe://cluster.local/ns/shop/sa/web", app.port());
    let server = server_proxy(&ca, app, &[rule.as_str()]);
    let server_id = "spiffe://cluster.local/ns/shop/sa/echo";
    let good = client_proxy(
        &ca,
        "spiffe://cluster.local/ns/shop/sa/web",
        app,
        server.addrs.inbound,
        server_id,
        dir.path(),
    );
    let bad = client_proxy(
        &ca,
        "spiffe://cluster.local/ns/shop/sa/intruder",
        app,
        server.addrs.inbound,
        server_id,
        dir.path(),
    );
    assert_eq!(
        roundtrip(good.addrs.outbound[0], b"let me in").await,
        b"let me in"
    );
    assert!(
        roundtrip(bad.addrs.outbound[0], b"let me in")
            .await
            .is_empty()
    );
    let sm = server.metrics().await;
    assert_eq!(
        metric_value(
            &sm,
            "tern_inbound_authz_total",
            "reason=\"identity_not_allowed\""
        ),
        1.0,
        "{sm}"
    );
    assert_eq!(
        metric_value(
            &sm,
            "tern_inbound_authz_total",
            "reason=\"identity_allowed\""
        ),
        1.0,
        "{sm}"
    );
    let bm = bad.metrics().await;
    assert_eq!(
        metric_value(
            &bm,
            "tern_tcp_connections_closed_total",
            "reason=\"unauthorized\""
        ),
        1.0,
        "{bm}"
    );
    good.stop().await;
    bad.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn foreign_ca_client_is_refused_at_the_handshake() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("cluster.local").expect("ca");
    let foreign = TestCa::new("cluster.local").expect("foreign ca");
    let app = echo_app().await;
    let server = server_proxy(&ca, app, &[]);
    // The client trusts the real CA (so it accepts the server) but holds a foreign-CA cert.
    let me = id("spiffe://cluster.local/ns/shop/sa/web");
    let issued = foreign
        .issue(&me, HOUR)
        .expect("issue")
        .with_bundle(ca.bundle_pem());
    let file = dir.path().join("d.yaml");
    std::fs::write(
        &file,
        format!(
            "services:\n  - name: echo.shop\n    endpoints:\n      - address: \"{app}\"\n        identity: spiffe://cluster.local/ns/shop/sa/echo\n        mesh_port: {}\n",
            server.addrs.inbound.port()
        ),
    )
    .expect("write");
    let mut c = ProxyConfig::loopback();
    c.outbound_target = TargetMode::Fixed(app);
    c.discovery_file = Some(file);
    let identity = issued.identity();
    // A leaf that does not chain to its own bundle is refused at load: build it unchecked by
    // pairing it with a bundle holding both CAs.
    let identity = match identity {
        Ok(i) => i,
        Err(_) => foreign
            .issue(&me, HOUR)
            .expect("issue")
            .with_bundle(&format!("{}{}", foreign.bundle_pem(), ca.bundle_pem()))
            .identity()
            .expect("identity with both bundles"),
    };
    let client = Running::start(c, Some(identity));
    assert!(roundtrip(client.addrs.outbound[0], b"x").await.is_empty());
    let mut failures = 0.0;
    for _ in 0..50 {
        failures = metric_value(
            &server.metrics().await,
            "tern_mesh_handshake_failures_total",
            "",
        );
        if failures >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(failures >= 1.0, "server counted the refused handshake");
    client.stop().await;
    server.stop().await;
}

/// An HTTP/1 app that records every request head it gets. An `Upgrade` request is answered
/// 101 and the connection then echoes; any other request gets `200 ok` and the connection closes.
async fn recording_app() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let addr = l.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let Some(head) = crate::testing::read_head(&mut s).await else {
                    return;
                };
                let head = head.to_ascii_lowercase();
                let upgrade = head.contains("\r\nupgrade: websocket");
                let _ = tx.send(head);
                if upgrade {
                    let _ = s
                        .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
                        .await;
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                } else {
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                        )
                        .await;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, rx)
}

/// Reads from `s` until the end of a response head.
async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 64 * 1024 {
        match s.read(&mut b).await {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A compromised app in a meshed pod writes a forged `tern-client-id` into requests its own
/// proxy carries as opaque mesh tunnels (an upgrade, a long method): the server-side proxy
/// parses them, and the app sees the verified client identity only. The upgrade still works.
#[tokio::test]
async fn forged_client_id_inside_a_mesh_tunnel_never_reaches_the_app() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("cluster.local").expect("ca");
    let (app, mut heads) = recording_app().await;
    let server = server_proxy(&ca, app, &[]);
    let client_id = "spiffe://cluster.local/ns/shop/sa/web";
    let client = client_proxy(
        &ca,
        client_id,
        app,
        server.addrs.inbound,
        "spiffe://cluster.local/ns/shop/sa/echo",
        dir.path(),
    );
    let entry = client.addrs.outbound[0];
    let verified = format!("\r\ntern-client-id: {client_id}\r\n");
    let forged = "spiffe://cluster.local/ns/shop/sa/forged";

    // (a) A WebSocket upgrade with a forged identity (two spellings): the app gets the
    // verified one, switches protocols, and the tunnel then carries bytes both ways.
    let mut s = TcpStream::connect(entry).await.expect("connect");
    let req = format!(
        "GET /chat HTTP/1.1\r\nHost: echo.shop\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         tern-client-id: {forged}\r\nTERN-Client-Id: {forged}\r\ntern-whatever: x\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write upgrade");
    let resp = read_head(&mut s).await;
    assert!(resp.starts_with("HTTP/1.1 101"), "{resp}");
    let head = heads.recv().await.expect("the app saw the upgrade request");
    assert!(
        !head.contains("forged"),
        "forged identity reached the app: {head}"
    );
    assert!(!head.contains("tern-whatever"), "{head}");
    assert!(
        head.contains(&verified),
        "verified identity missing: {head}"
    );
    assert_eq!(head.matches("tern-client-id").count(), 1, "{head}");
    s.write_all(b"hello through the upgrade")
        .await
        .expect("write");
    let mut back = vec![0u8; b"hello through the upgrade".len()];
    s.read_exact(&mut back).await.expect("echo after 101");
    assert_eq!(back, b"hello through the upgrade");
    drop(s);

    // (b) A method longer than 20 bytes (tunnelled by the client's proxy) with a forged header.
    let method = "X".repeat(30);
    let req = format!("{method} / HTTP/1.1\r\nHost: echo.shop\r\ntern-client-id: {forged}\r\n\r\n");
    let mut s = TcpStream::connect(entry).await.expect("connect");
    s.write_all(req.as_bytes())
        .await
        .expect("write long method");
    let back = read_head(&mut s).await;
    assert!(back.starts_with("HTTP/1.1 200"), "{back}");
    drop(s);
    let head = heads
        .recv()
        .await
        .expect("the app saw the long-method request");
    assert!(head.starts_with(&method.to_ascii_lowercase()), "{head}");
    assert!(
        !head.contains("forged"),
        "forged identity reached the app: {head}"
    );
    assert!(
        head.contains(&verified),
        "verified identity missing: {head}"
    );

    // Both went through the mesh as tunnels and were parsed as HTTP by the server side.
    let sm = server.metrics().await;
    assert_eq!(
        metric_value(
            &sm,
            "tern_http_requests_total",
            &format!("client_id=\"{client_id}\"")
        ),
        2.0,
        "{sm}"
    );
    client.stop().await;
    server.stop().await;
}

/// A server-speaks-first app behind a mesh tunnel (a port not listed as opaque): the client
/// already waited out its own proxy's detect timeout, and the server side stops detecting as soon
/// as the app speaks, so the greeting arrives without a second wait (the server's detect
/// timeout here is an hour).
#[tokio::test]
async fn server_first_app_through_a_mesh_tunnel_is_not_held_by_detection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("cluster.local").expect("ca");
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let app = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"220 hello from the app\r\n").await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let mut c = ProxyConfig::loopback();
    c.inbound_target = TargetMode::Fixed(app);
    c.detect_timeout = HOUR;
    let issued = ca
        .issue(&id("spiffe://cluster.local/ns/shop/sa/echo"), HOUR)
        .expect("issue");
    let server = Running::start(c, Some(issued.identity().expect("identity")));
    let file = dir.path().join("d.yaml");
    std::fs::write(
        &file,
        format!(
            "services:\n  - name: echo.shop\n    endpoints:\n      - address: \"{app}\"\n        identity: spiffe://cluster.local/ns/shop/sa/echo\n        mesh_port: {}\n",
            server.addrs.inbound.port()
        ),
    )
    .expect("write discovery");
    let mut c = ProxyConfig::loopback();
    c.outbound_target = TargetMode::Fixed(app);
    c.discovery_file = Some(file);
    c.detect_timeout = Duration::from_millis(100);
    let issued = ca
        .issue(&id("spiffe://cluster.local/ns/shop/sa/web"), HOUR)
        .expect("issue");
    let client = Running::start(c, Some(issued.identity().expect("identity")));

    let mut s = TcpStream::connect(client.addrs.outbound[0])
        .await
        .expect("connect");
    let mut greeting = vec![0u8; b"220 hello from the app\r\n".len()];
    tokio::time::timeout(Duration::from_secs(60), s.read_exact(&mut greeting))
        .await
        .expect("the greeting is not held until the server's detect timeout")
        .expect("read greeting");
    assert_eq!(greeting, b"220 hello from the app\r\n");
    s.write_all(b"QUIT\r\n").await.expect("write");
    let mut back = [0u8; 6];
    s.read_exact(&mut back).await.expect("echo");
    assert_eq!(&back, b"QUIT\r\n");
    drop(s);
    client.stop().await;
    server.stop().await;
}
