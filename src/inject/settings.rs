//! The `config.tern.io/*` pod annotations, validated into typed [`Settings`].
//!
//! Every value is checked (ports and ranges 1-65535, CIDRs, Kubernetes quantities, humantime
//! durations, enums). A bad value never reaches the pod: it becomes a [`Warning`] and the
//! default is used instead. Owns no metrics; returns no errors (only warnings).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use ipnet::IpNet;

use crate::addr::PortRange;

/// Prefix of every per-pod configuration annotation.
pub const CONFIG_PREFIX: &str = "config.tern.io/";

/// Every annotation this module reads (without the prefix), for docs and tests.
pub const ANNOTATIONS: &[&str] = &[
    "skip-inbound-ports",
    "skip-outbound-ports",
    "skip-subnets",
    "opaque-ports",
    "proxy-log-level",
    "proxy-log-format",
    "proxy-cpu-request",
    "proxy-cpu-limit",
    "proxy-memory-request",
    "proxy-memory-limit",
    "default-inbound-policy",
    "native-sidecar",
    "shutdown-grace-period",
    "identity-secret",
];

/// Default proxy CPU request: a micro-proxy idles at well under 10 millicores.
pub const DEFAULT_CPU_REQUEST: &str = "10m";
/// Default proxy memory request: the proxy's resident set at idle is a few MiB.
pub const DEFAULT_MEMORY_REQUEST: &str = "16Mi";
/// Default proxy memory limit: bounded per-connection buffers keep it well below this.
pub const DEFAULT_MEMORY_LIMIT: &str = "64Mi";

/// A rejected annotation value; the default was used instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// The full annotation key, e.g. `config.tern.io/skip-inbound-ports`.
    pub annotation: String,
    pub value: String,
    pub problem: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tern: ignoring annotation {}={:?}: {}; using the default",
            self.annotation, self.value, self.problem
        )
    }
}

/// The proxy settings of one pod, after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Normalised port lists (`25,9000-9100`), empty when unset.
    pub skip_inbound_ports: String,
    pub skip_outbound_ports: String,
    pub opaque_ports: String,
    /// Normalised CIDR list, empty when unset.
    pub skip_subnets: String,
    pub log_level: Option<String>,
    pub log_format: Option<String>,
    pub cpu_request: Option<String>,
    pub cpu_limit: Option<String>,
    pub memory_request: Option<String>,
    pub memory_limit: Option<String>,
    pub default_inbound_policy: Option<String>,
    /// `None`: the injector's default.
    pub native_sidecar: Option<bool>,
    /// humantime form, e.g. `30s`.
    pub shutdown_grace_period: Option<String>,
    /// Name of a Secret (tls.crt, tls.key, ca.crt) to use instead of csi-driver-spiffe.
    pub identity_secret: Option<String>,
}

