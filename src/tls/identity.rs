//! The proxy's own identity: leaf certificate chain, private key and trust bundle, loaded from the
//! files cert-manager's csi-driver-spiffe (or spiffe-helper) writes, and validated as a whole.
//!
//! Directory layout ([`Identity::from_dir`]): `tls.crt` (PEM, leaf first then intermediates),
//! `tls.key` (PEM, PKCS#8, SEC1 or PKCS#1), `ca.crt` (PEM, one or more trust anchors). PEM goes
//! through `rustls_pki_types::pem` (rustls-pemfile is unmaintained).
//!
//! A set is accepted only if: every file is readable and holds what it should; the leaf carries
//! exactly one workload SPIFFE ID and is not a CA ([`super::spiffe_id_of_leaf`]); the key is the
//! leaf's key (SPKI comparison through the aws-lc-rs signing key); the leaf is inside its validity
//! period now; and the chain verifies against the bundle (webpki) for both server and client
//! authentication, since a mesh proxy is both.
//!
//! Errors: [`IdentityError`], each naming the file at fault; [`IdentityError::reason`] is the
//! `reason` label of `tern_identity_reload_failures_total` (owned by [`super::store`]). No metrics.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelValue;
use rustls::RootCertStore;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::spiffe::{CertError, SpiffeId, spiffe_id_of_leaf};

/// File name of the leaf certificate and its chain, inside the identity directory.
pub const CERT_FILE: &str = "tls.crt";
/// File name of the private key, inside the identity directory.
pub const KEY_FILE: &str = "tls.key";
/// File name of the trust bundle, inside the identity directory.
pub const BUNDLE_FILE: &str = "ca.crt";

