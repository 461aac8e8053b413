//! Google Cloud Storage backend for `gs://bucket/key`, over the official `google-cloud-storage` 1.x
//! client.
//!
//! - **Where it connects.** With `STORAGE_EMULATOR_HOST` set ([`GcsOptions::from_env`]), the
//!   client talks to that endpoint with anonymous credentials (the 1.x crates ignore the variable
//!   themselves); otherwise to the real service with Application Default Credentials. The client is
//!   built on first use, so a process that never touches `gs://` never looks for credentials.
//! - **Writes** are single-shot `send_buffered` uploads (crops are far below the 16 MiB resumable
//!   threshold), marked idempotent: names are deterministic, so retrying a write whose outcome is
//!   unknown can only store the same bytes again. That lets the client's retry policy
//!   ([`GcsOptions::attempts`], exponential backoff) cover 408/429/5xx and I/O errors too.
//! - **Reads** retry the same way and refuse objects over the caller's byte limit: from the object
//!   size the service reports before any data (real GCS), and by capping the stream in any case
//!   (fake-gcs-server reports size 0).
//! - **Timeouts.** The client has no per-attempt timeout and hangs on a server that accepts
//!   connections but never answers, so every call runs under `tokio::time::timeout`
//!   ([`GcsOptions::timeout`]); running out of time is [`StorageError::Unavailable`] (transient).
//! - **Errors** map to [`StorageError`]: 404 → `NotFound`, 401/403 → `Denied`, other 4xx (400, 412,
//!   …) → `Invalid` (all permanent); 408/429/5xx, timeouts and an unreachable service →
//!   `Unavailable` (transient, the task is retried).
//! - **Listing** goes through `StorageControl::list_objects`, which is gRPC-only. fake-gcs-server
//!   has no `google.storage.v2` gRPC service, so against an emulator ([`GcsOptions::emulator`])
//!   listing uses the JSON API (`GET /storage/v1/b/{bucket}/o?prefix=…`) with reqwest instead;
//!   [`GcsStore::create_bucket`] (tests and local setup) uses the JSON API the same way.

use std::time::Duration;

use async_trait::async_trait;
use google_cloud_gax::error::rpc::Code;
use google_cloud_gax::exponential_backoff::ExponentialBackoffBuilder;
use google_cloud_gax::retry_policy::RetryPolicyExt;
use google_cloud_storage::client::{Storage as GcsClient, StorageControl};
use google_cloud_storage::retry_policy::RetryableErrors;
use tokio::sync::OnceCell;

use super::{Location, ObjectStore, StorageError};
use crate::gcp;

/// How [`GcsStore`] connects, retries and times out.
#[derive(Debug, Clone)]
pub struct GcsOptions {
    /// Service endpoint; `None` is the real service (`https://storage.googleapis.com`).
    pub endpoint: Option<String>,
    /// The endpoint is an emulator (fake-gcs-server): anonymous credentials, JSON-API listing.
    pub emulator: bool,
    /// Longest one call may take, retries included (a read includes its whole body).
    pub timeout: Duration,
    /// Attempts per call, the first included, for retryable failures.
    pub attempts: u32,
    /// First retry delay; doubles per attempt up to [`GcsOptions::max_backoff`].
    pub initial_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
}

impl Default for GcsOptions {
    fn default() -> Self {
        GcsOptions {
            endpoint: None,
            emulator: false,
            timeout: Duration::from_secs(60),
            attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
        }
    }
}

impl GcsOptions {
    /// The emulator named by `STORAGE_EMULATOR_HOST` when set, else the real service with
    /// Application Default Credentials.
    pub fn from_env() -> GcsOptions {
        match gcp::emulator_host(gcp::STORAGE_EMULATOR_HOST) {
            Some(endpoint) => GcsOptions::emulator(&endpoint),
            None => GcsOptions::default(),
        }
    }

