//! Kubernetes integration tests: `tern inject` over every workload kind, `tern injector` over
//! real TLS with real AdmissionReview JSON (checked against the CLI's output), and every
//! manifest in `deploy/` plus every `tern inject` output validated against the Kubernetes
//! OpenAPI schemas with `kubernetes-validate` (PyPI). Tools that are missing make a test say
//! so loudly and return, except under `CI=true`, where they fail it.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls_pki_types::CertificateDer;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use tern::inject::webhook::{Injector, InjectorConfig};
use tern::inject::{Sidecar, template_path};

const K8S_VERSION: &str = "1.33.0";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// True when `tool` runs; otherwise a loud skip (or a failure under CI=true).
fn have(tool: &str, args: &[&str]) -> bool {
    let ok = Command::new(tool)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(!ci(), "CI=true but `{tool}` is missing");
        eprintln!("\n!!! SKIPPED: `{tool}` is not installed; this test did not run !!!\n");
    }
    ok
}

fn yaml_docs(text: &str) -> Vec<Value> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text).expect("valid YAML");
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

/// Splits `List`s into their items (kubernetes-validate has no schema for `v1/List`).
fn flatten(docs: Vec<Value>) -> Vec<Value> {
    let mut out = Vec::new();
    for doc in docs {
        if doc["kind"].as_str().is_some_and(|k| k.ends_with("List")) {
            out.extend(flatten(
                doc["items"].as_array().cloned().unwrap_or_default(),
            ));
        } else {
            out.push(doc);
        }
    }
    out
}

/// Custom resources whose schemas kubernetes-validate does not ship: it can only warn that it
/// found no schema. They are listed here on purpose; any other missing schema fails the test.
const CRD_KINDS: &[&str] = &[
    "cert-manager.io/v1/Certificate",
    "cert-manager.io/v1/Issuer",
    "cert-manager.io/v1/ClusterIssuer",
    "policy.cert-manager.io/v1alpha1/CertificateRequestPolicy",
    "monitoring.coreos.com/v1/PodMonitor",
];

