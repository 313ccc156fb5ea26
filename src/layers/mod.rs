//! Per-request tower layers, one per file (tower-http's shape: `FooLayer`, `Foo<S>`, tests in the
//! same file).

//!
//! The outbound resilience stack for discovery services, top-down: [`timeout`] → [`retry`] →
//! [`balance`] → [`breaker`] → endpoint client (built in `crate::outbound::http`). A request
//! that matched a route rule (`crate::routes`): timeout → retry (with backoff) → per-attempt
//! timeout → [`split`] (weighted backend) → balance → breaker → endpoint client.

pub mod balance;
pub mod breaker;
pub mod http_metrics;
pub mod retry;
pub mod route_match;
pub mod split;
pub mod timeout;

#[cfg(test)]
pub(crate) mod pipeline_tests;
