//! A TCP relay that adds latency, for benchmarking uploads to far-away servers on one machine.
//!
//! Each direction's bytes are held for RTT/2 before they are passed on, so a connection
//! through the relay sees the given round-trip time while the relay itself never limits
//! bandwidth: it reads eagerly and buffers what is in flight (the bandwidth-delay product).
//! What then limits a transfer is what limits it over a real long path: TCP and SSH flow
//! control windows, and how many requests the client keeps in flight.
//!
//! ```text
//! cargo run --release --example delay_proxy -- --listen 127.0.0.1:0 --upstream 127.0.0.1:22 --rtt-ms 40
//! ```
//! prints `listening on PORT` once ready (scripts/bench-sftp.sh reads it).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

struct Args {
    listen: String,
    upstream: String,
    one_way: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut listen = "127.0.0.1:0".to_string();
    let mut upstream = None;
    let mut rtt_ms: f64 = 0.0;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => listen = value()?,
            "--upstream" => upstream = Some(value()?),
            "--rtt-ms" => rtt_ms = value()?.parse().map_err(|_| "--rtt-ms takes a number".to_string())?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    let upstream = upstream.ok_or("--upstream HOST:PORT is required")?;
    if !(0.0..=10_000.0).contains(&rtt_ms) {
        return Err("--rtt-ms must be between 0 and 10000".into());
    }
    Ok(Args { listen, upstream, one_way: Duration::from_secs_f64(rtt_ms / 2000.0) })
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("delay_proxy: {e}\nusage: delay_proxy --upstream HOST:PORT [--listen ADDR:PORT] [--rtt-ms MS]");
            std::process::exit(2);
        }
    };
    let listener = match TcpListener::bind(&args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("delay_proxy: cannot listen on {}: {e}", args.listen);
            std::process::exit(1);
        }
    };
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    println!("listening on {port}");
    loop {
        let Ok((client, _)) = listener.accept().await else { continue };
        let (upstream, one_way) = (args.upstream.clone(), args.one_way);
        tokio::spawn(async move {
            let server = match TcpStream::connect(&upstream).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("delay_proxy: cannot reach {upstream}: {e}");
                    return;
                }
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::join!(pipe(cr, sw, one_way), pipe(sr, cw, one_way));
        });
    }
}

/// Relays one direction, each read delivered `delay` after it arrived.
async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Duration) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        loop {
            let mut buf = vec![0u8; 256 * 1024];
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.send((Instant::now() + delay, buf)).is_err() {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, buf)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&buf).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}
