//! Real TLS 1.3 handshakes over 127.0.0.1 between configs from [`IdentityStore`], and identity
//! reloads through a Kubernetes-style `..data` symlink swap.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::mint::{Issued, TestCa};
use super::*;

const HOUR: Duration = Duration::from_secs(3600);
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn id(s: &str) -> SpiffeId {
    s.parse().expect("test SPIFFE ID")
}

fn store_for(issued: &Issued) -> IdentityStore {
    IdentityStore::new(
        issued.identity().expect("valid test identity"),
        ClientTrustDomains::Own,
        IdentityMetrics::default(),
    )
}

/// What the server saw of one accepted connection.
#[derive(Debug)]
enum Accepted {
    Ok {
        client: Option<PeerId>,
        alpn: Option<Vec<u8>>,
        version: Option<rustls::ProtocolVersion>,
    },
    Err(std::io::Error),
}

/// Accepts one connection with `config`, echoes one line back, and reports what it saw.
async fn serve_one(listener: &TcpListener, config: Arc<ServerConfig>) -> Accepted {
    let (tcp, _) = listener.accept().await.expect("accept");
    match TlsAcceptor::from(config).accept(tcp).await {
        Ok(mut tls) => {
            let (_, conn) = tls.get_ref();
            let seen = Accepted::Ok {
                client: peer_id(conn),
                alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
                version: conn.protocol_version(),
            };
            let mut buf = [0u8; 64];
            if let Ok(n) = tls.read(&mut buf).await {
                let _ = tls.write_all(&buf[..n]).await;
                let _ = tls.shutdown().await;
            }
            seen
        }
        Err(e) => Accepted::Err(e),
    }
}

async fn connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(config)
        .connect(ServerName::from(LOCALHOST), tcp)
        .await
}

/// One client connection against one server accept; returns both sides' view.
async fn handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
) -> (Accepted, std::io::Result<Option<PeerId>>) {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let server = tokio::spawn(async move { serve_one(&listener, server).await });
    let client = async {
        let mut tls = connect(addr, client).await?;
        let server_id = peer_id(tls.get_ref().1);
        tls.write_all(b"ping\n").await?;
        let mut echoed = Vec::new();
        tls.read_to_end(&mut echoed).await?;
        assert_eq!(echoed, b"ping\n");
        Ok(server_id)
    }
    .await;
    (server.await.expect("server task"), client)
}

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
async fn configs_refuse_resumption() {
    let ca = TestCa::new("cluster.local").unwrap();
    let store = store_for(
        &ca.issue(&id("spiffe://cluster.local/ns/shop/sa/web"), HOUR)
            .unwrap(),
    );
    let server = store.server_config();
    assert_eq!(server.send_tls13_tickets, 0);
    assert!(!server.session_storage.can_cache());
    assert!(server.max_early_data_size == 0);
    let client = store.client_config(&ExpectedServer::TrustDomain("cluster.local".into()));
    assert!(!client.enable_early_data);
    // Two successive connections with the same client config are both full handshakes: the
    // server, which keeps no sessions, would otherwise be unable to resume and we'd not notice;
    // so check the client side offered no PSK by observing the handshake kind.
    for _ in 0..2 {
        let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = server.clone();
        let task = tokio::spawn(async move { serve_one(&listener, server).await });
        let mut tls = connect(addr, client.clone()).await.unwrap();
        assert_eq!(
            tls.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Full)
        );
        tls.write_all(b"x").await.unwrap();
        let mut sink = Vec::new();
        tls.read_to_end(&mut sink).await.unwrap();
        assert!(matches!(task.await.unwrap(), Accepted::Ok { .. }));
    }
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

/// A directory laid out the way the kubelet writes secret/CSI volumes: the visible files are
/// symlinks through `..data`, which points at a timestamped directory; an update writes a new
/// timestamped directory and renames a fresh symlink over `..data` (atomic).
struct KubeDir {
    root: PathBuf,
    generation: u32,
}

impl KubeDir {
    fn new(root: &Path, issued: &Issued) -> Self {
        let mut dir = KubeDir {
            root: root.to_path_buf(),
            generation: 0,
        };
        dir.swap_in(issued);
        for file in [
            identity::CERT_FILE,
            identity::KEY_FILE,
            identity::BUNDLE_FILE,
        ] {
            std::os::unix::fs::symlink(Path::new("..data").join(file), root.join(file)).unwrap();
        }
        dir
    }

    fn swap_in(&mut self, issued: &Issued) {
        self.generation += 1;
        let ts = format!(
            "..2026_11_22_01_00_{:02}.{}",
            self.generation,
            1000 + self.generation
        );
        let old = std::fs::read_link(self.root.join("..data")).ok();
        std::fs::create_dir(self.root.join(&ts)).unwrap();
        issued.write_dir(&self.root.join(&ts)).unwrap();
        let tmp = self.root.join("..data_tmp");
        std::os::unix::fs::symlink(&ts, &tmp).unwrap();
        std::fs::rename(&tmp, self.root.join("..data")).unwrap();
        if let Some(old) = old {
            std::fs::remove_dir_all(self.root.join(old)).unwrap();
        }
    }
}

