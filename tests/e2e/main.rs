//! End-to-end tests with real pods: network namespaces joined by a veth pair, real iptables
//! (`tern init`), real proxies (`tern proxy` as UID 2102), real servers and clients (python3,
//! curl). They need root and system tools; see [`support::ready`] for what happens without them.
//!
//! One integration binary, so the support code compiles once.

mod faults;
mod http;
mod init;
mod mesh;
mod support;
mod tcp;
