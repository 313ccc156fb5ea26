//! Hot reload of a configuration file by polling: the discovery file (`--discovery-file`) and
//! the routes file (`--routes-file`) are re-read every `--discovery-reload-interval` and handed
//! to their parser only when the bytes changed (or the file appeared or disappeared).
//!
//! Polling, not inotify: it works the same for a ConfigMap volume (whose files are swapped
//! through a symlink), a bind mount and a plain file, and costs one `read` per interval.
//! Owns no metrics and returns no errors; each caller counts its own reloads and refusals.

use std::path::Path;
use std::time::Duration;

/// The bytes a watcher last handed on (`None`: the file could not be read). The first load
/// creates it, so a change between start-up and the first poll is not missed.
#[derive(Debug, Clone, Default)]
pub struct Seen(Option<Vec<u8>>);

impl Seen {
    /// What start-up read.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Some(bytes))
    }
}

/// Reads `path` every `interval` and calls `changed` with the new contents (`None` when the
/// file is gone or unreadable) whenever they differ from the last ones. Runs until dropped.
pub async fn poll(
    path: &Path,
    interval: Duration,
    seen: Seen,
    mut changed: impl FnMut(Option<&[u8]>),
) {
    let mut last = seen.0;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = std::fs::read(path).ok();
        if now != last {
            changed(now.as_deref());
            last = now;
        }
    }
}
