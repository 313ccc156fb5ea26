//! The clap tree: every subcommand, every flag, each with a `TERN_*` environment fallback.
//!
//! `tern <command> --help` is the reference for operators; the doc comments below are that text.
//! Parsing produces plain typed structs; cross-field checks live in [`crate::config`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

use crate::addr::PortRange;
use crate::http::HeaderCase;
use crate::inbound::policy::{DefaultPolicy, PortRule};

/// tern: a sidecar micro-proxy for Kubernetes service meshes.
#[derive(Debug, Parser)]
#[command(name = "tern", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the sidecar proxy: inbound, outbound and admin listeners.
    Proxy(Box<ProxyArgs>),
    /// Install the pod's iptables rules that redirect its TCP traffic through the proxy.
    Init(InitArgs),
    /// Run a small mesh on loopback (no root, no iptables) and show what the proxies see.
    Demo(DemoArgs),
    /// Inject the tern sidecar into Kubernetes YAML (files or stdin) and write it to stdout.
    Inject(InjectArgs),
    /// Run the mutating admission webhook that injects the tern sidecar into new pods.
    Injector(Box<InjectorArgs>),
}

/// Logging, shared by every subcommand.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log filter in tracing's `EnvFilter` syntax, e.g. `info` or `tern=debug,info`.
    #[arg(long = "log", env = "TERN_LOG", default_value = "info", global = true)]
    pub filter: String,

    /// Log line format.
    #[arg(
        long = "log-format",
        env = "TERN_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Plain,
        global = true
    )]
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Flags of `tern proxy`.
#[derive(Debug, Clone, Args)]
pub struct ProxyArgs {
    /// Addresses of the outbound listener, where iptables redirects the app's outbound TCP.
    /// Comma-separated; an IPv6 address that cannot be bound (IPv6 disabled) is skipped with a warning.
    #[arg(
        long,
        env = "TERN_OUTBOUND_ADDRS",
        value_delimiter = ',',
        default_value = "127.0.0.1:4140,[::1]:4140"
    )]
    pub outbound_addrs: Vec<SocketAddr>,

    /// Address of the inbound listener, where iptables redirects the pod's inbound TCP.
    /// `[::]` falls back to `0.0.0.0` where IPv6 is disabled.
    #[arg(long, env = "TERN_INBOUND_ADDR", default_value = "[::]:4143")]
    pub inbound_addr: SocketAddr,

    /// Address of the admin server (/live, /ready, /metrics, /config, /shutdown).
    /// `[::]` falls back to `0.0.0.0` where IPv6 is disabled.
    #[arg(long, env = "TERN_ADMIN_ADDR", default_value = "[::]:4191")]
    pub admin_addr: SocketAddr,

    /// Explicit mode, outbound: forward every connection accepted by the outbound listener to this
    /// address instead of its iptables original destination. For running without iptables
    /// (`tern demo`, VMs, a laptop).
    #[arg(long, env = "TERN_OUTBOUND_TARGET")]
    pub outbound_target: Option<SocketAddr>,

    /// Explicit mode, inbound: forward every connection accepted by the inbound listener to this
    /// address (the app) instead of its iptables original destination.
    #[arg(long, env = "TERN_INBOUND_TARGET")]
    pub inbound_target: Option<SocketAddr>,

    /// Time allowed to establish a TCP connection to a destination.
    #[arg(long, env = "TERN_CONNECT_TIMEOUT", value_parser = humantime::parse_duration, default_value = "1s")]
    pub connect_timeout: Duration,

    /// Default timeout for a whole HTTP request to a discovery service (until its response
    /// headers, retries included); a service's `timeout` in the discovery file overrides it.
    /// None by default. A timed-out request gets 504 (gRPC: DEADLINE_EXCEEDED).
    #[arg(long, env = "TERN_REQUEST_TIMEOUT", value_parser = humantime::parse_duration)]
    pub request_timeout: Option<Duration>,

    /// Size of each per-direction copy buffer of an opaque TCP connection, in bytes (1024..=1048576).
    /// A slow reader stops the copy once this buffer is full: memory per connection stays bounded.
    #[arg(long, env = "TERN_BUFFER_SIZE", default_value_t = 16 * 1024)]
    pub buffer_size: usize,

    /// Maximum concurrent connections per listener; further connections are accepted and closed
    /// at once (counted with reason `limit`).
    #[arg(long, env = "TERN_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,

    /// After SIGTERM, how long listeners keep accepting before they close (lets endpoint removal
    /// propagate through the cluster). `/ready` reports 503 during this time.
    #[arg(long, env = "TERN_SHUTDOWN_ACCEPT_DELAY", value_parser = humantime::parse_duration, default_value = "0s")]
    pub shutdown_accept_delay: Duration,

    /// After SIGTERM, how long open connections may take to finish before the proxy exits anyway.
    #[arg(long, env = "TERN_SHUTDOWN_GRACE_PERIOD", value_parser = humantime::parse_duration, default_value = "30s")]
    pub shutdown_grace_period: Duration,

    /// Serve `POST /shutdown` on the admin port (loopback clients only) to start a graceful shutdown.
    #[arg(long, env = "TERN_ENABLE_SHUTDOWN_ENDPOINT")]
    pub enable_shutdown_endpoint: bool,

    /// Directory holding this proxy's identity: `tls.crt` (leaf + chain), `tls.key`, `ca.crt`
    /// (trust bundle), as cert-manager's csi-driver-spiffe writes them. Without it the proxy
    /// speaks no mTLS: outbound traffic goes out in plaintext and mesh connections are refused.
    #[arg(long, env = "TERN_IDENTITY_DIR")]
    pub identity_dir: Option<PathBuf>,

    /// How often the identity files are checked for changes (rotation).
    #[arg(long, env = "TERN_IDENTITY_RELOAD_INTERVAL", value_parser = humantime::parse_duration, default_value = "5s")]
    pub identity_reload_interval: Duration,

    /// YAML file of services → endpoints (+ identities), hot-reloaded; see README "Discovery file".
    #[arg(long, env = "TERN_DISCOVERY_FILE")]
    pub discovery_file: Option<PathBuf>,

    /// How often the discovery file is checked for changes.
    #[arg(long, env = "TERN_DISCOVERY_RELOAD_INTERVAL", value_parser = humantime::parse_duration, default_value = "2s")]
    pub discovery_reload_interval: Duration,

    /// YAML file of Gateway API HTTPRoute/GRPCRoute objects whose parentRefs are Services
    /// (multi-document), hot-reloaded every `--discovery-reload-interval`; see README "Routes".
    /// Backends are resolved through the discovery file's services.
    #[arg(long, env = "TERN_ROUTES_FILE")]
    pub routes_file: Option<PathBuf>,

    /// Networks whose unknown destinations are probed for a tern proxy on port 4143 (comma-separated
    /// CIDRs). Destinations elsewhere go out in plaintext at once, never waiting on a probe.
    #[arg(
        long,
        env = "TERN_CLUSTER_NETWORKS",
        value_delimiter = ',',
        default_value = "10.0.0.0/8,100.64.0.0/10,172.16.0.0/12,192.168.0.0/16,fd00::/8"
    )]
    pub cluster_networks: Vec<IpNet>,

    /// Networks never probed even inside --cluster-networks: the cluster's Service (ClusterIP)
    /// ranges, whose VIPs have no mesh port (kube-proxy sends VIP traffic on to a pod, where it
    /// arrives as app traffic). Comma-separated CIDRs.
    #[arg(long, env = "TERN_SERVICE_NETWORKS", value_delimiter = ',')]
    pub service_networks: Vec<IpNet>,

    /// Connect timeout when probing a destination's mesh port.
    #[arg(long, env = "TERN_PROBE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "300ms")]
    pub probe_timeout: Duration,

    /// How long a destination whose mesh port did not answer is remembered as not meshed.
    #[arg(long, env = "TERN_PROBE_NEGATIVE_TTL", value_parser = humantime::parse_duration, default_value = "10s")]
    pub probe_negative_ttl: Duration,

    /// Refuse outbound connections to destinations that are not meshed (no plaintext at all).
    #[arg(long, env = "TERN_REQUIRE_MTLS")]
    pub require_mtls: bool,

    /// Inbound policy for ports without an `--inbound-policy` rule.
    #[arg(long, env = "TERN_DEFAULT_INBOUND_POLICY", value_enum, default_value_t = DefaultPolicy::AllUnauthenticated)]
    pub default_inbound_policy: DefaultPolicy,

    /// Per-port inbound rules, `PORTS=RULE`, comma-separated or repeated. RULE is `unauthenticated`,
    /// `authenticated`, `deny`, or `;`-separated SPIFFE IDs / namespace patterns
    /// (`8080=spiffe://cluster.local/ns/shop/sa/web;spiffe://cluster.local/ns/ops/*`).
    #[arg(long, env = "TERN_INBOUND_POLICY", value_delimiter = ',')]
    pub inbound_policy: Vec<PortRule>,

    /// How long to wait for a connection's first bytes before treating it as opaque TCP.
    #[arg(long, env = "TERN_DETECT_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub detect_timeout: Duration,

    /// Ports served as opaque TCP without protocol detection, in addition to the built-in
    /// server-speaks-first list (25, 587, 3306, 4444, 5432, 6379, 9300, 11211). Ports or ranges.
    #[arg(long, env = "TERN_OPAQUE_PORTS", value_delimiter = ',')]
    pub opaque_ports: Vec<PortRange>,

    /// This pod's name (downward API), for logs and /config.
    #[arg(long, env = "TERN_POD_NAME")]
    pub pod_name: Option<String>,

    /// This pod's namespace (downward API); the identity is checked against it at start-up, and
    /// Kubernetes discovery resolves a bare Service name (`web`) in it (default: the service
    /// account's namespace).
    #[arg(long, env = "TERN_POD_NAMESPACE")]
    pub pod_namespace: Option<String>,

    /// This pod's service account (downward API); the identity is checked against it at start-up.
    #[arg(long, env = "TERN_SERVICE_ACCOUNT")]
    pub service_account: Option<String>,

    /// Data-path worker threads. 1 (the default) runs a single-threaded runtime: a sidecar usually
    /// gets one core, and one thread avoids cross-thread hand-offs. The admin server always has
    /// its own thread.
    #[arg(long, env = "TERN_WORKERS", default_value_t = 1)]
    pub workers: usize,

    /// resolv.conf for DNS discovery (discovery-file services with `dns:`): nameservers,
    /// `search`, `ndots`, timeouts.
    #[arg(long, env = "TERN_DNS_RESOLV_CONF", default_value = "/etc/resolv.conf")]
    pub dns_resolv_conf: PathBuf,

    /// DNS discovery: ask this nameserver (`ip:port`) instead of the resolv.conf ones (its
    /// `search` and `ndots` still apply).
    #[arg(long, env = "TERN_DNS_NAMESERVER")]
    pub dns_nameserver: Option<SocketAddr>,

    /// DNS discovery: a name is resolved again at the earliest this long after its last answer,
    /// whatever its TTL (and this long after a failed lookup).
    #[arg(long, env = "TERN_DNS_MIN_TTL", value_parser = humantime::parse_duration, default_value = "5s")]
    pub dns_min_ttl: Duration,

    /// DNS discovery: a name is resolved again at the latest this long after its last answer,
    /// whatever its TTL.
    #[arg(long, env = "TERN_DNS_MAX_TTL", value_parser = humantime::parse_duration, default_value = "5m")]
    pub dns_max_ttl: Duration,

    /// Largest HTTP/1 request head (request line and headers), in bytes; beyond it the request
    /// gets 431 and the connection closes (1024..=1048576).
    #[arg(long, env = "TERN_MAX_REQUEST_HEAD_BYTES", default_value_t = 64 * 1024)]
    pub max_request_head_bytes: usize,

    /// Most header lines in an HTTP/1 request; beyond it the request gets 431 (1..=1000).
    #[arg(long, env = "TERN_MAX_REQUEST_HEADERS", default_value_t = 100)]
    pub max_request_headers: usize,

    /// Longest request target (path and query, or the whole URI), in bytes; a longer one gets
    /// 414 (64..=1048576).
    #[arg(long, env = "TERN_MAX_URI_LENGTH", default_value_t = 8 * 1024)]
    pub max_uri_length: usize,

    /// A request head must arrive within this long after the connection starts waiting for it
    /// (slowloris); an idle HTTP/1 keep-alive connection is closed after it too (1s..=300s).
    #[arg(long, env = "TERN_HEADER_READ_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub header_read_timeout: Duration,

    /// Concurrent HTTP/2 streams an app connection may open; more are refused with
    /// REFUSED_STREAM (1..=10000).
    #[arg(long, env = "TERN_H2_MAX_CONCURRENT_STREAMS", default_value_t = 100)]
    pub h2_max_concurrent_streams: u32,

    /// Largest HTTP/2 header list (SETTINGS_MAX_HEADER_LIST_SIZE, decoded size) an app
    /// connection may send, in bytes (1024..=1048576).
    #[arg(long, env = "TERN_H2_MAX_HEADER_LIST_SIZE", default_value_t = 64 * 1024)]
    pub h2_max_header_list_size: u32,

    /// How often an HTTP/2 app connection is PINGed to check the peer is alive (1s..=3600s).
    #[arg(long, env = "TERN_H2_KEEP_ALIVE_INTERVAL", value_parser = humantime::parse_duration, default_value = "20s")]
    pub h2_keep_alive_interval: Duration,

    /// How long a keep-alive PING may go unanswered before the connection is closed (1s..=3600s).
    #[arg(long, env = "TERN_H2_KEEP_ALIVE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "20s")]
    pub h2_keep_alive_timeout: Duration,

    /// An HTTP/2 app connection with no open stream for this long is closed with GOAWAY
    /// (1s..=86400s). HTTP/1 keep-alive connections are bounded by --header-read-timeout.
    #[arg(long, env = "TERN_HTTP_IDLE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "60s")]
    pub http_idle_timeout: Duration,

    /// A request body that stops arriving for this long is ended: the upstream sees an aborted
    /// request (never a truncated success) and the client 408 or a reset. Long enough for idle
    /// gRPC bidirectional streams, as Envoy's stream idle timeout (1s..=86400s).
    #[arg(long, env = "TERN_REQUEST_BODY_IDLE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "5m")]
    pub request_body_idle_timeout: Duration,

    /// Most HTTP requests in flight per direction (inbound, outbound); beyond it requests are
    /// shed at once with 503 and `tern-proxy-error: overloaded` (gRPC UNAVAILABLE), before they
    /// hold memory (1..=1000000).
    #[arg(long, env = "TERN_MAX_IN_FLIGHT_REQUESTS", default_value_t = 5_000)]
    pub max_in_flight_requests: usize,

    /// Pending (not yet accepted) connections the kernel queues per listener (listen backlog;
    /// the kernel caps it at net.core.somaxconn) (1..=65535).
    #[arg(long, env = "TERN_LISTEN_BACKLOG", default_value_t = 1024)]
    pub listen_backlog: u32,

    /// How HTTP/1 header names are written on the way out. `preserve`: as the sender wrote them
    /// (between the HTTP/1 app and the HTTP/1 peer on the other side of this proxy). `lowercase`:
    /// as HTTP/2, Envoy and HAProxy write them, for ~16% fewer instructions per plain HTTP/1
    /// hop. Requests that cross the mesh travel as HTTP/2: their names arrive lowercase either way.
    #[arg(long, env = "TERN_HTTP1_HEADER_CASE", value_enum, default_value_t = HeaderCase::Preserve)]
    pub http1_header_case: HeaderCase,
    /// Discovery sources. `auto`: Kubernetes when running in a cluster (KUBERNETES_SERVICE_HOST
    /// is set) or when --kube-api-url is given, plus the discovery file when --discovery-file is
    /// given. `kubernetes`: Kubernetes (in-cluster, or --kube-api-url), plus the file when given.
    /// `file`: the discovery file only. `none`: no discovery (every destination is unknown).
    #[arg(long, env = "TERN_DISCOVERY", value_enum, default_value_t = DiscoveryMode::Auto)]
    pub discovery: DiscoveryMode,

    /// The cluster's DNS domain: authorities `name.namespace.svc.<domain>` name Services.
    #[arg(long, env = "TERN_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,

    /// Kubernetes discovery: the watches of a destination (its EndpointSlices and Pods) stop
    /// after it has been unused this long.
    #[arg(long, env = "TERN_DISCOVERY_IDLE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "5m")]
    pub discovery_idle_timeout: Duration,

    /// Kubernetes discovery: how long the first connection to a destination may wait for its
    /// first list from the API server; after that it is forwarded as unknown (to the original
    /// address, where kube-proxy balances it).
    #[arg(long, env = "TERN_DISCOVERY_TIMEOUT", value_parser = humantime::parse_duration, default_value = "1s")]
    pub discovery_timeout: Duration,

    /// Kubernetes discovery: talk to the API server at this URL without authentication instead
    /// of the in-cluster service account (outside a cluster: `kubectl proxy`, then
    /// `--kube-api-url http://127.0.0.1:8001`).
    #[arg(long, env = "TERN_KUBE_API_URL")]
    pub kube_api_url: Option<http::Uri>,

    /// Set by Kubernetes in every pod; `--discovery auto` turns Kubernetes discovery on when present.
    #[arg(long, env = "KUBERNETES_SERVICE_HOST", hide = true)]
    pub kubernetes_service_host: Option<String>,
}

