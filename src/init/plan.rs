//! The pure planner: `tern init`'s flags in, iptables rules (table `nat`) out, per IP family.
//!
//! ```text
//! PREROUTING ─(-p tcp)─▶ TERN_INBOUND:  RETURN admin port, skipped inbound ports
//!                                       else REDIRECT --to-ports 4143
//! OUTPUT     ─(-p tcp)─▶ TERN_OUTBOUND: RETURN proxy UID, -o lo, loopback destinations,
//!                                       skipped outbound ports, skipped subnets (this family)
//!                                       else REDIRECT --to-ports 4140
//! ```
//!
//! Nothing here touches the system: [`plan`] validates the flags and builds a [`Plan`];
//! [`FamilyPlan::restore_input`] turns one family's rules plus the table's current
//! `iptables-save -t nat` output into the input of one `iptables-restore --noflush` call.
//!
//! Idempotency: the restore input declares the `TERN_*` chains, which flushes them (with
//! `--noflush` nothing else in the table is flushed), and refills them. The two jump rules in the
//! built-in chains cannot be flushed that way, so they are reconciled against `iptables-save`:
//! when exactly the planned jump is present it is left alone; otherwise every jump to a `TERN_*`
//! chain in that built-in chain is deleted (`-D`) and the planned one appended, in the same
//! transaction. Running `tern init` twice leaves one copy of every rule.
//!
//! Errors: [`PlanError`] names the flag and value of a cross-field problem. No metrics.

use std::fmt::{self, Write as _};

use ipnet::IpNet;

use crate::addr::PortRange;
use crate::cli::{InitArgs, IpFamilies};

/// Prefix of every rule comment; marks a rule as tern's.
pub const COMMENT_PREFIX: &str = "tern:";

/// A flag combination `tern init` refuses, before any rule is touched.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("--{flag} ({env}) must be a port between 1 and 65535, got 0")]
    ZeroPort {
        flag: &'static str,
        env: &'static str,
    },
    #[error("--{a} and --{b} are both {port}: the proxy's listeners need distinct ports")]
    PortClash {
        a: &'static str,
        b: &'static str,
        port: u16,
    },
    #[error(
        "--proxy-uid (TERN_PROXY_UID) is 0: every process running as root would bypass the proxy; \
         run the proxy as its own UID (default 2102)"
    )]
    RootProxyUid,
}

/// An IP family: which `iptables` binary family the rules are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// The chains tern writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chain {
    Prerouting,
    Output,
    /// tern's own chain for inbound TCP, reached from PREROUTING.
    Inbound,
    /// tern's own chain for outbound TCP, reached from OUTPUT.
    Outbound,
}

impl Chain {
    pub fn name(self) -> &'static str {
        match self {
            Chain::Prerouting => "PREROUTING",
            Chain::Output => "OUTPUT",
            Chain::Inbound => "TERN_INBOUND",
            Chain::Outbound => "TERN_OUTBOUND",
        }
    }
}

/// What a matching packet does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Leave tern's chain: the packet is not redirected.
    Return,
    /// Send the connection to a local port (the proxy's listener).
    Redirect(u16),
    /// Continue in one of tern's chains.
    Jump(Chain),
}

/// One rule: `-A <chain> <matches> -m comment --comment "tern: <why>" -j <target>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub chain: Chain,
    /// Match arguments, in the order iptables-save prints them.
    pub matches: Vec<String>,
    /// Why the rule exists (after the `tern:` prefix).
    pub comment: String,
    pub target: Target,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-A {}", self.chain.name())?;
        for m in &self.matches {
            write!(f, " {m}")?;
        }
        write!(
            f,
            " -m comment --comment \"{COMMENT_PREFIX} {}\"",
            self.comment
        )?;
        match self.target {
            Target::Return => f.write_str(" -j RETURN"),
            Target::Redirect(port) => write!(f, " -j REDIRECT --to-ports {port}"),
            Target::Jump(chain) => write!(f, " -j {}", chain.name()),
        }
    }
}

/// The rules of one IP family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyPlan {
    pub family: Family,
    /// Jump rules in the built-in chains (PREROUTING, OUTPUT).
    pub jumps: Vec<Rule>,
    /// Rules of tern's own chains, in order.
    pub rules: Vec<Rule>,
}

/// Everything `tern init` would install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub families: Vec<FamilyPlan>,
    /// Things the operator should know, e.g. skipped subnets of a family that gets no rules.
    pub notes: Vec<String>,
}

