//! Protocol detection (DESIGN.md §5): read the first bytes and decide how to serve a connection.
//!
//! - the HTTP/2 connection preface → [`Detected::Http`] with [`HttpVersion::H2`];
//! - an HTTP/1 request line (`METHOD SP target SP HTTP/1.x`) → [`HttpVersion::H1`];
//! - anything else (including a TLS ClientHello that is not for us) → [`Detected::Opaque`];
//! - nothing decisive within the detect timeout → [`Detected::TimedOut`], served as opaque.
//!
//! Ports known to be server-speaks-first skip detection (they would always time out). The bytes
//! read are handed back inside a [`PrefixedIo`], so nothing is lost or reordered.
//!
//! Metrics: `tern_detect_total{direction, protocol}`, `tern_detect_duration_seconds{direction}`.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::metrics::{Direction, DirectionLabels};
use crate::transport::prefixed::PrefixedIo;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The most bytes read while looking for the end of an HTTP/1 request head.
pub const MAX_DETECT_BYTES: usize = 64 * 1024;
/// Server-speaks-first ports: opaque without waiting (SMTP, submission, MySQL, 4444, PostgreSQL,
/// Redis, Elasticsearch transport, memcached).
pub const DEFAULT_OPAQUE_PORTS: &[u16] = &[25, 587, 3306, 4444, 5432, 6379, 9300, 11211];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HttpVersion {
    H1,
    H2,
}

/// What a connection turned out to speak. The I/O carries the bytes read so far.
#[derive(Debug)]
pub enum Detected<T> {
    Http(PrefixedIo<T>, HttpVersion),
    Opaque(PrefixedIo<T>),
    TimedOut(PrefixedIo<T>),
}

/// Label values of `tern_detect_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Protocol {
    http1,
    http2,
    opaque,
    timeout,
    /// A configured server-speaks-first port: not inspected.
    opaque_port,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DetectLabels {
    direction: Direction,
    protocol: Protocol,
}

/// Detection metrics.
#[derive(Debug, Clone)]
pub struct DetectMetrics {
    outcomes: Family<DetectLabels, Counter>,
    duration: Family<DirectionLabels, Histogram>,
}

impl DetectMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = DetectMetrics {
            outcomes: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(crate::metrics::duration_buckets())
            }),
        };
        registry.register("detect", "Protocol detection outcomes", m.outcomes.clone());
        registry.register_with_unit(
            "detect_duration",
            "Time protocol detection took",
            Unit::Seconds,
            m.duration.clone(),
        );
        m
    }

    pub fn record(&self, direction: Direction, protocol: Protocol, took: Duration) {
        self.outcomes
            .get_or_create(&DetectLabels {
                direction,
                protocol,
            })
            .inc();
        if protocol != Protocol::opaque_port {
            self.duration
                .get_or_create(&DirectionLabels { direction })
                .observe(took.as_secs_f64());
        }
    }
}

/// How a connection is served once detection is done.
#[derive(Debug)]
pub enum Served<T> {
    Http(PrefixedIo<T>, HttpVersion),
    Opaque(PrefixedIo<T>),
}

/// Detects the protocol (skipped on a server-speaks-first `opaque_port`) and records the
/// outcome in `metrics`. `Err`: the client went away during detection.
pub async fn detect_recorded<T: AsyncRead + Unpin>(
    io: T,
    opaque_port: bool,
    timeout: Duration,
    direction: Direction,
    metrics: &DetectMetrics,
) -> std::io::Result<Served<T>> {
    if opaque_port {
        metrics.record(direction, Protocol::opaque_port, Duration::ZERO);
        return Ok(Served::Opaque(PrefixedIo::new(Bytes::new(), io)));
    }
    // Inbound plain clients are untrusted: their upgrades are parsed as HTTP (and their
    // forged tern-* headers stripped) rather than tunnelled; see `Mode`.
    let mode = match direction {
        Direction::inbound => Mode::ParseUpgrades,
        Direction::outbound => Mode::TunnelUpgrades,
    };
    let (detected, took) = detect_mode(io, timeout, mode).await?;
    Ok(match detected {
        Detected::Http(io, version) => {
            let protocol = match version {
                HttpVersion::H1 => Protocol::http1,
                HttpVersion::H2 => Protocol::http2,
            };
            metrics.record(direction, protocol, took);
            Served::Http(io, version)
        }
        Detected::Opaque(io) => {
            metrics.record(direction, Protocol::opaque, took);
            Served::Opaque(io)
        }
        Detected::TimedOut(io) => {
            metrics.record(direction, Protocol::timeout, took);
            Served::Opaque(io)
        }
    })
}

