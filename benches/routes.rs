//! Criterion micro-benchmarks for Gateway API route matching (`tern::routes`): the per-request
//! lookup of a request to a Service with routes attached, over a table of 20 HTTPRoutes with 5
//! rules each (100 candidates on one parent) plus a GRPCRoute, and the table build a reload pays.
//!
//! Run: `cargo bench --bench routes` (add `-- --quick` for a short run).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::Request;

use tern::routes::{Lookup, Route, RouteTable, parse_value, parse_yaml};

fn routes_yaml() -> String {
    let mut yaml = String::new();
    for r in 0..20 {
        yaml.push_str(&format!(
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r{r}, namespace: shop}}\nspec:\n  parentRefs: [{{name: web, port: 80}}]\n  rules:\n"
        ));
        yaml.push_str(&format!(
            "    - matches: [{{path: {{type: Exact, value: /exact/{r}}}}}]\n\
             \x20   - matches: [{{path: {{type: PathPrefix, value: /api/v{r}}}}}]\n\
             \x20   - matches: [{{path: {{type: PathPrefix, value: /api}}, headers: [{{name: x-tenant, value: t{r}}}]}}]\n\
             \x20   - matches: [{{path: {{type: PathPrefix, value: /q}}, queryParams: [{{name: id, type: RegularExpression, value: \"{r}[0-9]*\"}}]}}]\n\
             \x20   - matches: [{{path: {{type: RegularExpression, value: \"/re/{r}/.*\"}}, method: POST}}]\n\
             \x20     backendRefs: [{{name: web-v1, port: 80, weight: 90}}, {{name: web-v2, port: 80, weight: 10}}]\n"
        ));
    }
    yaml.push_str("---\napiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g, namespace: shop}\nspec:\n  parentRefs: [{name: web}]\n  rules:\n    - matches: [{method: {service: helloworld.Greeter, method: SayHello}}]\n");
    yaml
}

fn routes() -> Vec<Arc<Route>> {
    parse_yaml(&routes_yaml())
        .expect("yaml")
        .iter()
        .map(|d| Arc::new(parse_value(d).expect("valid route")))
        .collect()
}

fn matching(c: &mut Criterion) {
    let routes = routes();
    let table = RouteTable::build(routes.iter());
    let mut g = c.benchmark_group("routes");
    g.throughput(Throughput::Elements(1));
    let cases: [(&str, Request<()>); 6] = [
        ("exact", Request::get("/exact/7").body(()).expect("req")),
        (
            "prefix",
            Request::get("/api/v13/items/1").body(()).expect("req"),
        ),
        (
            "header",
            Request::get("/api/x")
                .header("x-tenant", "t19")
                .body(())
                .expect("req"),
        ),
        (
            "query_regex",
            Request::get("/q?a=b&id=171").body(()).expect("req"),
        ),
        (
            "no_match",
            Request::get("/nothing/here").body(()).expect("req"),
        ),
        (
            "grpc",
            Request::post("/helloworld.Greeter/SayHello")
                .header("content-type", "application/grpc")
                .body(())
                .expect("req"),
        ),
    ];
    for (name, req) in &cases {
        let outcome = table.lookup("web.shop", 80, req);
        let expected_match = *name != "no_match";
        assert_eq!(
            matches!(outcome, Lookup::Matched(_)),
            expected_match,
            "{name}: {outcome:?}"
        );
        g.bench_function(format!("lookup_{name}"), |b| {
            b.iter(|| table.lookup(black_box("web.shop"), 80, black_box(req)))
        });
    }
    g.bench_function("lookup_service_without_routes", |b| {
        b.iter(|| table.lookup(black_box("cart.shop"), 80, black_box(&cases[0].1)))
    });
    g.bench_function("build_table_21_routes", |b| {
        b.iter(|| RouteTable::build(black_box(routes.iter())))
    });
    g.finish();
}

criterion_group!(benches, matching);
criterion_main!(benches);
