//! Per-request tower layers, one per file (tower-http's shape: `FooLayer`, `Foo<S>`, tests in the
//! same file).

//!
//! The outbound resilience stack for discovery services, top-down: [`timeout`] → [`retry`] →
//! [`balance`] → [`breaker`] → endpoint client (built in `crate::outbound::http`).

pub mod balance;
pub mod breaker;
pub mod http_metrics;
pub mod retry;
pub mod timeout;

#[cfg(test)]
mod pipeline_tests;
