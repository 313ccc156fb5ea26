//! SPIFFE IDs: parsing, validation, and extraction from an X.509 leaf certificate.
//!
//! tern identities are SPIFFE IDs of the Kubernetes workload form
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>` ([`SpiffeId`]). The generic rules of
//! the [SPIFFE ID spec] are enforced first (scheme `spiffe`, trust domain of `[a-z0-9._-]`, no
//! userinfo, port, query or fragment, path segments of `[A-Za-z0-9._-]`, non-empty and never `.` or
//! `..`, at most 2048 bytes), then the `/ns/<ns>/sa/<sa>` shape.
//!
//! [`spiffe_id_of_leaf`] reads the ID the way the [X.509-SVID spec] says: the leaf is parsed with
//! `x509-parser` (never searched as bytes), must carry exactly one URI SAN, that URI must be a SPIFFE
//! ID, and the leaf must not be a CA (`basicConstraints CA:TRUE` or `keyCertSign`).
//!
//! Errors: [`SpiffeIdError`] (a string is not a SPIFFE ID), [`CertError`] (a certificate does not carry
//! exactly one). No metrics.
//!
//! [SPIFFE ID spec]: https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md
//! [X.509-SVID spec]: https://github.com/spiffe/spiffe/blob/main/standards/X509-SVID.md

use std::fmt;
use std::ops::Deref;
use std::str::FromStr;

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// The longest SPIFFE ID the spec allows, in bytes.
const MAX_ID_LEN: usize = 2048;
/// The longest trust domain name the spec allows, in bytes.
const MAX_TRUST_DOMAIN_LEN: usize = 255;
const SCHEME: &str = "spiffe://";

/// A workload SPIFFE ID, `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
///
/// Construct it with [`str::parse`] (or [`SpiffeId::new`] from parts); it is valid by construction.
/// Compares, hashes and prints as its canonical string.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// The full ID, as parsed (already canonical: the spec allows no alternative spellings).
    uri: String,
    /// Byte length of the trust domain, which starts right after `spiffe://`.
    td_len: usize,
    /// Byte range of the namespace inside `uri`.
    ns: (usize, usize),
    /// Byte offset of the service account inside `uri` (it runs to the end).
    sa: usize,
}

impl SpiffeId {
    /// Builds `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`, validating every part.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME.len()..SCHEME.len() + self.td_len]
    }

    /// The Kubernetes namespace of the workload.
    pub fn namespace(&self) -> &str {
        &self.uri[self.ns.0..self.ns.1]
    }

    /// The Kubernetes service account of the workload.
    pub fn service_account(&self) -> &str {
        &self.uri[self.sa..]
    }

    /// The ID as a string, `spiffe://...`.
    pub fn as_str(&self) -> &str {
        &self.uri
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.uri)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.uri)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| SpiffeIdError {
            input: s.chars().take(MAX_ID_LEN + 1).collect(),
            reason,
        };
        if s.is_empty() {
            return Err(err(InvalidReason::Empty));
        }
        if s.len() > MAX_ID_LEN {
            return Err(err(InvalidReason::TooLong));
        }
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| err(InvalidReason::WrongScheme))?;
        // Query and fragment are named on their own: they are the likeliest copy-paste mistakes.
        if rest.contains('?') {
            return Err(err(InvalidReason::Query));
        }
        if rest.contains('#') {
            return Err(err(InvalidReason::Fragment));
        }
        let Some((td, path)) = rest.split_once('/') else {
            validate_trust_domain(rest).map_err(err)?;
            return Err(err(InvalidReason::NotWorkload));
        };
        validate_trust_domain(td).map_err(err)?;
        let segments: Vec<&str> = path.split('/').collect();
        for seg in &segments {
            validate_segment(seg).map_err(err)?;
        }
        let [ns_key, ns, sa_key, sa] = segments[..] else {
            return Err(err(InvalidReason::NotWorkload));
        };
        if ns_key != "ns" || sa_key != "sa" {
            return Err(err(InvalidReason::NotWorkload));
        }
        let ns_start = SCHEME.len() + td.len() + "/ns/".len();
        let ns_end = ns_start + ns.len();
        let sa_start = ns_end + "/sa/".len();
        debug_assert_eq!(&s[sa_start..], sa);
        Ok(SpiffeId {
            uri: s.to_string(),
            td_len: td.len(),
            ns: (ns_start, ns_end),
            sa: sa_start,
        })
    }
}

/// A string that is not a workload SPIFFE ID, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{input}` is not a workload SPIFFE ID (spiffe://<trust-domain>/ns/<ns>/sa/<sa>): {reason}"
)]
pub struct SpiffeIdError {
    /// The rejected input (truncated past the spec's length limit).
    pub input: String,
    pub reason: InvalidReason,
}

