//! Sidecar injection: the pure [`patch`] core with its validated `config.tern.io/*`
//! [`settings`], `tern inject` ([`cli`]) and the `tern injector` admission webhook ([`webhook`],
//! with its cached Namespace lookups in [`namespaces`]).
//!
//! ```text
//!  YAML docs ──▶ cli ──┐                                  ┌──▶ patched YAML (stdout)
//!                      ├─▶ workload ─▶ patch(pod, ns, sidecar) ─▶ json_patch ─┤
//!  AdmissionReview ─▶ webhook ┘   (pod template)                              └──▶ JSON Patch (base64)
//! ```
//!
//! Both paths compute the same [`json_patch`] between the typed original and the typed injected
//! pod and apply it to the raw object, so fields tern does not know about pass through untouched.
//! Metrics: only the webhook's (see [`webhook`]). Errors: [`PatchError`], [`WorkloadError`].

pub mod cli;
pub mod namespaces;
pub mod patch;
pub mod settings;
pub mod webhook;

use std::collections::BTreeMap;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation, RemoveOperation, ReplaceOperation};
use k8s_openapi::api::core::v1::Pod;
use serde_json::Value;

pub use patch::{Outcome, PatchError, Selection, Sidecar, SkipReason, patch};
pub use settings::Warning;

/// Errors injecting into one raw Kubernetes object.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("{kind} {name}: its pod template does not parse: {source}")]
    BadTemplate {
        kind: String,
        name: String,
        source: serde_json::Error,
    },
    #[error("{kind} {name}: {source}")]
    Patch {
        kind: String,
        name: String,
        source: PatchError,
    },
    #[error("{kind} {name}: the computed patch does not apply: {source}")]
    Apply {
        kind: String,
        name: String,
        source: json_patch::PatchError,
    },
}

/// The result of injecting into one raw object.
#[derive(Debug)]
pub struct Injection {
    /// `Pod`, `Deployment`, ...
    pub kind: String,
    /// The object's `metadata.name` (or `generateName`), for summaries.
    pub name: String,
    pub outcome: Outcome,
    /// The JSON Patch (relative to the object) that was applied; empty when skipped.
    pub patch: json_patch::Patch,
}

