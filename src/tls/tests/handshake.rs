//! Handshakes: good pairs for each [`ExpectedServer`] variant, and every way a peer is refused.

use std::sync::Arc;

use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;

#[tokio::test]
async fn good_pair_connects_for_every_expectation() {
    let ca = TestCa::new("cluster.local").unwrap();
    let server_id = id("spiffe://cluster.local/ns/shop/sa/web");
    let client_id = id("spiffe://cluster.local/ns/front/sa/gateway");
    let server = store_for(&ca.issue(&server_id, HOUR).unwrap());
    let client = store_for(&ca.issue(&client_id, HOUR).unwrap());

    for expected in [
        ExpectedServer::Exact(server_id.clone()),
        ExpectedServer::Namespace {
            trust_domain: "cluster.local".into(),
            namespace: "shop".into(),
        },
        ExpectedServer::TrustDomain("cluster.local".into()),
    ] {
        let (accepted, client_seen) =
            handshake(server.server_config(), client.client_config(&expected)).await;
        let Accepted::Ok {
            client: seen_client,
            alpn,
            version,
        } = accepted
        else {
            panic!("server refused a good client for {expected}: {accepted:?}");
        };
        assert_eq!(
            seen_client.map(PeerId::into_spiffe_id),
            Some(client_id.clone())
        );
        assert_eq!(alpn.as_deref(), Some(MESH_ALPN));
        assert_eq!(version, Some(rustls::ProtocolVersion::TLSv1_3));
        let seen_server =
            client_seen.unwrap_or_else(|e| panic!("client failed for {expected}: {e}"));
        assert_eq!(
            seen_server.map(PeerId::into_spiffe_id),
            Some(server_id.clone())
        );
    }
    // The cache hands out one config per expectation.
    let exact = ExpectedServer::Exact(server_id);
    assert!(Arc::ptr_eq(
        &client.client_config(&exact),
        &client.client_config(&exact)
    ));
}

#[tokio::test]
async fn chain_with_intermediate_verifies_on_both_sides() {
    let root = TestCa::new("cluster.local").unwrap();
    let intermediate = root.intermediate().unwrap();
    let server_id = id("spiffe://cluster.local/ns/shop/sa/web");
    let server = store_for(&intermediate.issue(&server_id, HOUR).unwrap());
    let client = store_for(
        &root
            .issue(&id("spiffe://cluster.local/ns/a/sa/b"), HOUR)
            .unwrap(),
    );
    let (accepted, client_seen) = handshake(
        server.server_config(),
        client.client_config(&ExpectedServer::Exact(server_id.clone())),
    )
    .await;
    assert!(
        matches!(
            accepted,
            Accepted::Ok {
                client: Some(_),
                ..
            }
        ),
        "{accepted:?}"
    );
    assert_eq!(
        client_seen.unwrap().map(PeerId::into_spiffe_id),
        Some(server_id)
    );
}

