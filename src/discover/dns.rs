//! DNS discovery: a discovery-file service whose endpoints are the A/AAAA records of a name.
//!
//! ```yaml
//! services:
//!   - name: search.shop
//!     addresses: ["198.18.9.20:80"]
//!     dns: "search.shop.svc.cluster.local:8080"    # name:port; plain endpoints
//!   - name: api.shop
//!     addresses: ["198.18.9.21:80"]
//!     dns:                                         # or meshed: every record gets this identity
//!       name: "api:8080"
//!       identity: spiffe://cluster.local/ns/shop/sa/api
//!     endpoints: [...]                             # optional: listed endpoints are kept too
//! ```
//!
//! [`watch`] resolves every name the current snapshot uses with hickory-resolver, configured
//! from a resolv.conf (`--dns-resolv-conf`, default `/etc/resolv.conf`: nameservers, `search`,
//! `ndots`, timeouts), optionally with its nameservers replaced by `--dns-nameserver`. A name
//! is resolved again when its records' TTL runs out, clamped to `--dns-min-ttl` ..
//! `--dns-max-ttl` (the resolver's own cache is clamped the same way, so a re-resolution asks
//! the server). Each answer's addresses, with the service's port, identity, weight and mesh
//! port, become endpoints ([`Overlay::compose`]); endpoint sets change while traffic flows
//! (the balancer keeps the state of endpoints that stay).
//!
//! A failed lookup (timeout, SERVFAIL, NXDOMAIN, no records) keeps the last good records, is
//! logged and counted, and is tried again after `--dns-min-ttl`.
//!
//! Metrics: `tern_dns_resolutions_total{dns_name, result}` (`ok`, `error`),
//! `tern_dns_records{dns_name}` (addresses in force). `dns_name` values come from the
//! discovery file, so their number is bounded by it.
//! Errors: [`DnsError`] (the resolver could not be configured: counted like a failed lookup).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{LookupIpStrategy, NameServerConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use super::{Discovery, Endpoint, Resolved, ServicePolicy, Snapshot};
use crate::tls::SpiffeId;

/// A name to resolve and the port its endpoints listen on (`name:port` in the file).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DnsName {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for DnsName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl std::str::FromStr for DnsName {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (host, port) = s.rsplit_once(':').ok_or("expected name:port")?;
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or("the port must be a number within 1..=65535")?;
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_';
        if host.is_empty() || host.len() > 253 || !host.chars().all(valid) {
            return Err("the name must be a DNS name (letters, digits, '-', '.', '_')");
        }
        Ok(DnsName {
            host: host.to_owned(),
            port,
        })
    }
}

/// How each record of a name becomes an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsTarget {
    pub name: DnsName,
    /// Present: every address is meshed and must present this identity.
    pub identity: Option<SpiffeId>,
    pub weight: u32,
    pub mesh_port: u16,
}

impl DnsTarget {
    fn endpoint(&self, ip: IpAddr) -> Endpoint {
        Endpoint {
            addr: SocketAddr::new(ip, self.name.port),
            identity: self.identity.clone(),
            weight: self.weight,
            mesh_port: self.mesh_port,
        }
    }
}

/// A service whose endpoints come (partly) from DNS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsService {
    pub name: String,
    pub addresses: Vec<SocketAddr>,
    /// Endpoints listed in the file, kept beside the records.
    pub endpoints: Vec<Endpoint>,
    pub policy: Arc<ServicePolicy>,
    pub dns: DnsTarget,
}

/// The snapshot a source gave and the last good records of each name; composes the two.
#[derive(Debug, Default)]
pub(crate) struct Overlay {
    base: Arc<Snapshot>,
    records: HashMap<DnsName, Arc<[IpAddr]>>,
}

impl Overlay {
    pub(crate) fn new(base: Snapshot) -> Self {
        Overlay {
            base: Arc::new(base),
            records: HashMap::new(),
        }
    }

