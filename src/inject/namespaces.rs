//! Namespace annotations for the injector, read from the API server and cached with a TTL.
//!
//! One `GET /api/v1/namespaces/{name}` per namespace and TTL, with the service account's
//! bearer token (re-read each time: projected tokens rotate) over hyper + rustls (aws-lc-rs).
//! `http://` URLs are accepted for tests. Owns no metrics (the webhook counts failures);
//! errors: [`LookupError`] per lookup, [`InjectorError`] for bad flags at start-up.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode, Uri, header};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

use super::webhook::{InjectorConfig, InjectorError};

/// Time allowed for one Namespace lookup; the webhook's own timeout is a few seconds.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a Namespace could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("connecting to the API server: {0}")]
    Connect(std::io::Error),
    #[error("TLS to the API server: {0}")]
    Tls(std::io::Error),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("the API server answered {0}")]
    Status(StatusCode),
    #[error("the Namespace does not parse: {0}")]
    Json(#[from] serde_json::Error),
    #[error("timed out")]
    Timeout,
    #[error("`{0}` is not a namespace name")]
    BadName(String),
}

pub struct NamespaceCache {
    api: ApiServer,
    ttl: Duration,
    entries: Mutex<HashMap<String, CacheEntry>>,
}

/// One Namespace's annotations and when they were read.
struct CacheEntry {
    fetched: Instant,
    annotations: BTreeMap<String, String>,
}

struct ApiServer {
    host: String,
    port: u16,
    /// `None` for `http://` (tests only).
    tls: Option<tokio_rustls::TlsConnector>,
    token_file: PathBuf,
}

impl NamespaceCache {
    pub fn new(config: &InjectorConfig) -> Result<Self, InjectorError> {
        let url_err = |problem: &str| InjectorError::KubeUrl {
            url: config.kube_api_url.clone(),
            problem: problem.into(),
        };
        let uri: Uri = config
            .kube_api_url
            .parse()
            .map_err(|_| url_err("not a URL"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(url_err("the scheme must be https (or http for tests)")),
        };
        let host = uri.host().ok_or_else(|| url_err("no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = if https {
            let ca_err = |problem: String| InjectorError::KubeCa {
                path: config.kube_ca_file.clone(),
                problem,
            };
            let pem = std::fs::read(&config.kube_ca_file).map_err(|e| ca_err(e.to_string()))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| ca_err(e.to_string()))?;
                roots.add(cert).map_err(|e| ca_err(e.to_string()))?;
            }
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let client = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("the aws-lc-rs provider supports the default TLS versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
            Some(tokio_rustls::TlsConnector::from(Arc::new(client)))
        } else {
            None
        };
        Ok(NamespaceCache {
            api: ApiServer {
                host,
                port,
                tls,
                token_file: config.kube_token_file.clone(),
            },
            ttl: config.namespace_cache_ttl,
            entries: Mutex::new(HashMap::new()),
        })
    }

    /// The Namespace's annotations, from the cache when fresh.
    pub async fn annotations(&self, ns: &str) -> Result<BTreeMap<String, String>, LookupError> {
        // Namespace names are DNS labels; anything else must not reach the URL path.
        if ns.is_empty()
            || !ns
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(LookupError::BadName(ns.to_string()));
        }
        if let Ok(entries) = self.entries.lock()
            && let Some(entry) = entries.get(ns)
            && entry.fetched.elapsed() < self.ttl
        {
            return Ok(entry.annotations.clone());
        }
        let annotations = tokio::time::timeout(LOOKUP_TIMEOUT, self.api.namespace_annotations(ns))
            .await
            .map_err(|_| LookupError::Timeout)??;
        if let Ok(mut entries) = self.entries.lock() {
            let entry = CacheEntry {
                fetched: Instant::now(),
                annotations: annotations.clone(),
            };
            entries.insert(ns.to_string(), entry);
        }
        Ok(annotations)
    }
}

impl ApiServer {
    async fn namespace_annotations(
        &self,
        ns: &str,
    ) -> Result<BTreeMap<String, String>, LookupError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(LookupError::Connect)?;
        let path = format!("/api/v1/namespaces/{ns}");
        let body = match &self.tls {
            Some(tls) => {
                let name = ServerName::try_from(self.host.clone())
                    .map_err(|e| LookupError::Tls(std::io::Error::other(e)))?;
                let stream = tls.connect(name, tcp).await.map_err(LookupError::Tls)?;
                self.get(TokioIo::new(stream), &path).await?
            }
            None => self.get(TokioIo::new(tcp), &path).await?,
        };
        let namespace: k8s_openapi::api::core::v1::Namespace = serde_json::from_slice(&body)?;
        Ok(namespace.metadata.annotations.unwrap_or_default())
    }

    async fn get<IO>(&self, io: TokioIo<IO>, path: &str) -> Result<Bytes, LookupError>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::get(path)
            .header(header::HOST, self.host.as_str())
            .header(header::ACCEPT, "application/json");
        // Re-read every time: projected service-account tokens rotate.
        if let Ok(token) = std::fs::read_to_string(&self.token_file) {
            req = req.header(header::AUTHORIZATION, format!("Bearer {}", token.trim()));
        }
        let req = req
            .body(http_body_util::Empty::<Bytes>::new())
            .expect("a GET with static headers is a valid request");
        let rsp = sender.send_request(req).await?;
        if rsp.status() != StatusCode::OK {
            return Err(LookupError::Status(rsp.status()));
        }
        Ok(rsp.into_body().collect().await?.to_bytes())
    }
}
