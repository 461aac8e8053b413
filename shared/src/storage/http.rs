//! Read-only `http(s)://` sources over reqwest (rustls on the *ring* provider, see [`crate::gcp`]).
//!
//! - **Size limit.** A `Content-Length` over the caller's limit is refused before any body is read;
//!   without one, the body stream is cut off as soon as it passes the limit.
//! - **Timeouts.** Per attempt: a connect timeout, an idle timeout (a server that stops sending),
//!   and a whole-request timeout (body included).
//! - **Retries.** Connect errors, timeouts, 408/429 and 5xx are retried here with exponential
//!   backoff ([`HttpOptions::attempts`]); when they persist the error is
//!   [`StorageError::Unavailable`] (transient: the task is retried later). 404/410 are
//!   `NotFound`, 401/403 `Denied`, other 4xx `Invalid` (permanent).
//! - **SSRF guard.** Unless [`HttpOptions::allow_private`] (`--allow-private-sources`) is set, a
//!   source may only reach public addresses: a custom DNS resolver drops loopback, private,
//!   link-local, unique-local and other non-public addresses (see [`is_non_public`]) from every
//!   lookup, and URLs with a literal IP — the first one and every redirect target, checked by the
//!   redirect policy — are checked the same way. A refused source is [`StorageError::Denied`]
//!   (permanent) and nothing is sent to the refused address. Proxies from the environment are
//!   ignored, so a proxy cannot reach internal addresses on a source's behalf either.

use std::error::Error as StdError;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use async_trait::async_trait;

use super::gcs::from_http_status;
use super::{Location, ObjectStore, StorageError};
use crate::secret::redact;

/// How [`HttpStore`] connects, retries and what it may reach.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Allow loopback/private/link-local/unique-local destinations (`--allow-private-sources`).
    pub allow_private: bool,
    /// Longest wait for a TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// Longest silence while waiting for the response or the next piece of the body.
    pub idle_timeout: Duration,
    /// Longest one attempt may take, body included.
    pub timeout: Duration,
    /// Attempts per read, the first included, for transient failures.
    pub attempts: u32,
    /// First retry delay; doubles per attempt.
    pub initial_backoff: Duration,
    /// Redirects followed per request.
    pub max_redirects: usize,
    /// Host names pinned to addresses, like `curl --resolve` (the URL's port is used). Pinned
    /// names skip the DNS filter: pin only addresses you mean to reach (tests, split horizon).
    pub pinned: Vec<(String, SocketAddr)>,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            allow_private: false,
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(20),
            timeout: Duration::from_secs(120),
            attempts: 3,
            initial_backoff: Duration::from_millis(250),
            max_redirects: 5,
            pinned: Vec::new(),
        }
    }
}

/// Reads `http(s)://` objects; see the module docs.
pub struct HttpStore {
    client: reqwest::Client,
    opts: HttpOptions,
}

/// Whether an address is not on the public internet: loopback, private (RFC 1918), link-local
/// (including the cloud metadata address 169.254.169.254), unique-local (fc00::/7), unspecified,
/// shared (100.64.0.0/10), benchmarking (198.18.0.0/15), reserved (240.0.0.0/4), broadcast,
/// multicast, site-local (fec0::/10); IPv4 addresses embedded in IPv6 (mapped, compatible, NAT64
/// 64:ff9b::/96) are judged as IPv4.
pub fn is_non_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4_non_public(v4),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if let Some(v4) = v6.to_ipv4_mapped() {
                return v4_non_public(v4);
            }
            if s[..6] == [0; 6] && !v6.is_loopback() && !v6.is_unspecified() {
                // IPv4-compatible ::a.b.c.d (deprecated)
                return v4_non_public(Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8));
            }
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return v4_non_public(Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8));
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || v6.is_unique_local()
                || v6.is_unicast_link_local()
                || (s[0] & 0xffc0) == 0xfec0
        }
    }
}

fn v4_non_public(v4: Ipv4Addr) -> bool {
    let o = v4.octets();
    v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local()
        || v4.is_broadcast()
        || v4.is_multicast()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64)
        || (o[0] == 198 && (o[1] & 0xfe) == 18)
        || o[0] >= 240
}

