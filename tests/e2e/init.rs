//! `tern init` against real iptables in fresh network namespaces.

use crate::support::{self, Netns};

fn fresh() -> Netns {
    Netns::new(format!("{}-init", support::unique()))
}

/// Lines of `rules` that carry a tern comment.
fn tern_lines(rules: &str) -> Vec<&str> {
    rules.lines().filter(|l| l.contains("\"tern: ")).collect()
}

fn twice_yields_one_copy(backend: &str) {
    if !support::ready() {
        return;
    }
    let ns = fresh();
    let dry = ns.tern_init(&["--dry-run"]);
    let planned = String::from_utf8_lossy(&dry.stdout).into_owned();
    for (save, header) in [
        (format!("iptables-{backend}-save"), "v4:"),
        (format!("ip6tables-{backend}-save"), "v6:"),
    ] {
        let section: String = planned
            .split("# IP")
            .find(|s| s.starts_with(header))
            .expect("family in plan")
            .to_string();
        let expected = section.lines().filter(|l| l.starts_with("-A ")).count();
        assert!(expected >= 8, "{planned}");

        let first = ns.tern_init(&["--backend", backend]);
        assert!(
            first.status.success(),
            "{}",
            String::from_utf8_lossy(&first.stderr)
        );
        let stdout = String::from_utf8_lossy(&first.stdout);
        assert!(
            stdout.contains(&format!("using the {backend} iptables backend")),
            "{stdout}"
        );
        let after_one = ns.nat_rules(&save);
        let second = ns.tern_init(&["--backend", backend]);
        assert!(
            second.status.success(),
            "{}",
            String::from_utf8_lossy(&second.stderr)
        );
        let after_two = ns.nat_rules(&save);
        assert_eq!(after_one, after_two, "{save} changed on the second run");

        let lines = tern_lines(&after_two);
        assert_eq!(lines.len(), expected, "{after_two}");
        let mut unique = lines.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(
            unique.len(),
            lines.len(),
            "a rule appears twice:\n{after_two}"
        );
        for needle in [
            "-j TERN_INBOUND",
            "-j TERN_OUTBOUND",
            "--dport 4191",
            "REDIRECT --to-ports 4143",
            "--uid-owner 2102",
            "-o lo",
            "REDIRECT --to-ports 4140",
        ] {
            assert_eq!(
                lines.iter().filter(|l| l.contains(needle)).count(),
                1,
                "`{needle}` once in:\n{after_two}"
            );
        }
    }
}

#[test]
fn init_twice_leaves_one_copy_nft() {
    twice_yields_one_copy("nft");
}

#[test]
fn init_twice_leaves_one_copy_legacy() {
    twice_yields_one_copy("legacy");
}

#[test]
fn dry_run_prints_and_changes_nothing() {
    if !support::ready() {
        return;
    }
    let ns = fresh();
    let before = ns.nat_rules("iptables-nft-save") + &ns.nat_rules("ip6tables-nft-save");
    let out = ns.tern_init(&["--dry-run", "--skip-inbound-ports", "22"]);
    assert!(out.status.success());
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("-A TERN_INBOUND -p tcp -m tcp --dport 22"),
        "{printed}"
    );
    assert!(printed.contains("REDIRECT --to-ports 4140"), "{printed}");
    let after = ns.nat_rules("iptables-nft-save") + &ns.nat_rules("ip6tables-nft-save");
    assert_eq!(before, after);
    assert!(!after.contains("tern:"), "{after}");
}

#[test]
fn bad_input_is_refused_before_touching_rules() {
    if !support::ready() {
        return;
    }
    let ns = fresh();
    let before = ns.nat_rules("iptables-nft-save");
    for (args, flag) in [
        (
            &["--skip-inbound-ports", "70000"][..],
            "--skip-inbound-ports",
        ),
        (&["--skip-subnets", "198.18.0/15"][..], "--skip-subnets"),
        (&["--inbound-port", "4140"][..], "--inbound-port"),
    ] {
        let out = ns.tern_init(args);
        assert!(!out.status.success(), "{args:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag), "{args:?}: {err}");
    }
    assert_eq!(before, ns.nat_rules("iptables-nft-save"));
}

#[test]
fn dual_mode_skips_ipv6_where_the_kernel_has_it_off() {
    if !support::ready() {
        return;
    }
    let ns = fresh();
    ns.run_ok(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
    let out = ns.tern_init(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("using the "), "names its backend: {stdout}");
    assert!(stdout.contains("IPv4: 8 rules installed"), "{stdout}");
    assert!(stdout.contains("skipped IPv6"), "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("IPv6 is disabled"), "warns: {stderr}");
    assert_eq!(tern_lines(&ns.nat_rules("iptables-nft-save")).len(), 8);
    assert!(tern_lines(&ns.nat_rules("ip6tables-nft-save")).is_empty());

    let v6 = ns.tern_init(&["--ip-families", "v6"]);
    assert!(!v6.status.success(), "v6 only cannot work without IPv6");
    assert!(String::from_utf8_lossy(&v6.stderr).contains("--ip-families"));
}
