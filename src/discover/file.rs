//! The discovery file: services → endpoints (+ identities), hot-reloaded (`--discovery-file`).
//!
//! ```yaml
//! services:
//!   - name: web.shop                   # name.namespace
//!     addresses: ["198.18.9.9:80"]     # service addresses (VIP:port) that map to it
//!     endpoints:
//!       - address: 198.18.1.11:8080
//!         identity: spiffe://cluster.local/ns/shop/sa/web   # present: meshed, this identity required
//!         weight: 1                    # optional, default 1
//!         mesh_port: 4143              # optional, default 4143
//!     dns: "web.shop.svc:8080"         # optional: the A/AAAA records of a name are endpoints too
//!                                      # (or {name: "n:port", identity: ..., weight: .., mesh_port: ..}),
//!                                      # re-resolved on TTL; see `super::dns`
//!     timeout: 2s                      # optional: request timeout (humantime), else --request-timeout
//!     retry:                           # optional: retry on these responses (5xx, a status, a gRPC code)
//!       on: ["5xx", "unavailable"]
//!       attempts: 2                    # extra attempts after the first, 1..=10, default 1
//! ```
//!
//! Requests to a service address go through the per-request resilience stack
//! (`crate::layers`): balancing, circuit breaking, retries and the timeout.
//!
//! A destination matching a service address resolves to all its endpoints; a destination
//! matching an endpoint address resolves to that endpoint alone (so a client dialing a pod IP
//! directly still gets the pod's identity checked).
//!
//! The file is re-read every `--discovery-reload-interval`; a file that fails to parse or
//! validate is logged, counted, and the previous snapshot stays in force.
//!
//! Metrics: `tern_discovery_reloads_total`, `tern_discovery_reload_failures_total`,
//! `tern_discovery_addresses` (addresses the snapshot resolves).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Deserialize;

use super::{
    DEFAULT_MESH_PORT, Discovery, Endpoint, Resolved, RetryOn, RetryPolicy, ServicePolicy, Snapshot,
};
pub use crate::file_watch::Seen;
use crate::tls::SpiffeId;

/// Why a discovery file was refused. Each variant names where in the file the problem is.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("reading discovery file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing discovery file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "discovery file: services[{service}].endpoints[{endpoint}].identity `{value}`: {message}"
    )]
    Identity {
        service: usize,
        endpoint: usize,
        value: String,
        message: String,
    },
    #[error("discovery file: services[{service}].endpoints[{endpoint}].weight must be at least 1")]
    Weight { service: usize, endpoint: usize },
    #[error("discovery file: services[{service}].name must not be empty")]
    Name { service: usize },
    #[error("discovery file: services[{service}].timeout `{value}`: {message}")]
    Timeout {
        service: usize,
        value: String,
        message: String,
    },
    #[error(
        "discovery file: services[{service}].retry.on[{index}] `{value}`: expected 5xx, a status code (100..=599) or a gRPC code name (unavailable, deadline-exceeded, ...)"
    )]
    RetryOn {
        service: usize,
        index: usize,
        value: String,
    },
    #[error(
        "discovery file: services[{service}].retry.attempts must be within 1..=10, not {value}"
    )]
    RetryAttempts { service: usize, value: u32 },
    #[error("discovery file: services[{service}].dns `{value}`: {message}")]
    Dns {
        service: usize,
        value: String,
        message: String,
    },
    #[error("discovery file: services[{service}].dns.identity `{value}`: {message}")]
    DnsIdentity {
        service: usize,
        value: String,
        message: String,
    },
    #[error("discovery file: services[{service}].dns.weight must be at least 1")]
    DnsWeight { service: usize },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default)]
    services: Vec<ServiceDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceDoc {
    name: String,
    #[serde(default)]
    addresses: Vec<SocketAddr>,
    #[serde(default)]
    endpoints: Vec<EndpointDoc>,
    timeout: Option<String>,
    retry: Option<RetryDoc>,
    dns: Option<DnsDoc>,
}

