//! Sockets: binding listeners, reading the original destination, connecting, and copying bytes.
//!
//! ```text
//! listen::bind ─▶ accept ─▶ orig_dst::lookup ─▶ connect::connect ─▶ copy::copy_bidirectional
//! ```

pub mod connect;
pub mod copy;
pub mod counted;
pub mod listen;
pub mod orig_dst;
pub mod prefixed;