/// Which discovery sources `tern proxy` uses (`--discovery`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiscoveryMode {
    /// Kubernetes when in a cluster, plus the file when given.
    Auto,
    /// Kubernetes (required), plus the file when given.
    Kubernetes,
    /// The discovery file only.
    File,
    /// No discovery.
    None,
}

/// Flags of `tern init`.
#[derive(Debug, Clone, Args)]
pub struct InitArgs {
    /// UID the proxy runs as; its own traffic is never redirected.
    #[arg(long, env = "TERN_PROXY_UID", default_value_t = 2102)]
    pub proxy_uid: u32,

    /// Port of the proxy's inbound listener.
    #[arg(long, env = "TERN_INBOUND_PORT", default_value_t = 4143)]
    pub inbound_port: u16,

    /// Port of the proxy's outbound listener.
    #[arg(long, env = "TERN_OUTBOUND_PORT", default_value_t = 4140)]
    pub outbound_port: u16,

    /// Port of the proxy's admin server; never redirected.
    #[arg(long, env = "TERN_ADMIN_PORT", default_value_t = 4191)]
    pub admin_port: u16,

    /// Inbound ports not redirected to the proxy (comma-separated ports or ranges, e.g. `22,9000-9100`).
    #[arg(long, env = "TERN_SKIP_INBOUND_PORTS", value_delimiter = ',')]
    pub skip_inbound_ports: Vec<PortRange>,