/// Validates the flags and plans the rules. Pure: reads nothing but `args`.
pub fn plan(args: &InitArgs) -> Result<Plan, PlanError> {
    check(args)?;
    let families: &[Family] = match args.ip_families {
        IpFamilies::Dual => &[Family::V4, Family::V6],
        IpFamilies::V4 => &[Family::V4],
        IpFamilies::V6 => &[Family::V6],
    };
    let mut notes = Vec::new();
    for net in &args.skip_subnets {
        if !families.contains(&family_of(net)) {
            notes.push(format!(
                "--skip-subnets {net} is {} but only {} rules are planned: ignored",
                family_of(net),
                families[0]
            ));
        }
    }
    Ok(Plan {
        families: families.iter().map(|&f| plan_family(args, f)).collect(),
        notes,
    })
}

impl Plan {
    /// The plan as `--dry-run` prints it: per family, the restore input for a pod with no rules yet.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for note in &self.notes {
            let _ = writeln!(out, "# note: {note}");
        }
        for fp in &self.families {
            let _ = writeln!(
                out,
                "# {}: {}-restore --noflush (table nat)",
                fp.family,
                match fp.family {
                    Family::V4 => "iptables",
                    Family::V6 => "ip6tables",
                }
            );
            out.push_str(&fp.restore_input(""));
        }
        out
    }

    pub fn family(&self, family: Family) -> Option<&FamilyPlan> {
        self.families.iter().find(|f| f.family == family)
    }
}

impl FamilyPlan {
    /// The `iptables-restore --noflush` input that brings table `nat`, whose current state is
    /// `existing` (`iptables-save -t nat` output; empty for a fresh pod), to this plan.
    pub fn restore_input(&self, existing: &str) -> String {
        let mut out = String::from("*nat\n");
        for chain in [Chain::Inbound, Chain::Outbound] {
            // Declaring a chain creates it, or flushes it when it exists.
            let _ = writeln!(out, ":{} - [0:0]", chain.name());
        }
        for jump in &self.jumps {
            let wanted = jump.to_string();
            let present = tern_jumps(existing, jump.chain);
            if present.len() == 1 && present[0] == wanted {
                continue;
            }
            for stale in present {
                let _ = writeln!(out, "-D{}", &stale["-A".len()..]);
            }
            let _ = writeln!(out, "{wanted}");
        }
        for rule in &self.rules {
            let _ = writeln!(out, "{rule}");
        }
        out.push_str("COMMIT\n");
        out
    }

    /// How many rules this family installs (jumps and chain rules), each carrying a tern comment.
    pub fn rule_count(&self) -> usize {
        self.jumps.len() + self.rules.len()
    }
}

/// Lines of `save` in `chain` that jump to one of tern's chains.
fn tern_jumps(save: &str, chain: Chain) -> Vec<&str> {
    let prefix = format!("-A {} ", chain.name());
    save.lines()
        .map(str::trim_end)
        .filter(|l| l.starts_with(&prefix))
        .filter(|l| {
            let mut words = l.split_whitespace().rev();
            let last = words.next().unwrap_or_default();
            words.next() == Some("-j")
                && (last == Chain::Inbound.name() || last == Chain::Outbound.name())
        })
        .collect()
}

fn check(a: &InitArgs) -> Result<(), PlanError> {
    let ports = [
        ("inbound-port", "TERN_INBOUND_PORT", a.inbound_port),
        ("outbound-port", "TERN_OUTBOUND_PORT", a.outbound_port),
        ("admin-port", "TERN_ADMIN_PORT", a.admin_port),
    ];
    for (flag, env, port) in ports {
        if port == 0 {
            return Err(PlanError::ZeroPort { flag, env });
        }
    }
    for (i, (a_flag, _, a_port)) in ports.iter().enumerate() {
        for (b_flag, _, b_port) in &ports[i + 1..] {
            if a_port == b_port {
                return Err(PlanError::PortClash {
                    a: a_flag,
                    b: b_flag,
                    port: *a_port,
                });
            }
        }
    }
    if a.proxy_uid == 0 {
        return Err(PlanError::RootProxyUid);
    }
    Ok(())
}

fn family_of(net: &IpNet) -> Family {
    match net {
        IpNet::V4(_) => Family::V4,
        IpNet::V6(_) => Family::V6,
    }
}

