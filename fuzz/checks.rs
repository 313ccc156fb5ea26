//! The property each fuzz target checks, shared by the cargo-fuzz targets (`fuzz_targets/*.rs`)
//! and the stable corpus replay test (`tests/fuzz_corpus.rs`), so both run the same code.
//!
//! Every check must not panic on any input; where a parser accepts, the result must be
//! self-consistent (round trips, idempotence). A panic here is a finding.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::LazyLock;
use std::time::Duration;

use tokio::io::AsyncReadExt;

/// Protocol detection: the pure classifier on every prefix, and [`tern::detect::detect`] over an
/// in-memory reader must hand back every byte, in order, whatever it decided.
pub fn detect(data: &[u8]) {
    static RT: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime builds")
    });
    // Every prefix a byte-at-a-time peer could produce (bounded: the classifier is linear).
    for end in (0..=data.len()).step_by(data.len() / 64 + 1) {
        let _ = tern::detect::classify_prefix(&data[..end]);
    }
    let verdict = tern::detect::classify_prefix(data);
    let got = RT.block_on(async {
        let (detected, _) = tern::detect::detect(data, Duration::from_secs(5))
            .await
            .expect("reading a slice cannot fail");
        let (mut io, http) = match detected {
            tern::detect::Detected::Http(io, v) => (io, Some(v)),
            tern::detect::Detected::Opaque(io) => (io, None),
            tern::detect::Detected::TimedOut(io) => (io, None),
        };
        let mut all = Vec::new();
        io.read_to_end(&mut all)
            .await
            .expect("reading a slice cannot fail");
        (all, http)
    });
    assert_eq!(got.0, data, "detect lost or reordered bytes");
    // A complete decision on the whole input is what detect reports (EOF decides the rest).
    if let Some(tern::detect::Verdict::Http(v)) = verdict {
        if data.len() <= tern::detect::MAX_DETECT_BYTES {
            assert_eq!(got.1, Some(v), "detect disagrees with classify_prefix");
        }
    }
}

/// SPIFFE ID strings: accepted IDs round-trip and their parts rebuild the same ID.
pub fn spiffe_id(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(id) = s.parse::<tern::tls::SpiffeId>() else {
        return;
    };
    assert_eq!(id.as_str(), s);
    let again: tern::tls::SpiffeId = id.as_str().parse().expect("an accepted ID re-parses");
    assert_eq!(again, id);
    let rebuilt = tern::tls::SpiffeId::new(id.trust_domain(), id.namespace(), id.service_account())
        .expect("an accepted ID's parts rebuild it");
    assert_eq!(rebuilt, id);
}

/// DER certificates: never panic; an accepted leaf's ID is a valid SPIFFE ID.
pub fn cert(data: &[u8]) {
    if let Ok(id) = tern::tls::spiffe_id_of_leaf(data) {
        spiffe_id(id.as_str().as_bytes());
    }
}

/// The discovery file: never panic, whatever the YAML.
pub fn discovery(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = tern::discover::file::parse(Path::new("fuzz.yaml"), s);
}

/// Gateway API routes: never panic; accepted routes build a table that answers lookups.
pub fn routes(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(docs) = tern::routes::parse_yaml(s) else {
        return;
    };
    let routes: Vec<std::sync::Arc<tern::routes::Route>> = docs
        .iter()
        .filter_map(|d| tern::routes::parse_value(d).ok())
        .map(std::sync::Arc::new)
        .collect();
    let table = tern::routes::RouteTable::build_for(routes.iter(), Some("shop"));
    for r in &routes {
        for p in &r.parents {
            for path in ["/", "/api/v1?x=1&y", "/helloworld.Greeter/SayHello", "//"] {
                let req = http::Request::post(path)
                    .header("content-type", "application/grpc")
                    .header("x-canary", "yes")
                    .body(())
                    .expect("a valid request");
                let _ = table.lookup(&p.service, p.port.unwrap_or(80), &req);
            }
        }
    }
}

/// `--inbound-policy` rules: never panic; an accepted rule can be evaluated on any port.
pub fn policy_rule(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(rule) = s.parse::<tern::inbound::policy::PortRule>() else {
        return;
    };
    let policy =
        tern::inbound::policy::Policy::new(tern::inbound::policy::DefaultPolicy::Deny, vec![rule]);
    let id = tern::tls::SpiffeId::new("cluster.local", "ns1", "sa1").expect("a valid ID");
    for port in [0, 1, 80, 8080, 65535] {
        let _ = policy.authorize(port, None);
        let _ = policy.authorize(port, Some(&id));
    }
}

/// The inject patch: over raw JSON objects (the webhook's path) and YAML streams (`tern inject`).
/// A computed patch always applies, and injecting an injected workload changes nothing.
pub fn inject(data: &[u8]) {
    let sidecar = tern::inject::Sidecar {
        selection: tern::inject::Selection::All,
        ..Default::default()
    };
    let ns = BTreeMap::new();
    if let Ok(mut object) = serde_json::from_slice::<serde_json::Value>(data) {
        match tern::inject::inject_object(&mut object, &ns, &sidecar) {
            Err(e @ tern::inject::WorkloadError::Apply { .. }) => {
                panic!("computed patch does not apply: {e}")
            }
            Ok(Some(injection)) => {
                if matches!(injection.outcome, tern::inject::Outcome::Injected { .. }) {
                    let again = tern::inject::inject_object(&mut object, &ns, &sidecar)
                        .expect("an injected workload re-parses")
                        .expect("still a workload");
                    assert!(
                        matches!(
                            again.outcome,
                            tern::inject::Outcome::Skipped {
                                reason: tern::inject::SkipReason::AlreadyInjected,
                                ..
                            }
                        ),
                        "second injection was not a no-op: {:?}",
                        again.outcome
                    );
                }
            }
            Ok(None) | Err(_) => {}
        }
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Err(tern::inject::cli::InjectCliError::Workload {
            source: e @ tern::inject::WorkloadError::Apply { .. },
            ..
        }) = tern::inject::cli::inject_yaml(&[("fuzz.yaml".into(), s.to_string())], &sidecar)
        {
            panic!("computed patch does not apply: {e}");
        }
    }
}

/// The mesh wire's per-stream head (`tern::mesh::wire::parse`): the input is a method line, a
/// target line, then `name: value` header lines. Accepted tunnels name a non-zero port that is
/// the URI's; accepted HTTP targets round-trip through their text form.
pub fn mesh_wire(data: &[u8]) {
    let mut lines = data.split(|b| *b == b'\n');
    let (Some(method), Some(uri)) = (lines.next(), lines.next()) else {
        return;
    };
    let Ok(method) = http::Method::from_bytes(method) else {
        return;
    };
    let Ok(uri) = http::Uri::try_from(uri) else {
        return;
    };
    let mut headers = http::HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(&line[..colon]),
            http::HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    match tern::mesh::wire::parse(&method, &uri, &headers) {
        Ok(tern::mesh::wire::StreamHead::Tunnel { port }) => {
            assert_eq!(method, http::Method::CONNECT);
            assert_ne!(port, 0);
            assert_eq!(uri.port_u16(), Some(port));
        }
        Ok(tern::mesh::wire::StreamHead::Http { target, version }) => {
            assert_ne!(method, http::Method::CONNECT);
            assert_ne!(target.port(), 0);
            assert_eq!(
                target.to_string().parse::<std::net::SocketAddr>().ok(),
                Some(target)
            );
            assert!(matches!(
                version,
                http::Version::HTTP_10 | http::Version::HTTP_11 | http::Version::HTTP_2
            ));
        }
        Err(_) => {}
    }
}