    /// An emulator at `endpoint` (`HOST:PORT` or `http://HOST:PORT`).
    pub fn emulator(endpoint: &str) -> GcsOptions {
        GcsOptions { endpoint: Some(gcp::endpoint_url(endpoint)), emulator: true, ..GcsOptions::default() }
    }
}

/// `gs://` objects through the Cloud Storage client; see the module docs.
pub struct GcsStore {
    opts: GcsOptions,
    client: OnceCell<GcsClient>,
    control: OnceCell<StorageControl>,
    json: OnceCell<reqwest::Client>,
}

/// Bucket arguments of the 1.x API are resource names, not bare names.
fn bucket_path(bucket: &str) -> String {
    format!("projects/_/buckets/{bucket}")
}

/// Bucket names: 3–222 characters of `a-z 0-9 - _ .` (checked so a name can never reshape a URL).
fn check_bucket(loc: &Location, bucket: &str) -> Result<(), StorageError> {
    let ok = (3..=222).contains(&bucket.len())
        && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(StorageError::Invalid { uri: loc.to_string(), reason: format!("invalid bucket name {bucket:?}") })
    }
}

fn parts(loc: &Location) -> Result<(&str, &str), StorageError> {
    match loc {
        Location::Gcs { bucket, key } => {
            check_bucket(loc, bucket)?;
            Ok((bucket, key))
        }
        other => Err(StorageError::Invalid { uri: other.to_string(), reason: "not a gs:// location".into() }),
    }
}

/// An object (not a prefix): the key must be non-empty.
fn object_parts(loc: &Location) -> Result<(&str, &str), StorageError> {
    let (bucket, key) = parts(loc)?;
    if key.is_empty() || key.ends_with('/') {
        return Err(StorageError::Invalid { uri: loc.to_string(), reason: "gs:// URI without an object name".into() });
    }
    Ok((bucket, key))
}

fn content_type(key: &str) -> &'static str {
    let ext = key.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "jpg" | "jpeg" => "image/jpeg",
        "png" => "image/png",
        "webp" => "image/webp",
        "csv" => "text/csv",
        "json" => "application/json",
        _ => "application/octet-stream",
    }
}

/// Map an HTTP status to a storage error (shared with the JSON-API calls).
pub(crate) fn from_http_status(uri: String, status: u16, detail: String) -> StorageError {
    match status {
        404 | 410 => StorageError::NotFound { uri },
        401 | 403 => StorageError::Denied { uri, reason: format!("HTTP {status}: {detail}") },
        408 | 429 | 500..=599 => StorageError::Unavailable { uri, reason: format!("HTTP {status}: {detail}") },
        400..=499 => StorageError::Invalid { uri, reason: format!("HTTP {status}: {detail}") },
        _ => StorageError::Unavailable { uri, reason: format!("unexpected HTTP {status}: {detail}") },
    }
}

/// Map a client error: HTTP status first (the JSON transport fills it, gRPC does not), then the
/// gRPC code, then credentials; everything else (connect, I/O, timeouts, retries exhausted) means
/// the service was not reached: transient.
fn map_error(loc: &Location, e: google_cloud_storage::Error) -> StorageError {
    let uri = loc.to_string();
    let detail = e.to_string();
    if let Some(status) = e.http_status_code() {
        return from_http_status(uri, status, detail);
    }
    if let Some(s) = e.status() {
        return match s.code {
            Code::NotFound => StorageError::NotFound { uri },
            Code::PermissionDenied | Code::Unauthenticated => StorageError::Denied { uri, reason: detail },
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange | Code::AlreadyExists => {
                StorageError::Invalid { uri, reason: detail }
            }
            _ => StorageError::Unavailable { uri, reason: detail },
        };
    }
    if e.is_authentication() {
        let transient = std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<google_cloud_gax::error::CredentialsError>())
            .is_none_or(|c| c.is_transient());
        if !transient {
            return StorageError::Denied { uri, reason: format!("credentials: {detail}") };
        }
    }
    StorageError::Unavailable { uri, reason: detail }
}

