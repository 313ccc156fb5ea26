//! Typed, validated proxy configuration built from the CLI, with cross-field checks.
//!
//! The effective config is logged at start-up and served as JSON at `/config`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::Serialize;

use crate::addr::PortRange;
use crate::cli::{DiscoveryMode, ProxyArgs};
use crate::discover::kube::ApiServer;
use crate::inbound::policy::{DefaultPolicy, PortRule};

/// A configuration value the proxy refuses, naming the flag and its environment variable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--buffer-size (TERN_BUFFER_SIZE) must be between 1024 and 1048576 bytes, got {0}")]
    BufferSize(usize),
    #[error("--workers (TERN_WORKERS) must be between 1 and 64, got {0}")]
    Workers(usize),
    #[error("--max-connections (TERN_MAX_CONNECTIONS) must be between 1 and 1000000, got {0}")]
    MaxConnections(usize),
    #[error("--connect-timeout (TERN_CONNECT_TIMEOUT) must be between 1ms and 60s, got {0:?}")]
    ConnectTimeout(Duration),
    #[error("--detect-timeout (TERN_DETECT_TIMEOUT) must be between 1ms and 300s, got {0:?}")]
    DetectTimeout(Duration),
    #[error("--request-timeout (TERN_REQUEST_TIMEOUT) must be at least 1ms, got {0:?}")]
    RequestTimeout(Duration),
    #[error("--probe-timeout (TERN_PROBE_TIMEOUT) must be between 1ms and 10s, got {0:?}")]
    ProbeTimeout(Duration),
    #[error("--{flag} ({env}) must be at least 10ms, got {value:?}")]
    Interval {
        flag: &'static str,
        env: &'static str,
        value: Duration,
    },
    #[error(
        "--require-mtls (TERN_REQUIRE_MTLS) needs an identity: set --identity-dir (TERN_IDENTITY_DIR)"
    )]
    RequireMtlsWithoutIdentity,
    #[error("--discovery file (TERN_DISCOVERY) needs --discovery-file (TERN_DISCOVERY_FILE)")]
    DiscoveryFileMissing,
    #[error("--{flag} ({env}) must be between {min:?} and {max:?}, got {value:?}")]
    DiscoveryDuration {
        flag: &'static str,
        env: &'static str,
        min: Duration,
        max: Duration,
        value: Duration,
    },
    #[error("--outbound-addrs (TERN_OUTBOUND_ADDRS) must name at least one address")]
    NoOutboundAddrs,
    #[error("--{flag} ({env}) {addr} is one of the proxy's own listeners: that would be a loop")]
    TargetIsSelf {
        flag: &'static str,
        env: &'static str,
        addr: SocketAddr,
    },
    #[error(
        "--dns-min-ttl (TERN_DNS_MIN_TTL) {min:?} must be at least 10ms and at most --dns-max-ttl (TERN_DNS_MAX_TTL) {max:?}"
    )]
    DnsTtl { min: Duration, max: Duration },
    #[error("--{flag} ({env}) must be between {min} and {max}, got {value}: there is no unlimited")]
    OutOfRange {
        flag: &'static str,
        env: &'static str,
        value: String,
        min: String,
        max: String,
    },
}

/// How a listener finds where to send a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "mode", content = "target")]
pub enum TargetMode {
    /// Transparent: the iptables original destination (`SO_ORIGINAL_DST`).
    OrigDst,
    /// Explicit mode: every connection goes to this address.
    Fixed(SocketAddr),
}

