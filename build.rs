//! Build script: link-time function ordering and packed relocations for the `tern` binary
//! (issue 7, idle memory).
//!
//! An idle sidecar's RSS is mostly file-backed text pages, and the kernel maps a 64 KiB window
//! around every page the process touches, so RSS follows how many distinct windows the startup
//! and request-path code is spread over. `benches/harness/tern.order` (generated from a real run
//! by `benches/harness/orderfile.sh`, see benches/README.md "Idle memory") lists the functions that
//! run, startup first; handing it to lld (`--symbol-ordering-file`) places them contiguously at
//! the front of `.text`.
//!
//! Applied only where it is known to be safe: the release profile, target
//! `x86_64-unknown-linux-gnu`, rustc >= 1.90 (which links with its bundled lld there by default),
//! no linker chosen through RUSTFLAGS or `CARGO_TARGET_<triple>_LINKER`, and the order file present.
//! `TERN_NO_ORDERFILE=1` opts out. Names in the file that no longer exist (code changed, another
//! rustc) are ignored by lld (`--no-warn-symbol-ordering`): a stale file only loses its effect,
//! and a large one (benches/README.md, "Keeping the order file fresh").
//!
//! Under the same conditions, and when the build host's glibc is 2.36 or newer (the first to read
//! them), relative relocations are packed (`-z pack-relative-relocs`, DT_RELR): the PIE binary's
//! ~36k pointer fix-ups take a few KiB instead of an 860 KiB `.rela.dyn` that the dynamic loader
//! reads in full at every start, file-backed RSS of every sidecar. A binary linked this way
//! refuses to start on an older glibc with a clear loader error (`GLIBC_ABI_DT_RELR`); the image's
//! runtime stage is Debian bookworm (2.36). `TERN_NO_RELR=1` opts out.
//! No metrics, no errors: every unmet condition just skips the ordering.

use std::path::Path;
use std::process::Command;

const ORDER_FILE: &str = "benches/harness/tern.order";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={ORDER_FILE}");
    println!("cargo:rerun-if-env-changed=TERN_NO_ORDERFILE");
    println!("cargo:rerun-if-env-changed=TERN_NO_RELR");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER");

    let env = |k: &str| std::env::var(k).unwrap_or_default();
    if env("PROFILE") != "release"
        || env("TARGET") != "x86_64-unknown-linux-gnu"
        || !env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER").is_empty()
    {
        return;
    }
    // A linker or linker flavour chosen by the user may not be lld: leave linking alone.
    let rustflags = env("CARGO_ENCODED_RUSTFLAGS");
    if rustflags.contains("linker") || rustflags.contains("link-self-contained") {
        return;
    }
    let Some(minor) = rustc_minor(&env("RUSTC")) else {
        return;
    };
    if minor < 90 {
        return;
    }
    if env("TERN_NO_RELR") != "1" && glibc_minor().is_some_and(|m| m >= 36) {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    let order = Path::new(&env("CARGO_MANIFEST_DIR")).join(ORDER_FILE);
    if env("TERN_NO_ORDERFILE") == "1" || !order.is_file() {
        return;
    }
    println!(
        "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
        order.display()
    );
    println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
}

/// The minor version of the build host's glibc (`getconf GNU_LIBC_VERSION`: `glibc 2.36`).
fn glibc_minor() -> Option<u32> {
    minor_version(Command::new("getconf").arg("GNU_LIBC_VERSION"), "2")
}

/// The minor version of a `1.x.y` rustc, from `rustc -V`.
fn rustc_minor(rustc: &str) -> Option<u32> {
    let rustc = if rustc.is_empty() { "rustc" } else { rustc };
    minor_version(Command::new(rustc).arg("-V"), "1")
}

/// `y` of the `major.y[.z]` that is the second word of `cmd`'s output.
fn minor_version(cmd: &mut Command, major: &str) -> Option<u32> {
    let out = cmd.output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let version = text.split_whitespace().nth(1)?;
    let mut parts = version.split('.');
    if parts.next()? != major {
        return None;
    }
    parts.next()?.parse().ok()
}