#[tokio::test]
async fn reload_via_symlink_swap_serves_the_new_cert_and_keeps_old_connections() {
    let ca = TestCa::new("cluster.local").unwrap();
    let server_id = id("spiffe://cluster.local/ns/shop/sa/web");
    let first = ca.issue(&server_id, HOUR).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut kube = KubeDir::new(tmp.path(), &first);
    let store = Arc::new(
        IdentityStore::load(
            tmp.path(),
            ClientTrustDomains::Own,
            IdentityMetrics::default(),
        )
        .unwrap(),
    );
    let client = store_for(
        &ca.issue(&id("spiffe://cluster.local/ns/a/sa/b"), HOUR)
            .unwrap(),
    );
    let client_config = client.client_config(&ExpectedServer::Exact(server_id.clone()));

    // A server that takes its config from the store for every new connection and echoes forever.
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_store = store.clone();
    let server = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = TlsAcceptor::from(server_store.server_config());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let (mut r, mut w) = tokio::io::split(tls);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });

    let mut before = connect(addr, client_config.clone()).await.unwrap();
    let leaf_of = |tls: &tokio_rustls::client::TlsStream<TcpStream>| {
        tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    };
    assert_eq!(leaf_of(&before), first.leaf_der());
    echo(&mut before, b"one").await;

    assert!(matches!(
        store.reload_from(tmp.path()),
        ReloadOutcome::Unchanged
    ));
    let second = ca.issue(&server_id, 2 * HOUR).unwrap();
    kube.swap_in(&second);
    // Through the watcher, as in production: bounded wait for the swap to be picked up.
    let watcher = store.watch(tmp.path().to_path_buf(), Duration::from_millis(20));
    let mut picked_up = false;
    for _ in 0..500 {
        if store.identity().not_after() != first_identity_not_after(&first) {
            picked_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    watcher.abort();
    assert!(
        picked_up,
        "the watcher never loaded the swapped-in identity"
    );
    assert_eq!(store.identity().chain()[0].as_ref(), second.leaf_der());

    let mut after = connect(addr, client_config).await.unwrap();
    assert_eq!(leaf_of(&after), second.leaf_der());
    echo(&mut after, b"two").await;
    // The connection made before the swap still works, with the old certificate.
    echo(&mut before, b"still here").await;
    assert_eq!(leaf_of(&before), first.leaf_der());
    server.abort();
}

#[tokio::test]
async fn broken_new_set_keeps_the_old_identity_and_counts_a_failure() {
    let ca = TestCa::new("cluster.local").unwrap();
    let server_id = id("spiffe://cluster.local/ns/shop/sa/web");
    let first = ca.issue(&server_id, HOUR).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut kube = KubeDir::new(tmp.path(), &first);
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = IdentityMetrics::register(registry.sub_registry_with_prefix("tern"));
    let store = IdentityStore::load(tmp.path(), ClientTrustDomains::Own, metrics.clone()).unwrap();
    let first_not_after = store.identity().not_after();
    assert_eq!(metrics.expiry(), first_not_after);

    kube.swap_in(&ca.issue_mismatched_key(&server_id, 2 * HOUR).unwrap());
    assert!(matches!(
        store.reload_from(tmp.path()),
        ReloadOutcome::Failed(IdentityError::KeyMismatch { .. })
    ));
    assert_eq!(metrics.failures(IdentityErrorReason::KeyMismatch), 1);
    assert_eq!(store.identity().not_after(), first_not_after);
    assert_eq!(store.identity().chain()[0].as_ref(), first.leaf_der());
    // The same broken set is judged once, not once per poll.
    assert!(matches!(
        store.reload_from(tmp.path()),
        ReloadOutcome::Unchanged
    ));
    assert_eq!(metrics.failures(IdentityErrorReason::KeyMismatch), 1);

    kube.swap_in(&ca.issue_expired(&server_id).unwrap());
    assert!(matches!(
        store.reload_from(tmp.path()),
        ReloadOutcome::Failed(IdentityError::Expired { .. })
    ));
    assert_eq!(metrics.failures(IdentityErrorReason::Expired), 1);

    // A plain (non-symlink) rewrite of a file breaking the set: key file removed.
    std::fs::remove_file(tmp.path().join(identity::KEY_FILE)).unwrap();
    assert!(matches!(
        store.reload_from(tmp.path()),
        ReloadOutcome::Failed(IdentityError::Read { .. })
    ));
    assert_eq!(metrics.failures(IdentityErrorReason::Unreadable), 1);
    assert_eq!(metrics.reloads(), 0);
    assert_eq!(store.identity().chain()[0].as_ref(), first.leaf_der());

    // Plain rewrites of regular files are picked up too.
    for file in [identity::CERT_FILE, identity::BUNDLE_FILE] {
        std::fs::remove_file(tmp.path().join(file)).unwrap();
    }
    let third = ca.issue(&server_id, 3 * HOUR).unwrap();
    third.write_dir(tmp.path()).unwrap();
    assert!(matches!(
        store.reload_from(tmp.path()),
        ReloadOutcome::Reloaded
    ));
    assert_eq!(metrics.reloads(), 1);
    assert_eq!(store.identity().chain()[0].as_ref(), third.leaf_der());
    assert_eq!(metrics.expiry(), store.identity().not_after());

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for line in [
        "# TYPE tern_identity_cert_expiry_timestamp_seconds gauge",
        "tern_identity_reloads_total 1",
        "tern_identity_reload_failures_total{reason=\"key_mismatch\"} 1",
        "tern_identity_reload_failures_total{reason=\"unreadable\"} 1",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
}

fn rustls_error(err: &std::io::Error) -> &rustls::Error {
    err.get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .unwrap_or_else(|| panic!("not a rustls error: {err}"))
}

fn first_identity_not_after(issued: &Issued) -> i64 {
    issued.identity().unwrap().not_after()
}

async fn echo(tls: &mut tokio_rustls::client::TlsStream<TcpStream>, msg: &[u8]) {
    tls.write_all(msg).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(buf, msg);
}