/// A validated identity: our SPIFFE ID, the certified key we present, and the bundle we verify
/// peers against. Immutable; a reload builds a new one (see [`super::IdentityStore`]).
pub struct Identity {
    id: SpiffeId,
    certified_key: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    not_before: i64,
    not_after: i64,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id.as_str())
            .field("chain_len", &self.certified_key.cert.len())
            .field("trust_anchors", &self.roots.len())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads and validates `dir/tls.crt`, `dir/tls.key` and `dir/ca.crt` (symlinks followed, as
    /// Kubernetes volumes need).
    pub fn from_dir(dir: &Path) -> Result<Self, IdentityError> {
        let files = IdentityFiles::read(dir)?;
        Self::parse(&files, &Paths::in_dir(dir))
    }

    /// Validates an identity held in memory (PEM bytes of the chain, the key and the bundle).
    /// Errors name the files they would have come from (`tls.crt`, ...).
    pub fn from_pem(chain: &[u8], key: &[u8], bundle: &[u8]) -> Result<Self, IdentityError> {
        let files = IdentityFiles {
            chain: chain.to_vec(),
            key: key.to_vec(),
            bundle: bundle.to_vec(),
        };
        Self::parse(&files, &Paths::in_dir(Path::new("")))
    }

    /// Our SPIFFE ID, from the leaf's URI SAN.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The leaf's `notAfter`, in Unix seconds.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }

    /// The leaf's `notBefore`, in Unix seconds.
    pub fn not_before(&self) -> i64 {
        self.not_before
    }

    /// The chain (leaf first) and signing key we present, for rustls resolvers.
    pub fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.certified_key
    }

    /// The chain we present, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.certified_key.cert
    }

    /// The trust anchors peers are verified against.
    pub fn roots(&self) -> &Arc<RootCertStore> {
        &self.roots
    }

    pub(crate) fn parse(files: &IdentityFiles, paths: &Paths) -> Result<Self, IdentityError> {
        let provider = super::provider();

        let chain = CertificateDer::pem_slice_iter(&files.chain)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| IdentityError::Pem {
                path: paths.chain.clone(),
                source,
            })?;
        let Some(leaf) = chain.first().cloned() else {
            return Err(IdentityError::NoCertificate {
                path: paths.chain.clone(),
            });
        };
        let key = match PrivateKeyDer::from_pem_slice(&files.key) {
            Ok(key) => key,
            Err(pem::Error::NoItemsFound) => {
                return Err(IdentityError::NoKey {
                    path: paths.key.clone(),
                });
            }
            Err(source) => {
                return Err(IdentityError::Pem {
                    path: paths.key.clone(),
                    source,
                });
            }
        };
        let anchors = CertificateDer::pem_slice_iter(&files.bundle)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| IdentityError::Pem {
                path: paths.bundle.clone(),
                source,
            })?;
        if anchors.is_empty() {
            return Err(IdentityError::NoCertificate {
                path: paths.bundle.clone(),
            });
        }
        let mut roots = RootCertStore::empty();
        for anchor in anchors {
            roots.add(anchor).map_err(|e| IdentityError::BadBundle {
                path: paths.bundle.clone(),
                reason: e.to_string(),
            })?;
        }

        let id = spiffe_id_of_leaf(&leaf).map_err(|source| IdentityError::NotSpiffe {
            path: paths.chain.clone(),
            source,
        })?;
        let (not_before, not_after) =
            validity(&leaf).map_err(|source| IdentityError::NotSpiffe {
                path: paths.chain.clone(),
                source,
            })?;
        let now = unix_now();
        if now > not_after {
            return Err(IdentityError::Expired {
                path: paths.chain.clone(),
                not_after: Timestamp(not_after),
            });
        }
        if now < not_before {
            return Err(IdentityError::NotYetValid {
                path: paths.chain.clone(),
                not_before: Timestamp(not_before),
            });
        }

        let signing_key = provider
            .key_provider
            .load_private_key(key)
            .map_err(|source| IdentityError::UnsupportedKey {
                path: paths.key.clone(),
                source,
            })?;
        let certified_key = CertifiedKey::new(chain, signing_key);
        // Strict: `Unknown` (a key that cannot tell its public half) is a mismatch too. aws-lc-rs
        // keys always can.
        if certified_key.keys_match().is_err() {
            return Err(IdentityError::KeyMismatch {
                key: paths.key.clone(),
                cert: paths.chain.clone(),
            });
        }

        let ee = webpki::EndEntityCert::try_from(&leaf).map_err(|e| IdentityError::NotSpiffe {
            path: paths.chain.clone(),
            source: CertError::Parse(e.to_string()),
        })?;
        let intermediates = &certified_key.cert[1..];
        let time = UnixTime::now();
        for usage in [
            webpki::KeyUsage::server_auth(),
            webpki::KeyUsage::client_auth(),
        ] {
            ee.verify_for_usage(
                provider.signature_verification_algorithms.all,
                &roots.roots,
                intermediates,
                time,
                usage,
                None,
                None,
            )
            .map_err(|source| IdentityError::Untrusted {
                path: paths.chain.clone(),
                bundle: paths.bundle.clone(),
                source,
            })?;
        }

        Ok(Identity {
            id,
            certified_key: Arc::new(certified_key),
            roots: Arc::new(roots),
            not_before,
            not_after,
        })
    }
}

/// Why an identity set was refused. Every variant names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not valid PEM: {source}", path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    #[error("{} holds no certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{} holds no private key", path.display())]
    NoKey { path: PathBuf },
    #[error("{} holds a certificate that is not a usable trust anchor: {reason}", path.display())]
    BadBundle { path: PathBuf, reason: String },
    #[error("{} holds a key aws-lc-rs cannot sign with: {source}", path.display())]
    UnsupportedKey {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the key in {} does not belong to the certificate in {}", key.display(), cert.display())]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("{} is not a SPIFFE identity: {source}", path.display())]
    NotSpiffe {
        path: PathBuf,
        #[source]
        source: CertError,
    },
    #[error("the certificate in {} expired at {not_after}", path.display())]
    Expired { path: PathBuf, not_after: Timestamp },
    #[error("the certificate in {} is not valid before {not_before}", path.display())]
    NotYetValid {
        path: PathBuf,
        not_before: Timestamp,
    },
    #[error("the certificate in {} does not chain to the trust bundle in {}: {source}", path.display(), bundle.display())]
    Untrusted {
        path: PathBuf,
        bundle: PathBuf,
        #[source]
        source: webpki::Error,
    },
}