    pub(crate) fn set_base(&mut self, base: Snapshot) {
        self.base = Arc::new(base);
    }

    /// Stores `ips` for `name`; false when they are the ones already in force.
    pub(crate) fn set_records(&mut self, name: &DnsName, ips: Arc<[IpAddr]>) -> bool {
        if self.records.get(name).is_some_and(|old| *old == ips) {
            return false;
        }
        self.records.insert(name.clone(), ips);
        true
    }

    pub(crate) fn names(&self) -> Vec<DnsName> {
        let mut names: Vec<DnsName> = self.base.dns.iter().map(|s| s.dns.name.clone()).collect();
        names.sort();
        names.dedup();
        names
    }

    /// The snapshot with every DNS service's records added as endpoints.
    pub(crate) fn compose(&self) -> Arc<Snapshot> {
        if self.base.dns.is_empty() {
            return self.base.clone();
        }
        let mut snapshot = Snapshot::clone(&self.base);
        for svc in &self.base.dns {
            let mut endpoints = svc.endpoints.clone();
            if let Some(ips) = self.records.get(&svc.dns.name) {
                for ip in ips.iter() {
                    let ep = svc.dns.endpoint(*ip);
                    if !endpoints.iter().any(|e| e.addr == ep.addr) {
                        endpoints.push(ep);
                    }
                }
            }
            for ep in &endpoints {
                snapshot.by_addr.entry(ep.addr).or_insert_with(|| Resolved {
                    service: Some(svc.name.clone()),
                    endpoints: Arc::from(vec![ep.clone()]),
                    policy: None,
                });
            }
            let all: Arc<[Endpoint]> = Arc::from(endpoints);
            for addr in &svc.addresses {
                snapshot.by_addr.insert(
                    *addr,
                    Resolved {
                        service: Some(svc.name.clone()),
                        endpoints: all.clone(),
                        policy: Some(svc.policy.clone()),
                    },
                );
            }
        }
        Arc::new(snapshot)
    }
}

/// Where the resolver's configuration comes from and how long answers count.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// resolv.conf to read (`--dns-resolv-conf`).
    pub resolv_conf: PathBuf,
    /// Replaces the resolv.conf nameservers (`--dns-nameserver`, `ip:port`).
    pub nameserver: Option<SocketAddr>,
    pub min_ttl: Duration,
    pub max_ttl: Duration,
}

/// The resolver could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("reading --dns-resolv-conf {path}: {source}")]
    ResolvConf {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing --dns-resolv-conf {path}: {message}")]
    ResolvConfParse { path: PathBuf, message: String },
    #[error("building the DNS resolver: {0}")]
    Build(String),
}