impl Settings {
    /// Reads and validates every `config.tern.io/*` annotation of a pod.
    pub fn from_annotations(annotations: &BTreeMap<String, String>) -> (Settings, Vec<Warning>) {
        let mut warnings = Vec::new();
        let mut get = |name: &str, check: &dyn Fn(&str) -> Result<String, String>| {
            let key = format!("{CONFIG_PREFIX}{name}");
            let value = annotations.get(&key)?;
            match check(value.trim()) {
                Ok(v) => Some(v),
                Err(problem) => {
                    warnings.push(Warning {
                        annotation: key,
                        value: value.clone(),
                        problem,
                    });
                    None
                }
            }
        };
        let mut settings = Settings {
            skip_inbound_ports: get("skip-inbound-ports", &ports).unwrap_or_default(),
            skip_outbound_ports: get("skip-outbound-ports", &ports).unwrap_or_default(),
            opaque_ports: get("opaque-ports", &ports).unwrap_or_default(),
            skip_subnets: get("skip-subnets", &subnets).unwrap_or_default(),
            log_level: get("proxy-log-level", &log_filter),
            log_format: get("proxy-log-format", &one_of(&["plain", "json"])),
            cpu_request: get("proxy-cpu-request", &quantity),
            cpu_limit: get("proxy-cpu-limit", &quantity),
            memory_request: get("proxy-memory-request", &quantity),
            memory_limit: get("proxy-memory-limit", &quantity),
            default_inbound_policy: get(
                "default-inbound-policy",
                &one_of(&["all-unauthenticated", "all-authenticated", "deny"]),
            ),
            native_sidecar: get("native-sidecar", &one_of(&["true", "false"])).map(|v| v == "true"),
            shutdown_grace_period: get("shutdown-grace-period", &duration),
            identity_secret: get("identity-secret", &object_name),
        };
        // A request above its limit makes the API server reject the pod: clamp it, say so.
        for (what, request, limit, default) in [
            (
                "proxy-cpu-request",
                &mut settings.cpu_request,
                &settings.cpu_limit,
                DEFAULT_CPU_REQUEST,
            ),
            (
                "proxy-memory-request",
                &mut settings.memory_request,
                &settings.memory_limit,
                DEFAULT_MEMORY_REQUEST,
            ),
        ] {
            let Some(limit) = limit else { continue };
            let effective = request.clone().unwrap_or_else(|| default.to_string());
            if quantity_value(&effective) > quantity_value(limit) {
                warnings.push(Warning {
                    annotation: format!("{CONFIG_PREFIX}{what}"),
                    value: effective,
                    problem: format!(
                        "request exceeds the limit {limit}; the request is set to the limit"
                    ),
                });
                *request = Some(limit.clone());
            }
        }
        (settings, warnings)
    }

    pub fn cpu_request(&self) -> &str {
        self.cpu_request.as_deref().unwrap_or(DEFAULT_CPU_REQUEST)
    }

    pub fn memory_request(&self) -> &str {
        self.memory_request
            .as_deref()
            .unwrap_or(DEFAULT_MEMORY_REQUEST)
    }

    pub fn memory_limit(&self) -> &str {
        self.memory_limit.as_deref().unwrap_or(DEFAULT_MEMORY_LIMIT)
    }
}

fn ports(value: &str) -> Result<String, String> {
    let mut out = Vec::new();
    for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let range: PortRange = part.parse().map_err(|e| format!("{e}"))?;
        out.push(if range.first == range.last {
            range.first.to_string()
        } else {
            format!("{}-{}", range.first, range.last)
        });
    }
    if out.is_empty() {
        return Err("no ports given".into());
    }
    Ok(out.join(","))
}

fn subnets(value: &str) -> Result<String, String> {
    let mut out = Vec::new();
    for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let net: IpNet = part
            .parse()
            .map_err(|_| format!("`{part}` is not a CIDR such as 10.0.0.0/8 or fd00::/8"))?;
        out.push(net.to_string());
    }
    if out.is_empty() {
        return Err("no subnets given".into());
    }
    Ok(out.join(","))
}

fn log_filter(value: &str) -> Result<String, String> {
    if value.is_empty() {
        return Err("empty log filter".into());
    }
    tracing_subscriber::EnvFilter::try_new(value)
        .map(|_| value.to_string())
        .map_err(|e| format!("not a log filter: {e}"))
}

fn one_of(allowed: &'static [&'static str]) -> impl Fn(&str) -> Result<String, String> {
    move |value| {
        if allowed.contains(&value) {
            Ok(value.to_string())
        } else {
            Err(format!("expected one of {}", allowed.join(", ")))
        }
    }
}

fn duration(value: &str) -> Result<String, String> {
    let d: Duration =
        humantime::parse_duration(value).map_err(|e| format!("not a duration like 30s: {e}"))?;
    Ok(humantime::format_duration(d).to_string())
}

/// A DNS-1123 subdomain (the name of a Secret).
fn object_name(value: &str) -> Result<String, String> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(value.to_string())
    } else {
        Err("not a valid Secret name (DNS-1123 subdomain)".into())
    }
}