/// The proxy's effective configuration.
#[derive(Debug, Clone, Serialize)]
pub struct ProxyConfig {
    pub outbound_addrs: Vec<SocketAddr>,
    pub inbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub outbound_target: TargetMode,
    pub inbound_target: TargetMode,
    #[serde(with = "humantime_serde_compat")]
    pub connect_timeout: Duration,
    #[serde(serialize_with = "humantime_serde_compat::option")]
    pub request_timeout: Option<Duration>,
    pub buffer_size: usize,
    pub max_connections: usize,
    #[serde(with = "humantime_serde_compat")]
    pub shutdown_accept_delay: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub shutdown_grace_period: Duration,
    pub enable_shutdown_endpoint: bool,
    pub workers: usize,
    pub identity_dir: Option<PathBuf>,
    #[serde(with = "humantime_serde_compat")]
    pub identity_reload_interval: Duration,
    pub discovery_file: Option<PathBuf>,
    #[serde(with = "humantime_serde_compat")]
    pub discovery_reload_interval: Duration,
    pub routes_file: Option<PathBuf>,
    pub cluster_networks: Vec<IpNet>,
    pub service_networks: Vec<IpNet>,
    #[serde(with = "humantime_serde_compat")]
    pub probe_timeout: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub probe_negative_ttl: Duration,
    pub require_mtls: bool,
    pub default_inbound_policy: DefaultPolicy,
    pub inbound_policy: Vec<PortRule>,
    #[serde(with = "humantime_serde_compat")]
    pub detect_timeout: Duration,
    pub opaque_ports: Vec<PortRange>,
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
    pub service_account: Option<String>,
    pub dns_resolv_conf: PathBuf,
    pub dns_nameserver: Option<SocketAddr>,
    #[serde(with = "humantime_serde_compat")]
    pub dns_min_ttl: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub dns_max_ttl: Duration,
    pub max_request_head_bytes: usize,
    pub max_request_headers: usize,
    pub max_uri_length: usize,
    #[serde(with = "humantime_serde_compat")]
    pub header_read_timeout: Duration,
    pub h2_max_concurrent_streams: u32,
    pub h2_max_header_list_size: u32,
    #[serde(with = "humantime_serde_compat")]
    pub h2_keep_alive_interval: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub h2_keep_alive_timeout: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub http_idle_timeout: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub request_body_idle_timeout: Duration,
    pub max_in_flight_requests: usize,
    pub listen_backlog: u32,
    pub http1_header_case: crate::http::HeaderCase,
    /// Kubernetes discovery: where the API server is; `None`: off.
    pub kubernetes: Option<ApiServer>,
    /// `--discovery`: with `auto`, a Kubernetes client that cannot be built is a warning, not a
    /// start-up failure.
    pub discovery: DiscoveryMode,
    pub cluster_domain: String,
    #[serde(with = "humantime_serde_compat")]
    pub discovery_idle_timeout: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub discovery_timeout: Duration,
}

