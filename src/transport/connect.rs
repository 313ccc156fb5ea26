//! Connecting to a destination with a timeout, mapping failures to typed [`ConnError`]s.

use std::io;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::addr::OrigDstAddr;
use crate::error::ConnError;

/// Connects to `dst` within `timeout`, with `TCP_NODELAY` set (the proxy forwards what it reads
/// at once; Nagle would only add latency).
pub async fn connect(dst: OrigDstAddr, timeout: Duration) -> Result<TcpStream, ConnError> {
    match tokio::time::timeout(timeout, TcpStream::connect(dst.0)).await {
        Err(_) => Err(ConnError::ConnectTimeout(dst)),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            Err(ConnError::ConnectRefused(dst))
        }
        Ok(Err(e)) => Err(ConnError::Connect(dst, e)),
        Ok(Ok(s)) => {
            s.set_nodelay(true)
                .map_err(|e| ConnError::Connect(dst, e))?;
            Ok(s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refused_is_typed() {
        // Bind then drop: the port is closed and nothing listens.
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        drop(l);
        let err = connect(OrigDstAddr(addr), Duration::from_secs(1))
            .await
            .expect_err("refused");
        assert!(matches!(err, ConnError::ConnectRefused(_)), "{err}");
    }
}