impl GcsStore {
    /// A store with these options; nothing connects until the first call.
    pub fn new(opts: GcsOptions) -> GcsStore {
        GcsStore { opts, client: OnceCell::new(), control: OnceCell::new(), json: OnceCell::new() }
    }

    /// [`GcsStore::new`] with [`GcsOptions::from_env`].
    pub fn from_env() -> GcsStore {
        GcsStore::new(GcsOptions::from_env())
    }

    /// The options in use.
    pub fn options(&self) -> &GcsOptions {
        &self.opts
    }

    fn unavailable(&self, what: &str, e: impl std::fmt::Display) -> StorageError {
        StorageError::Unavailable { uri: "gs://".into(), reason: format!("{what}: {e}") }
    }

    fn backoff(&self) -> Result<google_cloud_gax::exponential_backoff::ExponentialBackoff, StorageError> {
        ExponentialBackoffBuilder::new()
            .with_initial_delay(self.opts.initial_backoff.max(Duration::from_millis(1)))
            .with_maximum_delay(self.opts.max_backoff.max(self.opts.initial_backoff).max(Duration::from_millis(1)))
            .with_scaling(2.0)
            .build()
            .map_err(|e| StorageError::Invalid { uri: "gs://".into(), reason: format!("GCS backoff options: {e}") })
    }

    /// Retries stop starting new attempts after half the call timeout, so a call that keeps
    /// failing reports its own error before the hard timeout cuts it short.
    fn retry_policy(&self) -> impl google_cloud_gax::retry_policy::RetryPolicy {
        RetryableErrors.with_attempt_limit(self.opts.attempts.max(1)).with_time_limit(self.opts.timeout / 2)
    }

    async fn client(&self) -> Result<&GcsClient, StorageError> {
        self.client
            .get_or_try_init(|| async {
                gcp::install_crypto_provider();
                let mut b =
                    GcsClient::builder().with_retry_policy(self.retry_policy()).with_backoff_policy(self.backoff()?);
                if let Some(ep) = &self.opts.endpoint {
                    b = b.with_endpoint(ep);
                }
                if self.opts.emulator {
                    b = b.with_credentials(gcp::anonymous_credentials());
                }
                b.build().await.map_err(|e| self.unavailable("building the Cloud Storage client", e))
            })
            .await
    }

    async fn control(&self) -> Result<&StorageControl, StorageError> {
        self.control
            .get_or_try_init(|| async {
                gcp::install_crypto_provider();
                let mut b = StorageControl::builder()
                    .with_retry_policy(self.retry_policy())
                    .with_backoff_policy(self.backoff()?);
                if let Some(ep) = &self.opts.endpoint {
                    b = b.with_endpoint(ep);
                }
                if self.opts.emulator {
                    b = b.with_credentials(gcp::anonymous_credentials());
                }
                b.build().await.map_err(|e| self.unavailable("building the Cloud Storage control client", e))
            })
            .await
    }

    /// The JSON-API endpoint and an HTTP client for it; emulator only (no credentials sent).
    async fn json(&self, loc: &Location) -> Result<(&str, &reqwest::Client), StorageError> {
        let endpoint = match (&self.opts.endpoint, self.opts.emulator) {
            (Some(ep), true) => ep.as_str(),
            _ => {
                return Err(StorageError::Invalid {
                    uri: loc.to_string(),
                    reason: "the JSON-API path is only used against the emulator (STORAGE_EMULATOR_HOST)".into(),
                })
            }
        };
        let http = self
            .json
            .get_or_try_init(|| async {
                gcp::install_crypto_provider();
                reqwest::Client::builder()
                    .no_proxy()
                    .connect_timeout(self.opts.timeout)
                    .timeout(self.opts.timeout)
                    .build()
                    .map_err(|e| self.unavailable("building the HTTP client", e))
            })
            .await?;
        Ok((endpoint, http))
    }

