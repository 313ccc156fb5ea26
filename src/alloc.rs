//! Giving freed memory back to the OS after a burst of connections.
//!
//! glibc's malloc keeps freed small blocks in its arenas: after 1,000 connections close, RSS
//! stays at the burst's high-water mark. [`trim`] asks glibc to release every free page
//! (`malloc_trim(0)`, which `madvise`s free pages anywhere in the heap, not only at its top).
//! The admin thread calls it every [`TRIM_INTERVAL`]; it costs well under a millisecond for a
//! heap of a few MiB, and nothing when there is nothing to release.
//!
//! With the opt-in `mimalloc` feature (the binary's global allocator, main.rs) [`trim`] also
//! calls `mi_collect(true)`: mimalloc purges freed pages only after a delay and only when some
//! thread allocates again, so an idle proxy would keep a burst's pages. glibc's `malloc_trim`
//! stays in that build: C code (aws-lc) still allocates with glibc's malloc.
//!
//! This is the crate's only `unsafe`: `malloc_trim` (and `mi_collect`) are C functions, so
//! calling them is `unsafe` in Rust, but they take a plain value and touch only the allocator's
//! own state. Elsewhere `unsafe_code` is denied (lib.rs).

#![allow(unsafe_code)]

use std::time::Duration;

/// How often the admin thread trims.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(10);

/// Releases free heap pages to the OS (glibc; and mimalloc when it is the global allocator).
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions: it takes a size hint and only walks the
    // allocator's own arenas under the allocator's locks.
    unsafe {
        libc::malloc_trim(0);
    }
    #[cfg(feature = "mimalloc")]
    // SAFETY: mi_collect has no preconditions: it frees this thread's empty pages and purges
    // the process-wide arenas under mimalloc's own synchronisation.
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
}