fn plan_family(a: &InitArgs, family: Family) -> FamilyPlan {
    let tcp = || vec!["-p".to_string(), "tcp".to_string()];
    let tcp_dport = |r: &PortRange| {
        vec![
            "-p".into(),
            "tcp".into(),
            "-m".into(),
            "tcp".into(),
            "--dport".into(),
            r.to_string(),
        ]
    };
    let rule = |chain, matches, comment: String, target| Rule {
        chain,
        matches,
        comment,
        target,
    };

    let jumps = vec![
        rule(
            Chain::Prerouting,
            tcp(),
            "inbound TCP to the proxy".into(),
            Target::Jump(Chain::Inbound),
        ),
        rule(
            Chain::Output,
            tcp(),
            "outbound TCP to the proxy".into(),
            Target::Jump(Chain::Outbound),
        ),
    ];

    let mut rules = Vec::new();
    let admin = PortRange {
        first: a.admin_port,
        last: a.admin_port,
    };
    rules.push(rule(
        Chain::Inbound,
        tcp_dport(&admin),
        format!("skip the admin port {}", a.admin_port),
        Target::Return,
    ));
    for r in dedup(&a.skip_inbound_ports) {
        rules.push(rule(
            Chain::Inbound,
            tcp_dport(&r),
            format!("skip inbound port {}", port_text(&r)),
            Target::Return,
        ));
    }
    rules.push(rule(
        Chain::Inbound,
        tcp(),
        format!("redirect inbound TCP to the proxy port {}", a.inbound_port),
        Target::Redirect(a.inbound_port),
    ));

    rules.push(rule(
        Chain::Outbound,
        vec![
            "-m".into(),
            "owner".into(),
            "--uid-owner".into(),
            a.proxy_uid.to_string(),
        ],
        format!("skip traffic of the proxy (uid {})", a.proxy_uid),
        Target::Return,
    ));
    rules.push(rule(
        Chain::Outbound,
        vec!["-o".into(), "lo".into()],
        "skip traffic on the loopback interface".into(),
        Target::Return,
    ));
    let loopback = match family {
        Family::V4 => "127.0.0.0/8",
        Family::V6 => "::1/128",
    };
    rules.push(rule(
        Chain::Outbound,
        vec!["-d".into(), loopback.into()],
        "skip loopback destinations".into(),
        Target::Return,
    ));
    for r in dedup(&a.skip_outbound_ports) {
        rules.push(rule(
            Chain::Outbound,
            tcp_dport(&r),
            format!("skip outbound port {}", port_text(&r)),
            Target::Return,
        ));
    }
    let mut subnets: Vec<IpNet> = Vec::new();
    for net in a.skip_subnets.iter().filter(|n| family_of(n) == family) {
        if !subnets.contains(&net.trunc()) {
            subnets.push(net.trunc());
        }
    }
    for net in subnets {
        rules.push(rule(
            Chain::Outbound,
            vec!["-d".into(), net.to_string()],
            format!("skip subnet {net}"),
            Target::Return,
        ));
    }
    rules.push(rule(
        Chain::Outbound,
        tcp(),
        format!(
            "redirect outbound TCP to the proxy port {}",
            a.outbound_port
        ),
        Target::Redirect(a.outbound_port),
    ));
    FamilyPlan {
        family,
        jumps,
        rules,
    }
}

/// Ranges in flag order, without repeats.
fn dedup(ranges: &[PortRange]) -> Vec<PortRange> {
    let mut out: Vec<PortRange> = Vec::new();
    for r in ranges {
        if !out.contains(r) {
            out.push(*r);
        }
    }
    out
}

