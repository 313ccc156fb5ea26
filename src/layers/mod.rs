//! Per-request tower layers, one per file (tower-http's shape: `FooLayer`, `Foo<S>`, tests in the
//! same file).

pub mod http_metrics;
