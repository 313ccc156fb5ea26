//! `tern inject`: Kubernetes YAML in (files or stdin), injected YAML out (stdout), a summary of
//! what was injected and skipped (and every rejected annotation) on stderr.
//!
//! Multi-document streams and `List`-style objects (`kind: List`, `DeploymentList`, ...) are
//! walked; Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob and
//! ReplicationController get [`super::patch`]ed; every other document passes through with its
//! data unchanged (comments and formatting are not kept). A Namespace in the same input that is
//! annotated `tern.io/inject: enabled` opts in the workloads of that namespace.
//! Owns no metrics; errors are [`InjectCliError`].

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{Injection, Outcome, Selection, Sidecar, WorkloadError, inject_object};
use crate::cli::{InjectArgs, SidecarArgs};

/// Why `tern inject` failed.
#[derive(Debug, thiserror::Error)]
pub enum InjectCliError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid YAML: {source}")]
    Yaml {
        path: PathBuf,
        source: Box<serde_saphyr::Error>,
    },
    #[error("{path}: {source}")]
    Workload {
        path: PathBuf,
        source: WorkloadError,
    },
    #[error("writing YAML: {0}")]
    Write(String),
}

/// Runs `tern inject`.
pub fn main(args: &InjectArgs) -> anyhow::Result<()> {
    let sidecar = sidecar_from_args(&args.sidecar, args.all);
    let mut inputs = Vec::new();
    let files: Vec<PathBuf> = if args.files.is_empty() {
        vec![PathBuf::from("-")]
    } else {
        args.files.clone()
    };
    for path in files {
        let mut text = String::new();
        let read = if path == Path::new("-") {
            std::io::stdin().read_to_string(&mut text)
        } else {
            std::fs::File::open(&path).and_then(|mut f| f.read_to_string(&mut text))
        };
        read.map_err(|source| InjectCliError::Read {
            path: path.clone(),
            source,
        })?;
        inputs.push((path, text));
    }
    let report = inject_yaml(&inputs, &sidecar)?;
    std::io::stdout().write_all(report.yaml.as_bytes())?;
    let mut stderr = std::io::stderr().lock();
    for line in &report.summary {
        writeln!(stderr, "{line}")?;
    }
    Ok(())
}

/// The injector settings the flags describe.
pub fn sidecar_from_args(args: &SidecarArgs, all: bool) -> Sidecar {
    Sidecar {
        image: args.image.clone(),
        image_pull_policy: args.image_pull_policy.clone(),
        selection: if all {
            Selection::All
        } else {
            Selection::Annotated
        },
        native_sidecar: args.native_sidecar,
        proxy_uid: args.proxy_uid,
    }
}

/// What [`inject_yaml`] produced.
#[derive(Debug)]
pub struct Report {
    /// The output stream, documents separated by `---`.
    pub yaml: String,
    /// One line per workload (injected or skipped, with the reason) and per warning.
    pub summary: Vec<String>,
    pub injections: Vec<Injection>,
}

/// Injects every workload in the given `(name, YAML text)` inputs.
pub fn inject_yaml(
    inputs: &[(PathBuf, String)],
    sidecar: &Sidecar,
) -> Result<Report, InjectCliError> {
    let mut docs: Vec<(PathBuf, Value)> = Vec::new();
    for (path, text) in inputs {
        let values: Vec<Value> =
            serde_saphyr::from_multiple(text).map_err(|source| InjectCliError::Yaml {
                path: path.clone(),
                source: Box::new(source),
            })?;
        docs.extend(
            values
                .into_iter()
                .filter(|v| !v.is_null())
                .map(|v| (path.clone(), v)),
        );
    }
    let mut namespaces: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (_, doc) in &docs {
        collect_namespaces(doc, &mut namespaces);
    }
    let mut injections = Vec::new();
    for (path, doc) in &mut docs {
        walk(doc, &namespaces, sidecar, &mut injections).map_err(|source| {
            InjectCliError::Workload {
                path: path.clone(),
                source,
            }
        })?;
    }
    let mut yaml = String::new();
    for (i, (_, doc)) in docs.iter().enumerate() {
        if i > 0 {
            yaml.push_str("---\n");
        }
        let text =
            serde_saphyr::to_string(doc).map_err(|e| InjectCliError::Write(e.to_string()))?;
        yaml.push_str(&text);
        if !text.ends_with('\n') {
            yaml.push('\n');
        }
    }
    let summary = summarize(&injections);
    Ok(Report {
        yaml,
        summary,
        injections,
    })
}