    /// Outbound destination ports not redirected to the proxy (ports or ranges).
    #[arg(long, env = "TERN_SKIP_OUTBOUND_PORTS", value_delimiter = ',')]
    pub skip_outbound_ports: Vec<PortRange>,

    /// Outbound destination networks not redirected to the proxy (CIDRs, IPv4 or IPv6).
    #[arg(long, env = "TERN_SKIP_SUBNETS", value_delimiter = ',')]
    pub skip_subnets: Vec<IpNet>,

    /// Which IP families get rules.
    #[arg(long, env = "TERN_IP_FAMILIES", value_enum, default_value_t = IpFamilies::Dual)]
    pub ip_families: IpFamilies,

    /// iptables backend; `auto` uses nft when the kernel and binaries support it, else legacy.
    #[arg(long, env = "TERN_IPTABLES_BACKEND", value_enum, default_value_t = Backend::Auto)]
    pub backend: Backend,

    /// Print the rules that would be applied (iptables-restore input) and change nothing.
    #[arg(long, env = "TERN_DRY_RUN")]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IpFamilies {
    /// IPv4 and IPv6 (IPv6 is skipped with a warning where the kernel has it disabled).
    Dual,
    /// IPv4 only.
    V4,
    /// IPv6 only.
    V6,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// Detect: nft when it works here, else legacy.
    Auto,
    /// `iptables-nft-restore` / `ip6tables-nft-restore`.
    Nft,
    /// `iptables-legacy-restore` / `ip6tables-legacy-restore`.
    Legacy,
}

