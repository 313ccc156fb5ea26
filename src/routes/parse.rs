//! Parsing and validation of `HTTPRoute` / `GRPCRoute` documents into [`Route`]s.
//!
//! Two entry points feed one validator: [`parse_yaml`] splits a (multi-document) YAML text
//! into JSON values, and [`parse_value`] validates one object as the API server returns it
//! (`serde_json::Value`), so a watcher can hand its objects over unchanged.
//!
//! Own serde types for the subset tern implements, rather than the `gateway-api` crate:
//! its 0.22 release needs kube 4 and k8s-openapi 0.28 (tern is on k8s-openapi 0.29 and is
//! moving to kube 5) and Rust 1.92, and `retry` is only in its experimental module. The
//! types deny unknown fields inside `spec`, so a typo or an unsupported feature (filters,
//! session persistence) is refused with its field named instead of silently ignored;
//! `metadata` and `status` may carry anything the API server adds.
//!
//! Extensions: GRPCRoute has no `timeouts` or `retry` in the Gateway API, so the route's
//! annotations configure all its rules: `tern.io/retry-grpc` (comma-separated gRPC code names
//! or numbers: `unavailable,resource-exhausted`), `tern.io/retry-attempts` (default 1),
//! `tern.io/retry-backoff` (default 25ms), `tern.io/timeout` (request), and
//! `tern.io/backend-timeout` (per attempt); values in the Gateway API duration format.
//!
//! Errors: [`RouteError`], naming the object (`kind`, `namespace`, `name`) and the field
//! (`spec.rules[0].matches[1].path.value`).

use std::time::Duration;

use http::{HeaderName, Method};
use regex::{Regex, RegexBuilder};
use serde::Deserialize;
use serde_json::Value;

use super::{
    Backend, GrpcMatch, HeaderMatch, HttpMatch, ParentRef, PathMatch, QueryMatch, RequestMatch,
    Route, RouteKey, RouteKind, RouteRetry, RuleSpec, Timeouts, ValueMatch,
};
use crate::discover::{RetryOn, RetryPolicy};

/// Most extra attempts a rule may ask for.
pub const MAX_ATTEMPTS: u32 = 10;
/// Backoff when a retry policy sets none (Envoy's default).
pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);
/// Retried statuses when an HTTPRoute's `retry` lists no `codes`: the gateway errors.
pub const DEFAULT_CODES: [u16; 4] = [500, 502, 503, 504];
/// Bound on a compiled regular expression (hostile documents must not exhaust memory).
const REGEX_SIZE_LIMIT: usize = 256 * 1024;

/// A document refused, naming the object and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {namespace}/{name}: {field}: {message}")]
pub struct RouteError {
    /// The document's `kind` as written (empty when unreadable).
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// Path of the offending field, e.g. `spec.rules[0].timeouts.request`.
    pub field: String,
    pub message: String,
}

impl RouteError {
    /// The route this document would have been, when its head was readable.
    pub fn key(&self) -> Option<RouteKey> {
        let kind = match self.kind.as_str() {
            "HTTPRoute" => RouteKind::HTTPRoute,
            "GRPCRoute" => RouteKind::GRPCRoute,
            _ => return None,
        };
        (!self.name.is_empty()).then(|| RouteKey {
            kind,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        })
    }
}

