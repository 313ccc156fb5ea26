//! `tern demo` as a newcomer runs it: the binary, its exit status and what it prints.

use std::process::Command;

/// The flaky backend's share (percent) in each row the demo marks as failing.
fn flaky_shares_while_failing(out: &str) -> Vec<f64> {
    out.lines()
        .filter(|l| l.contains("← flaky answers 503"))
        .filter_map(|l| {
            l.split_whitespace()
                .nth(3)?
                .trim_end_matches('%')
                .parse()
                .ok()
        })
        .collect()
}

#[test]
fn demo_runs_the_mesh_and_shows_requests_moving_away_from_a_failing_backend() {
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["demo", "--duration", "1s"])
        .env("RUST_LOG", "off")
        .output()
        .expect("run tern demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "tern demo failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // The earlier parts still run.
    assert!(stdout.contains("intact through both proxies"), "{stdout}");
    assert!(
        stdout.contains("refused by the echo proxy's policy"),
        "{stdout}"
    );
    assert!(
        stdout.contains("HTTP/1.1") && stdout.contains("gRPC"),
        "{stdout}"
    );
    // The resilience part: the flaky backend is ejected, its share drops while it fails, and
    // the client sees (the demo itself fails below 99%) every request succeed.
    assert!(stdout.contains("Resilience: shop.demo"), "{stdout}");
    let failing = flaky_shares_while_failing(&stdout);
    assert_eq!(failing.len(), 3, "three failing windows:\n{stdout}");
    assert!(
        failing.iter().cloned().fold(f64::INFINITY, f64::min) <= 10.0,
        "requests moved away from the failing backend: {failing:?}\n{stdout}"
    );
    let ejected = stdout
        .lines()
        .find_map(|l| {
            l.split("ejected ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<f64>()
                .ok()
        })
        .expect("a breaker line");
    assert!(ejected >= 1.0, "{stdout}");
    let seen = stdout
        .lines()
        .find(|l| l.contains("the client saw"))
        .expect("a client line");
    assert!(seen.contains("succeed"), "{seen}");
    assert!(stdout.contains("retries:"), "{stdout}");
}
