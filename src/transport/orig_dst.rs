//! The original destination of a redirected connection, from `SO_ORIGINAL_DST` (IPv4) and
//! `IP6T_SO_ORIGINAL_DST` (IPv6), via socket2: no unsafe code.
//!
//! `ENOENT` (or a result equal to the socket's own local address) means the connection was not
//! redirected by iptables: it was made to the listener directly.

use std::io;
use std::net::SocketAddr;

use socket2::SockRef;
use tokio::net::TcpStream;

use crate::addr::OrigDstAddr;

/// Looks up where the client originally connected. `Ok(None)`: not redirected.
pub fn lookup(stream: &TcpStream) -> io::Result<Option<OrigDstAddr>> {
    let local = stream.local_addr()?;
    let sock = SockRef::from(stream);
    let res = match local {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        // A v4 client accepted on a dual-stack v6 socket is still NATed by the v4 table.
        SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_some() => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock.original_dst_v6(),
    };
    match res {
        Ok(addr) => match addr.as_socket() {
            Some(dst) if normalize(dst) == normalize(local) => Ok(None),
            Some(dst) => Ok(Some(OrigDstAddr(normalize(dst)))),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "SO_ORIGINAL_DST returned a non-IP address",
            )),
        },
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Turns `::ffff:a.b.c.d` into `a.b.c.d` so comparisons and logs use one form.
pub fn normalize(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn direct_connection_is_not_redirected() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let client = TcpStream::connect(addr);
        let (accepted, _) = tokio::join!(l.accept(), client);
        let (s, _) = accepted.expect("accept");
        assert_eq!(lookup(&s).expect("lookup"), None);
    }

    #[test]
    fn mapped_addresses_normalize() {
        let a: SocketAddr = "[::ffff:198.18.0.1]:80".parse().expect("addr");
        assert_eq!(
            normalize(a),
            "198.18.0.1:80".parse::<SocketAddr>().expect("addr")
        );
    }
}