/// How requests that would become tunnels are detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A first request that is `CONNECT` or carries `Upgrade`, or whose method is longer than
    /// 20 bytes, is opaque: carried end to end unchanged (the app's own outbound traffic).
    TunnelUpgrades,
    /// Any HTTP/1 request line is HTTP, whatever its method or headers: the server parses
    /// every request head, strips forged `tern-*` headers, and tunnels only after the app
    /// switched protocols (non-meshed inbound clients).
    ParseUpgrades,
}

/// Reads from `io` until the protocol is known or `timeout` passes ([`Mode::TunnelUpgrades`]).
pub async fn detect<T: AsyncRead + Unpin>(
    io: T,
    timeout: Duration,
) -> std::io::Result<(Detected<T>, Duration)> {
    detect_mode(io, timeout, Mode::TunnelUpgrades).await
}

/// Reads from `io` until the protocol is known or `timeout` passes.
pub async fn detect_mode<T: AsyncRead + Unpin>(
    mut io: T,
    timeout: Duration,
    mode: Mode,
) -> std::io::Result<(Detected<T>, Duration)> {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = BytesMut::with_capacity(512);
    let verdict = loop {
        if let Some(v) = classify(&buf, mode) {
            break Some(v);
        }
        if buf.len() >= MAX_DETECT_BYTES {
            // A request line but a head longer than the cap: HTTP, and hyper answers 431.
            break http1_request_line(&buf).then_some(Verdict::Http(HttpVersion::H1));
        }
        if buf.capacity() == buf.len() {
            buf.reserve(buf.len().max(512));
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Err(_) => {
                let request_line = http1_request_line(&buf);
                let io = PrefixedIo::new(buf.freeze(), io);
                // A complete request line whose head trickles in (slowloris) is HTTP: hyper's
                // header-read timeout closes it, and a forged tern-* header in it is stripped,
                // rather than the head travelling on as opaque bytes.
                if request_line {
                    return Ok((Detected::Http(io, HttpVersion::H1), started.elapsed()));
                }
                return Ok((Detected::TimedOut(io), started.elapsed()));
            }
            Ok(Err(e)) => return Err(e),
            // EOF: whatever arrived is all there is; decide on it.
            Ok(Ok(0)) => break classify(&buf, mode).or(Some(Verdict::Opaque)),
            Ok(Ok(_)) => {}
        }
    };
    let io = PrefixedIo::new(Bytes::from(buf), io);
    let detected = match verdict {
        Some(Verdict::Http(v)) => Detected::Http(io, v),
        Some(Verdict::Opaque) | None => Detected::Opaque(io),
    };
    Ok((detected, started.elapsed()))
}

/// What a connection's first bytes say ([`classify_prefix`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Http(HttpVersion),
    Opaque,
}

/// The pure decision [`detect`] makes on the bytes read so far: `None` while more bytes are
/// needed. Exposed for the fuzz targets and the corpus replay test.
pub fn classify_prefix(buf: &[u8]) -> Option<Verdict> {
    classify(buf, Mode::TunnelUpgrades)
}

/// As [`classify_prefix`], in `mode`.
pub fn classify_prefix_mode(buf: &[u8], mode: Mode) -> Option<Verdict> {
    classify(buf, mode)
}

