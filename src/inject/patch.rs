//! `patch`: the pure function from a pod (+ its namespace's annotations + the injector's
//! settings) to the injected pod. `tern inject` and `tern injector` both call it, so they
//! produce the same pod.
//!
//! What an injected pod gets (native sidecar mode, the default):
//!
//! ```text
//! initContainers: [tern-init, tern-proxy (restartPolicy: Always, startupProbe /ready), ...app's]
//! containers:     [...app's]
//! volumes:        [...app's, tern-identity (csi-driver-spiffe or a Secret), tern-xtables-lock]
//! ```
//!
//! With `config.tern.io/native-sidecar: "false"`, `tern-proxy` is the first regular container
//! with a post-start hook that waits for `/ready`, and `tern-init` runs after the app's own init
//! containers (which then still have an unredirected network). Owns no metrics; the only error
//! is a pod without a spec.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    CSIVolumeSource, Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, ExecAction, HTTPGetAction, Lifecycle, LifecycleHandler, ObjectFieldSelector, Pod,
    Probe, ResourceRequirements, SeccompProfile, SecretVolumeSource, SecurityContext, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::settings::{Settings, Warning};

/// Name of the proxy container.
pub const PROXY_CONTAINER: &str = "tern-proxy";
/// Name of the iptables init container.
pub const INIT_CONTAINER: &str = "tern-init";
/// The opt-in / opt-out annotation, on a Namespace or a pod (template).
pub const INJECT_ANNOTATION: &str = "tern.io/inject";
/// Annotation recording the injected proxy version.
pub const VERSION_ANNOTATION: &str = "tern.io/proxy-version";
/// Label on injected pods, for PodMonitors and `kubectl get pods -l tern.io/proxy`.
pub const PROXY_LABEL: &str = "tern.io/proxy";
/// Where the identity volume is mounted in the proxy (`TERN_IDENTITY_DIR`).
pub const IDENTITY_DIR: &str = "/var/run/tern/identity";
/// The csi-driver-spiffe driver name.
pub const SPIFFE_CSI_DRIVER: &str = "spiffe.csi.cert-manager.io";
/// Ports (DESIGN.md §2).
pub const OUTBOUND_PORT: i32 = 4140;
pub const INBOUND_PORT: i32 = 4143;
pub const ADMIN_PORT: i32 = 4191;
/// Name of the admin container port, scraped by Prometheus.
pub const ADMIN_PORT_NAME: &str = "tern-admin";

const IDENTITY_VOLUME: &str = "tern-identity";
const XTABLES_VOLUME: &str = "tern-xtables-lock";

/// The injector's own settings: what is the same for every pod it injects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sidecar {
    /// The tern image, used for both containers.
    pub image: String,
    /// `imagePullPolicy` for both containers; `None` leaves Kubernetes' default.
    pub image_pull_policy: Option<String>,
    /// Which pods get injected.
    pub selection: Selection,
    /// Native sidecar (an init container with `restartPolicy: Always`, Kubernetes ≥ 1.29)
    /// unless a pod's `config.tern.io/native-sidecar` says otherwise.
    pub native_sidecar: bool,
    /// UID (and GID) the proxy runs as; `tern init` exempts its traffic.
    pub proxy_uid: i64,
}

impl Default for Sidecar {
    fn default() -> Self {
        Sidecar {
            image: format!("ghcr.io/tern-mesh/tern:{}", env!("CARGO_PKG_VERSION")),
            image_pull_policy: None,
            selection: Selection::Annotated,
            native_sidecar: true,
            proxy_uid: 2102,
        }
    }
}

/// Which pods are injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// Pods whose own or namespace's `tern.io/inject` is `enabled`.
    Annotated,
    /// Every pod not explicitly `disabled` (`tern inject --all`).
    All,
}

/// What [`patch`] decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Injected {
        pod: Box<Pod>,
        warnings: Vec<Warning>,
    },
    Skipped {
        reason: SkipReason,
        warnings: Vec<Warning>,
    },
}

impl Outcome {
    pub fn warnings(&self) -> &[Warning] {
        match self {
            Outcome::Injected { warnings, .. } | Outcome::Skipped { warnings, .. } => warnings,
        }
    }
}

/// Why a pod was left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// It already has a `tern-proxy` container: injecting again would change nothing.
    AlreadyInjected,
    /// `tern.io/inject: disabled` on the pod or its namespace.
    Disabled,
    /// Neither the pod nor its namespace opted in.
    NotEnabled,
    /// `hostNetwork: true`: iptables rules would redirect the node's traffic.
    HostNetwork,
}

