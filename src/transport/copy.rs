//! Opaque TCP forwarding both ways, half-close aware, with bounded buffers and live byte counts.
//!
//! Each direction reads into one buffer and writes it all out before reading again, so a slow
//! reader stops the copy (TCP backpressure) and memory per connection is at most two buffers.
//! Buffers grow only when needed (see `copy_one`): idle connections hold none on the heap.
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

/// Bytes a direction reads into its inline buffer before it earns a heap buffer.
const SMALL: usize = 512;
/// Consecutive small reads after which an idle heap buffer is given back.
const SHRINK_AFTER: u32 = 8;

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
    // Buffers grow only when needed: a direction starts with a small inline buffer and takes a
    // `buffer_size` heap buffer only once a read fills it (a bulk flow); after a run of small
    // reads the heap buffer is released. Idle and request/response connections hold no heap
    // buffer at all, so memory per connection stays flat after a burst of connections.
    let mut small = [0u8; SMALL];
    let mut big: Vec<u8> = Vec::new();
    let mut small_reads = 0u32;
    let mut total = 0u64;
    loop {
        let n = if big.is_empty() {
            r.read(&mut small).await?
        } else {
            r.read(&mut big).await?
        };
        if n == 0 {
            // Half-close: pass the EOF on, keep the other direction open.
            w.shutdown().await?;
            return Ok(total);
        }
        if big.is_empty() {
            w.write_all(&small[..n]).await?;
            if n == SMALL && buffer_size > SMALL {
                big = vec![0u8; buffer_size];
            }
        } else {
            w.write_all(&big[..n]).await?;
            small_reads = if n <= SMALL { small_reads + 1 } else { 0 };
            if small_reads >= SHRINK_AFTER {
                big = Vec::new();
                small_reads = 0;
            }
        }
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

    #[tokio::test]
    async fn bulk_flows_grow_the_buffer_and_arrive_intact() {
        let (mut client_app, mut client_proxy) = duplex(4096);
        let (mut server_proxy, mut server_app) = duplex(4096);
        let counters = ByteCounters::default();
        let proxy = tokio::spawn(async move {
            copy_bidirectional(&mut client_proxy, &mut server_proxy, 16 * 1024, &counters).await
        });
        let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            client_app.write_all(&sent).await.expect("write");
            client_app.shutdown().await.expect("shutdown");
            client_app
        });
        let mut got = Vec::new();
        server_app.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, payload);
        drop(server_app);
        let _ = writer.await.expect("join");
        let t = proxy.await.expect("join").expect("copy");
        assert_eq!(t.client_to_server, 1_000_000);
    }
}