impl IdentityError {
    /// The metric label for this failure.
    pub fn reason(&self) -> IdentityErrorReason {
        match self {
            IdentityError::Read { .. } => IdentityErrorReason::Unreadable,
            IdentityError::Pem { .. }
            | IdentityError::NoCertificate { .. }
            | IdentityError::NoKey { .. }
            | IdentityError::BadBundle { .. }
            | IdentityError::UnsupportedKey { .. } => IdentityErrorReason::Malformed,
            IdentityError::KeyMismatch { .. } => IdentityErrorReason::KeyMismatch,
            IdentityError::NotSpiffe { .. } => IdentityErrorReason::NotSpiffe,
            IdentityError::Expired { .. } => IdentityErrorReason::Expired,
            IdentityError::NotYetValid { .. } => IdentityErrorReason::NotYetValid,
            IdentityError::Untrusted { .. } => IdentityErrorReason::Untrusted,
        }
    }
}

/// `reason` label values of `tern_identity_reload_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdentityErrorReason {
    /// A file is missing or unreadable.
    Unreadable,
    /// A file does not hold what it should (bad PEM, no certificate or key, unusable key/anchor).
    Malformed,
    /// The key is not the certificate's.
    KeyMismatch,
    /// The leaf has no single workload SPIFFE ID, or is a CA.
    NotSpiffe,
    Expired,
    NotYetValid,
    /// The chain does not verify against the bundle.
    Untrusted,
}

impl IdentityErrorReason {
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityErrorReason::Unreadable => "unreadable",
            IdentityErrorReason::Malformed => "malformed",
            IdentityErrorReason::KeyMismatch => "key_mismatch",
            IdentityErrorReason::NotSpiffe => "not_spiffe",
            IdentityErrorReason::Expired => "expired",
            IdentityErrorReason::NotYetValid => "not_yet_valid",
            IdentityErrorReason::Untrusted => "untrusted",
        }
    }
}

impl EncodeLabelValue for IdentityErrorReason {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> Result<(), fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// Unix seconds, printed as RFC 3339 in error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp(pub i64);

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match u64::try_from(self.0) {
            Ok(secs) => {
                let t = UNIX_EPOCH + Duration::from_secs(secs);
                write!(f, "{}", humantime::format_rfc3339_seconds(t))
            }
            Err(_) => write!(f, "{} (Unix seconds)", self.0),
        }
    }
}

/// The raw bytes of one identity set, as read from disk. Also the reload watcher's change
/// detector: comparing bytes is exact where a hash would only be likely.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IdentityFiles {
    pub chain: Vec<u8>,
    pub key: Vec<u8>,
    pub bundle: Vec<u8>,
}

impl IdentityFiles {
    pub fn read(dir: &Path) -> Result<Self, IdentityError> {
        let paths = Paths::in_dir(dir);
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|source| IdentityError::Read {
                path: path.clone(),
                source,
            })
        };
        Ok(IdentityFiles {
            chain: read(&paths.chain)?,
            key: read(&paths.key)?,
            bundle: read(&paths.bundle)?,
        })
    }
}

/// Where each part came from, for error messages.
pub(crate) struct Paths {
    chain: PathBuf,
    key: PathBuf,
    bundle: PathBuf,
}

impl Paths {
    pub fn in_dir(dir: &Path) -> Self {
        Paths {
            chain: dir.join(CERT_FILE),
            key: dir.join(KEY_FILE),
            bundle: dir.join(BUNDLE_FILE),
        }
    }
}

