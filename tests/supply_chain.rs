//! Supply chain floors: the lockfile must not hold a version of a security-critical crate below
//! the release that closes its latest known RustSec advisory. `deny.toml` bans the same ranges
//! for `cargo deny`; this test enforces them on every `cargo test`, with or without cargo-deny.
//!
//! | crate | floor | closes |
//! |---|---|---|
//! | hyper | 1.5.1 | HTTP/1 and HTTP/2 fixes up to 1.5.1 |
//! | h2 | 0.4.16 | RUSTSEC-2026-0258 (unbounded empty DATA frames), CONTINUATION/reset floods |
//! | rustls | 0.23.45 | RUSTSEC-2026-0285 (and RUSTSEC-2024-0399, fixed in 0.23.18) |
//! | rustls-webpki | 0.103.13 | RUSTSEC-2026-0049, -0098, -0099, -0104 |

use std::path::PathBuf;

const FLOORS: &[(&str, (u64, u64, u64))] = &[
    ("hyper", (1, 5, 1)),
    ("h2", (0, 4, 16)),
    ("rustls", (0, 23, 45)),
    ("rustls-webpki", (0, 103, 13)),
];

/// Every `(name, version)` in a Cargo.lock.
fn packages(lock: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut name = None;
    for line in lock.lines() {
        if line == "[[package]]" {
            name = None;
        } else if let Some(v) = line.strip_prefix("name = ") {
            name = Some(v.trim_matches('"').to_owned());
        } else if let (Some(v), Some(n)) = (line.strip_prefix("version = "), name.take()) {
            out.push((n, v.trim_matches('"').to_owned()));
        }
    }
    out
}

fn semver(v: &str) -> (u64, u64, u64) {
    let core = v.split(['-', '+']).next().unwrap_or(v);
    let mut parts = core.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

/// The floors violated in `lock`, as `name version < floor` lines.
fn violations(lock: &str) -> Vec<String> {
    let pkgs = packages(lock);
    let mut bad = Vec::new();
    for (crate_name, floor) in FLOORS {
        for (n, v) in pkgs.iter().filter(|(n, _)| n == crate_name) {
            if semver(v) < *floor {
                bad.push(format!("{n} {v} < {}.{}.{}", floor.0, floor.1, floor.2));
            }
        }
    }
    bad
}

#[test]
fn lockfile_meets_the_advisory_floors() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.lock");
    let lock = std::fs::read_to_string(&path).expect("Cargo.lock is checked in");
    let pkgs = packages(&lock);
    for (name, _) in FLOORS {
        assert!(
            pkgs.iter().any(|(n, _)| n == name),
            "{name} is not in Cargo.lock: has the HTTP/TLS stack changed?"
        );
    }
    let bad = violations(&lock);
    assert!(bad.is_empty(), "crates below their advisory floor: {bad:?}");
}

#[test]
fn the_check_catches_a_downgrade() {
    let lock = "[[package]]\nname = \"h2\"\nversion = \"0.4.15\"\n\n[[package]]\nname = \"hyper\"\nversion = \"1.5.1\"\n\n[[package]]\nname = \"rustls\"\nversion = \"0.23.18\"\n";
    assert_eq!(
        violations(lock),
        vec!["h2 0.4.15 < 0.4.16", "rustls 0.23.18 < 0.23.45"]
    );
}
