//! Replays every checked-in fuzz corpus file (`fuzz/corpus/<target>/*`) through the same checks
//! the cargo-fuzz targets run (`fuzz/checks.rs`), on stable Rust, so `cargo test` keeps every
//! seed and every past crash input (a regression) passing without nightly or libFuzzer.

#[path = "../fuzz/checks.rs"]
mod checks;

use std::path::PathBuf;

/// Runs `check` over every file of `fuzz/corpus/<target>/`; fails naming the file that panicked.
fn replay(target: &str, check: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading corpus {}: {e}", dir.display()))
        .map(|entry| entry.expect("a readable corpus directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "corpus {} is empty", dir.display());
    let mut failed = Vec::new();
    for file in &files {
        let data = std::fs::read(file).expect("a readable corpus file");
        if std::panic::catch_unwind(|| check(&data)).is_err() {
            failed.push(file.display().to_string());
        }
    }
    assert!(failed.is_empty(), "{target}: inputs failed: {failed:#?}");
    eprintln!("{target}: {} corpus inputs replayed", files.len());
}

#[test]
fn detect_corpus() {
    replay("detect", checks::detect);
}

#[test]
fn spiffe_id_corpus() {
    replay("spiffe_id", checks::spiffe_id);
}

#[test]
fn cert_corpus() {
    replay("cert", checks::cert);
}

#[test]
fn discovery_corpus() {
    replay("discovery", checks::discovery);
}

#[test]
fn policy_rule_corpus() {
    replay("policy_rule", checks::policy_rule);
}

#[test]
fn inject_corpus() {
    replay("inject", checks::inject);
}

#[test]
fn routes_corpus() {
    replay("routes", checks::routes);
}

#[test]
fn mesh_wire_corpus() {
    replay("mesh_wire", checks::mesh_wire);
}
