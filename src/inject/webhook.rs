//! `tern injector`: the mutating admission webhook.
//!
//! ```text
//! API server ──HTTPS (rustls, h2/h1)──▶ POST /inject ─▶ AdmissionReview v1
//!   ─▶ Namespace annotations (GET /api/v1/namespaces/{ns}, cached with a TTL)
//!   ─▶ inject_object (the same patch as `tern inject`) ─▶ base64 JSON Patch + warnings
//! ```
//!
//! The serving certificate and key are re-read every `--tls-reload-interval` and swapped in
//! when they change (new handshakes use the new pair; a bad pair keeps the old one). `/live`,
//! `/ready` and `/metrics` are served on the HTTPS port and on the plain `--admin-addr`.
//!
//! Namespace annotations come from [`super::namespaces`] (one `GET` over hyper + rustls, not
//! the `kube` crate: one request does not justify its client stack). The AdmissionReview types
//! are the few fields used, defined here (k8s-openapi has none).
//!
//! Metrics: `tern_injector_admissions_total{result="injected|skipped|error", reason}` plus
//! `tern_build_info` and `process_*`. Errors: [`InjectorError`] at start-up; a failing
//! admission is answered `allowed: true` without a patch (the pod starts unmeshed) and counted.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::net::TcpListener;

use super::namespaces::NamespaceCache;
use super::{Outcome, Sidecar, SkipReason, inject_object};
use crate::cli::InjectorArgs;

/// Largest AdmissionReview body accepted (the API server's own object limit is ~3 MiB).
const MAX_BODY: usize = 4 * 1024 * 1024;

/// Start-up errors of the injector.
#[derive(Debug, thiserror::Error)]
pub enum InjectorError {
    #[error("--tls-cert {path}: {problem}")]
    Cert { path: PathBuf, problem: String },
    #[error("--tls-key {path}: {problem}")]
    Key { path: PathBuf, problem: String },
    #[error("the serving certificate does not match its key: {0}")]
    Mismatch(rustls::Error),
    #[error("--kube-api-url {url}: {problem}")]
    KubeUrl { url: String, problem: String },
    #[error("--kube-ca-file {path}: {problem}")]
    KubeCa { path: PathBuf, problem: String },
}

/// Everything the injector needs, built from [`InjectorArgs`] (or by tests).
#[derive(Debug, Clone)]
pub struct InjectorConfig {
    pub sidecar: Sidecar,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub tls_reload_interval: Duration,
    pub kube_api_url: String,
    /// Bearer token file; a missing file means no `Authorization` header.
    pub kube_token_file: PathBuf,
    /// Only read for `https://` API URLs.
    pub kube_ca_file: PathBuf,
    pub namespace_cache_ttl: Duration,
}

impl InjectorConfig {
    pub fn from_args(args: &InjectorArgs) -> Self {
        InjectorConfig {
            sidecar: super::cli::sidecar_from_args(&args.sidecar, false),
            tls_cert: args.tls_cert.clone(),
            tls_key: args.tls_key.clone(),
            tls_reload_interval: args.tls_reload_interval,
            kube_api_url: args.kube_api_url.clone(),
            kube_token_file: args.kube_token_file.clone(),
            kube_ca_file: args.kube_ca_file.clone(),
            namespace_cache_ttl: args.namespace_cache_ttl,
        }
    }
}

/// Runs `tern injector` until the process is stopped.
pub fn main(args: &InjectorArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let injector = Injector::new(InjectorConfig::from_args(args))?;
        let tls = TcpListener::bind(args.listen_addr)
            .await
            .with_context(|| format!("binding --listen-addr {}", args.listen_addr))?;
        let admin = TcpListener::bind(args.admin_addr)
            .await
            .with_context(|| format!("binding --admin-addr {}", args.admin_addr))?;
        tracing::info!(addr = %args.listen_addr, admin = %args.admin_addr, "injector serving");
        injector.serve(tls, admin).await;
        Ok(())
    })
}

