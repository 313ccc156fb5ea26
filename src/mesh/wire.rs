//! What a mesh stream asks for, read from its request head: the pure parser of the mesh wire's
//! per-stream framing (DESIGN.md §4), shared by the server and the `mesh_wire` fuzz target.
//!
//! - `CONNECT ip:port` → [`StreamHead::Tunnel`] to that port in this pod;
//! - any other method → [`StreamHead::Http`]: `tern-target: ip:port` names the app, and
//!   `tern-orig-proto: HTTP/1.1|HTTP/1.0` says the client spoke HTTP/1 (absent: HTTP/2).
//!
//! Port 0 is never a valid target. Errors: [`WireError`]; the server answers them with 400
//! (`tern-proxy-error: bad_target` / `bad_request`). No metrics of its own.

use std::net::SocketAddr;

use http::{HeaderMap, HeaderValue, Method, Uri, Version};

use crate::http::{ORIG_PROTO, TARGET};

/// What one mesh stream is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamHead {
    /// An opaque TCP tunnel to `port` in this pod.
    Tunnel { port: u16 },
    /// An HTTP request for the app at `target`, to be sent in `version`.
    Http {
        target: SocketAddr,
        version: Version,
    },
}

/// A mesh stream head the server refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("CONNECT stream without a valid ip:port authority")]
    BadTunnelTarget,
    #[error("HTTP stream without a valid tern-target header")]
    BadHttpTarget,
    #[error("HTTP stream with an unknown tern-orig-proto")]
    BadOrigProto,
}

/// Reads a mesh stream's head.
pub fn parse(method: &Method, uri: &Uri, headers: &HeaderMap) -> Result<StreamHead, WireError> {
    if method == Method::CONNECT {
        return match uri.port_u16() {
            Some(port) if port != 0 => Ok(StreamHead::Tunnel { port }),
            _ => Err(WireError::BadTunnelTarget),
        };
    }
    let target = headers
        .get(TARGET)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<SocketAddr>().ok())
        .filter(|t| t.port() != 0)
        .ok_or(WireError::BadHttpTarget)?;
    let version = match headers.get(ORIG_PROTO).map(HeaderValue::as_bytes) {
        Some(b"HTTP/1.0") => Version::HTTP_10,
        Some(b"HTTP/1.1") => Version::HTTP_11,
        Some(_) => return Err(WireError::BadOrigProto),
        None => Version::HTTP_2,
    };
    Ok(StreamHead::Http { target, version })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(method: &str, uri: &str, headers: &[(&str, &str)]) -> Result<StreamHead, WireError> {
        let mut h = HeaderMap::new();
        for (n, v) in headers {
            h.append(
                http::HeaderName::from_bytes(n.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        let m = Method::from_bytes(method.as_bytes()).expect("method");
        parse(&m, &uri.parse().expect("uri"), &h)
    }

    #[test]
    fn heads_parse_or_are_refused() {
        assert_eq!(
            head("CONNECT", "10.0.0.1:8080", &[]),
            Ok(StreamHead::Tunnel { port: 8080 })
        );
        assert_eq!(
            head("CONNECT", "10.0.0.1:0", &[]),
            Err(WireError::BadTunnelTarget)
        );
        assert_eq!(head("CONNECT", "/x", &[]), Err(WireError::BadTunnelTarget));
        assert_eq!(
            head("GET", "http://a/", &[("tern-target", "10.0.0.1:80")]),
            Ok(StreamHead::Http {
                target: "10.0.0.1:80".parse().expect("addr"),
                version: Version::HTTP_2
            })
        );
        assert_eq!(
            head(
                "GET",
                "http://a/",
                &[("tern-target", "[::1]:80"), ("tern-orig-proto", "HTTP/1.0")]
            )
            .map(|h| matches!(h, StreamHead::Http { version, .. } if version == Version::HTTP_10)),
            Ok(true)
        );
        assert_eq!(
            head(
                "GET",
                "/",
                &[
                    ("tern-target", "10.0.0.1:80"),
                    ("tern-orig-proto", "HTTP/2")
                ]
            ),
            Err(WireError::BadOrigProto)
        );
        assert_eq!(head("GET", "/", &[]), Err(WireError::BadHttpTarget));
        assert_eq!(
            head("GET", "/", &[("tern-target", "10.0.0.1")]),
            Err(WireError::BadHttpTarget)
        );
    }
}
