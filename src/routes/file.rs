//! The routes file (`--routes-file`): multi-document YAML of `HTTPRoute` and `GRPCRoute`
//! objects, as `kubectl` would apply them, hot-reloaded every `--discovery-reload-interval`.
//!
//! On each change the file's documents become the complete set of routes from this source
//! ([`RouteStore::replace_source`]): valid documents take effect, an invalid one is logged and
//! counted in `tern_route_config_errors_total{kind, namespace, name, field}` while the last
//! good version of that route stays in force, and routes removed from the file go away. A
//! file that is not YAML (or disappears) changes nothing and is counted with `field="yaml"`.
//!
//! Errors: [`RoutesFileError`] at start-up only (unreadable file, YAML syntax).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{RouteError, RouteStore, parse_yaml};
pub use crate::file_watch::Seen;

/// The source name of routes read from the file.
pub const SOURCE: &str = "file";

/// Why the routes file could not be loaded at start-up.
#[derive(Debug, thiserror::Error)]
pub enum RoutesFileError {
    #[error("reading routes file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("routes file {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<RouteError>,
    },
}

/// Loads the file once into `store`. Invalid documents are refused (logged, counted) without
/// failing start-up; an unreadable or non-YAML file fails it.
pub fn start(path: &Path, store: &RouteStore) -> Result<Seen, RoutesFileError> {
    let bytes = std::fs::read(path).map_err(|source| RoutesFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let docs =
        parse_yaml(&String::from_utf8_lossy(&bytes)).map_err(|source| RoutesFileError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
    let refused = store.replace_source(SOURCE, &docs);
    tracing::info!(
        path = %path.display(),
        documents = docs.len(),
        refused = refused.len(),
        "routes file loaded"
    );
    Ok(Seen::new(bytes))
}

/// Polls the file every `interval` and applies changes. Runs until dropped.
pub async fn watch(path: PathBuf, store: RouteStore, interval: Duration, seen: Seen) {
    crate::file_watch::poll(&path, interval, seen, |now| {
        let parsed = match now {
            None => Err(RouteError {
                kind: String::new(),
                namespace: String::new(),
                name: String::new(),
                field: "yaml".into(),
                message: format!("{} disappeared", path.display()),
            }),
            Some(bytes) => parse_yaml(&String::from_utf8_lossy(bytes)),
        };
        match parsed {
            Ok(docs) => {
                let refused = store.replace_source(SOURCE, &docs);
                tracing::info!(
                    path = %path.display(),
                    documents = docs.len(),
                    refused = refused.len(),
                    "routes file reloaded"
                );
            }
            Err(e) => store.reject(&e),
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::{RouteKind, RouteMetrics};

    const ROUTE: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web, namespace: shop}\nspec:\n  parentRefs: [{name: web}]\n";

    #[test]
    fn start_refuses_unreadable_or_non_yaml_files_but_not_bad_documents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("routes.yaml");
        let store = RouteStore::new(RouteMetrics::default());
        let e = start(&path, &store).expect_err("missing");
        assert!(matches!(e, RoutesFileError::Read { .. }), "{e}");
        std::fs::write(&path, "spec: [").expect("write");
        let e = start(&path, &store).expect_err("not yaml");
        assert!(e.to_string().contains("routes.yaml"), "{e}");
        let bad = ROUTE
            .replace("HTTPRoute", "UDPRoute")
            .replace("name: web,", "name: udp,");
        std::fs::write(&path, format!("{ROUTE}---\n{bad}")).expect("write");
        start(&path, &store).expect("a bad document does not stop start-up");
        assert_eq!(store.table().len(RouteKind::HTTPRoute), 1);
        assert_eq!(store.metrics().errors("UDPRoute", "shop", "udp", "kind"), 1);
    }

    #[tokio::test]
    async fn reloads_apply_and_a_broken_file_keeps_the_routes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("routes.yaml");
        std::fs::write(&path, ROUTE).expect("write");
        let store = RouteStore::new(RouteMetrics::default());
        let seen = start(&path, &store).expect("start");
        let task = tokio::spawn(watch(
            path.clone(),
            store.clone(),
            Duration::from_millis(20),
            seen,
        ));
        std::fs::write(&path, "spec: [").expect("write broken");
        for _ in 0..200 {
            if store.metrics().errors("", "", "", "yaml") > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(store.metrics().errors("", "", "", "yaml"), 1);
        assert_eq!(store.table().len(RouteKind::HTTPRoute), 1, "kept");
        std::fs::write(&path, ROUTE.replace("HTTPRoute", "GRPCRoute")).expect("write");
        for _ in 0..200 {
            if store.table().len(RouteKind::GRPCRoute) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let t = store.table();
        assert_eq!(t.len(RouteKind::GRPCRoute), 1);
        assert_eq!(t.len(RouteKind::HTTPRoute), 0, "removed from the file");
        task.abort();
    }
}
