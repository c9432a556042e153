//! A TCP proxy between one daemon and the simulated cluster (plain HTTP/1.1), which can do to
//! the network what the network does: pass, partition (hang: bytes already sent wait and are
//! delivered when it heals, as TCP retransmits them; or refuse: connections are cut and
//! refused), delay every forwarded piece, and hold the next request matching a method and path
//! until released. Every request it delivers is logged with the status of its response.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    /// Nothing gets through either way; what was sent waits and is delivered on heal.
    Hang,
    /// Connections are cut, new ones closed at once.
    Refuse,
}

/// One request that went (or is to go) through.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub method: String,
    pub path: String,
    /// When the proxy read the whole request from the daemon.
    pub read_at: Instant,
    /// When it was written to the cluster.
    pub delivered_at: Option<Instant>,
    /// The response's status, once its first bytes came back.
    pub status: Option<u16>,
    /// Held by a [`Proxy::hold_next`] rule.
    pub held: bool,
}

struct Rule {
    method: String,
    path: String,
}

struct Shared {
    mode: watch::Sender<Mode>,
    delay: Mutex<Duration>,
    rule: Mutex<Option<Rule>>,
    /// Bumped by [`Proxy::release`].
    released: watch::Sender<u64>,
    log: Mutex<Vec<Exchange>>,
}

pub struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    /// Listen on a free loopback port and forward to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let shared = Arc::new(Shared {
            mode: watch::channel(Mode::Pass).0,
            delay: Mutex::new(Duration::ZERO),
            rule: Mutex::new(None),
            released: watch::channel(0).0,
            log: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if *s.mode.borrow() == Mode::Refuse {
                    continue;
                }
                tokio::spawn(connection(inbound, upstream, s.clone()));
            }
        });
        Proxy { addr, shared, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig that reaches the cluster through this proxy.
    pub fn write_kubeconfig(&self, path: &Path) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: proxied\n  cluster:\n    server: {}\ncontexts:\n- name: proxied\n  context:\n    cluster: proxied\n    user: proxied\n    namespace: default\ncurrent-context: proxied\nusers:\n- name: proxied\n  user: {{}}\n",
            self.url()
        );
        std::fs::write(path, text).expect("write kubeconfig");
    }

    pub fn set_mode(&self, mode: Mode) {
        self.shared.mode.send_replace(mode);
    }

    pub fn partition(&self) {
        self.set_mode(Mode::Hang);
    }

    pub fn heal(&self) {
        self.set_mode(Mode::Pass);
    }

    /// Every forwarded piece waits `d` first.
    pub fn set_delay(&self, d: Duration) {
        *self.shared.delay.lock().expect("lock") = d;
    }

    /// Hold the next request with this method and path (no query) until [`Self::release`].
    pub fn hold_next(&self, method: &str, path: &str) {
        *self.shared.rule.lock().expect("lock") = Some(Rule {
            method: method.to_string(),
            path: path.to_string(),
        });
    }

    /// Deliver what is held.
    pub fn release(&self) {
        self.shared.released.send_modify(|n| *n += 1);
    }

    /// Every request read so far, in order.
    pub fn exchanges(&self) -> Vec<Exchange> {
        self.shared.log.lock().expect("lock").clone()
    }

    /// The held request, once caught.
    pub fn held(&self) -> Option<Exchange> {
        self.exchanges().into_iter().find(|e| e.held)
    }
}

/// The end of a request's head, and the request's whole length when known from its headers;
/// `Err` for a body this proxy does not frame (chunked): passed through as it comes.
fn framed(buf: &[u8]) -> Option<Result<(usize, String, String), ()>> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let method = first.next().unwrap_or_default().to_string();
    let target = first.next().unwrap_or_default();
    let path = target.split('?').next().unwrap_or_default().to_string();
    let mut length = 0;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse().unwrap_or(0),
            "transfer-encoding" => return Some(Err(())),
            _ => {}
        }
    }
    (buf.len() >= head_end + length).then_some(Ok((head_end + length, method, path)))
}