#[tokio::test]
async fn wrong_server_identity_is_refused_by_the_client() {
    let ca = TestCa::new("cluster.local").unwrap();
    let server = store_for(
        &ca.issue(&id("spiffe://cluster.local/ns/shop/sa/web"), HOUR)
            .unwrap(),
    );
    let client = store_for(
        &ca.issue(&id("spiffe://cluster.local/ns/front/sa/gw"), HOUR)
            .unwrap(),
    );
    let wrong = [
        ExpectedServer::Exact(id("spiffe://cluster.local/ns/shop/sa/db")),
        ExpectedServer::Namespace {
            trust_domain: "cluster.local".into(),
            namespace: "billing".into(),
        },
        ExpectedServer::TrustDomain("other.example".into()),
    ];
    for expected in wrong {
        let (accepted, client_seen) =
            handshake(server.server_config(), client.client_config(&expected)).await;
        let err = client_seen.expect_err("client must refuse a wrong server identity");
        match PeerVerifyError::find(&err) {
            Some(PeerVerifyError::Mismatch {
                expected: e,
                presented,
            }) => {
                assert_eq!(e, &expected);
                assert_eq!(presented.as_str(), "spiffe://cluster.local/ns/shop/sa/web");
            }
            other => panic!("want a mismatch for {expected}, got {other:?} from {err}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("spiffe://cluster.local/ns/shop/sa/web")
                && msg.contains(&expected.to_string()),
            "{msg}"
        );
        assert!(
            matches!(accepted, Accepted::Err(_)),
            "server must see the alert: {accepted:?}"
        );
    }
}

#[tokio::test]
async fn server_with_a_non_spiffe_or_foreign_cert_is_refused() {
    let ca = TestCa::new("cluster.local").unwrap();
    let client = store_for(
        &ca.issue(&id("spiffe://cluster.local/ns/a/sa/b"), HOUR)
            .unwrap(),
    );
    let expected = ExpectedServer::TrustDomain("cluster.local".into());

    // A server whose leaf has only a DNS name: chains to the bundle, but carries no identity.
    // (Identity refuses to load it, so build its server config by hand.)
    let dns = ca.issue_dns_only("web.shop.svc").unwrap();
    let server = raw_server_config(&dns);
    let (_, client_seen) = handshake(server, client.client_config(&expected)).await;
    let err = client_seen.expect_err("no SPIFFE ID");
    assert!(
        matches!(
            PeerVerifyError::find(&err),
            Some(PeerVerifyError::NotSpiffe(CertError::NoUriSan))
        ),
        "{err}"
    );

    // A server from another CA.
    let foreign = TestCa::new("cluster.local").unwrap();
    let server = store_for(
        &foreign
            .issue(&id("spiffe://cluster.local/ns/a/sa/b"), HOUR)
            .unwrap(),
    );
    let (_, client_seen) = handshake(server.server_config(), client.client_config(&expected)).await;
    let err = client_seen.expect_err("foreign CA");
    assert!(
        matches!(
            rustls_error(&err),
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature)
        ),
        "{err}"
    );
}

#[tokio::test]
async fn foreign_ca_client_is_refused_by_the_server() {
    let ca = TestCa::new("cluster.local").unwrap();
    let foreign = TestCa::new("cluster.local").unwrap();
    let server_id = id("spiffe://cluster.local/ns/shop/sa/web");
    let server = store_for(&ca.issue(&server_id, HOUR).unwrap());
    // The intruder trusts our CA (so it would accept our server) but its own cert is foreign.
    let intruder = store_for(
        &foreign
            .issue(&id("spiffe://cluster.local/ns/evil/sa/x"), HOUR)
            .unwrap()
            .with_bundle(&format!("{}{}", foreign.bundle_pem(), ca.bundle_pem())),
    );
    let (accepted, client_seen) = handshake(
        server.server_config(),
        intruder.client_config(&ExpectedServer::Exact(server_id)),
    )
    .await;
    let Accepted::Err(err) = accepted else {
        panic!("server accepted a foreign client: {accepted:?}");
    };
    assert!(
        matches!(
            rustls_error(&err),
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature)
        ),
        "{err}"
    );
    assert!(
        client_seen.is_err(),
        "client must not complete: {client_seen:?}"
    );
}

#[tokio::test]
async fn unknown_issuer_is_refused_on_both_sides() {
    let ca = TestCa::new("cluster.local").unwrap();
    let stranger = TestCa::named("cluster.local", "stranger").unwrap();
    let server_id = id("spiffe://cluster.local/ns/shop/sa/web");
    let server = store_for(&ca.issue(&server_id, HOUR).unwrap());
    let stranger_client = store_for(
        &stranger
            .issue(&id("spiffe://cluster.local/ns/evil/sa/x"), HOUR)
            .unwrap()
            .with_bundle(&format!("{}{}", stranger.bundle_pem(), ca.bundle_pem())),
    );
    let (accepted, _) = handshake(
        server.server_config(),
        stranger_client.client_config(&ExpectedServer::Exact(server_id.clone())),
    )
    .await;
    let Accepted::Err(err) = accepted else {
        panic!("server accepted an unknown issuer: {accepted:?}");
    };
    assert!(
        matches!(
            rustls_error(&err),
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
        ),
        "{err}"
    );

    let stranger_server = store_for(&stranger.issue(&server_id, HOUR).unwrap());
    let client = store_for(
        &ca.issue(&id("spiffe://cluster.local/ns/a/sa/b"), HOUR)
            .unwrap(),
    );
    let (_, client_seen) = handshake(
        stranger_server.server_config(),
        client.client_config(&ExpectedServer::Exact(server_id)),
    )
    .await;
    let err = client_seen.expect_err("client must refuse an unknown issuer");
    assert!(
        matches!(
            rustls_error(&err),
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
        ),
        "{err}"
    );
}

