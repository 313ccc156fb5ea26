//! Opaque TCP through two real pods: app A ─▶ iptables ─▶ proxy A ─▶ veth ─▶ iptables ─▶ proxy B
//! ─▶ app B, with metrics, loops, large transfers, IPv6 and the SIGTERM drain.

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;

use crate::support::{self, B_V4, B_V6, CLIENT, Mesh, SERVER, metric, promtool_check};

const MIB: usize = 1024 * 1024;

#[test]
fn bytes_flow_both_ways_with_half_close_and_both_proxies_count_them() {
    if !support::ready() {
        return;
    }
    let mesh = Mesh::start(&[]);
    let _server = mesh
        .b
        .spawn("echo", &["python3", "-c", SERVER, B_V4, "7000", "echo"]);
    mesh.b.wait_listening(B_V4, 7000);

    let size = MIB;
    let out = mesh.a.run_ok(&[
        "python3",
        "-c",
        CLIENT,
        B_V4,
        "7000",
        "echo",
        &size.to_string(),
    ]);
    let f: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(f.len(), 4, "client output: {out}");
    assert_eq!(
        f[0], f[2],
        "length: everything sent came back, plus the after-EOF trailer"
    );
    assert_eq!(
        f[1], f[3],
        "sha256: the response after the client's half-close arrived intact"
    );
    let back = size + "after-eof\n".len();

    let text_a = mesh.a.wait_metric(
        "tern_tcp_connections_closed_total",
        &[("direction", "outbound"), ("reason", "eof")],
        1.0,
    );
    let text_b = mesh.b.wait_metric(
        "tern_tcp_connections_closed_total",
        &[("direction", "inbound"), ("reason", "eof")],
        1.0,
    );
    let get = |text: &str, name: &str, dir: &str| metric(text, name, &[("direction", dir)]);
    assert_eq!(
        get(&text_a, "tern_tcp_connections_total", "outbound"),
        Some(1.0)
    );
    assert_eq!(
        get(&text_b, "tern_tcp_connections_total", "inbound"),
        Some(1.0)
    );
    for (text, dir) in [(&text_a, "outbound"), (&text_b, "inbound")] {
        assert_eq!(
            get(text, "tern_tcp_read_bytes_total", dir),
            Some(size as f64),
            "{dir} read bytes"
        );
        assert_eq!(
            get(text, "tern_tcp_write_bytes_total", dir),
            Some(back as f64),
            "{dir} write bytes"
        );
        assert_eq!(get(text, "tern_tcp_connections_open", dir), Some(0.0));
    }
    assert_eq!(
        get(&text_a, "tern_tcp_connections_total", "inbound").unwrap_or(0.0),
        0.0,
        "A's app made the connection: nothing came in to A"
    );
    promtool_check(&text_a);
    promtool_check(&text_b);
}

#[test]
fn large_transfer_arrives_intact() {
    if !support::ready() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("big.bin");
    write_pseudo_random(&file, 100 * MIB);
    let want = sha256sum(&file);

    // Opaque: byte counts must match across both proxies, which only holds for TCP (an HTTP
    // proxy re-frames heads and pools upstream connections; HTTP has its own tests).
    let mesh = Mesh::start(&["--opaque-ports", "8000"]);
    let root = dir.path().to_str().expect("utf-8");
    let _server = mesh.b.spawn(
        "http",
        &[
            "python3",
            "-m",
            "http.server",
            "8000",
            "--bind",
            B_V4,
            "--directory",
            root,
        ],
    );
    mesh.b.wait_listening(B_V4, 8000);
    let url = format!("http://{B_V4}:8000/big.bin");
    let got = mesh.a.run_ok(&[
        "bash",
        "-o",
        "pipefail",
        "-c",
        &format!("curl -sSf {url} | sha256sum"),
    ]);
    assert_eq!(got.split_whitespace().next(), Some(want.as_str()));

    let text_a = mesh.a.wait_metric(
        "tern_tcp_connections_closed_total",
        &[("direction", "outbound"), ("reason", "eof")],
        1.0,
    );
    let text_b = mesh.b.wait_metric(
        "tern_tcp_connections_closed_total",
        &[("direction", "inbound"), ("reason", "eof")],
        1.0,
    );
    let out = [("direction", "outbound")];
    let inb = [("direction", "inbound")];
    let down_a = metric(&text_a, "tern_tcp_write_bytes_total", &out);
    let down_b = metric(&text_b, "tern_tcp_write_bytes_total", &inb);
    assert!(down_a.is_some_and(|b| b > (100 * MIB) as f64), "{down_a:?}");
    assert_eq!(down_a, down_b, "both proxies counted the same bytes");
    assert_eq!(
        metric(&text_a, "tern_tcp_read_bytes_total", &out),
        metric(&text_b, "tern_tcp_read_bytes_total", &inb),
    );
}

