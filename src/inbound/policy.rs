//! Inbound authorization: who may connect to which port of the app.
//!
//! `--default-inbound-policy` applies to every port without a rule:
//! - `all-unauthenticated` (default): anyone, meshed or not, so meshing a pod never breaks its
//!   non-meshed clients;
//! - `all-authenticated`: only mesh clients (a verified client certificate from the trust bundle);
//! - `deny`: nobody.
//!
//! `--inbound-policy PORTS=RULE` (repeatable) overrides it per port or range, where RULE is
//! `unauthenticated`, `authenticated`, `deny`, or a `;`-separated list of SPIFFE IDs and
//! namespace patterns (`spiffe://td/ns/shop/*`), e.g.
//! `--inbound-policy '8080=spiffe://cluster.local/ns/shop/sa/web;spiffe://cluster.local/ns/ops/*'`.
//! The first matching rule wins.
//!
//! Metrics: `tern_inbound_authz_total{decision, reason}`.

use std::fmt;
use std::str::FromStr;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::addr::PortRange;
use crate::tls::SpiffeId;

/// The policy for ports without a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DefaultPolicy {
    /// Anyone, meshed or not.
    AllUnauthenticated,
    /// Mesh clients with a verified identity only.
    AllAuthenticated,
    /// Nobody.
    Deny,
}

/// Who a rule lets in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Allow {
    Unauthenticated,
    Authenticated,
    Deny,
    Identities(Vec<IdPattern>),
}

/// An allowed client identity: exact, or every identity of a namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum IdPattern {
    Exact(SpiffeId),
    /// `spiffe://<trust_domain>/ns/<namespace>/*`
    Namespace {
        trust_domain: String,
        namespace: String,
    },
}

impl IdPattern {
    fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            IdPattern::Exact(want) => want == id,
            IdPattern::Namespace {
                trust_domain,
                namespace,
            } => id.trust_domain() == trust_domain && id.namespace() == namespace,
        }
    }
}

/// One `--inbound-policy` rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PortRule {
    pub ports: PortRange,
    pub allow: Allow,
}

/// Why a `--inbound-policy` value did not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    #[error("`{0}` is not PORTS=RULE")]
    Shape(String),
    #[error("{0}")]
    Ports(#[from] crate::addr::PortRangeError),
    #[error("`{value}` is not a SPIFFE ID or `spiffe://<td>/ns/<ns>/*` pattern: {message}")]
    Identity { value: String, message: String },
}

impl FromStr for PortRule {
    type Err = RuleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ports, rule) = s
            .split_once('=')
            .ok_or_else(|| RuleError::Shape(s.to_string()))?;
        let ports: PortRange = ports.parse()?;
        let allow = match rule.trim() {
            "unauthenticated" => Allow::Unauthenticated,
            "authenticated" => Allow::Authenticated,
            "deny" => Allow::Deny,
            "" => return Err(RuleError::Shape(s.to_string())),
            ids => Allow::Identities(
                ids.split(';')
                    .map(str::trim)
                    .filter(|v| !v.is_empty())
                    .map(parse_pattern)
                    .collect::<Result<_, _>>()?,
            ),
        };
        Ok(PortRule { ports, allow })
    }
}

fn parse_pattern(v: &str) -> Result<IdPattern, RuleError> {
    let err = |message: String| RuleError::Identity {
        value: v.to_string(),
        message,
    };
    if let Some(prefix) = v.strip_suffix("/*") {
        // Validate the namespace part by parsing a full ID with a placeholder account.
        let probe: SpiffeId = format!("{prefix}/sa/x")
            .parse()
            .map_err(|e: crate::tls::SpiffeIdError| err(e.to_string()))?;
        let namespace = probe.namespace().to_string();
        return Ok(IdPattern::Namespace {
            trust_domain: probe.trust_domain().to_string(),
            namespace,
        });
    }
    v.parse::<SpiffeId>()
        .map(IdPattern::Exact)
        .map_err(|e| err(e.to_string()))
}

