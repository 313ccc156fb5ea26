//! HTTP glue shared by both directions: body and error types, tern's own headers, hop-by-hop
//! header handling, upstream clients ([`client`]) and the one error edge ([`rescue`]).
//!
//! tern's headers (all `tern-*`) are stripped from every request that arrives from outside the
//! mesh, so an app can never forge them:
//! - `tern-client-id`: the verified SPIFFE ID of a meshed client, added by the inbound proxy;
//! - `tern-target`: on the mesh wire, the `ip:port` the request is for inside the peer pod;
//! - `tern-orig-proto`: on the mesh wire, `HTTP/1.1` or `HTTP/1.0` when the app spoke HTTP/1;
//! - `tern-proxy-error`: on a response the proxy generated, why.

pub mod client;
pub mod conn_exec;
pub mod conn_timer;
pub mod h1_guard;
pub mod h2_upstream;
pub mod limits;
pub mod rescue;
pub mod server;

#[cfg(test)]
mod pipeline_tests;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http_body_util::BodyExt;

/// Errors crossing HTTP layers; classified by downcast in [`rescue`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type every HTTP stage passes on.
pub type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// How HTTP/1 header names are written on the way out (`--http1-header-case`).
///
/// Names are case-insensitive (RFC 9110), but some old apps match them byte for byte, so by
/// default the case an HTTP/1 peer wrote reaches the HTTP/1 peer on the other side of a proxy
/// (DESIGN.md, "Protocol detection"). Keeping it costs hyper a second header map per head and a
/// lookup per header written: about 7k of a hop's ~43k instructions per request
/// (benches/README.md, "Header case"). HTTP/2, and so the mesh hop, carries names lowercase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HeaderCase {
    /// Names keep the case the sender wrote (between HTTP/1 peers of one proxy).
    Preserve,
    /// Names are written lowercase, as HTTP/2, Envoy and HAProxy write them.
    Lowercase,
}

impl HeaderCase {
    /// Whether hyper's HTTP/1 builders should record and replay the original case.
    pub fn preserve(self) -> bool {
        self == HeaderCase::Preserve
    }
}

pub const CLIENT_ID: HeaderName = HeaderName::from_static("tern-client-id");
pub const TARGET: HeaderName = HeaderName::from_static("tern-target");
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("tern-orig-proto");
pub const PROXY_ERROR: HeaderName = HeaderName::from_static("tern-proxy-error");

/// Boxes any body whose error converts into [`BoxError`].
pub fn boxed<B>(body: B) -> BoxBody
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// An empty body.
pub fn empty() -> BoxBody {
    boxed(http_body_util::Empty::new())
}

/// Removes every `tern-*` header.
pub fn strip_tern_headers(headers: &mut HeaderMap) {
    let ours: Vec<HeaderName> = headers
        .keys()
        .filter(|n| n.as_str().starts_with("tern-"))
        .cloned()
        .collect();
    for name in ours {
        headers.remove(name);
    }
}

/// Which fixed hop-by-hop header `name` is, as a bit of [`strip_hop_by_hop`]'s set (0: none).
/// One string match (length first) per name.
fn hop_by_hop_bit(name: &HeaderName) -> u8 {
    match name.as_str() {
        "connection" => 1,
        "transfer-encoding" => 2,
        "upgrade" => 4,
        "te" => 8,
        "keep-alive" => 16,
        "proxy-connection" => 32,
        _ => 0,
    }
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): `Connection` and every header it names,
/// `Keep-Alive`, `Proxy-Connection`, `TE` (except `trailers`), `Transfer-Encoding`, `Upgrade`.
/// Framing is re-done by hyper on the next hop.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names finds which are present; only those are removed (a removal
    // hashes the name). Most requests carry none; most responses only `Connection: keep-alive`.
    let present = headers.keys().fold(0, |set, n| set | hop_by_hop_bit(n));
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        // Usually just `keep-alive` or `close`: then nothing is collected (no allocation).
        let mut named: Vec<HeaderName> = Vec::new();
        for v in headers.get_all(header::CONNECTION) {
            for n in v.as_bytes().split(|b| *b == b',') {
                let n = n.trim_ascii();
                // Options, not header names (a `Keep-Alive` header is removed below anyway).
                if n.is_empty()
                    || n.eq_ignore_ascii_case(b"keep-alive")
                    || n.eq_ignore_ascii_case(b"close")
                {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(n) {
                    named.push(name);
                }
            }
        }
        for name in named {
            headers.remove(name);
        }
        headers.remove(header::CONNECTION);
    }
    if present & 2 != 0 {
        headers.remove(header::TRANSFER_ENCODING);
    }
    if present & 4 != 0 {
        headers.remove(header::UPGRADE);
    }
    if present & 16 != 0 {
        headers.remove(HeaderName::from_static("keep-alive"));
    }
    if present & 32 != 0 {
        headers.remove(HeaderName::from_static("proxy-connection"));
    }
    if present & 8 != 0 {
        let te_trailers = headers.get_all(header::TE).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            })
        });
        headers.remove(header::TE);
        if te_trailers {
            headers.insert(header::TE, http::HeaderValue::from_static("trailers"));
        }
    }
}

