//! Giving freed memory back to the OS after a burst of connections.
//!
//! glibc's malloc keeps freed small blocks in its arenas: after 1,000 connections close, RSS
//! stays at the burst's high-water mark. [`trim`] asks glibc to release every free page
//! (`malloc_trim(0)`, which `madvise`s free pages anywhere in the heap, not only at its top).
//! The admin thread calls it every [`TRIM_INTERVAL`]; it costs well under a millisecond for a
//! heap of a few MiB, and nothing when there is nothing to release.
//!
//! This is the crate's only `unsafe`: `malloc_trim` is a C function, so calling it is `unsafe`
//! in Rust, but it takes an integer and touches only the allocator's own state. Elsewhere
//! `unsafe_code` is denied (lib.rs).

#![allow(unsafe_code)]

use std::time::Duration;

/// How often the admin thread trims.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(10);

/// Releases free heap pages to the OS (glibc); a no-op on other C libraries.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions: it takes a size hint and only walks the
    // allocator's own arenas under the allocator's locks.
    unsafe {
        libc::malloc_trim(0);
    }
}
