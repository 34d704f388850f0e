//! A TCP proxy on 127.0.0.1 that injects network faults between the client and a server:
//! it relays bytes both ways and, per connection, can cut the connection (RST) once N bytes
//! went upstream, or stall it (stop relaying, keep the socket open) like a dead NAT entry.
//! Counters say how many faults were injected, so a test can prove they happened.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Relay everything.
    None,
    /// Reset every connection once this many bytes went client -> server on it.
    CutEvery(u64),
    /// The first `connections` connections stop relaying (both ways) after this many
    /// client -> server bytes, and stay open until the client gives up.
    StallAfter { bytes: u64, connections: usize },
}

pub struct Proxy {
    pub port: u16,
    cuts: Arc<AtomicUsize>,
    stalls: Arc<AtomicUsize>,
    upstream_bytes: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: u16, fault: Fault) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let cuts = Arc::new(AtomicUsize::new(0));
        let stalls = Arc::new(AtomicUsize::new(0));
        let upstream_bytes = Arc::new(AtomicU64::new(0));
        let (c, s, b) = (cuts.clone(), stalls.clone(), upstream_bytes.clone());
        let task = tokio::spawn(async move {
            let connections = Arc::new(AtomicUsize::new(0));
            loop {
                let Ok((client, _)) = listener.accept().await else { return };
                let n = connections.fetch_add(1, Ordering::Relaxed);
                let (c, s, b) = (c.clone(), s.clone(), b.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else { return };
                    relay(client, server, fault, n, c, s, b).await;
                });
            }
        });
        Proxy { port, cuts, stalls, upstream_bytes, task }
    }

    pub fn cuts(&self) -> usize {
        self.cuts.load(Ordering::Relaxed)
    }

    pub fn stalls(&self) -> usize {
        self.stalls.load(Ordering::Relaxed)
    }

    /// Bytes relayed client -> server over all connections.
    pub fn upstream_bytes(&self) -> u64 {
        self.upstream_bytes.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(
    client: TcpStream,
    server: TcpStream,
    fault: Fault,
    index: usize,
    cuts: Arc<AtomicUsize>,
    stalls: Arc<AtomicUsize>,
    upstream_bytes: Arc<AtomicU64>,
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let limit = match fault {
        Fault::None => None,
        Fault::CutEvery(bytes) => Some(bytes),
        Fault::StallAfter { bytes, connections } => (index < connections).then_some(bytes),
    };
    if let Fault::CutEvery(_) = fault {
        // Closing then sends RST, as a middlebox dropping the flow would. A zero linger
        // never blocks on drop (tokio deprecates SO_LINGER for the non-zero case).
        #[allow(deprecated)]
        {
            let _ = client.set_linger(Some(Duration::ZERO));
            let _ = server.set_linger(Some(Duration::ZERO));
        }
    }
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let stalled = tokio_util::sync::CancellationToken::new();
    let down_stalled = stalled.clone();
    // server -> client, until the stall starts.
    let down = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = tokio::select! {
                _ = down_stalled.cancelled() => std::future::pending::<usize>().await,
                r = sr.read(&mut buf) => match r { Ok(0) | Err(_) => break, Ok(n) => n },
            };
            if cw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = cw.shutdown().await;
    });
    // client -> server, counted and faulted.
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent = 0u64;
    loop {
        let n = match cr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let n = match limit {
            Some(limit) => n.min(limit.saturating_sub(sent) as usize),
            None => n,
        };
        if n > 0 && sw.write_all(&buf[..n]).await.is_err() {
            break;
        }
        sent += n as u64;
        upstream_bytes.fetch_add(n as u64, Ordering::Relaxed);
        if limit.is_some_and(|l| sent >= l) {
            if let Fault::CutEvery(_) = fault {
                cuts.fetch_add(1, Ordering::Relaxed);
                down.abort();
                return;
            }
            stalls.fetch_add(1, Ordering::Relaxed);
            stalled.cancel();
            // A black hole: swallow what the client sends, answer nothing, until it gives up.
            while let Ok(n) = cr.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
            down.abort();
            return;
        }
    }
    let _ = sw.shutdown().await;
    let _ = down.await;
}