fn validity(der: &[u8]) -> Result<(i64, i64), CertError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| CertError::Parse(e.to_string()))?;
    let v = cert.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::tls::mint::{Issued, TestCa};

    const HOUR: Duration = Duration::from_secs(3600);

    fn web() -> SpiffeId {
        "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap()
    }

    fn load(issued: &Issued) -> Result<Identity, IdentityError> {
        Identity::from_pem(
            issued.chain_pem.as_bytes(),
            issued.key_pem.as_bytes(),
            issued.bundle_pem.as_bytes(),
        )
    }

    #[test]
    fn loads_a_good_identity_from_a_directory() {
        let ca = TestCa::new("cluster.local").unwrap();
        let issued = ca.issue(&web(), HOUR).unwrap();
        let dir = tempfile::tempdir().unwrap();
        issued.write_dir(dir.path()).unwrap();
        let identity = Identity::from_dir(dir.path()).unwrap();
        assert_eq!(identity.id(), &web());
        let now = unix_now();
        assert!(identity.not_after() > now + 3500 && identity.not_after() <= now + 3600);
        assert!(identity.not_before() <= now);
        assert_eq!(identity.chain().len(), 1);
        assert_eq!(identity.roots().len(), 1);
        assert!(format!("{identity:?}").contains("spiffe://cluster.local/ns/shop/sa/web"));
    }

    #[test]
    fn loads_a_chain_with_an_intermediate() {
        let root = TestCa::new("cluster.local").unwrap();
        let intermediate = root.intermediate().unwrap();
        let issued = intermediate.issue(&web(), HOUR).unwrap();
        let identity = load(&issued).unwrap();
        assert_eq!(identity.chain().len(), 2);
        assert_eq!(identity.id(), &web());
    }

    #[test]
    fn missing_files_name_the_path() {
        let ca = TestCa::new("cluster.local").unwrap();
        let dir = tempfile::tempdir().unwrap();
        ca.issue(&web(), HOUR)
            .unwrap()
            .write_dir(dir.path())
            .unwrap();
        std::fs::remove_file(dir.path().join(KEY_FILE)).unwrap();
        let err = Identity::from_dir(dir.path()).unwrap_err();
        assert!(
            matches!(&err, IdentityError::Read { path, source }
                if path == &dir.path().join(KEY_FILE) && source.kind() == io::ErrorKind::NotFound),
            "{err}"
        );
        assert!(err.to_string().contains("tls.key"), "{err}");
        assert_eq!(err.reason(), IdentityErrorReason::Unreadable);

        let err = Identity::from_dir(&dir.path().join("nope")).unwrap_err();
        assert!(matches!(err, IdentityError::Read { .. }), "{err}");
    }

    #[test]
    fn malformed_files_are_refused() {
        let ca = TestCa::new("cluster.local").unwrap();
        let good = ca.issue(&web(), HOUR).unwrap();

        let err = Identity::from_pem(b"", good.key_pem.as_bytes(), good.bundle_pem.as_bytes())
            .unwrap_err();
        assert!(
            matches!(&err, IdentityError::NoCertificate { path } if path.ends_with(CERT_FILE)),
            "{err}"
        );

        let err = Identity::from_pem(
            good.chain_pem.as_bytes(),
            b"junk",
            good.bundle_pem.as_bytes(),
        )
        .unwrap_err();
        assert!(
            matches!(&err, IdentityError::NoKey { path } if path.ends_with(KEY_FILE)),
            "{err}"
        );

        let err = Identity::from_pem(good.chain_pem.as_bytes(), good.key_pem.as_bytes(), b"")
            .unwrap_err();
        assert!(
            matches!(&err, IdentityError::NoCertificate { path } if path.ends_with(BUNDLE_FILE)),
            "{err}"
        );

        let truncated = &good.chain_pem[..good.chain_pem.len() - 30];
        let err = Identity::from_pem(
            truncated.as_bytes(),
            good.key_pem.as_bytes(),
            good.bundle_pem.as_bytes(),
        )
        .unwrap_err();
        assert!(
            matches!(&err, IdentityError::Pem { path, .. } if path.ends_with(CERT_FILE)),
            "{err}"
        );
        assert_eq!(err.reason(), IdentityErrorReason::Malformed);
    }

    #[test]
    fn key_that_is_not_the_certs_is_refused() {
        let ca = TestCa::new("cluster.local").unwrap();
        let err = load(&ca.issue_mismatched_key(&web(), HOUR).unwrap()).unwrap_err();
        assert!(matches!(err, IdentityError::KeyMismatch { .. }), "{err}");
        assert!(err.to_string().contains("tls.key") && err.to_string().contains("tls.crt"));
        assert_eq!(err.reason(), IdentityErrorReason::KeyMismatch);
    }

    #[test]
    fn expired_and_not_yet_valid_are_refused() {
        let ca = TestCa::new("cluster.local").unwrap();
        let err = load(&ca.issue_expired(&web()).unwrap()).unwrap_err();
        assert!(matches!(err, IdentityError::Expired { .. }), "{err}");
        assert!(err.to_string().contains("expired at 20"), "{err}");
        assert_eq!(err.reason(), IdentityErrorReason::Expired);

        let err = load(&ca.issue_not_yet_valid(&web()).unwrap()).unwrap_err();
        assert!(matches!(err, IdentityError::NotYetValid { .. }), "{err}");
        assert_eq!(err.reason(), IdentityErrorReason::NotYetValid);
    }

    #[test]
    fn non_spiffe_leaves_are_refused() {
        let ca = TestCa::new("cluster.local").unwrap();
        let cases = [
            (
                ca.issue_dns_only("web.shop.svc").unwrap(),
                CertError::NoUriSan,
            ),
            (
                ca.issue_with_uris(&[
                    "spiffe://cluster.local/ns/shop/sa/web",
                    "spiffe://cluster.local/ns/shop/sa/db",
                ])
                .unwrap(),
                CertError::ManyUriSans(2),
            ),
            (ca.issue_ca_as_leaf(&web()).unwrap(), CertError::IsCa),
        ];
        for (issued, want) in cases {
            let err = load(&issued).unwrap_err();
            assert!(
                matches!(&err, IdentityError::NotSpiffe { source, .. } if *source == want),
                "want {want}, got {err}"
            );
            assert_eq!(err.reason(), IdentityErrorReason::NotSpiffe);
        }
    }

    #[test]
    fn leaves_not_chaining_to_the_bundle_are_refused() {
        let ca = TestCa::new("cluster.local").unwrap();
        let foreign = TestCa::new("cluster.local").unwrap();
        let issued = foreign
            .issue(&web(), HOUR)
            .unwrap()
            .with_bundle(ca.cert_pem());
        let err = load(&issued).unwrap_err();
        // Same issuer name, other key: webpki finds the bundle's CA by name and the signature fails.
        assert!(
            matches!(
                &err,
                IdentityError::Untrusted {
                    source: webpki::Error::InvalidSignatureForPublicKey,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(err.reason(), IdentityErrorReason::Untrusted);

        let err = load(&ca.issue_self_signed(&web(), HOUR).unwrap()).unwrap_err();
        assert!(matches!(err, IdentityError::Untrusted { .. }), "{err}");
    }

    #[test]
    fn a_wrong_trust_domain_still_loads_as_our_own_identity() {
        // The bundle does not constrain names; which trust domains peers may have is the
        // verifiers' business (see config.rs). Our own identity simply carries its own.
        let ca = TestCa::new("cluster.local").unwrap();
        let other: SpiffeId = "spiffe://other.example/ns/shop/sa/web".parse().unwrap();
        let identity = load(&ca.issue(&other, HOUR).unwrap()).unwrap();
        assert_eq!(identity.id().trust_domain(), "other.example");
    }
}
