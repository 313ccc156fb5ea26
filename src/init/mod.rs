//! `tern init`: installs the pod's iptables rules (table `nat`) that send its TCP through the proxy.
//!
//! ```text
//! flags ─▶ plan::plan (pure, validated) ─▶ --dry-run? print ─▶ exec::detect backend
//!       ─▶ per family: iptables-save ─▶ FamilyPlan::restore_input ─▶ ONE iptables-restore --noflush
//! ```
//!
//! [`plan`] is the pure core (golden-file tests in `tests/golden/init/`); [`exec`] is the thin
//! executor. Every problem with the flags is reported before any rule is touched. In `dual` mode a
//! kernel without IPv6 gets IPv4 rules only, with a warning. No metrics: this runs once, in an
//! init container, and its output is the record.

pub mod exec;
pub mod plan;

use anyhow::Context;

use crate::cli::{InitArgs, IpFamilies};

pub use plan::{Family, FamilyPlan, Plan, PlanError, plan};

/// Runs `tern init`.
pub fn main(args: &InitArgs) -> anyhow::Result<()> {
    let plan = plan::plan(args)?;
    for note in &plan.notes {
        tracing::warn!("{note}");
    }
    if args.dry_run {
        print!("{}", plan.render());
        return Ok(());
    }
    let ipv6 = exec::ipv6_enabled();
    if !ipv6 && args.ip_families == IpFamilies::V6 {
        anyhow::bail!(
            "--ip-families (TERN_IP_FAMILIES) v6: IPv6 is disabled in this network namespace"
        );
    }
    let flavor = exec::detect(args.backend).context("choosing the iptables backend")?;
    println!("tern init: using the {flavor} iptables backend");
    for fp in &plan.families {
        if fp.family == Family::V6 && !ipv6 {
            tracing::warn!("IPv6 is disabled in this network namespace: no IPv6 rules installed");
            println!("tern init: IPv6 is disabled here; skipped IPv6 rules");
            continue;
        }
        let cmd = exec::apply(flavor, fp)
            .with_context(|| format!("installing the {} rules", fp.family))?;
        println!(
            "tern init: {}: {} rules installed with `{cmd}`",
            fp.family,
            fp.rule_count()
        );
    }
    Ok(())
}