#[tokio::test]
async fn client_from_another_trust_domain_is_refused_by_the_server() {
    let ca = TestCa::new("cluster.local").unwrap();
    let server_id = id("spiffe://cluster.local/ns/shop/sa/web");
    let server = store_for(&ca.issue(&server_id, HOUR).unwrap());
    // Same CA, but the client's SPIFFE ID names another trust domain.
    let client = store_for(
        &ca.issue(&id("spiffe://other.example/ns/a/sa/b"), HOUR)
            .unwrap(),
    );
    let (accepted, _) = handshake(
        server.server_config(),
        client.client_config(&ExpectedServer::Exact(server_id.clone())),
    )
    .await;
    let Accepted::Err(err) = accepted else {
        panic!("server accepted another trust domain: {accepted:?}");
    };
    assert!(
        matches!(
            PeerVerifyError::find(&err),
            Some(PeerVerifyError::TrustDomainNotAccepted { presented, .. })
                if presented.trust_domain() == "other.example"
        ),
        "{err}"
    );

    // Listing the other trust domain lets it in.
    let open = IdentityStore::new(
        ca.issue(&server_id, HOUR).unwrap().identity().unwrap(),
        ClientTrustDomains::List(["cluster.local", "other.example"].into_iter().collect()),
        IdentityMetrics::default(),
    );
    let (accepted, _) = handshake(
        open.server_config(),
        client.client_config(&ExpectedServer::Exact(server_id)),
    )
    .await;
    assert!(
        matches!(
            accepted,
            Accepted::Ok {
                client: Some(_),
                ..
            }
        ),
        "{accepted:?}"
    );
}

#[tokio::test]
async fn client_without_a_certificate_is_refused() {
    let ca = TestCa::new("cluster.local").unwrap();
    let issued = ca
        .issue(&id("spiffe://cluster.local/ns/shop/sa/web"), HOUR)
        .unwrap();
    let server = store_for(&issued);
    let identity = issued.identity().unwrap();
    let mut anonymous = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(config::SpiffeServerVerifier::new(
            identity.roots().clone(),
            ExpectedServer::TrustDomain("cluster.local".into()),
        )))
        .with_no_client_auth();
    anonymous.alpn_protocols = vec![MESH_ALPN.to_vec()];
    let (accepted, _) = handshake(server.server_config(), Arc::new(anonymous)).await;
    let Accepted::Err(err) = accepted else {
        panic!("server accepted a client without certificate: {accepted:?}");
    };
    assert!(
        matches!(rustls_error(&err), rustls::Error::NoCertificatesPresented),
        "{err}"
    );
}

#[tokio::test]
async fn tls12_only_client_is_refused() {
    let ca = TestCa::new("cluster.local").unwrap();
    let server = store_for(
        &ca.issue(&id("spiffe://cluster.local/ns/shop/sa/web"), HOUR)
            .unwrap(),
    );
    let issued = ca
        .issue(&id("spiffe://cluster.local/ns/a/sa/b"), HOUR)
        .unwrap();
    let identity = issued.identity().unwrap();
    let tls12 = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(config::SpiffeServerVerifier::new(
            identity.roots().clone(),
            ExpectedServer::TrustDomain("cluster.local".into()),
        )))
        .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
            identity.certified_key().clone(),
        )));
    let (accepted, client_seen) = handshake(server.server_config(), Arc::new(tls12)).await;
    let Accepted::Err(err) = accepted else {
        panic!("server accepted TLS 1.2: {accepted:?}");
    };
    assert!(
        matches!(
            rustls_error(&err),
            rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOfferedOrEnabled)
        ),
        "{err}"
    );
    assert!(client_seen.is_err());
}