/// A source refused by the SSRF guard; found in reqwest's error chain to tell it from an outage.
#[derive(Debug)]
struct NonPublic {
    host: String,
    ip: IpAddr,
}

impl std::fmt::Display for NonPublic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host == self.ip.to_string() {
            write!(f, "{} is not a public address", self.ip)
        } else {
            write!(f, "{} resolves to {}, not a public address", self.host, self.ip)
        }
    }
}

impl StdError for NonPublic {}

/// The literal IP of a URL's host, if it is one (`[::1]` included).
fn literal_ip(url: &reqwest::Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    host.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// Refuse a URL whose host is a non-public literal IP.
fn check_literal(url: &reqwest::Url) -> Result<(), NonPublic> {
    match literal_ip(url) {
        Some(ip) if is_non_public(ip) => Err(NonPublic { host: ip.to_string(), ip }),
        _ => Ok(()),
    }
}

/// DNS through the system resolver, keeping only public addresses.
struct PublicOnlyResolver;

impl reqwest::dns::Resolve for PublicOnlyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let (public, refused): (Vec<SocketAddr>, Vec<SocketAddr>) =
                all.into_iter().partition(|a| !is_non_public(a.ip()));
            if public.is_empty() {
                if let Some(a) = refused.first() {
                    return Err(Box::new(NonPublic { host, ip: a.ip() }) as Box<dyn StdError + Send + Sync>);
                }
                return Err(format!("{host}: no addresses").into());
            }
            Ok(Box::new(public.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[derive(Debug)]
struct RedirectRefused(String);

impl std::fmt::Display for RedirectRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl StdError for RedirectRefused {}

fn find_in_chain<'a, T: StdError + 'static>(e: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<T>() {
            return Some(t);
        }
        cur = err.source();
    }
    None
}

fn refused(uri: &str, why: impl std::fmt::Display) -> StorageError {
    StorageError::Denied {
        uri: uri.to_string(),
        reason: format!("source refused: {why} (pass --allow-private-sources to allow private addresses)"),
    }
}

impl HttpStore {
    /// A store with default options; `allow_private` lets sources reach loopback and private
    /// addresses (off by default: see the module docs).
    pub fn new(allow_private: bool) -> Result<HttpStore, StorageError> {
        HttpStore::with_options(HttpOptions { allow_private, ..HttpOptions::default() })
    }

    /// A store with these options.
    pub fn with_options(opts: HttpOptions) -> Result<HttpStore, StorageError> {
        crate::gcp::install_crypto_provider();
        let (allow_private, max_redirects) = (opts.allow_private, opts.max_redirects);
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > max_redirects {
                return attempt.error(RedirectRefused(format!("more than {max_redirects} redirects")));
            }
            if !matches!(attempt.url().scheme(), "http" | "https") {
                let msg = format!("redirect to unsupported scheme {}", attempt.url().scheme());
                return attempt.error(RedirectRefused(msg));
            }
            if !allow_private {
                if let Err(e) = check_literal(attempt.url()) {
                    return attempt.error(e);
                }
            }
            attempt.follow()
        });
        let mut b = reqwest::Client::builder()
            .user_agent(concat!("cropfleet/", env!("CARGO_PKG_VERSION")))
            .no_proxy()
            .connect_timeout(opts.connect_timeout)
            .read_timeout(opts.idle_timeout)
            .timeout(opts.timeout)
            .redirect(policy);
        if !allow_private {
            b = b.dns_resolver(PublicOnlyResolver);
        }
        for (host, addr) in &opts.pinned {
            b = b.resolve(host, *addr);
        }
        let client = b.build().map_err(|e| StorageError::Invalid {
            uri: "http(s)://".into(),
            reason: format!("building the HTTP client: {e}"),
        })?;
        Ok(HttpStore { client, opts })
    }

    fn map_error(&self, uri: &str, e: reqwest::Error) -> StorageError {
        // reqwest's message would repeat the URL, credentials and all; `uri` is the masked one.
        let e = e.without_url();
        if let Some(n) = find_in_chain::<NonPublic>(&e) {
            return refused(uri, n);
        }
        if let Some(r) = find_in_chain::<RedirectRefused>(&e) {
            return StorageError::Invalid { uri: uri.into(), reason: r.to_string() };
        }
        if let Some(s) = e.status() {
            return from_http_status(uri.into(), s.as_u16(), e.to_string());
        }
        if e.is_builder() {
            return StorageError::Invalid { uri: uri.into(), reason: e.to_string() };
        }
        // Connect, timeout, reset, truncated body: the source may well answer next time.
        let mut reason = e.to_string();
        let mut src = e.source();
        while let Some(s) = src {
            reason.push_str(": ");
            reason.push_str(&s.to_string());
            src = s.source();
        }
        StorageError::Unavailable { uri: uri.into(), reason }
    }

    async fn attempt(&self, uri: &str, url: reqwest::Url, max_bytes: u64) -> Result<Vec<u8>, StorageError> {
        let mut resp = self.client.get(url).send().await.map_err(|e| self.map_error(uri, e))?;
        let status = resp.status();
        if !status.is_success() {
            let reason = status.canonical_reason().unwrap_or("").to_string();
            return Err(from_http_status(uri.into(), status.as_u16(), reason));
        }
        let declared = resp.content_length();
        if let Some(n) = declared.filter(|n| *n > max_bytes) {
            return Err(StorageError::TooLarge { uri: uri.into(), size: n, limit: max_bytes });
        }
        let mut buf = Vec::with_capacity(declared.unwrap_or(0).min(max_bytes) as usize);
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.map_error(uri, e))? {
            let got = (buf.len() + chunk.len()) as u64;
            if got > max_bytes {
                return Err(StorageError::TooLarge { uri: uri.into(), size: got, limit: max_bytes });
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf)
    }
}