/// `22` or `9000-9100`, as the operator wrote it (the rule itself uses iptables' `a:b`).
fn port_text(r: &PortRange) -> String {
    if r.first == r.last {
        r.first.to_string()
    } else {
        format!("{}-{}", r.first, r.last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;
    use std::path::PathBuf;

    fn args(extra: &[&str]) -> InitArgs {
        let mut argv = vec!["tern", "init"];
        argv.extend_from_slice(extra);
        let cli = Cli::try_parse_from(argv).expect("clap parses");
        let Command::Init(a) = cli.command else {
            panic!("expected init");
        };
        a
    }

    /// Compares `actual` with `tests/golden/init/<name>`; `TERN_BLESS=1` rewrites the file.
    fn golden(name: &str, actual: &str) {
        let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests", "golden", "init", name]
            .iter()
            .collect();
        if std::env::var_os("TERN_BLESS").is_some_and(|v| v == "1") {
            std::fs::create_dir_all(path.parent().expect("golden dir")).expect("mkdir golden");
            std::fs::write(&path, actual).expect("write golden");
            return;
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run with TERN_BLESS=1 to create it)",
                path.display()
            )
        });
        assert_eq!(
            expected,
            actual,
            "{} differs (TERN_BLESS=1 regenerates it after a deliberate change)",
            path.display()
        );
    }

    #[test]
    fn golden_defaults() {
        golden("defaults.rules", &plan(&args(&[])).expect("plan").render());
    }

    #[test]
    fn golden_skips_dual() {
        let p = plan(&args(&[
            "--skip-inbound-ports",
            "22,9000-9100,22",
            "--skip-outbound-ports",
            "3306,5432-5433",
            "--skip-subnets",
            "198.18.4.0/24,2001:db8:1::/48,198.19.0.7/16,198.18.4.9/24",
            "--proxy-uid",
            "1337",
        ]))
        .expect("plan");
        golden("skips_dual.rules", &p.render());
    }

    #[test]
    fn golden_v4_only_with_v6_subnet() {
        let p = plan(&args(&[
            "--ip-families",
            "v4",
            "--skip-subnets",
            "2001:db8::/32,198.18.0.0/15",
            "--inbound-port",
            "14143",
            "--outbound-port",
            "14140",
            "--admin-port",
            "14191",
        ]))
        .expect("plan");
        assert_eq!(p.families.len(), 1);
        assert_eq!(p.notes.len(), 1, "the IPv6 subnet is reported, not applied");
        golden("v4_only.rules", &p.render());
    }

    #[test]
    fn golden_v6_only() {
        let p = plan(&args(&["--ip-families", "v6"])).expect("plan");
        golden("v6_only.rules", &p.render());
    }

    #[test]
    fn every_rule_is_commented_and_subnets_go_to_their_family() {
        let p = plan(&args(&["--skip-subnets", "198.18.4.0/24,2001:db8:1::/48"])).expect("plan");
        for fp in &p.families {
            for r in fp.jumps.iter().chain(&fp.rules) {
                assert!(
                    r.to_string().contains("--comment \"tern: "),
                    "uncommented: {r}"
                );
            }
        }
        let v4 = p.family(Family::V4).expect("v4").restore_input("");
        let v6 = p.family(Family::V6).expect("v6").restore_input("");
        assert!(v4.contains("-d 198.18.4.0/24") && !v4.contains("2001:db8"));
        assert!(v6.contains("-d 2001:db8:1::/48") && !v6.contains("198.18"));
    }

    #[test]
    fn cross_field_errors_name_the_flags() {
        let e = plan(&args(&["--inbound-port", "4140"])).expect_err("clash");
        assert_eq!(
            e,
            PlanError::PortClash {
                a: "inbound-port",
                b: "outbound-port",
                port: 4140
            }
        );
        assert!(e.to_string().contains("--inbound-port"), "{e}");
        let e = plan(&args(&["--admin-port", "0"])).expect_err("zero");
        assert!(e.to_string().contains("--admin-port"), "{e}");
        let e = plan(&args(&["--proxy-uid", "0"])).expect_err("root");
        assert!(e.to_string().contains("--proxy-uid"), "{e}");
    }

    /// What iptables-save prints once `fp` is installed (the jump lines are all that matter).
    fn installed(fp: &FamilyPlan, extra: &str) -> String {
        let mut s = String::from("*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
        s.push_str(extra);
        for j in &fp.jumps {
            s.push_str(&format!("{j}\n"));
        }
        s.push_str("COMMIT\n");
        s
    }

    #[test]
    fn rerun_keeps_existing_jumps_and_replaces_stale_ones() {
        let p = plan(&args(&[])).expect("plan");
        let fp = p.family(Family::V4).expect("v4");
        let fresh = fp.restore_input("");
        assert_eq!(fresh.matches("-j TERN_INBOUND").count(), 1);
        assert_eq!(fresh.matches("-j TERN_OUTBOUND").count(), 1);

        // Second run: the jumps are present exactly once, so only the chains are rewritten.
        let again = fp.restore_input(&installed(fp, "-A PREROUTING -p udp -j ACCEPT\n"));
        assert!(!again.contains("-A PREROUTING"), "{again}");
        assert!(!again.contains("-A OUTPUT"), "{again}");
        assert!(!again.contains("-D "), "{again}");
        assert!(again.contains(":TERN_INBOUND - [0:0]"), "{again}");

        // A stale jump (older comment) and a duplicate: delete all, add one.
        let stale = "-A OUTPUT -p tcp -m comment --comment \"tern: old\" -j TERN_OUTBOUND\n";
        let fixed = fp.restore_input(&installed(fp, stale));
        assert!(
            fixed.contains("-D OUTPUT -p tcp -m comment --comment \"tern: old\" -j TERN_OUTBOUND"),
            "{fixed}"
        );
        assert_eq!(fixed.matches("-D OUTPUT").count(), 2, "{fixed}");
        assert_eq!(fixed.matches("-A OUTPUT").count(), 1, "{fixed}");
        assert!(!fixed.contains("PREROUTING"), "{fixed}");
    }
}