/// Flags of `tern demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// How long to push traffic through the mesh.
    #[arg(long, env = "TERN_DEMO_DURATION", value_parser = humantime::parse_duration, default_value = "3s")]
    pub duration: Duration,

    /// Concurrent client connections.
    #[arg(long, env = "TERN_DEMO_CONNECTIONS", default_value_t = 4)]
    pub connections: usize,
}

/// What the injected sidecar looks like; shared by `tern inject` and `tern injector`.
#[derive(Debug, Clone, Args)]
pub struct SidecarArgs {
    /// Image of the `tern-init` and `tern-proxy` containers.
    #[arg(long = "proxy-image", env = "TERN_PROXY_IMAGE", default_value = concat!("ghcr.io/tern-mesh/tern:", env!("CARGO_PKG_VERSION")))]
    pub image: String,

    /// `imagePullPolicy` of the injected containers (Always, IfNotPresent, Never); unset leaves
    /// Kubernetes' default.
    #[arg(long = "proxy-image-pull-policy", env = "TERN_PROXY_IMAGE_PULL_POLICY", value_parser = ["Always", "IfNotPresent", "Never"])]
    pub image_pull_policy: Option<String>,

    /// Run the proxy as a native sidecar (an init container with `restartPolicy: Always`,
    /// Kubernetes >= 1.29); `false` makes it the first regular container. A pod's
    /// `config.tern.io/native-sidecar` annotation overrides this.
    #[arg(long, env = "TERN_NATIVE_SIDECAR", action = clap::ArgAction::Set, default_value_t = true)]
    pub native_sidecar: bool,