/// Validates documents with `kubernetes-validate --strict`; returns how many were checked
/// against a schema. Custom resources in [`CRD_KINDS`] get a structural check here instead.
fn validate(label: &str, docs: &[Value]) -> usize {
    let mut checked = 0;
    let mut text = String::new();
    for doc in docs {
        let api = doc["apiVersion"].as_str().unwrap_or_default();
        let kind = doc["kind"].as_str().unwrap_or_default();
        assert!(
            !api.is_empty() && !kind.is_empty(),
            "{label}: document without apiVersion/kind: {doc}"
        );
        assert!(
            doc.pointer("/metadata/name")
                .or_else(|| doc.pointer("/metadata/generateName"))
                .and_then(Value::as_str)
                .is_some(),
            "{label}: {kind} without a name"
        );
        if CRD_KINDS.contains(&format!("{api}/{kind}").as_str()) {
            assert!(doc["spec"].is_object(), "{label}: {kind} without a spec");
            continue;
        }
        checked += 1;
        // The validator needs a name; the API server would derive it from generateName.
        let mut doc = doc.clone();
        if doc.pointer("/metadata/name").is_none() {
            let generated = format!(
                "{}x1",
                doc["metadata"]["generateName"].as_str().unwrap_or_default()
            );
            doc["metadata"]["name"] = Value::from(generated);
        }
        text.push_str("---\n");
        text.push_str(&serde_json::to_string(&doc).expect("serializes"));
        text.push('\n');
    }
    let mut child = Command::new("kubernetes-validate")
        .args(["-k", K8S_VERSION, "--strict", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubernetes-validate runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("writes");
    let out = child.wait_with_output().expect("finishes");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let passed = report.matches("INFO").count();
    assert!(
        out.status.success() && !report.contains("ERROR") && !report.contains("WARN"),
        "{label}: schema validation failed:\n{report}"
    );
    assert_eq!(
        passed, checked,
        "{label}: not every document was validated:\n{report}"
    );
    checked
}

fn run_tern(args: &[&str], stdin: &str) -> (String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tern runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("writes");
    let out = child.wait_with_output().expect("tern finishes");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "tern {args:?} failed: {stderr}");
    (String::from_utf8(out.stdout).expect("utf-8"), stderr)
}

fn workloads_input() -> String {
    std::fs::read_to_string(root().join("tests/golden/inject/workloads.yaml")).expect("input")
}

// ---------------------------------------------------------------------------------------------
// tern inject

#[test]
fn inject_cli_handles_every_workload_kind() {
    let input = workloads_input();
    let (out, stderr) = run_tern(&["inject", "-"], &input);

    let golden = root().join("tests/golden/inject/workloads.golden.yaml");
    if std::env::var_os("TERN_BLESS").is_some() {
        std::fs::write(&golden, &out).expect("blesses");
    }
    assert!(
        std::fs::read_to_string(&golden).unwrap_or_default() == out,
        "output differs from {} (TERN_BLESS=1 to accept)",
        golden.display()
    );
    let mut summary: Vec<&str> = stderr.lines().collect();
    summary.sort();
    assert_eq!(
        summary,
        [
            "injected cronjob/report",
            "injected daemonset/agent",
            "injected deployment/opted-in",
            "injected deployment/web",
            "injected job/migrate",
            "injected pod/debug",
            "injected replicaset/legacy-rs",
            "injected replicationcontroller/old-web",
            "injected statefulset/db",
            "skipped deployment/bystander: not_enabled",
            "skipped deployment/opted-out: disabled",
            "warning deployment/opted-in: tern: ignoring annotation config.tern.io/skip-outbound-ports=\"99999\": `99999` is not a port number between 1 and 65535; using the default",
        ]
    );

    let before = flatten(yaml_docs(&input));
    let after = flatten(yaml_docs(&out));
    assert_eq!(before.len(), after.len());
    for (b, a) in before.iter().zip(&after) {
        let kind = b["kind"].as_str().unwrap_or_default();
        let injected = stderr.contains(&format!(
            "injected {}/{}",
            kind.to_lowercase(),
            b["metadata"]["name"].as_str().unwrap_or_default()
        ));
        if !injected {
            assert_eq!(a, b, "{kind} must pass through unchanged");
            continue;
        }
        // Only the pod template changed, and it has the proxy.
        let mut pointer = String::new();
        for key in template_path(kind).expect("workload") {
            pointer.push('/');
            pointer.push_str(key);
        }
        let mut a_rest = a.clone();
        let mut b_rest = b.clone();
        let t = a_rest.pointer_mut(&pointer).expect("template").take();
        b_rest.pointer_mut(&pointer).expect("template").take();
        assert_eq!(
            a_rest, b_rest,
            "{kind}: fields outside the template changed"
        );
        let names: Vec<&str> = t["spec"]["initContainers"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(t["spec"]["containers"].as_array().into_iter().flatten())
            .filter_map(|c| c["name"].as_str())
            .collect();
        assert!(
            names.contains(&"tern-proxy") && names.contains(&"tern-init"),
            "{kind}: {names:?}"
        );
    }

    // Injection is idempotent: the output goes through unchanged.
    let (again, stderr2) = run_tern(&["inject"], &out);
    assert_eq!(again, out);
    assert!(!stderr2.contains("injected "), "{stderr2}");

    if have("kubernetes-validate", &["--version"]) {
        validate("tern inject input", &flatten(yaml_docs(&input)));
        let n = validate("tern inject output", &after);
        assert_eq!(n, after.len());
    }
}

#[test]
fn inject_cli_all_flag_and_golden_pods_validate() {
    // --all injects the bystander too; every golden pod output is a valid Pod.
    let (out, stderr) = run_tern(&["inject", "--all"], &workloads_input());
    assert!(stderr.contains("injected deployment/bystander"), "{stderr}");
    assert!(
        stderr.contains("skipped deployment/opted-out: disabled"),
        "{stderr}"
    );
    if !have("kubernetes-validate", &["--version"]) {
        return;
    }
    validate("tern inject --all output", &flatten(yaml_docs(&out)));
    let mut pods = Vec::new();
    for entry in std::fs::read_dir(root().join("tests/golden/inject/pods")).expect("dir") {
        let path = entry.expect("entry").path();
        if path.to_string_lossy().ends_with(".golden.yaml") {
            let golden: Value =
                serde_saphyr::from_str(&std::fs::read_to_string(&path).expect("readable"))
                    .expect("parses");
            pods.push(golden["pod"].clone());
        }
    }
    assert!(pods.len() >= 9);
    validate("golden pods", &pods);
}

// ---------------------------------------------------------------------------------------------
// deploy/

fn kustomize(dir: &str) -> Vec<Value> {
    let out = Command::new("kubectl")
        .args(["kustomize", &root().join(dir).to_string_lossy()])
        .output()
        .expect("kubectl runs");
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    yaml_docs(&String::from_utf8(out.stdout).expect("utf-8"))
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
}

#[test]
fn deploy_manifests_validate() {
    // Every .yaml file under deploy/ that is not a kustomization is validated as it is.
    let mut files = Vec::new();
    yaml_files(&root().join("deploy"), &mut files);
    files.sort();
    let mut manifests = Vec::new();
    for file in &files {
        let docs = yaml_docs(&std::fs::read_to_string(file).expect("readable"));
        if file.file_name().is_some_and(|n| n == "kustomization.yaml") {
            // Every resource it lists exists.
            for r in docs[0]["resources"].as_array().expect("resources") {
                let r = r.as_str().expect("path");
                assert!(
                    file.parent().expect("dir").join(r).exists(),
                    "{}: missing {r}",
                    file.display()
                );
            }
            continue;
        }
        manifests.extend(docs);
    }
    assert!(manifests.len() >= 20, "only {} manifests", manifests.len());
    let kinds: Vec<&str> = manifests
        .iter()
        .filter_map(|d| d["kind"].as_str())
        .collect();
    for needed in [
        "Namespace",
        "Deployment",
        "Service",
        "ServiceAccount",
        "ClusterRole",
        "MutatingWebhookConfiguration",
        "Certificate",
        "Issuer",
        "ClusterIssuer",
        "CertificateRequestPolicy",
        "PodMonitor",
    ] {
        assert!(kinds.contains(&needed), "deploy/ has no {needed}");
    }
    // The proxies' discovery role: read-only, and covering what Kubernetes discovery watches.
    let discovery = manifests
        .iter()
        .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "tern-proxy-discovery")
        .expect("the proxies' discovery ClusterRole");
    let mut granted = Vec::new();
    for rule in discovery["rules"].as_array().expect("rules") {
        for verb in rule["verbs"].as_array().expect("verbs") {
            assert!(
                ["get", "list", "watch"].contains(&verb.as_str().unwrap_or("")),
                "discovery RBAC must be read-only: {rule}"
            );
        }
        for r in rule["resources"].as_array().expect("resources") {
            granted.push(r.as_str().unwrap_or("").to_string());
        }
    }
    for needed in [
        "services",
        "endpointslices",
        "pods",
        "httproutes",
        "grpcroutes",
    ] {
        assert!(
            granted.iter().any(|g| g == needed),
            "discovery RBAC lacks {needed}"
        );
    }
    let webhook = manifests
        .iter()
        .find(|d| d["kind"] == "MutatingWebhookConfiguration")
        .expect("webhook");
    let hook = &webhook["webhooks"][0];
    assert_eq!(hook["failurePolicy"], "Ignore");
    assert_eq!(hook["sideEffects"], "None");
    assert_eq!(hook["reinvocationPolicy"], "IfNeeded");
    assert_eq!(
        webhook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        "tern-system/tern-injector-serving"
    );
    let excluded = hook["namespaceSelector"]["matchExpressions"][0]["values"].to_string();
    assert!(excluded.contains("kube-system") && excluded.contains("tern-system"));
    let example_ns = manifests
        .iter()
        .find(|d| d["kind"] == "Namespace" && d["metadata"]["name"] == "tern-example")
        .expect("example namespace");
    assert_eq!(
        example_ns["metadata"]["annotations"]["tern.io/inject"],
        "enabled"
    );

    if !have("kubernetes-validate", &["--version"]) {
        return;
    }
    validate("deploy/*.yaml", &manifests);
    if have("kubectl", &["version", "--client"]) {
        // What `kubectl apply -k` would send, including the image replacement.
        let rendered = kustomize("deploy");
        let deployment = rendered
            .iter()
            .find(|d| d["kind"] == "Deployment")
            .expect("injector");
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        let proxy_image = container["env"]
            .as_array()
            .expect("env")
            .iter()
            .find(|e| e["name"] == "TERN_PROXY_IMAGE")
            .expect("TERN_PROXY_IMAGE");
        assert_eq!(proxy_image["value"], container["image"]);
        // Changing the image in kustomization.yaml changes what the injector injects too.
        let copy = tempfile::tempdir().expect("tempdir");
        for entry in std::fs::read_dir(root().join("deploy")).expect("deploy/") {
            let path = entry.expect("entry").path();
            if path.is_file() {
                let text = std::fs::read_to_string(&path).expect("readable");
                let text = text.replace("newTag: 0.1.0", "newTag: 9.9.9-test");
                std::fs::write(copy.path().join(path.file_name().expect("name")), text)
                    .expect("writes");
            }
        }
        let out = Command::new("kubectl")
            .args(["kustomize", &copy.path().to_string_lossy()])
            .output()
            .expect("kubectl runs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            text.matches("ghcr.io/tern-mesh/tern:9.9.9-test").count(),
            2,
            "image and TERN_PROXY_IMAGE: {text}"
        );
        validate("kubectl kustomize deploy", &rendered);
        validate(
            "kubectl kustomize deploy/monitoring",
            &kustomize("deploy/monitoring"),
        );
        // The example app, as the injector would mesh it.
        let example = kustomize("deploy/example");
        validate("kubectl kustomize deploy/example", &example);
        let text: String = example
            .iter()
            .map(|d| format!("---\n{}\n", serde_json::to_string(d).expect("json")))
            .collect();
        let (out, stderr) = run_tern(&["inject"], &text);
        assert_eq!(
            stderr.matches("injected deployment/").count(),
            4,
            "{stderr}"
        );
        validate("tern inject deploy/example", &yaml_docs(&out));
    }
}

#[test]
fn prometheus_scrape_config_matches_podmonitor() {
    let config: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(root().join("deploy/monitoring/prometheus-scrape-config.yml"))
            .expect("readable"),
    )
    .expect("parses");
    let jobs = config["scrape_configs"].as_array().expect("scrape_configs");
    let proxies = jobs
        .iter()
        .find(|j| j["job_name"] == "tern-proxies")
        .expect("proxies job");
    assert_eq!(proxies["kubernetes_sd_configs"][0]["role"], "pod");
    let keeps: Vec<&Value> = proxies["relabel_configs"]
        .as_array()
        .expect("relabel")
        .iter()
        .filter(|r| r["action"] == "keep")
        .collect();
    assert!(keeps.iter().any(|r| {
        r["source_labels"][0] == "__meta_kubernetes_pod_container_port_name"
            && r["regex"] == tern::inject::patch::ADMIN_PORT_NAME
    }));
    let podmonitor = yaml_docs(
        &std::fs::read_to_string(root().join("deploy/monitoring/podmonitor.yaml"))
            .expect("readable"),
    );
    assert_eq!(
        podmonitor[0]["spec"]["podMetricsEndpoints"][0]["port"],
        tern::inject::patch::ADMIN_PORT_NAME
    );
    assert_eq!(
        podmonitor[0]["spec"]["selector"]["matchExpressions"][0]["key"],
        tern::inject::patch::PROXY_LABEL
    );
}