/// Where the pod template of each workload kind lives, as JSON object keys.
pub fn template_path(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "Pod" => Some(&[]),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => Some(&["spec", "template"]),
        "CronJob" => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

/// Injects into one raw object in place if it is a workload; `Ok(None)` for other kinds.
/// `namespace_annotations` are those of the object's namespace (empty when unknown).
pub fn inject_object(
    object: &mut Value,
    namespace_annotations: &BTreeMap<String, String>,
    sidecar: &Sidecar,
) -> Result<Option<Injection>, WorkloadError> {
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let Some(path) = template_path(&kind) else {
        return Ok(None);
    };
    let name = object
        .pointer("/metadata/name")
        .or_else(|| object.pointer("/metadata/generateName"))
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>")
        .to_string();
    let namespace = object.pointer("/metadata/namespace").cloned();
    let mut template = &mut *object;
    for key in path {
        match template.get_mut(*key) {
            Some(inner) => template = inner,
            None => return Ok(None),
        }
    }
    let mut pod: Pod =
        serde_json::from_value(template.clone()).map_err(|source| WorkloadError::BadTemplate {
            kind: kind.clone(),
            name: name.clone(),
            source,
        })?;
    if pod.metadata.namespace.is_none() {
        pod.metadata.namespace = namespace.and_then(|n| n.as_str().map(String::from));
    }
    let outcome =
        patch(&pod, namespace_annotations, sidecar).map_err(|source| WorkloadError::Patch {
            kind: kind.clone(),
            name: name.clone(),
            source,
        })?;
    let mut ops = json_patch::Patch(Vec::new());
    if let Outcome::Injected { pod: injected, .. } = &outcome {
        ops = pod_patch(&pod, injected);
        // The patch is computed on the typed round trip, which always has e.g. `metadata`; a
        // raw template without it (a CronJob's, say) first gets the empty containers it lacks.
        let typed = serde_json::to_value(&pod).expect("a Pod always serializes");
        let mut fill = Vec::new();
        fill_missing(template, &typed, &mut PointerBuf::root(), &mut fill);
        fill.append(&mut ops.0);
        ops.0 = fill;
        json_patch::patch(template, &ops).map_err(|source| WorkloadError::Apply {
            kind: kind.clone(),
            name: name.clone(),
            source,
        })?;
    }
    Ok(Some(Injection {
        kind,
        name,
        outcome,
        patch: ops,
    }))
}

/// The JSON Patch turning `original` into `injected`.
pub fn pod_patch(original: &Pod, injected: &Pod) -> json_patch::Patch {
    let left = serde_json::to_value(original).expect("a Pod always serializes");
    let right = serde_json::to_value(injected).expect("a Pod always serializes");
    diff(&left, &right)
}

/// Like [`json_patch::diff`], but an array that only gained elements gets `add` operations at
/// their indexes rather than a cascade of `replace`s, so the existing elements (and any fields
/// of theirs that tern's types do not know) are never rewritten.
pub fn diff(left: &Value, right: &Value) -> json_patch::Patch {
    let mut ops = Vec::new();
    diff_at(left, right, &mut PointerBuf::root(), &mut ops);
    json_patch::Patch(ops)
}

fn diff_at(left: &Value, right: &Value, at: &mut PointerBuf, ops: &mut Vec<PatchOperation>) {
    match (left, right) {
        (Value::Object(l), Value::Object(r)) => {
            for (key, lv) in l {
                at.push_back(key.as_str());
                match r.get(key) {
                    Some(rv) => diff_at(lv, rv, at, ops),
                    None => ops.push(PatchOperation::Remove(RemoveOperation { path: at.clone() })),
                }
                at.pop_back();
            }
            for (key, rv) in r.iter().filter(|(k, _)| !l.contains_key(*k)) {
                at.push_back(key.as_str());
                ops.push(PatchOperation::Add(AddOperation {
                    path: at.clone(),
                    value: rv.clone(),
                }));
                at.pop_back();
            }
        }
        (Value::Array(l), Value::Array(r)) if is_subsequence(l, r) => {
            let mut li = 0;
            for (ri, rv) in r.iter().enumerate() {
                if li < l.len() && l[li] == *rv {
                    li += 1;
                    continue;
                }
                at.push_back(ri);
                ops.push(PatchOperation::Add(AddOperation {
                    path: at.clone(),
                    value: rv.clone(),
                }));
                at.pop_back();
            }
        }
        _ if left == right => {}
        _ => ops.push(PatchOperation::Replace(ReplaceOperation {
            path: at.clone(),
            value: right.clone(),
        })),
    }
}

/// `add` operations creating the empty objects and arrays `typed` has and `raw` lacks (members
/// tern's types serialize even when the input omitted them), so a patch computed from `typed`
/// applies to `raw`. Scalars are never added: `raw` keeps exactly what it said.
fn fill_missing(raw: &Value, typed: &Value, at: &mut PointerBuf, ops: &mut Vec<PatchOperation>) {
    match (raw, typed) {
        (Value::Object(r), Value::Object(t)) => {
            for (key, tv) in t {
                at.push_back(key.as_str());
                // An explicit `null` (`metadata:` with nothing after it) is as good as absent.
                match (r.get(key).filter(|v| !v.is_null()), tv) {
                    (Some(rv), _) => fill_missing(rv, tv, at, ops),
                    (None, Value::Object(_)) => {
                        ops.push(PatchOperation::Add(AddOperation {
                            path: at.clone(),
                            value: Value::Object(Default::default()),
                        }));
                        fill_missing(&Value::Object(Default::default()), tv, at, ops);
                    }
                    (None, Value::Array(a)) if a.is_empty() => {
                        ops.push(PatchOperation::Add(AddOperation {
                            path: at.clone(),
                            value: Value::Array(Vec::new()),
                        }))
                    }
                    (None, _) => {}
                }
                at.pop_back();
            }
        }
        (Value::Array(r), Value::Array(t)) if r.len() == t.len() => {
            for (i, (rv, tv)) in r.iter().zip(t).enumerate() {
                at.push_back(i);
                fill_missing(rv, tv, at, ops);
                at.pop_back();
            }
        }
        _ => {}
    }
}

/// Whether `small` appears in `big` in order (greedy matching, enough for pure insertions).
fn is_subsequence(small: &[Value], big: &[Value]) -> bool {
    let mut it = big.iter();
    small.iter().all(|s| it.any(|b| b == s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::{Path, PathBuf};

    fn golden_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/inject/pods")
    }

    /// Runs one golden case: returns the rendered result and checks the invariants every case
    /// must hold (typed and raw paths agree; injecting the result again changes nothing).
    fn run_case(input: &Value) -> Value {
        let ns: BTreeMap<String, String> =
            serde_json::from_value(input["namespaceAnnotations"].clone()).expect("annotations");
        let sidecar = Sidecar::default();
        let mut raw = input["pod"].clone();
        let injection = inject_object(&mut raw, &ns, &sidecar)
            .expect("injects")
            .expect("a Pod is a workload");

        // The typed core gives the same pod as the patch applied to the raw object.
        let typed: Pod = serde_json::from_value(input["pod"].clone()).expect("pod parses");
        let direct = patch(&typed, &ns, &sidecar).expect("patches");
        match &direct {
            Outcome::Injected { pod, .. } => {
                assert_eq!(serde_json::to_value(pod).expect("serializes"), raw)
            }
            Outcome::Skipped { .. } => assert_eq!(raw, input["pod"], "skipped pods are untouched"),
        }
        assert_eq!(direct, injection.outcome);

        // Idempotent: a second pass is a no-op.
        let mut again = raw.clone();
        let second = inject_object(&mut again, &ns, &sidecar)
            .expect("injects")
            .expect("workload");
        assert_eq!(again, raw, "second injection changed the pod");
        assert!(second.patch.0.is_empty());

        let (outcome, reason) = match &injection.outcome {
            Outcome::Injected { .. } => ("injected", None),
            Outcome::Skipped { reason, .. } => ("skipped", Some(reason.as_str())),
        };
        let warnings: Vec<String> = injection
            .outcome
            .warnings()
            .iter()
            .map(|w| w.to_string())
            .collect();
        json!({
            "outcome": outcome,
            "reason": reason,
            "warnings": warnings,
            "patch": injection.patch,
            "pod": raw,
        })
    }

    /// Golden files: `tests/golden/inject/pods/NAME.yaml` in, `NAME.golden.yaml` out.
    /// Regenerate with `TERN_BLESS=1 cargo test --lib inject::tests::golden_pods`.
    #[test]
    fn golden_pods() {
        let bless = std::env::var_os("TERN_BLESS").is_some();
        let mut cases = 0;
        let mut entries: Vec<PathBuf> = std::fs::read_dir(golden_dir())
            .expect("golden dir exists")
            .map(|e| e.expect("dir entry").path())
            .filter(|p| {
                p.extension().is_some_and(|e| e == "yaml")
                    && !p.to_string_lossy().ends_with(".golden.yaml")
            })
            .collect();
        entries.sort();
        let mut failures = Vec::new();
        for path in entries {
            let text = std::fs::read_to_string(&path).expect("readable");
            let input: Value = serde_saphyr::from_str(&text).expect("input parses");
            let result = serde_saphyr::to_string(&run_case(&input)).expect("renders");
            let golden = path.with_extension("golden.yaml");
            if bless {
                std::fs::write(&golden, &result).expect("writes golden");
            } else {
                let expected = std::fs::read_to_string(&golden).unwrap_or_default();
                if expected != result {
                    failures.push(format!("{}:\n{result}", golden.display()));
                }
            }
            cases += 1;
        }
        assert!(cases >= 9, "only {cases} golden cases found");
        assert!(
            failures.is_empty(),
            "golden mismatch (TERN_BLESS=1 to accept):\n{}",
            failures.join("\n")
        );
    }

    #[test]
    fn insertions_become_adds_and_apply() {
        let left =
            json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}], "x": 1, "gone": 2}});
        let right = json!({"spec": {"containers": [{"name": "p"}, {"name": "a"}, {"name": "b"}, {"name": "z"}], "x": 3, "new": [1]}});
        let ops = diff(&left, &right);
        let text = serde_json::to_string(&ops).expect("serializes");
        assert!(
            !text.contains("\"replace\",\"path\":\"/spec/containers"),
            "{text}"
        );
        let mut doc = left.clone();
        json_patch::patch(&mut doc, &ops).expect("applies");
        assert_eq!(doc, right);
        // A non-insertion change still works.
        let other = json!({"spec": {"containers": [{"name": "b"}]}});
        let mut doc = left.clone();
        json_patch::patch(&mut doc, &diff(&left, &other)).expect("applies");
        assert_eq!(doc, other);
    }
}