/// Why a string is not a SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidReason {
    #[error("it is empty")]
    Empty,
    #[error("it is longer than {MAX_ID_LEN} bytes")]
    TooLong,
    #[error("the scheme must be `spiffe://`")]
    WrongScheme,
    #[error("the trust domain is empty")]
    EmptyTrustDomain,
    #[error("the trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    #[error("a port is not allowed")]
    Port,
    #[error("userinfo (`user@`) is not allowed")]
    UserInfo,
    #[error(
        "the trust domain may only hold lowercase letters, digits, `.`, `-` and `_`, not {0:?}"
    )]
    TrustDomainChar(char),
    #[error("a query (`?`) is not allowed")]
    Query,
    #[error("a fragment (`#`) is not allowed")]
    Fragment,
    #[error("a path segment is empty (`//` or a trailing `/`)")]
    EmptySegment,
    #[error("a path segment is `.` or `..`")]
    DotSegment,
    #[error("path segments may only hold letters, digits, `.`, `-` and `_`, not {0:?}")]
    PathChar(char),
    #[error("the path must be `/ns/<namespace>/sa/<service-account>`")]
    NotWorkload,
}

fn validate_trust_domain(td: &str) -> Result<(), InvalidReason> {
    if td.is_empty() {
        return Err(InvalidReason::EmptyTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(InvalidReason::TrustDomainTooLong);
    }
    if td.contains('@') {
        return Err(InvalidReason::UserInfo);
    }
    if td.contains(':') {
        return Err(InvalidReason::Port);
    }
    match td
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        Some(c) => Err(InvalidReason::TrustDomainChar(c)),
        None => Ok(()),
    }
}

fn validate_segment(seg: &str) -> Result<(), InvalidReason> {
    if seg.is_empty() {
        return Err(InvalidReason::EmptySegment);
    }
    if seg == "." || seg == ".." {
        return Err(InvalidReason::DotSegment);
    }
    match seg
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
    {
        Some(c) => Err(InvalidReason::PathChar(c)),
        None => Ok(()),
    }
}

/// The SPIFFE ID a peer proved in a completed mTLS handshake (its leaf chained to our bundle and
/// signed the handshake). Use it for authorization, metric labels and the `tern-client-id` header;
/// a bare [`SpiffeId`] may come from configuration or discovery and proves nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct PeerId(SpiffeId);

impl PeerId {
    /// Wraps an ID taken from a verified handshake (see [`crate::tls::peer_id`]).
    pub fn new(verified: SpiffeId) -> Self {
        PeerId(verified)
    }

    pub fn into_spiffe_id(self) -> SpiffeId {
        self.0
    }
}

impl Deref for PeerId {
    type Target = SpiffeId;

