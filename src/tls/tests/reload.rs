//! Reloads: Kubernetes `..data` symlink swaps and plain rewrites, the watcher, metrics.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::*;

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

    // Not yet valid: counted once, but re-checked on every poll (it may become valid).
    kube.swap_in(&ca.issue_not_yet_valid(&server_id).unwrap());
    for _ in 0..2 {
        assert!(matches!(
            store.reload_from(tmp.path()),
            ReloadOutcome::Failed(IdentityError::NotYetValid { .. })
        ));
    }
    assert_eq!(metrics.failures(IdentityErrorReason::NotYetValid), 1);

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

#[test]
fn store_load_refuses_a_missing_or_broken_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let err = IdentityStore::load(
        tmp.path(),
        ClientTrustDomains::Own,
        IdentityMetrics::default(),
    )
    .unwrap_err();
    assert!(matches!(err, IdentityError::Read { .. }), "{err}");
    let ca = TestCa::new("cluster.local").unwrap();
    ca.issue_expired(&id("spiffe://cluster.local/ns/a/sa/b"))
        .unwrap()
        .write_dir(tmp.path())
        .unwrap();
    let err = IdentityStore::load(
        tmp.path(),
        ClientTrustDomains::Own,
        IdentityMetrics::default(),
    )
    .unwrap_err();
    assert!(matches!(err, IdentityError::Expired { .. }), "{err}");
}

#[tokio::test]
async fn watcher_ends_when_the_store_is_dropped() {
    let ca = TestCa::new("cluster.local").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    ca.issue(&id("spiffe://cluster.local/ns/a/sa/b"), HOUR)
        .unwrap()
        .write_dir(tmp.path())
        .unwrap();
    let store = Arc::new(
        IdentityStore::load(
            tmp.path(),
            ClientTrustDomains::Own,
            IdentityMetrics::default(),
        )
        .unwrap(),
    );
    let watcher = store.watch(tmp.path().to_path_buf(), Duration::from_millis(5));
    drop(store);
    tokio::time::timeout(Duration::from_secs(30), watcher)
        .await
        .expect("the watcher outlived its store")
        .expect("watcher task");
}
