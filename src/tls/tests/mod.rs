//! Tests against real peers: TLS 1.3 handshakes over 127.0.0.1 between configs from
//! [`IdentityStore`] ([`handshake`]), and identity reloads through a Kubernetes-style `..data`
//! symlink swap ([`reload`]). Shared helpers live here.

mod handshake;
mod reload;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::mint::{Issued, TestCa};
use super::*;

pub(super) const HOUR: Duration = Duration::from_secs(3600);
pub(super) const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

pub(super) fn id(s: &str) -> SpiffeId {
    s.parse().expect("test SPIFFE ID")
}

pub(super) fn store_for(issued: &Issued) -> IdentityStore {
    IdentityStore::new(
        issued.identity().expect("valid test identity"),
        ClientTrustDomains::Own,
        IdentityMetrics::default(),
    )
}

/// What the server saw of one accepted connection.
#[derive(Debug)]
pub(super) enum Accepted {
    Ok {
        client: Option<PeerId>,
        alpn: Option<Vec<u8>>,
        version: Option<rustls::ProtocolVersion>,
    },
    Err(std::io::Error),
}

/// Accepts one connection with `config`, echoes one line back, and reports what it saw.
pub(super) async fn serve_one(listener: &TcpListener, config: Arc<ServerConfig>) -> Accepted {
    let (tcp, _) = listener.accept().await.expect("accept");
    match TlsAcceptor::from(config).accept(tcp).await {
        Ok(mut tls) => {
            let (_, conn) = tls.get_ref();
            let seen = Accepted::Ok {
                client: peer_id(conn),
                alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
                version: conn.protocol_version(),
            };
            let mut buf = [0u8; 64];
            if let Ok(n) = tls.read(&mut buf).await {
                let _ = tls.write_all(&buf[..n]).await;
                let _ = tls.shutdown().await;
            }
            seen
        }
        Err(e) => Accepted::Err(e),
    }
}

pub(super) async fn connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(config)
        .connect(ServerName::from(LOCALHOST), tcp)
        .await
}

/// One client connection against one server accept; returns both sides' view.
pub(super) async fn handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
) -> (Accepted, std::io::Result<Option<PeerId>>) {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let server = tokio::spawn(async move { serve_one(&listener, server).await });
    let client = async {
        let mut tls = connect(addr, client).await?;
        let server_id = peer_id(tls.get_ref().1);
        tls.write_all(b"ping\n").await?;
        let mut echoed = Vec::new();
        tls.read_to_end(&mut echoed).await?;
        assert_eq!(echoed, b"ping\n");
        Ok(server_id)
    }
    .await;
    (server.await.expect("server task"), client)
}

pub(super) fn rustls_error(err: &std::io::Error) -> &rustls::Error {
    err.get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .unwrap_or_else(|| panic!("not a rustls error: {err}"))
}

pub(super) fn first_identity_not_after(issued: &Issued) -> i64 {
    issued.identity().unwrap().not_after()
}

pub(super) async fn echo(tls: &mut tokio_rustls::client::TlsStream<TcpStream>, msg: &[u8]) {
    tls.write_all(msg).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(buf, msg);
}
