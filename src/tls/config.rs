//! rustls configurations for the mesh port, and the SPIFFE-aware certificate verifiers behind them.
//!
//! Both sides: TLS 1.3 only; the aws-lc-rs provider, passed explicitly (never the process default),
//! with its default cipher suites and key-exchange groups (X25519MLKEM768 hybrid first, then X25519,
//! P-256, P-384); ALPN [`MESH_ALPN`]; handshake signatures checked with the provider's
//! `signature_verification_algorithms`.
//!
//! **No session resumption**, on either side: servers issue no tickets and keep no session cache,
//! clients never offer a PSK. A resumed TLS 1.3 session skips certificate verification and would
//! carry the identity proven at the first handshake across a certificate rotation or a change of
//! expected identity. The mesh pools one long-lived connection per peer pod, so resumption would
//! save little; every handshake is a full one, verified against the current bundle.
//!
//! - Server ([`server_config`]): client certificates are **mandatory**. [`SpiffeClientVerifier`]
//!   wraps rustls' `WebPkiClientVerifier` (chain to the bundle, validity, `clientAuth` EKU) and
//!   additionally requires the leaf to carry exactly one SPIFFE ID in an accepted trust domain.
//! - Client ([`client_config`]): [`SpiffeServerVerifier`] checks the chain against the bundle with
//!   webpki for `serverAuth`, **ignoring DNS names and IPs** (the `ServerName` passed to `connect` is
//!   not checked: pass the peer's IP, which also keeps SNI off the wire), then matches the leaf's
//!   SPIFFE ID against an [`ExpectedServer`]. A mismatch fails the handshake with
//!   [`PeerVerifyError::Mismatch`], naming expected and presented identities.
//!
//! After a handshake, [`peer_id`] reads the identity the peer proved. ALPN: rustls refuses a client
//! offering only other protocols, but lets one offering none through; the mesh wire should check
//! `alpn_protocol() == Some(MESH_ALPN)` before speaking HTTP/2.
//!
//! Errors: handshake failures are `rustls::Error`s (inside the `io::Error` tokio-rustls returns);
//! SPIFFE rejections travel in them as [`PeerVerifyError`], recovered with
//! [`PeerVerifyError::find`]. No metrics.

use std::collections::BTreeSet;
use std::error::Error as StdError;
use std::fmt;
use std::sync::{Arc, LazyLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::SingleCertAndKey;
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    OtherError, RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::identity::Identity;
use super::spiffe::{CertError, PeerId, SpiffeId, spiffe_id_of_leaf};

/// The ALPN protocol of the tern mesh wire (HTTP/2 between proxies), version 1.
pub const MESH_ALPN: &[u8] = b"tern/1";

static PROVIDER: LazyLock<Arc<CryptoProvider>> =
    LazyLock::new(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));

/// The one crypto provider tern uses: aws-lc-rs with its defaults.
pub fn provider() -> Arc<CryptoProvider> {
    PROVIDER.clone()
}

/// Draws from the provider's random source once, at start-up. aws-lc seeds its generator
/// lazily from CPU jitter entropy, which takes ~50 ms of CPU on first use (`perf`:
/// `tree_jitter_initialize_once`); without this the first mesh handshake pays it, and with it
/// every request waiting for that connection (benches/README.md, "First-handshake stall").
pub fn warm_up_random() {
    let mut seed = [0u8; 32];
    if let Err(e) = provider().secure_random.fill(&mut seed) {
        tracing::warn!(error = ?e, "the TLS random source failed at start-up");
    }
}

/// The server configuration of the mesh port for `identity`: TLS 1.3, mandatory client
/// certificates from the bundle whose SPIFFE ID is in `accepted`, ALPN `tern/1`, no resumption.
pub fn server_config(identity: &Identity, accepted: &TrustDomains) -> Arc<ServerConfig> {
    let verifier = Arc::new(SpiffeClientVerifier::new(
        identity.roots().clone(),
        accepted.clone(),
    ));
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("aws-lc-rs supports TLS 1.3")
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(
            identity.certified_key().clone(),
        )));
    config.alpn_protocols = vec![MESH_ALPN.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Arc::new(config)
}

/// The client configuration for connecting to a peer expected to be `expected`: TLS 1.3, our
/// certificate as client certificate, the server verified by [`SpiffeServerVerifier`], ALPN
/// `tern/1`, no resumption.
pub fn client_config(identity: &Identity, expected: &ExpectedServer) -> Arc<ClientConfig> {
    let verifier = Arc::new(SpiffeServerVerifier::new(
        identity.roots().clone(),
        expected.clone(),
    ));
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("aws-lc-rs supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(
            identity.certified_key().clone(),
        )));
    config.alpn_protocols = vec![MESH_ALPN.to_vec()];
    config.resumption = Resumption::disabled();
    Arc::new(config)
}

/// The SPIFFE ID the peer of a completed handshake proved (its leaf chained to our bundle and
/// passed our verifier), or `None` before the handshake or without a peer certificate.
///
/// Works on either side: `peer_id(tls_stream.get_ref().1)` for tokio-rustls streams.
pub fn peer_id(conn: &CommonState) -> Option<PeerId> {
    let leaf = conn.peer_certificates()?.first()?;
    spiffe_id_of_leaf(leaf).ok().map(PeerId::new)
}

