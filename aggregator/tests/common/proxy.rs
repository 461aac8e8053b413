//! A fault-injecting TCP proxy for tests: put it between a client (worker, producer) and a real
//! service (fake-gcs-server, the Pub/Sub emulator, RabbitMQ) to add latency to every request or
//! to make the service unreachable for a while, without touching the service itself.
//!
//! It runs on its own thread with its own runtime, so sync and async tests use it alike.
//!
//! Latency model: one added delay per request/response exchange. A connection's next bytes
//! from the client are held back `delay` when the server has answered since the client last
//! sent (or nothing was sent yet), so an HTTP/1.1 or gRPC request pays the delay once however
//! many TCP reads its body takes, the way a longer round trip to a distant store would.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

#[derive(Default)]
struct State {
    delay_us: AtomicU64,
    cut: AtomicBool,
    conns: Mutex<Vec<AbortHandle>>,
    /// Exchanges that were delayed (requests seen), for tests to check the proxy was in the path.
    requests: AtomicU64,
}

/// A running proxy; stops when dropped.
pub struct Proxy {
    addr: SocketAddr,
    state: Arc<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// Listen on a free loopback port and forward every connection to `upstream`.
    pub fn start(upstream: SocketAddr) -> Proxy {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let st = state.clone();
        let thread = std::thread::Builder::new()
            .name(format!("proxy-{}", addr.port()))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async move {
                    let listener = TcpListener::from_std(std_listener).unwrap();
                    tokio::select! {
                        _ = accept_loop(listener, upstream, st.clone()) => {}
                        _ = stop_rx => {}
                    }
                    for c in st.conns.lock().unwrap().drain(..) {
                        c.abort();
                    }
                });
            })
            .unwrap();
        Proxy { addr, state, stop: Some(stop_tx), thread: Some(thread) }
    }

    /// Forward to a `host:port` or `http://host:port` address (as the emulator variables hold).
    pub fn start_to(upstream: &str) -> Proxy {
        let hostport = upstream.trim_start_matches("http://").trim_end_matches('/');
        let addr = std::net::ToSocketAddrs::to_socket_addrs(hostport).expect("upstream address").next().unwrap();
        Proxy::start(addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Added latency per request/response exchange (0 = none).
    pub fn set_delay(&self, d: Duration) {
        self.state.delay_us.store(d.as_micros() as u64, Ordering::SeqCst);
    }

    /// Make the service unreachable: drop every open connection and reset new ones at once.
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        for c in self.state.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    /// Let connections through again.
    pub fn restore(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
    }

    /// Requests (client sends after a server answer) seen so far.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, st: Arc<State>) {
    loop {
        let Ok((client, _)) = listener.accept().await else { continue };
        if st.cut.load(Ordering::SeqCst) {
            // SO_LINGER 0: the client sees a reset, as from a host that is down. (Deprecated
            // because a lingering close can block; with 0 it cannot.)
            #[allow(deprecated)]
            let _ = client.set_linger(Some(Duration::ZERO));
            drop(client);
            continue;
        }
        let handle = tokio::spawn(serve(client, upstream, st.clone()));
        let mut conns = st.conns.lock().unwrap();
        conns.retain(|c| !c.is_finished());
        conns.push(handle.abort_handle());
    }
}

async fn serve(client: TcpStream, upstream: SocketAddr, st: Arc<State>) {
    let Ok(server) = TcpStream::connect(upstream).await else { return };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    // True when the next client bytes start a new exchange.
    let fresh = Arc::new(AtomicBool::new(true));
    let f2 = fresh.clone();
    let st2 = st.clone();
    let up = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if f2.swap(false, Ordering::SeqCst) {
                st2.requests.fetch_add(1, Ordering::SeqCst);
                let us = st2.delay_us.load(Ordering::SeqCst);
                if us > 0 {
                    tokio::time::sleep(Duration::from_micros(us)).await;
                }
            }
            if sw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = sw.shutdown().await;
    };
    let down = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            fresh.store(true, Ordering::SeqCst);
            if cw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = cw.shutdown().await;
    };
    tokio::join!(up, down);
}