/// The webhook: TLS material, namespace cache, metrics.
#[derive(Clone)]
pub struct Injector {
    inner: Arc<Inner>,
}

struct Inner {
    config: InjectorConfig,
    certs: Arc<ReloadingCert>,
    namespaces: NamespaceCache,
    metrics: AdmissionMetrics,
    registry: Registry,
}

impl Injector {
    /// Loads the serving certificate and prepares the API client; fails on bad files or URLs.
    pub fn new(config: InjectorConfig) -> Result<Self, InjectorError> {
        let certs = Arc::new(ReloadingCert::load(&config.tls_cert, &config.tls_key)?);
        let namespaces = NamespaceCache::new(&config)?;
        let mut registry = Registry::default();
        crate::metrics::register_build_and_process(&mut registry);
        let metrics = AdmissionMetrics::register(&mut registry);
        Ok(Injector {
            inner: Arc::new(Inner {
                config,
                certs,
                namespaces,
                metrics,
                registry,
            }),
        })
    }

    /// Serves HTTPS on `tls` and plain HTTP on `admin`, forever.
    pub async fn serve(self, tls: TcpListener, admin: TcpListener) {
        // The API server's first admission call would otherwise wait for aws-lc's entropy.
        crate::tls::config::warm_up_random();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("the aws-lc-rs provider supports the default TLS versions")
            .with_no_client_auth()
            .with_cert_resolver(self.inner.certs.clone());
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let reload = {
            let certs = self.inner.certs.clone();
            let (cert, key) = (
                self.inner.config.tls_cert.clone(),
                self.inner.config.tls_key.clone(),
            );
            let every = self.inner.config.tls_reload_interval;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    certs.reload(&cert, &key);
                }
            })
        };
        let https = {
            let this = self.clone();
            async move {
                loop {
                    let (tcp, peer) = match tls.accept().await {
                        Ok(accepted) => accepted,
                        Err(e) => {
                            accept_failed(&e).await;
                            continue;
                        }
                    };
                    let (this, acceptor) = (this.clone(), acceptor.clone());
                    tokio::spawn(async move {
                        match acceptor.accept(tcp).await {
                            Ok(stream) => this.serve_conn(TokioIo::new(stream), true).await,
                            Err(e) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        }
                    });
                }
            }
        };
        let plain = async move {
            loop {
                let tcp = match admin.accept().await {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        accept_failed(&e).await;
                        continue;
                    }
                };
                let this = self.clone();
                tokio::spawn(async move { this.serve_conn(TokioIo::new(tcp), false).await });
            }
        };
        // Both loops run forever; cancelling either drops only its accept future.
        tokio::select! {
            () = https => {}
            () = plain => {}
        }
        reload.abort();
    }

    async fn serve_conn<IO>(&self, io: TokioIo<IO>, tls: bool)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let this = self.clone();
        let svc = service_fn(move |req| {
            let this = this.clone();
            async move { Ok::<_, Infallible>(this.route(req, tls).await) }
        });
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        if let Err(e) = builder.serve_connection(io, svc).await {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    }

    async fn route(&self, req: Request<Incoming>, tls: bool) -> Response<Full<Bytes>> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/live" | "/ready") => text(StatusCode::OK, "ok\n"),
            (&Method::GET, "/metrics") => {
                let mut rsp = text(
                    StatusCode::OK,
                    &crate::metrics::encode(&self.inner.registry),
                );
                rsp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                rsp
            }
            (&Method::POST, "/inject" | "/mutate") if tls => {
                let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(e) => return text(StatusCode::BAD_REQUEST, &format!("{e}\n")),
                };
                match self.review(&body).await {
                    Ok(json) => {
                        let mut rsp = Response::new(Full::new(Bytes::from(json)));
                        rsp.headers_mut().insert(
                            header::CONTENT_TYPE,
                            header::HeaderValue::from_static("application/json"),
                        );
                        rsp
                    }
                    Err(e) => {
                        self.inner
                            .metrics
                            .count(AdmissionResult::error, "bad_request");
                        text(StatusCode::BAD_REQUEST, &format!("{e}\n"))
                    }
                }
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    /// Answers one AdmissionReview (JSON in, JSON out).
    pub async fn review(&self, body: &[u8]) -> Result<Vec<u8>, serde_json::Error> {
        let review: AdmissionReview = serde_json::from_slice(body)?;
        let request = review.request.unwrap_or_default();
        let response = self.admit(request).await;
        serde_json::to_vec(&AdmissionReview {
            api_version: "admission.k8s.io/v1".into(),
            kind: "AdmissionReview".into(),
            request: None,
            response: Some(response),
        })
    }

    async fn admit(&self, request: AdmissionRequest) -> AdmissionResponse {
        let mut response = AdmissionResponse {
            uid: request.uid.clone(),
            allowed: true,
            ..Default::default()
        };
        let metrics = &self.inner.metrics;
        let (Some(mut object), "Pod", "CREATE") = (
            request.object,
            request.kind.kind.as_str(),
            request.operation.as_str(),
        ) else {
            metrics.count(AdmissionResult::skipped, "not_pod_create");
            return response;
        };
        if let Some(map) = object.as_object_mut() {
            map.entry("kind").or_insert_with(|| "Pod".into());
            map.entry("apiVersion").or_insert_with(|| "v1".into());
        }
        let pod_decides = object
            .pointer(&format!(
                "/metadata/annotations/{}",
                super::patch::INJECT_ANNOTATION.replace('/', "~1")
            ))
            .is_some();
        let mut lookup_failed = false;
        let ns_annotations = match (&request.namespace, pod_decides) {
            (Some(ns), false) => match self.inner.namespaces.annotations(ns).await {
                Ok(a) => a,
                Err(e) => {
                    lookup_failed = true;
                    response
                        .warnings
                        .push(format!("tern: could not read namespace {ns}: {e}"));
                    BTreeMap::new()
                }
            },
            _ => BTreeMap::new(),
        };
        match inject_object(&mut object, &ns_annotations, &self.inner.config.sidecar) {
            Ok(Some(injection)) => {
                for warning in injection.outcome.warnings() {
                    tracing::warn!(namespace = ?request.namespace, pod = %injection.name, "{warning}");
                    response.warnings.push(warning.to_string());
                }
                match injection.outcome {
                    Outcome::Injected { .. } => {
                        let json = serde_json::to_vec(&injection.patch)
                            .expect("a JSON Patch always serializes");
                        response.patch_type = Some("JSONPatch".into());
                        response.patch =
                            Some(base64::engine::general_purpose::STANDARD.encode(json));
                        metrics.count(AdmissionResult::injected, "injected");
                        tracing::info!(namespace = ?request.namespace, pod = %injection.name, "injected");
                    }
                    Outcome::Skipped {
                        reason: SkipReason::NotEnabled,
                        ..
                    } if lookup_failed => metrics.count(AdmissionResult::error, "namespace_lookup"),
                    Outcome::Skipped { reason, .. } => {
                        metrics.count(AdmissionResult::skipped, reason.as_str())
                    }
                }
            }
            Ok(None) => metrics.count(AdmissionResult::skipped, "not_pod_create"),
            Err(e) => {
                response.warnings.push(format!("tern: not injected: {e}"));
                metrics.count(AdmissionResult::error, "invalid_pod");
            }
        }
        response
    }
}