fn summarize(injections: &[Injection]) -> Vec<String> {
    let mut lines = Vec::new();
    for inj in injections {
        let what = format!("{}/{}", inj.kind.to_lowercase(), inj.name);
        match &inj.outcome {
            Outcome::Injected { .. } => lines.push(format!("injected {what}")),
            Outcome::Skipped { reason, .. } => {
                lines.push(format!("skipped {what}: {}", reason.as_str()))
            }
        }
        lines.extend(
            inj.outcome
                .warnings()
                .iter()
                .map(|w| format!("warning {what}: {w}")),
        );
    }
    lines
}

fn is_list(doc: &Value) -> bool {
    doc.get("kind")
        .and_then(Value::as_str)
        .is_some_and(|k| k.ends_with("List"))
        && doc.get("items").is_some_and(Value::is_array)
}

fn walk(
    doc: &mut Value,
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    sidecar: &Sidecar,
    out: &mut Vec<Injection>,
) -> Result<(), WorkloadError> {
    if is_list(doc) {
        if let Some(items) = doc.get_mut("items").and_then(Value::as_array_mut) {
            for item in items {
                walk(item, namespaces, sidecar, out)?;
            }
        }
        return Ok(());
    }
    let empty = BTreeMap::new();
    let ns = doc
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .and_then(|n| namespaces.get(n))
        .unwrap_or(&empty);
    if let Some(injection) = inject_object(doc, ns, sidecar)? {
        out.push(injection);
    }
    Ok(())
}

fn collect_namespaces(doc: &Value, out: &mut BTreeMap<String, BTreeMap<String, String>>) {
    if is_list(doc) {
        for item in doc["items"].as_array().into_iter().flatten() {
            collect_namespaces(item, out);
        }
        return;
    }
    if doc.get("kind").and_then(Value::as_str) != Some("Namespace") {
        return;
    }
    let Some(name) = doc.pointer("/metadata/name").and_then(Value::as_str) else {
        return;
    };
    let annotations = doc
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    out.insert(name.to_string(), annotations);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(yaml: &str, selection: Selection) -> Report {
        let sidecar = Sidecar {
            selection,
            ..Sidecar::default()
        };
        inject_yaml(&[(PathBuf::from("t.yaml"), yaml.to_string())], &sidecar).expect("injects")
    }

    #[test]
    fn namespace_in_input_opts_in_and_data_survives() {
        let yaml = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  annotations:
    tern.io/inject: enabled
---
apiVersion: v1
kind: ConfigMap
metadata: {name: c, namespace: shop}
data:
  port: "8080"
  flag: "true"
  empty: ""
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      futureField: {kept: true}
      containers:
      - name: web
        image: nginx
        futureContainerField: 7
"#;
        let report = run(yaml, Selection::Annotated);
        assert_eq!(report.summary, vec!["injected deployment/web".to_string()]);
        let docs: Vec<Value> = serde_saphyr::from_multiple(&report.yaml).expect("reparses");
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[1]["data"]["port"], Value::from("8080"));
        assert_eq!(docs[1]["data"]["flag"], Value::from("true"));
        assert_eq!(docs[1]["data"]["empty"], Value::from(""));
        let spec = &docs[2]["spec"]["template"]["spec"];
        assert_eq!(spec["futureField"]["kept"], Value::from(true));
        assert_eq!(
            spec["containers"][0]["futureContainerField"],
            Value::from(7)
        );
        assert_eq!(spec["initContainers"][1]["name"], Value::from("tern-proxy"));
        // Injecting the output again changes nothing.
        let again = run(&report.yaml, Selection::Annotated);
        assert_eq!(again.yaml, report.yaml);
        assert_eq!(
            again.summary,
            vec!["skipped deployment/web: already_injected".to_string()]
        );
    }
}