/// Why a connection or request was denied. Label values of `tern_inbound_authz_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Reason {
    /// Allowed: the port admits unauthenticated clients.
    unauthenticated_allowed,
    /// Allowed: a verified mesh client where authentication is required.
    authenticated,
    /// Allowed: the client's identity is on the port's list.
    identity_allowed,
    /// Denied: the port requires mTLS and the client is not meshed.
    mtls_required,
    /// Denied: the client's identity is not on the port's list.
    identity_not_allowed,
    /// Denied: the policy denies everyone.
    deny_policy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Decision {
    allow,
    deny,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AuthzLabels {
    decision: Decision,
    reason: Reason,
}

/// The inbound policy in force.
#[derive(Debug, Clone)]
pub struct Policy {
    default: DefaultPolicy,
    rules: Vec<PortRule>,
    counts: Family<AuthzLabels, Counter>,
}

/// A denial, typed so callers can log it and map it to a close or a 403.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unauthorized: {reason:?} for port {port}")]
pub struct Denied {
    pub port: u16,
    pub reason: Reason,
}

impl Policy {
    pub fn new(default: DefaultPolicy, rules: Vec<PortRule>) -> Self {
        Policy {
            default,
            rules,
            counts: Family::default(),
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "inbound_authz",
            "Inbound authorization decisions, by reason",
            self.counts.clone(),
        );
    }

    /// Decides whether `client` (None: not meshed) may reach `port`, and counts the decision.
    pub fn authorize(&self, port: u16, client: Option<&SpiffeId>) -> Result<Reason, Denied> {
        let allow = self
            .rules
            .iter()
            .find(|r| r.ports.contains(port))
            .map(|r| r.allow.clone())
            .unwrap_or(match self.default {
                DefaultPolicy::AllUnauthenticated => Allow::Unauthenticated,
                DefaultPolicy::AllAuthenticated => Allow::Authenticated,
                DefaultPolicy::Deny => Allow::Deny,
            });
        let result = match (&allow, client) {
            (Allow::Deny, _) => Err(Reason::deny_policy),
            (Allow::Unauthenticated, _) => Ok(Reason::unauthenticated_allowed),
            (_, None) => Err(Reason::mtls_required),
            (Allow::Authenticated, Some(_)) => Ok(Reason::authenticated),
            (Allow::Identities(list), Some(id)) if list.iter().any(|p| p.matches(id)) => {
                Ok(Reason::identity_allowed)
            }
            (Allow::Identities(_), Some(_)) => Err(Reason::identity_not_allowed),
        };
        let (decision, reason) = match result {
            Ok(r) => (Decision::allow, r),
            Err(r) => (Decision::deny, r),
        };
        self.counts
            .get_or_create(&AuthzLabels { decision, reason })
            .inc();
        result.map_err(|reason| Denied { port, reason })
    }
}

impl fmt::Display for DefaultPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DefaultPolicy::AllUnauthenticated => "all-unauthenticated",
            DefaultPolicy::AllAuthenticated => "all-authenticated",
            DefaultPolicy::Deny => "deny",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        s.parse().expect("valid id")
    }

    #[test]
    fn rules_parse_and_reject() {
        let r: PortRule = "8080=authenticated".parse().expect("parses");
        assert_eq!(r.allow, Allow::Authenticated);
        let r: PortRule = "9000-9100=spiffe://td/ns/shop/sa/web;spiffe://td/ns/ops/*"
            .parse()
            .expect("parses");
        let Allow::Identities(list) = r.allow else {
            panic!("identities");
        };
        assert_eq!(list.len(), 2);
        assert!(matches!(&list[1], IdPattern::Namespace { namespace, .. } if namespace == "ops"));
        assert!("8080".parse::<PortRule>().is_err());
        assert!("8080=https://x".parse::<PortRule>().is_err());
        assert!("70000=deny".parse::<PortRule>().is_err());
    }

    #[test]
    fn decisions_follow_rules_then_default() {
        let p = Policy::new(
            DefaultPolicy::AllUnauthenticated,
            vec![
                "22=deny".parse().expect("rule"),
                "8443=authenticated".parse().expect("rule"),
                "9090=spiffe://td/ns/shop/sa/web;spiffe://td/ns/ops/*"
                    .parse()
                    .expect("rule"),
            ],
        );
        let web = id("spiffe://td/ns/shop/sa/web");
        let ops = id("spiffe://td/ns/ops/sa/anything");
        let other = id("spiffe://td/ns/shop/sa/cart");
        assert_eq!(p.authorize(80, None), Ok(Reason::unauthenticated_allowed));
        assert_eq!(
            p.authorize(22, Some(&web)).map_err(|d| d.reason),
            Err(Reason::deny_policy)
        );
        assert_eq!(
            p.authorize(8443, None).map_err(|d| d.reason),
            Err(Reason::mtls_required)
        );
        assert_eq!(p.authorize(8443, Some(&other)), Ok(Reason::authenticated));
        assert_eq!(p.authorize(9090, Some(&web)), Ok(Reason::identity_allowed));
        assert_eq!(p.authorize(9090, Some(&ops)), Ok(Reason::identity_allowed));
        assert_eq!(
            p.authorize(9090, Some(&other)).map_err(|d| d.reason),
            Err(Reason::identity_not_allowed)
        );
        let strict = Policy::new(DefaultPolicy::AllAuthenticated, vec![]);
        assert!(strict.authorize(80, None).is_err());
        assert!(strict.authorize(80, Some(&web)).is_ok());
        let deny = Policy::new(DefaultPolicy::Deny, vec![]);
        assert!(deny.authorize(80, Some(&web)).is_err());
    }
}
