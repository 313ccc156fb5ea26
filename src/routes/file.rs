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

/// What the watcher last read; [`start`] hands it to [`watch`] so no change is missed.
#[derive(Debug, Clone)]
pub struct Seen(Option<Vec<u8>>);

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
    Ok(Seen(Some(bytes)))
}

/// Polls the file every `interval` and applies changes. Runs until dropped.
pub async fn watch(path: PathBuf, store: RouteStore, interval: Duration, seen: Seen) {
    let mut last = seen.0;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = std::fs::read(&path).ok();
        if now == last {
            continue;
        }
        let parsed = match &now {
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
        last = now;
    }
}