impl ProxyConfig {
    pub fn from_args(a: &ProxyArgs) -> Result<Self, ConfigError> {
        if !(1024..=1024 * 1024).contains(&a.buffer_size) {
            return Err(ConfigError::BufferSize(a.buffer_size));
        }
        if !(1..=64).contains(&a.workers) {
            return Err(ConfigError::Workers(a.workers));
        }
        if !(1..=1_000_000).contains(&a.max_connections) {
            return Err(ConfigError::MaxConnections(a.max_connections));
        }
        if a.connect_timeout < Duration::from_millis(1)
            || a.connect_timeout > Duration::from_secs(60)
        {
            return Err(ConfigError::ConnectTimeout(a.connect_timeout));
        }
        if let Some(t) = a.request_timeout.filter(|t| *t < Duration::from_millis(1)) {
            return Err(ConfigError::RequestTimeout(t));
        }
        if a.probe_timeout < Duration::from_millis(1) || a.probe_timeout > Duration::from_secs(10) {
            return Err(ConfigError::ProbeTimeout(a.probe_timeout));
        }
        for (flag, env, d) in [
            (
                "identity-reload-interval",
                "TERN_IDENTITY_RELOAD_INTERVAL",
                a.identity_reload_interval,
            ),
            (
                "discovery-reload-interval",
                "TERN_DISCOVERY_RELOAD_INTERVAL",
                a.discovery_reload_interval,
            ),
        ] {
            if d < Duration::from_millis(10) {
                return Err(ConfigError::Interval {
                    flag,
                    env,
                    value: d,
                });
            }
        }
        if a.detect_timeout < Duration::from_millis(1)
            || a.detect_timeout > Duration::from_secs(300)
        {
            return Err(ConfigError::DetectTimeout(a.detect_timeout));
        }
        if a.dns_min_ttl < Duration::from_millis(10) || a.dns_min_ttl > a.dns_max_ttl {
            return Err(ConfigError::DnsTtl {
                min: a.dns_min_ttl,
                max: a.dns_max_ttl,
            });
        }
        if a.require_mtls && a.identity_dir.is_none() {
            return Err(ConfigError::RequireMtlsWithoutIdentity);
        }
        if a.outbound_addrs.is_empty() {
            return Err(ConfigError::NoOutboundAddrs);
        }
        let own: Vec<SocketAddr> = a
            .outbound_addrs
            .iter()
            .copied()
            .chain([a.inbound_addr, a.admin_addr])
            .filter(|l| l.port() != 0)
            .collect();
        let is_self = |t: SocketAddr| {
            own.iter().any(|l| {
                l.port() == t.port()
                    && (l.ip() == t.ip() || l.ip().is_unspecified() || t.ip().is_unspecified())
            })
        };
        if let Some(t) = a.outbound_target.filter(|t| is_self(*t)) {
            return Err(ConfigError::TargetIsSelf {
                flag: "outbound-target",
                env: "TERN_OUTBOUND_TARGET",
                addr: t,
            });
        }
        if let Some(t) = a.inbound_target.filter(|t| is_self(*t)) {
            return Err(ConfigError::TargetIsSelf {
                flag: "inbound-target",
                env: "TERN_INBOUND_TARGET",
                addr: t,
            });
        }
        check_limits(a)?;
        let (kubernetes, discovery_file) = discovery_sources(a)?;
        let mode = |t: Option<SocketAddr>| t.map_or(TargetMode::OrigDst, TargetMode::Fixed);
        Ok(ProxyConfig {
            outbound_addrs: a.outbound_addrs.clone(),
            inbound_addr: a.inbound_addr,
            admin_addr: a.admin_addr,
            outbound_target: mode(a.outbound_target),
            inbound_target: mode(a.inbound_target),
            connect_timeout: a.connect_timeout,
            request_timeout: a.request_timeout,
            buffer_size: a.buffer_size,
            max_connections: a.max_connections,
            shutdown_accept_delay: a.shutdown_accept_delay,
            shutdown_grace_period: a.shutdown_grace_period,
            enable_shutdown_endpoint: a.enable_shutdown_endpoint,
            workers: a.workers,
            identity_dir: a.identity_dir.clone(),
            identity_reload_interval: a.identity_reload_interval,
            discovery_file,
            discovery_reload_interval: a.discovery_reload_interval,
            routes_file: a.routes_file.clone(),
            cluster_networks: a.cluster_networks.clone(),
            service_networks: a.service_networks.clone(),
            probe_timeout: a.probe_timeout,
            probe_negative_ttl: a.probe_negative_ttl,
            require_mtls: a.require_mtls,
            default_inbound_policy: a.default_inbound_policy,
            inbound_policy: a.inbound_policy.clone(),
            detect_timeout: a.detect_timeout,
            opaque_ports: a.opaque_ports.clone(),
            pod_name: a.pod_name.clone(),
            pod_namespace: a.pod_namespace.clone(),
            service_account: a.service_account.clone(),
            dns_resolv_conf: a.dns_resolv_conf.clone(),
            dns_nameserver: a.dns_nameserver,
            dns_min_ttl: a.dns_min_ttl,
            dns_max_ttl: a.dns_max_ttl,
            max_request_head_bytes: a.max_request_head_bytes,
            max_request_headers: a.max_request_headers,
            max_uri_length: a.max_uri_length,
            header_read_timeout: a.header_read_timeout,
            h2_max_concurrent_streams: a.h2_max_concurrent_streams,
            h2_max_header_list_size: a.h2_max_header_list_size,
            h2_keep_alive_interval: a.h2_keep_alive_interval,
            h2_keep_alive_timeout: a.h2_keep_alive_timeout,
            http_idle_timeout: a.http_idle_timeout,
            request_body_idle_timeout: a.request_body_idle_timeout,
            max_in_flight_requests: a.max_in_flight_requests,
            listen_backlog: a.listen_backlog,
            http1_header_case: a.http1_header_case,
            kubernetes,
            discovery: a.discovery,
            cluster_domain: a.cluster_domain.trim_end_matches('.').to_string(),
            discovery_idle_timeout: a.discovery_idle_timeout,
            discovery_timeout: a.discovery_timeout,
        })
    }
}