/// Builds the resolver from the configuration (see the module doc).
pub fn resolver(config: &DnsConfig) -> Result<TokioResolver, DnsError> {
    let text = std::fs::read(&config.resolv_conf).map_err(|source| DnsError::ResolvConf {
        path: config.resolv_conf.clone(),
        source,
    })?;
    let (mut conf, mut opts) =
        hickory_resolver::system_conf::parse_resolv_conf(&text).map_err(|e| {
            DnsError::ResolvConfParse {
                path: config.resolv_conf.clone(),
                message: e.to_string(),
            }
        })?;
    if let Some(ns) = config.nameserver {
        let mut server = NameServerConfig::udp_and_tcp(ns.ip());
        for c in &mut server.connections {
            c.port = ns.port();
        }
        conf.name_servers = vec![server];
    }
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    opts.positive_min_ttl = Some(config.min_ttl);
    opts.positive_max_ttl = Some(config.max_ttl);
    opts.negative_min_ttl = Some(config.min_ttl);
    opts.negative_max_ttl = Some(config.min_ttl);
    hickory_resolver::Resolver::builder_with_config(conf, TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
        .map_err(|e| DnsError::Build(e.to_string()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum Outcome {
    ok,
    error,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResolutionLabels {
    dns_name: String,
    result: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct NameLabels {
    dns_name: String,
}

/// Lookups and records per name.
#[derive(Debug, Clone, Default)]
pub struct DnsMetrics {
    resolutions: Family<ResolutionLabels, Counter>,
    records: Family<NameLabels, Gauge>,
}

impl DnsMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = DnsMetrics::default();
        registry.register(
            "dns_resolutions",
            "DNS lookups of discovery names, by result (an error keeps the last records)",
            m.resolutions.clone(),
        );
        registry.register(
            "dns_records",
            "Addresses in force for each discovery DNS name",
            m.records.clone(),
        );
        m
    }

    fn resolved(&self, name: &DnsName, result: Outcome) {
        self.resolutions
            .get_or_create(&ResolutionLabels {
                dns_name: name.to_string(),
                result,
            })
            .inc();
    }
}

/// Longest sleep between looks at the snapshot, so names added by a reload start resolving
/// soon.
const RECHECK: Duration = Duration::from_secs(1);

/// Resolves the snapshot's DNS names as their TTLs run out and feeds the records into
/// `discovery`. Runs until dropped.
pub async fn watch(discovery: Discovery, config: DnsConfig, metrics: DnsMetrics) {
    let mut resolver: Option<TokioResolver> = None;
    let mut due: HashMap<DnsName, Instant> = HashMap::new();
    loop {
        let names = discovery.dns_names();
        due.retain(|n, _| names.contains(n));
        for name in names {
            if due.get(&name).is_some_and(|t| *t > Instant::now()) {
                continue;
            }
            let wait = resolve(&discovery, &config, &metrics, &mut resolver, &name).await;
            due.insert(name, Instant::now() + wait);
        }
        tokio::time::sleep_until(next_wake(&due, Instant::now())).await;
    }
}

/// When the watcher looks again: the earliest due name, but at the latest after [`RECHECK`]
/// (also when no name is due: never at once, or an idle watcher would spin).
fn next_wake(due: &HashMap<DnsName, Instant>, now: Instant) -> Instant {
    let recheck = now + RECHECK;
    due.values().min().map_or(recheck, |t| (*t).min(recheck))
}

/// One lookup of `name`; returns how long until the next.
async fn resolve(
    discovery: &Discovery,
    config: &DnsConfig,
    metrics: &DnsMetrics,
    resolver: &mut Option<TokioResolver>,
    name: &DnsName,
) -> Duration {
    let r = match resolver {
        Some(r) => r,
        None => match self::resolver(config) {
            Ok(r) => resolver.insert(r),
            Err(e) => {
                tracing::warn!(error = %e, dns_name = %name, "DNS discovery cannot resolve");
                metrics.resolved(name, Outcome::error);
                return config.min_ttl;
            }
        },
    };
    let result = r.lookup_ip(name.host.as_str()).await;
    let lookup = match result {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, dns_name = %name, "DNS lookup failed; keeping the last records");
            metrics.resolved(name, Outcome::error);
            return config.min_ttl;
        }
    };
    let mut ips: Vec<IpAddr> = lookup.iter().collect();
    ips.sort();
    ips.dedup();
    if ips.is_empty() {
        tracing::warn!(dns_name = %name, "DNS answer without addresses; keeping the last records");
        metrics.resolved(name, Outcome::error);
        return config.min_ttl;
    }
    metrics.resolved(name, Outcome::ok);
    metrics
        .records
        .get_or_create(&NameLabels {
            dns_name: name.to_string(),
        })
        .set(ips.len() as i64);
    let ttl = lookup
        .valid_until()
        .saturating_duration_since(std::time::Instant::now());
    if discovery.set_dns_records(name, Arc::from(ips.clone())) {
        tracing::info!(dns_name = %name, addresses = ?ips, ttl_ms = ttl.as_millis() as u64, "DNS records changed");
    }
    ttl.clamp(config.min_ttl, config.max_ttl)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::path::Path;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use hickory_resolver::proto::op::{Message, ResponseCode};
    use hickory_resolver::proto::rr::rdata::A;
    use hickory_resolver::proto::rr::{RData, Record, RecordType};
    use http_body_util::{BodyExt, Empty, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::net::{TcpListener, TcpStream, UdpSocket};

    use super::*;
    use crate::config::{ProxyConfig, TargetMode};
    use crate::demo::metric_value;

    #[test]
    fn the_watcher_sleeps_until_the_first_name_is_due_and_never_spins() {
        let now = Instant::now();
        assert_eq!(next_wake(&HashMap::new(), now), now + RECHECK);
        let name = |s: &str| s.parse::<DnsName>().expect("name");
        let due = HashMap::from([
            (name("a:1"), now + Duration::from_millis(300)),
            (name("b:1"), now + Duration::from_millis(200)),
        ]);
        assert_eq!(next_wake(&due, now), now + Duration::from_millis(200));
        let late = HashMap::from([(name("a:1"), now + Duration::from_secs(60))]);
        assert_eq!(next_wake(&late, now), now + RECHECK, "a reload is noticed");
    }

    #[test]
    fn names_parse_and_bad_ones_are_refused() {
        let n: DnsName = "web.shop.svc:8080".parse().expect("valid");
        assert_eq!((n.host.as_str(), n.port), ("web.shop.svc", 8080));
        assert_eq!(n.to_string(), "web.shop.svc:8080");
        for bad in [
            "web",
            "web:",
            "web:0",
            "web:70000",
            ":80",
            "we b:80",
            "web/x:80",
        ] {
            assert!(bad.parse::<DnsName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_file_takes_both_forms_and_names_bad_fields() {
        let file = |dns: &str| {
            format!(
                "services:\n  - name: web.shop\n    addresses: [\"198.18.9.9:80\"]\n    dns: {dns}\n"
            )
        };
        let s = super::super::file::parse(Path::new("t.yaml"), &file("\"web:8080\""))
            .expect("short form");
        assert_eq!(s.dns.len(), 1);
        assert_eq!(s.dns[0].dns.name.to_string(), "web:8080");
        assert_eq!(s.dns[0].dns.identity, None);
        let long = file(
            "\n      name: \"api.shop:9000\"\n      identity: spiffe://cluster.local/ns/shop/sa/api\n      weight: 2",
        );
        let s = super::super::file::parse(Path::new("t.yaml"), &long).expect("long form");
        let t = &s.dns[0].dns;
        assert_eq!(
            t.identity.as_ref().map(|i| i.to_string()).as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/api")
        );
        assert_eq!((t.weight, t.mesh_port), (2, 4143));
        let e =
            super::super::file::parse(Path::new("t.yaml"), &file("\"web\"")).expect_err("no port");
        assert!(e.to_string().contains("services[0].dns `web`"), "{e}");
        let e = super::super::file::parse(
            Path::new("t.yaml"),
            &file("\n      name: \"web:80\"\n      identity: https://x"),
        )
        .expect_err("bad identity");
        assert!(e.to_string().contains("services[0].dns.identity"), "{e}");
    }

    #[test]
    fn records_compose_into_endpoints_next_to_listed_ones() {
        let text = "services:\n  - name: web.shop\n    addresses: [\"198.18.9.9:80\"]\n    dns:\n      name: \"web:8080\"\n      identity: spiffe://cluster.local/ns/shop/sa/web\n    endpoints:\n      - address: 198.18.1.1:8080\n";
        let snapshot = super::super::file::parse(Path::new("t.yaml"), text).expect("valid");
        let d = Discovery::new(snapshot);
        let vip: SocketAddr = "198.18.9.9:80".parse().expect("addr");
        assert_eq!(d.resolve(vip).expect("service").endpoints.len(), 1);
        let name: DnsName = "web:8080".parse().expect("name");
        let ips: Arc<[IpAddr]> = Arc::from(vec![
            IpAddr::from([198, 18, 1, 2]),
            IpAddr::from([198, 18, 1, 3]),
        ]);
        assert!(d.set_dns_records(&name, ips.clone()));
        assert!(!d.set_dns_records(&name, ips), "same records: no change");
        let r = d.resolve(vip).expect("service");
        let addrs: Vec<String> = r.endpoints.iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(
            addrs,
            ["198.18.1.1:8080", "198.18.1.2:8080", "198.18.1.3:8080"]
        );
        assert!(r.endpoints[1].identity.is_some(), "records are meshed");
        let direct = d
            .resolve("198.18.1.3:8080".parse().expect("addr"))
            .expect("an endpoint dialed directly");
        assert!(direct.policy.is_none());
        assert_eq!(direct.endpoints.len(), 1);
        // A reload keeps the records in force.
        d.replace(super::super::file::parse(Path::new("t.yaml"), text).expect("valid"));
        assert_eq!(d.resolve(vip).expect("service").endpoints.len(), 3);
    }

    /// What the test DNS server answers for `web.test.internal`.
    #[derive(Debug)]
    struct Zone {
        a: Vec<Ipv4Addr>,
        ttl: u32,
        servfail: bool,
    }

    /// A DNS server on 127.0.0.1 (UDP) for one name; counts the queries for it.
    struct DnsServer {
        addr: SocketAddr,
        zone: Arc<Mutex<Zone>>,
        queries: Arc<AtomicUsize>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for DnsServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl DnsServer {
        async fn start(a: Vec<Ipv4Addr>) -> DnsServer {
            let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind udp");
            let addr = sock.local_addr().expect("addr");
            let zone = Arc::new(Mutex::new(Zone {
                a,
                ttl: 1,
                servfail: false,
            }));
            let queries = Arc::new(AtomicUsize::new(0));
            let (z, q) = (zone.clone(), queries.clone());
            let task = tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
                    let Ok(query) = Message::from_vec(&buf[..n]) else {
                        continue;
                    };
                    let answer = answer(&query, &z.lock().expect("zone"), &q);
                    if let Ok(bytes) = answer.to_vec() {
                        let _ = sock.send_to(&bytes, peer).await;
                    }
                }
            });
            DnsServer {
                addr,
                zone,
                queries,
                task,
            }
        }

        fn set(&self, f: impl FnOnce(&mut Zone)) {
            f(&mut self.zone.lock().expect("zone"));
        }
    }

    fn answer(query: &Message, zone: &Zone, queries: &AtomicUsize) -> Message {
        let mut resp = Message::response(query.metadata.id, query.metadata.op_code);
        resp.metadata.recursion_desired = query.metadata.recursion_desired;
        resp.metadata.recursion_available = true;
        resp.metadata.authoritative = true;
        resp.queries = query.queries.clone();
        let Some(q) = query.queries.first() else {
            resp.metadata.response_code = ResponseCode::FormErr;
            return resp;
        };
        let name = q.name.to_ascii().to_ascii_lowercase();
        if name.trim_end_matches('.') != "web.test.internal" {
            resp.metadata.response_code = ResponseCode::NXDomain;
            return resp;
        }
        queries.fetch_add(1, Ordering::SeqCst);
        if zone.servfail {
            resp.metadata.response_code = ResponseCode::ServFail;
            return resp;
        }
        if q.query_type == RecordType::A {
            for ip in &zone.a {
                resp.answers.push(Record::from_rdata(
                    q.name.clone(),
                    zone.ttl,
                    RData::A(A(*ip)),
                ));
            }
        }
        resp
    }

    /// An HTTP/1 app answering its own IP, on `ip:port`.
    async fn app(ip: [u8; 4], port: u16) -> (u16, tokio::task::JoinHandle<()>) {
        let l = TcpListener::bind(SocketAddr::from((ip, port)))
            .await
            .expect("bind app");
        let port = l.local_addr().expect("addr").port();
        let name = Ipv4Addr::from(ip).to_string();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let name = name.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        let body = Full::new(Bytes::from(name.clone()));
                        async move { Ok::<_, std::convert::Infallible>(http::Response::new(body)) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        (port, task)
    }

    /// Which app answered a GET through the proxy (a new connection each time).
    async fn who(entry: SocketAddr) -> String {
        let s = TcpStream::connect(entry).await.expect("connect");
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let req = http::Request::get("/")
            .header("host", "web")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let resp = tx.send_request(req).await.expect("response");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8_lossy(&body).into_owned()
    }

    /// Polls `f` until it returns true (bounded: 10 s).
    async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
        for _ in 0..200 {
            if f().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("never happened: {what}");
    }

    #[tokio::test]
    async fn a_proxy_follows_dns_records_and_keeps_them_when_dns_fails() {
        let (port, _a) = app([127, 0, 0, 2], 0).await;
        let (_, _b) = app([127, 0, 0, 3], port).await;
        let dns = DnsServer::start(vec![Ipv4Addr::new(127, 0, 0, 2)]).await;
        let dir = tempfile::tempdir().expect("tempdir");
        // `search` and `ndots` come from this file: the discovery file names a short name.
        let resolv = dir.path().join("resolv.conf");
        std::fs::write(
            &resolv,
            "nameserver 127.0.0.1\nsearch test.internal\noptions ndots:1 timeout:1 attempts:1\n",
        )
        .expect("write resolv.conf");
        let file = dir.path().join("discovery.yaml");
        std::fs::write(
            &file,
            format!(
                "services:\n  - name: web.test\n    addresses: [\"127.0.0.1:9\"]\n    dns: \"web:{port}\"\n"
            ),
        )
        .expect("write discovery file");
        let mut c = ProxyConfig::loopback();
        c.outbound_target = TargetMode::Fixed("127.0.0.1:9".parse().expect("addr"));
        c.discovery_file = Some(file);
        c.dns_resolv_conf = resolv;
        c.dns_nameserver = Some(dns.addr);
        c.dns_min_ttl = Duration::from_millis(50);
        c.dns_max_ttl = Duration::from_secs(1);
        let proxy = crate::testing::Running::start(c, None);
        let entry = proxy.addrs.outbound[0];

        eventually("the first records are in force", async || {
            who(entry).await == "127.0.0.2"
        })
        .await;
        for _ in 0..10 {
            assert_eq!(who(entry).await, "127.0.0.2");
        }
        // The records change: once the TTL (1 s) runs out, traffic moves.
        dns.set(|z| z.a = vec![Ipv4Addr::new(127, 0, 0, 3)]);
        eventually("the new records are in force", async || {
            who(entry).await == "127.0.0.3"
        })
        .await;
        for _ in 0..10 {
            assert_eq!(who(entry).await, "127.0.0.3");
        }
        // DNS fails: the last records stay, and the failures are counted.
        dns.set(|z| z.servfail = true);
        let before = dns.queries.load(Ordering::SeqCst);
        eventually("failed lookups are counted", async || {
            let m = proxy.metrics().await;
            metric_value(&m, "tern_dns_resolutions_total", "dns_name=\"web:") > 0.0
                && metric_value(&m, "tern_dns_resolutions_total", "result=\"error\"") >= 2.0
        })
        .await;
        assert!(dns.queries.load(Ordering::SeqCst) > before, "asked again");
        for _ in 0..10 {
            assert_eq!(who(entry).await, "127.0.0.3");
        }
        let m = proxy.metrics().await;
        assert!(
            metric_value(&m, "tern_dns_resolutions_total", "result=\"ok\"") >= 2.0,
            "{m}"
        );
        assert_eq!(metric_value(&m, "tern_dns_records", ""), 1.0, "{m}");
        proxy.stop().await;
    }
}