/// Splits YAML text (documents separated by `---`) into objects. A syntax error refuses
/// the whole text (`field` is `yaml`).
pub fn parse_yaml(text: &str) -> Result<Vec<Value>, RouteError> {
    let docs: Vec<Value> = serde_saphyr::from_str_multiple(text).map_err(|e| RouteError {
        kind: String::new(),
        namespace: String::new(),
        name: String::new(),
        field: "yaml".into(),
        message: e.to_string(),
    })?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// Validates one `HTTPRoute` or `GRPCRoute` object.
pub fn parse_value(doc: &Value) -> Result<Route, RouteError> {
    let head = Head::read(doc);
    let err = |field: &str, message: String| head.error(field, message);
    let kind = match head.kind.as_str() {
        "HTTPRoute" => RouteKind::HTTPRoute,
        "GRPCRoute" => RouteKind::GRPCRoute,
        other => {
            return Err(err(
                "kind",
                format!("`{other}`: expected HTTPRoute or GRPCRoute"),
            ));
        }
    };
    match doc.get("apiVersion").and_then(Value::as_str) {
        Some("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1") => {}
        other => {
            return Err(err(
                "apiVersion",
                format!("{other:?}: expected gateway.networking.k8s.io/v1"),
            ));
        }
    }
    if head.name.is_empty() {
        return Err(err("metadata.name", "required".into()));
    }
    let spec = doc
        .get("spec")
        .ok_or_else(|| err("spec", "required".into()))?;
    let key = RouteKey {
        kind,
        namespace: head.namespace.clone(),
        name: head.name.clone(),
    };
    let (parents, rules) = match kind {
        RouteKind::HTTPRoute => {
            let spec: HttpRouteSpec = typed(&head, spec)?;
            let parents = parents(&head, &spec.parent_refs)?;
            let mut rules = Vec::with_capacity(spec.rules.len());
            for (i, r) in spec.rules.iter().enumerate() {
                rules.push(http_rule(&head, i, r)?);
            }
            (parents, rules)
        }
        RouteKind::GRPCRoute => {
            let spec: GrpcRouteSpec = typed(&head, spec)?;
            let parents = parents(&head, &spec.parent_refs)?;
            let (timeouts, retry) = grpc_annotations(&head, doc)?;
            let mut rules = Vec::with_capacity(spec.rules.len());
            for (i, r) in spec.rules.iter().enumerate() {
                rules.push(grpc_rule(&head, i, r, timeouts, retry.clone())?);
            }
            if rules.is_empty() {
                // The default rule (below) with the annotations' policy.
                rules.push(RuleSpec {
                    matches: Vec::new(),
                    timeouts,
                    retry,
                    backends: Vec::new(),
                });
            }
            (parents, rules)
        }
    };
    // The Gateway API defaults `rules` to one rule matching everything.
    let rules = if rules.is_empty() {
        vec![RuleSpec {
            matches: Vec::new(),
            timeouts: Timeouts::default(),
            retry: None,
            backends: Vec::new(),
        }]
    } else {
        rules
    };
    Ok(Route {
        key,
        created: doc
            .pointer("/metadata/creationTimestamp")
            .and_then(Value::as_str)
            .map(str::to_owned),
        parents,
        rules,
    })
}

/// What identifies the document, read leniently so errors can name it.
struct Head {
    kind: String,
    namespace: String,
    name: String,
}

impl Head {
    fn read(doc: &Value) -> Head {
        let s = |p: &str| doc.pointer(p).and_then(Value::as_str).map(str::to_owned);
        Head {
            kind: s("/kind").unwrap_or_default(),
            namespace: s("/metadata/namespace").unwrap_or_else(|| "default".into()),
            name: s("/metadata/name").unwrap_or_default(),
        }
    }

    fn error(&self, field: &str, message: String) -> RouteError {
        RouteError {
            kind: self.kind.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            field: field.to_owned(),
            message,
        }
    }
}

/// Deserializes `spec`, naming the failing field.
fn typed<T: for<'de> Deserialize<'de>>(head: &Head, spec: &Value) -> Result<T, RouteError> {
    serde_path_to_error::deserialize(spec).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            "spec".to_owned()
        } else {
            format!("spec.{path}")
        };
        head.error(&field, e.into_inner().to_string())
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HttpRouteSpec {
    #[serde(default)]
    parent_refs: Vec<RefDoc>,
    /// Ignored for Service parents (GAMMA).
    #[serde(default)]
    #[allow(dead_code)]
    hostnames: Vec<String>,
    #[serde(default)]
    rules: Vec<HttpRuleDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct GrpcRouteSpec {
    #[serde(default)]
    parent_refs: Vec<RefDoc>,
    #[serde(default)]
    #[allow(dead_code)]
    hostnames: Vec<String>,
    #[serde(default)]
    rules: Vec<GrpcRuleDoc>,
}

/// A `parentRef` or a `backendRef`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RefDoc {
    group: Option<String>,
    kind: Option<String>,
    name: String,
    namespace: Option<String>,
    port: Option<u16>,
    section_name: Option<String>,
    /// backendRefs only.
    weight: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HttpRuleDoc {
    #[allow(dead_code)]
    name: Option<String>,
    #[serde(default)]
    matches: Vec<HttpMatchDoc>,
    #[serde(default)]
    backend_refs: Vec<RefDoc>,
    timeouts: Option<TimeoutsDoc>,
    retry: Option<RetryDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct GrpcRuleDoc {
    #[allow(dead_code)]
    name: Option<String>,
    #[serde(default)]
    matches: Vec<GrpcMatchDoc>,
    #[serde(default)]
    backend_refs: Vec<RefDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HttpMatchDoc {
    path: Option<PathDoc>,
    #[serde(default)]
    headers: Vec<NameValueDoc>,
    #[serde(default)]
    query_params: Vec<NameValueDoc>,
    method: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PathDoc {
    #[serde(rename = "type")]
    kind: Option<String>,
    value: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NameValueDoc {
    #[serde(rename = "type")]
    kind: Option<String>,
    name: String,
    value: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrpcMatchDoc {
    method: Option<GrpcMethodDoc>,
    #[serde(default)]
    headers: Vec<NameValueDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrpcMethodDoc {
    #[serde(rename = "type")]
    kind: Option<String>,
    service: Option<String>,
    method: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TimeoutsDoc {
    request: Option<String>,
    backend_request: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryDoc {
    #[serde(default)]
    codes: Vec<u16>,
    attempts: Option<u32>,
    backoff: Option<String>,
}

fn parents(head: &Head, refs: &[RefDoc]) -> Result<Vec<ParentRef>, RouteError> {
    if refs.is_empty() {
        return Err(head.error("spec.parentRefs", "at least one Service is required".into()));
    }
    let mut out = Vec::with_capacity(refs.len());
    for (i, r) in refs.iter().enumerate() {
        let f = |s: &str| format!("spec.parentRefs[{i}].{s}");
        service_ref(head, r, &f)?;
        if r.weight.is_some() {
            return Err(head.error(&f("weight"), "not a field of a parentRef".into()));
        }
        if r.section_name.is_some() {
            return Err(head.error(
                &f("sectionName"),
                "not supported for a Service parent; use `port`".into(),
            ));
        }
        out.push(ParentRef {
            service: qualified(head, r),
            port: r.port,
        });
    }
    Ok(out)
}

/// Checks that a ref names a core Service.
fn service_ref(head: &Head, r: &RefDoc, f: &dyn Fn(&str) -> String) -> Result<(), RouteError> {
    if let Some(g) = r.group.as_deref().filter(|g| !g.is_empty() && *g != "core") {
        return Err(head.error(
            &f("group"),
            format!("`{g}`: only Services (group \"\") are supported"),
        ));
    }
    if let Some(k) = r.kind.as_deref().filter(|k| *k != "Service") {
        return Err(head.error(&f("kind"), format!("`{k}`: only Service is supported")));
    }
    if r.name.is_empty() {
        return Err(head.error(&f("name"), "required".into()));
    }
    if r.port == Some(0) {
        return Err(head.error(&f("port"), "must be 1..=65535".into()));
    }
    Ok(())
}

fn qualified(head: &Head, r: &RefDoc) -> String {
    format!(
        "{}.{}",
        r.name,
        r.namespace.as_deref().unwrap_or(&head.namespace)
    )
}

fn backends(head: &Head, rule: &str, refs: &[RefDoc]) -> Result<Vec<Backend>, RouteError> {
    let mut out = Vec::with_capacity(refs.len());
    for (i, r) in refs.iter().enumerate() {
        let f = |s: &str| format!("{rule}.backendRefs[{i}].{s}");
        service_ref(head, r, &f)?;
        if r.section_name.is_some() {
            return Err(head.error(&f("sectionName"), "not a field of a backendRef".into()));
        }
        let Some(port) = r.port else {
            return Err(head.error(&f("port"), "required for a Service backend".into()));
        };
        let weight = r.weight.unwrap_or(1);
        if weight > 1_000_000 {
            return Err(head.error(&f("weight"), format!("{weight}: at most 1000000")));
        }
        out.push(Backend {
            service: qualified(head, r),
            port,
            weight,
        });
    }
    Ok(out)
}

fn http_rule(head: &Head, i: usize, r: &HttpRuleDoc) -> Result<RuleSpec, RouteError> {
    let rule = format!("spec.rules[{i}]");
    let mut matches = Vec::with_capacity(r.matches.len());
    for (j, m) in r.matches.iter().enumerate() {
        let f = |s: &str| format!("{rule}.matches[{j}].{s}");
        let path = match &m.path {
            None => PathMatch::Prefix("/".into()),
            Some(p) => {
                let value = p.value.clone().unwrap_or_else(|| "/".into());
                match p.kind.as_deref().unwrap_or("PathPrefix") {
                    "Exact" | "PathPrefix" if !value.starts_with('/') => {
                        return Err(
                            head.error(&f("path.value"), format!("`{value}` must start with /"))
                        );
                    }
                    "Exact" => PathMatch::Exact(value),
                    "PathPrefix" => PathMatch::Prefix(value),
                    "RegularExpression" => PathMatch::Regex(regex(head, &f("path.value"), &value)?),
                    other => {
                        return Err(head.error(
                            &f("path.type"),
                            format!("`{other}`: expected Exact, PathPrefix or RegularExpression"),
                        ));
                    }
                }
            }
        };
        let method = match &m.method {
            None => None,
            Some(v) => Some(method(head, &f("method"), v)?),
        };
        let headers = header_matches(head, &f("headers"), &m.headers)?;
        let mut query = Vec::with_capacity(m.query_params.len());
        for (k, q) in m.query_params.iter().enumerate() {
            let field = f(&format!("queryParams[{k}]"));
            if q.name.is_empty() {
                return Err(head.error(&format!("{field}.name"), "required".into()));
            }
            query.push(QueryMatch {
                name: q.name.clone(),
                value: value_match(head, &field, q)?,
            });
        }
        matches.push(RequestMatch::Http(HttpMatch {
            path,
            method,
            headers,
            query,
        }));
    }
    let timeouts = match &r.timeouts {
        None => Timeouts::default(),
        Some(t) => {
            let d = |v: &Option<String>, name: &str| -> Result<Option<Duration>, RouteError> {
                v.as_deref()
                    .map(|v| duration(head, &format!("{rule}.timeouts.{name}"), v))
                    .transpose()
            };
            let t = Timeouts {
                request: d(&t.request, "request")?,
                backend_request: d(&t.backend_request, "backendRequest")?,
            };
            if let (Some(req), Some(b)) = (t.request, t.backend_request) {
                if !req.is_zero() && b > req {
                    return Err(head.error(
                        &format!("{rule}.timeouts.backendRequest"),
                        "must not be longer than timeouts.request".into(),
                    ));
                }
            }
            t
        }
    };
    let retry = match &r.retry {
        None => None,
        Some(d) => {
            let f = |s: &str| format!("{rule}.retry.{s}");
            let codes: Vec<u16> = if d.codes.is_empty() {
                DEFAULT_CODES.to_vec()
            } else {
                d.codes.clone()
            };
            for (k, c) in d.codes.iter().enumerate() {
                if !(400..=599).contains(c) {
                    return Err(head.error(
                        &f(&format!("codes[{k}]")),
                        format!("{c}: must be 400..=599"),
                    ));
                }
            }
            let attempts = d.attempts.unwrap_or(1);
            if attempts > MAX_ATTEMPTS {
                return Err(head.error(
                    &f("attempts"),
                    format!("{attempts}: at most {MAX_ATTEMPTS}"),
                ));
            }
            let backoff = match &d.backoff {
                None => DEFAULT_BACKOFF,
                Some(v) => duration(head, &f("backoff"), v)?,
            };
            Some(RouteRetry {
                policy: RetryPolicy {
                    on: codes.into_iter().map(RetryOn::Status).collect(),
                    attempts,
                },
                backoff,
            })
        }
    };
    Ok(RuleSpec {
        matches,
        timeouts,
        retry,
        backends: backends(head, &rule, &r.backend_refs)?,
    })
}

fn grpc_rule(
    head: &Head,
    i: usize,
    r: &GrpcRuleDoc,
    timeouts: Timeouts,
    retry: Option<RouteRetry>,
) -> Result<RuleSpec, RouteError> {
    let rule = format!("spec.rules[{i}]");
    let mut matches = Vec::with_capacity(r.matches.len());
    for (j, m) in r.matches.iter().enumerate() {
        let f = |s: &str| format!("{rule}.matches[{j}].{s}");
        let (service, method) = match &m.method {
            None => (None, None),
            Some(mm) => {
                if mm.service.is_none() && mm.method.is_none() {
                    return Err(
                        head.error(&f("method"), "one of service or method is required".into())
                    );
                }
                let regex_kind = match mm.kind.as_deref().unwrap_or("Exact") {
                    "Exact" => false,
                    "RegularExpression" => true,
                    other => {
                        return Err(head.error(
                            &f("method.type"),
                            format!("`{other}`: expected Exact or RegularExpression"),
                        ));
                    }
                };
                let one =
                    |v: &Option<String>, name: &str| -> Result<Option<ValueMatch>, RouteError> {
                        let Some(v) = v else { return Ok(None) };
                        let field = f(&format!("method.{name}"));
                        if regex_kind {
                            return Ok(Some(ValueMatch::Regex(regex(head, &field, v)?)));
                        }
                        if v.is_empty() || v.contains('/') {
                            return Err(head.error(&field, format!("`{v}`: a name without `/`")));
                        }
                        Ok(Some(ValueMatch::Exact(v.clone())))
                    };
                (one(&mm.service, "service")?, one(&mm.method, "method")?)
            }
        };
        matches.push(RequestMatch::Grpc(GrpcMatch {
            service,
            method,
            headers: header_matches(head, &f("headers"), &m.headers)?,
        }));
    }
    Ok(RuleSpec {
        matches,
        timeouts,
        retry,
        backends: backends(head, &rule, &r.backend_refs)?,
    })
}

/// The `tern.io/*` annotations that configure a GRPCRoute's timeouts and retries.
fn grpc_annotations(
    head: &Head,
    doc: &Value,
) -> Result<(Timeouts, Option<RouteRetry>), RouteError> {
    let get = |name: &str| -> Result<Option<&str>, RouteError> {
        match doc
            .pointer("/metadata/annotations")
            .and_then(|a| a.get(name))
        {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(head.error(
                &format!("metadata.annotations.{name}"),
                "must be a string".into(),
            )),
        }
    };
    let field = |name: &str| format!("metadata.annotations.{name}");
    let d = |name: &str| -> Result<Option<Duration>, RouteError> {
        get(name)?
            .map(|v| duration(head, &field(name), v))
            .transpose()
    };
    let timeouts = Timeouts {
        request: d("tern.io/timeout")?,
        backend_request: d("tern.io/backend-timeout")?,
    };
    let retry = match get("tern.io/retry-grpc")? {
        None => None,
        Some(codes) => {
            let mut on = Vec::new();
            for c in codes.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                let code = match c.parse::<u32>() {
                    Ok(n) if n <= 16 => RetryOn::Grpc(n),
                    Ok(_) => {
                        return Err(head.error(
                            &field("tern.io/retry-grpc"),
                            format!("`{c}`: gRPC codes are 0..=16"),
                        ));
                    }
                    Err(_) => match c.parse::<RetryOn>() {
                        Ok(g @ RetryOn::Grpc(_)) => g,
                        _ => {
                            return Err(head.error(
                                &field("tern.io/retry-grpc"),
                                format!("`{c}`: expected a gRPC code name (unavailable, resource-exhausted, ...)"),
                            ));
                        }
                    },
                };
                on.push(code);
            }
            let attempts = match get("tern.io/retry-attempts")? {
                None => 1,
                Some(v) => match v.trim().parse::<u32>() {
                    Ok(n) if n <= MAX_ATTEMPTS => n,
                    _ => {
                        return Err(head.error(
                            &field("tern.io/retry-attempts"),
                            format!("`{v}`: a number 0..={MAX_ATTEMPTS}"),
                        ));
                    }
                },
            };
            Some(RouteRetry {
                policy: RetryPolicy { on, attempts },
                backoff: d("tern.io/retry-backoff")?.unwrap_or(DEFAULT_BACKOFF),
            })
        }
    };
    Ok((timeouts, retry))
}

fn header_matches(
    head: &Head,
    field: &str,
    docs: &[NameValueDoc],
) -> Result<Vec<HeaderMatch>, RouteError> {
    let mut out = Vec::with_capacity(docs.len());
    for (k, h) in docs.iter().enumerate() {
        let f = format!("{field}[{k}]");
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|e| head.error(&format!("{f}.name"), format!("`{}`: {e}", h.name)))?;
        out.push(HeaderMatch {
            name,
            value: value_match(head, &f, h)?,
        });
    }
    Ok(out)
}

fn value_match(head: &Head, field: &str, d: &NameValueDoc) -> Result<ValueMatch, RouteError> {
    match d.kind.as_deref().unwrap_or("Exact") {
        "Exact" => Ok(ValueMatch::Exact(d.value.clone())),
        "RegularExpression" => Ok(ValueMatch::Regex(regex(
            head,
            &format!("{field}.value"),
            &d.value,
        )?)),
        other => Err(head.error(
            &format!("{field}.type"),
            format!("`{other}`: expected Exact or RegularExpression"),
        )),
    }
}

fn method(head: &Head, field: &str, v: &str) -> Result<Method, RouteError> {
    const METHODS: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    ];
    if !METHODS.contains(&v) {
        return Err(head.error(
            field,
            format!("`{v}`: expected one of {}", METHODS.join(", ")),
        ));
    }
    Method::from_bytes(v.as_bytes()).map_err(|e| head.error(field, e.to_string()))
}

/// A whole-string regular expression (RE2 syntax, as the `regex` crate implements it).
fn regex(head: &Head, field: &str, pattern: &str) -> Result<Regex, RouteError> {
    RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| head.error(field, format!("`{pattern}`: {e}")))
}

fn duration(head: &Head, field: &str, v: &str) -> Result<Duration, RouteError> {
    gateway_duration(v).ok_or_else(|| {
        head.error(
            field,
            format!("`{v}`: expected a Gateway API duration such as 500ms, 10s or 1m30s"),
        )
    })
}

/// A Gateway API duration (GEP-2257): 1 to 4 groups of 1 to 5 digits with a unit among
/// `h`, `m`, `s`, `ms`, e.g. `1h`, `500ms`, `1m30s`, `0s`.
pub fn gateway_duration(v: &str) -> Option<Duration> {
    let mut rest = v.as_bytes();
    let mut total = Duration::ZERO;
    let mut groups = 0;
    while !rest.is_empty() {
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if !(1..=5).contains(&digits) {
            return None;
        }
        let n: u64 = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = match rest {
            [b'm', b's', ..] => (Duration::from_millis(1), 2),
            [b'h', ..] => (Duration::from_secs(3600), 1),
            [b'm', ..] => (Duration::from_secs(60), 1),
            [b's', ..] => (Duration::from_secs(1), 1),
            _ => return None,
        };
        rest = &rest[len..];
        total += unit * u32::try_from(n).ok()?;
        groups += 1;
        if groups > 4 {
            return None;
        }
    }
    (groups > 0).then_some(total)
}