/// Decides on the bytes so far, or `None` when more are needed.
fn classify(buf: &[u8], mode: Mode) -> Option<Verdict> {
    let max_method = match mode {
        Mode::TunnelUpgrades => MAX_METHOD_LEN,
        Mode::ParseUpgrades => MAX_DETECT_BYTES,
    };
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (buf.len() >= H2_PREFACE.len()).then_some(Verdict::Http(HttpVersion::H2));
    }
    // An HTTP/1 request line: token SP target SP "HTTP/1." digit CRLF.
    let Some(end) = line_end(buf) else {
        // Keep reading only while this could still be a request line.
        return (!plausible_start(buf, max_method)).then_some(Verdict::Opaque);
    };
    let line = &buf[..end];
    let mut parts = line.split(|b| *b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Some(Verdict::Opaque);
    };
    let is_http1 = !method.is_empty()
        && method.len() <= max_method
        && method.iter().all(|b| is_method_byte(*b))
        && !target.is_empty()
        && !target.iter().any(u8::is_ascii_control)
        && (version == b"HTTP/1.1" || version == b"HTTP/1.0");
    if !is_http1 {
        return Some(Verdict::Opaque);
    }
    // A connection that starts with CONNECT or an Upgrade (WebSocket) becomes a tunnel after
    // its first exchange: serve it as opaque TCP, which carries it end to end unchanged.
    if mode == Mode::ParseUpgrades {
        return Some(Verdict::Http(HttpVersion::H1));
    }
    if method == b"CONNECT" {
        return Some(Verdict::Opaque);
    }
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {
            // `Upgrade: h2c` is not a tunnel: the server drops it and serves HTTP/1.1, so the
            // rest of the connection stays under tern's header handling.
            let upgrade = req.headers.iter().any(|h| {
                h.name.eq_ignore_ascii_case("upgrade")
                    && !h
                        .value
                        .split(|b| *b == b',')
                        .all(|t| t.trim_ascii().eq_ignore_ascii_case(b"h2c"))
            });
            Some(if upgrade {
                Verdict::Opaque
            } else {
                Verdict::Http(HttpVersion::H1)
            })
        }
        // Read the rest of the head (bounded by MAX_DETECT_BYTES and the timeout).
        Ok(httparse::Status::Partial) => None,
        // A malformed head: let hyper answer it with a 400 rather than tunnel it blindly.
        Err(_) => Some(Verdict::Http(HttpVersion::H1)),
    }
}

/// Whether `buf` starts with a complete HTTP/1 request line.
fn http1_request_line(buf: &[u8]) -> bool {
    line_end(buf).is_some_and(|end| {
        let line = &buf[..end];
        line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0")
    })
}

/// Where the first line ends (before its CRLF, or a bare LF, which hyper accepts too: such a
/// request must be served as HTTP, not tunnelled past tern's header hygiene as opaque bytes).
fn line_end(buf: &[u8]) -> Option<usize> {
    let lf = buf.iter().position(|b| *b == b'\n')?;
    Some(if lf > 0 && buf[lf - 1] == b'\r' {
        lf - 1
    } else {
        lf
    })
}

/// Whether `buf` (no line end yet) could be the start of a request line that [`classify`]
/// would call HTTP. It must accept every prefix of such a line (any method case, any byte a
/// target may hold, a CR waiting for its LF): otherwise how the client splits its writes would
/// decide between HTTP and opaque, and opaque bytes reach the app past tern's header hygiene.
fn plausible_start(buf: &[u8], max_method: usize) -> bool {
    let method_len = buf.iter().take_while(|b| is_method_byte(**b)).count();
    if method_len == buf.len() {
        return method_len <= max_method;
    }
    method_len > 0
        && method_len <= max_method
        && buf[method_len] == b' '
        && buf[method_len + 1..]
            .iter()
            .all(|b| !b.is_ascii_control() || *b == b'\r')
}

/// Longest method detection waits for; longer ones are opaque however they arrive.
const MAX_METHOD_LEN: usize = 20;

