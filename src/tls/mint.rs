//! An in-memory certificate authority (rcgen, aws-lc-rs) for `tern demo` and the tests.
//!
//! Production identities come from a real issuer (cert-manager csi-driver-spiffe or SPIRE; see
//! DESIGN.md §3); this module only mints short-lived ECDSA P-256 certificates shaped like theirs: a
//! leaf with one SPIFFE URI SAN, `CA:FALSE`, `digitalSignature`, EKU `serverAuth`+`clientAuth`.
//! It also mints the broken certificates the tests need (expired, not yet valid, wrong SANs, a CA
//! used as a leaf, self-signed, key/cert mismatch); a foreign CA is just another [`TestCa`].
//!
//! ```
//! use std::time::Duration;
//! use tern::tls::{mint::TestCa, Identity, SpiffeId};
//!
//! let ca = TestCa::new("cluster.local").unwrap();
//! let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
//! let issued = ca.issue(&id, Duration::from_secs(3600)).unwrap();
//! assert_eq!(issued.identity().unwrap().id(), &id);
//! ```
//!
//! Errors: [`rcgen::Error`] when minting, [`std::io::Error`] when writing files. No metrics.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;

use super::identity::{BUNDLE_FILE, CERT_FILE, Identity, IdentityError, KEY_FILE};
use super::spiffe::SpiffeId;

/// Certificates start this long before "now", to absorb clock skew between peers.
const BACKDATE: Duration = Duration::from_secs(300);
const HOUR: Duration = Duration::from_secs(3600);

/// A CA (root, or an intermediate below one) that issues SPIFFE leaf certificates.
pub struct TestCa {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    /// What follows a leaf in `tls.crt`: this CA's certificate and those above it, unless this CA
    /// is the root (roots go in the bundle only).
    chain_suffix_pem: String,
    /// The root's certificate: the trust bundle.
    bundle_pem: String,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// One minted identity set, in the PEM formats of the identity directory.
#[derive(Debug, Clone)]
pub struct Issued {
    /// `tls.crt`: leaf first, then intermediates.
    pub chain_pem: String,
    /// `tls.key`: PKCS#8.
    pub key_pem: String,
    /// `ca.crt`: the trust bundle.
    pub bundle_pem: String,
    leaf_der: CertificateDer<'static>,
}

impl Issued {
    /// The leaf certificate, DER.
    pub fn leaf_der(&self) -> &[u8] {
        &self.leaf_der
    }

    /// Replaces the trust bundle (to pair a leaf with a bundle that does not contain its CA).
    pub fn with_bundle(mut self, bundle_pem: &str) -> Self {
        self.bundle_pem = bundle_pem.to_string();
        self
    }

    /// Writes `tls.crt`, `tls.key` and `ca.crt` into `dir` (which must exist).
    pub fn write_dir(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::write(dir.join(CERT_FILE), &self.chain_pem)?;
        std::fs::write(dir.join(KEY_FILE), &self.key_pem)?;
        std::fs::write(dir.join(BUNDLE_FILE), &self.bundle_pem)
    }

    /// Validates and loads this set as an [`Identity`].
    pub fn identity(&self) -> Result<Identity, IdentityError> {
        Identity::from_pem(
            self.chain_pem.as_bytes(),
            self.key_pem.as_bytes(),
            self.bundle_pem.as_bytes(),
        )
    }
}

impl TestCa {
    /// A new self-signed root CA for `trust_domain`, valid for a day.
    pub fn new(trust_domain: &str) -> Result<Self, rcgen::Error> {
        let key = KeyPair::generate()?;
        let params = ca_params(trust_domain, "root")?;
        let cert = params.self_signed(&key)?;
        let pem = cert.pem();
        Ok(TestCa {
            trust_domain: trust_domain.to_string(),
            issuer: Issuer::new(params, key),
            cert_der: cert.der().clone(),
            cert_pem: pem.clone(),
            chain_suffix_pem: String::new(),
            bundle_pem: pem,
        })
    }