    /// Run one call under the hard timeout.
    async fn timed<T>(
        &self,
        loc: &Location,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, StorageError>>,
    ) -> Result<T, StorageError> {
        match tokio::time::timeout(self.opts.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(StorageError::Unavailable {
                uri: loc.to_string(),
                reason: format!("{what} timed out after {:?}", self.opts.timeout),
            }),
        }
    }

    /// Create a bucket on the emulator (JSON API); an existing bucket is fine. For tests and
    /// local setup only: on the real service, create buckets with `gcloud storage buckets create`.
    pub async fn create_bucket(&self, bucket: &str) -> Result<(), StorageError> {
        let loc = Location::Gcs { bucket: bucket.into(), key: String::new() };
        check_bucket(&loc, bucket)?;
        let (endpoint, http) = self.json(&loc).await?;
        let resp = http
            .post(format!("{endpoint}/storage/v1/b"))
            .query(&[("project", "cropfleet")])
            .json(&serde_json::json!({ "name": bucket }))
            .send()
            .await
            .map_err(|e| reqwest_error(&loc, e))?;
        let status = resp.status().as_u16();
        if (200..300).contains(&status) || status == 409 {
            return Ok(());
        }
        let body = resp.text().await.unwrap_or_default();
        Err(from_http_status(loc.to_string(), status, body))
    }

    async fn list_json(&self, loc: &Location, bucket: &str, prefix: &str) -> Result<Vec<String>, StorageError> {
        let (endpoint, http) = self.json(loc).await?;
        let url = format!("{endpoint}/storage/v1/b/{bucket}/o");
        let mut names = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut q = vec![("prefix", prefix.to_string()), ("maxResults", "1000".to_string())];
            if let Some(t) = &token {
                q.push(("pageToken", t.clone()));
            }
            let page = self
                .timed(loc, "list", async {
                    let resp = http.get(&url).query(&q).send().await.map_err(|e| reqwest_error(loc, e))?;
                    let status = resp.status().as_u16();
                    if !(200..300).contains(&status) {
                        let body = resp.text().await.unwrap_or_default();
                        return Err(from_http_status(loc.to_string(), status, body));
                    }
                    resp.json::<serde_json::Value>().await.map_err(|e| reqwest_error(loc, e))
                })
                .await?;
            for item in page["items"].as_array().into_iter().flatten() {
                if let Some(name) = item["name"].as_str() {
                    names.push(name.to_string());
                }
            }
            match page["nextPageToken"].as_str() {
                Some(t) if !t.is_empty() => token = Some(t.to_string()),
                _ => break,
            }
        }
        Ok(names)
    }

    async fn list_control(&self, loc: &Location, bucket: &str, prefix: &str) -> Result<Vec<String>, StorageError> {
        let mut names = Vec::new();
        let mut token = String::new();
        loop {
            let resp = self
                .timed(loc, "list", async {
                    let ctl = self.control().await?;
                    ctl.list_objects()
                        .set_parent(bucket_path(bucket))
                        .set_prefix(prefix)
                        .set_page_size(1000)
                        .set_page_token(token.clone())
                        .send()
                        .await
                        .map_err(|e| map_error(loc, e))
                })
                .await?;
            names.extend(resp.objects.into_iter().map(|o| o.name));
            if resp.next_page_token.is_empty() {
                break;
            }
            token = resp.next_page_token;
        }
        Ok(names)
    }
}

/// Errors of the hand-made JSON-API calls.
fn reqwest_error(loc: &Location, e: reqwest::Error) -> StorageError {
    match e.status() {
        Some(s) => from_http_status(loc.to_string(), s.as_u16(), e.to_string()),
        None => StorageError::Unavailable { uri: loc.to_string(), reason: e.to_string() },
    }
}