    fn deref(&self) -> &SpiffeId {
        &self.0
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Why a certificate does not carry a usable SPIFFE identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("the certificate is not valid DER X.509: {0}")]
    Parse(String),
    #[error("the certificate is followed by {0} bytes of trailing data")]
    TrailingData(usize),
    #[error("the certificate's extensions are malformed or duplicated: {0}")]
    Extensions(String),
    #[error("the certificate has no URI SAN, so no SPIFFE ID")]
    NoUriSan,
    #[error("the certificate has {0} URI SANs; a SPIFFE identity has exactly one")]
    ManyUriSans(usize),
    #[error("the certificate's URI SAN is not a workload SPIFFE ID: {0}")]
    NotSpiffe(#[source] SpiffeIdError),
    #[error("the certificate is a CA (basicConstraints CA:TRUE or keyCertSign), not a leaf")]
    IsCa,
}

/// Reads the SPIFFE ID of a DER leaf certificate: exactly one URI SAN, a workload SPIFFE ID, and
/// not a CA. Does not check the chain or validity period (the verifiers and [`super::Identity`] do).
pub fn spiffe_id_of_leaf(der: &[u8]) -> Result<SpiffeId, CertError> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| CertError::Parse(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CertError::TrailingData(rest.len()));
    }
    let ext_err = |e: x509_parser::error::X509Error| CertError::Extensions(e.to_string());
    if cert
        .basic_constraints()
        .map_err(ext_err)?
        .is_some_and(|bc| bc.value.ca)
        || cert
            .key_usage()
            .map_err(ext_err)?
            .is_some_and(|ku| ku.value.key_cert_sign())
    {
        return Err(CertError::IsCa);
    }
    let san = cert.subject_alternative_name().map_err(ext_err)?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris[..] {
        [] => Err(CertError::NoUriSan),
        [uri] => uri.parse().map_err(CertError::NotSpiffe),
        _ => Err(CertError::ManyUriSans(uris.len())),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::tls::mint::TestCa;

    #[test]
    fn parses_workload_ids() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.service_account(), "web");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(
            SpiffeId::new("cluster.local", "shop", "web"),
            Ok(id.clone())
        );
        assert_eq!(
            serde_json::to_string(&id).unwrap(),
            "\"spiffe://cluster.local/ns/shop/sa/web\""
        );
        let back: SpiffeId =
            serde_json::from_str("\"spiffe://cluster.local/ns/shop/sa/web\"").unwrap();
        assert_eq!(back, id);
        let odd: SpiffeId = "spiffe://a_b-c.9/ns/Kube-System/sa/x.y_z".parse().unwrap();
        assert_eq!(odd.namespace(), "Kube-System");
        assert_eq!(odd.service_account(), "x.y_z");
        assert_eq!(PeerId::new(odd.clone()).namespace(), "Kube-System");
    }

    #[test]
    fn rejects_what_the_spec_forbids() {
        use InvalidReason::*;
        let cases: &[(&str, InvalidReason)] = &[
            ("", Empty),
            ("https://cluster.local/ns/a/sa/b", WrongScheme),
            ("SPIFFE://cluster.local/ns/a/sa/b", WrongScheme),
            ("spiffe:/cluster.local/ns/a/sa/b", WrongScheme),
            ("spiffe:///ns/a/sa/b", EmptyTrustDomain),
            ("spiffe://Cluster.local/ns/a/sa/b", TrustDomainChar('C')),
            ("spiffe://cluster.local:8443/ns/a/sa/b", Port),
            ("spiffe://user@cluster.local/ns/a/sa/b", UserInfo),
            ("spiffe://cluster.local/ns/a/sa/b?x=1", Query),
            ("spiffe://cluster.local/ns/a/sa/b#frag", Fragment),
            ("spiffe://cluster.local/ns//sa/b", EmptySegment),
            ("spiffe://cluster.local/ns/a/sa/b/", EmptySegment),
            ("spiffe://cluster.local/ns/./sa/b", DotSegment),
            ("spiffe://cluster.local/ns/a/sa/..", DotSegment),
            ("spiffe://cluster.local/ns/a%20/sa/b", PathChar('%')),
            ("spiffe://cluster.local/ns/a/sa/b c", PathChar(' ')),
            ("spiffe://cluster.local", NotWorkload),
            ("spiffe://cluster.local/", EmptySegment),
            ("spiffe://cluster.local/ns/a", NotWorkload),
            ("spiffe://cluster.local/ns/a/sa/b/extra", NotWorkload),
            ("spiffe://cluster.local/sa/a/ns/b", NotWorkload),
        ];
        for (input, reason) in cases {
            let got = input.parse::<SpiffeId>();
            assert_eq!(
                got.as_ref().map_err(|e| &e.reason),
                Err(reason),
                "input {input:?}"
            );
        }
        let long = format!("spiffe://{}/ns/a/sa/b", "a".repeat(300));
        assert_eq!(
            long.parse::<SpiffeId>().unwrap_err().reason,
            TrustDomainTooLong
        );
        let huge = format!("spiffe://td/ns/a/sa/{}", "b".repeat(3000));
        assert_eq!(huge.parse::<SpiffeId>().unwrap_err().reason, TooLong);
        let msg = "spiffe://td/ns/a"
            .parse::<SpiffeId>()
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("spiffe://td/ns/a") && msg.contains("/ns/<namespace>"),
            "{msg}"
        );
    }

    #[test]
    fn reads_the_id_of_a_good_leaf() {
        let ca = TestCa::new("cluster.local").unwrap();
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let issued = ca.issue(&id, Duration::from_secs(3600)).unwrap();
        assert_eq!(spiffe_id_of_leaf(issued.leaf_der()), Ok(id));
    }

    #[test]
    fn rejects_leaves_without_exactly_one_spiffe_uri() {
        let ca = TestCa::new("cluster.local").unwrap();
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();

        let dns_only = ca.issue_dns_only("web.shop.svc").unwrap();
        assert_eq!(
            spiffe_id_of_leaf(dns_only.leaf_der()),
            Err(CertError::NoUriSan)
        );

        let two = ca
            .issue_with_uris(&[
                "spiffe://cluster.local/ns/shop/sa/web",
                "spiffe://cluster.local/ns/shop/sa/db",
            ])
            .unwrap();
        assert_eq!(
            spiffe_id_of_leaf(two.leaf_der()),
            Err(CertError::ManyUriSans(2))
        );

        let https = ca.issue_with_uris(&["https://web.shop/ns/a/sa/b"]).unwrap();
        assert!(matches!(
            spiffe_id_of_leaf(https.leaf_der()),
            Err(CertError::NotSpiffe(SpiffeIdError {
                reason: InvalidReason::WrongScheme,
                ..
            }))
        ));

        let ca_leaf = ca.issue_ca_as_leaf(&id).unwrap();
        assert_eq!(spiffe_id_of_leaf(ca_leaf.leaf_der()), Err(CertError::IsCa));
        // The CA certificate itself (our mint gives it the trust domain's URI SAN) is not a leaf.
        assert_eq!(spiffe_id_of_leaf(ca.cert_der()), Err(CertError::IsCa));

        assert!(matches!(
            spiffe_id_of_leaf(b"not a cert"),
            Err(CertError::Parse(_))
        ));
        let mut trailing = issued_der(&ca, &id);
        trailing.extend_from_slice(b"xx");
        assert_eq!(
            spiffe_id_of_leaf(&trailing),
            Err(CertError::TrailingData(2))
        );
    }

    fn issued_der(ca: &TestCa, id: &SpiffeId) -> Vec<u8> {
        ca.issue(id, Duration::from_secs(60))
            .unwrap()
            .leaf_der()
            .to_vec()
    }
}