    /// UID and GID of the proxy; `tern init` exempts this UID's traffic from redirection.
    #[arg(long = "proxy-uid", env = "TERN_PROXY_UID", default_value_t = 2102)]
    pub proxy_uid: i64,
}

/// Flags of `tern inject`.
#[derive(Debug, Clone, Args)]
pub struct InjectArgs {
    /// YAML files to read (multi-document streams and `List` objects are fine); `-` or none
    /// reads stdin.
    #[arg(env = "TERN_INJECT_FILES", value_delimiter = ',')]
    pub files: Vec<std::path::PathBuf>,

    /// Inject every workload not annotated `tern.io/inject: disabled`, not only those whose pod
    /// template or Namespace (in the same input) is annotated `tern.io/inject: enabled`.
    #[arg(long, env = "TERN_INJECT_ALL")]
    pub all: bool,

    #[command(flatten)]
    pub sidecar: SidecarArgs,
}

/// Flags of `tern injector`.
#[derive(Debug, Clone, Args)]
pub struct InjectorArgs {
    /// HTTPS address of the webhook (`POST /inject`, plus `/live`, `/ready`, `/metrics`).
    #[arg(long, env = "TERN_INJECTOR_ADDR", default_value = "[::]:8443")]
    pub listen_addr: SocketAddr,

