//! The read-only `http(s)://` source backend against a small local HTTP server: reads, size
//! limits, status mapping, retries, and the SSRF guard (private addresses refused by default,
//! directly and after redirects).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cropfleet::storage::http::{HttpOptions, HttpStore};
use cropfleet::storage::{Location, ObjectStore, StorageError};
use cropfleet::Failure;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A tiny HTTP/1.1 server; counts requests per path.
struct Server {
    addr: SocketAddr,
    hits: Arc<Mutex<HashMap<String, usize>>>,
}

impl Server {
    async fn start() -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let h = hits.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let hits = h.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head).to_string();
                    let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                    let n = {
                        let mut m = hits.lock().unwrap();
                        let c = m.entry(path.clone()).or_default();
                        *c += 1;
                        *c
                    };
                    let resp = respond(&path, n, addr.port());
                    let _ = sock.write_all(&resp).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        Server { addr, hits }
    }

    fn url(&self, path: &str) -> Location {
        Location::parse(&format!("http://{}{path}", self.addr)).unwrap()
    }

    fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

fn reply(status: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut v = format!("HTTP/1.1 {status}\r\nConnection: close\r\n{headers}\r\n").into_bytes();
    v.extend_from_slice(body);
    v
}

fn respond(path: &str, nth: usize, port: u16) -> Vec<u8> {
    let body = vec![42u8; 1000];
    match path {
        "/img" => reply("200 OK", "Content-Length: 1000\r\n", &body),
        // Declares more than the limit: refused from the header.
        "/declared-big" => reply("200 OK", "Content-Length: 5000\r\n", &vec![1u8; 5000]),
        // No length: the stream is cut at the limit.
        "/chunked-big" => {
            let mut b = Vec::new();
            for _ in 0..5 {
                b.extend_from_slice(b"3e8\r\n");
                b.extend_from_slice(&body);
                b.extend_from_slice(b"\r\n");
            }
            b.extend_from_slice(b"0\r\n\r\n");
            reply("200 OK", "Transfer-Encoding: chunked\r\n", &b)
        }
        "/missing" => reply("404 Not Found", "Content-Length: 0\r\n", b""),
        "/forbidden" => reply("403 Forbidden", "Content-Length: 0\r\n", b""),
        "/flaky" if nth <= 2 => reply("503 Service Unavailable", "Content-Length: 0\r\n", b""),
        "/flaky" => reply("200 OK", "Content-Length: 1000\r\n", &body),
        "/down" => reply("503 Service Unavailable", "Content-Length: 0\r\n", b""),
        "/redirect-literal" => {
            reply("302 Found", &format!("Location: http://127.0.0.1:{port}/img\r\nContent-Length: 0\r\n"), b"")
        }
        "/redirect-name" => {
            reply("302 Found", &format!("Location: http://localhost:{port}/img\r\nContent-Length: 0\r\n"), b"")
        }
        "/redirect-v6" => {
            reply("302 Found", &format!("Location: http://[::1]:{port}/img\r\nContent-Length: 0\r\n"), b"")
        }
        _ => reply("404 Not Found", "Content-Length: 0\r\n", b""),
    }
}

fn fast(allow_private: bool) -> HttpOptions {
    HttpOptions { allow_private, initial_backoff: Duration::from_millis(20), ..HttpOptions::default() }
}

#[tokio::test]
async fn http_reads_limits_and_status_mapping() {
    let s = Server::start().await;
    let store = HttpStore::new(true).unwrap();
    assert_eq!(store.get(&s.url("/img"), 1000).await.unwrap(), vec![42u8; 1000]);

    let e = store.get(&s.url("/img"), 999).await.unwrap_err();
    assert!(matches!(e, StorageError::TooLarge { size: 1000, limit: 999, .. }), "{e:?}");
    let e = store.get(&s.url("/declared-big"), 4096).await.unwrap_err();
    assert!(matches!(e, StorageError::TooLarge { size: 5000, limit: 4096, .. }), "{e:?}");
    let e = store.get(&s.url("/chunked-big"), 2500).await.unwrap_err();
    assert!(matches!(e, StorageError::TooLarge { limit: 2500, .. }), "{e:?}");
    assert_eq!(e.failure(), Failure::Permanent);
    assert_eq!(store.get(&s.url("/chunked-big"), 5000).await.unwrap().len(), 5000);

    let e = store.get(&s.url("/missing"), 1000).await.unwrap_err();
    assert!(matches!(e, StorageError::NotFound { .. }), "{e:?}");
    assert_eq!(e.failure(), Failure::Permanent);
    assert_eq!(s.hits("/missing"), 1, "a 404 is not retried");
    let e = store.get(&s.url("/forbidden"), 1000).await.unwrap_err();
    assert!(matches!(e, StorageError::Denied { .. }), "{e:?}");

    // Writes and listings are refused: the backend is read-only.
    assert!(matches!(store.put(&s.url("/x"), vec![1]).await, Err(StorageError::Invalid { .. })));
    // A redirect to a private address is followed when private sources are allowed.
    assert_eq!(store.get(&s.url("/redirect-literal"), 1000).await.unwrap().len(), 1000);
}

