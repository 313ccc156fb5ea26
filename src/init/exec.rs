//! The thin executor: picks the iptables backend, reads the table, applies a family's plan with
//! exactly one `iptables-restore --noflush` (or `ip6tables-restore`) call, and checks the result.
//!
//! Backend detection (`--backend auto`): nft when `iptables-nft-save -t nat` works here, unless
//! the legacy backend already holds nat rules and nft holds none (mixing backends in one pod
//! makes rules from both apply in an order nobody chose); legacy when nft does not work.
//!
//! Errors: [`ExecError`], naming the command and its stderr. No metrics.

use std::fmt;
use std::io::Write;
use std::process::{Command, Stdio};

use crate::cli::Backend;

use super::plan::{COMMENT_PREFIX, Family, FamilyPlan};

/// A concrete iptables backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Nft,
    Legacy,
}

impl fmt::Display for Flavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Flavor::Nft => "nft",
            Flavor::Legacy => "legacy",
        })
    }
}

impl Flavor {
    /// The binary for `family` and `tool` (`save` or `restore`), e.g. `ip6tables-nft-restore`.
    pub fn binary(self, family: Family, tool: &str) -> String {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        format!("{base}-{self}-{tool}")
    }
}

/// Why applying the rules failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot run `{cmd}`: {source} (is iptables installed?)")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Failed {
        cmd: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("--backend (TERN_IPTABLES_BACKEND) {requested}: `{cmd}` does not work here: {reason}")]
    BackendUnavailable {
        requested: &'static str,
        cmd: String,
        reason: String,
    },
    #[error(
        "no iptables backend works here (nft: {nft}; legacy: {legacy}); tern init needs NET_ADMIN and iptables"
    )]
    NoBackend { nft: String, legacy: String },
    #[error(
        "after {cmd}, {family} table nat holds {found} tern rules where {expected} were planned"
    )]
    Mismatch {
        cmd: String,
        family: Family,
        found: usize,
        expected: usize,
    },
}

/// Chooses the backend for `--backend`.
pub fn detect(requested: Backend) -> Result<Flavor, ExecError> {
    match requested {
        Backend::Nft => probe(Flavor::Nft)
            .map(|_| Flavor::Nft)
            .map_err(|e| unavailable("nft", Flavor::Nft, e)),
        Backend::Legacy => probe(Flavor::Legacy)
            .map(|_| Flavor::Legacy)
            .map_err(|e| unavailable("legacy", Flavor::Legacy, e)),
        Backend::Auto => match (probe(Flavor::Nft), probe(Flavor::Legacy)) {
            (Ok(nft), Ok(legacy)) if !has_rules(&nft) && has_rules(&legacy) => {
                tracing::info!("legacy iptables already holds nat rules; staying on legacy");
                Ok(Flavor::Legacy)
            }
            (Ok(_), _) => Ok(Flavor::Nft),
            (Err(_), Ok(_)) => Ok(Flavor::Legacy),
            (Err(nft), Err(legacy)) => Err(ExecError::NoBackend {
                nft: nft.to_string(),
                legacy: legacy.to_string(),
            }),
        },
    }
}

/// `<family>-<flavor>-save -t nat`.
pub fn save(flavor: Flavor, family: Family) -> Result<String, ExecError> {
    run(&flavor.binary(family, "save"), &["-t", "nat"], None)
}

/// Applies `fp` with one restore call and checks that each planned rule is installed once.
/// Returns the restore command line that ran.
pub fn apply(flavor: Flavor, fp: &FamilyPlan) -> Result<String, ExecError> {
    let before = save(flavor, fp.family)?;
    let input = fp.restore_input(&before);
    tracing::debug!(family = %fp.family, %input, "restore input");
    let bin = flavor.binary(fp.family, "restore");
    run(&bin, &["-w", "--noflush"], Some(&input))?;
    let cmd = format!("{bin} -w --noflush");
    let after = save(flavor, fp.family)?;
    let found = after
        .lines()
        .filter(|l| l.contains(&format!("--comment \"{COMMENT_PREFIX} ")))
        .count();
    if found != fp.rule_count() {
        return Err(ExecError::Mismatch {
            cmd,
            family: fp.family,
            found,
            expected: fp.rule_count(),
        });
    }
    Ok(cmd)
}

/// Whether the kernel has IPv6 on in this network namespace.
pub fn ipv6_enabled() -> bool {
    let disabled = std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
        .map(|v| v.trim() == "1")
        .unwrap_or(true);
    !disabled && std::path::Path::new("/proc/net/if_inet6").exists()
}

fn probe(flavor: Flavor) -> Result<String, ExecError> {
    save(flavor, Family::V4)
}

fn unavailable(requested: &'static str, flavor: Flavor, e: ExecError) -> ExecError {
    ExecError::BackendUnavailable {
        requested,
        cmd: format!("{} -t nat", flavor.binary(Family::V4, "save")),
        reason: e.to_string(),
    }
}

fn has_rules(save: &str) -> bool {
    save.lines().any(|l| l.starts_with("-A "))
}

fn run(bin: &str, args: &[&str], stdin: Option<&str>) -> Result<String, ExecError> {
    let cmd = format!("{bin} {}", args.join(" "));
    let mut child = Command::new(bin)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ExecError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A write error means the child exited early; its status and stderr say why.
        let _ = pipe.write_all(input.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|source| ExecError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(ExecError::Failed {
            cmd,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binaries_are_named_per_family_and_flavor() {
        assert_eq!(
            Flavor::Nft.binary(Family::V6, "restore"),
            "ip6tables-nft-restore"
        );
        assert_eq!(
            Flavor::Legacy.binary(Family::V4, "save"),
            "iptables-legacy-save"
        );
    }

    #[test]
    fn missing_binary_is_a_spawn_error_naming_it() {
        let e = run("tern-no-such-binary", &[], None).expect_err("missing");
        assert!(e.to_string().contains("tern-no-such-binary"), "{e}");
    }
}
