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
pub mod h1_guard;
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

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): `Connection` and every header it names,
/// `Keep-Alive`, `Proxy-Connection`, `TE` (except `trailers`), `Transfer-Encoding`, `Upgrade`.
/// Framing is re-done by hyper on the next hop.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
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
    }
}