/// Backs off after a failed accept (e.g. out of file descriptors) instead of spinning.
async fn accept_failed(e: &std::io::Error) {
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from(body.to_string())));
    *rsp.status_mut() = status;
    rsp
}

// ---------------------------------------------------------------------------------------------
// AdmissionReview v1 (admission.k8s.io/v1): the fields the injector reads and writes.

/// `AdmissionReview`, request and response in one type as on the wire.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionReview {
    pub api_version: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<AdmissionRequest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<AdmissionResponse>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionRequest {
    pub uid: String,
    #[serde(default)]
    pub kind: GroupVersionKind,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub operation: String,
    #[serde(default)]
    pub object: Option<Value>,
    #[serde(default)]
    pub dry_run: Option<bool>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GroupVersionKind {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub kind: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionResponse {
    pub uid: String,
    pub allowed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_type: Option<String>,
    /// Base64 of the JSON Patch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// Metrics.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum AdmissionResult {
    injected,
    skipped,
    error,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AdmissionLabels {
    result: AdmissionResult,
    /// One of a fixed set of `&'static str`s: a skip reason, `injected`, or an error kind.
    reason: &'static str,
}

#[derive(Debug, Clone)]
struct AdmissionMetrics {
    admissions: Family<AdmissionLabels, Counter>,
}

impl AdmissionMetrics {
    fn register(root: &mut Registry) -> Self {
        let admissions = Family::default();
        root.sub_registry_with_prefix("tern_injector").register(
            "admissions",
            "AdmissionReviews answered, by result and reason",
            admissions.clone(),
        );
        AdmissionMetrics { admissions }
    }

    fn count(&self, result: AdmissionResult, reason: &'static str) {
        self.admissions
            .get_or_create(&AdmissionLabels { result, reason })
            .inc();
    }
}

// ---------------------------------------------------------------------------------------------
// The serving certificate, reloaded when its files change.

#[derive(Debug)]
struct ReloadingCert {
    current: RwLock<(Vec<u8>, Arc<CertifiedKey>)>,
}

impl ReloadingCert {
    fn load(cert: &PathBuf, key: &PathBuf) -> Result<Self, InjectorError> {
        let (bytes, ck) = read_pair(cert, key)?;
        Ok(ReloadingCert {
            current: RwLock::new((bytes, Arc::new(ck))),
        })
    }

    /// Swaps in the files' pair if their contents changed and they are valid.
    fn reload(&self, cert: &PathBuf, key: &PathBuf) {
        let (Ok(c), Ok(k)) = (std::fs::read(cert), std::fs::read(key)) else {
            tracing::warn!(cert = %cert.display(), "serving certificate unreadable; keeping the old one");
            return;
        };
        let fingerprint = [c, k].concat();
        if self
            .current
            .read()
            .map(|g| g.0 == fingerprint)
            .unwrap_or(false)
        {
            return;
        }
        match read_pair(cert, key) {
            Ok((bytes, ck)) => {
                if let Ok(mut g) = self.current.write() {
                    *g = (bytes, Arc::new(ck));
                    tracing::info!(cert = %cert.display(), "serving certificate reloaded");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "new serving certificate rejected; keeping the old one")
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|g| g.1.clone())
    }
}

fn read_pair(cert: &PathBuf, key: &PathBuf) -> Result<(Vec<u8>, CertifiedKey), InjectorError> {
    let cert_err = |problem: String| InjectorError::Cert {
        path: cert.clone(),
        problem,
    };
    let key_err = |problem: String| InjectorError::Key {
        path: key.clone(),
        problem,
    };
    let c = std::fs::read(cert).map_err(|e| cert_err(e.to_string()))?;
    let k = std::fs::read(key).map_err(|e| key_err(e.to_string()))?;
    let chain = CertificateDer::pem_slice_iter(&c)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_err("no CERTIFICATE in the file".into()));
    }
    let der = PrivateKeyDer::from_pem_slice(&k).map_err(|e| key_err(e.to_string()))?;
    let provider: CryptoProvider = rustls::crypto::aws_lc_rs::default_provider();
    let ck = CertifiedKey::from_der(chain, der, &provider).map_err(InjectorError::Mismatch)?;
    Ok(([c, k].concat(), ck))
}