/// `ip:port` as a header value (the `tern-target` value), without the formatting machinery
/// for the common IPv4 case.
pub fn socket_addr_value(addr: std::net::SocketAddr) -> http::HeaderValue {
    let std::net::SocketAddr::V4(v4) = addr else {
        return http::HeaderValue::from_str(&addr.to_string())
            .expect("a socket address is a valid header value");
    };
    let mut buf = [0u8; 21];
    let mut n = 0;
    let push_num = |buf: &mut [u8; 21], n: &mut usize, v: u32| {
        let mut digits = [0u8; 5];
        let mut len = 0;
        let mut v = v;
        loop {
            digits[len] = b'0' + (v % 10) as u8;
            len += 1;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        for d in digits[..len].iter().rev() {
            buf[*n] = *d;
            *n += 1;
        }
    };
    for (i, octet) in v4.ip().octets().into_iter().enumerate() {
        if i > 0 {
            buf[n] = b'.';
            n += 1;
        }
        push_num(&mut buf, &mut n, u32::from(octet));
    }
    buf[n] = b':';
    n += 1;
    push_num(&mut buf, &mut n, u32::from(v4.port()));
    http::HeaderValue::from_bytes(&buf[..n]).expect("digits, dots and a colon")
}

/// Whether a request is gRPC (`content-type: application/grpc[+proto|...]`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_tern_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            "keep-alive, x-secret".parse().expect("value"),
        );
        h.insert("x-secret", "1".parse().expect("value"));
        h.insert("keep-alive", "timeout=5".parse().expect("value"));
        h.insert(header::TE, "gzip, trailers".parse().expect("value"));
        h.insert(header::UPGRADE, "h2c".parse().expect("value"));
        h.insert("x-app", "kept".parse().expect("value"));
        h.insert(CLIENT_ID, "spiffe://forged".parse().expect("value"));
        h.insert("tern-anything", "x".parse().expect("value"));
        strip_hop_by_hop(&mut h);
        strip_tern_headers(&mut h);
        let names: Vec<&str> = h.keys().map(|n| n.as_str()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(h.get("x-app").map(|v| v.as_bytes()), Some(&b"kept"[..]));
        assert_eq!(
            h.get(header::TE).map(|v| v.as_bytes()),
            Some(&b"trailers"[..])
        );
        let mut clean = HeaderMap::new();
        clean.insert("x-app", "kept".parse().expect("value"));
        strip_hop_by_hop(&mut clean);
        assert_eq!(clean.len(), 1);
        // `Connection: keep-alive` alone (a typical response); `Connection` naming `TE` and an
        // upgrade (both go, trailers included, as the header named them).
        let mut resp = HeaderMap::new();
        resp.insert(header::CONNECTION, "Keep-Alive".parse().expect("value"));
        resp.insert("keep-alive", "timeout=5".parse().expect("value"));
        resp.insert("x-app", "kept".parse().expect("value"));
        strip_hop_by_hop(&mut resp);
        assert_eq!(
            resp.keys().map(|n| n.as_str()).collect::<Vec<_>>(),
            ["x-app"]
        );
        let mut named = HeaderMap::new();
        named.insert(
            header::CONNECTION,
            "te, upgrade, close".parse().expect("value"),
        );
        named.insert(header::TE, "trailers".parse().expect("value"));
        named.insert(header::UPGRADE, "websocket".parse().expect("value"));
        named.insert(header::TRANSFER_ENCODING, "chunked".parse().expect("value"));
        named.insert("proxy-connection", "keep-alive".parse().expect("value"));
        strip_hop_by_hop(&mut named);
        assert!(named.is_empty(), "{named:?}");
    }

    #[test]
    fn socket_addr_values_match_display() {
        for a in [
            "0.0.0.0:0",
            "198.18.0.2:8080",
            "255.255.255.255:65535",
            "10.0.12.1:443",
            "[2001:db8::1]:80",
        ] {
            let addr: std::net::SocketAddr = a.parse().expect("address");
            assert_eq!(socket_addr_value(addr).to_str().expect("ascii"), a);
        }
    }
}