#[tokio::test]
async fn http_retries_5xx_then_reports_transient() {
    let s = Server::start().await;
    let store = HttpStore::with_options(fast(true)).unwrap();
    assert_eq!(store.get(&s.url("/flaky"), 1000).await.unwrap().len(), 1000);
    assert_eq!(s.hits("/flaky"), 3, "two 503s, then success");

    let e = store.get(&s.url("/down"), 1000).await.unwrap_err();
    assert!(matches!(e, StorageError::Unavailable { .. }), "{e:?}");
    assert_eq!(e.failure(), Failure::Transient);
    assert_eq!(s.hits("/down"), 3);

    // Nothing listening: connect errors are transient too.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let t = Instant::now();
    let e = store.get(&Location::parse(&format!("http://127.0.0.1:{port}/x")).unwrap(), 10).await.unwrap_err();
    assert!(matches!(e, StorageError::Unavailable { .. }), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(5));
}

/// A server that accepts and never answers: the idle timeout ends each attempt, and the read
/// fails as transient instead of hanging.
#[tokio::test]
async fn http_silent_server_times_out_as_transient() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    let opts = HttpOptions { idle_timeout: Duration::from_millis(300), attempts: 2, ..fast(true) };
    let store = HttpStore::with_options(opts).unwrap();
    let t = Instant::now();
    let e = store.get(&Location::parse(&format!("http://{addr}/img")).unwrap(), 1000).await.unwrap_err();
    assert!(matches!(e, StorageError::Unavailable { .. }), "{e:?}");
    assert_eq!(e.failure(), Failure::Transient);
    assert!(t.elapsed() < Duration::from_secs(3), "took {:?}", t.elapsed());
    hold.abort();
}

#[tokio::test]
async fn http_default_refuses_loopback_and_redirects_to_it() {
    let s = Server::start().await;
    let store = HttpStore::new(false).unwrap();
    for url in [
        format!("http://127.0.0.1:{}/img", s.addr.port()),
        format!("http://localhost:{}/img", s.addr.port()),
        format!("http://[::1]:{}/img", s.addr.port()),
        format!("http://2130706433:{}/img", s.addr.port()),
        "http://169.254.169.254/computeMetadata/v1/".to_string(),
    ] {
        let e = store.get(&Location::parse(&url).unwrap(), 1000).await.unwrap_err();
        assert!(matches!(e, StorageError::Denied { .. }), "{url}: {e:?}");
        assert_eq!(e.failure(), Failure::Permanent, "{url}");
        assert!(e.to_string().contains("--allow-private-sources"), "{e}");
    }
    assert_eq!(s.hits("/img"), 0, "nothing reached the loopback server");

    // A "public" name (pinned to the test server, as a real DNS name would resolve) that
    // redirects to a loopback address: the redirect is refused, whether the target is a
    // literal IP (redirect policy) or a name that resolves to one (DNS filter).
    let opts = HttpOptions { pinned: vec![("public.test".into(), s.addr)], ..fast(false) };
    let store = HttpStore::with_options(opts).unwrap();
    for path in ["/redirect-literal", "/redirect-name", "/redirect-v6"] {
        let url = Location::parse(&format!("http://public.test:{}{path}", s.addr.port())).unwrap();
        let e = store.get(&url, 1000).await.unwrap_err();
        assert!(matches!(e, StorageError::Denied { .. }), "{path}: {e:?}");
        assert_eq!(e.failure(), Failure::Permanent);
        assert_eq!(s.hits(path), 1, "{path}: a refusal is not retried");
    }
    assert_eq!(s.hits("/img"), 0, "no redirect reached the private target");
    // The pinned name itself still works.
    let url = Location::parse(&format!("http://public.test:{}/img", s.addr.port())).unwrap();
    assert_eq!(store.get(&url, 1000).await.unwrap().len(), 1000);
}
