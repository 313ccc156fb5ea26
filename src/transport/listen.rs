//! Binding listeners, with the IPv6 → IPv4 fallback the defaults rely on.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

/// Default backlog of pending (not yet accepted) connections per listener (`--listen-backlog`).
pub const BACKLOG: u32 = 1024;

/// Binds `addr`. An unspecified IPv6 address (`[::]`) is dual-stack; where IPv6 is disabled it
/// falls back to `0.0.0.0` on the same port.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    match bind_exact(addr, backlog) {
        Ok(l) => Ok(l),
        Err(e) if addr.is_ipv6() && addr.ip().is_unspecified() && ipv6_unavailable(&e) => {
            tracing::warn!(%addr, error = %e, "IPv6 unavailable; binding 0.0.0.0 instead");
            bind_exact(
                SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port()),
                backlog,
            )
        }
        Err(e) => Err(e),
    }
}

/// Binds every address in `addrs`, skipping IPv6 ones that cannot be bound because IPv6 is off.
/// Fails when none could be bound.
pub fn bind_all(addrs: &[SocketAddr], backlog: u32) -> io::Result<Vec<TcpListener>> {
    let mut out = Vec::new();
    let mut last_err = None;
    for &addr in addrs {
        match bind_exact(addr, backlog) {
            Ok(l) => out.push(l),
            Err(e) if addr.is_ipv6() && ipv6_unavailable(&e) => {
                tracing::warn!(%addr, error = %e, "IPv6 unavailable; skipping listener");
                last_err = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    if out.is_empty() {
        return Err(last_err.unwrap_or_else(|| io::Error::other("no listener address given")));
    }
    Ok(out)
}

fn ipv6_unavailable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL) | Some(libc::EPROTONOSUPPORT)
    )
}

fn bind_exact(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(!addr.ip().is_unspecified())?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    TcpListener::from_std(socket.into())
}