#[tokio::test]
async fn neither_side_resumes_sessions() {
    let ca = TestCa::new("cluster.local").unwrap();
    let store = store_for(
        &ca.issue(&id("spiffe://cluster.local/ns/shop/sa/web"), HOUR)
            .unwrap(),
    );
    let ours_server = store.server_config();
    let ours_client = store.client_config(&ExpectedServer::TrustDomain("cluster.local".into()));
    assert_eq!(ours_server.send_tls13_tickets, 0);
    assert!(!ours_server.session_storage.can_cache());
    assert_eq!(ours_server.max_early_data_size, 0);
    assert!(!ours_client.enable_early_data);

    // The same configs with resumption switched on, to show the check below can fail.
    let mut resuming_server = (*ours_server).clone();
    resuming_server.session_storage = rustls::server::ServerSessionMemoryCache::new(64);
    resuming_server.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().unwrap();
    resuming_server.send_tls13_tickets = 2;
    let resuming_server = Arc::new(resuming_server);
    let mut resuming_client = (*ours_client).clone();
    resuming_client.resumption = rustls::client::Resumption::in_memory_sessions(64);
    let resuming_client = Arc::new(resuming_client);

    let kinds = |server: Arc<ServerConfig>, client: Arc<ClientConfig>| async move {
        let mut kinds = Vec::new();
        for _ in 0..2 {
            let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
            let addr = listener.local_addr().unwrap();
            let server = server.clone();
            let task = tokio::spawn(async move { serve_one(&listener, server).await });
            let mut tls = connect(addr, client.clone()).await.unwrap();
            // Reading to the end also takes in any session tickets the server sent.
            tls.write_all(b"x").await.unwrap();
            let mut sink = Vec::new();
            tls.read_to_end(&mut sink).await.unwrap();
            assert!(matches!(task.await.unwrap(), Accepted::Ok { .. }));
            kinds.push(tls.get_ref().1.handshake_kind());
        }
        kinds
    };
    let full = Some(rustls::HandshakeKind::Full);
    let resumed = Some(rustls::HandshakeKind::Resumed);
    assert_eq!(
        kinds(resuming_server.clone(), resuming_client.clone()).await,
        [full, resumed]
    );
    assert_eq!(kinds(ours_server, resuming_client).await, [full, full]);
    assert_eq!(kinds(resuming_server, ours_client).await, [full, full]);
}

/// A server config presenting `issued` as is, without [`Identity`]'s checks.
fn raw_server_config(issued: &Issued) -> Arc<ServerConfig> {
    use rustls_pki_types::pem::PemObject;
    let chain = rustls_pki_types::CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    Arc::new(config)
}

/// A client that presents whatever certificate chain it is given and accepts any server: the
/// attacker's side of a mesh handshake, so only the server's checks decide.
fn raw_client_config(issued: &Issued) -> Arc<ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let chain = rustls_pki_types::CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer))
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![MESH_ALPN.to_vec()];
    Arc::new(config)
}

#[derive(Debug)]
struct AnyServer;

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Client certificates an attacker might present to a mesh port: every one is refused by the
/// server, however the rest of the handshake goes.
#[tokio::test]
async fn malformed_client_certificates_are_refused_by_the_server() {
    let ca = TestCa::new("cluster.local").unwrap();
    let server_id = id("spiffe://cluster.local/ns/shop/sa/web");
    let server = store_for(&ca.issue(&server_id, HOUR).unwrap());
    let evil = id("spiffe://cluster.local/ns/evil/sa/x");
    let mut deep = ca.intermediate().unwrap();
    for _ in 0..9 {
        deep = deep.intermediate().unwrap();
    }
    let cases: Vec<(&str, Issued)> = vec![
        ("expired", ca.issue_expired(&evil).unwrap()),
        ("not yet valid", ca.issue_not_yet_valid(&evil).unwrap()),
        (
            "two URI SANs",
            ca.issue_with_uris(&[
                "spiffe://cluster.local/ns/evil/sa/x",
                "spiffe://cluster.local/ns/kube-system/sa/admin",
            ])
            .unwrap(),
        ),
        (
            "a CA certificate as leaf",
            ca.issue_ca_as_leaf(&evil).unwrap(),
        ),
        ("self-signed", ca.issue_self_signed(&evil, HOUR).unwrap()),
        ("ten intermediates", deep.issue(&evil, HOUR).unwrap()),
        ("no SPIFFE ID", ca.issue_dns_only("evil.example").unwrap()),
    ];
    for (name, issued) in cases {
        let (accepted, _) = handshake(server.server_config(), raw_client_config(&issued)).await;
        let Accepted::Err(err) = accepted else {
            panic!("{name}: the server accepted the client: {accepted:?}");
        };
        eprintln!("{name}: refused: {err}");
    }
    // The control: a well-formed client certificate through the same raw client is accepted.
    let good = ca.issue(&evil, HOUR).unwrap();
    let (accepted, _) = handshake(server.server_config(), raw_client_config(&good)).await;
    assert!(
        matches!(&accepted, Accepted::Ok { client: Some(c), .. } if c.to_string() == evil.to_string()),
        "{accepted:?}"
    );
}