fn is_method_byte(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'-' || b == b'_'
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn run(input: &[u8], close: bool) -> (&'static str, Vec<u8>) {
        let (mut a, b) = tokio::io::duplex(16 * 1024);
        let owned = input.to_vec();
        // The writer runs beside detection: inputs may exceed the pipe's buffer.
        tokio::spawn(async move {
            let _ = a.write_all(&owned).await;
            if !close {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            drop(a);
        });
        let (d, _) = detect(b, Duration::from_millis(100)).await.expect("detect");
        let (kind, mut io) = match d {
            Detected::Http(io, HttpVersion::H1) => ("h1", io),
            Detected::Http(io, HttpVersion::H2) => ("h2", io),
            Detected::Opaque(io) => ("opaque", io),
            Detected::TimedOut(io) => ("timeout", io),
        };
        let mut replay = vec![0u8; input.len()];
        io.read_exact(&mut replay).await.expect("replay");
        (kind, replay)
    }

    #[tokio::test]
    async fn outcomes_and_bytes_preserved() {
        let cases: &[(&[u8], bool, &str)] = &[
            (b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", false, "h1"),
            (b"POST /a?b=c HTTP/1.0\r\n\r\n", false, "h1"),
            // A request line whose head never completes (slowloris) is still HTTP.
            (b"POST /a?b=c HTTP/1.0\r\nhost: x\r\n", false, "h1"),
            // Bare LF line ends: hyper accepts them, so they must not pass as opaque bytes.
            (b"GET / HTTP/1.1\nhost: x\n\n", false, "h1"),
            (b"GET / HTTP/1.1\nhost: x\n", false, "h1"),
            (
                b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
                false,
                "opaque",
            ),
            (b"CONNECT x:443 HTTP/1.1\r\n", false, "opaque"),
            (H2_PREFACE, false, "h2"),
            (
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
                false,
                "opaque",
            ),
            (b"SSH-2.0-OpenSSH_9.6\r\n", false, "opaque"),
            (b"GET / HTTP/2.0\r\n", false, "opaque"),
            (b"GET /", false, "timeout"),
            (b"PRI * HTTP/2", false, "timeout"),
            (b"", false, "timeout"),
            (b"GET /", true, "opaque"),
            (b"*1\r\n$4\r\nPING\r\n", false, "opaque"),
        ];
        for (input, close, want) in cases {
            let (got, replay) = run(input, *close).await;
            assert_eq!(got, *want, "input {:?}", String::from_utf8_lossy(input));
            assert_eq!(&replay[..], *input, "bytes replayed in order");
        }
    }

    /// However a client splits its writes, a request that is HTTP as a whole is never decided
    /// opaque on a prefix (found by the detect fuzz target: a non-ASCII target byte, a lowercase
    /// method, or a CR arriving before its LF used to flip a trickled request to opaque).
    #[test]
    fn split_writes_do_not_change_the_verdict() {
        let inputs: &[&[u8]] = &[
            b"GET /\xff HTTP/1.1\r\ntern-client-id: x\r\n\r\n",
            b"get / HTTP/1.1\r\nhost: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nhost: x\r\n\r\n",
            b"M-SEARCH * HTTP/1.1\r\n\r\n",
            b"GETAT /ws\xff\xff HTTP/1.1\n\n",
        ];
        for input in inputs {
            let whole = classify(input, Mode::TunnelUpgrades);
            assert!(
                matches!(whole, Some(Verdict::Http(HttpVersion::H1))),
                "{input:?}"
            );
            for end in 1..input.len() {
                let part = classify(&input[..end], Mode::TunnelUpgrades);
                assert!(
                    part.is_none() || part == whole,
                    "{:?} decided {part:?}",
                    String::from_utf8_lossy(&input[..end])
                );
            }
        }
    }

    #[test]
    fn inbound_mode_parses_upgrades_and_long_methods() {
        let long = format!(
            "{} / HTTP/1.1\r\ntern-client-id: x\r\n\r\n",
            "A".repeat(300)
        );
        for input in [
            &b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\ntern-client-id: x\r\n\r\n"[..],
            b"CONNECT a:443 HTTP/1.1\r\n\r\n",
            long.as_bytes(),
        ] {
            assert_eq!(
                classify(input, Mode::ParseUpgrades),
                Some(Verdict::Http(HttpVersion::H1)),
                "{}",
                String::from_utf8_lossy(input)
            );
            assert_eq!(classify(input, Mode::TunnelUpgrades), Some(Verdict::Opaque));
        }
        assert_eq!(
            classify(b"\x16\x03\x01", Mode::ParseUpgrades),
            Some(Verdict::Opaque)
        );
    }

    #[tokio::test]
    async fn endless_line_is_opaque_after_cap() {
        let mut input = b"GET /".to_vec();
        input.extend(std::iter::repeat_n(b'a', MAX_DETECT_BYTES + 10));
        let (got, replay) = run(&input, false).await;
        assert_eq!(got, "opaque");
        assert_eq!(replay, input);
    }
}