#[test]
fn dockerfile_is_multistage_locked_and_non_root() {
    // No Docker engine here: check the parts that matter, instruction by instruction.
    let text = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile");
    let joined = text.replace("\\\n", " ");
    let instructions: Vec<(String, String)> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (i, rest) = l.split_once(' ').unwrap_or((l, ""));
            (i.to_uppercase(), rest.trim().to_string())
        })
        .collect();
    let froms: Vec<&str> = instructions
        .iter()
        .filter(|(i, _)| i == "FROM")
        .map(|(_, r)| r.as_str())
        .collect();
    // The build stage's Rust is the one the function-order file was generated with.
    let order = std::fs::read_to_string(root().join("benches/harness/tern.order")).expect("order");
    let made_with = order
        .lines()
        .next()
        .and_then(|l| l.split("rustc ").nth(1))
        .and_then(|v| {
            v.split('.')
                .take(2)
                .collect::<Vec<_>>()
                .get(..2)
                .map(|p| p.join("."))
        })
        .expect("tern.order's first line names the rustc that generated it");
    assert_eq!(
        froms,
        [
            format!("rust:{made_with}-bookworm AS build").as_str(),
            "debian:bookworm-slim AS runtime"
        ]
    );
    let runtime_start = instructions
        .iter()
        .rposition(|(i, _)| i == "FROM")
        .expect("runtime stage");
    let runtime = &instructions[runtime_start..];
    let build = &instructions[..runtime_start];
    assert!(
        build
            .iter()
            .any(|(i, r)| i == "RUN" && r.contains("cargo build --release --locked")),
        "the build must be --locked"
    );
    assert!(
        runtime
            .iter()
            .any(|(i, r)| i == "USER" && r.starts_with("2102"))
    );
    assert!(
        runtime
            .iter()
            .any(|(i, r)| i == "ENTRYPOINT" && r.contains("/usr/local/bin/tern"))
    );
    assert!(
        runtime
            .iter()
            .any(|(i, r)| i == "COPY" && r.starts_with("--from=build"))
    );
    let installs: Vec<&str> = runtime
        .iter()
        .filter(|(i, r)| i == "RUN" && r.contains("apt-get install"))
        .map(|(_, r)| r.as_str())
        .collect();
    assert_eq!(installs.len(), 1);
    let packages: Vec<&str> = installs[0]
        .split("apt-get install")
        .nth(1)
        .expect("packages")
        .split("&&")
        .next()
        .expect("packages")
        .split_whitespace()
        .filter(|w| !w.starts_with('-'))
        .collect();
    assert_eq!(packages, ["iptables"], "only iptables is added");
    for label in ["title", "version", "source", "description"] {
        assert!(
            text.contains(&format!("org.opencontainers.image.{label}=")),
            "label {label}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// tern injector over TLS

struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn mint(ca_name: &str) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, ca_name);
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("CA");
    let key = KeyPair::generate().expect("key");
    let params = CertificateParams::new(vec![
        "tern-injector.tern-system.svc".to_string(),
        "localhost".to_string(),
    ])
    .expect("params");
    let cert = params.signed_by(&key, &ca).expect("serving cert");
    Pki {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// A stand-in for the API server's `GET /api/v1/namespaces/{name}`, over plain HTTP on
/// loopback. Requires the bearer token; counts requests per namespace.
struct FakeApi {
    url: String,
    hits: Arc<Mutex<HashMap<String, usize>>>,
}

async fn fake_api(namespaces: BTreeMap<&'static str, Value>) -> FakeApi {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let hits = Arc::new(Mutex::new(HashMap::new()));
    let namespaces = Arc::new(namespaces);
    let counter = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (namespaces, counter) = (namespaces.clone(), counter.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (namespaces, counter) = (namespaces.clone(), counter.clone());
                    async move {
                        let name = req
                            .uri()
                            .path()
                            .strip_prefix("/api/v1/namespaces/")
                            .unwrap_or_default()
                            .to_string();
                        *counter
                            .lock()
                            .expect("lock")
                            .entry(name.clone())
                            .or_insert(0) += 1;
                        let authorized = req
                            .headers()
                            .get(http::header::AUTHORIZATION)
                            .is_some_and(|v| v == "Bearer test-token");
                        let (status, body) = match namespaces.get(name.as_str()) {
                            _ if !authorized => (StatusCode::UNAUTHORIZED, json!({})),
                            Some(annotations) => (
                                StatusCode::OK,
                                json!({"apiVersion": "v1", "kind": "Namespace",
                                       "metadata": {"name": name, "annotations": annotations}}),
                            ),
                            None => (StatusCode::NOT_FOUND, json!({"kind": "Status"})),
                        };
                        let mut rsp = Response::new(Full::new(Bytes::from(body.to_string())));
                        *rsp.status_mut() = status;
                        Ok::<_, Infallible>(rsp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    FakeApi { url, hits }
}

struct RunningInjector {
    https: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    dir: tempfile::TempDir,
}

async fn start_injector(pki: &Pki, api: &FakeApi, reload: Duration) -> RunningInjector {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("tls.crt"), &pki.cert_pem).expect("writes");
    std::fs::write(dir.path().join("tls.key"), &pki.key_pem).expect("writes");
    std::fs::write(dir.path().join("token"), "test-token\n").expect("writes");
    let config = InjectorConfig {
        sidecar: Sidecar::default(),
        tls_cert: dir.path().join("tls.crt"),
        tls_key: dir.path().join("tls.key"),
        tls_reload_interval: reload,
        kube_api_url: api.url.clone(),
        kube_token_file: dir.path().join("token"),
        kube_ca_file: dir.path().join("unused-for-http"),
        namespace_cache_ttl: Duration::from_secs(600),
    };
    let injector = Injector::new(config).expect("injector starts");
    let tls = TcpListener::bind("127.0.0.1:0").await.expect("binds");
    let admin = TcpListener::bind("127.0.0.1:0").await.expect("binds");
    let running = RunningInjector {
        https: tls.local_addr().expect("addr"),
        admin: admin.local_addr().expect("addr"),
        dir,
    };
    tokio::spawn(injector.serve(tls, admin));
    running
}

/// A TLS client trusting only `ca_pem`; returns the response and the server's leaf cert.
async fn https_post(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    path: &str,
    body: Vec<u8>,
) -> Result<(StatusCode, Bytes, CertificateDer<'static>), String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        <CertificateDer as rustls_pki_types::pem::PemObject>::pem_slice_iter(ca_pem.as_bytes())
    {
        roots.add(cert.expect("pem")).expect("root");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name =
        rustls_pki_types::ServerName::try_from("tern-injector.tern-system.svc").expect("name");
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let leaf = tls.get_ref().1.peer_certificates().expect("peer certs")[0].clone();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::post(path)
        .header(http::header::HOST, "tern-injector.tern-system.svc")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    let rsp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = rsp.status();
    let body = rsp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body, leaf))
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (StatusCode, String) {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(http::header::HOST, "localhost")
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("request");
    let rsp = sender.send_request(req).await.expect("response");
    let status = rsp.status();
    let body = rsp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).to_string())
}

fn review(uid: &str, namespace: &str, operation: &str, kind: &str, object: &Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": kind},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": object,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    }))
    .expect("serializes")
}