#[async_trait]
impl ObjectStore for HttpStore {
    async fn get(&self, loc: &Location, max_bytes: u64) -> Result<Vec<u8>, StorageError> {
        let Location::Http(real) = loc else {
            return Err(StorageError::Invalid { uri: loc.to_string(), reason: "not an http(s) URL".into() });
        };
        // The URL as requested is `real`; errors and logs name it with credentials masked.
        let shown = redact(real);
        let uri = shown.as_str();
        let url = reqwest::Url::parse(real)
            .map_err(|e| StorageError::Invalid { uri: uri.into(), reason: format!("bad URL: {e}") })?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(StorageError::Invalid { uri: uri.into(), reason: "not an http(s) URL with a host".into() });
        }
        if !self.opts.allow_private {
            check_literal(&url).map_err(|e| refused(uri, e))?;
        }
        let attempts = self.opts.attempts.max(1);
        let mut delay = self.opts.initial_backoff;
        for n in 1.. {
            match self.attempt(uri, url.clone(), max_bytes).await {
                Err(e) if e.failure() == crate::Failure::Transient && n < attempts => {
                    tracing::debug!(uri = %uri, attempt = n, error = %e, "retrying source read");
                    tokio::time::sleep(delay).await;
                    delay = delay.saturating_mul(2);
                }
                other => return other,
            }
        }
        unreachable!("the loop returns")
    }

    async fn put(&self, loc: &Location, _data: Vec<u8>) -> Result<(), StorageError> {
        Err(StorageError::Invalid { uri: loc.to_string(), reason: "http(s) locations are read-only".into() })
    }

    async fn list(&self, prefix: &Location) -> Result<Vec<String>, StorageError> {
        Err(StorageError::Invalid { uri: prefix.to_string(), reason: "http(s) locations cannot be listed".into() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_public_addresses() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(is_non_public(a.parse().unwrap()), "{a}");
        }
        for a in ["8.8.8.8", "142.250.74.110", "2001:4860:4860::8888", "::ffff:8.8.8.8"] {
            assert!(!is_non_public(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn literal_hosts() {
        let u = |s: &str| reqwest::Url::parse(s).unwrap();
        assert!(check_literal(&u("http://127.0.0.1:8080/x")).is_err());
        assert!(check_literal(&u("http://[::1]/x")).is_err());
        // WHATWG parsing turns a decimal host into an IPv4 address.
        assert!(check_literal(&u("http://2130706433/x")).is_err());
        assert!(check_literal(&u("http://example.com/x")).is_ok());
        assert!(check_literal(&u("https://8.8.8.8/x")).is_ok());
    }
}
