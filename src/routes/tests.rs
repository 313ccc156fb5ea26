//! Route parsing (each error names its field), precedence and matching.

use std::time::Duration;

use http::Request;

use super::*;
use crate::discover::RetryOn;

const CANARY: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: web
  namespace: shop
  creationTimestamp: "2026-01-01T00:00:00Z"
spec:
  parentRefs:
    - {group: "", kind: Service, name: web, port: 80}
  rules:
    - matches:
        - path: {type: PathPrefix, value: /api}
          method: POST
          headers: [{name: x-canary, value: "yes"}]
          queryParams: [{name: v, type: RegularExpression, value: "[0-9]+"}]
      timeouts: {request: 10s, backendRequest: 2s}
      retry: {codes: [503, 504], attempts: 3, backoff: 100ms}
      backendRefs:
        - {name: web-v1, port: 80, weight: 90}
        - {name: web-v2, namespace: shop, port: 8080, weight: 10}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata:
  name: greeter
  namespace: shop
  annotations:
    tern.io/retry-grpc: "unavailable, 8"
    tern.io/retry-attempts: "2"
    tern.io/timeout: 1m30s
spec:
  parentRefs: [{name: web, kind: Service}]
  rules:
    - matches:
        - method: {service: helloworld.Greeter, method: SayHello}
          headers: [{name: x-user, type: RegularExpression, value: "a.*"}]
"#;

fn docs(text: &str) -> Vec<serde_json::Value> {
    parse_yaml(text).expect("yaml")
}

fn route(text: &str) -> Route {
    parse_value(&docs(text)[0]).expect("valid")
}

fn err(text: &str) -> RouteError {
    parse_value(&docs(text)[0]).expect_err("invalid")
}

/// A minimal HTTPRoute for web.shop with `rules` (YAML lines under `rules:`).
fn http_route(name: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  parentRefs: [{{name: web}}]\n  rules:\n{rules}"
    )
}

#[test]
fn a_full_httproute_and_grpcroute_parse() {
    let d = docs(CANARY);
    assert_eq!(d.len(), 2, "two documents");
    let r = parse_value(&d[0]).expect("httproute");
    assert_eq!(r.key.kind, RouteKind::HTTPRoute);
    assert_eq!(r.key.to_string(), "HTTPRoute shop/web");
    assert_eq!(
        r.parents,
        vec![ParentRef {
            service: "web.shop".into(),
            port: Some(80)
        }]
    );
    let rule = &r.rules[0];
    assert_eq!(rule.timeouts.request, Some(Duration::from_secs(10)));
    assert_eq!(rule.timeouts.backend_request, Some(Duration::from_secs(2)));
    let retry = rule.retry.as_ref().expect("retry");
    assert_eq!(
        retry.policy.on,
        vec![RetryOn::Status(503), RetryOn::Status(504)]
    );
    assert_eq!(retry.policy.attempts, 3);
    assert_eq!(retry.backoff, Duration::from_millis(100));
    assert_eq!(
        rule.backends,
        vec![
            Backend {
                service: "web-v1.shop".into(),
                port: 80,
                weight: 90
            },
            Backend {
                service: "web-v2.shop".into(),
                port: 8080,
                weight: 10
            },
        ]
    );
    let g = parse_value(&d[1]).expect("grpcroute");
    assert_eq!(g.key.kind, RouteKind::GRPCRoute);
    assert_eq!(g.parents[0].port, None);
    let rule = &g.rules[0];
    assert_eq!(rule.timeouts.request, Some(Duration::from_secs(90)));
    let retry = rule.retry.as_ref().expect("annotation retry");
    assert_eq!(retry.policy.on, vec![RetryOn::Grpc(14), RetryOn::Grpc(8)]);
    assert_eq!(retry.policy.attempts, 2);
    assert_eq!(retry.backoff, parse::DEFAULT_BACKOFF);
    // Without rules: one rule matching everything, with the annotations' policy.
    let bare = CANARY.split("---").nth(1).expect("grpc doc");
    let bare = &bare[..bare.find("  rules:").expect("rules")];
    let g = route(bare);
    assert_eq!(g.rules.len(), 1);
    assert!(g.rules[0].matches.is_empty());
    assert_eq!(
        g.rules[0].retry.as_ref().map(|r| r.policy.attempts),
        Some(2)
    );
    assert_eq!(g.rules[0].timeouts.request, Some(Duration::from_secs(90)));
}

