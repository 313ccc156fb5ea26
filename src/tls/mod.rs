//! Mesh mTLS: SPIFFE identities, identity files with hot reload, and the rustls configs of the
//! mesh port (DESIGN.md §3).
//!
//! ```text
//!  identity dir ──(poll, content compare)──▶ IdentityStore ──▶ server_config()  ─▶ inbound :4143
//!  tls.crt tls.key ca.crt                     │  Arc<Identity>    client_config(&ExpectedServer)
//!                                              └─ metrics          ─▶ outbound to <peer>:4143
//!  after the handshake: peer_id(conn) ─▶ PeerId (SPIFFE ID the peer proved)
//! ```
//!
//! - [`spiffe`]: [`SpiffeId`], [`PeerId`], [`spiffe_id_of_leaf`] (x509-parser).
//! - [`identity`]: [`Identity`] from a directory or PEM, validated as a whole; [`IdentityError`].
//! - [`config`]: TLS 1.3-only aws-lc-rs configs, ALPN [`MESH_ALPN`], no resumption; the SPIFFE
//!   verifiers; [`ExpectedServer`]; [`peer_id`].
//! - [`store`]: [`IdentityStore`] (atomic swap, per-expectation client config cache, the reload
//!   watcher) and [`IdentityMetrics`] (`tern_identity_*`).
//! - [`mint`]: an in-memory rcgen CA for `tern demo` and tests.
//!
//! Using it (the mesh wire, in outline):
//! ```no_run
//! # async fn f(store: &tern::tls::IdentityStore, tcp: tokio::net::TcpStream, peer: std::net::IpAddr)
//! # -> std::io::Result<()> {
//! use tern::tls::{ExpectedServer, peer_id};
//! let expected = ExpectedServer::TrustDomain("cluster.local".into());
//! let connector = tokio_rustls::TlsConnector::from(store.client_config(&expected));
//! // The name is not verified (identities are SPIFFE IDs); an IP keeps SNI off the wire.
//! let tls = connector.connect(peer.into(), tcp).await?;
//! let server_id = peer_id(tls.get_ref().1);
//! # Ok(()) }
//! ```

pub mod config;
pub mod identity;
pub mod mint;
pub mod spiffe;
pub mod store;

#[cfg(test)]
mod handshake_tests;

pub use config::{
    ExpectedServer, MESH_ALPN, PeerVerifyError, TrustDomains, client_config, peer_id, provider,
    server_config,
};
pub use identity::{Identity, IdentityError, IdentityErrorReason};
pub use spiffe::{CertError, PeerId, SpiffeId, SpiffeIdError, spiffe_id_of_leaf};
pub use store::{ClientTrustDomains, IdentityMetrics, IdentityStore, ReloadOutcome};