#[async_trait]
impl ObjectStore for GcsStore {
    async fn get(&self, loc: &Location, max_bytes: u64) -> Result<Vec<u8>, StorageError> {
        let (bucket, key) = object_parts(loc)?;
        self.timed(loc, "read", async {
            let client = self.client().await?;
            let mut resp = client.read_object(bucket_path(bucket), key).send().await.map_err(|e| map_error(loc, e))?;
            // Real GCS reports the size before any data; the emulator reports 0 (unknown).
            let size = u64::try_from(resp.object().size).unwrap_or(0);
            if size > max_bytes {
                return Err(StorageError::TooLarge { uri: loc.to_string(), size, limit: max_bytes });
            }
            let mut buf = Vec::with_capacity(size as usize);
            while let Some(chunk) = resp.next().await.transpose().map_err(|e| map_error(loc, e))? {
                let got = (buf.len() + chunk.len()) as u64;
                if got > max_bytes {
                    // Dropping the response abandons the rest of the download.
                    return Err(StorageError::TooLarge { uri: loc.to_string(), size: size.max(got), limit: max_bytes });
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(buf)
        })
        .await
    }

    async fn put(&self, loc: &Location, data: Vec<u8>) -> Result<(), StorageError> {
        let (bucket, key) = object_parts(loc)?;
        self.timed(loc, "write", async {
            let client = self.client().await?;
            client
                .write_object(bucket_path(bucket), key, bytes::Bytes::from(data))
                .set_content_type(content_type(key))
                // Deterministic names: a repeated write stores the same bytes, so retry freely.
                .with_idempotency(true)
                .send_buffered()
                .await
                .map(|_| ())
                .map_err(|e| map_error(loc, e))
        })
        .await
    }

    /// Names under `prefix/` (the prefix is a folder, as on local disk), relative to it, sorted.
    async fn list(&self, prefix: &Location) -> Result<Vec<String>, StorageError> {
        let (bucket, key) = parts(prefix)?;
        let folder = if key.is_empty() || key.ends_with('/') { key.to_string() } else { format!("{key}/") };
        let mut names = if self.opts.emulator {
            self.list_json(prefix, bucket, &folder).await?
        } else {
            self.list_control(prefix, bucket, &folder).await?
        };
        for n in &mut names {
            *n = n[folder.len()..].to_string();
        }
        names.sort();
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Failure;

    #[test]
    fn status_mapping() {
        let e = |s| from_http_status("gs://b/k".into(), s, String::new());
        assert!(matches!(e(404), StorageError::NotFound { .. }));
        assert!(matches!(e(403), StorageError::Denied { .. }));
        assert!(matches!(e(412), StorageError::Invalid { .. }));
        assert!(matches!(e(400), StorageError::Invalid { .. }));
        for s in [408, 429, 500, 503] {
            assert_eq!(e(s).failure(), Failure::Transient, "{s}");
        }
        for s in [400, 403, 404, 412] {
            assert_eq!(e(s).failure(), Failure::Permanent, "{s}");
        }
    }

    #[test]
    fn names_and_types() {
        let loc = Location::parse("gs://Bad_Bucket/x").unwrap();
        assert!(matches!(parts(&loc), Err(StorageError::Invalid { .. })));
        let loc = Location::parse("gs://bucket").unwrap();
        assert!(matches!(object_parts(&loc), Err(StorageError::Invalid { .. })));
        assert_eq!(object_parts(&Location::parse("gs://bkt/a/b.jpg").unwrap()).unwrap(), ("bkt", "a/b.jpg"));
        assert_eq!(content_type("t/000.JPG"), "image/jpeg");
        assert_eq!(content_type("crops.csv"), "text/csv");
        assert_eq!(content_type("noext"), "application/octet-stream");
        assert_eq!(GcsOptions::emulator("127.0.0.1:4443").endpoint.as_deref(), Some("http://127.0.0.1:4443"));
    }
}