/// The discovery sources `--discovery` selects: the Kubernetes API server, the file.
fn discovery_sources(a: &ProxyArgs) -> Result<(Option<ApiServer>, Option<PathBuf>), ConfigError> {
    for (flag, env, value, min, max) in [
        (
            "discovery-timeout",
            "TERN_DISCOVERY_TIMEOUT",
            a.discovery_timeout,
            Duration::from_millis(1),
            Duration::from_secs(60),
        ),
        (
            "discovery-idle-timeout",
            "TERN_DISCOVERY_IDLE_TIMEOUT",
            a.discovery_idle_timeout,
            Duration::from_millis(10),
            Duration::from_secs(24 * 3600),
        ),
    ] {
        if value < min || value > max {
            return Err(ConfigError::DiscoveryDuration {
                flag,
                env,
                min,
                max,
                value,
            });
        }
    }
    let explicit = a.kube_api_url.clone().map(ApiServer::Url);
    Ok(match a.discovery {
        DiscoveryMode::Auto => (
            explicit.or_else(|| {
                a.kubernetes_service_host
                    .as_ref()
                    .filter(|h| !h.is_empty())
                    .map(|_| ApiServer::InCluster)
            }),
            a.discovery_file.clone(),
        ),
        DiscoveryMode::Kubernetes => (
            Some(explicit.unwrap_or(ApiServer::InCluster)),
            a.discovery_file.clone(),
        ),
        DiscoveryMode::File => match &a.discovery_file {
            Some(f) => (None, Some(f.clone())),
            None => return Err(ConfigError::DiscoveryFileMissing),
        },
        DiscoveryMode::None => (None, None),
    })
}

impl ProxyConfig {
    /// The DNS discovery settings.
    pub fn dns(&self) -> crate::discover::dns::DnsConfig {
        crate::discover::dns::DnsConfig {
            resolv_conf: self.dns_resolv_conf.clone(),
            nameserver: self.dns_nameserver,
            min_ttl: self.dns_min_ttl,
            max_ttl: self.dns_max_ttl,
        }
    }

    /// Whether `port` skips protocol detection (server-speaks-first).
    pub fn is_opaque_port(&self, port: u16) -> bool {
        crate::detect::DEFAULT_OPAQUE_PORTS.contains(&port)
            || self.opaque_ports.iter().any(|r| r.contains(port))
    }

    /// The defaults with every listener on `127.0.0.1:0` (tests and `tern demo`).
    pub fn loopback() -> Self {
        use clap::Parser;
        let any = "127.0.0.1:0";
        let cli = crate::cli::Cli::try_parse_from([
            "tern",
            "proxy",
            "--inbound-addr",
            any,
            "--outbound-addrs",
            any,
            "--admin-addr",
            any,
        ])
        .expect("the loopback arguments are valid");
        let crate::cli::Command::Proxy(args) = cli.command else {
            unreachable!("parsed a proxy command");
        };
        let mut c = ProxyConfig::from_args(&args).expect("the loopback defaults are valid");
        // Never the API server of a cluster the tests happen to run in.
        c.kubernetes = None;
        c
    }
}

/// The resource limits: every one bounded on both sides (0 or a huge value is not "unlimited").
fn check_limits(a: &ProxyArgs) -> Result<(), ConfigError> {
    fn count(
        flag: &'static str,
        env: &'static str,
        value: u64,
        min: u64,
        max: u64,
    ) -> Result<(), ConfigError> {
        if (min..=max).contains(&value) {
            return Ok(());
        }
        Err(ConfigError::OutOfRange {
            flag,
            env,
            value: value.to_string(),
            min: min.to_string(),
            max: max.to_string(),
        })
    }
    fn time(
        flag: &'static str,
        env: &'static str,
        value: Duration,
        max_secs: u64,
    ) -> Result<(), ConfigError> {
        if value >= Duration::from_secs(1) && value <= Duration::from_secs(max_secs) {
            return Ok(());
        }
        Err(ConfigError::OutOfRange {
            flag,
            env,
            value: humantime::format_duration(value).to_string(),
            min: "1s".into(),
            max: humantime::format_duration(Duration::from_secs(max_secs)).to_string(),
        })
    }
    const MIB: u64 = 1024 * 1024;
    count(
        "max-request-head-bytes",
        "TERN_MAX_REQUEST_HEAD_BYTES",
        a.max_request_head_bytes as u64,
        1024,
        MIB,
    )?;
    count(
        "max-request-headers",
        "TERN_MAX_REQUEST_HEADERS",
        a.max_request_headers as u64,
        1,
        1000,
    )?;
    count(
        "max-uri-length",
        "TERN_MAX_URI_LENGTH",
        a.max_uri_length as u64,
        64,
        MIB,
    )?;
    count(
        "h2-max-concurrent-streams",
        "TERN_H2_MAX_CONCURRENT_STREAMS",
        a.h2_max_concurrent_streams.into(),
        1,
        10_000,
    )?;
    count(
        "h2-max-header-list-size",
        "TERN_H2_MAX_HEADER_LIST_SIZE",
        a.h2_max_header_list_size.into(),
        1024,
        MIB,
    )?;
    count(
        "max-in-flight-requests",
        "TERN_MAX_IN_FLIGHT_REQUESTS",
        a.max_in_flight_requests as u64,
        1,
        1_000_000,
    )?;
    count(
        "listen-backlog",
        "TERN_LISTEN_BACKLOG",
        a.listen_backlog.into(),
        1,
        65_535,
    )?;
    time(
        "header-read-timeout",
        "TERN_HEADER_READ_TIMEOUT",
        a.header_read_timeout,
        300,
    )?;
    time(
        "h2-keep-alive-interval",
        "TERN_H2_KEEP_ALIVE_INTERVAL",
        a.h2_keep_alive_interval,
        3600,
    )?;
    time(
        "h2-keep-alive-timeout",
        "TERN_H2_KEEP_ALIVE_TIMEOUT",
        a.h2_keep_alive_timeout,
        3600,
    )?;
    time(
        "http-idle-timeout",
        "TERN_HTTP_IDLE_TIMEOUT",
        a.http_idle_timeout,
        86_400,
    )?;
    time(
        "request-body-idle-timeout",
        "TERN_REQUEST_BODY_IDLE_TIMEOUT",
        a.request_body_idle_timeout,
        86_400,
    )
}