/// `dns: "name:port"`, or the long form with the identity and weight of every record.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum DnsDoc {
    Name(String),
    Full(DnsFullDoc),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DnsFullDoc {
    name: String,
    identity: Option<String>,
    weight: Option<u32>,
    mesh_port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryDoc {
    #[serde(default)]
    on: Vec<String>,
    attempts: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointDoc {
    address: SocketAddr,
    identity: Option<String>,
    weight: Option<u32>,
    mesh_port: Option<u16>,
}

/// Parses and validates a discovery document.
pub fn parse(path: &Path, text: &str) -> Result<Snapshot, FileError> {
    let doc: FileDoc = serde_saphyr::from_str(text).map_err(|e| FileError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut by_addr = HashMap::new();
    let mut dns_services = Vec::new();
    for (si, svc) in doc.services.iter().enumerate() {
        if svc.name.trim().is_empty() {
            return Err(FileError::Name { service: si });
        }
        let mut endpoints = Vec::with_capacity(svc.endpoints.len());
        for (ei, ep) in svc.endpoints.iter().enumerate() {
            let identity = match &ep.identity {
                None => None,
                Some(v) => Some(v.parse::<SpiffeId>().map_err(|e| FileError::Identity {
                    service: si,
                    endpoint: ei,
                    value: v.clone(),
                    message: e.to_string(),
                })?),
            };
            let weight = ep.weight.unwrap_or(1);
            if weight == 0 {
                return Err(FileError::Weight {
                    service: si,
                    endpoint: ei,
                });
            }
            endpoints.push(Endpoint {
                addr: ep.address,
                identity,
                weight,
                mesh_port: ep.mesh_port.unwrap_or(DEFAULT_MESH_PORT),
            });
        }
        let policy = Arc::new(policy(si, svc)?);
        if let Some(doc) = &svc.dns {
            dns_services.push(super::dns::DnsService {
                name: svc.name.clone(),
                addresses: svc.addresses.clone(),
                endpoints: endpoints.clone(),
                policy: policy.clone(),
                dns: dns_target(si, doc)?,
            });
        }
        for ep in &endpoints {
            by_addr.insert(
                ep.addr,
                Resolved {
                    service: Some(svc.name.clone()),
                    endpoints: Arc::from(vec![ep.clone()]),
                    policy: None,
                },
            );
        }
        let all: Arc<[Endpoint]> = Arc::from(endpoints);
        for addr in &svc.addresses {
            by_addr.insert(
                *addr,
                Resolved {
                    service: Some(svc.name.clone()),
                    endpoints: all.clone(),
                    policy: Some(policy.clone()),
                },
            );
        }
    }
    Ok(Snapshot {
        by_addr,
        dns: dns_services,
    })
}

fn dns_target(si: usize, doc: &DnsDoc) -> Result<super::dns::DnsTarget, FileError> {
    let (name, identity, weight, mesh_port) = match doc {
        DnsDoc::Name(n) => (n, None, None, None),
        DnsDoc::Full(f) => (&f.name, f.identity.as_ref(), f.weight, f.mesh_port),
    };
    let parsed = name.parse().map_err(|message: &str| FileError::Dns {
        service: si,
        value: name.clone(),
        message: message.to_owned(),
    })?;
    let identity = match identity {
        None => None,
        Some(v) => Some(v.parse::<SpiffeId>().map_err(|e| FileError::DnsIdentity {
            service: si,
            value: v.clone(),
            message: e.to_string(),
        })?),
    };
    let weight = weight.unwrap_or(1);
    if weight == 0 {
        return Err(FileError::DnsWeight { service: si });
    }
    Ok(super::dns::DnsTarget {
        name: parsed,
        identity,
        weight,
        mesh_port: mesh_port.unwrap_or(DEFAULT_MESH_PORT),
    })
}

fn policy(si: usize, svc: &ServiceDoc) -> Result<ServicePolicy, FileError> {
    let timeout = match &svc.timeout {
        None => None,
        Some(v) => Some(
            humantime::parse_duration(v).map_err(|e| FileError::Timeout {
                service: si,
                value: v.clone(),
                message: e.to_string(),
            })?,
        ),
    };
    let retry = match &svc.retry {
        None => None,
        Some(r) => {
            let mut on = Vec::with_capacity(r.on.len());
            for (i, v) in r.on.iter().enumerate() {
                on.push(v.parse::<RetryOn>().map_err(|()| FileError::RetryOn {
                    service: si,
                    index: i,
                    value: v.clone(),
                })?);
            }
            let attempts = r.attempts.unwrap_or(1);
            if !(1..=10).contains(&attempts) {
                return Err(FileError::RetryAttempts {
                    service: si,
                    value: attempts,
                });
            }
            Some(RetryPolicy { on, attempts })
        }
    };
    Ok(ServicePolicy { timeout, retry })
}

/// Reads and parses the file.
pub fn load(path: &Path) -> Result<Snapshot, FileError> {
    read_and_parse(path).map(|(s, _)| s)
}

fn read_and_parse(path: &Path) -> Result<(Snapshot, Vec<u8>), FileError> {
    let bytes = std::fs::read(path).map_err(|source| FileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8(bytes).map_err(|e| FileError::Parse {
        path: path.to_path_buf(),
        message: format!("not UTF-8: {e}"),
    })?;
    let snapshot = parse(path, &text)?;
    Ok((snapshot, text.into_bytes()))
}

/// Reload counters for the file source.
#[derive(Debug, Clone, Default)]
pub struct FileMetrics {
    reloads: Counter,
    failures: Counter,
    addresses: Gauge,
}

impl FileMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = FileMetrics::default();
        registry.register(
            "discovery_reloads",
            "Discovery file reloads that took effect",
            m.reloads.clone(),
        );
        registry.register(
            "discovery_reload_failures",
            "Discovery file reloads refused (the previous snapshot stays)",
            m.failures.clone(),
        );
        registry.register(
            "discovery_addresses",
            "Addresses the current discovery snapshot resolves",
            m.addresses.clone(),
        );
        m
    }
}

/// Loads the file once (an error here stops start-up) and returns the handle.
pub fn start(path: &Path, metrics: &FileMetrics) -> Result<(Discovery, Seen), FileError> {
    let (snapshot, bytes) = read_and_parse(path)?;
    metrics.addresses.set(snapshot.len() as i64);
    Ok((Discovery::new(snapshot), Seen::new(bytes)))
}

/// Polls the file every `interval` and swaps in valid new contents. Runs until dropped.
pub async fn watch(
    path: PathBuf,
    discovery: Discovery,
    interval: Duration,
    metrics: FileMetrics,
    seen: Seen,
) {
    crate::file_watch::poll(&path, interval, seen, |now| {
        let result = match now {
            None => Err(FileError::Read {
                path: path.clone(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "file disappeared"),
            }),
            Some(bytes) => parse(&path, &String::from_utf8_lossy(bytes)),
        };
        match result {
            Ok(snapshot) => {
                tracing::info!(path = %path.display(), addresses = snapshot.len(), "discovery file reloaded");
                metrics.addresses.set(snapshot.len() as i64);
                metrics.reloads.inc();
                discovery.replace(snapshot);
            }
            Err(e) => {
                tracing::warn!(error = %e, "discovery file refused; keeping the previous one");
                metrics.failures.inc();
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
services:
  - name: web.shop
    addresses: ["198.18.9.9:80"]
    endpoints:
      - address: 198.18.1.11:8080
        identity: spiffe://cluster.local/ns/shop/sa/web
      - address: 198.18.1.12:8080
        weight: 3
        mesh_port: 14143
"#;

    #[test]
    fn resolves_service_and_endpoint_addresses() {
        let s = parse(Path::new("t.yaml"), GOOD).expect("valid");
        let svc = s
            .resolve("198.18.9.9:80".parse().expect("addr"))
            .expect("service");
        assert_eq!(svc.service.as_deref(), Some("web.shop"));
        assert_eq!(svc.endpoints.len(), 2);
        assert_eq!(svc.endpoints[1].weight, 3);
        assert_eq!(svc.policy.as_deref(), Some(&ServicePolicy::default()));
        assert_eq!(
            svc.endpoints[0].mesh_addr(),
            Some("198.18.1.11:4143".parse().expect("addr"))
        );
        assert_eq!(
            svc.endpoints[1].mesh_addr(),
            None,
            "no identity: not meshed"
        );
        let ep = s
            .resolve("198.18.1.11:8080".parse().expect("addr"))
            .expect("endpoint");
        assert_eq!(ep.endpoints.len(), 1);
        assert!(
            ep.policy.is_none(),
            "a pod dialed directly: no service policy"
        );
        assert!(
            s.resolve("198.18.1.11:9999".parse().expect("addr"))
                .is_none()
        );
    }

    #[test]
    fn timeout_and_retry_parse() {
        let text = GOOD.replace(
            "    endpoints:",
            "    timeout: 1500ms\n    retry:\n      on: [\"5xx\", \"429\", \"unavailable\"]\n      attempts: 3\n    endpoints:",
        );
        let s = parse(Path::new("t.yaml"), &text).expect("valid");
        let svc = s
            .resolve("198.18.9.9:80".parse().expect("addr"))
            .expect("service");
        let p = svc.policy.expect("policy");
        assert_eq!(p.timeout, Some(Duration::from_millis(1500)));
        assert_eq!(
            p.retry,
            Some(RetryPolicy {
                on: vec![RetryOn::Server5xx, RetryOn::Status(429), RetryOn::Grpc(14)],
                attempts: 3
            })
        );
    }

    #[test]
    fn bad_files_name_the_field() {
        let bad_id = GOOD.replace("spiffe://cluster.local/ns/shop/sa/web", "https://web");
        let e = parse(Path::new("t.yaml"), &bad_id).expect_err("not spiffe");
        assert!(
            e.to_string().contains("services[0].endpoints[0].identity"),
            "{e}"
        );
        let e = parse(Path::new("t.yaml"), &GOOD.replace("weight: 3", "weight: 0"))
            .expect_err("zero weight");
        assert!(
            e.to_string().contains("services[0].endpoints[1].weight"),
            "{e}"
        );
        let with_policy =
            |extra: &str| GOOD.replace("    endpoints:", &format!("{extra}\n    endpoints:"));
        let e =
            parse(Path::new("t.yaml"), &with_policy("    timeout: soon")).expect_err("bad timeout");
        assert!(e.to_string().contains("services[0].timeout `soon`"), "{e}");
        let e = parse(
            Path::new("t.yaml"),
            &with_policy("    retry:\n      on: [\"5xx\", \"teapot\"]"),
        )
        .expect_err("bad retry.on");
        assert!(
            e.to_string().contains("services[0].retry.on[1] `teapot`"),
            "{e}"
        );
        let e = parse(
            Path::new("t.yaml"),
            &with_policy("    retry:\n      on: [\"5xx\"]\n      attempts: 0"),
        )
        .expect_err("bad attempts");
        assert!(e.to_string().contains("services[0].retry.attempts"), "{e}");
        let e = parse(Path::new("t.yaml"), "services:\n  - nmae: x\n").expect_err("typo");
        assert!(e.to_string().contains("t.yaml"), "{e}");
        let e = parse(
            Path::new("t.yaml"),
            &GOOD.replace("198.18.1.12:8080", "198.18.1.12"),
        )
        .expect_err("no port");
        assert!(matches!(e, FileError::Parse { .. }), "{e}");
    }

    #[tokio::test]
    async fn reload_swaps_valid_and_keeps_old_on_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("discovery.yaml");
        std::fs::write(&path, GOOD).expect("write");
        let metrics = FileMetrics::default();
        let (d, seen) = start(&path, &metrics).expect("start");
        let task = tokio::spawn(watch(
            path.clone(),
            d.clone(),
            Duration::from_millis(20),
            metrics.clone(),
            seen,
        ));
        std::fs::write(&path, "services: [ this is not yaml").expect("write broken");
        for _ in 0..200 {
            if metrics.failures.get() > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(metrics.failures.get(), 1);
        assert!(
            d.resolve("198.18.9.9:80".parse().expect("addr")).is_some(),
            "old kept"
        );
        std::fs::write(&path, GOOD.replace("198.18.9.9:80", "198.18.9.10:80")).expect("write");
        for _ in 0..200 {
            if metrics.reloads.get() > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(metrics.reloads.get(), 1);
        assert!(d.resolve("198.18.9.10:80".parse().expect("addr")).is_some());
        assert!(d.resolve("198.18.9.9:80".parse().expect("addr")).is_none());
        task.abort();
    }
}
