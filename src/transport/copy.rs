//! Opaque TCP forwarding both ways, half-close aware, with bounded buffers and live byte counts.
//!
//! Each direction reads into one fixed buffer and writes it all out before reading again, so a
//! slow reader stops the copy (TCP backpressure) and memory per connection stays at two buffers.
//! When one side finishes writing (EOF), the other side's write half is shut down and the
//! opposite direction keeps flowing until it finishes too.

use std::io;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes moved by [`copy_bidirectional`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    /// From the accepted (client) side to the server side.
    pub client_to_server: u64,
    /// From the server side to the client side.
    pub server_to_client: u64,
}

/// Counters updated as bytes move (not only at close), so long connections show up in metrics.
#[derive(Debug, Clone, Default)]
pub struct ByteCounters {
    /// Bytes read from the client.
    pub read: Counter,
    /// Bytes written to the client.
    pub write: Counter,
}

/// Copies `client` ⇄ `server` until both directions reach EOF, or either fails.
pub async fn copy_bidirectional<C, S>(
    client: &mut C,
    server: &mut S,
    buffer_size: usize,
    counters: &ByteCounters,
) -> io::Result<Transferred>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut sr, mut sw) = tokio::io::split(server);
    let up = copy_one(&mut cr, &mut sw, buffer_size, &counters.read);
    let down = copy_one(&mut sr, &mut cw, buffer_size, &counters.write);
    // try_join: the first error ends both directions (a reset on one side ends the connection);
    // a clean EOF on one side lets the other keep going.
    let (client_to_server, server_to_client) = tokio::try_join!(up, down)?;
    Ok(Transferred {
        client_to_server,
        server_to_client,
    })
}

async fn copy_one<R, W>(
    r: &mut R,
    w: &mut W,
    buffer_size: usize,
    counter: &Counter,
) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; buffer_size];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            // Half-close: pass the EOF on, keep the other direction open.
            w.shutdown().await?;
            return Ok(total);
        }
        w.write_all(&buf[..n]).await?;
        total += n as u64;
        counter.inc_by(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    #[tokio::test]
    async fn half_close_still_delivers_response() {
        let (mut client_app, mut client_proxy) = duplex(64);
        let (mut server_proxy, mut server_app) = duplex(64);
        let counters = ByteCounters::default();
        let proxy = tokio::spawn(async move {
            copy_bidirectional(&mut client_proxy, &mut server_proxy, 16, &counters)
                .await
                .map(|t| (t, counters.read.get(), counters.write.get()))
        });
        client_app.write_all(b"request").await.expect("write");
        client_app.shutdown().await.expect("half-close");
        let mut req = Vec::new();
        server_app
            .read_to_end(&mut req)
            .await
            .expect("server reads to EOF");
        assert_eq!(req, b"request");
        server_app
            .write_all(b"the response after EOF")
            .await
            .expect("write");
        drop(server_app);
        let mut resp = Vec::new();
        client_app.read_to_end(&mut resp).await.expect("read");
        assert_eq!(resp, b"the response after EOF");
        let (t, read, write) = proxy.await.expect("join").expect("copy ok");
        assert_eq!(t.client_to_server, 7);
        assert_eq!(t.server_to_client, 22);
        assert_eq!((read, write), (7, 22));
    }
}