/// Durations serialized as humantime strings (`"1s"`, `"30s"`) in `/config`.
mod humantime_serde_compat {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn option<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => serialize(d, s),
            None => s.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn parse(extra: &[&str]) -> Result<ProxyConfig, ConfigError> {
        let mut argv = vec!["tern", "proxy"];
        argv.extend_from_slice(extra);
        let cli = Cli::try_parse_from(argv).expect("clap parses");
        let Command::Proxy(args) = cli.command else {
            panic!("expected proxy");
        };
        ProxyConfig::from_args(&args)
    }

    #[test]
    fn defaults_are_valid() {
        let c = parse(&[]).expect("valid");
        assert_eq!(c.outbound_target, TargetMode::OrigDst);
        assert_eq!(c.buffer_size, 16 * 1024);
    }

    #[test]
    fn bad_values_name_their_flag() {
        let e = parse(&["--buffer-size", "10"]).expect_err("too small");
        assert!(e.to_string().contains("--buffer-size"));
        let e = parse(&["--workers", "0"]).expect_err("zero workers");
        assert!(e.to_string().contains("--workers"));
        let e = parse(&["--max-connections", "0"]).expect_err("zero means nothing, not unlimited");
        assert!(e.to_string().contains("--max-connections"));
        let e = parse(&["--connect-timeout", "0s"]).expect_err("zero timeout");
        assert!(e.to_string().contains("--connect-timeout"));
        let e = parse(&["--request-timeout", "0s"]).expect_err("zero timeout");
        assert!(e.to_string().contains("--request-timeout"));
        let c = parse(&["--request-timeout", "2s"]).expect("valid");
        assert_eq!(c.request_timeout, Some(Duration::from_secs(2)));
    }

    #[test]
    fn the_routes_file_flag_is_carried() {
        assert_eq!(parse(&[]).expect("valid").routes_file, None);
        let c = parse(&["--routes-file", "/etc/tern/routes.yaml"]).expect("valid");
        assert_eq!(
            c.routes_file.as_deref(),
            Some(std::path::Path::new("/etc/tern/routes.yaml"))
        );
    }

    #[test]
    fn limits_refuse_zero_and_unbounded_values() {
        for (flag, bad) in [
            ("--max-request-head-bytes", "0"),
            ("--max-request-headers", "0"),
            ("--max-uri-length", "0"),
            ("--h2-max-concurrent-streams", "0"),
            ("--h2-max-header-list-size", "0"),
            ("--h2-max-header-list-size", "4294967295"),
            ("--max-in-flight-requests", "0"),
            ("--listen-backlog", "0"),
            ("--header-read-timeout", "0s"),
            ("--h2-keep-alive-interval", "0s"),
            ("--h2-keep-alive-timeout", "0s"),
            ("--http-idle-timeout", "0s"),
            ("--request-body-idle-timeout", "0s"),
            ("--request-body-idle-timeout", "1000d"),
        ] {
            let e = parse(&[flag, bad]).expect_err(flag);
            let msg = e.to_string();
            assert!(msg.contains(flag), "{msg}");
            assert!(msg.contains("TERN_"), "{msg}");
        }
        let c = parse(&["--max-in-flight-requests", "7"]).expect("valid");
        assert_eq!(c.max_in_flight_requests, 7);
    }