    /// A new intermediate CA signed by this one; its leaves' chains include it.
    pub fn intermediate(&self) -> Result<Self, rcgen::Error> {
        let key = KeyPair::generate()?;
        let params = ca_params(&self.trust_domain, "intermediate")?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let pem = cert.pem();
        Ok(TestCa {
            trust_domain: self.trust_domain.clone(),
            issuer: Issuer::new(params, key),
            cert_der: cert.der().clone(),
            chain_suffix_pem: format!("{pem}{}", self.chain_suffix_pem),
            cert_pem: pem,
            bundle_pem: self.bundle_pem.clone(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// This CA's certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// This CA's certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The trust bundle (the root's certificate), PEM.
    pub fn bundle_pem(&self) -> &str {
        &self.bundle_pem
    }

    /// A good leaf for `id`, valid from a few minutes ago for `validity`.
    pub fn issue(&self, id: &SpiffeId, validity: Duration) -> Result<Issued, rcgen::Error> {
        let now = SystemTime::now();
        self.sign(leaf_params(
            vec![uri(id.as_str())?],
            now - BACKDATE,
            now + validity,
        ))
    }

    /// A leaf whose validity ended an hour ago.
    pub fn issue_expired(&self, id: &SpiffeId) -> Result<Issued, rcgen::Error> {
        let now = SystemTime::now();
        self.sign(leaf_params(
            vec![uri(id.as_str())?],
            now - 2 * HOUR,
            now - HOUR,
        ))
    }

    /// A leaf whose validity starts in an hour.
    pub fn issue_not_yet_valid(&self, id: &SpiffeId) -> Result<Issued, rcgen::Error> {
        let now = SystemTime::now();
        self.sign(leaf_params(
            vec![uri(id.as_str())?],
            now + HOUR,
            now + 2 * HOUR,
        ))
    }

    /// A leaf with exactly these URI SANs (none of them need be SPIFFE IDs).
    pub fn issue_with_uris(&self, uris: &[&str]) -> Result<Issued, rcgen::Error> {
        let now = SystemTime::now();
        let sans = uris.iter().map(|u| uri(u)).collect::<Result<_, _>>()?;
        self.sign(leaf_params(sans, now - BACKDATE, now + HOUR))
    }

    /// A leaf with a DNS SAN only, as an ordinary web server would have.
    pub fn issue_dns_only(&self, dns_name: &str) -> Result<Issued, rcgen::Error> {
        let now = SystemTime::now();
        let sans = vec![SanType::DnsName(Ia5String::try_from(dns_name)?)];
        self.sign(leaf_params(sans, now - BACKDATE, now + HOUR))
    }

    /// A CA certificate (`CA:TRUE`, `keyCertSign`) carrying `id`, used as if it were a leaf.
    pub fn issue_ca_as_leaf(&self, id: &SpiffeId) -> Result<Issued, rcgen::Error> {
        let now = SystemTime::now();
        let mut params = leaf_params(vec![uri(id.as_str())?], now - BACKDATE, now + HOUR);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages.push(KeyUsagePurpose::KeyCertSign);
        self.sign(params)
    }

    /// A leaf for `id` signed by its own key, with this CA's bundle.
    pub fn issue_self_signed(
        &self,
        id: &SpiffeId,
        validity: Duration,
    ) -> Result<Issued, rcgen::Error> {
        let now = SystemTime::now();
        let key = KeyPair::generate()?;
        let cert = leaf_params(vec![uri(id.as_str())?], now - BACKDATE, now + validity)
            .self_signed(&key)?;
        Ok(Issued {
            chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            bundle_pem: self.bundle_pem.clone(),
            leaf_der: cert.der().clone(),
        })
    }

    /// A good leaf for `id` paired with some other key.
    pub fn issue_mismatched_key(
        &self,
        id: &SpiffeId,
        validity: Duration,
    ) -> Result<Issued, rcgen::Error> {
        let mut issued = self.issue(id, validity)?;
        issued.key_pem = KeyPair::generate()?.serialize_pem();
        Ok(issued)
    }

    fn sign(&self, params: CertificateParams) -> Result<Issued, rcgen::Error> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            chain_pem: format!("{}{}", cert.pem(), self.chain_suffix_pem),
            key_pem: key.serialize_pem(),
            bundle_pem: self.bundle_pem.clone(),
            leaf_der: cert.der().clone(),
        })
    }
}

fn uri(s: &str) -> Result<SanType, rcgen::Error> {
    Ok(SanType::URI(Ia5String::try_from(s)?))
}

fn ca_params(trust_domain: &str, role: &str) -> Result<CertificateParams, rcgen::Error> {
    let now = SystemTime::now();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(
        DnType::CommonName,
        format!("tern test {role} CA {trust_domain}"),
    );
    params
        .distinguished_name
        .push(DnType::OrganizationName, "tern");
    // The SPIFFE spec gives CA certificates the trust domain's own ID as URI SAN.
    params.subject_alt_names = vec![uri(&format!("spiffe://{trust_domain}"))?];
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + 24 * HOUR).into();
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn leaf_params(
    sans: Vec<SanType>,
    not_before: SystemTime,
    not_after: SystemTime,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    // X509-SVIDs carry the identity in the SAN; the subject is informational.
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "tern");
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.use_authority_key_identifier_extension = true;
    params
}