#[test]
fn each_invalid_field_is_named() {
    let base = http_route(
        "r",
        "    - matches: [{path: {type: PathPrefix, value: /a}}]\n      backendRefs: [{name: b, port: 80}]\n",
    );
    let cases: Vec<(String, &str)> = vec![
        (
            base.replace("PathPrefix", "Prefix"),
            "spec.rules[0].matches[0].path.type",
        ),
        (
            base.replace("value: /a", "value: a"),
            "spec.rules[0].matches[0].path.value",
        ),
        (
            base.replace(
                "type: PathPrefix, value: /a",
                "type: RegularExpression, value: \"(\"",
            ),
            "spec.rules[0].matches[0].path.value",
        ),
        (
            base.replace("{path:", "{method: FETCH, path:"),
            "spec.rules[0].matches[0].method",
        ),
        (
            base.replace(
                "{path:",
                "{headers: [{name: \"bad header\", value: x}], path:",
            ),
            "spec.rules[0].matches[0].headers[0].name",
        ),
        (
            base.replace(
                "{path:",
                "{queryParams: [{name: q, type: Glob, value: x}], path:",
            ),
            "spec.rules[0].matches[0].queryParams[0].type",
        ),
        (
            base.replace("port: 80}", "port: 80, kind: Pod}"),
            "spec.rules[0].backendRefs[0].kind",
        ),
        (
            base.replace("{name: b, port: 80}", "{name: b}"),
            "spec.rules[0].backendRefs[0].port",
        ),
        (
            base.replace("port: 80}", "port: 80, weight: 2000000}"),
            "spec.rules[0].backendRefs[0].weight",
        ),
        (
            format!("{base}      timeouts: {{request: 10 seconds}}\n"),
            "spec.rules[0].timeouts.request",
        ),
        (
            format!("{base}      timeouts: {{request: 1s, backendRequest: 2s}}\n"),
            "spec.rules[0].timeouts.backendRequest",
        ),
        (
            format!("{base}      retry: {{codes: [200]}}\n"),
            "spec.rules[0].retry.codes[0]",
        ),
        (
            format!("{base}      retry: {{attempts: 11}}\n"),
            "spec.rules[0].retry.attempts",
        ),
        (
            format!("{base}      retry: {{backoff: soon}}\n"),
            "spec.rules[0].retry.backoff",
        ),
        (
            format!("{base}      filters: []\n"),
            "spec.rules[0].filters",
        ),
        (
            base.replace(
                "parentRefs: [{name: web}]",
                "parentRefs: [{name: web, group: gateway.networking.k8s.io, kind: Gateway}]",
            ),
            "spec.parentRefs[0].group",
        ),
        (
            base.replace("parentRefs: [{name: web}]", "parentRefs: []"),
            "spec.parentRefs",
        ),
        (base.replace("kind: HTTPRoute", "kind: TCPRoute"), "kind"),
        (
            base.replace("gateway.networking.k8s.io/v1", "networking.k8s.io/v1"),
            "apiVersion",
        ),
        (base.replace("name: r, ", ""), "metadata.name"),
    ];
    for (text, field) in cases {
        let e = err(&text);
        assert_eq!(e.field, field, "{e}\n{text}");
        assert!(e.to_string().contains(field), "{e}");
    }
    let e = err(&base.replace("value: /a", "value: /a, typo: 1"));
    assert!(e.field.starts_with("spec.rules[0].matches[0].path"), "{e}");
    assert!(e.message.contains("typo"), "{e}");
    assert_eq!(
        (e.kind.as_str(), e.namespace.as_str(), e.name.as_str()),
        ("HTTPRoute", "shop", "r")
    );
    assert_eq!(
        e.key(),
        Some(RouteKey {
            kind: RouteKind::HTTPRoute,
            namespace: "shop".into(),
            name: "r".into()
        })
    );
    let grpc = CANARY.split("---").nth(1).expect("grpc doc").to_owned();
    let e = err(&grpc.replace("\"unavailable, 8\"", "teapot"));
    assert_eq!(e.field, "metadata.annotations.tern.io/retry-grpc", "{e}");
    let e = err(&grpc.replace(
        "{service: helloworld.Greeter, method: SayHello}",
        "{type: Exact}",
    ));
    assert_eq!(e.field, "spec.rules[0].matches[0].method", "{e}");
    let e = err(&grpc.replace("method: SayHello", "method: Say/Hello"));
    assert_eq!(e.field, "spec.rules[0].matches[0].method.method", "{e}");
    let e = parse_yaml("a: [").expect_err("not yaml");
    assert_eq!(e.field, "yaml");
}

