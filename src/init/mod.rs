//! `tern init`: installs the pod's iptables rules. (Being built.)

use crate::cli::InitArgs;

/// Runs `tern init`.
pub fn main(_args: &InitArgs) -> anyhow::Result<()> {
    anyhow::bail!("tern init is not built yet")
}
