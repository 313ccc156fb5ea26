//! Test support shared by the in-crate pipeline tests: a real proxy running on 127.0.0.1:0.

use crate::app::{Proxy, ProxyAddrs};
use crate::config::ProxyConfig;
use crate::demo::http_get;
use crate::drain::Drain;

/// A proxy serving on its own task until [`Running::stop`].
pub struct Running {
    pub addrs: ProxyAddrs,
    drain: Drain,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Binds and runs a proxy with `config`, and an in-memory identity when given.
    pub fn start(config: ProxyConfig, identity: Option<crate::tls::Identity>) -> Self {
        let proxy = Proxy::bind_with_identity(config, identity).expect("bind proxy");
        let addrs = proxy.addrs().expect("addrs");
        let (drain, watch) = Drain::new();
        let task = tokio::spawn(proxy.run(drain.clone(), watch));
        Running { addrs, drain, task }
    }

    /// The proxy's `/metrics`, fetched over HTTP as Prometheus would.
    pub async fn metrics(&self) -> String {
        http_get(self.addrs.admin, "/metrics")
            .await
            .expect("metrics")
            .1
    }

    /// Drains the proxy and checks it ran cleanly.
    pub async fn stop(self) {
        self.drain.start();
        self.task.await.expect("join").expect("proxy ran cleanly");
    }
}

/// Reads one HTTP/1 head from `s` a byte at a time (so nothing after it is consumed), up to
/// 64 KiB; `None` when the peer closes or errs first.
pub async fn read_head(s: &mut tokio::net::TcpStream) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 64 * 1024 {
        match s.read(&mut b).await {
            Ok(1) => head.push(b[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}