impl SkipReason {
    /// Stable, metric-label-friendly name.
    pub fn as_str(&self) -> &'static str {
        match self {
            SkipReason::AlreadyInjected => "already_injected",
            SkipReason::Disabled => "disabled",
            SkipReason::NotEnabled => "not_enabled",
            SkipReason::HostNetwork => "host_network",
        }
    }
}

/// Errors of [`patch`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PatchError {
    #[error("the pod has no spec")]
    NoSpec,
}

/// Injects the tern sidecar into `pod`, or says why not. Pure: same input, same output.
pub fn patch(
    pod: &Pod,
    namespace_annotations: &BTreeMap<String, String>,
    sidecar: &Sidecar,
) -> Result<Outcome, PatchError> {
    let spec = pod.spec.as_ref().ok_or(PatchError::NoSpec)?;
    let empty = BTreeMap::new();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let mut warnings = Vec::new();

    let has_proxy = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.name == PROXY_CONTAINER);
    if has_proxy {
        return Ok(skipped(SkipReason::AlreadyInjected, warnings));
    }
    let pod_choice = match annotations.get(INJECT_ANNOTATION).map(String::as_str) {
        None => None,
        Some("enabled") => Some(true),
        Some("disabled") => Some(false),
        Some(other) => {
            warnings.push(Warning {
                annotation: INJECT_ANNOTATION.into(),
                value: other.into(),
                problem: "expected enabled or disabled".into(),
            });
            None
        }
    };
    let ns_choice = match namespace_annotations
        .get(INJECT_ANNOTATION)
        .map(String::as_str)
    {
        Some("enabled") => Some(true),
        Some("disabled") => Some(false),
        _ => None,
    };
    match pod_choice.or(ns_choice) {
        Some(false) => return Ok(skipped(SkipReason::Disabled, warnings)),
        Some(true) => {}
        None if sidecar.selection == Selection::All => {}
        None => return Ok(skipped(SkipReason::NotEnabled, warnings)),
    }
    if spec.host_network == Some(true) {
        return Ok(skipped(SkipReason::HostNetwork, warnings));
    }

    let (settings, bad) = Settings::from_annotations(annotations);
    warnings.extend(bad);
    let native = settings.native_sidecar.unwrap_or(sidecar.native_sidecar);

    let mut pod = pod.clone();
    let meta = &mut pod.metadata;
    let annotations = meta.annotations.get_or_insert_with(BTreeMap::new);
    annotations.insert(
        VERSION_ANNOTATION.into(),
        env!("CARGO_PKG_VERSION").to_string(),
    );
    if let Some(first_app) = spec.containers.first() {
        // In non-native mode the proxy is the first container; keep kubectl logs/exec on the app.
        annotations
            .entry("kubectl.kubernetes.io/default-container".into())
            .or_insert_with(|| first_app.name.clone());
    }
    meta.labels
        .get_or_insert_with(BTreeMap::new)
        .insert(PROXY_LABEL.into(), "injected".into());

    let spec = pod.spec.as_mut().ok_or(PatchError::NoSpec)?;
    let inbound_ports = inbound_ports(&spec.containers);
    let init = init_container(sidecar, &settings);
    let mut proxy = proxy_container(sidecar, &settings, &inbound_ports);
    let inits = spec.init_containers.get_or_insert_with(Vec::new);
    if native {
        proxy.restart_policy = Some("Always".into());
        proxy.startup_probe = Some(Probe {
            period_seconds: Some(1),
            failure_threshold: Some(120),
            ..http_probe("/ready")
        });
        inits.splice(0..0, [init, proxy]);
    } else {
        proxy.lifecycle = Some(Lifecycle {
            post_start: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec!["/bin/bash".into(), "-c".into(), wait_ready_script()]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        inits.push(init);
        spec.containers.insert(0, proxy);
    }
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    volumes.push(identity_volume(sidecar, &settings));
    volumes.push(Volume {
        name: XTABLES_VOLUME.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    });
    Ok(Outcome::Injected {
        pod: Box::new(pod),
        warnings,
    })
}

fn skipped(reason: SkipReason, warnings: Vec<Warning>) -> Outcome {
    Outcome::Skipped { reason, warnings }
}

/// The app's TCP container ports, sorted and deduplicated, as `8080,9090`.
fn inbound_ports(containers: &[Container]) -> String {
    let mut ports: Vec<i32> = containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .map(|p| p.container_port)
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
        .iter()
        .map(i32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn init_container(sidecar: &Sidecar, settings: &Settings) -> Container {
    let mut env = vec![value_env("TERN_PROXY_UID", &sidecar.proxy_uid.to_string())];
    for (name, value) in [
        ("TERN_SKIP_INBOUND_PORTS", &settings.skip_inbound_ports),
        ("TERN_SKIP_OUTBOUND_PORTS", &settings.skip_outbound_ports),
        ("TERN_SKIP_SUBNETS", &settings.skip_subnets),
    ] {
        if !value.is_empty() {
            env.push(value_env(name, value));
        }
    }
    Container {
        name: INIT_CONTAINER.into(),
        image: Some(sidecar.image.clone()),
        image_pull_policy: sidecar.image_pull_policy.clone(),
        args: Some(vec!["init".into()]),
        env: Some(env),
        resources: Some(resources("10m", None, "16Mi", "64Mi")),
        // iptables needs root with NET_ADMIN/NET_RAW; nothing else.
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            seccomp_profile: Some(runtime_default()),
            ..Default::default()
        }),
        // iptables takes its lock in /run; the root filesystem is read-only.
        volume_mounts: Some(vec![VolumeMount {
            name: XTABLES_VOLUME.into(),
            mount_path: "/run".into(),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

fn proxy_container(sidecar: &Sidecar, settings: &Settings, inbound_ports: &str) -> Container {
    let mut env = vec![
        value_env("TERN_LOG", settings.log_level.as_deref().unwrap_or("info")),
        value_env(
            "TERN_LOG_FORMAT",
            settings.log_format.as_deref().unwrap_or("plain"),
        ),
        value_env(
            "TERN_SHUTDOWN_GRACE_PERIOD",
            settings.shutdown_grace_period.as_deref().unwrap_or("30s"),
        ),
        value_env("TERN_IDENTITY_DIR", IDENTITY_DIR),
        value_env(
            "TERN_DEFAULT_INBOUND_POLICY",
            settings
                .default_inbound_policy
                .as_deref()
                .unwrap_or("all-unauthenticated"),
        ),
        field_env("TERN_POD_NAME", "metadata.name"),
        field_env("TERN_POD_NAMESPACE", "metadata.namespace"),
        field_env("TERN_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        field_env("TERN_POD_IP", "status.podIP"),
        field_env("TERN_POD_IPS", "status.podIPs"),
    ];
    if !settings.opaque_ports.is_empty() {
        env.push(value_env("TERN_OPAQUE_PORTS", &settings.opaque_ports));
    }
    if !inbound_ports.is_empty() {
        env.push(value_env("TERN_INBOUND_PORTS", inbound_ports));
    }
    Container {
        name: PROXY_CONTAINER.into(),
        image: Some(sidecar.image.clone()),
        image_pull_policy: sidecar.image_pull_policy.clone(),
        args: Some(vec!["proxy".into()]),
        env: Some(env),
        ports: Some(vec![
            ContainerPort {
                name: Some("tern-inbound".into()),
                container_port: INBOUND_PORT,
                protocol: Some("TCP".into()),
                ..Default::default()
            },
            ContainerPort {
                name: Some(ADMIN_PORT_NAME.into()),
                container_port: ADMIN_PORT,
                protocol: Some("TCP".into()),
                ..Default::default()
            },
        ]),
        liveness_probe: Some(Probe {
            period_seconds: Some(10),
            failure_threshold: Some(3),
            ..http_probe("/live")
        }),
        readiness_probe: Some(Probe {
            period_seconds: Some(5),
            failure_threshold: Some(3),
            ..http_probe("/ready")
        }),
        resources: Some(resources(
            settings.cpu_request(),
            settings.cpu_limit.as_deref(),
            settings.memory_request(),
            settings.memory_limit(),
        )),
        security_context: Some(SecurityContext {
            run_as_user: Some(sidecar.proxy_uid),
            run_as_group: Some(sidecar.proxy_uid),
            run_as_non_root: Some(true),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            seccomp_profile: Some(runtime_default()),
            ..Default::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: IDENTITY_VOLUME.into(),
            mount_path: IDENTITY_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

fn identity_volume(sidecar: &Sidecar, settings: &Settings) -> Volume {
    match &settings.identity_secret {
        Some(secret) => Volume {
            name: IDENTITY_VOLUME.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.clone()),
                default_mode: Some(0o440),
                ..Default::default()
            }),
            ..Default::default()
        },
        None => Volume {
            name: IDENTITY_VOLUME.into(),
            csi: Some(CSIVolumeSource {
                driver: SPIFFE_CSI_DRIVER.into(),
                read_only: Some(true),
                // Files group-owned by the proxy's GID, so the non-root proxy can read the key.
                volume_attributes: Some(BTreeMap::from([(
                    "spiffe.csi.cert-manager.io/fs-group".to_string(),
                    sidecar.proxy_uid.to_string(),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        },
    }
}

/// Post-start hook of the non-native proxy: blocks the app's start until `/ready` answers 200
/// (bash's /dev/tcp, as the runtime image has no curl), at most 60 s.
fn wait_ready_script() -> String {
    format!(
        "for i in $(seq 1 300); do \
         if (exec 3<>/dev/tcp/127.0.0.1/{ADMIN_PORT} && \
         printf 'GET /ready HTTP/1.0\\r\\n\\r\\n' >&3 && \
         head -n 1 <&3 | grep -q ' 200 ') 2>/dev/null; then exit 0; fi; \
         sleep 0.2; done; exit 1"
    )
}

fn http_probe(path: &str) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(ADMIN_PORT_NAME.into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn resources(
    cpu_request: &str,
    cpu_limit: Option<&str>,
    mem_request: &str,
    mem_limit: &str,
) -> ResourceRequirements {
    let mut limits = BTreeMap::from([("memory".to_string(), Quantity(mem_limit.into()))]);
    if let Some(cpu) = cpu_limit {
        limits.insert("cpu".into(), Quantity(cpu.into()));
    }
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity(cpu_request.into())),
            ("memory".to_string(), Quantity(mem_request.into())),
        ])),
        limits: Some(limits),
        ..Default::default()
    }
}

fn runtime_default() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".into(),
        ..Default::default()
    }
}

fn value_env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

fn field_env(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field_path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    use crate::cli::Cli;

    /// Every `TERN_*` variable injected into a container that the container's subcommand
    /// knows as a flag must parse as that flag: the injector and the binary agree on names
    /// and formats. Returns how many variables were checked.
    fn parse_env_as_flags(container: &Container, subcommand: &str) -> usize {
        let cli = Cli::command();
        let sub = cli
            .find_subcommand(subcommand)
            .expect("subcommand exists")
            .clone();
        let mut argv = vec!["tern".to_string(), subcommand.to_string()];
        let mut checked = 0;
        for env in container.env.iter().flatten() {
            let Some(value) = &env.value else { continue };
            let arg = sub
                .get_arguments()
                .chain(cli.get_arguments())
                .find(|a| a.get_env().is_some_and(|e| e == env.name.as_str()));
            if let Some(long) = arg.and_then(|a| a.get_long()) {
                argv.push(format!("--{long}={value}"));
                checked += 1;
            }
        }
        if let Err(e) = Cli::try_parse_from(&argv) {
            panic!("{argv:?} does not parse: {e}");
        }
        checked
    }

    #[test]
    fn injected_env_parses_as_the_binarys_flags() {
        let annotations = [
            ("tern.io/inject", "enabled"),
            ("config.tern.io/skip-inbound-ports", "22,9000-9100"),
            ("config.tern.io/skip-outbound-ports", "5432"),
            ("config.tern.io/skip-subnets", "198.18.0.0/15,2001:db8::/32"),
            ("config.tern.io/opaque-ports", "25,3306,9000-9100"),
            ("config.tern.io/proxy-log-level", "tern=debug,info"),
            ("config.tern.io/proxy-log-format", "json"),
            ("config.tern.io/shutdown-grace-period", "1m 30s"),
        ];
        let pod = Pod {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            spec: Some(k8s_openapi::api::core::v1::PodSpec {
                containers: vec![Container {
                    name: "app".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let Ok(Outcome::Injected { pod, warnings }) =
            patch(&pod, &BTreeMap::new(), &Sidecar::default())
        else {
            panic!("not injected");
        };
        assert!(warnings.is_empty(), "{warnings:?}");
        let inits = pod
            .spec
            .as_ref()
            .and_then(|s| s.init_containers.clone())
            .expect("init containers");
        // tern-init: TERN_PROXY_UID and the three skip lists are all `tern init` flags.
        assert_eq!(parse_env_as_flags(&inits[0], "init"), 4);
        // tern-proxy: log, log format, shutdown grace, identity dir, default inbound policy (and
        // any variable `tern proxy` learns later is checked as soon as it has the flag).
        assert!(parse_env_as_flags(&inits[1], "proxy") >= 5);
    }
}
