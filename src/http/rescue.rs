//! The one error edge: every proxy-side failure becomes a response, never a dropped connection.
//!
//! | error | HTTP | gRPC status | `tern-proxy-error` |
//! |---|---|---|---|
//! | connect refused / failed | 502 | UNAVAILABLE (14) | `connect_refused`, `connect_error` |
//! | connect timeout | 504 | UNAVAILABLE (see below) | `connect_timeout` |
//! | mesh TLS failure (wrong identity, bad cert) | 502 | UNAVAILABLE | `tls_error` |
//! | upstream reset / protocol error | 502 | UNAVAILABLE | `upstream_reset` |
//! | inbound policy denied | 403 | PERMISSION_DENIED (7) | `unauthorized` |
//! | not meshed under `--require-mtls` | 403 | PERMISSION_DENIED | `mtls_required` |
//! | the target is the proxy itself | 508 | UNAVAILABLE | `loop` |
//! | malformed proxy request (no target) | 400 | INTERNAL (13) | `bad_request` |
//! | every endpoint of the service ejected | 503 | UNAVAILABLE | `circuit_open` |
//! | request timeout (`timeout`, `--request-timeout`) | 504 | DEADLINE_EXCEEDED (4) | `request_timeout` |
//! | the service has no endpoints | 503 | UNAVAILABLE | `no_endpoints` |
//! | the service has routes, none matches | 404 | UNIMPLEMENTED (12) | `no_route` |
//! | a route's per-attempt timeout (`backendRequest`), last attempt | 504 | DEADLINE_EXCEEDED | `attempt_timeout` |
//! | a route's backend is unknown or every weight is 0 | 500 | UNAVAILABLE | `invalid_backend` |
//! | `--max-in-flight-requests` reached (load shedding) | 503 | UNAVAILABLE | `overloaded` |
//! | the request body stopped arriving (`--request-body-idle-timeout`) | 408 | DEADLINE_EXCEEDED | `body_timeout` |
//!
//! A connect timeout is a 504 for HTTP, and UNAVAILABLE for gRPC (the request never reached a
//! server, so clients may retry it; DEADLINE_EXCEEDED is for request timeouts).
//! gRPC requests get a trailers-only response (HTTP 200, `grpc-status` in the headers).

use http::{HeaderValue, Response, StatusCode, header};
use prometheus_client::encoding::EncodeLabelValue;

use super::{BoxBody, PROXY_ERROR, empty};
use crate::error::{CloseReason, ConnError};
use crate::inbound::policy::Denied;
use crate::layers::balance::{CircuitOpen, NoEndpoints};
use crate::layers::split::NoBackend;
use crate::layers::timeout::{AttemptTimeout, RequestTimeout};
use crate::mesh::client::MeshError;
use crate::routes::NoRoute;

/// Why the proxy answered itself. Label values of the `error` label on response metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ProxyError {
    connect_refused,
    connect_timeout,
    connect_error,
    tls_error,
    upstream_reset,
    unauthorized,
    mtls_required,
    r#loop,
    bad_request,
    circuit_open,
    request_timeout,
    no_endpoints,
    no_route,
    attempt_timeout,
    invalid_backend,
    overloaded,
    body_timeout,
}

impl ProxyError {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyError::connect_refused => "connect_refused",
            ProxyError::connect_timeout => "connect_timeout",
            ProxyError::connect_error => "connect_error",
            ProxyError::tls_error => "tls_error",
            ProxyError::upstream_reset => "upstream_reset",
            ProxyError::unauthorized => "unauthorized",
            ProxyError::mtls_required => "mtls_required",
            ProxyError::r#loop => "loop",
            ProxyError::bad_request => "bad_request",
            ProxyError::circuit_open => "circuit_open",
            ProxyError::request_timeout => "request_timeout",
            ProxyError::no_endpoints => "no_endpoints",
            ProxyError::no_route => "no_route",
            ProxyError::attempt_timeout => "attempt_timeout",
            ProxyError::invalid_backend => "invalid_backend",
            ProxyError::overloaded => "overloaded",
            ProxyError::body_timeout => "body_timeout",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            ProxyError::connect_timeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::unauthorized | ProxyError::mtls_required => StatusCode::FORBIDDEN,
            ProxyError::r#loop => StatusCode::LOOP_DETECTED,
            ProxyError::bad_request => StatusCode::BAD_REQUEST,
            ProxyError::circuit_open | ProxyError::no_endpoints | ProxyError::overloaded => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::request_timeout | ProxyError::attempt_timeout => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::no_route => StatusCode::NOT_FOUND,
            ProxyError::invalid_backend => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::body_timeout => StatusCode::REQUEST_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    fn grpc_status(self) -> u32 {
        match self {
            ProxyError::unauthorized | ProxyError::mtls_required => 7,
            ProxyError::bad_request => 13,
            ProxyError::request_timeout
            | ProxyError::attempt_timeout
            | ProxyError::body_timeout => 4,
            ProxyError::no_route => 12,
            _ => 14,
        }
    }

    fn from_reason(reason: CloseReason) -> Self {
        match reason {
            CloseReason::ConnectRefused => ProxyError::connect_refused,
            CloseReason::ConnectTimeout => ProxyError::connect_timeout,
            CloseReason::TlsError => ProxyError::tls_error,
            CloseReason::Unauthorized => ProxyError::unauthorized,
            CloseReason::MtlsRequired => ProxyError::mtls_required,
            CloseReason::Loop => ProxyError::r#loop,
            CloseReason::IoError => ProxyError::upstream_reset,
            _ => ProxyError::connect_error,
        }
    }
}