#[test]
fn gateway_durations_follow_gep_2257() {
    let ok = [
        ("0s", 0),
        ("500ms", 500),
        ("10s", 10_000),
        ("1m30s", 90_000),
        ("1h", 3_600_000),
        ("1h2m3s4ms", 3_723_004),
    ];
    for (v, ms) in ok {
        assert_eq!(
            parse::gateway_duration(v),
            Some(Duration::from_millis(ms)),
            "{v}"
        );
    }
    for v in [
        "",
        "1",
        "s",
        "1.5s",
        "-1s",
        "123456s",
        "1d",
        "1s2s3s4s5s",
        "10 s",
    ] {
        assert_eq!(parse::gateway_duration(v), None, "{v}");
    }
}

fn table(texts: &[String]) -> RouteTable {
    let routes: Vec<Arc<Route>> = texts.iter().map(|t| Arc::new(route(t))).collect();
    RouteTable::build(routes.iter())
}

/// Which route and rule a request matches: `name#rule`, `404`, or `none`.
fn hit(t: &RouteTable, req: Request<()>) -> String {
    match t.lookup("web.shop", 80, &req) {
        Lookup::Matched(r) => format!("{}#{}", r.key.name, r.index),
        Lookup::NoMatch => "404".into(),
        Lookup::NoRoutes => "none".into(),
    }
}

fn get(uri: &str) -> Request<()> {
    Request::get(uri).body(()).expect("request")
}