/// Wait until traffic may pass (and the delay); `false` when the connection is to be cut.
async fn gate(shared: &Shared) -> bool {
    let mut mode = shared.mode.subscribe();
    let Ok(m) = mode.wait_for(|m| *m != Mode::Hang).await.map(|m| *m) else {
        return false;
    };
    if m == Mode::Refuse {
        return false;
    }
    let delay = *shared.delay.lock().expect("lock");
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    true
}

async fn connection(inbound: TcpStream, upstream: SocketAddr, shared: Arc<Shared>) {
    let Ok(outbound) = TcpStream::connect(upstream).await else {
        return;
    };
    let (from_client, to_client) = inbound.into_split();
    let (from_server, to_server) = outbound.into_split();
    let pending: Arc<Mutex<VecDeque<usize>>> = Arc::default();
    let mut cut = shared.mode.subscribe();
    let requests = requests(from_client, to_server, shared.clone(), pending.clone());
    let responses = responses(from_server, to_client, shared.clone(), pending);
    tokio::select! {
        _ = cut.wait_for(|m| *m == Mode::Refuse) => {}
        _ = async { tokio::join!(requests, responses) } => {}
    }
}

/// Daemon → cluster, one request at a time (held when the rule matches).
async fn requests(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: Arc<Shared>,
    pending: Arc<Mutex<VecDeque<usize>>>,
) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut raw = false;
    loop {
        while !raw {
            match framed(&buf) {
                None => break,
                Some(Err(())) => raw = true,
                Some(Ok((len, method, path))) => {
                    let request: Vec<u8> = buf.drain(..len).collect();
                    if !deliver(&request, method, path, &mut to, &shared, &pending).await {
                        return;
                    }
                }
            }
        }
        if raw && !buf.is_empty() {
            if !gate(&shared).await || to.write_all(&buf).await.is_err() {
                return;
            }
            buf.clear();
        }
        match from.read(&mut chunk).await {
            // The daemon hung up: what it sent is still delivered (already on the wire), and
            // answered before the cluster sees the connection end.
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pending.lock().expect("lock").is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Log, hold if the rule says so, wait for the gate, and write one request.
async fn deliver(
    request: &[u8],
    method: String,
    path: String,
    to: &mut OwnedWriteHalf,
    shared: &Shared,
    pending: &Mutex<VecDeque<usize>>,
) -> bool {
    let held = {
        let mut rule = shared.rule.lock().expect("lock");
        let hit = rule
            .as_ref()
            .is_some_and(|r| r.method == method && r.path == path);
        if hit {
            *rule = None;
        }
        hit
    };
    let mut released = shared.released.subscribe();
    let at = {
        let mut log = shared.log.lock().expect("lock");
        log.push(Exchange {
            method,
            path,
            read_at: Instant::now(),
            delivered_at: None,
            status: None,
            held,
        });
        log.len() - 1
    };
    if held && released.changed().await.is_err() {
        return false;
    }
    if !gate(shared).await {
        return false;
    }
    pending.lock().expect("lock").push_back(at);
    shared.log.lock().expect("lock")[at].delivered_at = Some(Instant::now());
    to.write_all(request).await.is_ok()
}

/// Cluster → daemon, noting each response's status (no pipelining: a response starts a read).
async fn responses(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: Arc<Shared>,
    pending: Arc<Mutex<VecDeque<usize>>>,
) {
    let mut chunk = vec![0u8; 64 * 1024];
    let mut client_gone = false;
    loop {
        let n = match from.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let data = &chunk[..n];
        if let Some(status) = data
            .strip_prefix(b"HTTP/1.1 ")
            .and_then(|rest| std::str::from_utf8(rest.get(..3)?).ok())
            .and_then(|code| code.parse::<u16>().ok())
        {
            if let Some(at) = pending.lock().expect("lock").pop_front() {
                shared.log.lock().expect("lock")[at].status = Some(status);
            }
        }
        if !gate(&shared).await {
            return;
        }
        if !client_gone && to.write_all(data).await.is_err() {
            // Keep reading: the status of a request delivered after its sender left is
            // still worth knowing.
            client_gone = true;
        }
    }
}
