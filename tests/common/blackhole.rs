//! A TCP forwarder to one address that can black-hole the traffic, as a partitioned network
//! does: while it hangs, nothing is forwarded either way and new connections get no answer;
//! when it heals, what waited is delivered.
#![allow(dead_code)]

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Blackhole {
    pub addr: SocketAddr,
    hang: watch::Sender<bool>,
}

impl Blackhole {
    /// Forward connections made to [`Self::addr`] to `to`.
    pub async fn start(to: SocketAddr) -> Blackhole {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (hang, rx) = watch::channel(false);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(connection(client, to, rx.clone()));
            }
        });
        Blackhole { addr, hang }
    }

    pub fn hang(&self) {
        self.hang.send_replace(true);
    }

    pub fn heal(&self) {
        self.hang.send_replace(false);
    }
}

async fn healed(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|hanging| !hanging).await;
}

async fn connection(client: TcpStream, to: SocketAddr, mut rx: watch::Receiver<bool>) {
    healed(&mut rx).await;
    let Ok(server) = TcpStream::connect(to).await else {
        return;
    };
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    tokio::join!(pipe(cr, sw, rx.clone()), pipe(sr, cw, rx));
}

/// Copy one way, holding each piece read until the network is healed.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut rx: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        healed(&mut rx).await;
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