    /// Plain-HTTP address for probes and Prometheus (`/live`, `/ready`, `/metrics`).
    #[arg(long, env = "TERN_INJECTOR_ADMIN_ADDR", default_value = "[::]:9090")]
    pub admin_addr: SocketAddr,

    /// PEM certificate chain the webhook serves (reloaded when it changes).
    #[arg(
        long,
        env = "TERN_INJECTOR_TLS_CERT",
        default_value = "/var/run/tern/injector-tls/tls.crt"
    )]
    pub tls_cert: std::path::PathBuf,

    /// PEM private key of the serving certificate (reloaded when it changes).
    #[arg(
        long,
        env = "TERN_INJECTOR_TLS_KEY",
        default_value = "/var/run/tern/injector-tls/tls.key"
    )]
    pub tls_key: std::path::PathBuf,

    /// How often the certificate and key files are checked for changes.
    #[arg(long, env = "TERN_INJECTOR_TLS_RELOAD_INTERVAL", value_parser = humantime::parse_duration, default_value = "10s")]
    pub tls_reload_interval: Duration,

    /// Kubernetes API server URL, for reading Namespace annotations (`http://` only for tests).
    #[arg(
        long,
        env = "TERN_KUBE_API_URL",
        default_value = "https://kubernetes.default.svc"
    )]
    pub kube_api_url: String,

    /// Bearer token file for the API server (re-read on every request: tokens rotate).
    #[arg(
        long,
        env = "TERN_KUBE_TOKEN_FILE",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    pub kube_token_file: std::path::PathBuf,

    /// CA bundle that signs the API server's certificate.
    #[arg(
        long,
        env = "TERN_KUBE_CA_FILE",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    )]
    pub kube_ca_file: std::path::PathBuf,

    /// How long a Namespace's annotations are cached.
    #[arg(long, env = "TERN_NAMESPACE_CACHE_TTL", value_parser = humantime::parse_duration, default_value = "30s")]
    pub namespace_cache_ttl: Duration,

    #[command(flatten)]
    pub sidecar: SidecarArgs,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_defaults_match_design_ports() {
        let cli = Cli::try_parse_from(["tern", "proxy"]).expect("defaults parse");
        let Command::Proxy(args) = cli.command else {
            panic!("expected proxy");
        };
        assert_eq!(args.inbound_addr.port(), 4143);
        assert_eq!(args.admin_addr.port(), 4191);
        assert_eq!(args.outbound_addrs.len(), 2);
        assert!(
            args.outbound_addrs
                .iter()
                .all(|a| a.port() == 4140 && a.ip().is_loopback())
        );
        assert_eq!(args.connect_timeout, Duration::from_secs(1));
        assert_eq!(args.shutdown_grace_period, Duration::from_secs(30));
        assert!(!args.enable_shutdown_endpoint);
    }

    #[test]
    fn bad_duration_names_the_flag() {
        let err = Cli::try_parse_from(["tern", "proxy", "--connect-timeout", "soon"])
            .expect_err("must fail");
        assert!(err.to_string().contains("--connect-timeout"), "{err}");
    }

    #[test]
    fn init_parses_ports_and_subnets() {
        let cli = Cli::try_parse_from([
            "tern",
            "init",
            "--skip-inbound-ports",
            "22,9000-9100",
            "--skip-subnets",
            "198.18.0.0/15,2001:db8::/32",
        ])
        .expect("parses");
        let Command::Init(args) = cli.command else {
            panic!("expected init");
        };
        assert_eq!(args.skip_inbound_ports.len(), 2);
        assert_eq!(args.skip_subnets.len(), 2);
    }

    #[test]
    fn init_rejects_bad_port_and_cidr() {
        let err = Cli::try_parse_from(["tern", "init", "--skip-inbound-ports", "70000"])
            .expect_err("port out of range");
        assert!(err.to_string().contains("--skip-inbound-ports"), "{err}");
        let err = Cli::try_parse_from(["tern", "init", "--skip-subnets", "10.0.0/8"])
            .expect_err("bad cidr");
        assert!(err.to_string().contains("--skip-subnets"), "{err}");
    }
}

#[cfg(test)]
mod inject_tests {
    use super::*;

    #[test]
    fn inject_and_injector_parse() {
        let cli = Cli::try_parse_from([
            "tern",
            "inject",
            "a.yaml",
            "--all",
            "--native-sidecar",
            "false",
        ])
        .expect("parses");
        let Command::Inject(args) = cli.command else {
            panic!("expected inject");
        };
        assert!(args.all && !args.sidecar.native_sidecar);
        assert_eq!(args.sidecar.proxy_uid, 2102);
        let cli = Cli::try_parse_from(["tern", "injector", "--kube-api-url", "http://127.0.0.1:1"])
            .expect("parses");
        let Command::Injector(args) = cli.command else {
            panic!("expected injector");
        };
        assert_eq!(args.listen_addr.port(), 8443);
        assert!(args.sidecar.native_sidecar);
        let err = Cli::try_parse_from(["tern", "injector", "--namespace-cache-ttl", "soon"])
            .expect_err("bad duration");
        assert!(err.to_string().contains("--namespace-cache-ttl"), "{err}");
    }
}