#[test]
fn precedence_follows_the_gateway_api() {
    let t = table(&[
        http_route(
            "a",
            "    - matches: [{path: {type: PathPrefix, value: /}}]\n    - matches: [{path: {type: PathPrefix, value: /api}}]\n    - matches: [{path: {type: PathPrefix, value: /api/v2}}]\n    - matches: [{path: {type: Exact, value: /api}}]\n",
        ),
        http_route(
            "b",
            "    - matches: [{path: {type: PathPrefix, value: /api}, method: POST}]\n    - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-a, value: \"1\"}]}]\n    - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-a, value: \"1\"}, {name: x-b, value: \"1\"}]}]\n    - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-a, value: \"1\"}], queryParams: [{name: q, value: \"1\"}]}]\n    - matches: [{path: {type: RegularExpression, value: \"/api/.*/x\"}}]\n",
        ),
    ]);
    assert_eq!(hit(&t, get("/api")), "a#3", "exact beats every prefix");
    assert_eq!(hit(&t, get("/api/v2/z")), "a#2", "longest prefix");
    assert_eq!(hit(&t, get("/api/v1")), "a#1");
    assert_eq!(hit(&t, get("/other")), "a#0");
    let post = Request::post("/api/v1").body(()).expect("request");
    assert_eq!(hit(&t, post), "b#0", "a method match beats headers");
    let h = |uri: &str, headers: &[(&str, &str)]| {
        let mut b = Request::get(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request")
    };
    assert_eq!(hit(&t, h("/api/v1", &[("x-a", "1")])), "b#1");
    assert_eq!(
        hit(&t, h("/api/v1", &[("x-a", "1"), ("x-b", "1")])),
        "b#2",
        "more headers win"
    );
    assert_eq!(
        hit(&t, h("/api/v1?q=1", &[("x-a", "1")])),
        "b#3",
        "same headers, a query match wins"
    );
    // Regex ranks below prefixes: /api/v1/x is taken by the /api prefix.
    assert_eq!(hit(&t, get("/api/v1/x")), "a#1");
}

#[test]
fn ties_go_to_the_oldest_route_then_by_name() {
    let rule = "    - matches: [{path: {type: PathPrefix, value: /api}}]\n";
    let old = http_route("zz-old", rule).replace(
        "namespace: shop}",
        "namespace: shop, creationTimestamp: \"2025-01-01T00:00:00Z\"}",
    );
    let t = table(&[http_route("b", rule), http_route("a", rule), old.clone()]);
    assert_eq!(hit(&t, get("/api")), "zz-old#0", "oldest first");
    let t = table(&[http_route("b", rule), http_route("a", rule)]);
    assert_eq!(hit(&t, get("/api")), "a#0", "then alphabetical");
}

#[test]
fn http_matching_covers_path_headers_method_and_query() {
    let t = table(&[http_route(
        "m",
        "    - matches:\n        - path: {type: PathPrefix, value: /foo/}\n          method: PUT\n          headers: [{name: X-Env, value: prod}, {name: x-id, type: RegularExpression, value: \"[a-f]+\"}]\n          queryParams: [{name: debug, value: \"1\"}]\n",
    )]);
    let req = |uri: &str, method: &str, env: &str, id: &str| {
        Request::builder()
            .method(method)
            .uri(uri)
            .header("x-env", env)
            .header("x-id", id)
            .body(())
            .expect("request")
    };
    assert_eq!(hit(&t, req("/foo?debug=1", "PUT", "prod", "abc")), "m#0");
    assert_eq!(
        hit(&t, req("/foo/bar?a=b&debug=1", "PUT", "prod", "abc")),
        "m#0"
    );
    assert_eq!(
        hit(&t, req("/foobar?debug=1", "PUT", "prod", "abc")),
        "404",
        "element-wise prefix"
    );
    assert_eq!(
        hit(&t, req("/foo?debug=1", "GET", "prod", "abc")),
        "404",
        "method"
    );
    assert_eq!(
        hit(&t, req("/foo?debug=1", "PUT", "dev", "abc")),
        "404",
        "exact header"
    );
    assert_eq!(
        hit(&t, req("/foo?debug=1", "PUT", "prod", "abz")),
        "404",
        "whole-value regex"
    );
    assert_eq!(
        hit(&t, req("/foo?debug=2", "PUT", "prod", "abc")),
        "404",
        "query value"
    );
    assert_eq!(
        hit(&t, req("/foo", "PUT", "prod", "abc")),
        "404",
        "query absent"
    );
    // Repeated headers are joined with a comma.
    let t = table(&[http_route(
        "j",
        "    - matches: [{headers: [{name: x-v, value: \"a,b\"}]}]\n",
    )]);
    let r = Request::get("/")
        .header("x-v", "a")
        .header("x-v", "b")
        .body(())
        .expect("request");
    assert_eq!(hit(&t, r), "j#0");
    // Exact path: no prefix semantics.
    let t = table(&[http_route(
        "e",
        "    - matches: [{path: {type: Exact, value: /only}}]\n",
    )]);
    assert_eq!(hit(&t, get("/only")), "e#0");
    assert_eq!(hit(&t, get("/only/x")), "404");
}

#[test]
fn grpc_requests_match_grpcroutes_first_and_by_service_and_method() {
    let grpc = CANARY.split("---").nth(1).expect("grpc doc").to_owned();
    let wide = grpc
        .replace("name: greeter", "name: any-greeter")
        .replace(
            "method: {service: helloworld.Greeter, method: SayHello}",
            "method: {service: helloworld.Greeter}",
        )
        .replace(
            "          headers: [{name: x-user, type: RegularExpression, value: \"a.*\"}]\n",
            "",
        );
    let t = table(&[
        grpc,
        wide,
        http_route(
            "h",
            "    - matches: [{path: {type: PathPrefix, value: /}}]\n",
        ),
    ]);
    let call = |path: &str, user: &str| {
        Request::post(path)
            .header("content-type", "application/grpc")
            .header("x-user", user)
            .body(())
            .expect("request")
    };
    assert_eq!(
        hit(&t, call("/helloworld.Greeter/SayHello", "alice")),
        "greeter#0"
    );
    assert_eq!(
        hit(&t, call("/helloworld.Greeter/SayHello", "bob")),
        "any-greeter#0",
        "header mismatch: the service-only match"
    );
    assert_eq!(
        hit(&t, call("/helloworld.Greeter/Other", "alice")),
        "any-greeter#0"
    );
    assert_eq!(
        hit(&t, call("/other.Svc/M", "alice")),
        "h#0",
        "no GRPCRoute matches: HTTPRoutes next"
    );
    let plain = Request::post("/helloworld.Greeter/SayHello")
        .header("x-user", "alice")
        .body(())
        .expect("request");
    assert_eq!(hit(&t, plain), "h#0", "not gRPC: HTTPRoutes only");
}

#[test]
fn routes_bind_to_their_parent_and_port() {
    let t = table(&[
        http_route("p", "    - matches: [{path: {type: Exact, value: /x}}]\n")
            .replace("[{name: web}]", "[{name: web, port: 8080}]"),
    ]);
    assert_eq!(hit(&t, get("/x")), "none", "port 80 has no routes");
    assert!(matches!(
        t.lookup("web.shop", 8080, &get("/x")),
        Lookup::Matched(_)
    ));
    assert!(matches!(
        t.lookup("web.shop", 8080, &get("/y")),
        Lookup::NoMatch
    ));
    assert!(matches!(
        t.lookup("cart.shop", 8080, &get("/x")),
        Lookup::NoRoutes
    ));
    let empty = RouteTable::default();
    assert!(matches!(
        empty.lookup("web.shop", 80, &get("/x")),
        Lookup::NoRoutes
    ));
}

#[test]
fn the_store_keeps_the_last_good_route_and_swaps_atomically() {
    let metrics = RouteMetrics::default();
    let store = RouteStore::new(metrics.clone());
    let good = http_route("r", "    - matches: [{path: {type: Exact, value: /one}}]\n");
    let other = http_route("o", "    - matches: [{path: {type: Exact, value: /o}}]\n");
    assert!(
        store
            .replace_source("file", &docs(&format!("{good}---\n{other}")))
            .is_empty()
    );
    let before = store.table();
    assert_eq!(before.len(RouteKind::HTTPRoute), 2);
    // r becomes invalid, o is removed: r's last good version stays, o goes away.
    let bad = good.replace("type: Exact", "type: Exactly");
    let errors = store.replace_source("file", &docs(&bad));
    assert_eq!(errors.len(), 1);
    assert_eq!(
        metrics.errors(
            "HTTPRoute",
            "shop",
            "r",
            "spec.rules[0].matches[0].path.type"
        ),
        1
    );
    let t = store.table();
    assert_eq!(hit(&t, get("/one")), "r#0", "last good version in force");
    assert_eq!(hit(&t, get("/o")), "404", "removed from the file");
    assert_eq!(
        hit(&before, get("/o")),
        "o#0",
        "readers of the old table are undisturbed"
    );
    // A new valid version replaces it; another source is untouched by this one.
    let api = http_route(
        "api",
        "    - matches: [{path: {type: Exact, value: /api}}]\n",
    );
    let key = store.apply("api", &docs(&api)[0]).expect("applied");
    store.replace_source("file", &docs(&good.replace("/one", "/two")));
    let t = store.table();
    assert_eq!(hit(&t, get("/two")), "r#0");
    assert_eq!(hit(&t, get("/one")), "404");
    assert_eq!(hit(&t, get("/api")), "api#0");
    assert!(store.apply("api", &docs(&bad)[0]).is_err());
    assert_eq!(
        hit(&store.table(), get("/api")),
        "api#0",
        "a refused apply changes nothing"
    );
    assert!(store.delete(&key));
    assert_eq!(hit(&store.table(), get("/api")), "404");
    assert!(!store.delete(&key));
}

#[test]
fn consumer_routes_apply_to_their_namespace_and_override_producers() {
    let producer = http_route(
        "producer",
        "    - matches: [{path: {type: PathPrefix, value: /}}]\n",
    );
    let consumer = producer
        .replace(
            "name: producer, namespace: shop",
            "name: consumer, namespace: front",
        )
        .replace("[{name: web}]", "[{name: web, namespace: shop}]");
    let routes: Vec<Arc<Route>> = [&producer, &consumer]
        .iter()
        .map(|t| Arc::new(route(t)))
        .collect();
    let for_ns = |ns: Option<&str>| hit(&RouteTable::build_for(routes.iter(), ns), get("/x"));
    assert_eq!(
        for_ns(Some("front")),
        "consumer#0",
        "the consumer's own namespace"
    );
    assert_eq!(for_ns(Some("shop")), "producer#0");
    assert_eq!(
        for_ns(Some("other")),
        "producer#0",
        "consumer routes stay in their namespace"
    );
    // Unknown namespace: every route applies, in precedence order (name decides the tie).
    assert_eq!(for_ns(None), "consumer#0");
}

#[test]
fn the_readme_example_is_valid() {
    let readme = include_str!("../../README.md");
    let section = readme
        .split("### Routes")
        .nth(1)
        .expect("README has a Routes section");
    let yaml = section
        .split("```yaml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a yaml block");
    let docs = docs(yaml);
    assert_eq!(docs.len(), 2);
    for d in &docs {
        parse_value(d).unwrap_or_else(|e| panic!("README example: {e}"));
    }
}