    #[test]
    fn explicit_target_on_own_listener_is_a_loop() {
        let e = parse(&["--outbound-target", "127.0.0.1:4140"]).expect_err("loop");
        assert!(matches!(
            e,
            ConfigError::TargetIsSelf {
                flag: "outbound-target",
                ..
            }
        ));
        let e = parse(&["--inbound-target", "198.18.0.1:4143"]).expect_err("loop via [::]");
        assert!(matches!(
            e,
            ConfigError::TargetIsSelf {
                flag: "inbound-target",
                ..
            }
        ));
        let c = parse(&["--inbound-target", "127.0.0.1:8080"]).expect("valid");
        assert_eq!(
            c.inbound_target,
            TargetMode::Fixed("127.0.0.1:8080".parse().expect("addr"))
        );
    }

    #[test]
    fn config_serializes_for_admin() {
        let c = parse(&[]).expect("valid");
        let json = serde_json::to_value(&c).expect("json");
        assert_eq!(json["connect_timeout"], "1s");
        assert_eq!(
            json["request_timeout"],
            serde_json::Value::Null,
            "none by default"
        );
        assert_eq!(json["outbound_target"]["mode"], "orig_dst");
    }

    #[test]
    fn discovery_sources_follow_the_mode() {
        // `--kubernetes-service-host` stands in for the KUBERNETES_SERVICE_HOST a pod gets.
        let out = ["--kubernetes-service-host", ""];
        let inside = ["--kubernetes-service-host", "10.96.0.1"];
        let c = parse(&out).expect("valid");
        assert_eq!(c.kubernetes, None, "auto outside a cluster: off");
        let c = parse(&inside).expect("valid");
        assert_eq!(
            c.kubernetes,
            Some(ApiServer::InCluster),
            "auto in a cluster"
        );
        assert_eq!(c.discovery_timeout, Duration::from_secs(1));
        assert_eq!(c.discovery_idle_timeout, Duration::from_secs(300));
        assert_eq!(c.cluster_domain, "cluster.local");
        let c = parse(
            &[
                &inside[..],
                &["--discovery", "none", "--discovery-file", "d.yaml"],
            ]
            .concat(),
        )
        .expect("valid");
        assert_eq!(
            (c.kubernetes, c.discovery_file),
            (None, None),
            "none: nothing"
        );
        let c = parse(
            &[
                &inside[..],
                &["--discovery", "file", "--discovery-file", "d.yaml"],
            ]
            .concat(),
        )
        .expect("valid");
        assert_eq!(c.kubernetes, None, "file: the file only");
        assert_eq!(c.discovery_file, Some(PathBuf::from("d.yaml")));
        assert_eq!(
            parse(&["--discovery", "file"]).expect_err("no file"),
            ConfigError::DiscoveryFileMissing
        );
        let c = parse(
            &[
                &out[..],
                &[
                    "--discovery",
                    "kubernetes",
                    "--kube-api-url",
                    "http://127.0.0.1:8001",
                ],
            ]
            .concat(),
        )
        .expect("valid");
        assert_eq!(
            c.kubernetes,
            Some(ApiServer::Url(
                "http://127.0.0.1:8001".parse().expect("url")
            ))
        );
        let json = serde_json::to_value(&c).expect("json");
        assert_eq!(json["kubernetes"]["url"], "http://127.0.0.1:8001/");
        let c = parse(&[&out[..], &["--cluster-domain", "example.org."]].concat()).expect("valid");
        assert_eq!(c.cluster_domain, "example.org");
        let e = parse(&["--discovery-timeout", "0s"]).expect_err("zero");
        assert!(
            e.to_string()
                .contains("--discovery-timeout (TERN_DISCOVERY_TIMEOUT)"),
            "{e}"
        );
        let e = parse(&["--discovery-idle-timeout", "1ms"]).expect_err("too short");
        assert!(e.to_string().contains("--discovery-idle-timeout"), "{e}");
    }
}