/// Which server identity the client requires: from discovery when known, else the narrowest
/// scope known (DESIGN.md §3). Never silently widened.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ExpectedServer {
    /// Exactly this identity (the endpoint's service account is known).
    Exact(SpiffeId),
    /// Any identity of this namespace in this trust domain.
    Namespace {
        trust_domain: String,
        namespace: String,
    },
    /// Any identity of this trust domain (a peer found only by probing the mesh port).
    TrustDomain(String),
}

impl ExpectedServer {
    /// Whether `id` satisfies this expectation.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            ExpectedServer::Exact(want) => want == id,
            ExpectedServer::Namespace {
                trust_domain,
                namespace,
            } => id.trust_domain() == trust_domain && id.namespace() == namespace,
            ExpectedServer::TrustDomain(td) => id.trust_domain() == td,
        }
    }
}

impl From<SpiffeId> for ExpectedServer {
    fn from(id: SpiffeId) -> Self {
        ExpectedServer::Exact(id)
    }
}

impl fmt::Display for ExpectedServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedServer::Exact(id) => write!(f, "{id}"),
            ExpectedServer::Namespace {
                trust_domain,
                namespace,
            } => write!(f, "spiffe://{trust_domain}/ns/{namespace}/sa/*"),
            ExpectedServer::TrustDomain(td) => write!(f, "spiffe://{td}/*"),
        }
    }
}

/// The trust domains whose clients the server accepts (normally just our own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustDomains(BTreeSet<String>);

impl TrustDomains {
    pub fn only(trust_domain: &str) -> Self {
        TrustDomains(BTreeSet::from([trust_domain.to_string()]))
    }

    pub fn contains(&self, trust_domain: &str) -> bool {
        self.0.contains(trust_domain)
    }
}

impl<S: Into<String>> FromIterator<S> for TrustDomains {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        TrustDomains(iter.into_iter().map(Into::into).collect())
    }
}

impl fmt::Display for TrustDomains {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list: Vec<&str> = self.0.iter().map(String::as_str).collect();
        write!(f, "[{}]", list.join(", "))
    }
}

/// A peer certificate that chained to the bundle but whose SPIFFE identity is refused.
///
/// `Debug` prints the same text as `Display`: rustls formats the error it carries with `{:?}`, so
/// this keeps handshake error messages readable ("invalid peer certificate: Other(OtherError(server
/// identity mismatch: expected ..., presented ...))").
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerVerifyError {
    #[error("peer certificate is not a SPIFFE identity: {0}")]
    NotSpiffe(#[source] CertError),
    #[error("server identity mismatch: expected {expected}, presented {presented}")]
    Mismatch {
        expected: ExpectedServer,
        presented: SpiffeId,
    },
    #[error("client identity {presented} is outside the accepted trust domains {accepted}")]
    TrustDomainNotAccepted {
        presented: SpiffeId,
        accepted: TrustDomains,
    },
}

impl fmt::Debug for PeerVerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl PeerVerifyError {
    /// Finds the SPIFFE rejection inside a handshake error: a `rustls::Error`, or the `io::Error`
    /// tokio-rustls wraps it in, or anything whose `source()` chain leads to one.
    pub fn find<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a PeerVerifyError> {
        let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
        while let Some(e) = cur {
            if let Some(found) = e.downcast_ref::<PeerVerifyError>() {
                return Some(found);
            }
            if let Some(rustls::Error::InvalidCertificate(CertificateError::Other(other))) =
                e.downcast_ref::<rustls::Error>()
            {
                return other.0.downcast_ref::<PeerVerifyError>();
            }
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && let Some(inner) = io.get_ref()
            {
                cur = Some(inner);
                continue;
            }
            cur = e.source();
        }
        None
    }

    fn into_rustls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(self))))
    }
}

/// Server side: webpki client verification against the bundle, then the SPIFFE checks. Client
/// certificates are mandatory.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    accepted: TrustDomains,
}

impl SpiffeClientVerifier {
    pub fn new(roots: Arc<RootCertStore>, accepted: TrustDomains) -> Self {
        let inner = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .expect("an Identity always has at least one trust anchor and no CRLs");
        SpiffeClientVerifier { inner, accepted }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = spiffe_id_of_leaf(end_entity)
            .map_err(|e| PeerVerifyError::NotSpiffe(e).into_rustls())?;
        if !self.accepted.contains(id.trust_domain()) {
            return Err(PeerVerifyError::TrustDomainNotAccepted {
                presented: id,
                accepted: self.accepted.clone(),
            }
            .into_rustls());
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client side: the server's chain must verify against the bundle for `serverAuth` (webpki's
/// `EndEntityCert::verify_for_usage`, through rustls' `verify_server_cert_signed_by_trust_anchor`,
/// which maps webpki errors to the right TLS alerts) and its SPIFFE ID must match the expectation.
/// DNS names and IP SANs are not consulted.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: ExpectedServer,
    provider: Arc<CryptoProvider>,
}

impl SpiffeServerVerifier {
    pub fn new(roots: Arc<RootCertStore>, expected: ExpectedServer) -> Self {
        SpiffeServerVerifier {
            roots,
            expected,
            provider: provider(),
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let presented = spiffe_id_of_leaf(end_entity)
            .map_err(|e| PeerVerifyError::NotSpiffe(e).into_rustls())?;
        if !self.expected.matches(&presented) {
            return Err(PeerVerifyError::Mismatch {
                expected: self.expected.clone(),
                presented,
            }
            .into_rustls());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
