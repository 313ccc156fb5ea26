//! Hostile-input tests against real proxies on 127.0.0.1:0, in process: HTTP/1 request
//! smuggling, oversized heads, slowloris, HTTP/2 stream floods and rapid reset (raw frames),
//! and forged identity headers. Each case asserts what the proxy did AND that a concurrent
//! well-behaved client kept getting answers; the proxy's RSS (`process_resident_memory_bytes`
//! from `/metrics`, which in-process includes the test harness) is printed before and after.
//! Bounded: every read has a deadline; no latency assertions.

mod faults;
mod h1;
mod h2;
mod identity;
mod support;