/// Classifies an error by walking its source chain for tern's typed leaves.
pub fn classify(err: &(dyn std::error::Error + 'static)) -> ProxyError {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    let mut saw_connect = false;
    while let Some(e) = cur {
        if let Some(c) = e.downcast_ref::<ConnError>() {
            return ProxyError::from_reason(c.reason());
        }
        if let Some(m) = e.downcast_ref::<MeshError>() {
            return ProxyError::from_reason(m.reason());
        }
        if e.downcast_ref::<Denied>().is_some() {
            return ProxyError::unauthorized;
        }
        if e.downcast_ref::<CircuitOpen>().is_some() {
            return ProxyError::circuit_open;
        }
        if e.downcast_ref::<RequestTimeout>().is_some() {
            return ProxyError::request_timeout;
        }
        if e.downcast_ref::<super::limits::BodyIdleTimeout>().is_some() {
            return ProxyError::body_timeout;
        }
        if e.downcast_ref::<NoEndpoints>().is_some() {
            return ProxyError::no_endpoints;
        }
        if e.downcast_ref::<NoRoute>().is_some() {
            return ProxyError::no_route;
        }
        if e.downcast_ref::<AttemptTimeout>().is_some() {
            return ProxyError::attempt_timeout;
        }
        if e.downcast_ref::<NoBackend>().is_some() {
            return ProxyError::invalid_backend;
        }
        if let Some(l) = e.downcast_ref::<hyper_util::client::legacy::Error>() {
            saw_connect |= l.is_connect();
        }
        cur = e.source();
    }
    if saw_connect {
        ProxyError::connect_error
    } else {
        ProxyError::upstream_reset
    }
}

/// The edge of a proxying service: the forwarded response, or the error turned into one
/// (logged with `what`), in the client's HTTP version and without hop-by-hop headers.
pub fn finish(
    result: Result<Response<BoxBody>, super::BoxError>,
    grpc: bool,
    version: http::Version,
    what: &'static str,
) -> Response<BoxBody> {
    let mut resp = match result {
        Ok(resp) => resp,
        Err(e) => {
            let kind = classify(&*e);
            tracing::info!(error = %e, kind = kind.as_str(), "{what} failed");
            response(kind, grpc)
        }
    };
    *resp.version_mut() = version;
    super::strip_hop_by_hop(resp.headers_mut());
    resp
}

/// The response for `kind`, in gRPC shape when the request was gRPC.
pub fn response(kind: ProxyError, grpc: bool) -> Response<BoxBody> {
    let mut r = Response::new(empty());
    if !grpc {
        *r.status_mut() = kind.status();
    }
    let h = r.headers_mut();
    h.insert(PROXY_ERROR, HeaderValue::from_static(kind.as_str()));
    if grpc {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from(kind.grpc_status()));
        h.insert("grpc-message", HeaderValue::from_static(kind.as_str()));
    } else {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::OrigDstAddr;

    #[test]
    fn typed_leaves_map_to_statuses() {
        let dst = OrigDstAddr("198.18.0.9:80".parse().expect("addr"));
        let e: crate::http::BoxError = Box::new(ConnError::ConnectRefused(dst));
        assert_eq!(classify(&*e), ProxyError::connect_refused);
        let r = response(classify(&*e), false);
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(r.headers()[PROXY_ERROR], "connect_refused");
        let e: crate::http::BoxError = Box::new(ConnError::ConnectTimeout(dst));
        assert_eq!(
            response(classify(&*e), false).status(),
            StatusCode::GATEWAY_TIMEOUT
        );
        let g = response(ProxyError::unauthorized, true);
        assert_eq!(g.status(), StatusCode::OK);
        assert_eq!(g.headers()["grpc-status"], "7");
        let open: crate::http::BoxError = Box::new(CircuitOpen("web.shop".into()));
        let r = response(classify(&*open), false);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[PROXY_ERROR], "circuit_open");
        assert_eq!(
            response(classify(&*open), true).headers()["grpc-status"],
            "14"
        );
        let late: crate::http::BoxError =
            Box::new(RequestTimeout(std::time::Duration::from_secs(1)));
        assert_eq!(
            response(classify(&*late), false).status(),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            response(classify(&*late), true).headers()["grpc-status"],
            "4"
        );
        let io: crate::http::BoxError = Box::new(std::io::Error::other("reset"));
        assert_eq!(classify(&*io), ProxyError::upstream_reset);
    }

    #[test]
    fn route_errors_map_to_gateway_api_statuses() {
        let cases: [(crate::http::BoxError, StatusCode, &str, &str); 3] = [
            (
                Box::new(NoRoute("web.shop".into())),
                StatusCode::NOT_FOUND,
                "12",
                "no_route",
            ),
            (
                Box::new(AttemptTimeout(std::time::Duration::from_secs(1))),
                StatusCode::GATEWAY_TIMEOUT,
                "4",
                "attempt_timeout",
            ),
            (
                Box::new(NoBackend("gone.shop".into())),
                StatusCode::INTERNAL_SERVER_ERROR,
                "14",
                "invalid_backend",
            ),
        ];
        for (e, status, grpc, label) in cases {
            let kind = classify(&*e);
            assert_eq!(response(kind, false).status(), status, "{e}");
            assert_eq!(response(kind, false).headers()[PROXY_ERROR], label);
            assert_eq!(response(kind, true).headers()["grpc-status"], grpc, "{e}");
        }
    }
}
