//! tern: a sidecar micro-proxy for Kubernetes service meshes.
//!
//! ```text
//!   app ─▶ iptables ─▶ outbound (:4140) ─▶ network ─▶ inbound (:4143) ─▶ app
//!                         │                               │
//!                         └──── admin (:4191): /metrics /ready /live /config /shutdown
//! ```
//!
//! Module map (the tree follows the data path):
//! - [`cli`], [`config`], [`logging`]: the clap tree, the validated config, tracing setup;
//!   [`file_watch`]: hot reload of the discovery and routes files.
//! - [`app`]: binds listeners and runs the accept loops, the admin thread and the drain.
//! - [`inbound`], [`outbound`]: each direction's pipeline; [`forward`] is the opaque TCP path
//!   they share.
//! - [`transport`]: listeners, `SO_ORIGINAL_DST`, connect, half-close aware copy.
//! - [`admin`], [`metrics`], [`drain`]: the admin server, the registry, graceful shutdown.
//! - [`init`]: the iptables planner and executor behind `tern init`.
//! - [`inject`]: the sidecar injector behind `tern inject` and `tern injector`.
//! - [`demo`]: the loopback mesh behind `tern demo`.

// `deny`, not `forbid`: `alloc` holds the one documented exception (malloc_trim).
#![deny(unsafe_code)]

pub mod addr;
pub mod admin;
pub mod alloc;
pub mod app;
pub mod cli;
pub mod config;
pub mod demo;
pub mod detect;
pub mod discover;
pub mod drain;
pub mod error;
pub mod file_watch;
pub mod forward;
pub mod http;
pub mod inbound;
pub mod init;
pub mod inject;
pub mod layers;
pub mod logging;
pub mod mesh;
pub mod metrics;
pub mod outbound;
pub mod routes;
#[cfg(test)]
mod testing;
pub mod tls;
pub mod transport;