#[test]
fn loop_to_the_peers_outbound_port_is_refused() {
    if !support::ready() {
        return;
    }
    let mesh = Mesh::start(&[]);
    // A's app connects to B's outbound port: B's inbound sees orig dst :4140, its own listener.
    let out = mesh
        .a
        .run_ok(&["python3", "-c", CLIENT, B_V4, "4140", "probe"]);
    assert_eq!(out.trim(), "0", "a loop gets no bytes back");
    let text = mesh.b.wait_metric(
        "tern_tcp_connections_closed_total",
        &[("direction", "inbound"), ("reason", "loop")],
        1.0,
    );
    assert_eq!(
        metric(
            &text,
            "tern_tcp_read_bytes_total",
            &[("direction", "inbound")]
        )
        .unwrap_or(0.0),
        0.0
    );
}

#[test]
fn sigterm_drains_open_connections_then_exits_zero() {
    if !support::ready() {
        return;
    }
    let mut mesh = Mesh::start(&[]);
    let _server = mesh
        .b
        .spawn("drip", &["python3", "-c", SERVER, B_V4, "7001", "drip"]);
    mesh.b.wait_listening(B_V4, 7001);

    let mut client = mesh
        .a
        .cmd(&["python3", "-c", CLIENT, B_V4, "7001", "drip"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn client");
    let mut lines = BufReader::new(client.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a line").expect("read");
    assert_eq!(first, "connected");
    mesh.a.wait_metric(
        "tern_tcp_connections_open",
        &[("direction", "outbound")],
        1.0,
    );

    let pid = mesh.proxy_a.pid();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(kill.success());
    let mut status = None;
    for _ in 0..600 {
        status = mesh.a.admin_status("/ready");
        if status == Some(503) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(status, Some(503), "/ready turns 503 while draining");
    assert_eq!(mesh.a.admin_status("/live"), Some(200));

    // The open connection still finishes: the rest of the data flows after SIGTERM.
    let mut stdin = client.stdin.take().expect("stdin");
    stdin.write_all(b"go\n").expect("tell the client to go on");
    drop(stdin);
    let last = lines.next().expect("a result line").expect("read");
    assert_eq!(last, format!("{} intact", 161 * 65536));
    assert!(client.wait().expect("client").success());

    let exit = mesh.proxy_a.wait_exit();
    assert!(exit.success(), "proxy exit status after drain: {exit}");
    let log = mesh.proxy_a.log();
    assert!(log.contains("draining"), "{log}");
}

#[test]
fn ipv6_goes_through_both_proxies() {
    if !support::ready() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("hello.txt"), "hello over IPv6\n").expect("write");
    // Opaque: this test is about TCP through both proxies (HTTP has its own tests).
    let mesh = Mesh::start(&["--opaque-ports", "8080"]);
    let root = dir.path().to_str().expect("utf-8");
    let _server = mesh.b.spawn(
        "http6",
        &[
            "python3",
            "-m",
            "http.server",
            "8080",
            "--bind",
            B_V6,
            "--directory",
            root,
        ],
    );
    mesh.b.wait_listening(B_V6, 8080);
    let body = mesh.a.run_ok(&[
        "curl",
        "-gsSf",
        "--max-time",
        "10",
        &format!("http://[{B_V6}]:8080/hello.txt"),
    ]);
    assert_eq!(body, "hello over IPv6\n");
    mesh.a.wait_metric(
        "tern_tcp_connections_closed_total",
        &[("direction", "outbound"), ("reason", "eof")],
        1.0,
    );
    mesh.b.wait_metric(
        "tern_tcp_connections_closed_total",
        &[("direction", "inbound"), ("reason", "eof")],
        1.0,
    );
}

/// Writes `len` bytes of xorshift output: incompressible, reproducible, fast.
fn write_pseudo_random(path: &std::path::Path, len: usize) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; MIB];
    for _ in 0..len / MIB {
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf).expect("write");
    }
    f.flush().expect("flush");
}

fn sha256sum(path: &std::path::Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_string()
}