fn quantity(value: &str) -> Result<String, String> {
    match quantity_value(value) {
        Some(v) if v > 0.0 => Ok(value.to_string()),
        Some(_) => Err("must be greater than zero".into()),
        None => Err("not a Kubernetes quantity such as 100m, 64Mi or 0.5".into()),
    }
}

/// Parses a Kubernetes resource quantity (`100m`, `64Mi`, `1.5`, `1e3`) to its numeric value.
pub fn quantity_value(s: &str) -> Option<f64> {
    let digits_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    let number = number.strip_prefix('+').unwrap_or(number);
    if number.is_empty() || number == "." || number.matches('.').count() > 1 {
        return None;
    }
    let n: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exp if exp.starts_with(['e', 'E']) => {
            let e: i32 = exp[1..].parse().ok()?;
            10f64.powi(e)
        }
        _ => return None,
    };
    Some(n * factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> (Settings, Vec<Warning>) {
        let annotations = pairs
            .iter()
            .map(|(k, v)| (format!("{CONFIG_PREFIX}{k}"), v.to_string()))
            .collect();
        Settings::from_annotations(&annotations)
    }

    #[test]
    fn good_values_are_normalised() {
        let (s, w) = settings(&[
            ("skip-inbound-ports", " 22, 9000-9100 "),
            ("skip-subnets", "198.18.0.0/15,2001:db8::/32"),
            ("shutdown-grace-period", "1m 30s"),
            ("proxy-cpu-limit", "1"),
            ("native-sidecar", "false"),
        ]);
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(s.skip_inbound_ports, "22,9000-9100");
        assert_eq!(s.skip_subnets, "198.18.0.0/15,2001:db8::/32");
        assert_eq!(s.shutdown_grace_period.as_deref(), Some("1m 30s"));
        assert_eq!(s.native_sidecar, Some(false));
    }

    #[test]
    fn every_bad_value_warns_and_falls_back() {
        let bad = [
            ("skip-inbound-ports", "70000"),
            ("skip-outbound-ports", "90-80"),
            ("opaque-ports", ","),
            ("skip-subnets", "10.0.0/8"),
            ("proxy-log-level", "tern=loud[x"),
            ("proxy-log-format", "xml"),
            ("proxy-cpu-request", "lots"),
            ("proxy-cpu-limit", "-1"),
            ("proxy-memory-request", "16MB"),
            ("proxy-memory-limit", "0"),
            ("default-inbound-policy", "allow"),
            ("native-sidecar", "yes"),
            ("shutdown-grace-period", "soon"),
            ("identity-secret", "Not_A_Name"),
        ];
        let (s, w) = settings(&bad);
        assert_eq!(w.len(), bad.len(), "{w:#?}");
        assert_eq!(
            s,
            Settings::from_annotations(&BTreeMap::new()).0,
            "defaults used"
        );
        assert!(w[0].to_string().contains("config.tern.io/"));
    }

    #[test]
    fn request_above_limit_is_clamped() {
        let (s, w) = settings(&[("proxy-memory-limit", "8Mi")]);
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(s.memory_request(), "8Mi");
        let (s, w) = settings(&[("proxy-cpu-request", "2"), ("proxy-cpu-limit", "500m")]);
        assert_eq!(w.len(), 1);
        assert_eq!(s.cpu_request(), "500m");
    }

    #[test]
    fn quantities_parse() {
        assert_eq!(quantity_value("100m"), Some(0.1));
        assert_eq!(quantity_value("64Mi"), Some(64.0 * 1024.0 * 1024.0));
        assert_eq!(quantity_value("1e3"), Some(1000.0));
        assert_eq!(quantity_value(".5"), Some(0.5));
        assert_eq!(quantity_value("1.2.3"), None);
        assert_eq!(quantity_value("Mi"), None);
        assert_eq!(quantity_value("5 Mi"), None);
    }
}