/// The pod the API server would send for a workload's template: the template's metadata and
/// spec, with a generated name and the namespace.
fn pod_from_template(doc: &Value) -> Option<(String, Value)> {
    let kind = doc["kind"].as_str()?;
    let path = template_path(kind)?;
    let namespace = doc["metadata"]["namespace"].as_str()?.to_string();
    let mut template = doc.clone();
    for key in path {
        template = template[*key].clone();
    }
    let mut pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": template["metadata"], "spec": template["spec"]});
    if kind != "Pod" {
        pod["metadata"]["generateName"] = json!(format!("{}-", doc["metadata"]["name"].as_str()?));
        pod["metadata"]["namespace"] = json!(namespace);
    }
    Some((namespace, pod))
}

#[tokio::test]
async fn webhook_over_tls_matches_cli() {
    let api = fake_api(BTreeMap::from([
        ("shop", json!({"tern.io/inject": "enabled"})),
        ("other", json!({})),
    ]))
    .await;
    let pki = mint("test injector CA");
    let injector = start_injector(&pki, &api, Duration::from_secs(3600)).await;

    let input = workloads_input();
    let (cli_out, _) = run_tern(&["inject"], &input);
    let before = flatten(yaml_docs(&input));
    let after = flatten(yaml_docs(&cli_out));
    let mut injected = 0;
    let mut compared = 0;
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        let Some((namespace, pod)) = pod_from_template(b) else {
            continue;
        };
        let (_, expected) = pod_from_template(a).expect("same kind");
        let uid = format!("uid-{i}");
        let (status, body, _) = https_post(
            injector.https,
            &pki.ca_pem,
            "/inject",
            review(&uid, &namespace, "CREATE", "Pod", &pod),
        )
        .await
        .expect("webhook answers over TLS");
        assert_eq!(status, StatusCode::OK);
        let answer: Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(answer["kind"], "AdmissionReview");
        let response = &answer["response"];
        assert_eq!(response["uid"], uid.as_str());
        assert_eq!(response["allowed"], true);
        let mut patched = pod.clone();
        if let Some(patch) = response["patch"].as_str() {
            assert_eq!(response["patchType"], "JSONPatch");
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(patch)
                .expect("base64");
            let patch: json_patch::Patch = serde_json::from_slice(&bytes).expect("a JSON Patch");
            json_patch::patch(&mut patched, &patch).expect("the patch applies");
            injected += 1;
        }
        assert_eq!(
            patched, expected,
            "webhook and CLI disagree on {} {}",
            b["kind"], b["metadata"]["name"]
        );
        compared += 1;
        if b["metadata"]["name"] == "opted-in" {
            let warnings = response["warnings"].to_string();
            assert!(
                warnings.contains("config.tern.io/skip-outbound-ports"),
                "{warnings}"
            );
        }
    }
    assert_eq!(compared, 11);
    assert_eq!(injected, 9);

    // Namespace lookups are cached: many pods in `shop`, one GET.
    assert_eq!(api.hits.lock().expect("lock").get("shop"), Some(&1));

    // Not a Pod CREATE: allowed, untouched.
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {"containers": [{"name": "a", "image": "b"}]}});
    let (_, body, _) = https_post(
        injector.https,
        &pki.ca_pem,
        "/inject",
        review("u-update", "shop", "UPDATE", "Pod", &pod),
    )
    .await
    .expect("answers");
    let answer: Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none());

    // A namespace the API server does not know: allowed, unpatched, a warning, counted as error.
    let (_, body, _) = https_post(
        injector.https,
        &pki.ca_pem,
        "/inject",
        review("u-missing", "ghost", "CREATE", "Pod", &pod),
    )
    .await
    .expect("answers");
    let answer: Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none());
    assert!(answer["response"]["warnings"].to_string().contains("ghost"));

    // Garbage in: 400, and the connection stays usable for the API server's retries.
    let (status, _, _) = https_post(injector.https, &pki.ca_pem, "/inject", b"{".to_vec())
        .await
        .expect("answers");
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Metrics and probes on the plain admin port.
    let (status, _) = http_get(injector.admin, "/ready").await;
    assert_eq!(status, StatusCode::OK);
    let (status, metrics) = http_get(injector.admin, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    for line in [
        r#"tern_injector_admissions_total{result="injected",reason="injected"} 9"#,
        r#"tern_injector_admissions_total{result="skipped",reason="not_enabled"} 1"#,
        r#"tern_injector_admissions_total{result="skipped",reason="disabled"} 1"#,
        r#"tern_injector_admissions_total{result="skipped",reason="not_pod_create"} 1"#,
        r#"tern_injector_admissions_total{result="error",reason="namespace_lookup"} 1"#,
        r#"tern_injector_admissions_total{result="error",reason="bad_request"} 1"#,
    ] {
        assert!(metrics.contains(line), "missing `{line}` in:\n{metrics}");
    }
    // The webhook path is not served in plain HTTP.
    let (status, _) = http_get(injector.admin, "/inject").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn webhook_reloads_its_certificate() {
    let api = fake_api(BTreeMap::new()).await;
    let first = mint("first CA");
    let injector = start_injector(&first, &api, Duration::from_millis(50)).await;
    let body = review(
        "u",
        "none",
        "DELETE",
        "Pod",
        &json!({"metadata": {"name": "x"}}),
    );
    let (_, _, leaf) = https_post(injector.https, &first.ca_pem, "/inject", body.clone())
        .await
        .expect("first certificate serves");
    let first_leaf = leaf.to_vec();

    // cert-manager rotates the pair (here: under a new CA, so the old CA must stop working).
    let second = mint("second CA");
    std::fs::write(injector.dir.path().join("tls.key"), &second.key_pem).expect("writes");
    std::fs::write(injector.dir.path().join("tls.crt"), &second.cert_pem).expect("writes");
    let mut rotated = false;
    for _ in 0..200 {
        if let Ok((_, _, leaf)) =
            https_post(injector.https, &second.ca_pem, "/inject", body.clone()).await
        {
            assert_ne!(leaf.to_vec(), first_leaf);
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(rotated, "the new certificate was never served");
    assert!(
        https_post(injector.https, &first.ca_pem, "/inject", body.clone())
            .await
            .is_err(),
        "the old CA still verifies"
    );

    // A broken file is ignored: the current pair keeps serving.
    std::fs::write(injector.dir.path().join("tls.crt"), "not a certificate").expect("writes");
    let hits = AtomicUsize::new(0);
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(25)).await;
        if https_post(injector.https, &second.ca_pem, "/inject", body.clone())
            .await
            .is_ok()
        {
            hits.fetch_add(1, Ordering::Relaxed);
        }
    }
    assert_eq!(hits.load(Ordering::Relaxed), 10);
}

#[tokio::test]
async fn webhook_serves_http2_over_alpn() {
    // The API server's webhook client negotiates h2 when offered.
    let api = fake_api(BTreeMap::from([(
        "shop",
        json!({"tern.io/inject": "enabled"}),
    )]))
    .await;
    let pki = mint("h2 CA");
    let injector = start_injector(&pki, &api, Duration::from_secs(3600)).await;
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        <CertificateDer as rustls_pki_types::pem::PemObject>::pem_slice_iter(pki.ca_pem.as_bytes())
    {
        roots.add(cert.expect("pem")).expect("root");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(injector.https)
        .await
        .expect("connects");
    let name =
        rustls_pki_types::ServerName::try_from("tern-injector.tern-system.svc").expect("name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS 1.3 handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    let pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "h2", "namespace": "shop"},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]}});
    let req = Request::post("https://tern-injector.tern-system.svc/inject")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(review(
            "h2-uid", "shop", "CREATE", "Pod", &pod,
        ))))
        .expect("request");
    let rsp = sender.send_request(req).await.expect("h2 response");
    assert_eq!(rsp.status(), StatusCode::OK);
    assert_eq!(rsp.version(), http::Version::HTTP_2);
    let body = rsp.into_body().collect().await.expect("body").to_bytes();
    let answer: Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(answer["response"]["uid"], "h2-uid");
    assert_eq!(answer["response"]["patchType"], "JSONPatch");
}
